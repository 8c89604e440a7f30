"""Ship a run's sensitivity table as a built-in one (PaddleX's "DEFAULT" scheme): `source: builtin`.

    slimrecipe +recipe=cls_prune 'stages=[train,evaluate,sensitivity]'
    python tools/make_builtin_sensitivity.py outputs/<date>/<time>-cls_prune resnet18_digits32

The table is only meaningful for the model, weights and data it was computed on; `computed_on` travels with it.
"""

from __future__ import annotations

import sys
from pathlib import Path

from slimrecipe.fileio import read_json, write_json
from slimrecipe.stages.sensitivity import BUILTIN_DIR


def main(argv: list[str]) -> int:
    if len(argv) != 2:
        print(__doc__)
        return 2
    run_dir, name = Path(argv[0]), argv[1]
    doc = read_json(run_dir / "sensitivity.json")
    out = BUILTIN_DIR / f"{name}.json"
    write_json(out, {"table": doc["table"], "baseline": doc.get("baseline"), "computed_on": doc.get("computed_on"),
                     "produced_by": f"tools/make_builtin_sensitivity.py on run {run_dir.name}"})
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
