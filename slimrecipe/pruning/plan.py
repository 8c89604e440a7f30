"""Plans: what can be pruned (channel groups), the exact channel count each group keeps, and applying a plan.

Groups are named by the structured name of their leading weight (the ``state_dict`` key, e.g.
``"neck.ins_conv.0.conv.weight"``): Paddle's internal names (``conv2d_7.w_0``) depend on how many layers the
process built before. A plan records every group (the prunable ones with their channel counts before and after
and the rule that decided them; the others with the reason they stay whole) and, once applied, the channels
each group lost. It is re-applied as is to a fresh model before that model's weights are loaded (STACK.md
trap 8): the pruning is never re-derived.
"""

from __future__ import annotations

import copy
import math

from ..errors import RecipeError, StageError
from .graph import Group, TraceError, channel_groups, count_flops
from .importance import CRITERIA, channels_to_remove, group_importance
from .surgery import prune_group
from .targets import _check_align, _check_min_channels, _kept_channels

PLAN_FORMAT = "slimrecipe.prune_plan/2"


def full_shape(input_shape) -> list[int]:
    """A per-sample image shape ``[C, H, W]`` gets a batch of 1; a longer shape is taken as already batched."""
    try:
        shape = [int(s) for s in input_shape]
    except (TypeError, ValueError):
        raise StageError(f"input_shape must be a list of integers, got {input_shape!r}") from None
    if not shape or any(s <= 0 for s in shape):
        raise StageError(f"input_shape must be positive integers, got {shape}")
    return [1, *shape] if len(shape) == 3 else shape


def analyse(model, input_shape) -> tuple[list[Group], list[dict]]:
    """(every channel group of the model, one entry per prunable group), traced once.

    An entry: ``name`` (the group's leading weight), ``param_name`` (that weight's internal Paddle name, which
    PaddleSlim's tables use), ``channels``, ``type`` (conv, depthwise, transpose, linear), ``index`` (0 = nearest
    the input, among prunable groups) and ``members`` (``"param@axis"`` of every tensor that loses channels).
    """
    try:
        groups = channel_groups(model, full_shape(input_shape)[1:])
    except TraceError as e:
        raise StageError(f"could not trace the model to find its channel groups: {e}") from e
    internal = {name: p.name for name, p in model.named_parameters()}
    entries = []
    for g in groups:
        if g.prunable:
            entries.append({"name": g.name, "param_name": internal.get(g.name, g.name), "channels": g.channels,
                            "type": g.type, "index": len(entries),
                            "members": [f"{m.param}@{m.axis}" for m in g.members]})
    return groups, entries


def prunable_params(model, input_shape) -> list[dict]:
    """One entry per prunable channel group, from the input on (see :func:`analyse`)."""
    return analyse(model, input_shape)[1]


def count_params(model, *, trainable_only: bool = False) -> int:
    """Number of values in the model's parameters, each shared parameter once (what a saved model holds)."""
    total, seen = 0, set()
    for p in model.parameters():
        if id(p) in seen or (trainable_only and p.stop_gradient):
            continue
        seen.add(id(p))
        total += int(math.prod(p.shape))
    return total


def _check_criterion(criterion: str, path: str = "prune.criterion") -> None:
    if criterion not in CRITERIA:
        raise RecipeError(f"unknown criterion {criterion!r}; choose one of {list(CRITERIA)}", path=path)


