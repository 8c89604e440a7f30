"""The det_hmean metric: DB post-processing and PaddleOCR-style precision / recall / hmean."""

import jsonschema
import numpy as np
import pytest

from slimrecipe.datasets.db_transforms import make_shrink_map
from slimrecipe.metrics.det import (
    DetCounts,
    boxes_from_prob_map,
    hmean_from_counts,
    match_detections,
)
from slimrecipe.registry import REGISTRIES


def box(x0, y0, x1, y1):
    return np.array([[x0, y0], [x1, y0], [x1, y1], [x0, y1]], dtype=np.float64)


def iou(a, b):
    from shapely.geometry import Polygon

    pa, pb = Polygon(a), Polygon(b)
    return pa.intersection(pb).area / pa.union(pb).area


def scores(counts):
    result = hmean_from_counts(counts)
    return result["precision"], result["recall"], result["hmean"]


def test_perfect_detections_score_one():
    gts = [box(10, 10, 60, 30), box(10, 50, 90, 80)]
    assert scores(match_detections(gts, [False, False], [g + 1 for g in gts])) == (1.0, 1.0, 1.0)


def test_one_right_one_wrong_is_half_precision_half_recall():
    gts = [box(10, 10, 60, 30), box(10, 50, 90, 80)]
    dets = [box(11, 11, 61, 31), box(100, 100, 150, 120)]
    assert scores(match_detections(gts, [False, False], dets)) == (0.5, 0.5, 0.5)


def test_low_iou_is_not_a_match_and_one_gt_matches_one_detection_only():
    gt = [box(0, 0, 100, 20)]
    assert match_detections(gt, [False], [box(0, 0, 45, 20)]).matched == 0  # IoU 0.45
    counts = match_detections(gt, [False], [box(0, 0, 100, 20), box(1, 0, 100, 20)])
    assert (counts.matched, counts.det_care) == (1, 2)  # the duplicate is a false positive


def test_detection_on_an_ignored_region_is_not_a_false_positive():
    gts = [box(10, 10, 60, 30), box(10, 50, 90, 80)]
    dets = [box(10, 10, 60, 30), box(12, 52, 88, 78)]  # second one lies on the "###" region
    counts = match_detections(gts, [False, True], dets)
    assert counts == DetCounts(matched=1, gt_care=1, det_care=1)
    assert scores(counts) == (1.0, 1.0, 1.0)


def test_no_detections_scores_zero_and_nothing_at_all_scores_zero():
    assert scores(match_detections([box(0, 0, 50, 20)], [False], [])) == (0.0, 0.0, 0.0)
    assert scores(match_detections([], [], [])) == (0.0, 0.0, 0.0)


def test_counts_are_summed_over_images_not_averaged():
    one_of_one = match_detections([box(0, 0, 50, 20)], [False], [box(0, 0, 50, 20)])
    none_of_three = match_detections([box(0, 0, 50, 20), box(0, 40, 50, 60), box(0, 80, 50, 99)], [False] * 3, [])
    precision, recall, _ = scores(one_of_one + none_of_three)
    assert (precision, recall) == (1.0, 0.25)


def test_post_processing_recovers_the_text_box_from_its_shrink_map():
    gts = [box(20, 20, 120, 60), box(30, 80, 100, 100)]
    shrink_map, _ = make_shrink_map(gts, [False, False], 128, 160)
    dets, det_scores = boxes_from_prob_map(shrink_map)
    assert len(dets) == 2 and det_scores == [1.0, 1.0]
    # the shrunk region loses about a pixel per side to rasterisation: thin words come back a little small
    assert max(iou(gts[0], d) for d in dets) > 0.8
    assert max(iou(gts[1], d) for d in dets) > 0.6
    assert scores(match_detections(gts, [False, False], dets)) == (1.0, 1.0, 1.0)


def test_post_processing_maps_boxes_to_the_original_image_scale():
    prob = np.zeros((64, 64), np.float32)
    prob[20:30, 10:50] = 0.9
    (det,), _ = boxes_from_prob_map(prob, dest_height=128, dest_width=256, unclip_ratio=0.0)
    assert det[:, 0].min() == pytest.approx(40, abs=4) and det[:, 0].max() == pytest.approx(196, abs=4)
    assert det[:, 1].min() == pytest.approx(40, abs=2) and det[:, 1].max() == pytest.approx(58, abs=2)


def test_weak_or_tiny_regions_are_dropped():
    prob = np.zeros((64, 64), np.float32)
    prob[10:20, 5:60] = 0.5  # above thresh 0.3 but its mean score is under box_thresh 0.6
    prob[40:42, 10:12] = 1.0  # 2 px: smaller than min_size
    assert boxes_from_prob_map(prob)[0] == []
    assert len(boxes_from_prob_map(prob, box_thresh=0.4)[0]) == 1


def test_poly_box_type_also_finds_text():
    shrink_map, _ = make_shrink_map([box(20, 20, 120, 60)], [False], 100, 160)
    (det,), _ = boxes_from_prob_map(shrink_map, box_type="poly")
    assert iou(box(20, 20, 120, 60), det) > 0.8


def test_registered_metric_evaluates_a_paddle_model_independently_of_batch_size():
    import slimrecipe.metrics.det  # noqa: F401  -- registers det_hmean
    from slimrecipe.paddle_env import paddle

    plugin = REGISTRIES["metric"].get("det_hmean")
    jsonschema.Draft202012Validator.check_schema(plugin.schema)
    jsonschema.validate({"thresh": 0.3, "box_thresh": 0.6}, plugin.schema)
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate({"batch_size": 4}, plugin.schema)
    metric = plugin.obj({})

    nn = paddle().nn

    class TextWhereChannelZeroIsBright(nn.Layer):
        """Predicts probability 1 where the first input channel is > 0.5: a stand-in for a trained DB."""

        def forward(self, x):
            return (x[:, :1] > 0.5).astype("float32")

    def sample(src_hw, ratio, gt_boxes, ignore):
        height, width = round(src_hw[0] * ratio), round(src_hw[1] * ratio)
        text, _ = make_shrink_map([g * ratio for g in gt_boxes], [False] * len(gt_boxes), height, width)
        image = np.repeat(text[None], 3, axis=0).astype(np.float32)
        return image, np.array([src_hw[0], src_hw[1], ratio, ratio]), gt_boxes, np.array(ignore)

    dataset = [
        sample((96, 128), 1.0, [box(10, 10, 110, 40), box(10, 60, 80, 85)], [False, False]),
        sample((128, 128), 0.5, [box(10, 10, 120, 50), box(10, 70, 120, 110)], [False, True]),  # padded in a batch
        sample((64, 96), 1.0, [box(5, 5, 90, 30)], [False]),
    ]
    dataset.append((dataset[2][0], dataset[2][1], [box(5, 5, 90, 30), box(5, 40, 90, 60)], np.array([False, False])))

    model = TextWhereChannelZeroIsBright()
    model.eval()
    by_batch = {bs: metric.evaluate(model, dataset, bs, None) for bs in (1, 2, 4)}
    # 6 counted ground truths, 5 found; no false positives (the "###" one is detected but not counted)
    assert by_batch[1] == pytest.approx(2 * 1.0 * (5 / 6) / (1 + 5 / 6))
    assert by_batch[1] == by_batch[2] == by_batch[4]
    assert metric.extra["last"]["precision"] == 1.0 and metric.extra["last"]["recall"] == pytest.approx(5 / 6)
