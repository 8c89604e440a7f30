"""Benchmark: PaddleSlim's `FilterPruner.sensitive()` against slimrecipe's one-shot Taylor sensitivity, fairly.

Same trained model (cls_prune's cached ResNet-18 baseline), same data, one process. Arms:

- ``paddleslim_full``: PaddleSlim's ``sensitive()`` evaluating every (parameter, ratio) on the whole validation split;
- ``paddleslim_subset``: the same on the first ``--subset`` validation images, the subset slimrecipe uses;
- ``taylor``: slimrecipe's ``sensitivity.method=taylor`` (first-order Taylor scores from a few backward passes,
  calibrated by a few evaluations on the subset after recomputing BatchNorm statistics);
- ``measure`` (not run by default): slimrecipe measuring every (group, ratio) on the subset, with the loss
  ceiling and BatchNorm recalibration.

The arms run interleaved, ``--repeats`` rounds (the wall time reported is the median; the machine is shared).
Every table is then turned into a plan by the same rule (the same skip rule, then a FLOPs cut by default or the
PaddleX per-layer loss rule), each plan pruned and finetuned identically once per seed, and the finetuned
metrics compared. Figures go to bench/results/sensitivity_vs_paddleslim.json.

    python bench/sensitivity_vs_paddleslim.py [--repeats 3] [--seeds 0 1 2] [--rule flops --flops-cut 0.5]
"""

from __future__ import annotations

import argparse
import copy
import statistics
import tempfile
import time
from pathlib import Path

from _results import write_results

from slimrecipe.batching import Subset
from slimrecipe.config import compose, validate
from slimrecipe.paddle_env import paddle, paddleslim, quiet_paddleslim_loggers
from slimrecipe.pruning import (apply_plan, apply_skip_rules, compute_sensitivity, count_flops, load_sensitivity_file,
                                make_plan, prunable_params, ratios_for_flops_target, ratios_for_metric_loss)
from slimrecipe.pruning.sensitivity import taylor_sensitivity
from slimrecipe.run import execute
from slimrecipe.stages._training import batch_loss, fit
from slimrecipe.stages.sensitivity import training_batches

