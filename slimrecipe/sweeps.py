"""Sweep summary: one row per job of a Hydra multirun, the Pareto fronts of metric against cost, the best jobs.

Everything is read from what the jobs left on disk (``.hydra/overrides.yaml``, ``stages/*/result.json``,
``report.json``, ``snapshot.json``, ``error.log``), so a summary can be rebuilt at any time, also for a sweep that
is still running or was interrupted. A job that failed, is unfinished or never started keeps its row.
No Paddle import here.
"""

from __future__ import annotations

import datetime as _dt
import math
from pathlib import Path

from .errors import UserError
from .fileio import atomic_write, read_json, write_json, write_text
from .hydra_app import BUG_EXIT_CODE, ERROR_LOG, EXIT_RECORD
from .run import stage_dirs
from .stages.report import PHASES, _si

SUMMARY_STEM = "sweep_summary"
MULTIRUN_FILE = "multirun.yaml"
# cost axes that are always available, after the per-export ones
MODEL_COSTS = (("flops", "FLOPs"), ("params", "parameters"))


# --------------------------------------------------------------------------- finding the jobs

def job_dirs(sweep_dir: Path) -> list[Path]:
    """Every job directory under a sweep directory: the ones holding Hydra's ``.hydra/overrides.yaml``."""
    sweep_dir = Path(sweep_dir)
    found = [p.parent.parent for p in sweep_dir.rglob("overrides.yaml")
             if p.parent.name == ".hydra" and p.parent.parent != sweep_dir]
    return sorted(set(found), key=lambda d: _job_sort_key(d, sweep_dir))


def _job_sort_key(d: Path, root: Path):
    rel = d.relative_to(root).as_posix()
    return (0, int(rel), "") if rel.isdigit() else (1, 0, rel)


def check_sweep_dir(sweep_dir: Path) -> Path:
    sweep_dir = Path(sweep_dir)
    if not sweep_dir.is_dir():
        raise UserError(f"{sweep_dir} is not a directory")
    if not (sweep_dir / MULTIRUN_FILE).is_file() and not job_dirs(sweep_dir):
        hint = " (it is a single run's directory)" if (sweep_dir / ".hydra").is_dir() else ""
        raise UserError(f"{sweep_dir} is not a sweep directory: no {MULTIRUN_FILE} and no job directories with "
                        f".hydra/overrides.yaml{hint}; give the directory of a `slimrecipe -m ...` sweep")
    return sweep_dir


def find_sweep_dir(argv: list[str], since: float, recorded: Path | None = None) -> Path | None:
    """The directory of the sweep that the command ``argv`` just ran (started at ``since``); None if none ran.

    Hydra keeps no handle on it after the sweep, so: the directory ``recorded`` by our Hydra callback when the
    sweep started, the ``hydra.sweep.dir=`` override when given, else the sweep above the log file Hydra's job
    logging left open on the root logger (the last job's directory, when jobs ran in this process).
    A candidate counts only when its ``multirun.yaml`` was written by this sweep.
    """
    import logging

    candidates = [Path(recorded)] if recorded else []
    candidates += [Path(a.split("=", 1)[1]) for a in argv
                   if a.lstrip("+").startswith("hydra.sweep.dir=") and "${" not in a]
    for handler in logging.getLogger().handlers:
        log_file = getattr(handler, "baseFilename", None)
        if log_file:
            candidates += [p for p in Path(log_file).parents if (p / MULTIRUN_FILE).is_file()][:1]
    for d in candidates:
        f = d / MULTIRUN_FILE
        if f.is_file() and f.stat().st_mtime >= since - 1:
            return d
    return None


