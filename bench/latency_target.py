"""A latency budget on a recipe's model: asked, predicted and measured latency share, with and without alignment.

Runs a recipe (`cls_prune` by default: ResNet-18 on digits, 32x32; its baseline and sensitivity come from the
cache when present) up to its `prune` stage with `prune.target.latency` in place of its metric-loss target, once per
`prune.align`, each in a run directory of its own. The prune stage measures (or reuses) the latency table, plans,
corrects the plan with measured whole plans, prunes, then exports the baseline and the pruned model to the
runtime and times them interleaved (median of the in-round ratio). Printed and written per align: asked /
predicted / measured share, whether it landed within 5%, FLOPs speed-up, measured speed-up and their ratio.

    python bench/latency_target.py [--recipe cls_prune] [--share 0.5] [--runtime onnxruntime] [--threads 1] [--aligns none 8]
                                   [--repeats 40] [--profile smoke]

Figures go to bench/results/latency_target.json (another recipe or a profile: latency_target_<recipe>_<profile>.json).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _results import write_results  # noqa: E402


STAGES_UP_TO_PRUNE = {"cls_prune": ["train", "evaluate", "sensitivity", "prune"],
                      "det_mv3_db_prune": ["train", "evaluate", "sensitivity", "prune"],
                      "ocr_det_prune": ["evaluate", "sensitivity", "prune"]}


def run_prune(args, align: str, run_dir: Path) -> dict:
    target = {"share": args.share, "runtime": args.runtime, "threads": args.threads, "repeats": args.repeats}
    # the recipe's own stages up to prune (a recipe that starts from pretrained weights has no train stage)
    stages = STAGES_UP_TO_PRUNE[args.recipe]
    overrides = [f"+recipe={args.recipe}", *([f"+profile={args.profile}"] if args.profile else []),
                 f"stages=[{','.join(stages)}]", "~prune.target",
                 "+prune.target={latency: " + json.dumps(target).replace('"', "") + "}",
                 f"prune.align={'null' if align == 'none' else align}",
                 *([f"prune.tolerance={args.tolerance}"] if args.tolerance else []),
                 f"hydra.run.dir={run_dir}"]
    print(f"\n== align {align}: slimrecipe {' '.join(overrides)}", flush=True)
    done = subprocess.run([sys.executable, "-m", "slimrecipe", *overrides])
    if done.returncode:
        raise SystemExit(f"the run with align {align} failed (exit {done.returncode}); see {run_dir}")
    result = json.loads(next(run_dir.glob("stages/*-prune/result.json")).read_text())
    return {"latency": result["latency"], "flops_cut": result["flops_cut"],
            "metric_before": result["before"]["metric"], "metric_after_prune": result["after"]["metric"],
            "run_dir": str(run_dir)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--recipe", default="cls_prune", choices=sorted(STAGES_UP_TO_PRUNE))
    ap.add_argument("--share", type=float, default=0.5, help="latency share to reach")
    ap.add_argument("--runtime", default="onnxruntime", choices=["onnxruntime", "paddle_inference"])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=40, help="interleaved rounds per measurement")
    ap.add_argument("--tolerance", type=float, default=None,
                    help="prune.tolerance: how far below the ask the planned share may fall (default: the recipe's)")
    ap.add_argument("--aligns", nargs="*", default=["none", "8"], help="prune.align values to compare")
    ap.add_argument("--profile", default=None, help="a recipe profile, e.g. smoke (not the real model)")
    args = ap.parse_args()

    root = Path(tempfile.mkdtemp(prefix="bench-latency-target-"))
    figures = {}
    for align in args.aligns:
        figures[f"align {align}"] = run_prune(args, align, root / f"align-{align}")

    print(f"\n{'align':>6} {'asked':>6} {'predicted':>9} {'measured':>8} {'within 5%':>9} {'FLOPs x':>8} "
          f"{'measured x':>10} {'meas/FLOPs':>10} {'metric after prune':>18}")
    for name, f in figures.items():
        lat = f["latency"]
        print(f"{name.split()[-1]:>6} {lat['asked_share']:>6.3f} {lat['predicted_share']:>9.3f} "
              f"{lat['measured_share']:>8.3f} {str(lat['within_5_percent']):>9} {lat['flops_speedup']:>8.2f} "
              f"{lat['measured_speedup']:>10.2f} {lat['measured_over_flops_speedup']:>10.2f} "
              f"{f['metric_after_prune']:>18.4f}")
    first = next(iter(figures.values()))["latency"]
    settings = {"recipe": args.recipe, "profile": args.profile, "share": args.share, "runtime": args.runtime,
                "threads": args.threads, "batch": first["batch"], "input": first["input"], "repeats": args.repeats,
                "tolerance": args.tolerance, "aligns": args.aligns,
                "note": "timed on a shared 2-core machine; interleaved with the baseline, median of in-round ratios"}
    suffix = "".join(f"_{part}" for part in (args.recipe if args.recipe != "cls_prune" else None, args.profile) if part)
    write_results(f"latency_target{suffix}", figures, settings)


if __name__ == "__main__":
    main()
