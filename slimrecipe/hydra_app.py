"""The Hydra task: one job of a run or of a sweep, in the directory Hydra made for it."""

from __future__ import annotations

import sys

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from .config import RECIPES_DIR
from .errors import StageError, UserError


BUG_EXIT_CODE = 3
ERROR_LOG = "error.log"


def report_bug(run_dir) -> int:
    """Print the traceback of the exception being handled and keep it in the run's error.log."""
    import traceback
    from pathlib import Path

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
    @hydra.main(version_base="1.3", config_path=str(RECIPES_DIR), config_name="config")
    def task(cfg: DictConfig) -> None:
        from pathlib import Path

        from .cli import _print_outcome
        from .config import resolve, validate
        from .run import execute

        run_dir = Path(HydraConfig.get().runtime.output_dir)
        try:
            recipe = validate(resolve(cfg))
            state = execute(recipe, run_dir)
            _print_outcome(state)
        except UserError as e:
            print(e.render(), file=sys.stderr)
            status["code"] = 2
            raise SystemExit(2)
        except StageError as e:
            print(f"stage failed: {e}\nrun directory: {run_dir}", file=sys.stderr)
            (run_dir / ERROR_LOG).write_text(f"stage failed: {e}\n", encoding="utf-8")
            status["code"] = 1
            raise SystemExit(1)
        except KeyboardInterrupt:
            print(f"\ninterrupted: `slimrecipe resume {run_dir}` continues where it stopped", file=sys.stderr)
            status["code"] = 130
            raise SystemExit(130)
        except Exception:  # noqa: BLE001 -- a bug of ours: keep the whole traceback, on screen and in the run
            status["code"] = report_bug(run_dir)
            raise SystemExit(status["code"])

    task()
