"""A finished det_mv3_db_prune run, judged on text it was not made from: the flagship's held-out text scenes.

det_mv3_db_prune trains and validates on one synthetic generator (words on plain backgrounds); its validation
hmean says little about other text. This evaluates the run's baseline and its pruned + finetuned model on the
`text_scene` validation split (other fonts, photographs and textures, text lines, as `ocr_det_prune` uses it):

    python bench/det_cross_eval.py outputs/<date>/<time>-det_mv3_db_prune

Figures go to bench/results/det_cross_eval.json.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from types import SimpleNamespace

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _results import write_results  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("run_dir", type=Path, help="a completed det_mv3_db_prune run (train and finetune stages)")
    args = ap.parse_args()

    from slimrecipe import registry
    from slimrecipe.config import compose, validate
    from slimrecipe.run import RunState, load_run_recipe

    run_dir = args.run_dir
    stages = {p.name.split("-", 1)[1]: p for p in (run_dir / "stages").iterdir()}
    state = RunState(load_run_recipe(run_dir), run_dir / ".cross_eval")
    state.absorb("train", json.loads((stages["train"] / "result.json").read_text()), from_disk=True)
    finetuned = json.loads((stages["finetune"] / "result.json").read_text())["checkpoint"]
    models = {"baseline": state.baseline_model(),
              "pruned + finetuned": state.build_model(plan=finetuned["plan"], weights=run_dir / finetuned["weights"])[0]}

    flagship = validate(compose(["+recipe=ocr_det_prune"]))
    spec = flagship["dataset"]
    scenes = registry.get("dataset", spec["name"], "dataset.name").obj(
        spec["params"], SimpleNamespace(cache_dir=Path(flagship["cache_dir"]).expanduser() / "data",
                                        seed=flagship["seed"]))
    rows = {}
    for label, model in models.items():
        model.eval()
        rows[label] = {"own_validation_split": round(state.evaluate(model), 4),
                       "text_scene_held_out": round(state.metric.evaluate(model, scenes.val, 1, scenes.collate_fn), 4)}
        print(f"{label:20s} own validation {rows[label]['own_validation_split']:.4f}   "
              f"text_scene held-out {rows[label]['text_scene_held_out']:.4f}")
    write_results("det_cross_eval", rows, {"run_dir": str(run_dir), "text_scene": spec["params"],
                                           "eval_batch_size": 1, "metric": state.recipe["metric"]})


if __name__ == "__main__":
    main()
