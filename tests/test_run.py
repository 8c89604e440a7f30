"""A run end to end on a tiny model: stage results, snapshot, resume after an interruption, separate run dirs."""

from __future__ import annotations

import json

import pytest
import yaml

from slimrecipe import registry
from slimrecipe.config import compose, validate
from slimrecipe.fileio import sha256_file
from slimrecipe.run import execute

TINY = ["+recipe=cls_prune", "+profile=smoke"]
pytestmark = pytest.mark.slow  # the whole cls_prune recipe on its smoke profile


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """The whole cls_prune recipe on the smoke profile, once for the module."""
    recipe = validate(compose(TINY))
    run_dir = tmp_path_factory.mktemp("run") / "tiny"
    state = execute(recipe, run_dir)
    return state, run_dir


def test_every_stage_leaves_a_result(tiny_run):
    state, run_dir = tiny_run
    for i, name in enumerate(state.recipe["stages"], 1):
        assert (run_dir / "stages" / f"{i}-{name}" / "result.json").is_file()
    for f in ("recipe.resolved.yaml", "snapshot.json", "sensitivity.json", "plan.json", "report.md",
              "report.json", "sensitivity.png", "report.png"):
        assert (run_dir / f).is_file(), f


def test_pruned_model_has_fewer_flops_and_its_exports_load_and_predict(tiny_run):
    state, run_dir = tiny_run
    base, pruned = state.results["evaluate"], state.results["prune"]["after"]
    assert pruned["flops"] < base["flops"]
    assert pruned["params"] < base["params"]
    kept = pruned["params"] / base["params"]
    for target in ("paddle_inference", "onnx"):
        entry = state.results["export"]["targets"][target]
        # the float pruned export is smaller by about the share of parameters pruning removed (+ graph overhead)
        compressed = entry.get("float_pruned") or entry["compressed"]
        assert compressed["size_bytes"] < entry["baseline"]["size_bytes"] * kept * 1.25 + 50_000, entry
    # the Paddle Inference export reloads in a fresh predictor and classifies like the in-memory model
    import numpy as np

    from slimrecipe.exporters import paddle_predictor

    x = np.stack([state.data.val[i][0] for i in range(8)]).astype("float32")
    exported = run_dir / "export" / "paddle_inference"
    predict = paddle_predictor(exported / "model.pdmodel", exported / "model.pdiparams")
    out = predict(x)
    assert out.shape == (8, 10)
    from slimrecipe.paddle_env import paddle

    with paddle().no_grad():
        ref = state.model(paddle().to_tensor(x)).numpy()
    assert (out.argmax(1) == ref.argmax(1)).mean() >= 0.75


def test_plan_covers_every_prunable_parameter_with_a_reason(tiny_run):
    _, run_dir = tiny_run
    plan = json.loads((run_dir / "plan.json").read_text())
    rules = [p["rule"] for p in plan["params"].values()]
    assert any(r.startswith("skip.first_n") for r in rules)
    assert all(p["channels_after"] <= p["channels_before"] for p in plan["params"].values())


def test_snapshot_records_env_seed_and_hashes(tiny_run):
    state, run_dir = tiny_run
    snap = json.loads((run_dir / "snapshot.json").read_text())
    assert snap["seed"] == state.recipe["seed"]
    assert {"python", "platform", "packages"} <= set(snap["env"])
    for pkg in ("paddlepaddle", "hydra-core", "numpy"):
        assert pkg in snap["env"]["packages"]
    assert "slimrecipe" in snap["plugins"]
    assert snap["recipe_dirs"][0]["path"].endswith("recipes")
    assert snap["inputs"]["dataset.manifest"]["sha256"]
    # every output listed is hashed, and the hashes are those of the files
    assert "plan.json" in snap["outputs"]
    assert snap["outputs"]["plan.json"] == sha256_file(run_dir / "plan.json")
    assert any(k.startswith("export/paddle_inference/") for k in snap["outputs"])
    resolved = yaml.safe_load((run_dir / "recipe.resolved.yaml").read_text())
    assert resolved == state.recipe


def test_second_run_reuses_cached_baseline_and_sensitivity(tiny_run, tmp_path):
    recipe = validate(compose(TINY + ["stages=[train,evaluate,sensitivity]"]))
    state = execute(recipe, tmp_path / "again")
    assert state.results["train"]["cache"] == "hit"
    assert state.results["sensitivity"]["cache"] == "hit"
    assert state.results["sensitivity"]["evaluations"] == 0


class Interrupt(KeyboardInterrupt):
    pass


