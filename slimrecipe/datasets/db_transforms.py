"""DB (Differentiable Binarization) text-detection targets and image transforms, from polygons.

Training targets, all computed at the final training size:

- shrink map / shrink mask: each text polygon shrunk inwards by the Vatti clipping offset
  ``D = A * (1 - r**2) / L`` (area A, perimeter L, ``r = shrink_ratio``); ignored ("###") polygons and
  polygons too thin to shrink are cut out of the mask so the loss neither rewards nor punishes them.
- threshold map / threshold mask: in the band of each polygon dilated by D, one minus the distance to the
  polygon's nearest edge divided by D, mapped to ``[thresh_min, thresh_max]``.

Evaluation resizes so both sides are multiples of 32 (the detector downsamples by 32) and keeps the scale
factors, so predicted boxes map back to the original image. Pure numpy / OpenCV / pyclipper: no Paddle.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import cv2
import numpy as np
import pyclipper

# ImageNet statistics, applied channel by channel to the BGR image scaled to [0, 1], as PaddleOCR's
# pretrained detectors expect.
IMAGENET_MEAN = np.array([0.485, 0.456, 0.406], dtype=np.float32)
IMAGENET_STD = np.array([0.229, 0.224, 0.225], dtype=np.float32)

# pyclipper works on integers: polygons are scaled up first so sub-pixel offsets survive.
_CLIPPER_SCALE = 16.0


@dataclass(frozen=True)
class DBTransformConfig:
    train_size: int = 640
    shrink_ratio: float = 0.4
    min_text_size: float = 8.0
    thresh_min: float = 0.3
    thresh_max: float = 0.7
    random_crop: bool = True
    min_crop_side_ratio: float = 0.1
    crop_max_tries: int = 10
    eval_limit_side_len: int = 960
    eval_limit_type: str = "max"


# --------------------------------------------------------------------------------------------- geometry


def polygon_area(poly: np.ndarray) -> float:
    """Unsigned area (shoelace)."""
    poly = np.asarray(poly, dtype=np.float64)
    x, y = poly[:, 0], poly[:, 1]
    return float(abs(np.dot(x, np.roll(y, -1)) - np.dot(y, np.roll(x, -1))) / 2.0)


def polygon_perimeter(poly: np.ndarray) -> float:
    poly = np.asarray(poly, dtype=np.float64)
    return float(np.linalg.norm(poly - np.roll(poly, -1, axis=0), axis=1).sum())


def shrink_offset(poly: np.ndarray, shrink_ratio: float = 0.4) -> float:
    """The Vatti offset D = A (1 - r^2) / L by which DB shrinks (and dilates) a text polygon."""
    perimeter = polygon_perimeter(poly)
    if perimeter <= 0:
        return 0.0
    return polygon_area(poly) * (1.0 - shrink_ratio**2) / perimeter


def offset_polygon(poly: np.ndarray, distance: float) -> list[np.ndarray]:
    """Grow (distance > 0) or shrink (distance < 0) a polygon with round joins; may return 0 or several parts."""
    path = np.round(np.asarray(poly, dtype=np.float64) * _CLIPPER_SCALE).astype(np.int64).tolist()
    offsetter = pyclipper.PyclipperOffset(arc_tolerance=0.25 * _CLIPPER_SCALE)
    offsetter.AddPath(path, pyclipper.JT_ROUND, pyclipper.ET_CLOSEDPOLYGON)
    parts = offsetter.Execute(distance * _CLIPPER_SCALE)
    return [np.asarray(p, dtype=np.float64) / _CLIPPER_SCALE for p in parts if len(p) >= 3]


def min_area_rect_short_side(poly: np.ndarray) -> float:
    """Shorter side of the minimum-area rectangle: the text's 'height' even when the box is rotated."""
    (_, _), (w, h), _ = cv2.minAreaRect(np.asarray(poly, dtype=np.float32))
    return float(min(w, h))


def _fill(canvas: np.ndarray, poly: np.ndarray, value: float) -> None:
    cv2.fillPoly(canvas, [np.round(poly).astype(np.int32)], value)


