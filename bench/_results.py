"""Where benchmarks put their figures: `bench/results/<name>.json`, with the environment they were measured in."""

from __future__ import annotations

import sys
import time
from pathlib import Path

RESULTS_DIR = Path(__file__).resolve().parent / "results"


def write_results(name: str, figures: dict, settings: dict) -> Path:
    """Write ``figures`` (what was measured) and ``settings`` (how) beside the environment; print the path."""
    from slimrecipe.fileio import write_json
    from slimrecipe.snapshot import environment

    doc = {"benchmark": name, "measured_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "command": sys.argv,
           "settings": settings, "figures": figures, "environment": environment()}
    path = RESULTS_DIR / f"{name}.json"
    write_json(path, doc)
    print(f"\nfigures written to {path}")
    return path
