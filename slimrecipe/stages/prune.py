"""`prune`: filter pruning to a target (tolerated metric loss, FLOPs cut, or explicit ratios), as a saved plan."""

from __future__ import annotations

import copy

from ..errors import RecipeError
from ..fileio import read_json, write_json
from ..pruning.latency import TARGET_SCHEMA as LATENCY_TARGET_SCHEMA
from ..registry import register
from ._training import save_weights

RECONSTRUCT_SCHEMA = {
    "type": "object",
    "additionalProperties": False,
    "description": "after cutting, refit every plain convolution and linear layer, from the input on, so that it "
                   "computes what the unpruned model computed there (least squares on training images, each layer "
                   "on the inputs the refitted layers before it give it). Only values change: the plan still fits",
    "properties": {
        "enabled": {"type": "boolean", "default": True},
        "images": {"type": "integer", "minimum": 1, "maximum": 1024, "default": 64,
                   "description": "training images the layers are refitted on (one forward pass of each model)"},
        "samples": {"type": "integer", "minimum": 64, "maximum": 1000000, "default": 16384,
                    "description": "output positions per layer the least squares fit"},
        "ridge": {"type": "number", "minimum": 0, "maximum": 100, "default": 0.01,
                  "description": "pull towards the layer's pruned weights, relative to the mean feature energy"},
    },
}
SCHEMA = {
    "type": "object",
    "additionalProperties": False,
    "required": ["target"],
    "properties": {
        "criterion": {"enum": ["l1_norm", "l2_norm", "fpgm", "taylor"], "default": "l1_norm",
                      "description": "which channels of a group go first, scored over every tensor of the group "
                                     "(taylor: first-order Taylor |w * grad| over `taylor_batches` training batches)"},
        "backend": {"enum": ["slimrecipe", "paddleslim"], "default": "slimrecipe",
                    "description": "who picks each group's channels: slimrecipe's own criteria, or PaddleSlim's "
                                   "L1NormFilterPruner on the group's leading convolution, to reproduce a "
                                   "PaddleSlim workflow (Paddle 2.6 only; the `paddleslim` extra). Either way the "
                                   "plan records the channels removed and slimrecipe's surgery applies it"},
        "taylor_batches": {"type": "integer", "minimum": 1, "default": 4,
                           "description": "training batches (of train.batch_size or 8) for the taylor criterion"},
        "target": {
            "type": "object",
            "additionalProperties": False,
            "minProperties": 1,
            "maxProperties": 1,
            "description": "exactly one of eval_metric_loss, per_layer_loss, flops, latency, ratios",
            "properties": {
                "eval_metric_loss": {"type": "number", "minimum": 0, "maximum": 1,
                                     "description": "largest tolerated metric loss of the model the run delivers "
                                                    "(after finetune, and quantization when the recipe "
                                                    "quantizes), in the metric's units (0.01: one point of "
                                                    "accuracy). Missed: prune less and try again, up to "
                                                    "`prune.rounds` rounds (see rounds.json)"},
                "per_layer_loss": {"type": "number", "minimum": 0, "maximum": 1,
                                   "description": "PaddleX's eval_metric_loss: per group, the largest ratio whose "
                                                  "measured relative loss, that group alone pruned, stays within "
                                                  "this (the groups' losses add up: the end result loses more)"},
                "flops": {"type": "number", "exclusiveMinimum": 0, "exclusiveMaximum": 1,
                          "description": "share of FLOPs to remove, reached within `tolerance`"},
                "latency": LATENCY_TARGET_SCHEMA,
                "ratios": {"type": "object", "minProperties": 1,
                           "additionalProperties": {"type": "number", "minimum": 0, "exclusiveMaximum": 1},
                           "description": "explicit {parameter: ratio}"},
            },
        },
        "rounds": {"type": "integer", "minimum": 1, "maximum": 20, "default": 3,
                   "description": "eval_metric_loss: rounds of prune + finetune (+ quantize) at most"},
        "first_round_reach": {"type": "number", "exclusiveMinimum": 0, "maximum": 100, "default": 5,
                              "description": "eval_metric_loss: the first round prunes each group as far as "
                                             "the per-layer rule allows at this multiple of the target "
                                             "(finetuning wins back much of what each group alone loses); "
                                             "later rounds back off from there"},
        "backoff": {"type": "number", "exclusiveMinimum": 0, "exclusiveMaximum": 1, "default": 0.5,
                    "description": "eval_metric_loss: a missed round's FLOPs cut times this is the next round's"},
        "tolerance": {"type": "number", "exclusiveMinimum": 0, "maximum": 0.2, "default": 0.01,
                      "description": "flops target: allowed distance from the target cut; latency target: how far "
                                     "below the asked share the planned share may fall"},
        "align": {"enum": [None, 1, 8, 16], "default": None, "description": "keep channel counts a multiple of this"},
        "reconstruct": RECONSTRUCT_SCHEMA,
    },
}


