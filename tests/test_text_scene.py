"""`text_scene`: deterministic realistic scenes whose labels match the ink drawn, held-out validation style."""

import types

import cv2
import jsonschema
import numpy as np
import pytest
from PIL import ImageFont

from slimrecipe.datasets import text_scene
from slimrecipe.datasets.text_det import load_image_bgr, read_paddleocr_det_labels
from slimrecipe.errors import RecipeError
from slimrecipe.registry import REGISTRIES

SMALL = {"size_range": (160, 288), "lines_per_image": (3, 7)}
TINY_PARAMS = {"num_train": 2, "num_val": 2, "size_range": [160, 256], "lines_per_image": [3, 6],
               "train_size": 96, "eval_limit_side_len": 256}


def context(tmp_path, seed=0):
    return types.SimpleNamespace(cache_dir=tmp_path / "cache", seed=seed)


def generate(out_dir, seed, style="train", count=2, **kwargs):
    label_file = text_scene.generate_text_scenes(out_dir, count=count, seed=seed, style=style, **{**SMALL, **kwargs})
    return label_file, read_paddleocr_det_labels(label_file, out_dir)


def test_same_seed_gives_identical_files_and_another_seed_does_not(tmp_path):
    label_a, records_a = generate(tmp_path / "a", seed=3)
    label_b, records_b = generate(tmp_path / "b", seed=3)
    label_c, records_c = generate(tmp_path / "c", seed=4)
    assert label_a.read_bytes() == label_b.read_bytes()
    for first, again in zip(records_a, records_b):
        assert np.array_equal(load_image_bgr(first.image_path), load_image_bgr(again.image_path))
    assert label_a.read_bytes() != label_c.read_bytes()
    assert not np.array_equal(load_image_bgr(records_a[0].image_path), load_image_bgr(records_c[0].image_path))


def test_generated_files_parse_with_the_paddleocr_reader_and_sizes_stay_in_range(tmp_path):
    label_file, records = generate(tmp_path, seed=0, style="val", count=3, image_format="png")
    assert [r.image_path.name for r in records] == ["00000.png", "00001.png", "00002.png"]
    for record in records:
        height, width = load_image_bgr(record.image_path).shape[:2]
        assert 160 <= height <= 288 and 160 <= width <= 288
        assert record.polys and all(p.shape == (4, 2) for p in record.polys)
        for poly in record.polys:
            assert poly[:, 0].min() >= 0 and poly[:, 0].max() <= width - 1
            assert poly[:, 1].min() >= 0 and poly[:, 1].max() <= height - 1
        assert all(text.strip() for text in record.texts)


def ink_coverage(scene):
    """(share of ink pixels inside the union of label polygons, [(ink share, tightness) per legible line])."""
    height, width = scene.ink.shape
    union = np.zeros((height, width), np.uint8)
    per_line = []
    for text, poly in zip(scene.texts, scene.polys):
        mask = np.zeros_like(union)
        cv2.fillPoly(mask, [np.round(poly).astype(np.int32)], 1)
        union |= mask
        if text == text_scene.IGNORE_TEXT:
            continue
        inside = scene.ink & (mask > 0)
        ys, xs = np.nonzero(inside)
        if len(xs) < 3:
            per_line.append((0.0, np.inf))
            continue
        (_, (w, h), _) = cv2.minAreaRect(np.stack([xs, ys], axis=1).astype(np.float32))
        poly_area = cv2.contourArea(poly.astype(np.float32))
        per_line.append((inside.sum() / max(mask.sum(), 1), poly_area / max((w + 1) * (h + 1), 1.0)))
    covered = (scene.ink & (union > 0)).sum() / max(scene.ink.sum(), 1)
    return covered, per_line


