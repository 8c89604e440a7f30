"""The Hydra task: one job of a run or of a sweep, in the directory Hydra made for it."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.experimental.callback import Callback
from omegaconf import DictConfig

from .config import RECIPES_DIR
from .errors import StageError, UserError


BUG_EXIT_CODE = 3
ERROR_LOG = "error.log"
# a job that ended with a non-zero exit code says so here: with a parallel launcher the job runs in another
# process (or on another machine), and this file is how the command and the sweep summary learn of it
EXIT_RECORD = "exit.json"
# filled by SweepRecorder in the process that runs the sweeper
LAST_SWEEP: dict = {}


class SweepRecorder(Callback):
    """Hydra callback: remember the sweep directory of a multirun for the sweep summary.

    Hydra keeps no handle on it after the sweep, and with a parallel launcher (joblib, submitit, Ray) the jobs
    log in other processes, so the parent's log files do not point at it either.
    """

    def on_multirun_start(self, config: DictConfig, **kwargs) -> None:
        LAST_SWEEP["dir"] = Path(str(config.hydra.sweep.dir)).resolve()


def record_exit(run_dir, code: int, message: str) -> None:
    from .fileio import write_json

    try:
        write_json(Path(run_dir) / EXIT_RECORD, {"exit_code": code, "error": message})
    except OSError:
        pass  # the job's own output still says what happened


def report_bug(run_dir) -> int:
    """Print the traceback of the exception being handled and keep it in the run's error.log."""
    import traceback

    text = traceback.format_exc()
    log = Path(run_dir) / ERROR_LOG
    try:
        log.parent.mkdir(parents=True, exist_ok=True)
        log.write_text(text, encoding="utf-8")
        where = f"; the traceback is kept in {log}"
    except OSError:
        where = ""
    print(text, file=sys.stderr)
    print(f"internal error: this is a bug in slimrecipe, not a mistake in the recipe{where}. "
          f"`slimrecipe resume {run_dir}` continues once it is fixed.", file=sys.stderr)
    return BUG_EXIT_CODE


def hydra_entry(status: dict) -> None:
    """Run Hydra's main with our task. ``status["code"]`` gets the exit code of a job that ran in this process.

    A job that fails in this process (a single run, or a sweep's jobs one after the other) stops the command
    with its exit code, as before. A job that a launcher runs in another process (joblib, submitit, Ray) records
    its exit code in its directory and returns, so that the other jobs go on; the command reads the records.
    """
    command_pid = os.getpid()

    @hydra.main(version_base="1.3", config_path=str(RECIPES_DIR), config_name="config")
    def task(cfg: DictConfig) -> None:
        from .cli import _print_outcome, warn_environment
        from .config import resolve, validate
        from .run import execute

        run_dir = Path(HydraConfig.get().runtime.output_dir)

        def failed(code: int, message: str) -> None:
            record_exit(run_dir, code, message)
            status["code"] = code
            if os.getpid() == command_pid:
                raise SystemExit(code)

        try:
            recipe = validate(resolve(cfg))
            warn_environment(recipe)
            state = execute(recipe, run_dir)
            _print_outcome(state)
        except UserError as e:
            print(e.render(), file=sys.stderr)
            return failed(2, e.render())
        except StageError as e:
            print(f"stage failed: {e}\nrun directory: {run_dir}", file=sys.stderr)
            (run_dir / ERROR_LOG).write_text(f"stage failed: {e}\n", encoding="utf-8")
            return failed(1, str(e))
        except KeyboardInterrupt:
            print(f"\ninterrupted: `slimrecipe resume {run_dir}` continues where it stopped", file=sys.stderr)
            return failed(130, f"`slimrecipe resume {run_dir}` continues where it stopped")
        except Exception as e:  # noqa: BLE001 -- a bug of ours: keep the whole traceback, on screen and in the run
            return failed(report_bug(run_dir), f"{type(e).__name__}: {e}")

    task()
