"""Replay a recorded run from its own record, and diff two runs: recipe, inputs, environment, plan, metrics.

Replay re-runs ``recipe.resolved.yaml`` into a new directory, after checking that every input still hashes as
``snapshot.json`` recorded it, then compares the new plan (exactly) and each stage's metrics (within a tolerance)
with the record. Diff reads two run directories only: no Paddle import.
"""

from __future__ import annotations

import datetime as _dt
import json
import math
import sys
from pathlib import Path

from .errors import Problem, RecipeError, StageError, UserError
from .fileio import read_json, sha256_file, write_json

DEFAULT_TOLERANCE = 1e-6
# the figures of a stage result compared by replay and diff; timings are not results
METRIC_KEYS = ("metric", "flops", "params")
REPLAY_RECORD = "replay.json"

REPLAY_USAGE = "usage: slimrecipe replay RUN_DIR [--out NEW_DIR] [--tolerance T]"
DIFF_USAGE = "usage: slimrecipe diff RUN_A RUN_B [--json]"


# --------------------------------------------------------------------------- reading a run

def read_run(run_dir: Path) -> dict:
    """The parts of a run directory that replay and diff compare; a missing part is empty, never an error."""
    from .run import load_run_recipe

    run_dir = Path(run_dir)
    recipe = load_run_recipe(run_dir)  # RecipeError when it is not a run directory
    snap_file = run_dir / "snapshot.json"
    snapshot = _read_json(snap_file) if snap_file.is_file() else {}
    plan_file = run_dir / "plan.json"
    return {"dir": run_dir, "recipe": recipe, "snapshot": snapshot,
            "plan": _read_json(plan_file) if plan_file.is_file() else None,
            "metrics": stage_metrics(run_dir, recipe.get("stages") or [])}


def stage_metrics(run_dir: Path, stages: list[str]) -> dict[str, dict]:
    """``{stage: {metric, flops, params}}`` from each completed stage's result.json, in recipe order."""
    from .run import stage_dirs

    out = {}
    for name, sdir in zip(stages, stage_dirs(run_dir, stages)):
        f = sdir / "result.json"
        if f.is_file():
            result = _read_json(f)
            out[name] = {k: result[k] for k in METRIC_KEYS if k in result}
    return out


def _read_json(path: Path):
    try:
        return read_json(path)
    except (OSError, ValueError) as e:
        raise UserError(f"cannot read {path}: {e}") from None


# --------------------------------------------------------------------------- replay

def check_inputs(run_dir: Path, snapshot: dict) -> list[str]:
    """Refuse (RecipeError naming label and file) when a recorded input is gone or hashes differently now.

    Returns notes on inputs that cannot be checked (recorded without a hash).
    """
    if not snapshot.get("finished") or "inputs" not in snapshot:
        raise UserError(f"{run_dir} holds an unfinished run (snapshot.json records no inputs yet): nothing to "
                        f"compare a replay with; `slimrecipe resume {run_dir}` finishes it")
    problems, notes = [], []
    for label, rec in sorted(snapshot["inputs"].items()):
        if not isinstance(rec, dict) or "path" not in rec:
            continue  # e.g. dataset.manifest: derived by the run itself, compared after the replay
        path = Path(rec["path"])
        if rec.get("sha256") is None:
            notes.append(f"{label}: {path} was recorded without a hash (not a file); not checked")
        elif not path.is_file():
            problems.append(Problem(label, f"input file {path} is gone (recorded sha256 {rec['sha256'][:12]}...)"))
        else:
            now = sha256_file(path)
            if now != rec["sha256"]:
                problems.append(Problem(label, f"input file {path} changed since the run: sha256 now {now[:12]}..., "
                                               f"recorded {rec['sha256'][:12]}..."))
    if problems:
        raise RecipeError([Problem(p.path, f"{p.message}; refusing to replay {run_dir} on other inputs than it "
                                           f"was run on") for p in problems])
    return notes


def default_replay_dir(run_dir: Path) -> Path:
    stamp = _dt.datetime.now().strftime("%Y%m%d-%H%M%S-%f")
    return run_dir.parent / f"{run_dir.name}.replay-{stamp}"


