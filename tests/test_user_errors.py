"""Mistakes a user can make end in one clear message (exit 2, no traceback); bugs of ours keep their traceback."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from slimrecipe import registry
from slimrecipe.config import apply_defaults, compose, list_recipes, validate
from slimrecipe.errors import RecipeError

SMOKE = ["+recipe=cls_prune", "+profile=smoke"]


def _cli_without_paddle(args, cwd):
    # `None` in sys.modules makes `import paddle` fail as it does where no Paddle build is installed
    probe = ("import sys; sys.modules['paddle'] = None; from slimrecipe.cli import main; "
             f"sys.exit(main({list(args)!r}))")
    return subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, cwd=cwd, timeout=300)


def test_a_run_without_paddle_names_the_extras_to_install(tmp_path):
    out = _cli_without_paddle([*SMOKE, "stages=[evaluate]", f"hydra.run.dir={tmp_path}/run"], tmp_path)
    assert out.returncode == 2, out.stderr
    assert "slimrecipe[cpu]" in out.stderr and "slimrecipe[gpu]" in out.stderr
    assert "Traceback" not in out.stderr and "ModuleNotFoundError" not in out.stderr


def test_a_bug_keeps_its_traceback_on_screen_and_in_the_run(tmp_path, run_cli):
    # a stage plugin with a bug, installed the way a team ships one (entry point); here: registered in-process
    probe = (
        "import sys\n"
        "from slimrecipe import registry\n"
        "registry.load_plugins()\n"
        "@registry.register('stage', '_buggy')\n"
        "def buggy(state, params):\n"
        "    return {}['missing key']\n"
        "from slimrecipe.cli import main\n"
        f"sys.exit(main(['+recipe=cls_prune', '+profile=smoke', 'stages=[_buggy]', 'hydra.run.dir={tmp_path}/run']))\n"
    )
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, cwd=tmp_path, timeout=300)
    assert out.returncode == 3, out.stderr
    assert "Traceback" in out.stderr and "KeyError: 'missing key'" in out.stderr
    log = tmp_path / "run" / "error.log"
    assert str(log) in out.stderr
    assert "KeyError: 'missing key'" in log.read_text()


def test_weights_that_are_not_weights_name_the_file_and_key(tmp_path, run_cli):
    junk = tmp_path / "junk.pdparams"
    junk.write_bytes(np.random.default_rng(0).bytes(4096))
    out = run_cli(*SMOKE, "stages=[evaluate]", f"model.weights={junk}", f"hydra.run.dir={tmp_path}/run", cwd=tmp_path)
    assert out.returncode == 2, out.stderr
    assert "model.weights" in out.stderr and str(junk) in out.stderr and "Traceback" not in out.stderr


def test_a_batch_larger_than_the_training_split_stops_instead_of_looping(tmp_path, run_cli):
    # before: `fit` dropped the only (partial) batch of every epoch and looped forever; the timeout catches a hang
    out = run_cli(*SMOKE, "stages=[train]", "train.batch_size=4000", "train.cache=false",
                  f"hydra.run.dir={tmp_path}/run", cwd=tmp_path, timeout=240)
    assert out.returncode == 2, out.stderr
    assert "train.batch_size" in out.stderr and "larger than the training split" in out.stderr


def test_a_damaged_image_in_a_label_set_names_the_file_and_key(tmp_path):
    from slimrecipe.datasets.db_transforms import DBTransformConfig
    from slimrecipe.datasets.text_det import DetEvalSet, read_paddleocr_det_labels

    import cv2

    ok, png = cv2.imencode(".png", np.full((64, 64, 3), 200, np.uint8))
    (tmp_path / "img.png").write_bytes(png.tobytes()[:40])  # truncated
    (tmp_path / "val.txt").write_text('img.png\t[{"transcription": "a", "points": [[1,1],[9,1],[9,9],[1,9]]}]\n')
    records = read_paddleocr_det_labels(tmp_path / "val.txt", tmp_path)
    with pytest.raises(RecipeError) as info:
        DetEvalSet(records, DBTransformConfig())[0]
    assert info.value.problems[0].path == "dataset.params.val_label_file"
    assert str(tmp_path / "img.png") in str(info.value)


@pytest.mark.parametrize("override, path", [("train.optimizer.name=lamb", "train.optimizer.name"),
                                            ("train.schedule.name=onecycle", "train.schedule.name")])
def test_unknown_optimizer_or_schedule_is_a_recipe_error(override, path):
    with pytest.raises(RecipeError) as info:
        validate(compose(["+recipe=cls_prune", override]))
    assert path in {p.path for p in info.value.problems}


@pytest.mark.parametrize("decay, changes", [(0.0, False), (0.1, True)])
def test_adamw_decays_exactly_as_asked(decay, changes):
    from slimrecipe.paddle_env import paddle
    from slimrecipe.stages._training import OPTIMIZER_SCHEMA, _optimizer

    p = paddle()
    layer = p.nn.Linear(4, 4)
    before = layer.weight.numpy().copy()
    opt = _optimizer(apply_defaults(OPTIMIZER_SCHEMA, {"name": "adamw", "weight_decay": decay}), 0.1,
                     layer.parameters())
    (layer(p.ones([1, 4])) * 0).sum().backward()  # zero gradient: only weight decay can move the weights
    opt.step()
    assert (not np.allclose(layer.weight.numpy(), before)) == changes


def test_recipes_listing_reports_a_file_that_does_not_parse(tmp_path, run_cli):
    (tmp_path / "recipe").mkdir()
    (tmp_path / "recipe" / "broken.yaml").write_text("name: [unclosed\n")
    out = run_cli("recipes", env={"SLIMRECIPE_RECIPE_PATH": str(tmp_path)})
    assert out.returncode == 2
    assert "broken" in out.stdout and "BROKEN" in out.stdout and "broken.yaml" in out.stdout
    assert [r for r in list_recipes() if r["name"] == "cls_prune"][0]["error"] is None


def test_snapshot_records_a_failed_git_query(tmp_path, monkeypatch):
    from slimrecipe.snapshot import git_state

    assert git_state(tmp_path)["git"] is None  # not a checkout
    subprocess.run(["git", "init", "-q", str(tmp_path / "fresh")], check=True)
    no_commit = git_state(tmp_path / "fresh")["git"]  # a checkout without a commit: HEAD does not resolve
    assert "error" in no_commit and "rev-parse HEAD" in no_commit["error"]
    monkeypatch.setenv("PATH", str(tmp_path / "nowhere"))
    assert "git could not be run" in git_state(tmp_path)["git"]["error"]


def _stage_schemas():
    registry.load_plugins()
    return [(p.name, p.schema) for p in registry.REGISTRIES["stage"] if not p.name.startswith("_")]


def _missing_defaults(schema: dict, where: str, required=()) -> list[str]:
    out = []
    for key, sub in (schema.get("properties") or {}).items():
        here = f"{where}.{key}"
        if here in NO_DEFAULT:
            continue
        if sub.get("properties") and "default" not in sub:
            out += _missing_defaults(sub, here, sub.get("required", ()))
        elif "default" not in sub and key not in required and key not in schema.get("required", ()):
            out.append(here)
    return out


# keys that have no sensible default: the recipe must choose (the schema requires them or the code refuses)
NO_DEFAULT = {"prune.target", "export.targets"}


@pytest.mark.parametrize("name, schema", _stage_schemas(), ids=lambda v: v if isinstance(v, str) else "")
def test_every_stage_parameter_has_its_default_in_the_schema(name, schema):
    missing = _missing_defaults(schema, name)
    assert not missing, f"give these a `default` in the {name} schema (code keeps no defaults): {missing}"


def test_the_run_hands_stages_their_schema_defaults(tmp_path):
    from slimrecipe.run import execute
    from slimrecipe.stages.sensitivity import SCHEMA

    seen = {}

    @registry.register("stage", "_probe", schema=SCHEMA)
    def probe(state, params):
        seen.update(params)
        return {}

    try:
        recipe = validate(compose([*SMOKE, "stages=[_probe]"]))
        execute(recipe, tmp_path / "run")
    finally:
        registry.REGISTRIES["stage"].unregister("_probe")
    assert seen["ratios"] == SCHEMA["properties"]["ratios"]["default"]
    assert seen["batch_size"] == SCHEMA["properties"]["batch_size"]["default"]