@register("stage", "prune", schema=SCHEMA)
def prune(state, params: dict) -> dict:
    """Plan (skip rules + target), write plan.json, prune the current model by it, save the weights."""
    from ..pruning import (analyse, apply_plan, apply_skip_rules, make_plan, ratios_for_flops_target,
                           ratios_for_metric_loss)

    model = state.model
    shape = state.input_shape
    criterion = params["criterion"]
    if params["backend"] == "paddleslim":
        _check_paddleslim_backend(criterion)
    align = params["align"]
    target = params["target"]
    sens_file = state.run_dir / "sensitivity.json"
    table = _float_table(read_json(sens_file)["table"]) if sens_file.exists() else {}
    groups, prunable = analyse(model, shape)
    kept, skipped = apply_skip_rules(prunable, table, state.recipe.get("skip") or {})
    achieved = latency = None
    round_info = getattr(state, "round", None) or {}
    if "eval_metric_loss" in target and round_info.get("flops"):
        # a later round: the previous one missed the target, so a smaller cut, least sensitive groups first
        ratios, achieved = _flops_ratios(model, shape, {k: table[k] for k in kept if k in table},
                                         round_info["flops"], params, state)
    elif "eval_metric_loss" in target or "per_layer_loss" in target:
        # the first round of an end-result target starts where the per-layer rule puts it at `first_round_reach`
        # times the target (relative to the baseline metric, as the sensitivity table measures loss)
        limit = target.get("per_layer_loss")
        if limit is None:
            limit = params["first_round_reach"] * target["eval_metric_loss"] / max(abs(_baseline_metric(state)), 1e-9)
        ratios = ratios_for_metric_loss({k: table[k] for k in kept if k in table}, limit)
    elif "flops" in target:
        ratios, achieved = ratios_for_flops_target(
            model, shape, {k: table[k] for k in kept if k in table}, target["flops"],
            tolerance=params["tolerance"], align=align,
            min_channels=(state.recipe.get("skip") or {}).get("min_channels"))
    elif "latency" in target:
        from ..pruning.latency import plan_latency

        latency = plan_latency(model, shape, {k: table[k] for k in kept if k in table}, target["latency"],
                               align=align, min_channels=(state.recipe.get("skip") or {}).get("min_channels"),
                               tolerance=params["tolerance"], cache_dir=state.cache_dir / "latency",
                               identity=state.recipe["model"])
        ratios = latency.ratios
    else:
        names = {p["name"] for p in prunable}
        unknown = [k for k in target["ratios"] if k not in names]
        if unknown:
            raise RecipeError(f"not a prunable group of this model: {unknown[:3]}; prunable: "
                              f"{sorted(names)[:6]} ...", path=f"prune.target.ratios.{unknown[0]}")
        ratios = {k: v for k, v in target["ratios"].items() if k in kept}
    plan = make_plan(model, shape, prunable, ratios, skipped, criterion=criterion, align=align,
                     min_channels=(state.recipe.get("skip") or {}).get("min_channels"), groups=groups)
    write_json(state.run_dir / "plan.json", plan)  # written before pruning: a failed prune leaves its plan

    before = state.measure(model)
    if params["backend"] == "paddleslim":
        plan = paddleslim_choices(model, shape, plan, groups)
    taylor = _taylor_scores(state, model, params["taylor_batches"]) if criterion == "taylor" else None
    teacher = copy.deepcopy(model) if params["reconstruct"]["enabled"] else None
    plan = apply_plan(model, shape, plan, taylor=taylor)
    write_json(state.run_dir / "plan.json", plan)  # now with the channels each group lost
    reconstruction = _reconstruct(state, model, teacher, groups, plan, params["reconstruct"]) if teacher else None
    weights = save_weights(model, state.stage_dir / "model.pdparams")
    after = state.measure(model)
    latency_result = latency.verify(model) if latency else None
    n_pruned = sum(1 for p in plan["params"].values() if p["channels_after"] < p["channels_before"])
    summary = {"prunable": len(plan["params"]), "pruned": n_pruned, "skipped": len(skipped)}
    print(f"  pruned {n_pruned}/{len(plan['params'])} channel groups ({len(plan['unprunable'])} not prunable): FLOPs {before['flops']:.4g} -> {after['flops']:.4g}"
          f" ({1 - after['flops'] / before['flops']:.1%} cut), {state.metric.name} {before['metric']:.4f} -> "
          f"{after['metric']:.4f}")
    return {"before": before, "after": after, "metric": after["metric"], "flops": after["flops"],
            "params": after["params"], "flops_cut": 1 - after["flops"] / before["flops"],
            "target": target, "achieved_flops_cut_planned": achieved, "plan_summary": summary,
            **({"reconstruction": reconstruction} if reconstruction else {}),
            **({"latency": latency_result} if latency_result else {}),
            "checkpoint": state.set_model(model, weights, plan=plan)}


