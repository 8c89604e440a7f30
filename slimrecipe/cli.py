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

Team recipe directories: SLIMRECIPE_RECIPE_PATH=dir1:dir2 (each holds recipe/, model/, ... groups).
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
    return 0


def _recipes() -> int:
    from .config import list_recipes

    rows = list_recipes()
    if not rows:
        print("no recipes found")
        return 0
    width = max(len(r["name"]) for r in rows)
    for r in rows:
        note = f"  (shadowed by {r['shadowed_by']})" if r["shadowed_by"] else ""
        about = f"BROKEN: {r['error']}" if r["error"] else r["description"][:70]
        print(f"{r['name']:<{width}}  {about:<70}  {r['source']}{note}")
    broken = [r for r in rows if r["error"]]
    if broken:
        print(f"{len(broken)} recipe file(s) do not parse; fix them before use", file=sys.stderr)
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
    sys.argv = [sys.argv[0] or "slimrecipe", *expand_profiles(argv), *searchpath_override()]
    from .hydra_app import hydra_entry

    status = {"code": 0}
    started = time.time()
    try:
        hydra_entry(status)
    finally:
        if multirun:  # also after a job stopped the sweep: its row and the not-started ones say so
            _write_sweep_summary(argv, started, status["code"])
    return status["code"]


def _write_sweep_summary(argv: list[str], started: float, exit_code: int) -> None:
    """The sweep summary after a multirun; a failure here never changes the sweep's own exit code."""
    sweep_dir = None
    try:
        from .sweeps import find_sweep_dir, short_text, write_summary

        sweep_dir = find_sweep_dir(argv, started)
        if sweep_dir is not None:  # None: no sweep happened (--help, --cfg, a composition error)
            print(short_text(write_summary(sweep_dir, exit_code=exit_code)))
    except Exception as e:  # noqa: BLE001 -- the jobs' results are on disk; the summary can be rebuilt
        print(f"could not write the sweep summary ({type(e).__name__}: {e}); "
              f"`slimrecipe sweep-report {sweep_dir or 'SWEEP_DIR'}` rebuilds it", file=sys.stderr)


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
