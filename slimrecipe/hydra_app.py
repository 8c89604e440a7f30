"""The Hydra task: one job of a run or of a sweep, in the directory Hydra made for it."""

from __future__ import annotations

import sys

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from .config import RECIPES_DIR
from .errors import RecipeError, StageError


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
        except RecipeError as e:
            print(e.render(), file=sys.stderr)
            status["code"] = 2
            raise SystemExit(2)
        except StageError as e:
            print(f"stage failed: {e}\nrun directory: {run_dir}", file=sys.stderr)
            status["code"] = 1
            raise SystemExit(1)
        except KeyboardInterrupt:
            print(f"\ninterrupted: `slimrecipe resume {run_dir}` continues where it stopped", file=sys.stderr)
            status["code"] = 130
            raise SystemExit(130)

    task()