def _distance_to_polygon_edges(xs: np.ndarray, ys: np.ndarray, poly: np.ndarray) -> np.ndarray:
    """Distance from each grid point (xs x ys) to the nearest edge segment of ``poly``."""
    px, py = np.meshgrid(xs.astype(np.float64), ys.astype(np.float64))
    nearest = np.full(px.shape, np.inf)
    for a, b in zip(poly, np.roll(poly, -1, axis=0)):
        edge = b - a
        length_sq = float(edge @ edge)
        if length_sq == 0.0:
            t = np.zeros_like(px)
        else:
            t = np.clip(((px - a[0]) * edge[0] + (py - a[1]) * edge[1]) / length_sq, 0.0, 1.0)
        dist = np.hypot(px - (a[0] + t * edge[0]), py - (a[1] + t * edge[1]))
        np.minimum(nearest, dist, out=nearest)
    return nearest


# ---------------------------------------------------------------------------------------------- targets


def clip_polygons(polys: list[np.ndarray], height: int, width: int) -> list[np.ndarray]:
    return [
        np.stack([np.clip(p[:, 0], 0, width - 1), np.clip(p[:, 1], 0, height - 1)], axis=1).astype(np.float64)
        for p in (np.asarray(q, dtype=np.float64) for q in polys)
    ]


def make_shrink_map(
    polys: list[np.ndarray],
    ignore: np.ndarray,
    height: int,
    width: int,
    shrink_ratio: float = 0.4,
    min_text_size: float = 8.0,
) -> tuple[np.ndarray, np.ndarray]:
    """(shrink_map, shrink_mask), both float32 [height, width].

    The map is 1 inside every shrunk text polygon. The mask is 0 over ignored polygons, polygons whose short
    side is under ``min_text_size`` and polygons that vanish when shrunk: the loss must not learn "no text"
    where there is text it cannot be taught to find.
    """
    shrink_map = np.zeros((height, width), dtype=np.float32)
    shrink_mask = np.ones((height, width), dtype=np.float32)
    for poly, ignored in zip(clip_polygons(polys, height, width), np.asarray(ignore, dtype=bool)):
        if ignored or polygon_area(poly) < 1.0 or min_area_rect_short_side(poly) < min_text_size:
            _fill(shrink_mask, poly, 0.0)
            continue
        shrunk = offset_polygon(poly, -shrink_offset(poly, shrink_ratio))
        if len(shrunk) != 1:
            _fill(shrink_mask, poly, 0.0)
            continue
        _fill(shrink_map, shrunk[0], 1.0)
    return shrink_map, shrink_mask


def make_threshold_map(
    polys: list[np.ndarray],
    ignore: np.ndarray,
    height: int,
    width: int,
    shrink_ratio: float = 0.4,
    thresh_min: float = 0.3,
    thresh_max: float = 0.7,
) -> tuple[np.ndarray, np.ndarray]:
    """(threshold_map, threshold_mask), both float32 [height, width].

    On a polygon's edge the map is ``thresh_max``; it falls linearly to ``thresh_min`` at distance D from
    the nearest edge (inside or outside) and stays there. The mask is 1 over each dilated polygon.
    Ignored polygons get no border: the border teaches where text ends, which "###" does not say.
    """
    closeness = np.zeros((height, width), dtype=np.float64)
    threshold_mask = np.zeros((height, width), dtype=np.float32)
    for poly, ignored in zip(clip_polygons(polys, height, width), np.asarray(ignore, dtype=bool)):
        if ignored or polygon_area(poly) < 1.0:
            continue
        distance = shrink_offset(poly, shrink_ratio)
        if distance <= 0:
            continue
        dilated = offset_polygon(poly, distance)
        if not dilated:
            continue
        band = dilated[0]
        _fill(threshold_mask, band, 1.0)
        x0, y0 = np.floor(band.min(axis=0)).astype(int)
        x1, y1 = np.ceil(band.max(axis=0)).astype(int)
        x0, y0 = max(x0, 0), max(y0, 0)
        x1, y1 = min(x1, width - 1), min(y1, height - 1)
        if x1 < x0 or y1 < y0:
            continue
        dist = _distance_to_polygon_edges(np.arange(x0, x1 + 1), np.arange(y0, y1 + 1), poly)
        local = 1.0 - np.clip(dist / distance, 0.0, 1.0)
        np.maximum(closeness[y0 : y1 + 1, x0 : x1 + 1], local, out=closeness[y0 : y1 + 1, x0 : x1 + 1])
    threshold_map = (closeness * (thresh_max - thresh_min) + thresh_min).astype(np.float32)
    return threshold_map, threshold_mask