GRID = [0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9]  # PaddleSlim's fixed grid, used by every arm
ARMS = ("paddleslim_full", "paddleslim_subset", "taylor", "measure")
SKIP = {"first_n": 1}  # the same skip rule for every table: the convolution nearest the input stays whole


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--arms", nargs="+", choices=ARMS, default=["paddleslim_full", "paddleslim_subset", "taylor"])
    ap.add_argument("--repeats", type=int, default=3, help="interleaved rounds of every arm (median wall time)")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="one finetune of every plan per seed")
    ap.add_argument("--rule", choices=["flops", "per_layer_loss"], default="flops",
                    help="how a table becomes a plan: a FLOPs cut (equal compression, compare accuracy) or PaddleX's "
                         "per-layer tolerated loss")
    ap.add_argument("--flops-cut", type=float, default=0.5, help="rule flops: share of FLOPs removed")
    ap.add_argument("--loss", type=float, default=0.05, help="rule per_layer_loss: tolerated relative loss per group")
    ap.add_argument("--subset", type=int, default=192, help="validation images per evaluation (subset arms)")
    ap.add_argument("--taylor-batches", type=int, default=8, help="taylor: backward passes")
    ap.add_argument("--taylor-calibration", type=int, default=8, help="taylor: candidates evaluated to calibrate")
    ap.add_argument("--train-batch-size", type=int, default=32, help="taylor / BN recalibration batch size")
    ap.add_argument("--bn-recalibration", type=int, default=4, help="training batches recomputing BN statistics "
                                                                    "of each evaluated candidate (taylor, measure)")
    ap.add_argument("--ceiling", type=float, default=0.25, help="measure: stop raising a ratio past this loss")
    ap.add_argument("--finetune-epochs", type=float, default=2)
    args = ap.parse_args()

    work = Path(tempfile.mkdtemp(prefix="slimrecipe-bench-"))
    recipe = validate(compose(["+recipe=cls_prune", "stages=[train,evaluate]"]))
    state = execute(recipe, work / "baseline", echo=lambda *_: None)
    base_model, shape, val = state.model, state.input_shape, state.data.val
    base_metric = state.results["evaluate"]["metric"]
    subset = Subset(val, args.subset)
    prunable = prunable_params(base_model, shape)
    print(f"model {recipe['model']['params']['arch']} input {shape}, val {len(val)} images (subset {len(subset)}), "
          f"baseline {state.metric.name} {base_metric:.4f}")
    slim = paddleslim()
    quiet_paddleslim_loggers()

    def train_batches(count: int) -> list:
        return training_batches(state, count, args.train_batch_size)

    def run_paddleslim(dataset, tag: str) -> dict:
        model = copy.deepcopy(base_model)
        calls = {"n": 0}

        def evaluate():
            calls["n"] += 1
            return state.evaluate(model, dataset, 256)

        sen_file = work / f"{tag}.pickle"  # a new file each time: sensitive() resumes from an existing one
        t0 = time.perf_counter()
        pruner = slim.dygraph.L1NormFilterPruner(model, [1, *shape])
        pruner.sensitive(eval_func=evaluate, sen_file=str(sen_file))
        seconds = time.perf_counter() - t0
        # PaddleSlim keys rows by internal names (this copy's); read them onto structured names
        table = load_sensitivity_file(sen_file, prunable=prunable_params(model, shape))
        return {"seconds": seconds, "evaluations": calls["n"], "images_evaluated": calls["n"] * len(dataset),
                "table": table}

    def run_taylor(tag: str) -> dict:
        model = copy.deepcopy(base_model)
        calls = {"n": 0}

        def evaluate(m):
            calls["n"] += 1
            return state.evaluate(m, subset, 256)

        t0 = time.perf_counter()
        result = taylor_sensitivity(
            model, shape, evaluate, train_batches(args.taylor_batches), batch_loss(model),
            ratios=GRID, calibration=args.taylor_calibration, bn_batches=train_batches(args.bn_recalibration))
        seconds = time.perf_counter() - t0
        return {"seconds": seconds, "evaluations": calls["n"], "images_evaluated": calls["n"] * len(subset),
                "training_images": (args.taylor_batches + calls["n"] * args.bn_recalibration) * args.train_batch_size,
                "table": _float_rows(result["table"]), "calibration_points": result["calibration_points"]}

    def run_measure(tag: str) -> dict:
        model = copy.deepcopy(base_model)
        t0 = time.perf_counter()
        result = compute_sensitivity(model, shape, lambda m: state.evaluate(m, subset, 256), ratios=GRID,
                                     loss_ceiling=args.ceiling, progress=False,
                                     bn_batches=train_batches(args.bn_recalibration))
        seconds = time.perf_counter() - t0
        n = result["evaluations"]
        return {"seconds": seconds, "evaluations": n, "images_evaluated": n * len(subset),
                "training_images": (n - 1) * args.bn_recalibration * args.train_batch_size,
                "table": _float_rows(result["table"])}

    runners = {"paddleslim_full": lambda tag: run_paddleslim(val, tag),
               "paddleslim_subset": lambda tag: run_paddleslim(subset, tag),
               "taylor": run_taylor, "measure": run_measure}
    runs: dict[str, list[dict]] = {arm: [] for arm in args.arms}
    for rep in range(args.repeats):  # interleaved, the order rotated each round: drift on a shared machine
        order = args.arms[rep % len(args.arms):] + args.arms[:rep % len(args.arms)]
        for arm in order:
            run = runners[arm](f"{arm}-{rep}")
            runs[arm].append(run)
            print(f"  round {rep + 1}/{args.repeats} {arm:<18} {run['seconds']:7.1f} s  "
                  f"{run['evaluations']} evaluations", flush=True)

    print("\nsensitivity analysis     wall s (median, runs)          evaluations   images evaluated")
    medians = {arm: statistics.median(r["seconds"] for r in rs) for arm, rs in runs.items()}
    for arm, rs in runs.items():
        each = ", ".join(f"{r['seconds']:.1f}" for r in rs)
        print(f"  {arm:<20} {medians[arm]:7.1f}  ({each:<20}) {rs[0]['evaluations']:11d}   "
              f"{rs[0]['images_evaluated']:16,d}")
    reference = "paddleslim_full" if "paddleslim_full" in medians else None
    if reference:
        for arm in medians:
            if arm != reference:
                print(f"  speed-up of {arm} over {reference}: {medians[reference] / medians[arm]:.2f}x")

    # --- every table -> a plan by the same rule -> pruned -> finetuned once per seed, identically
    rule = (f"FLOPs cut {args.flops_cut}" if args.rule == "flops" else f"per-layer loss {args.loss}")
    print(f"\nplan by {rule}, skip {SKIP}, then {args.finetune_epochs} epochs finetune per seed {args.seeds}")
    p = paddle()
    plans = {}
    for arm, rs in runs.items():
        table = rs[0]["table"]
        kept, skipped = apply_skip_rules(prunable, table, SKIP)
        candidates = {k: table[k] for k in kept if k in table}
        if args.rule == "flops":
            ratios, _ = ratios_for_flops_target(base_model, shape, candidates, args.flops_cut)
        else:
            ratios = ratios_for_metric_loss(candidates, args.loss)
        plan = make_plan(copy.deepcopy(base_model), shape, prunable, ratios, skipped, criterion="l1_norm",
                         align=None, min_channels=None)
        finetuned, pruned_metric, cut = [], None, None
        for seed in args.seeds:
            model = copy.deepcopy(base_model)
            apply_plan(model, shape, plan)
            pruned_metric = state.evaluate(model)
            cut = 1 - count_flops(model, shape) / count_flops(base_model, shape)
            state.seed = seed
            p.seed(seed)
            out = work / f"finetune-{arm}-{seed}"
            fit(state, model, {"epochs": args.finetune_epochs, "batch_size": 64,
                               "optimizer": {"name": "adam", "lr": 0.0005}, "schedule": {"name": "cosine"}},
                out_dir=out, desc=f"{arm} seed {seed}")
            finetuned.append(state.evaluate(model))
        plans[arm] = {"ratios": {k: round(v, 4) for k, v in ratios.items()}, "pruned_metric": pruned_metric,
                      "flops_cut": cut, "finetuned_by_seed": dict(zip(args.seeds, finetuned)),
                      "finetuned_mean": statistics.mean(finetuned), "finetuned_median": statistics.median(finetuned)}
        print(f"  {arm:<20} FLOPs cut {cut:6.1%}  pruned {pruned_metric:.4f}  finetuned "
              f"{' '.join(f'{v:.4f}' for v in finetuned)}  mean {statistics.mean(finetuned):.4f}", flush=True)
    print(f"  (unpruned baseline {base_metric:.4f})")

    verdicts = {}
    if reference:
        ref_acc = plans[reference]["finetuned_mean"]
        print(f"\ngoal: >= 5x less wall time than {reference}, finetuned mean within 0.3 points of its plan's")
        for arm in plans:
            if arm == reference:
                continue
            speedup = medians[reference] / medians[arm]
            gap = (plans[arm]["finetuned_mean"] - ref_acc) * 100
            met = speedup >= 5 and gap >= -0.3
            verdicts[arm] = {"speedup": speedup, "accuracy_gap_points": gap, "goal_met": met}
            print(f"  {arm:<20} {speedup:6.2f}x  {gap:+6.2f} points  {'met' if met else 'NOT met'}")

    write_results("sensitivity_vs_paddleslim", {
        "baseline_metric": base_metric,
        "analysis": {arm: {"median_seconds": medians[arm], "seconds": [r["seconds"] for r in rs],
                           "evaluations": rs[0]["evaluations"], "images_evaluated": rs[0]["images_evaluated"],
                           "training_images": rs[0].get("training_images", 0),
                           "tables_identical_across_repeats": all(r["table"] == rs[0]["table"] for r in rs),
                           **({"calibration_points": rs[0]["calibration_points"]} if "calibration_points" in rs[0]
                              else {})}
                     for arm, rs in runs.items()},
        "tables": {arm: rs[0]["table"] for arm, rs in runs.items()},
        "plans": plans,
        "goal": verdicts,
    }, {**vars(args), "grid": GRID, "skip": SKIP, "val_images": len(val), "subset_images": len(subset),
        "model": recipe["model"], "finetune": {"batch_size": 64, "optimizer": "adam", "lr": 0.0005,
                                               "schedule": "cosine", "distill": False}})


def _float_rows(table: dict) -> dict:
    return {k: {float(r): float(v) for r, v in row.items()} for k, row in table.items()}


if __name__ == "__main__":
    paddle()
    main()
