"""slimrecipe's dependency-graph pruner beside PaddleSlim's L1NormFilterPruner, on the same models.

PaddleSlim only runs on Paddle 2.6, so this runs in a Paddle 2.6.2 environment with PaddleSlim 2.6:

    python3 -m venv .venv-paddle26 && . .venv-paddle26/bin/activate
    pip install -e ".[paddle26]" "paddleslim==2.6.0"
    python bench/pruner_vs_paddleslim.py [--ratio 0.5] [--size 64]

For each model (ResNet-18, MobileNetV2, MobileNetV3-large, the det_mv3 DB detector) it measures:

- reach: how many convolutions each pruner can prune, and the share of FLOPs it removes when every one of them
  loses ``--ratio`` of its output channels (both counted by slimrecipe's FLOPs counter; PaddleSlim's own count
  is in the JSON too) (PaddleSlim: each convolution tried on its own first, then all those
  it accepted at once; slimrecipe: every prunable channel group, the first convolution included);
- agreement: where both can prune a convolution, PaddleSlim prunes it alone and slimrecipe then removes exactly
  the channels PaddleSlim removed; the two pruned models must give the same output;
- time: analysing the model and pruning it to the reach above (PaddleSlim: building its pruner and pruning
  every accepted convolution at once; trying each convolution alone first is not counted).

Figures go to bench/results/pruner_vs_paddleslim.json beside the printed table.
"""

from __future__ import annotations

import argparse
import copy
import sys
import time
import types
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _results import write_results  # noqa: E402


def build(name: str, size: int):
    from slimrecipe.models import db
    from slimrecipe.paddle_env import paddle

    p = paddle()
    p.seed(0)
    from paddle.vision import models

    data = types.SimpleNamespace(input_shape=[3, size, size], num_classes=10)
    if name == "db_mobilenet_v3":
        model = db.db_mobilenet_v3({"scale": 0.5}, data)
    else:
        model = getattr(models, name)(num_classes=10)
    model.eval()
    return model


def conv_weights(model) -> dict:
    """Structured name -> internal name of every non-depthwise convolution weight (what PaddleSlim prunes)."""
    from slimrecipe.paddle_env import paddle

    nn = paddle().nn
    out = {}
    for lname, layer in model.named_sublayers():
        if isinstance(layer, (nn.Conv2D, nn.Conv2DTranspose)) and layer._groups == 1:
            out[f"{lname}.weight"] = layer.weight.name
    return out


def output(model, x):
    from slimrecipe.paddle_env import paddle

    p = paddle()
    with p.no_grad():
        out = model(p.to_tensor(x))
    return (out[0] if isinstance(out, (list, tuple)) else out).numpy()


def _describe(error: Exception) -> str:
    first = (str(error).strip().splitlines() or [""])[0]
    return f"{type(error).__name__}: {first[:160]}" if first else type(error).__name__


def paddleslim_side(name, size, ratio, x):
    from slimrecipe.paddle_env import paddle
    from slimrecipe.paddle_env import paddleslim as get_slim
    from slimrecipe.pruning import count_flops
    from slimrecipe.stages.prune import removed_rows

    slim = get_slim()
    shape = [1, 3, size, size]
    base = build(name, size)
    flops0 = slim.analysis.dygraph_flops(base, shape)
    weights = conv_weights(base)
    accepted, single = [], {}
    t0 = time.perf_counter()
    for structured, internal in weights.items():
        model = build(name, size)
        names = conv_weights(model)
        try:
            pruner = slim.dygraph.L1NormFilterPruner(model, shape)
            before = dict(model.named_parameters())[structured].numpy().copy()
            pruner.prune_vars({names[structured]: ratio}, axis=0)
            output(model, x)
        except Exception as e:  # noqa: BLE001 -- what PaddleSlim refuses or breaks on is the measurement
            single[structured] = {"ok": False, "error": _describe(e)}
            continue
        after = dict(model.named_parameters())[structured].numpy()
        accepted.append(structured)
        single[structured] = {"ok": True, "removed": removed_rows(before, after), "output": output(model, x)}
    t_single = time.perf_counter() - t0
    model = build(name, size)
    names = conv_weights(model)
    t0 = time.perf_counter()
    cut, cut_paddleslim_counter, error = None, None, None
    try:
        pruner = slim.dygraph.L1NormFilterPruner(model, shape)
        pruner.prune_vars({names[s]: ratio for s in accepted}, axis=0)
        output(model, x)
        cut_paddleslim_counter = 1 - slim.analysis.dygraph_flops(model, shape) / flops0
        cut = 1 - count_flops(model, shape) / count_flops(base, shape)
    except Exception as e:  # noqa: BLE001
        error = _describe(e)
    t_all = time.perf_counter() - t0
    paddle()
    return {"convs": len(weights), "prunable_convs": len(accepted), "flops_cut": cut,
            "flops_cut_by_paddleslims_counter": cut_paddleslim_counter, "error_pruning_all": error,
            "seconds_trying_each": round(t_single, 2), "seconds_pruning_all": round(t_all, 2)}, single