def expected_jobs(sweep_dir: Path) -> list[list[str]] | None:
    """The override list of every job the sweep was asked for, in job-number order; None when unknown.

    Recomputed from ``multirun.yaml`` the way Hydra's basic sweeper expands it, so jobs that never started
    (a sweep stopped by a failing job, or interrupted) still get their row.
    """
    import yaml

    f = Path(sweep_dir) / MULTIRUN_FILE
    try:
        hydra_cfg = (yaml.safe_load(f.read_text(encoding="utf-8")) or {}).get("hydra") or {}
        sweeper = hydra_cfg.get("sweeper") or {}
        if not str(sweeper.get("_target_", "")).endswith("BasicSweeper"):
            return None
        from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
        from hydra.core.override_parser.overrides_parser import OverridesParser

        args = [f"{k}={v}" for k, v in (sweeper.get("params") or {}).items()]
        args += list((hydra_cfg.get("overrides") or {}).get("task") or [])
        parsed = OverridesParser.create().parse_overrides(args)
        return [job for batch in BasicSweeper.split_arguments(parsed, None) for job in batch]
    except Exception:  # noqa: BLE001 -- an unreadable or unusual multirun.yaml only costs the not-started rows
        return None


# --------------------------------------------------------------------------- one job

def job_row(job_dir: Path, sweep_dir: Path) -> dict:
    """What one job delivered (or how far it got) as a flat-ish dict; never raises on a damaged job."""
    import yaml

    job_dir = Path(job_dir)
    row = _empty_row(job_dir.relative_to(sweep_dir).as_posix(), str(job_dir))
    try:
        row["overrides"] = [str(o) for o in yaml.safe_load((job_dir / ".hydra" / "overrides.yaml").read_text(
            encoding="utf-8")) or []]
    except (OSError, yaml.YAMLError):
        pass
    stages = _job_stages(job_dir)
    results = {}
    for name, sdir in zip(stages or [], stage_dirs(job_dir, stages or [])):
        r = _read_json_or_none(sdir / "result.json")
        if isinstance(r, dict):
            results[name] = r
    row["stages_total"] = len(stages) if stages is not None else None
    row["stages_done"] = len(results)
    if results:
        row["seconds"] = round(sum(float(r.get("seconds") or 0) for r in results.values()), 2)
    _fill_figures(row, job_dir, results)

    snapshot = _read_json_or_none(job_dir / "snapshot.json") or {}
    error_log = job_dir / ERROR_LOG
    exit_record = _read_json_or_none(job_dir / EXIT_RECORD)
    if isinstance(exit_record, dict) and exit_record.get("exit_code") and not snapshot.get("finished"):
        # written by the job itself, also when a launcher ran it in another process (a run resumed to its end
        # since then has a finished snapshot)
        code = int(exit_record["exit_code"])
        message = " ".join(str(exit_record.get("error") or EXIT_REASONS.get(code, "failed")).split())[:300]
        if error_log.is_file() and code == BUG_EXIT_CODE:
            message = f"{_last_line(error_log)} (see {error_log})"
        row.update(status="interrupted" if code == 130 else "failed", exit_code=code,
                   error=f"{EXIT_REASONS.get(code, 'failed')} (exit {code}): {message}")
    elif error_log.is_file():
        row.update(status="failed", exit_code=BUG_EXIT_CODE, error=f"{_last_line(error_log)} (see {error_log})")
    elif stages is not None and snapshot.get("finished") and (
            row["stages_done"] == len(stages) or any(r.get("end_run") for r in results.values())):  # ended early
        row.update(status="ok", exit_code=0)
    elif stages is None:
        row["error"] = ("unfinished: the run never began (no recipe.resolved.yaml); a recipe error or the "
                        "sweep stopping would leave this")
    else:
        row["error"] = f"unfinished: stages done {row['stages_done']}/{len(stages)}"
    return row


def _empty_row(job: str, directory: str | None) -> dict:
    return {"job": job, "dir": directory, "overrides": [], "status": "unfinished", "exit_code": None,
            "error": None, "stages_done": 0, "stages_total": None, "metric_name": None, "phase": None,
            "metric": None, "flops": None, "params": None, "exports": {}, "seconds": None}


