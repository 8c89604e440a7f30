"""Text-detection dataset plugins for DB: `paddleocr_det` (PaddleOCR label files) and `synthetic_text`.

Both yield the same samples. Train: ``(image CHW float32, shrink_map, shrink_mask, threshold_map,
threshold_mask)``, every map float32 [train_size, train_size]. Val: ``(image CHW float32, shape_info,
polygons, ignore)`` where ``shape_info = [src_h, src_w, ratio_h, ratio_w]``, ``polygons`` is a list of float32
(k, 2) arrays in original image pixels and ``ignore`` a bool array ("###" regions); val images differ in size,
so the bundle's ``collate_fn`` pads them into one batch and keeps the rest as lists.

`synthetic_text` renders random words once into the cache, writes PaddleOCR-format labels and then reads
them back through the same reader as `paddleocr_det`, so both plugins share one code path.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import string
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

from .. import paddle_env  # noqa: F401  -- loads zlib before anything can import Paddle (STACK.md trap 1)
from ..cache import cache_entry
from ..errors import RecipeError
from ..fileio import sha256_file, sha256_json, write_bytes, write_json, write_text
from ..registry import register
from . import DataBundle
from .db_transforms import (
    DBTransformConfig,
    collate_det_eval,
    make_eval_input,
    make_train_sample,
    offset_polygon,
)

# PaddleOCR's label encoder treats both as "do not care" regions
IGNORE_TRANSCRIPTIONS = ("###", "*")
# bump when the renderer changes, so caches of the old renderer are not reused
SYNTHETIC_GENERATOR_VERSION = 1
SYNTHETIC_FONTS = (
    "DejaVuSans.ttf", "DejaVuSans-Bold.ttf", "DejaVuSans-Oblique.ttf", "DejaVuSansMono.ttf",
    "DejaVuSansMono-Bold.ttf", "DejaVuSerif.ttf", "DejaVuSerif-Bold.ttf", "DejaVuSerif-Italic.ttf",
)
WORD_ALPHABET = string.ascii_letters + string.digits


# -------------------------------------------------------------------------------------------- labels


@dataclass
class DetRecord:
    """One labelled image: its path, text polygons (float32 (k, 2), pixels), ignore flags, transcriptions."""

    image_path: Path
    polys: list[np.ndarray]
    ignore: np.ndarray
    texts: list[str]


def parse_paddleocr_det_line(line: str, data_dir: Path) -> DetRecord:
    """``image_path<TAB>[{"transcription": ..., "points": [[x, y], ...]}, ...]`` -> DetRecord."""
    if "\t" not in line:
        raise ValueError("expected 'image_path<TAB>json annotations'; no tab found")
    rel_path, annotations = line.split("\t", 1)
    try:
        items = json.loads(annotations)
    except json.JSONDecodeError as exc:
        raise ValueError(f"annotations are not valid JSON ({exc.msg} at column {exc.colno})") from None
    if not isinstance(items, list):
        raise ValueError("annotations must be a JSON list of {transcription, points} objects")
    polys, ignore, texts = [], [], []
    for k, item in enumerate(items):
        if not isinstance(item, dict) or "points" not in item:
            raise ValueError(f"annotation {k} has no 'points'")
        points = np.asarray(item["points"], dtype=np.float32)
        if points.ndim != 2 or points.shape[1] != 2 or len(points) < 3:
            raise ValueError(f"annotation {k}: 'points' must be a list of at least 3 [x, y] pairs")
        text = str(item.get("transcription", ""))
        polys.append(points)
        texts.append(text)
        ignore.append(text in IGNORE_TRANSCRIPTIONS)
    return DetRecord(data_dir / rel_path, polys, np.array(ignore, dtype=bool), texts)


def read_paddleocr_det_labels(label_file: str | Path, data_dir: str | Path) -> list[DetRecord]:
    """Every record of a PaddleOCR detection label file (UTF-8, BOM tolerated); image paths are relative
    to ``data_dir``. Raises ValueError naming the file and line of the first malformed entry."""
    label_file, data_dir = Path(label_file), Path(data_dir)
    records = []
    for number, line in enumerate(label_file.read_text(encoding="utf-8-sig").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            records.append(parse_paddleocr_det_line(line.rstrip("\r"), data_dir))
        except ValueError as exc:
            raise ValueError(f"{label_file}:{number}: {exc}") from None
    return records


def format_paddleocr_det_line(rel_path: str, texts: list[str], polys: list[np.ndarray]) -> str:
    annotations = [
        {"transcription": text, "points": np.asarray(poly).round().astype(int).tolist()}
        for text, poly in zip(texts, polys)
    ]
    return f"{rel_path}\t{json.dumps(annotations, ensure_ascii=False)}"


def load_image_bgr(path: Path, recipe_key: str = "dataset.params.data_dir") -> np.ndarray:
    """An image as BGR uint8; a file that is missing or not a decodable image is a RecipeError naming it."""
    # np.fromfile + imdecode: cv2.imread cannot open non-ASCII paths on every platform
    try:
        raw = np.fromfile(str(path), dtype=np.uint8)
    except OSError as e:
        raise RecipeError(f"cannot read image {path}: {e.strerror or e}", path=recipe_key) from None
    image = cv2.imdecode(raw, cv2.IMREAD_COLOR) if raw.size else None
    if image is None:
        raise RecipeError(f"cannot decode image {path}: the file is damaged or not an image", path=recipe_key)
    return image


# ------------------------------------------------------------------------------------------- splits


class DetTrainSet:
    """Training split: a fresh random crop each time an item is read, reproducible from (seed, index, n-th read)."""

    def __init__(self, records: list[DetRecord], config: DBTransformConfig, seed: int,
                 recipe_key: str = "dataset.params.train_label_file"):
        self.records = records
        self.config = config
        self.seed = seed
        self.recipe_key = recipe_key
        self._reads = np.zeros(len(records), dtype=np.int64)

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index: int):
        index = range(len(self.records))[index]
        record = self.records[index]
        rng = np.random.default_rng([self.seed, index, int(self._reads[index])])
        self._reads[index] += 1
        return make_train_sample(load_image_bgr(record.image_path, self.recipe_key), record.polys, record.ignore, self.config, rng)


class DetEvalSet:
    """Evaluation split: (image CHW float32, shape_info, polygons, ignore), see the module docstring."""

    def __init__(self, records: list[DetRecord], config: DBTransformConfig,
                 recipe_key: str = "dataset.params.val_label_file"):
        self.records = records
        self.config = config
        self.recipe_key = recipe_key

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index: int):
        record = self.records[range(len(self.records))[index]]
        image, shape_info = make_eval_input(
            load_image_bgr(record.image_path, self.recipe_key), self.config.eval_limit_side_len, self.config.eval_limit_type
        )
        return image, shape_info, [p.copy() for p in record.polys], record.ignore.copy()


# --------------------------------------------------------------------------------------- param schema


def _range_schema(item: dict, default: list, description: str) -> dict:
    return {"type": "array", "items": item, "minItems": 2, "maxItems": 2, "default": default,
            "description": description + " ([min, max], inclusive)"}


def _transform_schema(train_size_default: int) -> dict:
    return {
        "train_size": {"type": "integer", "minimum": 32, "maximum": 4096, "multipleOf": 32,
                       "default": train_size_default,
                       "description": "side of the square training input; crops are scaled to fit it"},
        "shrink_ratio": {"type": "number", "exclusiveMinimum": 0, "exclusiveMaximum": 1, "default": 0.4,
                         "description": "r in the DB shrink offset D = area * (1 - r^2) / perimeter"},
        "min_text_size": {"type": "number", "minimum": 0, "default": 8,
                          "description": "text whose short side (pixels, at train size) is smaller is masked out "
                                         "of the training loss"},
        "thresh_min": {"type": "number", "minimum": 0, "maximum": 1, "default": 0.3,
                       "description": "threshold-map value away from text borders"},
        "thresh_max": {"type": "number", "minimum": 0, "maximum": 1, "default": 0.7,
                       "description": "threshold-map value on a text border"},
        "random_crop": {"type": "boolean", "default": True,
                        "description": "train on random crops that cut between words, never through them"},
        "min_crop_side_ratio": {"type": "number", "exclusiveMinimum": 0, "maximum": 1, "default": 0.1,
                                "description": "smallest crop side, as a fraction of the image side"},
        "eval_limit_side_len": {"type": "integer", "minimum": 32, "maximum": 8192, "default": 960,
                                "description": "evaluation resize limit (see eval_limit_type); sides are then "
                                               "rounded to multiples of 32"},
        "eval_limit_type": {"enum": ["max", "min"], "default": "max",
                            "description": "max: shrink images whose longer side exceeds the limit; "
                                           "min: enlarge images whose shorter side is below it"},
    }



def _defaults(schema: dict) -> dict:
    return {key: spec["default"] for key, spec in schema["properties"].items() if "default" in spec}


def _transform_config(params: dict) -> DBTransformConfig:
    if params["thresh_min"] >= params["thresh_max"]:
        raise RecipeError(
            f"thresh_min ({params['thresh_min']}) must be below thresh_max ({params['thresh_max']})",
            path="dataset.params.thresh_min",
        )
    return DBTransformConfig(
        train_size=params["train_size"],
        shrink_ratio=params["shrink_ratio"],
        min_text_size=params["min_text_size"],
        thresh_min=params["thresh_min"],
        thresh_max=params["thresh_max"],
        random_crop=params["random_crop"],
        min_crop_side_ratio=params["min_crop_side_ratio"],
        eval_limit_side_len=params["eval_limit_side_len"],
        eval_limit_type=params["eval_limit_type"],
    )


# ------------------------------------------------------------------------------------------- bundles


def images_digest(records: list[DetRecord], data_dir: Path) -> str:
    """One sha256 over (path, sha256) of every image the labels name: the manifest changes if any image does."""
    lines = []
    for record in records:
        try:
            name = record.image_path.relative_to(data_dir).as_posix()
        except ValueError:
            name = record.image_path.as_posix()
        lines.append(f"{name}\t{sha256_file(record.image_path)}")
    return hashlib.sha256("\n".join(lines).encode()).hexdigest()


def _read_split(label_file: Path, data_dir: Path, key: str) -> list[DetRecord]:
    try:
        records = read_paddleocr_det_labels(label_file, data_dir)
    except ValueError as exc:
        raise RecipeError(str(exc), path=f"dataset.params.{key}") from None
    if not records:
        raise RecipeError(f"{label_file} lists no images", path=f"dataset.params.{key}")
    missing = [r.image_path for r in records if not r.image_path.is_file()]
    if missing:
        raise RecipeError(
            f"{len(missing)} image(s) named in {label_file} do not exist under {data_dir}, e.g. {missing[0]}",
            path="dataset.params.data_dir",
        )
    return records


def build_det_bundle(
    data_dir: Path, train_label_file: Path, val_label_file: Path, params: dict, seed: int, manifest: dict
) -> DataBundle:
    """Read both label files and wrap them as DB train/val splits; the manifest gains the files' hashes."""
    config = _transform_config(params)
    train = _read_split(train_label_file, data_dir, "train_label_file")
    val = _read_split(val_label_file, data_dir, "val_label_file")
    manifest = {
        **manifest,
        "train_label_sha256": sha256_file(train_label_file),
        "val_label_sha256": sha256_file(val_label_file),
        "images_sha256": images_digest(train + val, data_dir),
        "num_train": len(train),
        "num_val": len(val),
    }
    return DataBundle(
        train=DetTrainSet(train, config, seed),
        val=DetEvalSet(val, config),
        input_shape=[3, config.train_size, config.train_size],
        manifest=manifest,
        extra={
            "data_dir": str(data_dir),
            "sample_layout": {
                "train": ["image", "shrink_map", "shrink_mask", "threshold_map", "threshold_mask"],
                "val": ["image", "shape_info", "polygons", "ignore"],
            },
        },
        collate_fn=collate_det_eval,
    )


