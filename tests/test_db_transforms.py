"""DB training targets and image transforms, checked against hand-computed cases."""

import cv2
import numpy as np
import pytest

from slimrecipe.datasets.db_transforms import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    DBTransformConfig,
    collate_det_eval,
    make_eval_input,
    make_shrink_map,
    make_threshold_map,
    make_train_sample,
    random_crop_keeping_text,
    resized_extent,
    shrink_offset,
)

# an axis-aligned 100 x 40 rectangle: D = 4000 * (1 - 0.4^2) / 280 = 12.0
RECT = np.array([[20, 20], [120, 20], [120, 60], [20, 60]], dtype=np.float64)
HEIGHT, WIDTH = 100, 160


def test_shrink_offset_of_100x40_rectangle_is_12():
    assert shrink_offset(RECT, 0.4) == pytest.approx(12.0)


def test_shrink_map_is_the_rectangle_moved_in_by_12_pixels_on_every_side():
    shrink_map, shrink_mask = make_shrink_map([RECT], [False], HEIGHT, WIDTH)
    ys, xs = np.nonzero(shrink_map)
    assert (xs.min(), xs.max(), ys.min(), ys.max()) == (32, 108, 32, 48)
    assert shrink_map[32:49, 32:109].all()
    assert shrink_mask.all()  # nothing to ignore


def test_threshold_map_is_max_on_the_border_and_min_at_distance_d():
    threshold_map, threshold_mask = make_threshold_map([RECT], [False], HEIGHT, WIDTH)
    column = 70
    assert threshold_map[20, column] == pytest.approx(0.7)  # on the top edge
    assert threshold_map[26, column] == pytest.approx(0.5)  # D/2 inside
    assert threshold_map[14, column] == pytest.approx(0.5)  # D/2 outside
    assert threshold_map[32, column] == pytest.approx(0.3)  # D inside
    assert threshold_map[40, column] == pytest.approx(0.3)  # deeper inside: still the minimum
    assert threshold_map[90, column] == pytest.approx(0.3)  # far away
    # the mask is the rectangle dilated by D = 12
    assert threshold_mask[8, column] == 1 and threshold_mask[7, column] == 0
    assert threshold_mask[40, 8] == 1 and threshold_mask[40, 7] == 0
    assert threshold_mask[72, column] == 1 and threshold_mask[73, column] == 0


def test_ignored_and_too_thin_text_is_masked_out_not_taught_as_background():
    thin = np.array([[20, 80], [120, 80], [120, 85], [20, 85]], dtype=np.float64)  # 5 px high
    shrink_map, shrink_mask = make_shrink_map([RECT, thin], [True, False], HEIGHT, WIDTH, min_text_size=8)
    assert not shrink_map.any()
    assert (shrink_mask[20:61, 20:121] == 0).all()
    assert (shrink_mask[80:86, 20:121] == 0).all()
    assert shrink_mask[0:15].all()  # background is still learned

    threshold_map, threshold_mask = make_threshold_map([RECT], [True], HEIGHT, WIDTH)
    assert not threshold_mask.any()
    assert np.allclose(threshold_map, 0.3)


def test_train_sample_has_the_training_size_and_keeps_text():
    rng = np.random.default_rng(0)
    image = rng.integers(0, 255, size=(120, 200, 3), dtype=np.uint8)
    # the second word pokes past the bottom edge, as real labels sometimes do
    polys = [RECT, RECT + (0, 62), np.array([[150, 10], [190, 10], [190, 30], [150, 30]], float)]
    config = DBTransformConfig(train_size=64)
    for seed in range(5):
        sample = make_train_sample(image, polys, [False, False, True], config, np.random.default_rng(seed))
        img, shrink_map, shrink_mask, threshold_map, threshold_mask = sample
        assert img.shape == (3, 64, 64) and img.dtype == np.float32
        assert all(m.shape == (64, 64) and m.dtype == np.float32 for m in sample[1:])
        assert shrink_map.sum() > 0, "the crop must keep at least one word"
    again = make_train_sample(image, polys, [False, False, True], config, np.random.default_rng(4))
    assert all(np.array_equal(a, b) for a, b in zip(sample, again))

    whole = make_train_sample(image, polys, [False, False, True], DBTransformConfig(train_size=64, random_crop=False),
                              np.random.default_rng(0))
    words, _ = cv2.connectedComponents(whole[1].astype(np.uint8))
    assert words - 1 == 2, "both words that count are taught, including the one past the border"


def test_random_crop_cuts_between_words_never_through_them():
    polys = [RECT, RECT + (0, 30), np.array([[130, 5], [150, 5], [150, 95], [130, 95]], float)]
    ignore = np.array([False, False, True])
    crops = set()
    for seed in range(40):
        x0, y0, x1, y1 = random_crop_keeping_text(100, 160, polys, ignore, np.random.default_rng(seed))
        crops.add((x0, y0, x1, y1))
        inside = [(p[:, 0] >= x0).all() and (p[:, 0] <= x1).all() and (p[:, 1] >= y0).all() and (p[:, 1] <= y1).all()
                  for p in polys]
        overlaps = [p[:, 0].max() >= x0 and p[:, 0].min() <= x1 and p[:, 1].max() >= y0 and p[:, 1].min() <= y1
                    for p in polys]
        assert inside == overlaps, "a word is either wholly in the crop or wholly out of it"
        assert inside[0] or inside[1], "a crop keeps at least one word that counts"
    assert len(crops) > 5, "crops are random"


def test_eval_input_is_a_multiple_of_32_and_ratios_map_back_to_the_original():
    image = np.zeros((300, 500, 3), dtype=np.uint8)
    tensor, shape_info = make_eval_input(image, limit_side_len=320, limit_type="max")
    assert tensor.shape == (3, 192, 320)
    src_h, src_w, ratio_h, ratio_w = shape_info
    assert (src_h, src_w) == (300, 500)
    assert resized_extent(shape_info) == (192, 320)
    assert 320 / ratio_w == pytest.approx(500)

    small, info = make_eval_input(np.zeros((50, 70, 3), np.uint8), limit_side_len=960)
    assert small.shape == (3, 64, 64) and resized_extent(info) == (64, 64)


def test_normalisation_is_imagenet_statistics_on_bgr_scaled_to_unit():
    image = np.zeros((32, 32, 3), dtype=np.uint8)
    image[..., 0] = 255  # blue channel first, as OpenCV decodes
    tensor, _ = make_eval_input(image)
    assert tensor[0, 0, 0] == pytest.approx((1 - IMAGENET_MEAN[0]) / IMAGENET_STD[0], rel=1e-5)
    assert tensor[2, 0, 0] == pytest.approx(-IMAGENET_MEAN[2] / IMAGENET_STD[2], rel=1e-5)


def test_collate_pads_images_of_different_sizes_and_keeps_the_rest_as_lists():
    samples = [
        (np.ones((3, 32, 64), np.float32), np.array([32, 64, 1, 1.0]), [RECT], np.array([False])),
        (np.ones((3, 64, 32), np.float32), np.array([64, 32, 1, 1.0]), [], np.array([], bool)),
    ]
    images, infos, polys, ignores = collate_det_eval(samples)
    assert images.shape == (2, 3, 64, 64) and images.dtype == np.float32
    assert images[0, :, 32:].sum() == 0 and images[1, :, :, 32:].sum() == 0
    assert len(infos) == len(polys) == len(ignores) == 2 and polys[1] == []