# what the command's exit codes mean (cli.USAGE)
EXIT_REASONS = {1: "a stage failed", 2: "a mistake in the recipe or an input", 3: "a bug in slimrecipe",
                130: "interrupted"}


def _stopped_by(sweep_dir: Path, rows: list[dict], exit_code: int | None) -> dict | None:
    """Which job stopped the sweep with which exit code: given now, or kept in an earlier summary."""
    if exit_code is None:
        earlier = _read_json_or_none(sweep_dir / f"{SUMMARY_STEM}.json")
        stopped = earlier.get("stopped") if isinstance(earlier, dict) else None
        ok = isinstance(stopped, dict) and any(r["job"] == stopped.get("job") and r["status"] != "ok" for r in rows)
        return stopped if ok else None
    if exit_code == 0 or not rows:
        return None
    last = rows[-1]  # jobs run one after the other: the newest directory is the one that stopped the sweep
    if last["status"] == "ok":
        return None
    return {"job": last["job"], "exit_code": exit_code, "reason": EXIT_REASONS.get(exit_code, "failed")}


def _job_stages(job_dir: Path) -> list[str] | None:
    """The job's stage list: from its resolved recipe, else from Hydra's composed config; None when neither."""
    import yaml

    for f in (job_dir / "recipe.resolved.yaml", job_dir / ".hydra" / "config.yaml"):
        try:
            stages = (yaml.safe_load(f.read_text(encoding="utf-8")) or {}).get("stages")
        except (OSError, yaml.YAMLError, AttributeError):
            continue
        if isinstance(stages, list) and all(isinstance(s, str) for s in stages):
            return stages
    return None


def _fill_figures(row: dict, job_dir: Path, results: dict) -> None:
    """Delivered metric, FLOPs, parameters (the last phase) and per-export size and latency."""
    report = _read_json_or_none(job_dir / "report.json")
    phases = report.get("phases") if isinstance(report, dict) else None
    if phases:
        last = phases[-1]
        row.update(phase=last.get("phase"), metric=last.get("metric"), flops=last.get("flops"),
                   params=last.get("params"), metric_name=report.get("metric_name"))
    else:
        for stage, label in PHASES:
            figures = (results.get(stage) or {})
            figures = figures.get("after", figures)
            if "metric" in figures:
                row.update(phase=label, metric=figures["metric"], flops=figures.get("flops"),
                           params=figures.get("params"))
        row["metric_name"] = next((r["metric_name"] for r in results.values() if r.get("metric_name")), None)
    exports = (report or {}).get("exports") if isinstance(report, dict) else None
    if not exports:
        exports = (results.get("export") or {}).get("targets") or {}
    for target, e in exports.items():
        c = (e or {}).get("compressed") or {}
        row["exports"][target] = {"size_bytes": c.get("size_bytes"),
                                  "latency_ms": (c.get("latency") or {}).get("median_ms")}


def _read_json_or_none(path: Path):
    try:
        return read_json(path)
    except (OSError, ValueError):
        return None


def _last_line(path: Path) -> str:
    try:
        lines = [ln.strip() for ln in path.read_text(encoding="utf-8", errors="replace").splitlines() if ln.strip()]
    except OSError:
        return "error.log unreadable"
    return lines[-1][:300] if lines else "empty error.log"


# --------------------------------------------------------------------------- Pareto fronts

def pareto_front(points: list[tuple], *, higher_is_better: bool = True) -> list:
    """The ids of the non-dominated points of ``[(id, metric, cost), ...]``, cheapest first.

    A point is dominated when another one is at least as good on both (metric and cost) and better on one.
    Points with a missing or non-finite value take no part. Equal points do not dominate each other.
    """
    sign = 1 if higher_is_better else -1
    pts = [(i, sign * float(m), float(c)) for i, m, c in points
           if m is not None and c is not None and math.isfinite(float(m)) and math.isfinite(float(c))]
    front = [p for p in pts
             if not any(q[1] >= p[1] and q[2] <= p[2] and (q[1] > p[1] or q[2] < p[2]) for q in pts)]
    return [p[0] for p in sorted(front, key=lambda p: (p[2], -p[1]))]


