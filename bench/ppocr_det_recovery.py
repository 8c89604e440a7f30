"""How far finetuning brings the pretrained PP-OCRv4 mobile det back, and whether the finetune itself costs hmean.

Arms, each judged on the held-out text_scene validation split (other fonts, backgrounds and layouts than the
training scenes; limit side 960, PaddleOCR's DB post-processing):

- ``unpruned``: the pretrained detector finetuned exactly as the flagship finetunes its pruned student
  (same data, optimizer, schedule, distillation from the unpruned model). What it loses is what our training data
  and labels cost, before any pruning.
- ``pruned``: the flagship's plan (``ocr_det_prune``'s sensitivity and FLOPs target), then the same finetune.

Every arm evaluates at step 0 and every ``--eval-every`` steps, so the figures are a recovery curve. Optional
``--bn-recalibration N`` recomputes the pruned model's BatchNorm statistics on N training batches before it
finetunes (and is evaluated once more after that). Run from the repository root:

    python bench/ppocr_det_recovery.py [--arms unpruned pruned] [--steps 150] [--eval-every 75]

Figures go to bench/results/ppocr_det_recovery.json.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _results import write_results  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--arms", nargs="+", choices=["unpruned", "pruned"], default=["unpruned", "pruned"])
    ap.add_argument("--steps", type=int, default=150, help="optimizer steps of every finetune")
    ap.add_argument("--eval-every", type=int, default=75)
    ap.add_argument("--bn-recalibration", type=int, default=0, help="pruned arm: training batches recomputing "
                                                                    "BatchNorm statistics before the finetune")
    ap.add_argument("--override", nargs="*", default=[], help="more recipe overrides (finetune.*, prune.*, ...)")
    args = ap.parse_args()

    from slimrecipe.config import compose, validate
    from slimrecipe.paddle_env import paddle
    from slimrecipe.run import execute
    from slimrecipe.stages._training import fit

    overrides = ["+recipe=ocr_det_prune", *args.override]
    work = Path(tempfile.mkdtemp(prefix="slimrecipe-recovery-"))
    t0 = time.perf_counter()
    state = execute(validate(compose([*overrides, "stages=[evaluate,sensitivity,prune]", "sensitivity.plot=false"])),
                    work / "plan", echo=lambda *_: None)
    baseline = state.results["evaluate"]["metric"]
    finetune = dict(state.recipe["finetune"])
    finetune.update(steps=args.steps, eval_every=args.eval_every, keep_best=False)
    print(f"baseline hmean {baseline:.4f} on {len(state.data.val)} held-out scenes; plan and data ready in "
          f"{time.perf_counter() - t0:.0f} s; finetune {finetune['optimizer']} {finetune['schedule']} batch "
          f"{finetune['batch_size']}, {args.steps} steps, distill {finetune['distill']}", flush=True)
    arms = {}
    for arm in args.arms:
        model = state.baseline_model() if arm == "unpruned" else state.model
        record = {"flops_removed": None if arm == "unpruned" else state.results["prune"]["flops_cut"]}
        if arm == "pruned" and args.bn_recalibration:
            from slimrecipe.pruning.sensitivity import recalibrate_batchnorm
            from slimrecipe.stages.sensitivity import training_batches

            recalibrate_batchnorm(model, training_batches(state, args.bn_recalibration, finetune["batch_size"]))
            record["start"] = state.evaluate(model, batch_size=1)
        else:
            record["start"] = baseline if arm == "unpruned" else state.results["prune"]["metric"]
        paddle().seed(state.seed)
        t0 = time.perf_counter()
        result = fit(state, model, finetune, out_dir=work / arm, desc=arm, teacher=state.baseline_model(),
                     distill=finetune["distill"])
        record.update(curve=[{"step": 0, "metric": record["start"]}, *result["history"]],
                      seconds=time.perf_counter() - t0)
        arms[arm] = record
        print(f"{arm:<9} " + "  ".join(f"step {h['step']}: {h['metric']:.4f}" for h in record["curve"]),
              flush=True)
        # after every arm: an arm done is kept when a later one is interrupted
        write_results("ppocr_det_recovery", {"baseline": baseline, "arms": arms},
                      {**vars(args), "finetune": finetune, "val_images": len(state.data.val),
                       "train_images": len(state.data.train)})


if __name__ == "__main__":
    main()