def make_plan(model, input_shape, prunable: list[dict] | None, ratios: dict[str, float],
              skipped: dict[str, str] | None = None, *, criterion: str = "l1_norm", align: int | None = None,
              min_channels: int | None = None, groups: list[Group] | None = None) -> dict:
    """The pruning plan: the exact channel count every prunable group keeps, and why.

    ``{"format", "criterion", "align", "min_channels", "input_shape", "params": {name: {"ratio",
    "channels_before", "channels_after", "rule", "members"}}, "unprunable": {name: {"channels", "reason",
    "members"}}}``; ``params`` covers every prunable group in order from the input; a skipped one has ratio 0 and
    its skip reason as ``rule``. ``ratio`` is ``1 - channels_after / channels_before``. ``ratios`` may name a
    group by its leading weight's structured or internal name.
    """
    _check_criterion(criterion)
    align = _check_align(align)
    min_channels = _check_min_channels(min_channels)
    skipped = skipped or {}
    if prunable is None:
        groups, prunable = analyse(model, input_shape)
    by_any = {e["name"]: e for e in prunable} | {e["param_name"]: e for e in prunable}
    unknown = [k for k in ratios if k not in by_any]
    if unknown:
        raise StageError(f"ratios for groups that are not prunable: {unknown[:5]}")
    wanted = {by_any[k]["name"]: float(v) for k, v in ratios.items()}
    params = {}
    for e in prunable:
        before = e["channels"]
        ratio = wanted.get(e["name"], 0.0)
        if not 0 <= ratio < 1 or not math.isfinite(ratio):
            raise StageError(f"ratio {ratio!r} for {e['name']} is outside [0, 1)")
        item = {"ratio": 0.0, "channels_before": before, "channels_after": before, "rule": "kept",
                "members": e["members"]}
        if e["name"] in skipped:
            item["rule"] = skipped[e["name"]]
        elif ratio > 0:
            after = _kept_channels(before, ratio, align, min_channels)
            if min_channels and after > _kept_channels(before, ratio, align):
                item["note"] = f"skip.min_channels: kept {after} channels"
            item.update(ratio=(before - after) / before, channels_after=after)
        params[e["name"]] = item
    unprunable = {g.name: {"channels": g.channels, "reason": g.reason,
                           "members": [f"{m.param}@{m.axis}" for m in g.members]}
                  for g in (groups or []) if not g.prunable}
    return {"format": PLAN_FORMAT, "criterion": criterion, "align": align, "min_channels": min_channels,
            "input_shape": list(input_shape), "params": params, "unprunable": unprunable}


def _check_plan(plan) -> None:
    if not isinstance(plan, dict) or not isinstance(plan.get("params"), dict):
        raise StageError("not a pruning plan: expected a dict with a 'params' mapping")
    if plan.get("format") != PLAN_FORMAT:
        raise StageError(f"a plan of format {plan.get('format')!r}; this slimrecipe reads {PLAN_FORMAT!r} "
                         "(plans of PaddleSlim-based slimrecipe 0.1 name parameters, not channel groups)")
    if plan.get("criterion", "l1_norm") not in CRITERIA:
        raise StageError(f"the plan names an unknown criterion {plan.get('criterion')!r}")
    for name, item in plan["params"].items():
        before, after = (item.get("channels_before"), item.get("channels_after")) if isinstance(item, dict) \
            else (None, None)
        if not all(isinstance(v, int) and not isinstance(v, bool) for v in (before, after)) \
                or not 1 <= after <= before:
            raise StageError(f"the plan's entry for {name} is invalid: {item!r}")
        removed = item.get("removed")
        if removed is not None and (not isinstance(removed, list) or len(set(removed)) != before - after
                                    or any(not isinstance(i, int) or not 0 <= i < before for i in removed)):
            raise StageError(f"the plan's removed channels for {name} do not fit {before} -> {after}")