def cost_axes(rows: list[dict]) -> list[dict]:
    """Cost axes present in the jobs: latency and size of every export target, then FLOPs and parameters."""
    targets = sorted({t for r in rows for t in r["exports"]})
    axes = []
    for t in targets:
        axes.append({"key": f"latency:{t}", "name": f"{t} latency", "label": f"{t} latency (ms)",
                     "get": ("exports", t, "latency_ms")})
        axes.append({"key": f"size:{t}", "name": f"{t} size", "label": f"{t} size (MB)",
                     "get": ("exports", t, "size_bytes"), "scale": 1 / 2**20})
    axes += [{"key": k, "name": name, "label": name, "get": (k,)} for k, name in MODEL_COSTS]
    return axes


def _cost(row: dict, axis: dict):
    v = row
    for part in axis["get"]:
        v = v.get(part) if isinstance(v, dict) else None
    return v


# --------------------------------------------------------------------------- the summary

def summarize(sweep_dir: Path, *, exit_code: int | None = None) -> dict:
    """The sweep summary as a dict (what ``sweep_summary.json`` holds).

    ``exit_code``: how the sweep command ended, when known (right after the sweep). A non-zero code stopped
    the sweep at its last started job; the job's row keeps that code, also in later rebuilds.
    """
    sweep_dir = check_sweep_dir(sweep_dir)
    rows = [job_row(d, sweep_dir) for d in job_dirs(sweep_dir)]
    stopped = _stopped_by(sweep_dir, rows, exit_code)
    if stopped:
        row = next(r for r in rows if r["job"] == stopped["job"])
        if row["status"] != "failed":
            progress = (row["error"] or "").removeprefix("unfinished: ")
            row.update(status="interrupted" if stopped["exit_code"] == 130 else "failed",
                       error=f"{stopped['reason']} (exit {stopped['exit_code']}; the sweep stopped here; {progress})")
        elif "the sweep stopped here" not in (row["error"] or ""):
            row["error"] = f"{row['error']}; the sweep stopped here"
        row["exit_code"] = stopped["exit_code"]
    expected = expected_jobs(sweep_dir)
    if expected is not None and all(r["job"].isdigit() for r in rows):
        # the default subdir is the job number; with another subdir pattern not-started jobs cannot be placed
        seen = {r["job"] for r in rows}
        for num, overrides in enumerate(expected):
            if str(num) not in seen:
                rows.append({**_empty_row(str(num), None), "overrides": overrides, "status": "not started",
                             "error": "not started: the sweep stopped before this job"})
        rows.sort(key=lambda r: int(r["job"]))
    higher_is_better = True  # every built-in metric is; a run's results do not record the direction yet
    done = [r for r in rows if r["status"] == "ok" and r["metric"] is not None]
    fronts, best = {}, {}
    metric_name = next((r["metric_name"] for r in rows if r["metric_name"]), "metric")
    if done:
        top = max(done, key=lambda r: (r["metric"] if higher_is_better else -r["metric"]))
        best[metric_name] = {"job": top["job"], "value": top["metric"],
                             "objective": f"{'highest' if higher_is_better else 'lowest'} {metric_name}"}
    for axis in cost_axes(rows):
        pts = [(r["job"], r["metric"], _cost(r, axis)) for r in done]
        front = pareto_front(pts, higher_is_better=higher_is_better)
        if not front:
            continue
        fronts[axis["key"]] = {"label": axis["name"], "jobs": front}
        cheapest = min((p for p in pts if p[2] is not None), key=lambda p: p[2])
        # ties on cost go to the better metric: the cheapest job is always on the front
        best[axis["key"]] = {"job": front[0], "value": cheapest[2], "objective": f"lowest {axis['name']}"}
    counts = {}
    for r in rows:
        counts[r["status"]] = counts.get(r["status"], 0) + 1
    return {"sweep_dir": str(sweep_dir),
            "generated": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            "metric_name": metric_name, "higher_is_better": higher_is_better,
            "jobs_expected": len(expected) if expected is not None else None, "counts": counts, "stopped": stopped,
            "common_overrides": _common_overrides(rows), "jobs": rows, "fronts": fronts, "best": best}


