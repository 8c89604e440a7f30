"""Realistic synthetic text scenes (`text_scene`) to finetune a pretrained text detector and to evaluate it on
text it never saw, with nothing downloaded: fonts and photos come from installed packages, the rest is procedural.

A scene is a photo crop or a procedural texture, some non-text clutter (lines, circles, boxes), then blocks of
text: single lines, short left-aligned paragraphs and signs (a coloured, sometimes bordered box holding 1-3
centred lines). Blocks are rotated (mostly within +-10 degrees, some up to the style's limit), get a mild
perspective, varied sizes and colours chosen against the local background (stroke or shadow on busy ones).
Some lines are illegible -- very small print or heavily blurred -- and labelled ``###``, as PaddleOCR labels
such regions. Then the whole image gets lighting, brightness/contrast/gamma changes, blur, noise and JPEG
artefacts. Words are Latin (English vocabulary, a few accented words) and digits (prices, dates, codes);
no CJK text, because no CJK font is installed here.

Labels: one quadrilateral per text *line*, because PP-OCR's detectors (PP-OCRv4 included) are trained on
line-level labels and output line boxes: per-word labels would score a correct line detection as a miss.
Each quadrilateral is the tight box around the ink actually drawn (fill, stroke and shadow, after any blur),
plus a margin of 6% of the font size, mapped through the same perspective transform as the pixels; lines are
placed wholly inside the image and never closer to other text than a gap, so no ink lies outside its label.

Train and validation are drawn *differently* (a validation split drawn from the training generator flatters):

- fonts: disjoint typefaces. train = DejaVu Sans (all weights/slants; Condensed/ExtraLight when
  ``resources="installed"``), STIX General (all), Computer Modern Roman/Bold/Italic (cmr10, cmb10, cmti10);
  val = DejaVu Serif (all; Serif Condensed when installed), DejaVu Sans Mono (all), Computer Modern Sans
  and Typewriter (cmss10, cmtt10). See FONT_CATALOGUE.
- backgrounds: disjoint photos and disjoint texture kinds. train photos = grace_hopper (matplotlib),
  china (scikit-learn), the Jacksboro elevation model rendered as shaded relief (matplotlib); val photos =
  flower (scikit-learn), the topobathy grid rendered as shaded relief (matplotlib). With
  ``resources="installed"`` and scikit-image present, its photos join each side (BACKGROUND_CATALOGUE).
  Train textures: gradient, clouds (fractal noise), stripes, paper fibres; val textures: tiles, wood grain,
  concrete speckle, plaid.
- layout mix (STYLES): train is mostly scattered single lines on textures (photo share 45%; blocks:
  lines 50%, signs 25%, paragraphs 25%; 15% of blocks rotated up to 45 degrees); val is mostly paragraphs
  and signs on photos (photo share 65%; lines 25%, signs 35%, paragraphs 40%; 20% of blocks rotated up to
  60 degrees).

Every image has its own random stream (seed, style, index): same seed => same pixels and a byte-identical
label file, on the same installed versions of numpy, OpenCV, Pillow/FreeType and the same font files.
"""

from __future__ import annotations

import importlib.util
import math
from dataclasses import dataclass, field
from pathlib import Path

import cv2
import numpy as np

from .. import paddle_env  # noqa: F401  -- loads zlib before anything can import Paddle (STACK.md trap 1)
from ..cache import cache_entry
from ..errors import RecipeError
from ..fileio import sha256_file, sha256_json, write_bytes, write_json, write_text
from ..registry import register
from . import DataBundle
from .text_det import (
    _defaults,
    _range_schema,
    _transform_schema,
    build_det_bundle,
    format_paddleocr_det_line,
)

# bump when the renderer changes, so caches made by the old renderer are not reused
TEXT_SCENE_GENERATOR_VERSION = 1

# alpha above which a pixel counts as ink (the tests' ink mask), and above which it must be inside the label
INK_ALPHA = 0.25
BOX_ALPHA = 0.08
IGNORE_TEXT = "###"

# --------------------------------------------------------------------------------------------- resources

# file name -> (split, charset). "ascii": the Computer Modern fonts map only ASCII (and draw '$' as a pound
# sign in cmti10), so they get letters, digits and a few safe punctuation marks.
FONT_CATALOGUE = {
    "DejaVuSans.ttf": ("train", "latin"),
    "DejaVuSans-Bold.ttf": ("train", "latin"),
    "DejaVuSans-Oblique.ttf": ("train", "latin"),
    "DejaVuSans-BoldOblique.ttf": ("train", "latin"),
    "DejaVuSans-ExtraLight.ttf": ("train", "latin"),
    "DejaVuSansCondensed.ttf": ("train", "latin"),
    "DejaVuSansCondensed-Bold.ttf": ("train", "latin"),
    "DejaVuSansCondensed-Oblique.ttf": ("train", "latin"),
    "DejaVuSansCondensed-BoldOblique.ttf": ("train", "latin"),
    "STIXGeneral.ttf": ("train", "latin"),
    "STIXGeneralBol.ttf": ("train", "latin"),
    "STIXGeneralItalic.ttf": ("train", "latin"),
    "STIXGeneralBolIta.ttf": ("train", "latin"),
    "cmr10.ttf": ("train", "ascii"),
    "cmb10.ttf": ("train", "ascii"),
    "cmti10.ttf": ("train", "ascii"),
    "DejaVuSerif.ttf": ("val", "latin"),
    "DejaVuSerif-Bold.ttf": ("val", "latin"),
    "DejaVuSerif-Italic.ttf": ("val", "latin"),
    "DejaVuSerif-BoldItalic.ttf": ("val", "latin"),
    "DejaVuSerifCondensed.ttf": ("val", "latin"),
    "DejaVuSerifCondensed-Bold.ttf": ("val", "latin"),
    "DejaVuSerifCondensed-Italic.ttf": ("val", "latin"),
    "DejaVuSerifCondensed-BoldItalic.ttf": ("val", "latin"),
    "DejaVuSansMono.ttf": ("val", "latin"),
    "DejaVuSansMono-Bold.ttf": ("val", "latin"),
    "DejaVuSansMono-Oblique.ttf": ("val", "latin"),
    "DejaVuSansMono-BoldOblique.ttf": ("val", "latin"),
    "cmss10.ttf": ("val", "ascii"),
    "cmtt10.ttf": ("val", "ascii"),
}