def apply_plan(model, input_shape, plan: dict, *, taylor: dict | None = None) -> dict:
    """Prune ``model`` in place to exactly the plan's channel counts; returns the plan with ``removed`` filled in.

    Channels a plan already lists as ``removed`` are removed as listed (a plan re-applied to a fresh model before
    loading pruned weights, or to the same trained model again, gives the same result). Otherwise each group's
    least important channels go, ranked by the plan's criterion over every member tensor (``taylor``: the scores
    of :func:`~slimrecipe.pruning.importance.taylor_scores`, for the ``taylor`` criterion). The plan must fit the
    model: the same prunable groups, the same channel counts before. Build optimizers after this call.
    """
    _check_plan(plan)
    criterion = plan.get("criterion", "l1_norm")
    groups, prunable = analyse(model, input_shape)
    by_name = {g.name: g for g in groups if g.prunable}
    missing = [n for n in by_name if n not in plan["params"]]
    extra = [n for n in plan["params"] if n not in by_name]
    if missing or extra:
        raise StageError(f"the plan does not fit this model: it lacks {missing[:5]} and names {extra[:5]}, "
                         "which are not prunable here (a plan for another architecture?)")
    wrong = [(n, plan["params"][n]["channels_before"], g.channels) for n, g in by_name.items()
             if plan["params"][n]["channels_before"] != g.channels]
    if wrong:
        raise StageError("the plan does not fit this model: channels before pruning (plan vs model) differ for "
                         + ", ".join(f"{n} ({a} vs {b})" for n, a, b in wrong[:5]))
    applied = copy.deepcopy(plan)
    # decide every group's channels on the unpruned weights first, then cut: one group's cut must not change
    # another's ranking (they can share tensors, e.g. a convolution fed by a concat)
    for name, item in applied["params"].items():
        n_remove = item["channels_before"] - item["channels_after"]
        if item.get("removed") is None:
            item["removed"] = [] if n_remove == 0 else channels_to_remove(
                group_importance(model, by_name[name], criterion, taylor), n_remove)
    try:
        for name, item in applied["params"].items():
            if item["removed"]:
                prune_group(model, by_name[name], item["removed"])
        count_flops(model, full_shape(input_shape))  # a forward pass: fails if the pruned shapes do not fit
    except Exception as e:
        raise StageError(f"could not apply the plan ({type(e).__name__}: {e}); the model is left part-pruned, "
                         "rebuild it before using it again") from e
    return applied


def load_pruned(fresh_model, input_shape, plan: dict, state_dict: dict):
    """Re-apply ``plan`` (with its removed channels) to a freshly built model, then load ``state_dict``, checked.

    Any missing, unexpected or differently shaped tensor is a ``StageError``. Returns the model.
    """
    import numpy as np

    apply_plan(fresh_model, input_shape, plan)
    expected = fresh_model.state_dict()
    missing = [k for k in expected if k not in state_dict]
    unexpected = [k for k in state_dict if k not in expected]
    shapes = [(k, list(state_dict[k].shape), list(v.shape)) for k, v in expected.items()
              if k in state_dict and list(state_dict[k].shape) != list(v.shape)]
    if missing or unexpected or shapes:
        parts = []
        if missing:
            parts.append(f"missing {missing[:5]}")
        if unexpected:
            parts.append(f"unexpected {unexpected[:5]}")
        if shapes:
            parts.append("shape (weights vs model) " + ", ".join(f"{k} {a} vs {b}" for k, a, b in shapes[:5]))
        raise StageError("the weights do not fit the model pruned by the plan: " + "; ".join(parts)
                         + ". Were they saved from a model pruned by this plan?")
    fresh_model.set_state_dict(state_dict)
    for key, value in fresh_model.state_dict().items():
        src = state_dict[key]
        src = src.numpy() if hasattr(src, "numpy") else np.asarray(src)
        if not np.array_equal(value.numpy(), src.astype(value.numpy().dtype)):
            raise StageError(f"{key} did not load: its value differs after set_state_dict")
    return fresh_model


class FlopsProbe:
    """FLOPs cut of a channel configuration, measured on a pruned copy of the model (the model is not touched)."""

    def __init__(self, model, input_shape):
        self.model = model
        self.shape = full_shape(input_shape)
        self.groups, entries = analyse(model, input_shape)
        self.channels = {e["name"]: e["channels"] for e in entries}
        self.base = count_flops(model, self.shape)
        self.cache: dict[tuple, float] = {}

    def cut(self, kept: dict[str, int]) -> float:
        key = tuple(sorted((n, k) for n, k in kept.items() if k < self.channels[n]))
        if key not in self.cache:
            model, groups = copy.deepcopy((self.model, self.groups))
            by_name = {g.name: g for g in groups}
            for n, k in key:  # which channels go does not change the count: drop the last ones
                prune_group(model, by_name[n], list(range(k, self.channels[n])))
            self.cache[key] = (self.base - count_flops(model, self.shape)) / self.base
        return self.cache[key]