def replay(run_dir: Path, out: Path | None = None, *, tolerance: float = DEFAULT_TOLERANCE, echo=print) -> dict:
    """Re-run a recorded run into ``out`` (new or empty) and compare it with the record.

    Returns ``{"replay_of", "run_dir", "tolerance", "match", "differences": [...]}``, also written to
    ``replay.json`` in the new directory.
    """
    from .config import validate
    from .run import execute

    run_dir = Path(run_dir).resolve()
    recorded = read_run(run_dir)
    notes = check_inputs(run_dir, recorded["snapshot"])
    out = Path(out).resolve() if out else default_replay_dir(run_dir)
    if out == run_dir or run_dir in out.parents or out in run_dir.parents:
        raise UserError(f"--out {out} must lie outside the recorded run {run_dir} (a replay never writes there)")
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise UserError(f"--out {out} already exists and is not empty; a replay only writes into a new directory")
    recipe = validate(recorded["recipe"])
    echo(f"replaying {run_dir}\n       into {out}")
    execute(recipe, out, echo=echo)
    replayed = read_run(out)
    differences = compare_replay(recorded, replayed, tolerance)
    # not a difference of the replay itself, but the likeliest reason for one
    env = _dict_changes(flatten(_environment(recorded["snapshot"])), flatten(_environment(replayed["snapshot"])))
    notes += [f"environment differs from the record: {c['what']} {_fmt(c['a'])} -> {_fmt(c['b'])}" for c in env]
    outcome = {"replay_of": str(run_dir), "run_dir": str(out), "tolerance": tolerance,
               "match": not differences, "differences": differences, "notes": notes}
    write_json(out / REPLAY_RECORD, outcome)
    return outcome


def compare_replay(recorded: dict, replayed: dict, tolerance: float) -> list[str]:
    """What the replay did not reproduce: the plan (exactly), stage metrics (within tolerance), data manifest."""
    out = []
    if recorded["plan"] != replayed["plan"]:
        if recorded["plan"] is None or replayed["plan"] is None:
            out.append(f"plan.json: {'absent' if recorded['plan'] is None else 'present'} in the record, "
                       f"{'absent' if replayed['plan'] is None else 'present'} in the replay")
        else:
            out += [f"plan: {d}" for d in plan_differences(recorded["plan"], replayed["plan"])] or [
                "plan: differs outside the per-parameter channel counts (see plan.json)"]
    for stage in dict.fromkeys([*recorded["metrics"], *replayed["metrics"]]):
        a, b = recorded["metrics"].get(stage), replayed["metrics"].get(stage)
        if a is None or b is None:
            out.append(f"{stage}: {'no result in the record' if a is None else 'no result in the replay'}")
            continue
        for key in dict.fromkeys([*a, *b]):
            if not _close(a.get(key), b.get(key), tolerance):
                out.append(f"{stage}.{key}: recorded {_fmt(a.get(key))}, replayed {_fmt(b.get(key))}")
    ha = ((recorded["snapshot"].get("inputs") or {}).get("dataset.manifest") or {}).get("sha256")
    hb = ((replayed["snapshot"].get("inputs") or {}).get("dataset.manifest") or {}).get("sha256")
    if ha != hb:
        out.append(f"dataset.manifest: sha256 recorded {str(ha)[:12]}..., replayed {str(hb)[:12]}...")
    return out


def _close(a, b, tolerance: float) -> bool:
    """Equal within ``tolerance``: absolute below 1, relative to the larger magnitude above (FLOPs, counts)."""
    if a is None or b is None or isinstance(a, bool) or isinstance(b, bool):
        return a == b
    if not all(isinstance(v, (int, float)) for v in (a, b)):
        return a == b
    if math.isnan(a) or math.isnan(b):
        return math.isnan(a) and math.isnan(b)
    return abs(a - b) <= tolerance * max(1.0, abs(a), abs(b))