# (package, path inside it, split, kind, needs resources="installed"); kind "dem:<array>" is an elevation grid
# rendered as shaded relief, "photo:<f>" keeps only the top fraction f of the rows. Photos that show text of
# their own (skimage's astronaut, text, page, logo...) are left out, and grace_hopper loses its name tag:
# unlabelled text in a background teaches the detector to ignore text and counts against it in evaluation.
BACKGROUND_CATALOGUE = (
    ("matplotlib", "mpl-data/sample_data/grace_hopper.jpg", "train", "photo:0.78", False),
    ("sklearn", "datasets/images/china.jpg", "train", "photo", False),
    ("matplotlib", "mpl-data/sample_data/jacksboro_fault_dem.npz", "train", "dem:elevation", False),
    ("sklearn", "datasets/images/flower.jpg", "val", "photo", False),
    ("matplotlib", "mpl-data/sample_data/topobathy.npz", "val", "dem:topo", False),
    ("skimage", "data/coffee.png", "train", "photo", True),
    ("skimage", "data/camera.png", "train", "photo", True),
    ("skimage", "data/brick.png", "train", "photo", True),
    ("skimage", "data/grass.png", "train", "photo", True),
    ("skimage", "data/motorcycle_left.png", "train", "photo", True),
    ("skimage", "data/motorcycle_right.png", "train", "photo", True),  # the same scene as _left: same split
    ("skimage", "data/hubble_deep_field.jpg", "train", "photo", True),
    ("skimage", "data/moon.png", "train", "photo", True),
    ("skimage", "data/chelsea.png", "val", "photo", True),
    ("skimage", "data/gravel.png", "val", "photo", True),
    ("skimage", "data/coins.png", "val", "photo", True),
    ("skimage", "data/rocket.jpg", "val", "photo", True),
    ("skimage", "data/ihc.png", "val", "photo", True),
    ("skimage", "data/retina.jpg", "val", "photo", True),
)

TEXTURES = {"train": ("gradient", "clouds", "stripes", "paper"), "val": ("tiles", "wood", "concrete", "plaid")}


@dataclass(frozen=True)
class StyleSpec:
    """How one split's scenes are drawn: which resources, and the layout mix."""

    resource_split: str
    photo_prob: float
    block_weights: dict  # block kind -> weight
    large_angle_prob: float
    large_angle_max: float


STYLES = {
    "train": StyleSpec("train", photo_prob=0.45, block_weights={"line": 0.5, "sign": 0.25, "paragraph": 0.25},
                       large_angle_prob=0.15, large_angle_max=45.0),
    "val": StyleSpec("val", photo_prob=0.65, block_weights={"line": 0.25, "sign": 0.35, "paragraph": 0.4},
                     large_angle_prob=0.2, large_angle_max=60.0),
}
STYLE_IDS = {"train": 0, "val": 1}


def _package_dir(package: str) -> Path | None:
    # find_spec does not import the package (scikit-learn and scikit-image are slow to import)
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(list(spec.submodule_search_locations)[0])


def _font_dirs(resources: str) -> list[Path]:
    dirs = []
    mpl = _package_dir("matplotlib")
    if mpl is not None:
        dirs.append(mpl / "mpl-data" / "fonts" / "ttf")
    if resources == "installed":
        # where Debian/Ubuntu, Arch and Fedora put the DejaVu fonts
        dirs += [Path("/usr/share/fonts/truetype/dejavu"), Path("/usr/share/fonts/TTF"),
                 Path("/usr/share/fonts/dejavu-sans-fonts"), Path("/usr/share/fonts/dejavu-serif-fonts")]
    return [d for d in dirs if d.is_dir()]


@dataclass(frozen=True)
class FontSpec:
    path: Path
    charset: str


@dataclass(frozen=True)
class BackgroundSpec:
    path: Path
    kind: str


@dataclass
class SceneResources:
    """The fonts and background files of one split, loaded lazily and kept in memory."""

    split: str
    fonts: list[FontSpec]
    backgrounds: list[BackgroundSpec]
    _fonts: dict = field(default_factory=dict, repr=False)
    _images: dict = field(default_factory=dict, repr=False)

    def font(self, spec: FontSpec, size: int):
        from PIL import ImageFont

        key = (spec.path, size)
        if key not in self._fonts:
            self._fonts[key] = ImageFont.truetype(str(spec.path), size)
        return self._fonts[key]

    def background(self, spec: BackgroundSpec) -> np.ndarray:
        if spec.path not in self._images:
            self._images[spec.path] = _load_background(spec)
        return self._images[spec.path]

    def fingerprint(self) -> dict:
        """Name and sha256 of every file used: the generated data depend on their content."""
        return {"fonts": {f.path.name: sha256_file(f.path) for f in self.fonts},
                "backgrounds": {b.path.name: sha256_file(b.path) for b in self.backgrounds}}


def scene_resources(split: str, resources: str = "declared") -> SceneResources:
    """Fonts and backgrounds of ``split`` ("train" or "val").

    ``resources="declared"``: only files shipped by slimrecipe's declared dependencies (matplotlib,
    scikit-learn), so every machine with those versions generates the same data. ``"installed"`` adds the
    catalogued system DejaVu fonts and scikit-image's photos when they are present.
    """
    if split not in TEXTURES:
        raise ValueError(f"unknown split {split!r}; expected one of {sorted(TEXTURES)}")
    fonts, seen = [], set()
    for font_dir in _font_dirs(resources):
        for name, (font_split, charset) in FONT_CATALOGUE.items():
            if font_split == split and name not in seen and (font_dir / name).is_file():
                seen.add(name)
                fonts.append(FontSpec(font_dir / name, charset))
    backgrounds = []
    for package, rel_path, bg_split, kind, needs_installed in BACKGROUND_CATALOGUE:
        if bg_split != split or (needs_installed and resources != "installed"):
            continue
        root = _package_dir(package)
        if root is not None and (root / rel_path).is_file():
            backgrounds.append(BackgroundSpec(root / rel_path, kind))
    if not fonts:
        raise RecipeError(f"text_scene found none of its {split} fonts (matplotlib's DejaVu/STIX/cm fonts); "
                          "is matplotlib installed?", path="dataset.name")
    fonts.sort(key=lambda f: f.path.name)
    backgrounds.sort(key=lambda b: b.path.name)
    return SceneResources(split, fonts, backgrounds)


def _load_background(spec: BackgroundSpec) -> np.ndarray:
    if spec.kind.startswith("dem:"):
        with np.load(spec.path) as archive:
            return _shaded_relief(np.asarray(archive[spec.kind[4:]], dtype=np.float32))
    image = cv2.imdecode(np.fromfile(str(spec.path), dtype=np.uint8), cv2.IMREAD_COLOR)
    if image is None:
        raise ValueError(f"cannot decode background image {spec.path}")
    if spec.kind.startswith("photo:"):
        image = image[: int(round(image.shape[0] * float(spec.kind[6:])))]
    return image


def _shaded_relief(elevation: np.ndarray) -> np.ndarray:
    """An elevation grid as a hill-shaded terrain image (BGR uint8), upsampled so crops stay smooth."""
    elevation = np.nan_to_num(elevation)
    scale = max(1, int(np.ceil(800 / max(elevation.shape))))
    elevation = cv2.resize(elevation, (elevation.shape[1] * scale, elevation.shape[0] * scale),
                           interpolation=cv2.INTER_CUBIC)
    gy, gx = np.gradient(elevation)
    relief = np.ptp(elevation) or 1.0
    gx, gy = gx * 300.0 / relief, gy * 300.0 / relief
    shade = (1.0 - gx + gy) / np.sqrt(1.0 + gx**2 + gy**2) / math.sqrt(2.0)
    shade = np.clip(0.5 + 0.5 * shade, 0, 1)
    height = (elevation - elevation.min()) / relief
    colour_map = cv2.applyColorMap(np.round(height * 255).astype(np.uint8), cv2.COLORMAP_SUMMER)
    return np.clip(colour_map.astype(np.float32) * (0.45 + 0.7 * shade[..., None]), 0, 255).astype(np.uint8)


