"""The command line as a user meets it: fast help/validate/listing, exit code 2 and no traceback on mistakes."""

from __future__ import annotations

import json

import pytest


def test_validate_ok_does_not_import_paddle():
    probe = ("import sys; from slimrecipe.cli import main; rc = main(['validate', '+recipe=cls_prune']); "
             "print('PADDLE' if 'paddle' in sys.modules else 'NOPADDLE'); sys.exit(rc)")
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert "is valid" in out.stdout and "NOPADDLE" in out.stdout


def test_validate_mistakes_exit_2_without_traceback(run_cli):
    out = run_cli("validate", "+recipe=cls_prune", "prune.target.eval_metric_loss=1.5", "seed=x")
    assert out.returncode == 2
    assert "Traceback" not in out.stderr
    assert "prune.target.eval_metric_loss" in out.stderr and "seed" in out.stderr


def test_run_with_a_mistake_exits_2_before_making_a_run_dir(tmp_path, run_cli):
    out = run_cli("+recipe=cls_prune", "model.params.arch=resnet99", f"hydra.run.dir={tmp_path}/run", cwd=tmp_path)
    assert out.returncode == 2 and "model.params.arch" in out.stderr and "Traceback" not in out.stderr
    assert not (tmp_path / "run").exists()


def test_unknown_recipe_exits_2(run_cli):
    out = run_cli("validate", "+recipe=nope")
    assert out.returncode == 2 and "cls_prune" in out.stderr and "Traceback" not in out.stderr


def test_help_and_recipes_listing(run_cli):
    assert "slimrecipe +recipe=NAME" in run_cli("--help").stdout
    listing = run_cli("recipes").stdout
    assert "cls_prune" in listing


def test_schema_command_prints_the_assembled_schema(run_cli):
    schema = json.loads(run_cli("schema").stdout)
    assert schema["$schema"].endswith("2020-12/schema")
    assert "paddle_vision" in schema["properties"]["model"]["properties"]["name"]["enum"]
    assert "prune" in schema["properties"]


def test_missing_team_recipe_dir_is_a_recipe_error(tmp_path, run_cli):
    out = run_cli("validate", "+recipe=cls_prune", env={"SLIMRECIPE_RECIPE_PATH": str(tmp_path / "absent")})
    assert out.returncode == 2 and "SLIMRECIPE_RECIPE_PATH" in out.stderr


@pytest.mark.slow
def test_sweep_gives_each_job_its_own_directory(tmp_path, run_cli):
    out = run_cli("-m", "+recipe=cls_prune", "+profile=smoke", "stages=[evaluate]", "seed=1,2",
                  f"hydra.sweep.dir={tmp_path}/sweep", cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-2000:]
    seeds = sorted(json.loads((tmp_path / "sweep" / str(i) / "snapshot.json").read_text())["seed"] for i in (0, 1))
    assert seeds == [1, 2]
    assert (tmp_path / "sweep" / "0" / ".hydra" / "config.yaml").is_file()


@pytest.mark.slow
def test_resume_command_finishes_a_run(tmp_path, run_cli):
    run_dir = tmp_path / "run"
    first = run_cli("+recipe=cls_prune", "+profile=smoke", "stages=[evaluate,report]", f"hydra.run.dir={run_dir}",
                    cwd=tmp_path)
    assert first.returncode == 0, first.stderr[-2000:]
    (run_dir / "stages" / "2-report" / "result.json").unlink()  # as if it had been interrupted there
    (run_dir / "report.md").unlink()
    again = run_cli("resume", str(run_dir), cwd=tmp_path)
    assert again.returncode == 0, again.stderr[-2000:]
    assert "done earlier, skipped" in again.stdout and (run_dir / "report.md").is_file()
