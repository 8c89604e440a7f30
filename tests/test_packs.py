"""Recipe packs: a pip-installed distribution that ships recipes (entry point group `slimrecipe.recipes`) and
plugins (`slimrecipe.plugins`); the listing names each recipe's pack, version and what shadows what; a recipe's
`validated_on` record warns where this environment differs."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from importlib import metadata
from pathlib import Path

import pytest

from slimrecipe.config import _version_matches, environment_warnings

def _installed(dist: str) -> str | None:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


PADDLE = _installed("paddlepaddle") or _installed("paddlepaddle-gpu")

PACK_RECIPE = """\
    # @package _global_
    # ACME's check of the tiny CNN on digits, with ACME's own stage
    defaults:
      - /model: tiny_cnn
      - /dataset: digits
      - /metric: top1
      - _self_
    name: {name}
    description: {description}
    dataset: {{params: {{size: 16, limit: 200}}}}
    stages: [evaluate, acme_stamp]
    acme_stamp: {{text: stamped by the acme pack}}
    validated_on: {{paddle: "{paddle}", model: tiny_cnn, metric: {{top1_accuracy: 0.1}}, latency_ms: {{onnx: 1.5}}}}
"""


def write_pack(src: Path) -> Path:
    """The source tree of a recipe pack, as a team would write it (setuptools, two entry point groups)."""
    pkg = src / "acme_pack"
    (pkg / "recipes" / "recipe" / "acme").mkdir(parents=True)
    (src / "pyproject.toml").write_text(textwrap.dedent("""\
        [build-system]
        requires = ["setuptools>=70.1"]
        build-backend = "setuptools.build_meta"

        [project]
        name = "acme-slim-pack"
        version = "1.4.0"
        dependencies = ["slimrecipe"]

        [project.entry-points."slimrecipe.recipes"]
        acme = "acme_pack.recipes"

        [project.entry-points."slimrecipe.plugins"]
        acme = "acme_pack.plugins"

        [tool.setuptools.packages.find]
        include = ["acme_pack*"]  # the recipe directories too (as namespace packages), for their YAML files

        [tool.setuptools.package-data]
        "*" = ["*.yaml"]
    """))
    (pkg / "__init__.py").write_text('"""ACME\'s slimrecipe pack."""\n')
    (pkg / "plugins.py").write_text(textwrap.dedent('''\
        """ACME's plugins: a stage that leaves a file in the run directory."""
        from slimrecipe.registry import register


        @register("stage", "acme_stamp", schema={"type": ["object", "null"], "additionalProperties": False,
                                                 "properties": {"text": {"type": "string"}}})
        def acme_stamp(state, params):
            """Write params.text to stamp.txt."""
            (state.run_dir / "stamp.txt").write_text(params["text"])
            return {"stamped": True}
    '''))
    recipes = pkg / "recipes" / "recipe"
    (recipes / "acme" / "digits_check.yaml").write_text(textwrap.dedent(PACK_RECIPE.format(
        name="acme_digits_check", description="tiny CNN on digits, validated here", paddle=PADDLE)))
    (recipes / "acme" / "old_paddle.yaml").write_text(textwrap.dedent(PACK_RECIPE.format(
        name="acme_old_paddle", description="validated on an old Paddle", paddle="2.4.2")))
    # same name as a built-in recipe: the built-in one wins
    (recipes / "cls_prune.yaml").write_text(textwrap.dedent(PACK_RECIPE.format(
        name="acme_cls_prune", description="ACME's own cls_prune", paddle=PADDLE)))
    return src


@pytest.fixture(scope="module")
def pack_env(tmp_path_factory):
    """The pack built and installed offline into a private target directory; the environment that sees it.

    Nothing is installed into the running virtual environment, so nothing needs removing afterwards.
    """
    import setuptools

    if tuple(int(x) for x in setuptools.__version__.split(".")[:2]) < (70, 1) and not _installed("wheel"):
        pytest.skip("building the pack offline needs setuptools>=70.1 or wheel (the `test` extra installs it)")
    root = tmp_path_factory.mktemp("pack")
    src = write_pack(root / "src")
    site = root / "site"
    out = subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-build-isolation",
                          "--no-index", "--target", str(site), str(src)], capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr
    assert (site / "acme_pack" / "recipes" / "recipe" / "acme" / "digits_check.yaml").is_file()
    return {"PYTHONPATH": str(site)}


def test_listing_shows_pack_version_and_shadowing(pack_env, tmp_path, run_cli):
    team = tmp_path / "team"
    (team / "recipe" / "acme").mkdir(parents=True)
    (team / "recipe" / "acme" / "digits_check.yaml").write_text("# @package _global_\nname: team_copy\n")
    out = run_cli("recipes", env={**pack_env, "SLIMRECIPE_RECIPE_PATH": str(team)})
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    # the search path in order: built-in, the pack, the team directory
    order = [i for i, line in enumerate(lines) if line.strip().startswith(("1. built-in", "2. pack acme", "3. "))]
    assert len(order) == 3 and "acme-slim-pack 1.4.0" in lines[order[1]] and str(team) in lines[order[2]]
    rows = {}
    for line in lines[order[2] + 1:]:
        if line.strip():
            rows.setdefault(line.split()[0], []).append(line)
    check = rows["acme/digits_check"]
    assert "pack acme (acme-slim-pack 1.4.0)" in check[0] and "shadows SLIMRECIPE_RECIPE_PATH" in check[0]
    assert f"validated on paddle {PADDLE}" in check[0]
    assert "shadowed by pack acme (acme-slim-pack 1.4.0)" in check[1]
    assert "acme/old_paddle" in rows
    builtin, pack_copy = rows["cls_prune"]
    assert "built-in" in builtin and "shadows pack acme" in builtin
    assert "shadowed by built-in" in pack_copy