def _common_overrides(rows: list[dict]) -> list[str]:
    lists = [r["overrides"] for r in rows if r["overrides"]]
    if not lists:
        return []
    return [o for o in lists[0] if all(o in other for other in lists[1:])]


def render_markdown(summary: dict) -> str:
    m = summary["metric_name"]
    rows = summary["jobs"]
    common = set(summary["common_overrides"]) if len(rows) > 1 else set()
    targets = sorted({t for r in rows for t in r["exports"]})
    counts = ", ".join(f"{n} {s}" for s, n in summary["counts"].items())
    expected = summary["jobs_expected"]
    lines = [f"# Sweep summary: `{summary['sweep_dir']}`", "",
             f"{len(rows)} job(s){f' of {expected} asked for' if expected is not None else ''}: {counts}. "
             f"Metric: {m} ({'higher' if summary['higher_is_better'] else 'lower'} is better), from the last "
             f"phase each job reached. Generated {summary['generated']}.", ""]
    if common:
        lines += ["Overrides shared by every job: " + " ".join(f"`{o}`" for o in summary["common_overrides"]), ""]
    head = ["job", "overrides", "status", m, "phase", "FLOPs", "params"]
    for t in targets:
        head += [f"{t} size", f"{t} latency (ms)"]
    head += ["wall (s)"]
    lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        own = [o for o in r["overrides"] if o not in common] or (r["overrides"] if not common else [])
        cells = [r["job"], " ".join(f"`{o}`" for o in own) or "-",
                 _md_escape(_status_text(r)),
                 _num(r["metric"], 4), r["phase"] or "-", _si(r["flops"]), _si(r["params"])]
        for t in targets:
            e = r["exports"].get(t) or {}
            cells += [_size(e.get("size_bytes")), _ms(e.get("latency_ms"))]
        cells.append(_num(r["seconds"], 1))
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", f"## Pareto fronts ({m} against each cost; non-dominated finished jobs, cheapest first)", ""]
    if not summary["fronts"]:
        lines.append("No finished job with a metric yet.")
    by_job = {r["job"]: r for r in rows}
    for key, front in summary["fronts"].items():
        axis = next(a for a in cost_axes(rows) if a["key"] == key)
        items = []
        for j in front["jobs"]:
            c = _cost(by_job[j], axis)
            items.append(f"job {j} ({_num(by_job[j]['metric'], 4)} at {_axis_value(c, axis)})")
        lines.append(f"- {front['label']}: " + ", ".join(items))
    lines += ["", "## Best job per objective", ""]
    if not summary["best"]:
        lines.append("None yet.")
    for key, b in summary["best"].items():
        axis = next((a for a in cost_axes(rows) if a["key"] == key), None)
        value = _axis_value(b["value"], axis) if axis else _num(b["value"], 4)
        lines.append(f"- {b['objective']}: job {b['job']} ({value})")
    lines += ["", f"Picture: `{SUMMARY_STEM}.png`. Rebuild with `slimrecipe sweep-report {summary['sweep_dir']}`."]
    return "\n".join(lines) + "\n"