PADDLEOCR_DET_SCHEMA = {
    "type": "object",
    "additionalProperties": False,
    "required": ["data_dir", "train_label_file", "val_label_file"],
    "properties": {
        "data_dir": {"type": "string", "x-file": True,
                     "description": "directory the image paths in the label files are relative to"},
        "train_label_file": {"type": "string", "x-file": True,
                             "description": "PaddleOCR detection label file of the training split"},
        "val_label_file": {"type": "string", "x-file": True,
                           "description": "PaddleOCR detection label file of the evaluation split"},
        **_transform_schema(640),
    },
}


@register("dataset", "paddleocr_det", schema=PADDLEOCR_DET_SCHEMA)
def paddleocr_det(params: dict, data_ctx) -> DataBundle:
    """Text detection data in PaddleOCR's label format (image<TAB>JSON polygons; '###' = ignore)."""
    params = {**_defaults(PADDLEOCR_DET_SCHEMA), **params}
    data_dir = Path(params["data_dir"])
    return build_det_bundle(
        data_dir, Path(params["train_label_file"]), Path(params["val_label_file"]), params, data_ctx.seed,
        {"dataset": "paddleocr_det", "params": params},
    )


# ----------------------------------------------------------------------------------- synthetic text


def font_paths() -> list[Path]:
    """The DejaVu TTFs matplotlib ships (located without importing matplotlib)."""
    spec = importlib.util.find_spec("matplotlib")
    if spec is None or not spec.submodule_search_locations:
        raise RecipeError("synthetic_text renders with matplotlib's DejaVu fonts; matplotlib is not installed",
                          path="dataset.name")
    font_dir = Path(list(spec.submodule_search_locations)[0]) / "mpl-data" / "fonts" / "ttf"
    paths = [font_dir / name for name in SYNTHETIC_FONTS if (font_dir / name).is_file()]
    if not paths:
        raise RecipeError(f"no DejaVu fonts found in {font_dir}", path="dataset.name")
    return paths