# ------------------------------------------------------------------------------------------------ words

VOCABULARY = (
    "open closed exit entrance parking station street road avenue market coffee bakery pharmacy hotel "
    "restaurant menu price sale special offer today tomorrow monday friday weekend hours daily fresh "
    "bread milk water juice tea pizza pasta salad soup lunch dinner breakfast ticket platform gate floor "
    "room office bank post police hospital school library museum garden park bridge river north south "
    "east west left right stop slow caution danger warning push pull welcome thank you please information "
    "service center city central new old main high grand royal green blue red black white golden silver "
    "quality natural organic premium classic modern design studio house home shop store books music "
    "cinema theatre gallery sports fitness beauty hair nails repair auto taxi bus train airport terminal "
    "departure arrival delayed cancelled free wifi no smoking only staff private keep clear emergency "
    "the and for with from your our all best more every now here about this that order online call "
    "delivery discount limited edition volume number total amount balance account customer members "
    "café crème straße größe façade naïve über señor"
).split()
ASCII_PUNCTUATION = ".,:-/%&()!?#+"


def _random_token(rng: np.random.Generator, charset: str) -> str:
    kind = rng.choice(["word"] * 12 + ["number", "price", "date", "time", "phone", "code", "percent", "unit"])
    if kind == "word":
        words = VOCABULARY if charset == "latin" else [w for w in VOCABULARY if w.isascii()]
        word = str(rng.choice(words))
        case = rng.random()
        return word.upper() if case < 0.2 else word.title() if case < 0.55 else word
    if kind == "number":
        return str(int(rng.integers(0, 10 ** int(rng.integers(1, 6)))))
    if kind == "price":
        symbols = ["$", "€", "£", ""] if charset == "latin" else [""]
        return f"{rng.choice(symbols)}{int(rng.integers(0, 500))}.{int(rng.integers(0, 100)):02d}"
    if kind == "date":
        return f"{int(rng.integers(1990, 2031))}-{int(rng.integers(1, 13)):02d}-{int(rng.integers(1, 29)):02d}"
    if kind == "time":
        return f"{int(rng.integers(0, 24)):02d}:{int(rng.integers(0, 60)):02d}"
    if kind == "phone":
        return f"{int(rng.integers(100, 1000))}-{int(rng.integers(1000, 10000))}"
    if kind == "code":
        letters = "".join(rng.choice(list("ABCDEFGHJKLMNPRSTUVWXYZ"), size=int(rng.integers(1, 4))))
        return f"{letters}-{int(rng.integers(10, 10000))}"
    if kind == "percent":
        return f"{int(rng.integers(1, 100))}%"
    return f"{int(rng.integers(1, 1000))} {rng.choice(['ml', 'km', 'kg', 'm', 'g', 'min'])}"


def _random_words(rng: np.random.Generator, charset: str, count: int) -> list[str]:
    words = [_random_token(rng, charset) for _ in range(count)]
    if rng.random() < 0.15:  # an occasional trailing punctuation mark
        words[-1] += str(rng.choice(list(".,:!?")))
    return words


# ------------------------------------------------------------------------------------------- backgrounds


def _random_bgr(rng: np.random.Generator, low: int = 0, high: int = 256) -> np.ndarray:
    return rng.integers(low, high, size=3).astype(np.float32)


