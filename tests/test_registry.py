"""Plugin registration: decorator, duplicates refused, unknown names list the known ones, entry points."""

from __future__ import annotations

import textwrap

import pytest

from slimrecipe import registry
from slimrecipe.errors import RecipeError



def test_builtins_are_registered_under_their_kinds():
    regs = registry.load_plugins()
    assert {"train", "evaluate", "sensitivity", "prune", "finetune", "qat", "export", "report"} <= set(
        regs["stage"].names())
    assert "paddle_vision" in regs["model"].names()
    assert "digits" in regs["dataset"].names()
    assert {"paddle_inference", "onnx"} <= set(regs["exporter"].names())


def test_duplicate_name_is_refused_loudly():
    registry.load_plugins()
    with pytest.raises(registry.DuplicatePluginError, match="already registered"):
        registry.register("stage", "prune")(lambda state, params: {})


def test_unknown_name_lists_the_registered_ones():
    with pytest.raises(RecipeError) as info:
        registry.get("model", "resnet_9000", "model.name")
    problem = info.value.problems[0]
    assert problem.path == "model.name"
    assert "paddle_vision" in problem.message and "tiny_cnn" in problem.message


def make_outside_package(root, stage_body="state.run_dir.joinpath('hello.txt').write_text('hi')"):
    """An installed distribution `team-plugins` that registers the stage `hello` through the entry point group."""
    root.mkdir(parents=True)
    (root / "team_plugins.py").write_text(textwrap.dedent(f"""
        from slimrecipe.registry import register

        @register("stage", "hello", schema={{"type": "object", "additionalProperties": False,
                                            "properties": {{"greeting": {{"type": "string"}}}}}})
        def hello(state, params):
            "Say hello into the run directory."
            {stage_body}
            return {{"greeting": params.get("greeting", "hi")}}
    """))
    dist = root / "team_plugins-1.2.3.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: team-plugins\nVersion: 1.2.3\n")
    (dist / "entry_points.txt").write_text("[slimrecipe.plugins]\nteam = team_plugins\n")
    (root / "recipes" / "recipe").mkdir(parents=True)
    (root / "recipes" / "recipe" / "team_hello.yaml").write_text(textwrap.dedent("""\
        # @package _global_
        defaults:
          - /model: tiny_cnn
          - /dataset: digits
          - /metric: top1
          - _self_
        name: team_hello
        description: a team recipe that runs an outside plugin
        dataset: {params: {size: 8, limit: 40}}
        stages: [hello]
        hello: {greeting: hej}
    """))
    return root


def test_outside_plugin_through_entry_point_validates_and_runs(tmp_path, run_cli):
    pkg = make_outside_package(tmp_path / "site")
    env = {"PYTHONPATH": str(pkg), "SLIMRECIPE_RECIPE_PATH": str(pkg / "recipes")}
    listing = run_cli("recipes", env=env)
    assert "team_hello" in listing.stdout and str(pkg / "recipes") in listing.stdout
    bad = run_cli("validate", "+recipe=team_hello", "hello.greeting=3", env=env)
    assert bad.returncode == 2 and "hello.greeting" in bad.stderr
    runs = tmp_path / "runs"
    done = run_cli("+recipe=team_hello", f"hydra.run.dir={runs}/one", env=env, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-2000:]
    assert (runs / "one" / "hello.txt").read_text() == "hi"
    import json

    snap = json.loads((runs / "one" / "snapshot.json").read_text())
    assert snap["plugins"]["team-plugins"] == "1.2.3"