def test_interrupted_run_resumes_from_the_first_unfinished_stage(tmp_path):
    calls = {"before": 0, "flaky": 0}

    @registry.register("stage", "_test_before")
    def before(state, params):
        calls["before"] += 1
        return {"n": calls["before"]}

    @registry.register("stage", "_test_flaky")
    def flaky(state, params):
        calls["flaky"] += 1
        if calls["flaky"] == 1:
            raise Interrupt()
        return {"ok": True}

    try:
        recipe = validate(compose(TINY + ["stages=[_test_before,_test_flaky,evaluate]"]))
        run_dir = tmp_path / "run"
        with pytest.raises(KeyboardInterrupt):
            execute(recipe, run_dir)
        assert (run_dir / "stages" / "1-_test_before" / "result.json").exists()
        assert not (run_dir / "stages" / "2-_test_flaky" / "result.json").exists()
        state = execute(recipe, run_dir)  # what `slimrecipe resume` does
        assert calls == {"before": 1, "flaky": 2}
        assert state.results["evaluate"]["metric"] == pytest.approx(state.evaluate(), abs=1e-6)
        assert len(json.loads((run_dir / "snapshot.json").read_text())["sessions"]) == 2
    finally:
        registry.REGISTRIES["stage"].unregister("_test_before")
        registry.REGISTRIES["stage"].unregister("_test_flaky")


def test_run_dir_of_another_recipe_is_never_overwritten(tmp_path):
    from slimrecipe.errors import RecipeError

    run_dir = tmp_path / "run"
    execute(validate(compose(TINY + ["stages=[evaluate]"])), run_dir)
    with pytest.raises(RecipeError, match="different recipe"):
        execute(validate(compose(TINY + ["stages=[evaluate]", "seed=5"])), run_dir)


def test_sensitivity_from_a_file_skips_the_analysis(tiny_run, tmp_path):
    _, run_dir = tiny_run
    table_file = tmp_path / "shared_table.json"
    table_file.write_text((run_dir / "sensitivity.json").read_text())
    recipe = validate(compose(TINY + ["stages=[train,sensitivity,prune]", "sensitivity.source=file",
                                      f"sensitivity.file={table_file}"]))
    state = execute(recipe, tmp_path / "from_file")
    assert state.results["sensitivity"]["evaluations"] == 0
    written = json.loads((tmp_path / "from_file" / "sensitivity.json").read_text())
    assert written["computed_on"]["file_sha256"] == sha256_file(table_file)
    assert written["table"] == json.loads(table_file.read_text())["table"]
    snap = json.loads((tmp_path / "from_file" / "snapshot.json").read_text())
    assert snap["inputs"]["sensitivity.file"]["sha256"] == sha256_file(table_file)
    execute(recipe, tmp_path / "from_file")  # a resume: every stage is done, nothing re-runs
    snap = json.loads((tmp_path / "from_file" / "snapshot.json").read_text())
    assert snap["inputs"]["sensitivity.file"]["sha256"] == sha256_file(table_file), "lost on resume"


def test_a_malicious_sensitivity_pickle_stops_the_run_and_creates_nothing(tmp_path):
    import os
    import pickle

    from slimrecipe.errors import RecipeError

    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    bad = tmp_path / "sens.pickle"
    bad.write_bytes(pickle.dumps({"0.weight": {0.1: Evil()}}))
    recipe = validate(compose(TINY + ["stages=[train,sensitivity]", "sensitivity.source=file",
                                      f"sensitivity.file={bad}"]))
    with pytest.raises(RecipeError) as info:
        execute(recipe, tmp_path / "run")
    assert info.value.problems[0].path == "sensitivity.file" and "system" in str(info.value)
    assert not marker.exists()


def test_builtin_table_fits_the_model_it_was_made_for():
    from slimrecipe.fileio import read_json
    from slimrecipe.models.vision import paddle_vision
    from slimrecipe.pruning import prunable_params, resolve_table
    from slimrecipe.stages.sensitivity import BUILTIN_DIR

    recipe = validate(compose(["+recipe=cls_prune", "sensitivity=builtin"]))
    assert recipe["sensitivity"]["source"] == "builtin"

    class Data:
        input_shape, num_classes = [3, 32, 32], 10

    model = paddle_vision({"arch": "resnet18"}, Data())
    table = read_json(BUILTIN_DIR / f"{recipe['sensitivity']['builtin']}.json")["table"]
    resolved = resolve_table(prunable_params(model, [3, 32, 32]), table, "sensitivity.builtin")
    assert len(resolved) == len(table) > 5