def _fractal_noise(rng: np.random.Generator, height: int, width: int, base_cells: int, octaves: int) -> np.ndarray:
    """Smooth value noise in [0, 1] (octaves of upsampled random grids)."""
    total = np.zeros((height, width), np.float32)
    amplitude, weight = 1.0, 0.0
    for octave in range(octaves):
        cells = base_cells * 2**octave
        grid = rng.random((max(2, cells * height // max(height, width) + 1), cells + 1)).astype(np.float32)
        total += amplitude * cv2.resize(grid, (width, height), interpolation=cv2.INTER_CUBIC)
        weight += amplitude
        amplitude *= 0.5
    total /= weight
    return (total - total.min()) / max(float(np.ptp(total)), 1e-6)


def _two_colour(ramp: np.ndarray, first: np.ndarray, second: np.ndarray) -> np.ndarray:
    return first * (1 - ramp[..., None]) + second * ramp[..., None]


def _texture(rng: np.random.Generator, kind: str, height: int, width: int) -> np.ndarray:
    ys, xs = np.mgrid[0:height, 0:width].astype(np.float32)
    first, second = _random_bgr(rng), _random_bgr(rng)
    if kind == "gradient":
        angle = rng.uniform(0, 2 * np.pi)
        ramp = xs * np.cos(angle) + ys * np.sin(angle)
        ramp = (ramp - ramp.min()) / max(float(np.ptp(ramp)), 1e-6)
        image = _two_colour(ramp, first, second)
    elif kind == "clouds":
        image = _two_colour(_fractal_noise(rng, height, width, int(rng.integers(2, 6)), 4), first, second)
    elif kind == "stripes":
        angle = rng.uniform(0, np.pi)
        period = rng.uniform(12, 90)
        phase = (xs * np.cos(angle) + ys * np.sin(angle)) / period
        ramp = 0.5 + 0.5 * np.sin(2 * np.pi * phase) if rng.random() < 0.5 else (phase % 1.0 < 0.5).astype(np.float32)
        second = first + rng.uniform(-60, 60, size=3).astype(np.float32)
        image = _two_colour(ramp, first, second)
    elif kind == "paper":
        base = _random_bgr(rng, 170, 256)
        mottling = _fractal_noise(rng, height, width, 4, 4)
        image = base * (0.9 + 0.1 * mottling[..., None])
        fibres = np.zeros((height, width), np.float32)
        for _ in range(int(height * width / 900)):
            x, y = rng.uniform(0, width), rng.uniform(0, height)
            angle, length = rng.uniform(0, np.pi), rng.uniform(4, 30)
            end = (int(x + length * np.cos(angle)), int(y + length * np.sin(angle)))
            cv2.line(fibres, (int(x), int(y)), end, float(rng.uniform(-1, 1)), 1, cv2.LINE_AA)
        image += 14.0 * cv2.GaussianBlur(fibres, (3, 3), 0)[..., None]
    elif kind == "tiles":
        tile_w, tile_h = int(rng.integers(24, 120)), int(rng.integers(24, 120))
        grout = int(rng.integers(1, 5))
        offset = rng.random() < 0.5  # running bond, like bricks
        rows = (ys // tile_h).astype(np.int64)
        shifted = xs + (rows % 2) * (tile_w // 2 if offset else 0)
        cols = (shifted // tile_w).astype(np.int64)
        jitter = rng.uniform(-25, 25, size=(rows.max() + 2, cols.max() + 2)).astype(np.float32)
        image = first + jitter[rows, cols][..., None]
        in_grout = ((ys % tile_h) < grout) | ((shifted % tile_w) < grout)
        image[in_grout] = second
    elif kind == "wood":
        warp = _fractal_noise(rng, height, width, 3, 3)
        period = rng.uniform(8, 30)
        angle = rng.uniform(0, np.pi)
        along = xs * np.cos(angle) + ys * np.sin(angle)
        ramp = 0.5 + 0.5 * np.sin(2 * np.pi * (along / period + 4 * warp))
        brown = np.array([rng.uniform(20, 90), rng.uniform(60, 140), rng.uniform(110, 200)], np.float32)
        image = _two_colour(ramp**2, brown, brown * rng.uniform(0.5, 0.8))
    elif kind == "concrete":
        grey = float(rng.uniform(90, 210))
        coarse = _fractal_noise(rng, height, width, 8, 3)
        image = np.full((height, width, 3), grey, np.float32) + 30 * (coarse[..., None] - 0.5)
        image += rng.normal(0, 10, size=(height, width, 1)).astype(np.float32)
        pores = rng.random((height, width)) < 0.002
        image[cv2.dilate(pores.astype(np.uint8), np.ones((2, 2), np.uint8)) > 0] *= 0.5
        image = image + rng.uniform(-15, 15, size=3).astype(np.float32)
    elif kind == "plaid":
        image = np.broadcast_to(first, (height, width, 3)).copy()
        for axis_values in (xs, ys):
            period = rng.uniform(30, 120)
            band = ((axis_values % period) < period * rng.uniform(0.2, 0.5)).astype(np.float32)
            image = image * (1 - 0.35 * band[..., None]) + _random_bgr(rng) * 0.35 * band[..., None]
    else:
        raise ValueError(f"unknown texture {kind!r}")
    return image.astype(np.float32)


def _photo_crop(rng: np.random.Generator, photo: np.ndarray, height: int, width: int) -> np.ndarray:
    """A random crop of the photo with the output's aspect ratio, resized to (height, width), jittered."""
    src_h, src_w = photo.shape[:2]
    aspect = width / height
    scale = rng.uniform(0.35, 1.0)
    crop_w = min(src_w, src_h * aspect) * scale
    crop_h = crop_w / aspect
    x0 = rng.uniform(0, src_w - crop_w)
    y0 = rng.uniform(0, src_h - crop_h)
    crop = photo[int(y0) : int(y0 + crop_h), int(x0) : int(x0 + crop_w)]
    image = cv2.resize(crop, (width, height), interpolation=cv2.INTER_LINEAR).astype(np.float32)
    if rng.random() < 0.5:
        image = image[:, ::-1]
    if rng.random() < 0.2:  # hue shift, so a few photos give many colour casts
        hsv = cv2.cvtColor(np.clip(image, 0, 255).astype(np.uint8), cv2.COLOR_BGR2HSV)
        hsv[..., 0] = ((hsv[..., 0].astype(np.int32) + int(rng.integers(0, 180))) % 180).astype(np.uint8)
        image = cv2.cvtColor(hsv, cv2.COLOR_HSV2BGR).astype(np.float32)
    return np.ascontiguousarray(image * rng.uniform(0.8, 1.15, size=3).astype(np.float32))


def _background(rng: np.random.Generator, style: StyleSpec, resources: SceneResources,
                height: int, width: int) -> np.ndarray:
    if resources.backgrounds and rng.random() < style.photo_prob:
        # a shaded-relief grid counts for a third of a photo: it is one texture, a photo has more to crop
        weights = np.array([0.35 if b.kind.startswith("dem:") else 1.0 for b in resources.backgrounds])
        spec = resources.backgrounds[int(rng.choice(len(weights), p=weights / weights.sum()))]
        image = _photo_crop(rng, resources.background(spec), height, width)
    else:
        kinds = TEXTURES[style.resource_split]
        image = _texture(rng, kinds[int(rng.integers(len(kinds)))], height, width)
    # non-text clutter: a detector must learn that lines and shapes are not text
    for _ in range(int(rng.integers(0, 7))):
        colour = tuple(float(c) for c in _random_bgr(rng))
        thickness = int(rng.integers(1, 6))
        shape = rng.integers(4)
        p1 = (int(rng.integers(0, width)), int(rng.integers(0, height)))
        p2 = (int(rng.integers(0, width)), int(rng.integers(0, height)))
        if shape == 0:
            cv2.line(image, p1, p2, colour, thickness, cv2.LINE_AA)
        elif shape == 1:
            cv2.circle(image, p1, int(rng.integers(5, max(6, min(height, width) // 4))), colour, thickness, cv2.LINE_AA)
        elif shape == 2:
            if rng.random() < 0.6:
                cv2.rectangle(image, p1, p2, colour, thickness, cv2.LINE_AA)
            else:  # filled boxes stay small: large flat areas would crowd out the scene
                side = min(height, width) // 4
                p2 = (p1[0] + int(rng.integers(4, side)), p1[1] + int(rng.integers(4, side)))
                cv2.rectangle(image, p1, p2, colour, -1, cv2.LINE_AA)
        else:
            points = rng.integers(0, [width, height], size=(int(rng.integers(3, 6)), 2)).astype(np.int32)
            cv2.polylines(image, [points], bool(rng.random() < 0.5), colour, thickness, cv2.LINE_AA)
    return image


# ------------------------------------------------------------------------------------------------ blocks


def _luminance(bgr: np.ndarray) -> np.ndarray:
    return bgr[..., 0] * 0.114 + bgr[..., 1] * 0.587 + bgr[..., 2] * 0.299


def _contrasting_colour(rng: np.random.Generator, background_luma: float, min_difference: float = 100.0) -> np.ndarray:
    """A random colour whose luminance differs from ``background_luma`` by at least ``min_difference``."""
    colour = _random_bgr(rng)
    dark = background_luma > 128
    target = background_luma - min_difference if dark else background_luma + min_difference
    luma = float(_luminance(colour))
    if dark and luma > target:
        colour *= max(target, 0.0) / max(luma, 1e-6)
    elif not dark and luma < target:
        # blend toward white until bright enough
        t = (min(target, 255.0) - luma) / max(255.0 - luma, 1e-6)
        colour = colour + (255.0 - colour) * min(t, 1.0)
    return colour


@dataclass
class LineLayers:
    """One rendered line in block coordinates: alpha layers and the ink box (x0, y0, x1, y1)."""

    text: str
    illegible: bool
    font_px: int
    fill: np.ndarray
    stroke: np.ndarray | None
    shadow: np.ndarray | None
    box: tuple[float, float, float, float]


def _draw_text_alpha(font, text: str, pad: int, stroke_width: int = 0, layout_stroke: int = 0) -> np.ndarray:
    """Alpha [0, 1] of ``text``, its ascender line ``pad`` pixels below the canvas top and its pen origin
    ``pad`` pixels from the left, so lines of one font stack on a common baseline and left edge. The canvas
    is laid out for a stroke of ``layout_stroke``: the fill and the stroke of one line share a canvas."""
    from PIL import Image, ImageDraw

    ascent, descent = font.getmetrics()
    left, top, right, bottom = font.getbbox(text, stroke_width=max(stroke_width, layout_stroke))
    x_shift, y_shift = -min(0, left), -min(0, top)
    width = max(right, 1) + x_shift + 2 * pad
    height = max(bottom, ascent + descent) + y_shift + 2 * pad
    canvas = Image.new("L", (width, height), 0)
    ImageDraw.Draw(canvas).text((pad + x_shift, pad + y_shift), text, fill=255, font=font,
                                stroke_width=stroke_width, stroke_fill=255)
    return np.asarray(canvas, dtype=np.float32) / 255.0


def _ink_box(union: np.ndarray, font_px: int) -> tuple[float, float, float, float] | None:
    """(x0, y0, x1, y1) around every pixel above BOX_ALPHA, plus a margin of 6% of the font size."""
    ys, xs = np.nonzero(union > BOX_ALPHA)
    if len(xs) == 0:
        return None
    margin = max(1.0, 0.06 * font_px)
    return (xs.min() - margin, ys.min() - margin, xs.max() + 1 + margin, ys.max() + 1 + margin)


def _render_line(rng: np.random.Generator, resources: SceneResources, font_spec: FontSpec, font_px: int,
                 text: str, effects: dict) -> LineLayers | None:
    font = resources.font(font_spec, font_px)
    blur = effects.get("blur", 0.0)
    stroke_width = effects.get("stroke", 0)
    # room for the stroke, the shadow and 3 sigma of blur, so no layer is cut by the canvas edge
    pad = max(3, int(0.3 * font_px)) + stroke_width + int(math.ceil(3 * blur))
    shadow_offset = effects.get("shadow", (0, 0))
    pad += max(shadow_offset) + (int(math.ceil(3 * max(0.5, font_px / 25))) if "shadow" in effects else 0)
    fill = _draw_text_alpha(font, text, pad, layout_stroke=stroke_width)
    stroke = _draw_text_alpha(font, text, pad, stroke_width) if stroke_width else None
    shadow = None
    if "shadow" in effects:
        sx, sy = shadow_offset
        base = stroke if stroke is not None else fill
        shadow = np.zeros_like(base)
        shadow[sy:, sx:] = base[: base.shape[0] - sy, : base.shape[1] - sx]
        shadow = cv2.GaussianBlur(shadow, (0, 0), max(0.5, font_px / 25))
    if blur > 0:
        fill = cv2.GaussianBlur(fill, (0, 0), blur)
        stroke = None if stroke is None else cv2.GaussianBlur(stroke, (0, 0), blur)
        shadow = None if shadow is None else cv2.GaussianBlur(shadow, (0, 0), blur)
    union = fill if stroke is None else np.maximum(fill, stroke)
    if shadow is not None:
        union = np.maximum(union, shadow)
    box = _ink_box(union, font_px)
    if box is None:
        return None
    return LineLayers(text, bool(effects.get("illegible")), font_px, fill, stroke, shadow, box)


@dataclass
class Block:
    """Lines (and an optional sign box) laid out in an unrotated local frame of size (height, width)."""

    height: int
    width: int
    lines: list[tuple[LineLayers, int, int]]  # layers, x offset, y offset
    sign: np.ndarray | None = None  # alpha of the sign box
    sign_border: np.ndarray | None = None


def _text_effects(rng: np.random.Generator, font_px: int, illegible_fraction: float) -> dict:
    effects = {}
    if rng.random() < 0.15 and font_px >= 14:
        effects["stroke"] = int(rng.integers(1, max(2, font_px // 12) + 1))
    elif rng.random() < 0.12 and font_px >= 14:
        offset = int(rng.integers(1, max(2, font_px // 10) + 1))
        effects["shadow"] = (offset, offset)
    if rng.random() < illegible_fraction:
        effects["blur"] = float(rng.uniform(0.22, 0.4) * font_px)
        effects["illegible"] = True
    return effects


def _stack_lines(rendered: list[LineLayers], font_px: int, align: str, leading: float) -> tuple[list, int, int]:
    """Place lines top to bottom ``leading`` pixels apart; returns ([(line, x, y)], height, width)."""
    placed, widths = [], [line.fill.shape[1] for line in rendered]
    width = max(widths)
    y = 0
    last_bottom = -np.inf
    for line in rendered:
        x = 0 if align == "left" else (width - line.fill.shape[1]) // 2
        top = y + line.box[1]
        if top < last_bottom + max(2.0, 0.15 * font_px):  # boxes would touch: leave the line out
            y += int(round(leading))
            continue
        placed.append((line, x, y))
        last_bottom = y + line.box[3]
        y += int(round(leading))
    height = max(y0 + line.fill.shape[0] for line, _, y0 in placed)
    return placed, height, width


def _make_block(rng: np.random.Generator, kind: str, resources: SceneResources, image_side: int,
                illegible_fraction: float) -> Block | None:
    font_spec = resources.fonts[int(rng.integers(len(resources.fonts)))]

    def font_size(low: float, high: float) -> int:
        high = max(high, low + 1)
        return int(round(math.exp(rng.uniform(math.log(low), math.log(high)))))

    if kind == "small_print":  # illegible by size: labelled ###
        font_px = int(rng.integers(5, 9))
        line = _render_line(rng, resources, font_spec, font_px,
                            " ".join(_random_words(rng, font_spec.charset, int(rng.integers(2, 7)))),
                            {"illegible": True})
        return None if line is None else Block(line.fill.shape[0], line.fill.shape[1], [(line, 0, 0)])
    if kind == "line":
        font_px = font_size(11, 0.09 * image_side)
        effects = _text_effects(rng, font_px, illegible_fraction)
        line = _render_line(rng, resources, font_spec, font_px,
                            " ".join(_random_words(rng, font_spec.charset, int(rng.integers(1, 5)))), effects)
        return None if line is None else Block(line.fill.shape[0], line.fill.shape[1], [(line, 0, 0)])
    if kind == "paragraph":
        font_px = font_size(10, max(13, 0.04 * image_side))
        max_width = rng.uniform(0.3, 0.7) * image_side
        font = resources.font(font_spec, font_px)
        texts, current = [], []
        for word in _random_words(rng, font_spec.charset, int(rng.integers(6, 30))):
            if current and font.getlength(" ".join(current + [word])) > max_width:
                texts.append(" ".join(current))
                current = []
            current.append(word)
        texts.append(" ".join(current))
        texts = texts[: int(rng.integers(2, 7))]
        effects = _text_effects(rng, font_px, 0.0)
        rendered = [_render_line(rng, resources, font_spec, font_px, text,
                                 {**effects, **({"blur": 0.3 * font_px, "illegible": True}
                                                if rng.random() < illegible_fraction / 2 else {})})
                    for text in texts]
        rendered = [line for line in rendered if line is not None]
        if not rendered:
            return None
        placed, height, width = _stack_lines(rendered, font_px, "left", font_px * rng.uniform(1.4, 1.8))
        return Block(height, width, placed)
    if kind == "sign":
        font_px = font_size(14, 0.12 * image_side)
        upper = rng.random() < 0.5
        texts = []
        for _ in range(int(rng.integers(1, 4))):
            words = _random_words(rng, font_spec.charset, int(rng.integers(1, 3)))
            texts.append(" ".join(w.upper() if upper else w for w in words))
        effects = {k: v for k, v in _text_effects(rng, font_px, illegible_fraction / 2).items() if k != "shadow"}
        rendered = [line for line in (_render_line(rng, resources, font_spec, font_px, t, effects) for t in texts)
                    if line is not None]
        if not rendered:
            return None
        placed, inner_h, inner_w = _stack_lines(rendered, font_px, "centre", font_px * rng.uniform(1.35, 1.6))
        ink_x0 = min(x + line.box[0] for line, x, _ in placed)
        ink_y0 = min(y + line.box[1] for line, _, y in placed)
        ink_x1 = max(x + line.box[2] for line, x, _ in placed)
        ink_y1 = max(y + line.box[3] for line, _, y in placed)
        pad_x, pad_y = font_px * rng.uniform(0.4, 1.2), font_px * rng.uniform(0.3, 0.8)
        # the sign box frames the ink; the layout frame grows to hold it
        shift_x, shift_y = int(math.ceil(max(0.0, pad_x - ink_x0))), int(math.ceil(max(0.0, pad_y - ink_y0)))
        placed = [(line, x + shift_x, y + shift_y) for line, x, y in placed]
        width = int(math.ceil(max(inner_w + shift_x, ink_x1 + shift_x + pad_x))) + 1
        height = int(math.ceil(max(inner_h + shift_y, ink_y1 + shift_y + pad_y))) + 1
        rect = (ink_x0 + shift_x - pad_x, ink_y0 + shift_y - pad_y, ink_x1 + shift_x + pad_x, ink_y1 + shift_y + pad_y)
        sign = np.zeros((height, width), np.uint8)
        radius = int(min(rect[2] - rect[0], rect[3] - rect[1]) * rng.uniform(0, 0.25))
        _rounded_rect(sign, rect, radius, 255, -1)
        border = None
        if rng.random() < 0.4:
            border = np.zeros_like(sign)
            inset = max(2, int(font_px * 0.15))
            inner = (rect[0] + inset, rect[1] + inset, rect[2] - inset, rect[3] - inset)
            _rounded_rect(border, inner, max(0, radius - inset), 255, max(1, font_px // 14))
            # a border that crosses the ink would be ink outside the labels
            ink = np.zeros_like(sign, dtype=bool)
            for line, x, y in placed:
                x0, y0, x1, y1 = (int(v) for v in line.box)
                ink[max(0, y + y0) : y + y1 + 1, max(0, x + x0) : x + x1 + 1] = True
            if (border[ink] > 0).any():
                border = None
        return Block(height, width, placed, sign.astype(np.float32) / 255.0,
                     None if border is None else border.astype(np.float32) / 255.0)
    raise ValueError(f"unknown block kind {kind!r}")


def _rounded_rect(canvas: np.ndarray, rect, radius: int, value: int, thickness: int) -> None:
    x0, y0, x1, y1 = (int(round(v)) for v in rect)
    radius = max(0, min(radius, (x1 - x0) // 2, (y1 - y0) // 2))
    if radius == 0:
        cv2.rectangle(canvas, (x0, y0), (x1, y1), value, thickness, cv2.LINE_AA)
        return
    # polygon approximation of the rounded outline, filled or stroked
    points = []
    for cx, cy, start in ((x1 - radius, y0 + radius, -90), (x1 - radius, y1 - radius, 0),
                          (x0 + radius, y1 - radius, 90), (x0 + radius, y0 + radius, 180)):
        for angle in np.linspace(start, start + 90, 8):
            points.append((cx + radius * np.cos(np.radians(angle)), cy + radius * np.sin(np.radians(angle))))
    polygon = np.round(np.array(points)).astype(np.int32)
    if thickness < 0:
        cv2.fillPoly(canvas, [polygon], value, cv2.LINE_AA)
    else:
        cv2.polylines(canvas, [polygon], True, value, thickness, cv2.LINE_AA)


def _block_angle(rng: np.random.Generator, style: StyleSpec) -> float:
    if rng.random() < style.large_angle_prob:
        return float(rng.choice([-1, 1]) * rng.uniform(10, style.large_angle_max))
    return float(np.clip(rng.normal(0, 4), -10, 10))


def _destination_quad(rng: np.random.Generator, height: int, width: int, angle_deg: float) -> np.ndarray:
    """The block's corners (tl, tr, br, bl) rotated about its centre, with a mild perspective jitter."""
    corners = np.array([[0, 0], [width, 0], [width, height], [0, height]], np.float64)
    jitter = rng.uniform(-1, 1, size=(4, 2)) * 0.06 * min(height, width) * (rng.random() < 0.5)
    corners = corners + jitter
    centre = np.array([width / 2, height / 2])
    theta = np.radians(-angle_deg)  # counter-clockwise on screen (y points down)
    rotation = np.array([[np.cos(theta), -np.sin(theta)], [np.sin(theta), np.cos(theta)]])
    return (corners - centre) @ rotation.T


# ------------------------------------------------------------------------------------------------- scene


@dataclass
class Scene:
    """One generated image (BGR uint8), its labels and the text ink as drawn (bool, before degradation)."""

    image: np.ndarray
    texts: list[str]
    polys: list[np.ndarray]
    ink: np.ndarray


def _over(dst_rgb: np.ndarray, dst_alpha: np.ndarray, colour: np.ndarray, alpha: np.ndarray) -> None:
    """Porter-Duff 'over' of a flat colour with ``alpha`` onto an RGBA canvas, in place."""
    a = alpha[..., None]
    out_alpha = alpha + dst_alpha * (1 - alpha)
    dst_rgb[:] = (colour * a + dst_rgb * dst_alpha[..., None] * (1 - a)) / np.maximum(out_alpha, 1e-6)[..., None]
    dst_alpha[:] = out_alpha


def _place_block(rng: np.random.Generator, block: Block, style: StyleSpec, image: np.ndarray, ink: np.ndarray,
                 occupied: np.ndarray, texts: list, polys: list) -> bool:
    img_h, img_w = occupied.shape
    quad = _destination_quad(rng, block.height, block.width, _block_angle(rng, style))
    span = quad.max(axis=0) - quad.min(axis=0)
    if span[0] > img_w - 4 or span[1] > img_h - 4:
        return False
    gap = int(math.ceil(max(3.0, 0.25 * min(block.height, 40))))
    for _attempt in range(12):
        shift = np.array([rng.uniform(2, img_w - 2 - span[0]), rng.uniform(2, img_h - 2 - span[1])]) - quad.min(axis=0)
        dest = quad + shift
        # test the block's footprint, grown by the gap, in a window around it only (full-image masks are slow)
        wx0, wy0 = np.maximum(np.floor(dest.min(axis=0)).astype(int) - gap, 0)
        wx1, wy1 = np.minimum(np.ceil(dest.max(axis=0)).astype(int) + gap + 1, [img_w, img_h])
        footprint = np.zeros((wy1 - wy0, wx1 - wx0), np.uint8)
        cv2.fillPoly(footprint, [np.round(dest - [wx0, wy0]).astype(np.int32)], 1)
        footprint = cv2.dilate(footprint, np.ones((2 * gap + 1, 2 * gap + 1), np.uint8))
        if not (footprint & occupied[wy0:wy1, wx0:wx1]).any():
            break
    else:
        return False
    occupied[wy0:wy1, wx0:wx1] |= footprint

    src = np.array([[0, 0], [block.width, 0], [block.width, block.height], [0, block.height]], np.float32)
    x0, y0 = np.floor(dest.min(axis=0)).astype(int)
    x1, y1 = np.ceil(dest.max(axis=0)).astype(int) + 1
    x0, y0, x1, y1 = max(x0, 0), max(y0, 0), min(x1, img_w), min(y1, img_h)
    homography = cv2.getPerspectiveTransform(src, (dest - [x0, y0]).astype(np.float32))
    region = image[y0:y1, x0:x1]
    background_luma = float(_luminance(region.reshape(-1, 3).mean(axis=0)))
    busy = float(_luminance(region).std()) > 35

    canvas_rgb = np.zeros((block.height, block.width, 3), np.float32)
    canvas_alpha = np.zeros((block.height, block.width), np.float32)
    block_ink = np.zeros((block.height, block.width), np.float32)
    if block.sign is not None:
        sign_colour = _random_bgr(rng)
        _over(canvas_rgb, canvas_alpha, sign_colour, block.sign * rng.uniform(0.85, 1.0))
        background_luma = float(_luminance(sign_colour))
        busy = False
    text_colour = _contrasting_colour(rng, background_luma)
    if block.sign_border is not None:
        _over(canvas_rgb, canvas_alpha, text_colour, block.sign_border)
    outline_colour = _contrasting_colour(rng, float(_luminance(text_colour)), 110)
    for line, x, y in block.lines:
        h, w = line.fill.shape
        window = (slice(y, y + h), slice(x, x + w))
        stroke, shadow, box = line.stroke, line.shadow, line.box
        if busy and stroke is None and shadow is None and not line.illegible and rng.random() < 0.7:
            # legible on a busy photo needs an outline; it is ink, so the box grows to hold it
            shadow = cv2.GaussianBlur(cv2.dilate(line.fill, np.ones((3, 3), np.uint8)), (0, 0), 1.0)
            box = _ink_box(np.maximum(shadow, line.fill), line.font_px)
        for layer, colour in ((shadow, outline_colour), (stroke, outline_colour), (line.fill, text_colour)):
            if layer is not None:
                _over(canvas_rgb[window], canvas_alpha[window], colour, layer)
                np.maximum(block_ink[window], layer, out=block_ink[window])
        # the line's label: its ink box in block coordinates, through the block's transform
        bx0, by0, bx1, by1 = box
        corners = np.array([[bx0 + x, by0 + y], [bx1 + x, by0 + y], [bx1 + x, by1 + y], [bx0 + x, by1 + y]],
                           np.float32)
        poly = cv2.perspectiveTransform(corners[None], homography)[0] + [x0, y0]
        polys.append(np.clip(poly, 0, [img_w - 1, img_h - 1]).astype(np.float64))
        texts.append(IGNORE_TEXT if line.illegible else line.text)

    size = (x1 - x0, y1 - y0)
    warped_rgb = cv2.warpPerspective(canvas_rgb * canvas_alpha[..., None], homography, size, flags=cv2.INTER_LINEAR)
    warped_alpha = cv2.warpPerspective(canvas_alpha, homography, size, flags=cv2.INTER_LINEAR)
    warped_ink = cv2.warpPerspective(block_ink, homography, size, flags=cv2.INTER_LINEAR)
    # premultiplied colour: image * (1 - a) + colour * a
    image[y0:y1, x0:x1] = region * (1 - warped_alpha[..., None]) + warped_rgb
    ink[y0:y1, x0:x1] |= warped_ink > INK_ALPHA
    return True


def _degrade(rng: np.random.Generator, image: np.ndarray) -> np.ndarray:
    """Camera and print defects over the whole image: lighting, contrast, blur, noise, JPEG (float in, uint8 out)."""
    height, width = image.shape[:2]
    if rng.random() < 0.5:  # uneven lighting
        light = _fractal_noise(rng, height, width, 2, 1)
        image = image * (0.75 + 0.4 * light[..., None])
    contrast, brightness = rng.uniform(0.75, 1.2), rng.uniform(-25, 25)
    image = (image - 128.0) * contrast + 128.0 + brightness
    image = np.clip(image, 0, 255)
    if rng.random() < 0.3:
        image = 255.0 * (image / 255.0) ** rng.uniform(0.75, 1.35)
    blur = rng.random()
    if blur < 0.3:
        image = cv2.GaussianBlur(image, (0, 0), rng.uniform(0.4, 1.2))
    elif blur < 0.4:
        length = int(rng.integers(3, 8))
        kernel = np.zeros((length, length), np.float32)
        kernel[length // 2] = 1.0 / length
        rotation = cv2.getRotationMatrix2D(((length - 1) / 2, (length - 1) / 2), rng.uniform(0, 180), 1.0)
        kernel = cv2.warpAffine(kernel, rotation, (length, length))
        image = cv2.filter2D(image, -1, kernel / max(kernel.sum(), 1e-6))
    if rng.random() < 0.5:
        sigma = rng.uniform(2, 9)
        if rng.random() < 0.5:
            image = image + rng.normal(0, sigma, size=(height, width, 1)).astype(np.float32)
        else:
            image = image + rng.normal(0, sigma, size=image.shape).astype(np.float32)
    out = np.clip(np.round(image), 0, 255).astype(np.uint8)
    if rng.random() < 0.25:  # an earlier, harsher compression (re-saved images)
        _, encoded = cv2.imencode(".jpg", out, [cv2.IMWRITE_JPEG_QUALITY, int(rng.integers(15, 45))])
        out = cv2.imdecode(encoded, cv2.IMREAD_COLOR)
    return out


def render_text_scene(rng: np.random.Generator, style: str, resources: SceneResources,
                      size_range: tuple[int, int] = (320, 960), lines_per_image: tuple[int, int] = (4, 14),
                      illegible_fraction: float = 0.06) -> Scene:
    """One scene: background, text blocks until about ``lines_per_image`` lines are placed, then defects."""
    spec = STYLES[style]
    height = int(rng.integers(size_range[0], size_range[1] + 1))
    width = int(rng.integers(size_range[0], size_range[1] + 1))
    image = _background(rng, spec, resources, height, width)
    ink = np.zeros((height, width), bool)
    occupied = np.zeros((height, width), np.uint8)
    texts, polys = [], []
    target = int(rng.integers(lines_per_image[0], lines_per_image[1] + 1))
    kinds = list(spec.block_weights)
    weights = np.array([spec.block_weights[k] for k in kinds], np.float64)
    for _attempt in range(3 * target + 3):
        if len(texts) >= target:
            break
        kind = "small_print" if rng.random() < illegible_fraction else str(rng.choice(kinds, p=weights / weights.sum()))
        block = _make_block(rng, kind, resources, min(height, width), illegible_fraction)
        if block is not None:
            _place_block(rng, block, spec, image, ink, occupied, texts, polys)
    return Scene(_degrade(rng, image), texts, polys, ink)


# -------------------------------------------------------------------------------------------- generator


def generate_text_scenes(out_dir: str | Path, *, count: int, seed: int, style: str,
                         size_range: tuple[int, int] = (320, 960), lines_per_image: tuple[int, int] = (4, 14),
                         illegible_fraction: float = 0.06, image_format: str = "jpg",
                         resources: str = "declared", label_name: str | None = None) -> Path:
    """Write ``count`` scenes of ``style`` ("train" or "val") as ``images/<style>/<index>.<format>`` under
    ``out_dir`` and a PaddleOCR detection label file (``<style>_label.txt`` unless ``label_name``); returns
    the label file's path. JPEGs get a random quality in [40, 95]."""
    if style not in STYLES:
        raise ValueError(f"unknown style {style!r}; expected one of {sorted(STYLES)}")
    if image_format not in ("jpg", "png"):
        raise ValueError(f"image_format must be 'jpg' or 'png', not {image_format!r}")
    if not 32 <= size_range[0] <= size_range[1]:
        raise ValueError(f"size_range must be [min, max] with 32 <= min <= max, got {size_range}")
    out_dir = Path(out_dir)
    scene_res = scene_resources(STYLES[style].resource_split, resources)
    lines = []
    for index in range(count):
        rng = np.random.default_rng([seed, STYLE_IDS[style], index])
        scene = render_text_scene(rng, style, scene_res, tuple(size_range), tuple(lines_per_image),
                                  illegible_fraction)
        if image_format == "jpg":
            ok, encoded = cv2.imencode(".jpg", scene.image, [cv2.IMWRITE_JPEG_QUALITY, int(rng.integers(40, 96))])
        else:
            ok, encoded = cv2.imencode(".png", scene.image)
        if not ok:
            raise RuntimeError(f"OpenCV failed to encode a {image_format} image")
        rel_path = f"images/{style}/{index:05d}.{image_format}"
        write_bytes(out_dir / rel_path, encoded.tobytes())
        lines.append(format_paddleocr_det_line(rel_path, scene.texts, scene.polys))
    label_file = out_dir / (label_name or f"{style}_label.txt")
    write_text(label_file, "\n".join(lines) + "\n")
    return label_file


# ----------------------------------------------------------------------------------------------- plugin

GENERATION_KEYS = ("num_train", "num_val", "size_range", "lines_per_image", "illegible_fraction",
                   "image_format", "resources", "seed")

TEXT_SCENE_SCHEMA = {
    "type": "object",
    "additionalProperties": False,
    "properties": {
        "num_train": {"type": "integer", "minimum": 1, "maximum": 1000000, "default": 400,
                      "description": "number of training scenes (train fonts, backgrounds and layout mix)"},
        "num_val": {"type": "integer", "minimum": 1, "maximum": 1000000, "default": 100,
                    "description": "number of evaluation scenes (disjoint fonts and backgrounds, other layout mix)"},
        "size_range": _range_schema({"type": "integer", "minimum": 32, "maximum": 4096}, [320, 960],
                                    "image width and height, each drawn independently, in pixels"),
        "lines_per_image": _range_schema({"type": "integer", "minimum": 0, "maximum": 200}, [4, 14],
                                         "text lines attempted per image (fewer if they do not fit)"),
        "illegible_fraction": {"type": "number", "minimum": 0, "maximum": 1, "default": 0.06,
                               "description": "share of lines made illegible (tiny or heavily blurred) and "
                                              "labelled '###'"},
        "image_format": {"enum": ["jpg", "png"], "default": "jpg",
                         "description": "jpg adds compression artefacts (quality 40-95)"},
        "resources": {"enum": ["declared", "installed"], "default": "declared",
                      "description": "declared: only fonts/photos shipped by slimrecipe's dependencies "
                                     "(same data on every machine); installed: also system DejaVu fonts "
                                     "and scikit-image's photos when present"},
        "seed": {"type": ["integer", "null"], "minimum": 0, "default": None,
                 "description": "generation seed; null uses the run's seed"},
        **_transform_schema(640),
    },
}


def generate_text_scene_dataset(out_dir: Path, gen: dict) -> Path:
    """Both splits into ``out_dir`` unless a finished copy is there; ``generation.json`` is written last."""
    with cache_entry(out_dir, marker="generation.json") as entry:  # concurrent jobs: one generates, the rest wait
        if entry.ready:
            return out_dir
        common = {"seed": gen["seed"], "size_range": tuple(gen["size_range"]),
                  "lines_per_image": tuple(gen["lines_per_image"]), "illegible_fraction": gen["illegible_fraction"],
                  "image_format": gen["image_format"], "resources": gen["resources"]}
        generate_text_scenes(out_dir, count=gen["num_train"], style="train", label_name="train_label.txt", **common)
        generate_text_scenes(out_dir, count=gen["num_val"], style="val", label_name="val_label.txt", **common)
        write_json(entry.marker, {"generator_version": TEXT_SCENE_GENERATOR_VERSION, "params": gen})
    return out_dir


@register("dataset", "text_scene", schema=TEXT_SCENE_SCHEMA)
def text_scene(params: dict, data_ctx) -> DataBundle:
    """Realistic synthetic scenes; validation uses other fonts, backgrounds and layouts than training."""
    params = {**_defaults(TEXT_SCENE_SCHEMA), **params}
    if params["seed"] is None:
        params["seed"] = int(data_ctx.seed)
    for key in ("size_range", "lines_per_image"):
        low, high = params[key]
        if low > high:
            raise RecipeError(f"[min, max] expected, got {params[key]}", path=f"dataset.params.{key}")
    gen = {key: params[key] for key in GENERATION_KEYS}
    fingerprints = {split: scene_resources(split, params["resources"]).fingerprint() for split in ("train", "val")}
    from PIL import features

    generation_key = sha256_json({"generator_version": TEXT_SCENE_GENERATOR_VERSION, **gen,
                                  "resource_files": fingerprints, "freetype": features.version("freetype2"),
                                  "opencv": cv2.__version__})[:16]
    out_dir = generate_text_scene_dataset(Path(data_ctx.cache_dir) / "text_scene" / generation_key, gen)
    return build_det_bundle(
        out_dir, out_dir / "train_label.txt", out_dir / "val_label.txt", params, data_ctx.seed,
        {"dataset": "text_scene", "params": params, "generator_version": TEXT_SCENE_GENERATOR_VERSION,
         "generation_key": generation_key,
         "resources": {split: sorted(fp["fonts"]) + sorted(fp["backgrounds"]) for split, fp in fingerprints.items()}},
    )
