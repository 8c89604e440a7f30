"""What the cut costs the pretrained PP-OCRv4 mobile det before any finetune, and what repairing it wins back.

The flagship's plan (``ocr_det_prune``: its sensitivity table and FLOPs target) is applied to the pretrained
detector, then each arm starts from that same pruned model and is judged on the held-out text_scene validation
split (limit side 960, PaddleOCR's DB post-processing):

- ``cut``: the channels removed, nothing else;
- ``bn``: BatchNorm statistics recomputed on training images (``recalibrate_batchnorm``);
- ``reconstruct-N``: every plain conv refitted by least squares to the unpruned model's outputs on N training
  images (``prune.reconstruct``), for each N of ``--images``.

Run from the repository root:

    python bench/reconstruct_det.py [--images 16 64 128] [--override prune.target.flops=0.6]

Figures go to bench/results/reconstruct_det.json (or reconstruct_det_<tag>.json with ``--tag``).
"""

from __future__ import annotations

import argparse
import copy
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _results import write_results  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", nargs="+", type=int, default=[16, 64, 128],
                    help="training images each reconstruction arm refits on")
    ap.add_argument("--bn-images", type=int, default=64, help="training images of the BatchNorm arm")
    ap.add_argument("--override", nargs="*", default=[], help="more recipe overrides (prune.*, ...)")
    ap.add_argument("--tag", default="", help="suffix of the JSON file")
    args = ap.parse_args()

    from slimrecipe.config import compose, validate
    from slimrecipe.fileio import read_json
    from slimrecipe.pruning import analyse
    from slimrecipe.pruning.reconstruct import reconstruct
    from slimrecipe.pruning.sensitivity import recalibrate_batchnorm
    from slimrecipe.run import execute
    from slimrecipe.stages.sensitivity import training_batches

    overrides = ["+recipe=ocr_det_prune", *args.override, "prune.reconstruct.enabled=false"]
    work = Path(tempfile.mkdtemp(prefix="slimrecipe-reconstruct-"))
    state = execute(validate(compose([*overrides, "stages=[evaluate,sensitivity,prune]", "sensitivity.plot=false"])),
                    work / "plan", echo=lambda *_: None)
    plan = read_json(state.run_dir / "plan.json")
    teacher = state.baseline_model()
    groups, _ = analyse(teacher, state.input_shape)
    removed = {n: item["removed"] for n, item in plan["params"].items()}
    baseline = state.results["evaluate"]["metric"]
    cut = state.results["prune"]["flops_cut"]
    print(f"baseline hmean {baseline:.4f} on {len(state.data.val)} held-out scenes; plan removes {cut:.1%} of the "
          f"FLOPs", flush=True)
    arms = {"cut": {"metric": state.results["prune"]["metric"], "seconds": 0.0}}
    print(f"{'cut':<16} hmean {arms['cut']['metric']:.4f}", flush=True)

    def record(name, model, seconds, extra=None):
        arms[name] = {"metric": state.evaluate(model, batch_size=1), "seconds": round(seconds, 1), **(extra or {})}
        print(f"{name:<16} hmean {arms[name]['metric']:.4f}  ({seconds:.0f} s)", flush=True)
        write_results("reconstruct_det" + (f"_{args.tag}" if args.tag else ""),
                      {"baseline": baseline, "flops_cut": cut, "arms": arms},
                      {**vars(args), "val_images": len(state.data.val), "train_images": len(state.data.train),
                       "plan": {n: [i["channels_before"], i["channels_after"]] for n, i in plan["params"].items()
                                if i["channels_after"] < i["channels_before"]}})

    model = copy.deepcopy(state.model)
    t0 = time.perf_counter()
    batches = training_batches(state, 1, args.bn_images)
    recalibrate_batchnorm(model, [[b[0]] for b in batches])
    record("bn", model, time.perf_counter() - t0)
    for n in args.images:
        model = copy.deepcopy(state.model)
        t0 = time.perf_counter()
        info = reconstruct(model, teacher, groups, removed, [training_batches(state, 1, n)[0][0]],
                           seed=state.seed)
        record(f"reconstruct-{n}", model, time.perf_counter() - t0, {"layers": info})


if __name__ == "__main__":
    main()