def slimrecipe_side(name, size, ratio, x, single):
    from slimrecipe.pruning import analyse, apply_plan, count_flops, make_plan
    from slimrecipe.pruning.surgery import prune_group

    shape = [3, size, size]
    base = build(name, size)
    flops0 = count_flops(base, [1, *shape])
    t0 = time.perf_counter()
    groups, prunable = analyse(base, shape)
    t_analyse = time.perf_counter() - t0
    covered = {m.param for g in groups if g.prunable for m in g.members if m.role in ("conv_out", "transpose_out")}
    model = copy.deepcopy(base)
    t0 = time.perf_counter()
    apply_plan(model, shape, make_plan(model, shape, prunable, {e["name"]: ratio for e in prunable}, groups=groups))
    t_prune = time.perf_counter() - t0
    cut = 1 - count_flops(model, [1, *shape]) / flops0
    # agreement: the channels PaddleSlim removed from one convolution, removed by slimrecipe's surgery
    diffs = {}
    for structured, res in single.items():
        if not res["ok"] or not res["removed"]:
            continue
        group = next((g for g in groups if g.prunable and g.name == structured), None)
        if group is None:
            continue
        model = copy.deepcopy(base)
        trial = copy.deepcopy(groups)
        prune_group(model, trial[group.index], res["removed"])
        diffs[structured] = float(np.abs(output(model, x) - res["output"]).max())
    convs = conv_weights(base)
    return {"groups": len(groups), "prunable_groups": len(prunable),
            "prunable_convs": sum(1 for s in convs if s in covered), "flops_cut": cut,
            "seconds_analysing": round(t_analyse, 2), "seconds_pruning_all": round(t_prune, 2),
            "agreement": {"convs_compared": len(diffs),
                          "max_abs_output_diff": max(diffs.values()) if diffs else None}}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--ratio", type=float, default=0.5)
    ap.add_argument("--size", type=int, default=64)
    ap.add_argument("--models", nargs="+",
                    default=["resnet18", "mobilenet_v2", "mobilenet_v3_large", "db_mobilenet_v3"])
    args = ap.parse_args()
    from tqdm import tqdm

    from slimrecipe.paddle_env import paddle

    version = paddle().__version__
    x = np.random.default_rng(0).normal(size=[2, 3, args.size, args.size]).astype("float32")
    rows = {}
    for name in tqdm(args.models, desc="models", unit="model"):
        slim, single = paddleslim_side(name, args.size, args.ratio, x)
        ours = slimrecipe_side(name, args.size, args.ratio, x, single)
        rows[name] = {"paddleslim": slim, "slimrecipe": ours,
                      "paddleslim_refused": {k: v["error"] for k, v in single.items() if not v["ok"]}}
    print(f"\nPaddle {version}; every prunable convolution at ratio {args.ratio}; input {args.size}x{args.size}")
    print(f"{'model':20s} {'convs':>5s} | {'PaddleSlim prunes':>17s} {'FLOPs cut':>9s} {'s':>6s} | "
          f"{'slimrecipe prunes':>17s} {'FLOPs cut':>9s} {'s':>6s} | {'same output (max diff)':>22s}")
    for name, r in rows.items():
        s, o = r["paddleslim"], r["slimrecipe"]
        slim_cut = "failed" if s["flops_cut"] is None else f"{s['flops_cut']:.3f}"
        agree = o["agreement"]
        print(f"{name:20s} {s['convs']:5d} | {s['prunable_convs']:17d} {slim_cut:>9s} "
              f"{s['seconds_pruning_all']:6.1f} | {o['prunable_convs']:17d} "
              f"{o['flops_cut']:9.3f} {o['seconds_analysing'] + o['seconds_pruning_all']:6.1f} | "
              f"{agree['convs_compared']:3d} convs, {agree['max_abs_output_diff'] or 0:.1e}")
    write_results("pruner_vs_paddleslim", rows, {"ratio": args.ratio, "input": [3, args.size, args.size],
                                                 "paddle": version, "criterion": "l1_norm"})


if __name__ == "__main__":
    main()