def test_pack_recipe_runs_with_the_pack_plugin(pack_env, tmp_path, run_cli):
    run = tmp_path / "run"
    out = run_cli("+recipe=acme/digits_check", f"hydra.run.dir={run}", env=pack_env, cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-3000:]
    assert (run / "stamp.txt").read_text() == "stamped by the acme pack"
    assert json.loads((run / "stages" / "2-acme_stamp" / "result.json").read_text())["stamped"] is True
    snapshot = json.loads((run / "snapshot.json").read_text())
    assert snapshot["plugins"]["acme-slim-pack"] == "1.4.0"
    assert "warning:" not in out.stderr  # validated on the Paddle installed here
    # the built-in cls_prune wins over the pack's copy of the same name
    composed = run_cli("validate", "+recipe=cls_prune", env=pack_env)
    assert "recipe 'cls_prune' is valid" in composed.stdout


def test_validated_on_a_different_paddle_warns_but_does_not_fail(pack_env, tmp_path, run_cli):
    out = run_cli("validate", "+recipe=acme/old_paddle", env=pack_env)
    assert out.returncode == 0, out.stderr
    assert f"warning: validated_on.paddle: validated with paddle 2.4.2, installed is {PADDLE}" in out.stderr
    assert "top1_accuracy 0.1, onnx latency 1.5 ms" in out.stderr
    # also at the start of a run
    run = tmp_path / "run"
    started = run_cli("+recipe=acme/old_paddle", f"hydra.run.dir={run}", env=pack_env, cwd=tmp_path)
    assert started.returncode == 0, started.stderr[-3000:]
    assert "validated with paddle 2.4.2" in started.stderr
    assert (run / "stamp.txt").is_file()


def test_validate_and_listing_with_a_pack_do_not_import_paddle(pack_env):
    probe = ("import sys; from slimrecipe.cli import main; "
             "rc = main(['validate', '+recipe=acme/old_paddle']) + main(['recipes']); "
             "print('PADDLE' if 'paddle' in sys.modules else 'NOPADDLE'); sys.exit(rc)")
    import os

    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True,
                         env={**os.environ, **pack_env})
    assert out.returncode == 0, out.stderr
    assert out.stdout.rstrip().endswith("NOPADDLE")


def test_a_pack_whose_directory_is_missing_is_reported(tmp_path, run_cli):
    site = tmp_path / "site"
    dist = site / "ghost_pack-0.1.dist-info"
    dist.mkdir(parents=True)
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: ghost-pack\nVersion: 0.1\n")
    (dist / "entry_points.txt").write_text("[slimrecipe.recipes]\nghost = ghost_pack.recipes\n")
    out = run_cli("recipes", env={"PYTHONPATH": str(site)})
    assert out.returncode == 2
    assert "pack ghost (ghost-pack 0.1)" in out.stdout and "ghost_pack.recipes" in out.stdout
    assert "cls_prune" in out.stdout  # the other recipes are still listed
    ok = run_cli("validate", "+recipe=cls_prune", env={"PYTHONPATH": str(site)})
    assert ok.returncode == 0, ok.stderr  # one broken pack does not stop the built-in recipes


# --------------------------------------------------------------------------- the comparison itself

def test_version_prefix_matching():
    assert _version_matches("3.3", "3.3.1") and _version_matches("3.3.1", "3.3.1")
    assert _version_matches("3.3.1", "3.3.1+cu118")
    assert not _version_matches("3.3.1", "3.3.10") and not _version_matches("3.3", "3.30.0")
    assert not _version_matches("2.6", "3.3.1")


def test_environment_warnings_name_what_differs():
    recipe = {"model": {"name": "resnet18"},
              "validated_on": {"paddle": PADDLE, "model": "mobilenet_v2", "packages": {"no-such-dist-xyz": "1.0"},
                               "metric": {"hmean": 0.75}}}
    warnings = environment_warnings(recipe)
    assert not any(w.startswith("validated_on.paddle") for w in warnings)
    assert any("validated with model.name 'mobilenet_v2', this recipe now has 'resnet18'" in w for w in warnings)
    assert any("no-such-dist-xyz 1.0, which is not installed" in w for w in warnings)
    assert warnings[-1] == "the figures it was validated with (hmean 0.75) may not hold here"
    assert environment_warnings({"model": {"name": "resnet18"}}) == []
    # a part of the model section: same plugin, another architecture
    vision = {"model": {"name": "paddle_vision", "params": {"arch": "mobilenet_v2", "num_classes": 10}},
              "validated_on": {"model": {"name": "paddle_vision", "params": {"arch": "resnet18"}}}}
    assert environment_warnings(vision)[0] == ("validated_on.model: validated with model.params.arch 'resnet18', "
                                               "this recipe now has 'mobilenet_v2'")
    vision["model"]["params"]["arch"] = "resnet18"
    assert environment_warnings(vision) == []
    assert environment_warnings({"model": {"name": "x"}, "validated_on": {"paddle": PADDLE, "model": "x"}}) == []
