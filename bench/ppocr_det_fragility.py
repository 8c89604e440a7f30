"""How much of the pretrained PP-OCRv4 mobile det survives pruning before any finetuning, part by part.

Each row prunes the same share of channels (L1 criterion) from every prunable group of one part of the model
(the first convolution is left alone), with no finetuning, and evaluates hmean on the held-out text_scene
validation split. Run from the repository root:

    python bench/ppocr_det_fragility.py [--ratios 0.1 0.2] [--profile smoke|full] [--compensate]

``--compensate`` also adds, to each convolution that loses input channels, the removed channels' mean
contribution on a few training batches (folded into its bias): a cheap correction, measured here beside the
plain cut. Figures go to bench/results/ppocr_det_fragility.json.
"""

from __future__ import annotations

import argparse
import copy
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _results import write_results  # noqa: E402

PARTS = {
    "backbone blocks 2-3": ("backbone.blocks2", "backbone.blocks3"),
    "backbone blocks 4": ("backbone.blocks4",),
    "backbone blocks 5": ("backbone.blocks5",),
    "backbone blocks 6": ("backbone.blocks6",),
    "backbone outputs (layer_list)": ("backbone.layer_list",),
    "neck": ("neck",),
    "head": ("head",),
    "everything but the head": ("backbone", "neck"),
}


def input_means(model, batches) -> dict:
    """Mean of every Conv2D's input, per channel, over ``batches`` (eval mode)."""
    from slimrecipe.paddle_env import paddle

    p = paddle()
    sums, hooks = {}, []
    for name, layer in model.named_sublayers():
        if isinstance(layer, p.nn.Conv2D):
            def pre(_layer, inputs, name=name):
                x = inputs[0].numpy()
                total, n = sums.get(name, (0.0, 0))
                sums[name] = (total + x.mean(axis=(0, 2, 3)), n + 1)
            hooks.append(layer.register_forward_pre_hook(pre))
    model.eval()
    with p.no_grad():
        for batch in batches:
            model(p.to_tensor(batch))
    for hook in hooks:
        hook.remove()
    return {name: total / n for name, (total, n) in sums.items()}


def compensate(model, groups, applied: dict, means: dict) -> int:
    """Fold the removed input channels' mean contribution into the bias of each reader that has one."""
    layers = dict(model.named_sublayers())
    by_name = {g.name: g for g in groups}
    changed = 0
    for name, item in applied["params"].items():
        if not item["removed"]:
            continue
        for member in by_name[name].members:
            layer_name = member.param.rsplit(".", 1)[0]
            layer = layers[layer_name]
            if member.role != "conv_in" or layer._groups != 1 or layer.bias is None:
                continue
            idx = member.indices(item["removed"])
            delta = layer.weight.numpy()[:, idx].sum(axis=(2, 3)) @ means[layer_name][idx]
            layer.bias.set_value((layer.bias.numpy() + delta).astype("float32"))
            changed += 1
    return changed


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--ratios", type=float, nargs="+", default=[0.1, 0.2])
    ap.add_argument("--profile", choices=["smoke", "full"], default="smoke",
                    help="smoke: 8 validation scenes up to 480 px; full: the flagship's 60 up to 960 px")
    ap.add_argument("--compensate", action="store_true")
    args = ap.parse_args()

    from tqdm import tqdm

    from slimrecipe.config import compose, validate
    from slimrecipe.pruning import analyse, apply_plan, count_flops, make_plan
    from slimrecipe.run import RunState

    overrides = ["+recipe=ocr_det_prune"] + (["+profile=smoke"] if args.profile == "smoke" else [])
    recipe = validate(compose(overrides))
    state = RunState(recipe, Path("/tmp/slimrecipe-bench-fragility"))
    base, shape = state.model, state.input_shape
    groups, prunable = analyse(base, shape)
    flops0 = count_flops(base, [1, *shape])
    data = state.data
    batches = [np.asarray(data.collate_fn([data.train[i] for i in range(j * 4, j * 4 + 4)])[0], dtype=np.float32)
               for j in range(4)]
    means = input_means(base, batches) if args.compensate else None
    t0 = time.perf_counter()
    baseline = state.evaluate(base, batch_size=1)
    rows = []
    jobs = [(part, r, comp) for part in PARTS for r in args.ratios for comp in ([False, True] if args.compensate
                                                                              else [False])]
    print(f"baseline hmean {baseline:.4f} on {len(data.val)} held-out scenes ({args.profile})")
    for part, ratio, comp in tqdm(jobs, desc="prune and evaluate", unit="model"):
        ratios = {e["name"]: ratio for e in prunable if e["index"] > 0 and e["name"].startswith(PARTS[part])}
        model = copy.deepcopy(base)
        applied = apply_plan(model, shape, make_plan(model, shape, prunable, ratios, groups=groups))
        if comp:
            model = copy.deepcopy(base)
            compensate(model, groups, applied, means)
            apply_plan(model, shape, applied)
        cut = 1 - count_flops(model, [1, *shape]) / flops0
        rows.append({"part": part, "ratio": ratio, "compensated": comp, "groups": len(ratios),
                     "flops_cut": round(cut, 4), "hmean": round(state.evaluate(model, batch_size=1), 4)})
    print(f"\n{'part':32s} {'ratio':>5s} {'comp':>5s} {'groups':>6s} {'FLOPs cut':>9s} {'hmean':>7s}")
    for r in rows:
        print(f"{r['part']:32s} {r['ratio']:5.2f} {str(r['compensated']):>5s} {r['groups']:6d} "
              f"{r['flops_cut']:9.3f} {r['hmean']:7.4f}")
    write_results("ppocr_det_fragility", {"baseline_hmean": round(baseline, 4), "rows": rows,
                                          "seconds": round(time.perf_counter() - t0, 1)},
                  {"profile": args.profile, "validation_scenes": len(data.val), "criterion": "l1_norm",
                   "finetuning": "none", "eval_batch_size": 1, "ratios": args.ratios})


if __name__ == "__main__":
    main()
