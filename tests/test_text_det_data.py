"""Text-detection datasets: the PaddleOCR label reader and the cached synthetic_text generator."""

import json
import types
from itertools import combinations

import cv2
import jsonschema
import numpy as np
import pytest
from shapely.geometry import Polygon

from slimrecipe.datasets import text_det
from slimrecipe.datasets.db_transforms import make_shrink_map
from slimrecipe.errors import RecipeError
from slimrecipe.fileio import sha256_file
from slimrecipe.metrics.det import boxes_from_prob_map, hmean_from_counts, match_detections
from slimrecipe.registry import REGISTRIES

TINY = {"num_train": 3, "num_val": 4, "image_size": 128, "font_size": [16, 28], "train_size": 96}


def context(tmp_path, seed=0):
    return types.SimpleNamespace(cache_dir=tmp_path / "cache", seed=seed)


def write_png(path, height, width):
    path.parent.mkdir(parents=True, exist_ok=True)
    image = np.full((height, width, 3), 220, np.uint8)
    cv2.putText(image, "Text", (10, height // 2), cv2.FONT_HERSHEY_SIMPLEX, 1.0, (0, 0, 0), 2)
    path.write_bytes(cv2.imencode(".png", image)[1].tobytes())


@pytest.fixture
def paddleocr_tree(tmp_path):
    """data/imgs/*.png plus a label file with unicode text and an ignored region."""
    data_dir = tmp_path / "data"
    write_png(data_dir / "imgs" / "a.png", 120, 200)
    write_png(data_dir / "imgs" / "b.png", 90, 150)
    annotations_a = [
        {"transcription": "Straße 東京", "points": [[10, 20], [150, 20], [150, 60], [10, 60]]},
        {"transcription": "###", "points": [[20, 80], [100, 80], [100, 110], [20, 110]]},
    ]
    annotations_b = [{"transcription": "x", "points": [[5, 5], [120, 10], [118, 50], [4, 45], [2, 20]]}]
    label_file = tmp_path / "det_label.txt"
    label_file.write_text(
        f"imgs/a.png\t{json.dumps(annotations_a, ensure_ascii=False)}\n"
        f"imgs/b.png\t{json.dumps(annotations_b)}\n",
        encoding="utf-8",
    )
    return data_dir, label_file


def test_label_reader_keeps_unicode_text_polygons_and_ignore_flags(paddleocr_tree):
    data_dir, label_file = paddleocr_tree
    first, second = text_det.read_paddleocr_det_labels(label_file, data_dir)
    assert first.image_path == data_dir / "imgs" / "a.png"
    assert first.texts == ["Straße 東京", "###"]
    assert first.ignore.tolist() == [False, True]
    assert first.polys[0].tolist() == [[10, 20], [150, 20], [150, 60], [10, 60]]
    assert second.polys[0].shape == (5, 2)  # polygons, not only quadrilaterals


def test_paddleocr_det_bundle_yields_training_maps_and_evaluation_ground_truth(paddleocr_tree):
    data_dir, label_file = paddleocr_tree
    params = {"data_dir": str(data_dir), "train_label_file": str(label_file), "val_label_file": str(label_file),
              "train_size": 64, "eval_limit_side_len": 128}
    jsonschema.validate(params, text_det.PADDLEOCR_DET_SCHEMA)
    bundle = text_det.paddleocr_det(params, types.SimpleNamespace(cache_dir=None, seed=0))

    assert bundle.input_shape == [3, 64, 64]
    assert bundle.manifest["train_label_sha256"] == sha256_file(label_file)
    image, shrink_map, shrink_mask, threshold_map, threshold_mask = bundle.train[0]
    assert image.shape == (3, 64, 64) and shrink_map.shape == (64, 64)

    image, shape_info, polys, ignore = bundle.val[0]
    assert image.shape == (3, 64, 128)  # longer side limited to 128, both sides multiples of 32
    assert shape_info[:2].tolist() == [120, 200]
    assert polys[0].tolist() == [[10, 20], [150, 20], [150, 60], [10, 60]]  # original pixels
    assert ignore.tolist() == [False, True]
    images, infos, batch_polys, batch_ignores = bundle.collate_fn([bundle.val[0], bundle.val[1]])
    assert images.shape == (2, 3, 64, 128) and len(batch_polys) == 2


def test_malformed_label_line_and_missing_image_are_reported_with_their_place(paddleocr_tree, tmp_path):
    data_dir, label_file = paddleocr_tree
    bad = tmp_path / "bad.txt"
    bad.write_text(label_file.read_text(encoding="utf-8") + "imgs/c.png [not json]\n", encoding="utf-8")
    params = {"data_dir": str(data_dir), "train_label_file": str(bad), "val_label_file": str(label_file)}
    with pytest.raises(RecipeError, match=r"bad.txt:3: .*tab") as err:
        text_det.paddleocr_det(params, types.SimpleNamespace(cache_dir=None, seed=0))
    assert err.value.problems[0].path == "dataset.params.train_label_file"

    (data_dir / "imgs" / "b.png").unlink()
    params["train_label_file"] = str(label_file)
    with pytest.raises(RecipeError, match="1 image.*b.png"):
        text_det.paddleocr_det(params, types.SimpleNamespace(cache_dir=None, seed=0))


def test_synthetic_text_is_deterministic_from_its_seed(tmp_path):
    first = text_det.synthetic_text(dict(TINY, seed=7), context(tmp_path / "a"))
    again = text_det.synthetic_text(dict(TINY, seed=7), context(tmp_path / "b"))
    other = text_det.synthetic_text(dict(TINY, seed=8), context(tmp_path / "c"))
    keys = ("train_label_sha256", "val_label_sha256", "images_sha256")
    assert [first.manifest[k] for k in keys] == [again.manifest[k] for k in keys]
    assert all(first.manifest[k] != other.manifest[k] for k in keys)
    assert first.input_shape == [3, 96, 96]
    assert len(first.train) == 3 and len(first.val) == 4


def test_synthetic_text_is_generated_once_then_reused(tmp_path, monkeypatch):
    ctx = context(tmp_path)
    text_det.synthetic_text(TINY, ctx)
    (cache_dir,) = entries(ctx.cache_dir / "synthetic_text")
    mtimes = {p: p.stat().st_mtime_ns for p in cache_dir.rglob("*")}

    renders = []
    original = text_det.render_synthetic_image
    monkeypatch.setattr(text_det, "render_synthetic_image", lambda *a: renders.append(1) or original(*a))
    bundle = text_det.synthetic_text(TINY, ctx)
    assert renders == []
    assert {p: p.stat().st_mtime_ns for p in cache_dir.rglob("*")} == mtimes
    assert len(bundle.val) == 4

    text_det.synthetic_text(dict(TINY, num_val=2), ctx)  # other params: a separate cache entry
    assert len(renders) == 5 and len(entries(ctx.cache_dir / "synthetic_text")) == 2


def entries(directory):
    """A cache directory's entries, without the hidden lock file next to each (slimrecipe.cache)."""
    return [p for p in directory.iterdir() if not p.name.startswith(".")]


def test_synthetic_words_lie_inside_the_image_and_never_overlap(tmp_path):
    bundle = text_det.synthetic_text(dict(TINY, num_val=6, words_per_image=[4, 8]), context(tmp_path))
    total_words = 0
    for record in bundle.val.records:
        for poly in record.polys:
            assert poly.min() >= 0 and poly.max() <= 127
        shapes = [Polygon(p) for p in record.polys]
        assert all(a.intersection(b).area == 0 for a, b in combinations(shapes, 2))
        total_words += len(shapes)
    assert total_words >= 12


def test_a_perfect_probability_map_scores_hmean_one_on_synthetic_text(tmp_path):
    bundle = text_det.synthetic_text(dict(TINY, ignore_word_fraction=0.2), context(tmp_path))
    counts = None
    for index in range(len(bundle.val)):
        image, shape_info, polys, ignore = bundle.val[index]
        height, width = int(shape_info[0]), int(shape_info[1])
        perfect, _ = make_shrink_map(polys, ignore, height, width)
        dets, _ = boxes_from_prob_map(perfect, height, width)
        image_counts = match_detections(polys, ignore, dets)
        counts = image_counts if counts is None else counts + image_counts
    assert counts.gt_care >= 4
    assert hmean_from_counts(counts)["hmean"] == pytest.approx(1.0)


def test_training_crops_are_reproducible_and_vary_between_epochs(tmp_path):
    first = text_det.synthetic_text(TINY, context(tmp_path)).train
    second = text_det.synthetic_text(TINY, context(tmp_path)).train
    epoch1 = [first[i] for i in range(len(first))]
    assert all(np.array_equal(a[0], b[0]) for a, b in zip(epoch1, (second[i] for i in range(len(second)))))
    epoch2 = [first[i] for i in range(len(first))]
    assert any(not np.array_equal(a[0], b[0]) for a, b in zip(epoch1, epoch2))


def test_dataset_schemas_are_valid_and_reject_unknown_keys():
    for name in ("synthetic_text", "paddleocr_det"):
        schema = REGISTRIES["dataset"].get(name).schema
        jsonschema.Draft202012Validator.check_schema(schema)
        assert all("description" in spec for spec in schema["properties"].values())
    jsonschema.validate(TINY, text_det.SYNTHETIC_TEXT_SCHEMA)
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate({"num_images": 3}, text_det.SYNTHETIC_TEXT_SCHEMA)
    with pytest.raises(RecipeError, match="min, max"):
        text_det.synthetic_text(dict(TINY, font_size=[30, 10]), types.SimpleNamespace(cache_dir=None, seed=0))