def replay_command(args: list[str]) -> int:
    run_dir, out, tolerance = None, None, DEFAULT_TOLERANCE
    it = iter(args)
    for a in it:
        if a in ("--out", "--tolerance"):
            value = next(it, None)
            if value is None:
                raise UserError(f"{a} needs a value\n{REPLAY_USAGE}")
            if a == "--out":
                out = Path(value)
            else:
                try:
                    tolerance = float(value)
                except ValueError:
                    raise UserError(f"--tolerance must be a number, got {value!r}") from None
                if not tolerance >= 0:
                    raise UserError(f"--tolerance must be >= 0, got {value!r}")
        elif a.startswith("-") or run_dir is not None:
            raise UserError(f"unexpected argument {a!r}\n{REPLAY_USAGE}")
        else:
            run_dir = Path(a)
    if run_dir is None:
        raise UserError(REPLAY_USAGE)
    out = out or default_replay_dir(run_dir.resolve())  # known here, so a bug's traceback lands in it
    try:
        outcome = replay(run_dir, out, tolerance=tolerance)
    except (UserError, StageError, KeyboardInterrupt):
        raise
    except Exception:  # noqa: BLE001 -- a bug of ours: keep the traceback in the new run, as a run does
        from .hydra_app import report_bug

        return report_bug(out)
    print(f"\nreplay: {outcome['run_dir']}")
    for note in outcome["notes"]:
        print(f"note: {note}")
    if outcome["match"]:
        replayed = read_run(Path(outcome["run_dir"]))
        measured = [s for s, m in replayed["metrics"].items() if m]
        plan = "identical" if replayed["plan"] is not None else "none in either run"
        print(f"matches the record: plan {plan}; metrics of {', '.join(measured) or 'no stage'} within "
              f"{tolerance:g}; same dataset manifest")
        return 0
    print(f"differs from the record {outcome['replay_of']} (tolerance {tolerance:g}):")
    for d in outcome["differences"]:
        print(f"  - {d}")
    return 1


# --------------------------------------------------------------------------- diff

def diff_runs(a_dir: Path, b_dir: Path) -> dict:
    """Everything that differs between two runs, as lists of ``{"what", "a", "b"}`` per section."""
    a, b = read_run(Path(a_dir)), read_run(Path(b_dir))
    sa, sb = a["snapshot"], b["snapshot"]
    return {"a": str(a_dir), "b": str(b_dir),
            "recipe": _dict_changes(flatten(a["recipe"]), flatten(b["recipe"])),
            "inputs": input_changes(sa.get("inputs") or {}, sb.get("inputs") or {}),
            "environment": _dict_changes(flatten(_environment(sa)), flatten(_environment(sb))),
            "plan": plan_changes(a["plan"], b["plan"]),
            "metrics": [{"what": f"{stage}.{key}", "a": va, "b": vb}
                        for stage, key, va, vb in _metric_pairs(a["metrics"], b["metrics"]) if va != vb]}


def flatten(obj, prefix: str = "") -> dict:
    """Nested dicts as ``{"dotted.path": leaf}``; lists are leaves (a stage list reads best whole)."""
    if isinstance(obj, dict) and obj:
        out = {}
        for k, v in obj.items():
            out.update(flatten(v, f"{prefix}.{k}" if prefix else str(k)))
        return out
    return {prefix: obj} if prefix else {}


def _dict_changes(fa: dict, fb: dict) -> list[dict]:
    missing = "(absent)"
    return [{"what": k, "a": fa.get(k, missing), "b": fb.get(k, missing)}
            for k in sorted(set(fa) | set(fb)) if fa.get(k, missing) != fb.get(k, missing)]


def input_changes(ia: dict, ib: dict) -> list[dict]:
    out = []
    for label in sorted(set(ia) | set(ib)):
        ra, rb = ia.get(label), ib.get(label)
        if rb is None:
            out.append({"what": label, "change": "only in A", "a": (ra or {}).get("sha256"), "b": None})
        elif ra is None:
            out.append({"what": label, "change": "only in B", "a": None, "b": (rb or {}).get("sha256")})
        elif ra.get("sha256") != rb.get("sha256"):
            out.append({"what": label, "change": "hash changed", "a": ra.get("sha256"), "b": rb.get("sha256")})
        elif ra.get("path") != rb.get("path"):
            out.append({"what": label, "change": "same content, other path", "a": ra.get("path"),
                        "b": rb.get("path")})
    return out


