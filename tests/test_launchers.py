"""Sweeps through Hydra's launcher plugins (joblib, submitit's local executor, a local Ray cluster): every job
gets its own directory and result, and the sweep summary lists them all, also when a job failed elsewhere."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import yaml

SMOKE = ["+recipe=cls_prune", "+profile=smoke", "stages=[evaluate,report]"]

# launcher option -> (the plugin module it needs, the extra that installs it, the launcher class used)
LAUNCHERS = {
    "joblib": ("hydra_plugins.hydra_joblib_launcher", "joblib", "JoblibLauncher"),
    "local_parallel": ("hydra_plugins.hydra_joblib_launcher", "joblib", "JoblibLauncher"),
    "submitit_local": ("hydra_plugins.hydra_submitit_launcher", "submitit", "LocalLauncher"),
    "ray_local": ("hydra_plugins.hydra_ray_launcher", "ray", "RayLauncher"),
}


def _need(launcher: str) -> None:
    module, extra, _ = LAUNCHERS[launcher]
    for m in (module, "ray") if extra == "ray" else (module,):
        try:
            found = importlib.util.find_spec(m) is not None
        except ModuleNotFoundError:
            found = False
        if not found:
            pytest.skip(f"launcher {launcher!r} needs {m}, which is not installed (pip install -e '.[{extra}]')")


def _only_sweep(root: Path) -> Path:
    """The one sweep directory Hydra made under ``root/multirun`` (its default place, date/time-name)."""
    sweeps = [p.parent for p in root.glob("multirun/*/*/multirun.yaml")]
    assert len(sweeps) == 1, sweeps
    return sweeps[0]


@pytest.mark.parametrize("launcher", list(LAUNCHERS))
def test_two_job_sweep_with_each_launcher(launcher, tmp_path, run_cli):
    _need(launcher)
    # no hydra.sweep.dir: the summary must find the default, date-stamped sweep directory by itself
    out = run_cli("-m", *SMOKE, "seed=1,2", f"hydra/launcher={launcher}", cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-3000:]
    sweep = _only_sweep(tmp_path)
    used = yaml.safe_load((sweep / "multirun.yaml").read_text())["hydra"]["launcher"]["_target_"]
    assert used.endswith(LAUNCHERS[launcher][2]), used
    for job in ("0", "1"):
        assert (sweep / job / "stages" / "1-evaluate" / "result.json").is_file(), job
        assert (sweep / job / "report.json").is_file(), job
        assert (sweep / job / "snapshot.json").is_file(), job
    summary = json.loads((sweep / "sweep_summary.json").read_text())
    assert [(r["job"], r["status"], r["overrides"][-1]) for r in summary["jobs"]] == [
        ("0", "ok", "seed=1"), ("1", "ok", "seed=2")]
    assert all(r["metric_name"] == "top1_accuracy" and r["metric"] is not None for r in summary["jobs"])
    assert "sweep summary (2 jobs: 2 ok)" in out.stdout


@pytest.mark.parametrize("launcher", ["joblib", "submitit_local"])
def test_a_failing_job_elsewhere_is_reported_and_the_others_finish(launcher, tmp_path, run_cli):
    _need(launcher)
    sweep = tmp_path / "sweep"
    # job 1 has a recipe mistake that only its own composition reveals (dataset.params.limit >= 20)
    out = run_cli("-m", *SMOKE, "dataset.params.limit=600,0", f"hydra/launcher={launcher}",
                  f"hydra.sweep.dir={sweep}", cwd=tmp_path)
    assert out.returncode == 2, out.stdout[-2000:] + out.stderr[-2000:]
    rows = {r["job"]: r for r in json.loads((sweep / "sweep_summary.json").read_text())["jobs"]}
    assert rows["0"]["status"] == "ok" and (sweep / "0" / "report.json").is_file()
    assert rows["1"]["status"] == "failed" and rows["1"]["exit_code"] == 2
    assert "dataset.params.limit" in rows["1"]["error"]
    # submitit keeps a job's own output in its log files: the command itself must say which job failed
    assert "job 1 failed: a mistake in the recipe or an input (exit 2)" in out.stdout


def test_launcher_presets_compose(tmp_path, run_cli):
    _need("local_parallel")
    _need("submitit_local")
    parallel = run_cli("+recipe=cls_prune", "hydra/launcher=local_parallel", "--cfg", "hydra", cwd=tmp_path)
    assert parallel.returncode == 0, parallel.stderr[-2000:]
    launcher = yaml.safe_load(parallel.stdout)["hydra"]["launcher"]
    assert launcher["n_jobs"] == 2 and launcher["_target_"].endswith("JoblibLauncher")
    slurm = run_cli("+recipe=cls_prune", "hydra/launcher=slurm", "--cfg", "hydra", cwd=tmp_path)
    assert slurm.returncode == 0, slurm.stderr[-2000:]
    launcher = yaml.safe_load(slurm.stdout)["hydra"]["launcher"]
    assert launcher["_target_"].endswith("SlurmLauncher")
    assert (launcher["timeout_min"], launcher["max_num_timeout"]) == (240, 3)
