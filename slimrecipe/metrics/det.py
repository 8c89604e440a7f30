"""Text-detection metric `det_hmean`: DB post-processing plus PaddleOCR-style precision / recall / hmean.

Post-processing turns a probability map into boxes: binarize, find contours, fit a box (or polygon) per
contour, score it by the mean probability inside, drop weak or tiny ones, grow the survivors back by the
unclip ratio (the model was trained to predict *shrunk* text), and map them to the original image scale.

Matching follows the IoU evaluation PaddleOCR's DetMetric uses: ground truths and detections are paired
greedily, one to one, when their polygon IoU is above the threshold; a detection lying mostly (> 50 % of its
own area) on an ignored ("###") ground truth is dropped, and ignored ground truths are not counted. Counts are
summed over the whole split before precision, recall and hmean are computed, so the result does not depend
on the batch size.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import cv2
import numpy as np
from shapely.geometry import Polygon

from ..datasets.db_transforms import (
    collate_det_eval,
    offset_polygon,
    polygon_area,
    polygon_perimeter,
    resized_extent,
)
from ..paddle_env import paddle
from ..registry import register
from . import Metric

DEFAULTS = {
    "thresh": 0.3,
    "box_thresh": 0.6,
    "unclip_ratio": 1.5,
    "max_candidates": 1000,
    "min_size": 3.0,
    "box_type": "quad",
    "iou_threshold": 0.5,
    "ignore_overlap": 0.5,
}


# ------------------------------------------------------------------------------------- post-processing


def _ordered_box(points: np.ndarray) -> np.ndarray:
    """Four corners ordered top-left, top-right, bottom-right, bottom-left."""
    by_x = points[np.argsort(points[:, 0], kind="stable")]
    left, right = by_x[:2], by_x[2:]
    top_left, bottom_left = left[np.argsort(left[:, 1], kind="stable")]
    top_right, bottom_right = right[np.argsort(right[:, 1], kind="stable")]
    return np.array([top_left, top_right, bottom_right, bottom_left], dtype=np.float64)


def min_area_box(points: np.ndarray) -> tuple[np.ndarray, float]:
    """(ordered 4-point minimum-area box, its shorter side)."""
    rect = cv2.minAreaRect(np.asarray(points, dtype=np.float32).reshape(-1, 2))
    return _ordered_box(cv2.boxPoints(rect).astype(np.float64)), float(min(rect[1]))


def mean_score_inside(prob: np.ndarray, poly: np.ndarray) -> float:
    """Mean probability over the pixels a polygon covers (in the polygon's bounding box only, for speed)."""
    height, width = prob.shape
    x0 = int(np.clip(np.floor(poly[:, 0].min()), 0, width - 1))
    x1 = int(np.clip(np.ceil(poly[:, 0].max()), 0, width - 1))
    y0 = int(np.clip(np.floor(poly[:, 1].min()), 0, height - 1))
    y1 = int(np.clip(np.ceil(poly[:, 1].max()), 0, height - 1))
    mask = np.zeros((y1 - y0 + 1, x1 - x0 + 1), dtype=np.uint8)
    cv2.fillPoly(mask, [np.round(poly - (x0, y0)).astype(np.int32)], 1)
    if not mask.any():
        return 0.0
    return float(prob[y0 : y1 + 1, x0 : x1 + 1][mask.astype(bool)].mean())


def unclip(poly: np.ndarray, unclip_ratio: float) -> list[np.ndarray]:
    """Grow a predicted (shrunk) region by D = A * ratio / L, the inverse of the training-time shrink."""
    perimeter = polygon_perimeter(poly)
    if perimeter <= 0:
        return []
    return offset_polygon(poly, polygon_area(poly) * unclip_ratio / perimeter)


def boxes_from_prob_map(
    prob: np.ndarray,
    dest_height: int | None = None,
    dest_width: int | None = None,
    thresh: float = 0.3,
    box_thresh: float = 0.6,
    unclip_ratio: float = 1.5,
    max_candidates: int = 1000,
    min_size: float = 3.0,
    box_type: str = "quad",
) -> tuple[list[np.ndarray], list[float]]:
    """(polygons in destination pixel coordinates, their scores) from one [H, W] probability map.

    ``dest_height`` / ``dest_width`` are the size of the original image the map was computed from
    (default: the map's own size); boxes are scaled to it and clipped to its bounds.
    """
    prob = np.asarray(prob, dtype=np.float32)
    if prob.ndim == 3:
        prob = prob[0]
    height, width = prob.shape
    dest_height = height if dest_height is None else dest_height
    dest_width = width if dest_width is None else dest_width
    bitmap = (prob > thresh).astype(np.uint8) * 255
    contours, _ = cv2.findContours(bitmap, cv2.RETR_LIST, cv2.CHAIN_APPROX_SIMPLE)
    scale = np.array([dest_width / width, dest_height / height])
    polys, scores = [], []
    for contour in contours[:max_candidates]:
        candidate = _candidate_from_contour(contour.reshape(-1, 2).astype(np.float64), box_type, min_size)
        if candidate is None:
            continue
        score = mean_score_inside(prob, candidate)
        if score < box_thresh:
            continue
        grown = unclip(candidate, unclip_ratio)
        if len(grown) != 1:
            continue
        if box_type == "quad":
            final, short_side = min_area_box(grown[0])
            if short_side < min_size + 2:
                continue
        else:
            final = grown[0]
            if min_area_box(final)[1] < min_size + 2:
                continue
        final = final * scale
        final[:, 0] = np.clip(np.round(final[:, 0]), 0, dest_width)
        final[:, 1] = np.clip(np.round(final[:, 1]), 0, dest_height)
        polys.append(final)
        scores.append(score)
    return polys, scores


def _candidate_from_contour(points: np.ndarray, box_type: str, min_size: float) -> np.ndarray | None:
    if box_type == "quad":
        if len(points) < 2:
            return None
        box, short_side = min_area_box(points)
        return box if short_side >= min_size else None
    if box_type == "poly":
        epsilon = 0.002 * cv2.arcLength(points.astype(np.float32).reshape(-1, 1, 2), True)
        approx = cv2.approxPolyDP(points.astype(np.float32).reshape(-1, 1, 2), epsilon, True).reshape(-1, 2)
        if len(approx) < 4 or min_area_box(approx)[1] < min_size:
            return None
        return approx.astype(np.float64)
    raise ValueError(f"box_type must be 'quad' or 'poly', not {box_type!r}")


# --------------------------------------------------------------------------------------------- matching


@dataclass
class DetCounts:
    """Counts summed over images: what precision, recall and hmean are computed from."""

    matched: int = 0
    gt_care: int = 0  # ground truths that count (not ignored, valid polygons)
    det_care: int = 0  # detections that count (not lying on an ignored region)

    def __add__(self, other: "DetCounts") -> "DetCounts":
        return DetCounts(self.matched + other.matched, self.gt_care + other.gt_care, self.det_care + other.det_care)


def _valid_polygon(points) -> Polygon | None:
    points = np.asarray(points, dtype=np.float64).reshape(-1, 2)
    if len(points) < 3:
        return None
    poly = Polygon(points)
    return poly if poly.is_valid and poly.area > 0 else None


def match_detections(
    gt_polys: Sequence[np.ndarray],
    gt_ignore: Sequence[bool],
    det_polys: Sequence[np.ndarray],
    iou_threshold: float = 0.5,
    ignore_overlap: float = 0.5,
) -> DetCounts:
    """Counts for one image: greedy one-to-one matching by IoU, as PaddleOCR's IoU evaluator does.

    A pair matches when IoU > ``iou_threshold`` and neither side is matched yet, visiting ground truths
    in order and, for each, detections in order. Invalid (self-intersecting, degenerate) polygons are
    skipped on both sides.
    """
    gts: list[Polygon] = []
    gt_is_ignored: list[bool] = []
    for points, ignored in zip(gt_polys, gt_ignore):
        poly = _valid_polygon(points)
        if poly is not None:
            gts.append(poly)
            gt_is_ignored.append(bool(ignored))
    ignored_gts = [g for g, ign in zip(gts, gt_is_ignored) if ign]

    dets: list[Polygon] = []
    det_is_ignored: list[bool] = []
    for points in det_polys:
        poly = _valid_polygon(points)
        if poly is None:
            continue
        on_ignored = any(poly.intersection(g).area / poly.area > ignore_overlap for g in ignored_gts)
        dets.append(poly)
        det_is_ignored.append(on_ignored)

    gt_taken = [False] * len(gts)
    det_taken = [False] * len(dets)
    matched = 0
    for i, gt in enumerate(gts):
        if gt_is_ignored[i]:
            continue
        for j, det in enumerate(dets):
            if gt_taken[i] or det_taken[j] or det_is_ignored[j]:
                continue
            inter = gt.intersection(det).area
            union = gt.area + det.area - inter
            if union > 0 and inter / union > iou_threshold:
                gt_taken[i] = det_taken[j] = True
                matched += 1
    return DetCounts(matched, gt_is_ignored.count(False), det_is_ignored.count(False))


def hmean_from_counts(counts: DetCounts) -> dict[str, float]:
    """{"precision", "recall", "hmean"}; each is 0 when its denominator is 0."""
    precision = counts.matched / counts.det_care if counts.det_care else 0.0
    recall = counts.matched / counts.gt_care if counts.gt_care else 0.0
    hmean = 2 * precision * recall / (precision + recall) if precision + recall > 0 else 0.0
    return {"precision": precision, "recall": recall, "hmean": hmean}


# ------------------------------------------------------------------------------------------ evaluation


def counts_for_batch(
    prob_maps: np.ndarray,
    input_hw: tuple[int, int],
    shape_infos: Sequence[np.ndarray],
    gt_polys: Sequence[Sequence[np.ndarray]],
    gt_ignores: Sequence[Sequence[bool]],
    params: dict,
) -> DetCounts:
    """Post-process a batch of probability maps [N, (1,) h, w] and match them against the ground truth.

    ``input_hw`` is the (padded) batch input's size: maps that are smaller than the input (a model that
    predicts at a lower resolution) are handled by scaling each image's valid extent to the map.
    """
    params = {**DEFAULTS, **params}
    prob_maps = np.asarray(prob_maps)
    if prob_maps.ndim == 4:
        prob_maps = prob_maps[:, 0]
    total = DetCounts()
    for prob, shape_info, polys, ignore in zip(prob_maps, shape_infos, gt_polys, gt_ignores):
        resized_h, resized_w = resized_extent(shape_info)
        valid_h = max(1, round(resized_h * prob.shape[0] / input_hw[0]))
        valid_w = max(1, round(resized_w * prob.shape[1] / input_hw[1]))
        det_polys, _ = boxes_from_prob_map(
            prob[:valid_h, :valid_w],
            int(shape_info[0]),
            int(shape_info[1]),
            thresh=params["thresh"],
            box_thresh=params["box_thresh"],
            unclip_ratio=params["unclip_ratio"],
            max_candidates=params["max_candidates"],
            min_size=params["min_size"],
            box_type=params["box_type"],
        )
        total = total + match_detections(polys, ignore, det_polys, params["iou_threshold"], params["ignore_overlap"])
    return total


def _prob_map_from_output(output: Any):
    # PaddleOCR's DB head returns {"maps": ...}; ours returns the tensor itself in eval mode
    if isinstance(output, dict):
        output = output.get("maps", next(iter(output.values())))
    if isinstance(output, (list, tuple)):
        output = output[0]
    return output.numpy() if hasattr(output, "numpy") else np.asarray(output)


def evaluate_det(model, dataset, batch_size: int, collate_fn=None, params: dict | None = None,
                 report: dict | None = None) -> float:
    """hmean of ``model`` on a DB evaluation split (samples: image, shape_info, polygons, ignore flags)."""
    pd = paddle()
    params = {**DEFAULTS, **(params or {})}
    collate = collate_fn or collate_det_eval
    total = DetCounts()
    with pd.no_grad():
        for start in range(0, len(dataset), max(1, batch_size)):
            samples = [dataset[i] for i in range(start, min(start + batch_size, len(dataset)))]
            images, shape_infos, polys, ignores = collate(samples)[:4]
            images = np.asarray(images, dtype=np.float32)
            prob = _prob_map_from_output(model(pd.to_tensor(images)))
            total = total + counts_for_batch(prob, images.shape[2:], shape_infos, polys, ignores, params)
    scores = hmean_from_counts(total)
    if report is not None:
        report.clear()
        report.update(scores, matched=total.matched, gt_care=total.gt_care, det_care=total.det_care)
    return scores["hmean"]


@register(
    "metric",
    "det_hmean",
    schema={
        "type": "object",
        "additionalProperties": False,
        "properties": {
            "thresh": {"type": "number", "minimum": 0, "maximum": 1, "default": DEFAULTS["thresh"],
                       "description": "probability above which a pixel is text"},
            "box_thresh": {"type": "number", "minimum": 0, "maximum": 1, "default": DEFAULTS["box_thresh"],
                           "description": "a box whose mean probability is below this is dropped"},
            "unclip_ratio": {"type": "number", "exclusiveMinimum": 0, "maximum": 10,
                             "default": DEFAULTS["unclip_ratio"],
                             "description": "how far a predicted box is grown back: D = area * ratio / perimeter"},
            "max_candidates": {"type": "integer", "minimum": 1, "default": DEFAULTS["max_candidates"],
                               "description": "most contours examined per image"},
            "min_size": {"type": "number", "minimum": 0, "default": DEFAULTS["min_size"],
                         "description": "boxes whose short side (pixels of the model input) is smaller are dropped"},
            "box_type": {"enum": ["quad", "poly"], "default": DEFAULTS["box_type"],
                         "description": "quad: a rotated rectangle per text region; poly: a polygon (curved text)"},
            "iou_threshold": {"type": "number", "minimum": 0, "maximum": 1, "default": DEFAULTS["iou_threshold"],
                              "description": "a detection matches a ground truth when their IoU is above this"},
            "ignore_overlap": {"type": "number", "minimum": 0, "maximum": 1, "default": DEFAULTS["ignore_overlap"],
                               "description": "a detection with more than this fraction of its area on an ignored "
                                              "('###') region is not counted"},
        },
    },
)
def det_hmean(params: dict) -> Metric:
    """Text-detection hmean (F1 of precision and recall at IoU 0.5) after DB post-processing."""
    params = {**DEFAULTS, **params}
    last_report: dict = {}

    def evaluate(model, dataset, batch_size, collate_fn=None):
        return evaluate_det(model, dataset, batch_size, collate_fn, params, last_report)

    # extra["last"] holds precision / recall / counts of the most recent evaluation, for reports
    return Metric(name="hmean", evaluate=evaluate, higher_is_better=True, extra={"params": params, "last": last_report})