@pytest.mark.parametrize("style", ["train", "val"])
def test_labels_enclose_the_ink_drawn_and_every_legible_label_holds_ink(style):
    resources = text_scene.scene_resources(style)
    seen_ignored = 0
    for index in range(4):
        rng = np.random.default_rng([11, index])
        scene = text_scene.render_text_scene(rng, style, resources, (200, 320), (6, 10), illegible_fraction=0.3)
        assert scene.ink.shape == scene.image.shape[:2] and scene.ink.any()
        covered, per_line = ink_coverage(scene)
        assert covered >= 0.98, f"only {covered:.3f} of the ink lies inside labels (scene {index})"
        for ink_share, looseness in per_line:
            assert ink_share >= 0.1  # the label holds text, not empty background
            assert looseness <= 2.0  # and is not much larger than that text
        seen_ignored += scene.texts.count(text_scene.IGNORE_TEXT)
        if index == 0:
            # the check can fail: the same labels moved by a few pixels no longer enclose the ink
            moved = text_scene.Scene(scene.image, scene.texts, [p + [0, 8] for p in scene.polys], scene.ink)
            assert ink_coverage(moved)[0] < 0.9
    assert seen_ignored > 0, "no '###' region drawn at illegible_fraction=0.3"


def test_train_and_val_use_disjoint_typefaces_and_backgrounds(monkeypatch, tmp_path):
    for resources in ("declared", "installed"):
        train, val = (text_scene.scene_resources(s, resources) for s in ("train", "val"))
        assert train.fonts and val.fonts and train.backgrounds and val.backgrounds
        families = [{ImageFont.truetype(str(f.path), 12).getname()[0] for f in r.fonts} for r in (train, val)]
        assert not families[0] & families[1]
        assert not {b.path.name for b in train.backgrounds} & {b.path.name for b in val.backgrounds}
    assert not set(text_scene.TEXTURES["train"]) & set(text_scene.TEXTURES["val"])

    # and the validation style draws only with the validation resources
    used = set()
    font, background = text_scene.SceneResources.font, text_scene.SceneResources.background
    monkeypatch.setattr(text_scene.SceneResources, "font",
                        lambda self, spec, size: used.add(spec.path.name) or font(self, spec, size))
    monkeypatch.setattr(text_scene.SceneResources, "background",
                        lambda self, spec: used.add(spec.path.name) or background(self, spec))
    generate(tmp_path, seed=0, style="val", count=3)
    val_names = {f.path.name for f in val.fonts} | {b.path.name for b in val.backgrounds}
    assert used and used <= val_names


def test_plugin_bundle_feeds_db_training_and_evaluation_and_is_generated_once(tmp_path, monkeypatch):
    jsonschema.validate(TINY_PARAMS, text_scene.TEXT_SCENE_SCHEMA)
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate({**TINY_PARAMS, "font": "Arial"}, text_scene.TEXT_SCENE_SCHEMA)
    assert REGISTRIES["dataset"].get("text_scene").obj is text_scene.text_scene

    ctx = context(tmp_path)
    bundle = text_scene.text_scene(dict(TINY_PARAMS), ctx)
    assert bundle.input_shape == [3, 96, 96]
    assert len(bundle.train) == 2 and len(bundle.val) == 2
    image, shrink_map, shrink_mask, threshold_map, threshold_mask = bundle.train[0]
    assert image.shape == (3, 96, 96) and image.dtype == np.float32
    for target in (shrink_map, shrink_mask, threshold_map, threshold_mask):
        assert target.shape == (96, 96) and target.dtype == np.float32
    image, shape_info, polys, ignore = bundle.val[0]
    assert image.shape[0] == 3 and image.shape[1] % 32 == 0 and image.shape[2] % 32 == 0
    assert 160 <= shape_info[0] <= 256 and 160 <= shape_info[1] <= 256
    assert len(polys) == len(ignore) > 0
    images, _, batch_polys, _ = bundle.collate_fn([bundle.val[0], bundle.val[1]])
    assert images.shape[0] == 2 and len(batch_polys) == 2
    train_res, val_res = (set(bundle.manifest["resources"][s]) for s in ("train", "val"))
    assert train_res and val_res and not train_res & val_res

    monkeypatch.setattr(text_scene, "render_text_scene", lambda *a, **k: pytest.fail("cache not reused"))
    again = text_scene.text_scene(dict(TINY_PARAMS), ctx)
    assert again.manifest["generation_key"] == bundle.manifest["generation_key"]
    assert again.manifest["images_sha256"] == bundle.manifest["images_sha256"]


def test_inverted_range_is_a_recipe_error_naming_the_key(tmp_path):
    with pytest.raises(RecipeError) as err:
        text_scene.text_scene({**TINY_PARAMS, "size_range": [300, 200]}, context(tmp_path))
    assert err.value.problems[0].path == "dataset.params.size_range"