def _random_colour(rng: np.random.Generator, light: bool) -> np.ndarray:
    low, high = (160, 256) if light else (0, 90)
    return rng.integers(low, high, size=3).astype(np.float32)


def _background(rng: np.random.Generator, size: int, light: bool) -> np.ndarray:
    kind = rng.integers(3)
    base = _random_colour(rng, light)
    if kind == 0:  # solid
        image = np.broadcast_to(base, (size, size, 3)).copy()
    elif kind == 1:  # linear gradient in a random direction
        other = _random_colour(rng, light)
        angle = rng.uniform(0, 2 * np.pi)
        ys, xs = np.mgrid[0:size, 0:size].astype(np.float32)
        ramp = xs * np.cos(angle) + ys * np.sin(angle)
        ramp = (ramp - ramp.min()) / max(float(np.ptp(ramp)), 1e-6)
        image = base * (1 - ramp[..., None]) + other * ramp[..., None]
    else:  # noise, softened so it reads as texture rather than static
        image = base + rng.normal(0, rng.uniform(8, 25), size=(size, size, 3)).astype(np.float32)
        image = cv2.GaussianBlur(image, (3, 3), 0)
    return image


def _render_word_mask(text: str, font_path: Path, font_size: int) -> tuple[np.ndarray, np.ndarray] | None:
    """(anti-aliased mask uint8, 4-point box around the ink, tl/tr/br/bl) of one word, unrotated."""
    from PIL import Image, ImageDraw, ImageFont

    font = ImageFont.truetype(str(font_path), font_size)
    left, top, right, bottom = font.getbbox(text)
    pad = max(2, font_size // 5)
    canvas = Image.new("L", (right - left + 2 * pad, bottom - top + 2 * pad), 0)
    ImageDraw.Draw(canvas).text((pad - left, pad - top), text, fill=255, font=font)
    mask = np.asarray(canvas, dtype=np.uint8)
    ys, xs = np.nonzero(mask > 40)
    if len(xs) == 0:
        return None
    margin = max(1, round(0.06 * font_size))
    x0, y0, x1, y1 = xs.min() - margin, ys.min() - margin, xs.max() + margin, ys.max() + margin
    box = np.array([[x0, y0], [x1, y0], [x1, y1], [x0, y1]], dtype=np.float64)
    return mask, box


def _rotate(mask: np.ndarray, box: np.ndarray, angle_deg: float) -> tuple[np.ndarray, np.ndarray]:
    """Rotate the mask (counter-clockwise, degrees) onto a canvas large enough to hold it, and the box with it."""
    height, width = mask.shape
    matrix = cv2.getRotationMatrix2D((width / 2.0, height / 2.0), angle_deg, 1.0)
    cos, sin = abs(matrix[0, 0]), abs(matrix[0, 1])
    new_w, new_h = int(np.ceil(height * sin + width * cos)), int(np.ceil(height * cos + width * sin))
    matrix[0, 2] += new_w / 2.0 - width / 2.0
    matrix[1, 2] += new_h / 2.0 - height / 2.0
    rotated = cv2.warpAffine(mask, matrix, (new_w, new_h), flags=cv2.INTER_LINEAR, borderValue=0)
    rotated_box = np.hstack([box, np.ones((4, 1))]) @ matrix.T
    return rotated, rotated_box


def render_synthetic_image(rng: np.random.Generator, gen: dict, fonts: list[Path]) -> tuple[np.ndarray, list, list]:
    """(BGR uint8 image, transcriptions, 4-point polygons) of one synthetic image; words never overlap."""
    size = gen["image_size"]
    light_background = bool(rng.random() < 0.7)
    image = _background(rng, size, light_background)
    occupied = np.zeros((size, size), dtype=np.uint8)
    texts, polys = [], []
    for _ in range(int(rng.integers(gen["words_per_image"][0], gen["words_per_image"][1] + 1))):
        length = int(rng.integers(gen["word_length"][0], gen["word_length"][1] + 1))
        text = "".join(rng.choice(list(WORD_ALPHABET), size=length))
        font_size = int(rng.integers(gen["font_size"][0], gen["font_size"][1] + 1))
        rendered = _render_word_mask(text, fonts[int(rng.integers(len(fonts)))], font_size)
        angle = float(rng.uniform(gen["rotation_deg"][0], gen["rotation_deg"][1]))
        colour = _random_colour(rng, not light_background)
        if rendered is None:
            continue
        mask, box = _rotate(*rendered, angle)
        mask_h, mask_w = mask.shape
        if mask_w > size - 2 or mask_h > size - 2:
            continue
        # words keep a gap so that their shrunk and regrown boxes stay apart
        gap = max(2.0, 0.2 * font_size)
        for _attempt in range(20):
            x0 = int(rng.integers(1, size - mask_w))
            y0 = int(rng.integers(1, size - mask_h))
            poly = np.clip(box + (x0, y0), 0, size - 1)
            footprint = np.zeros_like(occupied)
            cv2.fillPoly(footprint, [np.round(poly).astype(np.int32)], 1)
            if (footprint & occupied).any():
                continue
            for grown in offset_polygon(poly, gap):
                cv2.fillPoly(occupied, [np.round(grown).astype(np.int32)], 1)
            alpha = (mask.astype(np.float32) / 255.0)[..., None]
            region = image[y0 : y0 + mask_h, x0 : x0 + mask_w]
            image[y0 : y0 + mask_h, x0 : x0 + mask_w] = region * (1 - alpha) + colour * alpha
            ignored = bool(rng.random() < gen["ignore_word_fraction"])
            texts.append("###" if ignored else text)
            polys.append(poly)
            break
    return np.clip(np.round(image), 0, 255).astype(np.uint8), texts, polys


def generate_synthetic_text(out_dir: Path, gen: dict) -> Path:
    """Render the dataset described by ``gen`` into ``out_dir`` unless a finished copy is already there.

    Each image has its own random stream (seed, split, index), so an image does not depend on how many
    came before it. ``generation.json`` is written last: its presence means every file is complete.
    """
    with cache_entry(out_dir, marker="generation.json") as entry:  # concurrent jobs: one generates, the rest wait
        if entry.ready:
            return out_dir
        fonts = font_paths()
        for split_id, (split, count) in enumerate((("train", gen["num_train"]), ("val", gen["num_val"]))):
            lines = []
            for index in range(count):
                rng = np.random.default_rng([gen["seed"], split_id, index])
                image, texts, polys = render_synthetic_image(rng, gen, fonts)
                ok, png = cv2.imencode(".png", image)
                if not ok:
                    raise RuntimeError("OpenCV failed to encode a PNG")
                rel_path = f"images/{split}_{index:05d}.png"
                write_bytes(out_dir / rel_path, png.tobytes())
                lines.append(format_paddleocr_det_line(rel_path, texts, polys))
            write_text(out_dir / f"{split}_label.txt", "\n".join(lines) + "\n")
        from PIL import features

        write_json(entry.marker, {"generator_version": SYNTHETIC_GENERATOR_VERSION, "params": gen,
                                  "fonts": [p.name for p in fonts], "freetype": features.version("freetype2")})
    return out_dir


GENERATION_KEYS = ("num_train", "num_val", "image_size", "words_per_image", "word_length", "font_size",
                   "rotation_deg", "ignore_word_fraction", "seed")

SYNTHETIC_TEXT_SCHEMA = {
    "type": "object",
    "additionalProperties": False,
    "properties": {
        "num_train": {"type": "integer", "minimum": 1, "maximum": 1000000, "default": 200,
                      "description": "number of training images to generate"},
        "num_val": {"type": "integer", "minimum": 1, "maximum": 1000000, "default": 50,
                    "description": "number of evaluation images to generate"},
        "image_size": {"type": "integer", "minimum": 64, "maximum": 4096, "default": 256,
                       "description": "side of the square generated images, in pixels"},
        "words_per_image": _range_schema({"type": "integer", "minimum": 0, "maximum": 100}, [2, 6],
                                         "words attempted per image (fewer if they do not fit)"),
        "word_length": _range_schema({"type": "integer", "minimum": 1, "maximum": 40}, [3, 10],
                                     "characters per word (letters and digits)"),
        "font_size": _range_schema({"type": "integer", "minimum": 6, "maximum": 512}, [14, 40],
                                   "font size in pixels"),
        "rotation_deg": _range_schema({"type": "number", "minimum": -90, "maximum": 90}, [-15, 15],
                                      "word rotation in degrees, counter-clockwise"),
        "ignore_word_fraction": {"type": "number", "minimum": 0, "maximum": 1, "default": 0.0,
                                 "description": "fraction of words labelled '###' (ignored by loss and metric)"},
        "seed": {"type": ["integer", "null"], "minimum": 0, "default": None,
                 "description": "generation seed; null uses the run's seed"},
        **_transform_schema(256),
    },
}


def _check_ranges(params: dict) -> None:
    for key in ("words_per_image", "word_length", "font_size", "rotation_deg"):
        low, high = params[key]
        if low > high:
            raise RecipeError(f"[min, max] expected, got {params[key]}", path=f"dataset.params.{key}")


@register("dataset", "synthetic_text", schema=SYNTHETIC_TEXT_SCHEMA)
def synthetic_text(params: dict, data_ctx) -> DataBundle:
    """Rendered random words on varied backgrounds, labelled with rotated boxes; generated once and cached."""
    params = {**_defaults(SYNTHETIC_TEXT_SCHEMA), **params}
    if params["seed"] is None:
        params["seed"] = int(data_ctx.seed)
    _check_ranges(params)
    gen = {key: params[key] for key in GENERATION_KEYS}
    generation_key = sha256_json({"generator_version": SYNTHETIC_GENERATOR_VERSION, **gen})[:16]
    out_dir = generate_synthetic_text(Path(data_ctx.cache_dir) / "synthetic_text" / generation_key, gen)
    return build_det_bundle(
        out_dir, out_dir / "train_label.txt", out_dir / "val_label.txt", params, data_ctx.seed,
        {"dataset": "synthetic_text", "params": params, "generator_version": SYNTHETIC_GENERATOR_VERSION,
         "generation_key": generation_key},
    )