def _environment(snapshot: dict) -> dict:
    """What a run's results may depend on besides the recipe: interpreter, platform, packages, recipe commits."""
    dirs = {d.get("path"): (d.get("git") or {}).get("commit") for d in snapshot.get("recipe_dirs") or []}
    return {"env": snapshot.get("env") or {}, "plugins": snapshot.get("plugins") or {},
            "recipe_dirs": {p: c for p, c in dirs.items() if c}}


def plan_changes(pa: dict | None, pb: dict | None) -> list[dict]:
    """Per parameter: channels before -> after pruning (then which channels and the rule, when only those
    changed); the plan's own settings."""
    if pa is None and pb is None:
        return []
    if pa is None or pb is None:
        return [{"what": "plan.json", "a": "absent" if pa is None else "present",
                 "b": "absent" if pb is None else "present"}]
    out = [{"what": f"plan {k}", "a": pa.get(k), "b": pb.get(k)}
           for k in ("criterion", "align", "min_channels", "input_shape") if pa.get(k) != pb.get(k)]
    qa, qb = pa.get("params") or {}, pb.get("params") or {}
    for name in dict.fromkeys([*qa, *qb]):
        ea, eb = qa.get(name), qb.get(name)
        if ea is None or eb is None or _channels(ea) != _channels(eb):
            out.append({"what": name, "a": _channels(ea), "b": _channels(eb)})
            continue
        for key in ("removed", "rule"):  # same counts, other filters chosen or another rule behind them
            if ea.get(key) != eb.get(key):
                out.append({"what": f"{name} {key}", "a": ea.get(key), "b": eb.get(key)})
    return out


def plan_differences(pa: dict, pb: dict) -> list[str]:
    return [f"{c['what']}: {_fmt(c['a'])} -> {_fmt(c['b'])}" for c in plan_changes(pa, pb)]


def _channels(entry: dict | None) -> str:
    if not entry:
        return "(absent)"
    return f"{entry.get('channels_before')}->{entry.get('channels_after')} channels"


def _metric_pairs(ma: dict, mb: dict):
    for stage in dict.fromkeys([*ma, *mb]):
        a, b = ma.get(stage), mb.get(stage)
        if a is None or b is None:
            yield stage, "result", "(done)" if a else "(not run)", "(done)" if b else "(not run)"
            continue
        for key in dict.fromkeys([*a, *b]):
            yield stage, key, a.get(key), b.get(key)


SECTIONS = (("recipe", "recipe keys"), ("inputs", "inputs"), ("environment", "environment"),
            ("plan", "plan (channels after pruning)"), ("metrics", "metrics per stage"))


def render_diff(d: dict) -> str:
    lines = [f"A: {d['a']}", f"B: {d['b']}"]
    for key, title in SECTIONS:
        items = d[key]
        lines.append("")
        if not items:
            lines.append(f"{title}: same")
            continue
        lines.append(f"{title}: {len(items)} difference{'s' if len(items) != 1 else ''}")
        for c in items:
            if key == "inputs":
                detail = {"hash changed": f"hash changed {_short(c['a'])} -> {_short(c['b'])}",
                          "same content, other path": f"same content, path {c['a']} -> {c['b']}"}.get(
                              c["change"], c["change"])
                lines.append(f"  {c['what']}: {detail}")
            else:
                lines.append(f"  {c['what']}: {_fmt(c['a'])} -> {_fmt(c['b'])}")
    return "\n".join(lines) + "\n"


def diff_command(args: list[str]) -> int:
    as_json = "--json" in args
    dirs = [a for a in args if a != "--json"]
    if len(dirs) != 2 or any(a.startswith("-") for a in dirs):
        raise UserError(DIFF_USAGE)
    d = diff_runs(Path(dirs[0]), Path(dirs[1]))
    if as_json:
        json.dump(d, sys.stdout, indent=2, default=str)
        print()
    else:
        print(render_diff(d), end="")
    return 0


def _short(h) -> str:
    return "-" if not h else f"{h[:12]}..."


def _fmt(v) -> str:
    """A value as a recipe would spell it: 0.975, true, null, [train, evaluate] as JSON."""
    if isinstance(v, float):
        return f"{v:.6g}"
    if isinstance(v, str):
        return v
    return json.dumps(v, default=str)
