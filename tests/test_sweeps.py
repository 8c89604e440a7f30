"""Sweep summaries: one row per job (failed and unfinished ones kept), Pareto fronts, `slimrecipe sweep-report`."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import yaml

from slimrecipe.cli import main
from slimrecipe.fileio import write_json, write_text
from slimrecipe.sweeps import pareto_front, summarize, write_summary

SMOKE = ["+recipe=cls_prune", "+profile=smoke"]


# --------------------------------------------------------------------------- the Pareto front itself

def test_pareto_front_is_exactly_the_non_dominated_points():
    points = [("a", 0.90, 10.0), ("b", 0.85, 5.0), ("c", 0.80, 6.0),   # c: worse and dearer than b
              ("d", 0.90, 12.0),                                        # d: as good as a, dearer
              ("e", 0.95, 20.0), ("f", None, 1.0),                      # f: no metric, takes no part
              ("g", 0.85, 5.0),                                         # g equals b: neither dominates
              ("h", 0.70, 5.0)]                                         # h: as cheap as b, worse
    assert pareto_front(points) == ["b", "g", "a", "e"]
    # when a lower metric is better, the front turns over
    assert pareto_front(points, higher_is_better=False) == ["h"]
    assert pareto_front([("x", 0.5, float("nan")), ("y", 0.4, 3.0)]) == ["y"]
    assert pareto_front([]) == []


# --------------------------------------------------------------------------- a hand-made sweep directory

def _job(sweep, num, overrides, stages, *, results=None, report=None, finished=True, error=None):
    job = sweep / str(num)
    write_text(job / ".hydra" / "overrides.yaml", yaml.safe_dump(overrides))
    write_text(job / "recipe.resolved.yaml", yaml.safe_dump({"name": "cls_prune", "stages": stages}))
    for i, (name, result) in enumerate((results or {}).items(), 1):
        write_json(job / "stages" / f"{i}-{name}" / "result.json", result)
    if report is not None:
        write_json(job / "report.json", report)
    write_json(job / "snapshot.json", {"finished": "2026-01-01T00:00:00+00:00"} if finished else {})
    if error:
        write_text(job / "error.log", f"Traceback (most recent call last):\n  File \"x.py\"\n{error}\n")
    return job


def _report(metric, flops, size, latency):
    return {"metric_name": "top1_accuracy",
            "phases": [{"phase": "baseline", "metric": 0.99, "flops": 1000.0, "params": 100},
                       {"phase": "finetuned", "metric": metric, "flops": flops, "params": flops // 10}],
            "exports": {"onnx": {"compressed": {"size_bytes": size, "latency": {"median_ms": latency}},
                                 "baseline": {"size_bytes": 10 * 2**20, "latency": {"median_ms": 9.0}}}}}


@pytest.fixture
def handmade_sweep(tmp_path):
    """Five jobs asked for: two finished, one crashed (error.log), one interrupted, one never started."""
    sweep = tmp_path / "sweep"
    task = ["+recipe=cls_prune", "prune.target.flops=0.2,0.4,0.6,0.8,0.9"]
    write_text(sweep / "multirun.yaml", yaml.safe_dump({"hydra": {
        "sweeper": {"_target_": "hydra._internal.core_plugins.basic_sweeper.BasicSweeper", "params": None},
        "overrides": {"task": task}}}))
    stages = ["evaluate", "finetune", "export", "report"]
    done = {"evaluate": {"metric": 0.99, "seconds": 1.5}, "finetune": {"metric": 0.9, "seconds": 2.0},
            "export": {"seconds": 3.0}, "report": {"seconds": 0.5}}
    _job(sweep, 0, ["+recipe=cls_prune", "prune.target.flops=0.2"], stages, results=done,
         report=_report(0.95, 800.0, 4 * 2**20, 2.0))
    _job(sweep, 1, ["+recipe=cls_prune", "prune.target.flops=0.4"], stages, results=done,
         report=_report(0.90, 600.0, 3 * 2**20, 2.5))  # cheaper than 0 in FLOPs and size, slower
    _job(sweep, 2, ["+recipe=cls_prune", "prune.target.flops=0.6"], stages, results={"evaluate": done["evaluate"]},
         finished=False, error="ValueError: boom in finetune")
    _job(sweep, 3, ["+recipe=cls_prune", "prune.target.flops=0.8"], stages,
         results={"evaluate": done["evaluate"], "finetune": done["finetune"]}, finished=False)
    return sweep


def test_summary_keeps_failed_unfinished_and_not_started_jobs(handmade_sweep):
    summary = write_summary(handmade_sweep)
    rows = {r["job"]: r for r in summary["jobs"]}
    assert list(rows) == ["0", "1", "2", "3", "4"]
    assert [rows[j]["status"] for j in rows] == ["ok", "ok", "failed", "unfinished", "not started"]
    assert "ValueError: boom in finetune" in rows["2"]["error"] and rows["2"]["exit_code"] == 3
    assert rows["3"]["error"] == "unfinished: stages done 2/4"
    assert rows["4"]["overrides"] == ["+recipe=cls_prune", "prune.target.flops=0.9"]
    # the delivered figures are the last phase's, wall time the sum of the stages' seconds
    assert (rows["0"]["metric"], rows["0"]["phase"], rows["0"]["flops"]) == (0.95, "finetuned", 800.0)
    assert rows["0"]["exports"]["onnx"] == {"size_bytes": 4 * 2**20, "latency_ms": 2.0}
    assert rows["0"]["seconds"] == 7.0
    # job 0 is faster and better; job 1 is smaller: both on the size front, only job 0 on the latency one
    assert summary["fronts"]["latency:onnx"]["jobs"] == ["0"]
    assert summary["fronts"]["size:onnx"]["jobs"] == ["1", "0"]
    assert summary["best"]["top1_accuracy"]["job"] == "0"
    assert summary["best"]["size:onnx"]["job"] == "1" and summary["best"]["latency:onnx"]["job"] == "0"

    md = (handmade_sweep / "sweep_summary.md").read_text()
    table = [line for line in md.splitlines() if line.startswith("| ") and not line.startswith("| job")]
    assert len(table) == 5
    assert "boom in finetune" in table[2] and "stages done 2/4" in table[3] and "not started" in table[4]
    assert "`prune.target.flops=0.2`" in table[0] and "`+recipe=cls_prune`" not in table[0]  # shared: said once
    assert "- onnx size: job 1 (0.9000 at 3.00 MB), job 0 (0.9500 at 4.00 MB)" in md
    assert json.loads((handmade_sweep / "sweep_summary.json").read_text())["counts"] == {
        "ok": 2, "failed": 1, "unfinished": 1, "not started": 1}
    assert (handmade_sweep / "sweep_summary.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_job_with_a_missing_result_is_unfinished_not_done(handmade_sweep):
    (handmade_sweep / "1" / "stages" / "4-report" / "result.json").unlink()  # finished snapshot, lost result
    rows = {r["job"]: r for r in summarize(handmade_sweep)["jobs"]}
    assert rows["1"]["status"] == "unfinished" and rows["1"]["error"] == "unfinished: stages done 3/4"
    assert summarize(handmade_sweep)["fronts"]["size:onnx"]["jobs"] == ["0"]  # only finished jobs compete


def test_sweep_stopped_by_a_job_keeps_its_exit_code_in_later_rebuilds(handmade_sweep):
    import shutil

    shutil.rmtree(handmade_sweep / "2" / "stages")
    (handmade_sweep / "2" / "error.log").unlink()
    shutil.rmtree(handmade_sweep / "3")  # the sweep stopped at job 2 with a recipe mistake
    write_summary(handmade_sweep, exit_code=2)
    rebuilt = {r["job"]: r for r in summarize(handmade_sweep)["jobs"]}  # as `sweep-report` does later
    assert rebuilt["2"]["status"] == "failed" and rebuilt["2"]["exit_code"] == 2
    assert "mistake in the recipe" in rebuilt["2"]["error"]
    assert [rebuilt[j]["status"] for j in ("3", "4")] == ["not started", "not started"]


def test_sweep_report_command(handmade_sweep, tmp_path, capsys):
    assert main(["sweep-report", str(handmade_sweep)]) == 0
    assert "| 2 |" in capsys.readouterr().out and (handmade_sweep / "sweep_summary.md").is_file()
    run_like = tmp_path / "run"
    (run_like / ".hydra").mkdir(parents=True)
    assert main(["sweep-report", str(run_like)]) == 2
    err = capsys.readouterr().err
    assert "not a sweep directory" in err and "single run" in err and "Traceback" not in err
    assert main(["sweep-report"]) == 2


def test_sweep_report_does_not_import_paddle(handmade_sweep):
    probe = ("import sys; from slimrecipe.cli import main; rc = main(['sweep-report', sys.argv[1]]); "
             "print('PADDLE' if 'paddle' in sys.modules else 'NOPADDLE'); sys.exit(rc)")
    out = subprocess.run([sys.executable, "-c", probe, str(handmade_sweep)], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert out.stdout.rstrip().endswith("NOPADDLE")


# --------------------------------------------------------------------------- a real sweep

def test_smoke_sweep_writes_the_summary(tmp_path, run_cli):
    sweep = tmp_path / "sweep"
    out = run_cli("-m", *SMOKE, "stages=[evaluate,report]", "seed=1,2", f"hydra.sweep.dir={sweep}", cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "sweep summary (2 jobs: 2 ok)" in out.stdout
    for suffix in ("md", "json", "png"):
        assert (sweep / f"sweep_summary.{suffix}").is_file(), suffix
    summary = json.loads((sweep / "sweep_summary.json").read_text())
    assert [r["overrides"][-1] for r in summary["jobs"]] == ["seed=1", "seed=2"]
    assert all(r["status"] == "ok" and r["metric_name"] == "top1_accuracy" for r in summary["jobs"])
    metrics = [json.loads((sweep / j / "stages" / "1-evaluate" / "result.json").read_text())["metric"]
               for j in ("0", "1")]
    assert [r["metric"] for r in summary["jobs"]] == metrics
    md = (sweep / "sweep_summary.md").read_text()
    assert "| 0 | `seed=1` | ok |" in md and "| 1 | `seed=2` | ok |" in md
