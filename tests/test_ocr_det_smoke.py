"""The flagship recipe `ocr_det_prune` end to end on its smoke profile; the exports find text in a new image."""

from __future__ import annotations

import json

import numpy as np
import pytest

from slimrecipe.config import compose, validate
from slimrecipe.run import execute


pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def det_run(tmp_path_factory):
    recipe = validate(compose(["+recipe=ocr_det_prune", "+profile=smoke"]))
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
    assert base["metric"] > 0.2, "the smoke baseline must detect text for the rest to mean anything"
    assert pruned["flops"] < base["flops"]
    plan = json.loads((run_dir / "plan.json").read_text())
    first_four = list(plan["params"].values())[:4]  # the plan lists parameters from the input on
    assert all(p["rule"].startswith("skip.first_n") for p in first_four)
    report = (run_dir / "report.md").read_text()
    assert "hmean" in report and "paddle_inference" in report and "onnx" in report


@pytest.mark.parametrize("target", ["paddle_inference", "onnx"])
def test_export_finds_the_text_in_a_rendered_image(det_run, target):
    from slimrecipe.datasets.db_transforms import make_eval_input
    from slimrecipe.exporters import onnx_session, paddle_predictor
    from slimrecipe.metrics.det import DetCounts, boxes_from_prob_map, hmean_from_counts, match_detections

    state, run_dir = det_run
    out = run_dir / "export" / target
    if target == "paddle_inference":
        run = paddle_predictor(out / "model.pdmodel", out / "model.pdiparams")
    else:
        run, _ = onnx_session(out / "model.onnx")
    total = DetCounts()
    for seed in (1001, 1002, 1003, 1004, 1005, 1006):
        image, _, polys = rendered_image(seed, state.recipe)
        x, info = make_eval_input(image, state.recipe["dataset"]["params"]["eval_limit_side_len"])
        prob = run(x[None])
        assert prob.shape == (1, 1, *x.shape[1:])  # PaddleOCR's convention: the probability map
        boxes, _ = boxes_from_prob_map(prob[0, 0], int(info[0]), int(info[1]))
        total = total + match_detections(polys, [False] * len(polys), boxes)
    # the smoke model is small and briefly trained, but it must find most words in images it never saw
    figures = hmean_from_counts(total)
    assert figures["recall"] >= 0.5 and figures["precision"] >= 0.5, (figures, total)