# ------------------------------------------------------------------------------------------- transforms


def normalize_to_chw(image_bgr: np.ndarray) -> np.ndarray:
    """uint8 BGR HWC -> float32 CHW, scaled by 1/255 then ImageNet mean/std per channel."""
    image = image_bgr.astype(np.float32) / 255.0
    image = (image - IMAGENET_MEAN) / IMAGENET_STD
    return np.ascontiguousarray(image.transpose(2, 0, 1))


def _free_coordinates(polys: list[np.ndarray], length: int, axis: int) -> np.ndarray:
    """Coordinates along ``axis`` that no polygon's projection covers: where a crop may cut without
    slicing through a word."""
    covered = np.zeros(length, dtype=bool)
    for poly in polys:
        lo = int(np.clip(np.floor(poly[:, axis].min()), 0, length - 1))
        hi = int(np.clip(np.ceil(poly[:, axis].max()), 0, length - 1))
        covered[lo : hi + 1] = True
    return np.flatnonzero(~covered)


def random_crop_keeping_text(
    height: int,
    width: int,
    polys: list[np.ndarray],
    ignore: np.ndarray,
    rng: np.random.Generator,
    min_crop_side_ratio: float = 0.1,
    max_tries: int = 10,
) -> tuple[int, int, int, int]:
    """A random crop (x0, y0, x1, y1), inclusive, whose borders run between words, never through them,
    and which keeps at least one word that is not ignored. Falls back to the whole image."""
    full = (0, 0, width - 1, height - 1)
    polys = [np.asarray(p, dtype=np.float64) for p in polys]
    cared = [p for p, ign in zip(polys, np.asarray(ignore, dtype=bool)) if not ign]
    if not cared:
        return full
    free_x = _free_coordinates(polys, width, 0)
    free_y = _free_coordinates(polys, height, 1)
    if len(free_x) < 2 or len(free_y) < 2:
        return full
    for _ in range(max_tries):
        x0, x1 = np.sort(rng.choice(free_x, size=2, replace=False))
        y0, y1 = np.sort(rng.choice(free_y, size=2, replace=False))
        if x1 - x0 < min_crop_side_ratio * width or y1 - y0 < min_crop_side_ratio * height:
            continue
        if any(_inside_box(p, x0, y0, x1, y1) for p in cared):
            return int(x0), int(y0), int(x1), int(y1)
    return full


def _inside_box(poly: np.ndarray, x0: float, y0: float, x1: float, y1: float) -> bool:
    return bool(
        (poly[:, 0] >= x0).all() and (poly[:, 0] <= x1).all() and (poly[:, 1] >= y0).all() and (poly[:, 1] <= y1).all()
    )


