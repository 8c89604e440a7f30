"""Command line: `slimrecipe [hydra overrides]` runs a recipe; `validate`, `recipes`, `resume`, `schema`."""

from __future__ import annotations

import sys
import time
from pathlib import Path

from .errors import RecipeError, StageError, UserError

USAGE = """\
usage: slimrecipe +recipe=NAME [key=value ...]       run a recipe (Hydra overrides; -m for a sweep)
       slimrecipe validate +recipe=NAME [key=value ...]  check a recipe only (schema, files, plugin names)
       slimrecipe recipes                            list the recipes and where each comes from
       slimrecipe resume RUN_DIR                     finish an interrupted run with its own recipe
       slimrecipe schema                             print the assembled JSON Schema of a recipe
       slimrecipe sweep-report SWEEP_DIR             (re)write sweep_summary.md/.json/.png of a sweep (-m)
       slimrecipe replay RUN_DIR [--out NEW_DIR] [--tolerance T]
                                                     re-run a recorded run into a new directory (inputs must
                                                     still hash as recorded); exit 1 when plan or metrics differ
       slimrecipe diff RUN_A RUN_B [--json]          what differs: recipe keys, inputs, environment, plan, metrics
       slimrecipe sensitivity-merge PART... --out FILE
                                                     one sensitivity table from the runs of a sharded analysis
                                                     (sensitivity.shard=i/n; PART: a run dir or its sensitivity.json)

Team recipe directories: SLIMRECIPE_RECIPE_PATH=dir1:dir2 (each holds recipe/, model/, ... groups); installed
  recipe packs (entry point group `slimrecipe.recipes`) join too: built-in first, then packs, then those dirs.
Parallel sweeps: -m ... hydra/launcher=joblib (or local_parallel, submitit_local, slurm, ray_local; see README).
Exit codes: 0 done, 1 a stage failed, 2 a mistake in the recipe or an input, 3 a bug in slimrecipe (traceback
  in the run's error.log), 130 interrupted (resume it).
Hydra's own help: slimrecipe --hydra-help
"""


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        if not argv or argv[0] in ("-h", "--help", "help"):
            print(USAGE, end="")
            return 0
        command = argv[0]
        if command == "validate":
            return _validate(argv[1:])
        if command == "recipes":
            return _recipes()
        if command == "schema":
            import json

            from .config import assembled_schema

            print(json.dumps(assembled_schema(), indent=2))
            return 0
        if command == "resume":
            return _resume(argv[1:])
        if command == "sweep-report":
            return _sweep_report(argv[1:])
        if command == "replay":
            from .replay import replay_command

            return replay_command(argv[1:])
        if command == "diff":
            from .replay import diff_command

            return diff_command(argv[1:])
        if command == "sensitivity-merge":
            from .stages.sensitivity import merge_command

            return merge_command(argv[1:])
        return _run_hydra(argv)
    except UserError as e:
        print(e.render(), file=sys.stderr)
        return 2
    except StageError as e:
        print(f"stage failed: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("\ninterrupted: run `slimrecipe resume <run dir>` to continue where it stopped", file=sys.stderr)
        return 130


def _validate(overrides: list[str]) -> int:
    from .config import load_and_validate

    recipe = load_and_validate(overrides)
    print(f"recipe {recipe['name']!r} is valid: stages {' -> '.join(recipe['stages'])}")
    warn_environment(recipe)
    return 0


def warn_environment(recipe: dict) -> None:
    """Warn (never fail) where this environment differs from what the recipe says it was validated on."""
    from .config import environment_warnings

    for w in environment_warnings(recipe):
        print(f"warning: {w}", file=sys.stderr)


def _recipes() -> int:
    from .config import list_recipes, recipe_sources

    rows = list_recipes()
    print("recipe search path (when two define the same name, the first wins):")
    for i, src in enumerate(recipe_sources(), 1):
        where = "" if src.kind == "path" else f"  {src.path}"
        print(f"  {i}. {src.label}{where}")
    if not rows:
        print("no recipes found")
        return 0
    print()
    width = max(len(r["name"]) for r in rows)
    for r in rows:
        notes = []
        if r["shadowed_by"]:
            notes.append(f"shadowed by {r['shadowed_by']}")
        if r["shadows"]:
            notes.append(f"shadows {', '.join(r['shadows'])}")
        if isinstance(r["validated_on"], dict) and r["validated_on"].get("paddle"):
            notes.append(f"validated on paddle {r['validated_on']['paddle']}")
        note = f"  ({'; '.join(notes)})" if notes else ""
        about = f"BROKEN: {r['error']}" if r["error"] else r["description"][:70]
        print(f"{r['name']:<{width}}  {about:<70}  {r['origin']}{note}")
    broken = [r for r in rows if r["error"]]
    if broken:
        print(f"{len(broken)} recipe file(s) or pack(s) are broken; fix them before use", file=sys.stderr)
        return 2
    return 0


def _resume(args: list[str]) -> int:
    if len(args) != 1:
        raise RecipeError("usage: slimrecipe resume RUN_DIR")
    from .config import validate
    from .run import execute, load_run_recipe

    run_dir = Path(args[0])
    recipe = validate(load_run_recipe(run_dir))
    try:
        state = execute(recipe, run_dir)
    except (UserError, StageError, KeyboardInterrupt):
        raise
    except Exception:  # noqa: BLE001 -- a bug of ours: keep the traceback in the run
        from .hydra_app import report_bug

        return report_bug(run_dir)
    _print_outcome(state)
    return 0


def _run_hydra(argv: list[str]) -> int:
    """Hand over to Hydra (run dirs, sweeps, `.hydra/`); a single run is validated before Hydra starts."""
    from .config import expand_profiles, load_and_validate, searchpath_override

    if argv and argv[0] == "--hydra-help":
        argv = ["--help"]
    multirun = any(a in ("-m", "--multirun") for a in argv)
    hydra_flags = any(a.startswith("-") for a in argv)
    if not multirun and not hydra_flags:
        load_and_validate(argv)  # exit 2 with every problem listed, before any directory is made
    # the callback tells us the sweep directory, wherever the launcher runs the jobs
    recorder = [f"++hydra.callbacks.slimrecipe_sweep._target_={SWEEP_RECORDER}"] if multirun else []
    sys.argv = [sys.argv[0] or "slimrecipe", *_with_overrides(expand_profiles(argv),
                                                              [*searchpath_override(), *recorder])]
    from .hydra_app import LAST_SWEEP, hydra_entry

    LAST_SWEEP.clear()
    status = {"code": 0}
    started = time.time()
    try:
        hydra_entry(status)
    finally:
        if multirun:  # also after a job stopped the sweep: its row and the not-started ones say so
            summary = _write_sweep_summary(argv, started, status["code"], LAST_SWEEP.get("dir"))
            if status["code"] == 0 and summary is not None:
                # jobs that a launcher ran in other processes recorded their exit codes in their directories
                status["code"] = next((r["exit_code"] for r in summary["jobs"] if r["exit_code"]), 0)
    return status["code"]


SWEEP_RECORDER = "slimrecipe.hydra_app.SweepRecorder"


def _with_overrides(argv: list[str], extra: list[str]) -> list[str]:
    """``argv`` with our own overrides placed next to the user's: Hydra's argument parser takes the overrides as
    one run of positional arguments, so one placed after a flag (`--cfg hydra`) would be refused."""
    first = next((i for i, a in enumerate(argv) if not a.startswith("-") and ("=" in a or a.startswith("~"))),
                 len(argv))
    return [*argv[:first], *extra, *argv[first:]]


def _write_sweep_summary(argv: list[str], started: float, exit_code: int, recorded=None) -> dict | None:
    """The sweep summary after a multirun; a failure here never changes the sweep's own exit code."""
    sweep_dir = None
    try:
        from .sweeps import find_sweep_dir, short_text, write_summary

        sweep_dir = find_sweep_dir(argv, started, recorded)
        if sweep_dir is not None:  # None: no sweep happened (--help, --cfg, a composition error)
            summary = write_summary(sweep_dir, exit_code=exit_code)
            print(short_text(summary))
            return summary
    except Exception as e:  # noqa: BLE001 -- the jobs' results are on disk; the summary can be rebuilt
        print(f"could not write the sweep summary ({type(e).__name__}: {e}); "
              f"`slimrecipe sweep-report {sweep_dir or 'SWEEP_DIR'}` rebuilds it", file=sys.stderr)
    return None


def _sweep_report(args: list[str]) -> int:
    if len(args) != 1 or args[0].startswith("-"):
        raise UserError("usage: slimrecipe sweep-report SWEEP_DIR")
    from .sweeps import render_markdown, write_summary

    print(render_markdown(write_summary(Path(args[0]))), end="")
    return 0


def _print_outcome(state) -> None:
    report = state.run_dir / "report.md"
    print(f"\nrun directory: {state.run_dir}")
    if report.exists():
        summary = state.results.get("report", {}).get("summary_table")
        if summary:
            print(summary)
        print(f"report: {report}")


def entry() -> None:
    sys.exit(main())


if __name__ == "__main__":
    entry()