def plot(summary: dict, path: Path) -> None:
    """One panel per cost axis: every finished job as a dot, the front as a line, jobs labelled."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import EngFormatter

    rows = summary["jobs"]
    done = [r for r in rows if r["status"] == "ok" and r["metric"] is not None]
    axes_spec = [a for a in cost_axes(rows) if a["key"] in summary["fronts"]]
    n = max(1, len(axes_spec))
    cols = min(n, 3)
    nrows = math.ceil(n / cols)
    fig, axes = plt.subplots(nrows, cols, figsize=(4.2 * cols, 3.4 * nrows), squeeze=False)
    flat = [ax for line in axes for ax in line]
    if not axes_spec:
        flat[0].text(0.5, 0.5, "no finished job with a metric yet", ha="center", va="center")
        flat[0].set_axis_off()
    by_job = {r["job"]: r for r in rows}
    for ax, axis in zip(flat, axes_spec):
        scale = axis.get("scale", 1)
        pts = [(r["job"], _cost(r, axis), r["metric"]) for r in done if _cost(r, axis) is not None]
        ax.scatter([c * scale for _, c, _ in pts], [m for _, _, m in pts], color="#999", s=18, zorder=2)
        front = summary["fronts"][axis["key"]]["jobs"]
        fx = [_cost(by_job[j], axis) * scale for j in front]
        fy = [by_job[j]["metric"] for j in front]
        ax.plot(fx, fy, "-o", color="#c33", ms=5, zorder=3, label="Pareto front")
        for j, c, m in pts:
            ax.annotate(j, (c * scale, m), fontsize=7, xytext=(3, 3), textcoords="offset points")
        if axis["key"] in dict(MODEL_COSTS):
            ax.xaxis.set_major_formatter(EngFormatter())  # 350k, not 350000 running into its neighbour
        ax.tick_params(labelsize=8)
        ax.set_xlabel(axis["label"])
        ax.set_ylabel(summary["metric_name"])
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    for ax in flat[len(axes_spec):] if axes_spec else flat[1:]:
        ax.set_axis_off()
    fig.suptitle(f"{Path(summary['sweep_dir']).name}: {summary['metric_name']} against cost", fontsize=10)
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=100))
    plt.close(fig)


def write_summary(sweep_dir: Path, *, exit_code: int | None = None) -> dict:
    """Write sweep_summary.md, .json and .png in the sweep directory; returns the summary."""
    summary = summarize(sweep_dir, exit_code=exit_code)
    root = Path(summary["sweep_dir"])
    write_json(root / f"{SUMMARY_STEM}.json", summary)
    write_text(root / f"{SUMMARY_STEM}.md", render_markdown(summary))
    plot(summary, root / f"{SUMMARY_STEM}.png")
    return summary


def short_text(summary: dict) -> str:
    """The few lines printed after a sweep."""
    root = Path(summary["sweep_dir"])
    counts = ", ".join(f"{n} {s}" for s, n in summary["counts"].items())
    out = [f"sweep summary ({len(summary['jobs'])} jobs: {counts}): {root / (SUMMARY_STEM + '.md')}"]
    for r in summary["jobs"]:
        if r["status"] in ("failed", "interrupted"):
            out.append(f"  job {r['job']} {r['status']}: {r['error']}")
    for b in summary["best"].values():
        out.append(f"  {b['objective']}: job {b['job']}")
    return "\n".join(out)


# --------------------------------------------------------------------------- formatting

def _axis_value(v, axis) -> str:
    if v is None:
        return "-"
    if axis and axis["key"].startswith("size:"):
        return _size(v)
    if axis and axis["key"].startswith("latency:"):
        return f"{_ms(v)} ms"
    return _si(v)


def _size(b) -> str:
    if b is None:
        return "-"
    return f"{b / 2**20:.2f} MB" if b >= 2**20 else f"{b / 2**10:.1f} kB"


def _ms(v) -> str:
    return "-" if v is None else f"{v:.3g}"


def _status_text(row: dict) -> str:
    err = row["error"] or ""
    if row["status"] == "ok" or not err:
        return row["status"]
    return err if err.startswith(row["status"]) else f"{row['status']}: {err}"


def _md_escape(s: str) -> str:
    return s.replace("|", "\\|").replace("\n", " ")


def _num(v, digits: int) -> str:
    return "-" if v is None else f"{v:.{digits}f}"