def make_train_sample(
    image_bgr: np.ndarray,
    polys: list[np.ndarray],
    ignore: np.ndarray,
    config: DBTransformConfig,
    rng: np.random.Generator,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(image CHW float32, shrink_map, shrink_mask, threshold_map, threshold_mask), each map [S, S].

    A random crop that keeps text (when ``config.random_crop``) is scaled to fit an S x S canvas, keeping
    its aspect ratio; the rest of the canvas is black.
    """
    height, width = image_bgr.shape[:2]
    # labels often stray a pixel or two past the border; clipped, such words are still inside every crop
    polys = clip_polygons(polys, height, width)
    ignore = np.asarray(ignore, dtype=bool)
    if config.random_crop:
        x0, y0, x1, y1 = random_crop_keeping_text(
            height, width, polys, ignore, rng, config.min_crop_side_ratio, config.crop_max_tries
        )
    else:
        x0, y0, x1, y1 = 0, 0, width - 1, height - 1
    crop = image_bgr[y0 : y1 + 1, x0 : x1 + 1]
    kept = [(p - (x0, y0), ign) for p, ign in zip(polys, ignore) if _inside_box(p, x0, y0, x1, y1)]

    size = config.train_size
    crop_h, crop_w = crop.shape[:2]
    scale = min(size / crop_w, size / crop_h)
    new_w, new_h = max(1, min(size, round(crop_w * scale))), max(1, min(size, round(crop_h * scale)))
    canvas = np.zeros((size, size, 3), dtype=np.uint8)
    canvas[:new_h, :new_w] = cv2.resize(crop, (new_w, new_h), interpolation=cv2.INTER_LINEAR)
    scaled = [p * (new_w / crop_w, new_h / crop_h) for p, _ in kept]
    kept_ignore = np.array([ign for _, ign in kept], dtype=bool)

    shrink_map, shrink_mask = make_shrink_map(
        scaled, kept_ignore, size, size, config.shrink_ratio, config.min_text_size
    )
    threshold_map, threshold_mask = make_threshold_map(
        scaled, kept_ignore, size, size, config.shrink_ratio, config.thresh_min, config.thresh_max
    )
    return normalize_to_chw(canvas), shrink_map, shrink_mask, threshold_map, threshold_mask


def eval_resize_shape(height: int, width: int, limit_side_len: int = 960, limit_type: str = "max") -> tuple[int, int]:
    """(new_h, new_w), both multiples of 32 and at least 32.

    ``limit_type="max"`` shrinks images whose longer side exceeds the limit; ``"min"`` enlarges images whose
    shorter side is below it. Other images are only rounded to multiples of 32.
    """
    if limit_type == "max":
        ratio = limit_side_len / max(height, width) if max(height, width) > limit_side_len else 1.0
    elif limit_type == "min":
        ratio = limit_side_len / min(height, width) if min(height, width) < limit_side_len else 1.0
    else:
        raise ValueError(f"limit_type must be 'max' or 'min', not {limit_type!r}")
    new_h = max(32, int(round(height * ratio / 32)) * 32)
    new_w = max(32, int(round(width * ratio / 32)) * 32)
    return new_h, new_w


def make_eval_input(
    image_bgr: np.ndarray, limit_side_len: int = 960, limit_type: str = "max"
) -> tuple[np.ndarray, np.ndarray]:
    """(image CHW float32, shape_info), shape_info = float64 [src_h, src_w, ratio_h, ratio_w].

    ``x_original = x_resized / ratio_w``: the metric uses it to map boxes back to the labelled image.
    """
    height, width = image_bgr.shape[:2]
    new_h, new_w = eval_resize_shape(height, width, limit_side_len, limit_type)
    resized = cv2.resize(image_bgr, (new_w, new_h), interpolation=cv2.INTER_LINEAR)
    shape_info = np.array([height, width, new_h / height, new_w / width], dtype=np.float64)
    return normalize_to_chw(resized), shape_info


def resized_extent(shape_info: np.ndarray) -> tuple[int, int]:
    """(h, w) of the resized image inside a (possibly padded) batch, from its shape_info."""
    src_h, src_w, ratio_h, ratio_w = (float(v) for v in shape_info)
    return int(round(src_h * ratio_h)), int(round(src_w * ratio_w))


def collate_det_eval(samples: Sequence[tuple]) -> tuple:
    """Batch evaluation samples: images padded (bottom/right, zeros) to a common size and stacked as float32;
    shape_info, polygons and ignore flags kept as lists."""
    images = [s[0] for s in samples]
    height = max(im.shape[1] for im in images)
    width = max(im.shape[2] for im in images)
    batch = np.zeros((len(images), images[0].shape[0], height, width), dtype=np.float32)
    for k, im in enumerate(images):
        batch[k, :, : im.shape[1], : im.shape[2]] = im
    rest = tuple([s[i] for s in samples] for i in range(1, len(samples[0])))
    return (batch, *rest)
