"""Benchmark: PaddleSlim's own `FilterPruner.sensitive()` against slimrecipe's sensitivity analysis.

Same trained model (cls_prune's cached ResNet-18 baseline), same data, one process. Prints the wall time and
evaluation count of each analysis, then prunes a copy of the baseline by each table at the same tolerated
loss, finetunes both the same way, and prints the metric and FLOPs each plan ends with.

    python bench/sensitivity_vs_paddleslim.py [--loss 0.05] [--finetune-epochs 2]
"""

from __future__ import annotations

import argparse
import copy
import tempfile
import time
from pathlib import Path

from _results import write_results

from slimrecipe.batching import Subset
from slimrecipe.config import compose, validate
from slimrecipe.paddle_env import paddle, paddleslim, quiet_paddleslim_loggers
from slimrecipe.pruning import (apply_plan, apply_skip_rules, compute_sensitivity, count_flops, load_sensitivity_file,
                                make_plan, prunable_params, ratios_for_metric_loss)
from slimrecipe.run import execute
from slimrecipe.stages._training import fit

GRID = [0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9]  # PaddleSlim's fixed grid, used by both


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--loss", type=float, default=0.05, help="tolerated relative loss per parameter")
    ap.add_argument("--subset", type=int, default=192, help="slimrecipe: validation samples per evaluation")
    ap.add_argument("--ceiling", type=float, default=0.25, help="slimrecipe: stop raising a ratio past this loss")
    ap.add_argument("--finetune-epochs", type=float, default=2)
    args = ap.parse_args()

    work = Path(tempfile.mkdtemp(prefix="slimrecipe-bench-"))
    recipe = validate(compose(["+recipe=cls_prune", "stages=[train,evaluate]"]))
    state = execute(recipe, work / "baseline", echo=lambda *_: None)
    base_model, shape, val = state.model, state.input_shape, state.data.val
    base_metric = state.results["evaluate"]["metric"]
    print(f"model {recipe['model']['params']['arch']} input {shape}, val {len(val)} images, "
          f"baseline {state.metric.name} {base_metric:.4f}")

    # --- PaddleSlim: every (parameter, ratio) evaluated on the whole validation split
    counter = {"n": 0}
    model_a = copy.deepcopy(base_model)

    def eval_full():
        counter["n"] += 1
        return state.evaluate(model_a, val, 256)

    slim = paddleslim()
    quiet_paddleslim_loggers()
    t0 = time.perf_counter()
    pruner = slim.dygraph.L1NormFilterPruner(model_a, [1, *shape])
    sen_file = work / "paddleslim.pickle"
    pruner.sensitive(eval_func=eval_full, sen_file=str(sen_file))
    t_slim, n_slim = time.perf_counter() - t0, counter["n"]
    # PaddleSlim keys rows by internal names (model_a's, a deep copy's); read them onto structured names
    table_slim = load_sensitivity_file(sen_file, prunable=prunable_params(model_a, shape))
    prunable = prunable_params(base_model, shape)

    # --- slimrecipe: a fixed validation subset, a loss ceiling, checkpointed points
    model_b = copy.deepcopy(base_model)
    subset = Subset(val, args.subset)
    t0 = time.perf_counter()
    ours = compute_sensitivity(model_b, shape, lambda m: state.evaluate(m, subset, 256), ratios=GRID,
                               loss_ceiling=args.ceiling, progress=False)
    t_ours, n_ours = time.perf_counter() - t0, ours["evaluations"]
    table_ours = {k: {float(r): v for r, v in row.items()} for k, row in ours["table"].items()}

    print("\nsensitivity analysis          wall s   evaluations   images evaluated")
    print(f"  PaddleSlim sensitive()     {t_slim:7.1f}   {n_slim:11d}   {n_slim * len(val):16,d}")
    print(f"  slimrecipe                 {t_ours:7.1f}   {n_ours:11d}   {n_ours * len(subset):16,d}")
    print(f"  speed-up                   {t_slim / t_ours:6.2f}x")

    # --- the same planning, pruning and finetune from each table
    print(f"\nplan at eval_metric_loss {args.loss}, skip the first conv, then {args.finetune_epochs} epochs finetune")
    rows = []
    for label, table in (("PaddleSlim table", table_slim), ("slimrecipe table", table_ours)):
        model = copy.deepcopy(base_model)
        kept, skipped = apply_skip_rules(prunable, table, {"first_n": 1})
        ratios = ratios_for_metric_loss({k: table[k] for k in kept if k in table}, args.loss)
        plan = make_plan(model, shape, prunable, ratios, skipped, criterion="l1_norm", align=None, min_channels=None)
        apply_plan(model, shape, plan)
        pruned_metric = state.evaluate(model)
        state.stage_dir = work / label.replace(" ", "_")
        fit(state, model, {"epochs": args.finetune_epochs, "batch_size": 64,
                           "optimizer": {"name": "adam", "lr": 0.0005}, "schedule": {"name": "cosine"}},
            out_dir=state.stage_dir, desc=label)
        rows.append((label, pruned_metric, state.evaluate(model), 1 - count_flops(model, shape) /
                     count_flops(base_model, shape)))
    print(f"  {'':18} {'pruned':>8} {'finetuned':>10} {'FLOPs cut':>10}")
    for label, pm, fm, cut in rows:
        print(f"  {label:18} {pm:8.4f} {fm:10.4f} {cut:10.1%}")
    print(f"  (unpruned baseline {base_metric:.4f})")
    write_results("sensitivity_vs_paddleslim", {
        "baseline_metric": base_metric,
        "paddleslim": {"seconds": t_slim, "evaluations": n_slim, "images": n_slim * len(val)},
        "slimrecipe": {"seconds": t_ours, "evaluations": n_ours, "images": n_ours * len(subset)},
        "plans": [{"table": label, "pruned_metric": pm, "finetuned_metric": fm, "flops_cut": cut}
                  for label, pm, fm, cut in rows],
    }, {**vars(args), "grid": GRID, "val_images": len(val), "model": recipe["model"]})


if __name__ == "__main__":
    paddle()
    main()