def _reconstruct(state, model, teacher, groups, plan: dict, params: dict) -> dict:
    """Refit the pruned ``model`` to ``teacher`` (the model before the cut) on training images; the layer errors."""
    import time

    from tqdm import tqdm

    from ..pruning.reconstruct import reconstruct
    from .sensitivity import training_batches

    images = min(params["images"], len(state.data.train))
    batch = training_batches(state, 1, images)[0][0]
    removed = {name: item["removed"] for name, item in plan["params"].items()}
    start = time.perf_counter()
    with tqdm(desc="reconstruct", unit="layer", leave=False) as bar:
        def progress(done, total, name):
            bar.total = total
            bar.update(1)

        result = reconstruct(model, teacher, groups, removed, [batch], samples=params["samples"],
                             ridge=params["ridge"], seed=state.seed, progress=progress)
    result.update(images=images, seconds=round(time.perf_counter() - start, 1))
    print(f"  reconstructed {result['layers']} layers on {images} training images: output error (relative, summed "
          f"over layers) {result['error_before']:.3g} -> {result['error_after']:.3g}")
    return result


def _baseline_metric(state) -> float:
    if "evaluate" in state.results:
        return float(state.results["evaluate"]["metric"])
    return float(state.evaluate())


def _flops_ratios(model, shape, table: dict, cut: float, params: dict, state):
    """Ratios for a FLOPs cut, widening the tolerance when channel steps jump over a small target."""
    from ..pruning import ratios_for_flops_target

    tolerance = params["tolerance"]
    while True:
        try:
            return ratios_for_flops_target(model, shape, table, cut, tolerance=tolerance, align=params["align"],
                                           min_channels=(state.recipe.get("skip") or {}).get("min_channels"))
        except RecipeError:
            if tolerance >= 0.2:
                raise
            tolerance = min(0.2, tolerance * 2)


def _check_paddleslim_backend(criterion: str) -> None:
    from ..paddle_env import paddle, paddleslim

    version = paddle().__version__
    if not version.startswith("2.6"):
        raise RecipeError(f"PaddleSlim 2.6, its last release, fails on Paddle {version} (its pruner traces "
                          "through static-graph internals that Paddle 3 removed); this backend needs Paddle 2.6.2: "
                          "pip install 'slimrecipe[paddle26,paddleslim]', or use backend: slimrecipe",
                          path="prune.backend")
    if criterion != "l1_norm":
        raise RecipeError(f"the paddleslim backend prunes by PaddleSlim's L1 norm; got criterion {criterion!r}",
                          path="prune.criterion")
    paddleslim()  # not installed: a message naming the extra


def paddleslim_choices(model, shape, plan: dict, groups) -> dict:
    """The plan with each group's ``removed`` channels as PaddleSlim's L1NormFilterPruner picks them when it
    prunes the group's leading convolution (on a copy of the model) to the plan's channel count. A group
    PaddleSlim cannot prune (a concat-fed or transposed convolution, say) stays whole, with PaddleSlim's error as
    its rule. The model itself is untouched: slimrecipe's surgery applies the plan."""
    import copy

    from ..paddle_env import paddleslim

    slim = paddleslim()
    full = [1, *shape]
    leaders = {g.name for g in groups if g.prunable}
    out = copy.deepcopy(plan)
    for name, item in out["params"].items():
        cut = item["channels_before"] - item["channels_after"]
        if not cut or name not in leaders:
            continue
        trial = copy.deepcopy(model)
        weight = dict(trial.named_parameters())[name]
        before = weight.numpy().copy()
        try:
            pruner = slim.dygraph.L1NormFilterPruner(trial, full)
            # PaddleSlim removes round(ratio * channels): exactly `cut`
            pruner.prune_vars({weight.name: cut / item["channels_before"]}, axis=0)
        except Exception as e:  # noqa: BLE001 -- PaddleSlim's refusal is the outcome, recorded in the plan
            first = (str(e).strip().splitlines() or [type(e).__name__])[0][:160]
            item.update(ratio=0.0, channels_after=item["channels_before"], rule=f"prune.backend paddleslim: {first}")
            continue
        removed = removed_rows(before, dict(trial.named_parameters())[name].numpy())
        item.update(removed=removed, channels_after=item["channels_before"] - len(removed),
                    ratio=len(removed) / item["channels_before"], rule=f"{item['rule']} (channels: paddleslim)")
    return out


def removed_rows(before, after) -> list[int]:
    """Which rows (output channels) of weight ``before`` are missing from ``after``, whose rows kept their order."""
    import numpy as np

    kept, j = set(), 0
    for i in range(before.shape[0]):
        if j < after.shape[0] and np.array_equal(before[i], after[j]):
            kept.add(i)
            j += 1
    return sorted(set(range(before.shape[0])) - kept)


def _taylor_scores(state, model, n_batches: int) -> dict:
    from ..batching import iterate_batches
    from ..pruning.importance import taylor_scores
    from ._training import default_loss

    batch_size = int((state.recipe.get("train") or {}).get("batch_size") or 8)
    loss_of = getattr(model, "loss", None) or default_loss
    batches = iterate_batches(state.data.train, batch_size, shuffle=True, seed=state.seed, drop_last=True)
    was_training = model.training
    model.train()
    try:
        return taylor_scores(model, (b for _, b in zip(range(n_batches), batches)),
                             lambda m, batch: loss_of(m(batch[0]), batch))
    finally:
        model.train() if was_training else model.eval()


def _float_table(table: dict) -> dict:
    return {p: {float(r): float(v) for r, v in row.items()} for p, row in table.items()}
