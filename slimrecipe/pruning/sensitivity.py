"""Sensitivity: the relative metric loss when each prunable channel group alone loses a share of its channels."""

from __future__ import annotations

import copy
import math
from pathlib import Path
from typing import Any, Callable

from ..errors import RecipeError, StageError
from .importance import channels_to_remove, group_importance
from .plan import analyse, full_shape
from .surgery import prune_group
from .targets import _kept_channels

CHECKPOINT_FORMAT = "slimrecipe.sensitivity/2"
# what a sensitivity analysis can rank channels by without training data in hand
SENSITIVITY_CRITERIA = ("l1_norm", "l2_norm", "fpgm")


def ratio_key(ratio: float) -> str:
    """How a ratio is written as a JSON key: ``0.30000000000000004`` and ``0.3`` are the same point."""
    return f"{float(ratio):.6g}"


def _check_ratios(ratios, path: str) -> list[float]:
    try:
        values = sorted({round(float(r), 6) for r in ratios})
    except (TypeError, ValueError):
        raise RecipeError(f"ratios must be numbers, got {ratios!r}", path=path) from None
    if not values:
        raise RecipeError("give at least one ratio", path=path)
    bad = [r for r in values if not 0 < r < 1]
    if bad:
        raise RecipeError(f"ratios must lie strictly between 0 and 1, got {bad}", path=path)
    return values


def fingerprint(model) -> str:
    """sha256 of the weights, keyed by structured name: a checkpoint belongs to the weights it measured."""
    import hashlib

    import numpy as np

    h = hashlib.sha256()
    for key, value in sorted(model.state_dict().items()):
        arr = np.ascontiguousarray(value.numpy())
        h.update(f"{key}|{arr.dtype}|{arr.shape}|".encode())
        h.update(arr.tobytes())
    return h.hexdigest()


def pruned_copy(model, groups, name: str, ratio: float, criterion: str):
    """A copy of ``model`` whose group ``name`` lost ``ratio`` of its channels (the least important ones)."""
    model_copy, groups_copy = copy.deepcopy((model, groups))
    group = next(g for g in groups_copy if g.name == name)
    n_remove = group.channels - _kept_channels(group.channels, ratio)
    prune_group(model_copy, group, channels_to_remove(group_importance(model_copy, group, criterion), n_remove))
    return model_copy


def compute_sensitivity(model, input_shape, evaluate: Callable[[Any], float], *, ratios, criterion: str = "l1_norm",
                        params=None, loss_ceiling: float | None = None, checkpoint_path=None,
                        progress: bool = True, higher_is_better: bool = True) -> dict:
    """Relative metric loss when each prunable group alone loses each share of its channels.

    ``evaluate(model) -> float`` is called once for the baseline and once per point, each time on a pruned copy
    (``model`` itself is never changed). The loss is the metric's drop relative to the baseline, in the metric's
    own direction (``higher_is_better``). Each point is saved to ``checkpoint_path`` as it is measured; a later
    call with the same weights and criterion skips the points already there. Returns ``{"baseline", "table":
    {group: {ratio_key: loss}}, "evaluations" (calls made by this call), "criterion", "ratios"}``.
    """
    from tqdm import tqdm

    from ..fileio import write_json

    ratios = _check_ratios(ratios, "sensitivity.ratios")
    if criterion not in SENSITIVITY_CRITERIA:
        raise RecipeError(f"unknown criterion {criterion!r}; choose one of {list(SENSITIVITY_CRITERIA)}",
                          path="sensitivity.criterion")
    if loss_ceiling is not None:
        if isinstance(loss_ceiling, bool) or not isinstance(loss_ceiling, (int, float)) \
                or not math.isfinite(loss_ceiling):
            raise RecipeError(f"loss_ceiling must be a finite number, got {loss_ceiling!r}",
                              path="sensitivity.loss_ceiling")
    full_shape(input_shape)
    groups, prunable = analyse(model, input_shape)
    targets = select_groups(prunable, params, "sensitivity.params")
    state = {"format": CHECKPOINT_FORMAT, "criterion": criterion, "input_shape": list(input_shape),
             "weights_sha256": fingerprint(model), "baseline": None, "table": {}, "complete": False}
    checkpoint = Path(checkpoint_path) if checkpoint_path else None
    if checkpoint is not None and checkpoint.exists():
        state = _load_checkpoint(checkpoint, criterion, state["weights_sha256"], state)

    def save() -> None:
        if checkpoint is not None:
            state["ratios"] = sorted({float(r) for row in state["table"].values() for r in row} | set(ratios))
            write_json(checkpoint, state)

    evaluations = 0

    def measure(candidate) -> float:
        nonlocal evaluations
        evaluations += 1
        value = evaluate(candidate)
        try:
            value = float(value)
        except (TypeError, ValueError):
            raise StageError(f"evaluate() must return a number, got {type(value).__name__}") from None
        if not math.isfinite(value):
            raise StageError(f"evaluate() returned {value}")
        return value

    table = state["table"]
    todo = sum(1 for e in targets for r in ratios if ratio_key(r) not in table.get(e["name"], {}))
    bar = tqdm(total=todo, desc="sensitivity", unit="eval", disable=None if progress else True, leave=False)
    try:
        if state["baseline"] is None:
            baseline = measure(model)
            if baseline <= 0:
                raise StageError(
                    f"the model's baseline metric is {baseline:g}: a sensitivity analysis measures the metric's "
                    "relative drop, which means nothing for a model that scores 0 or less. Train the model "
                    "first (or evaluate on more samples) before analysing its sensitivity.")
            state["baseline"] = baseline
            save()
        baseline = float(state["baseline"])
        for entry in targets:
            row = table.setdefault(entry["name"], {})
            for i, r in enumerate(ratios):
                key = ratio_key(r)
                if key not in row:
                    metric = measure(pruned_copy(model, groups, entry["name"], r, criterion))
                    drop = baseline - metric if higher_is_better else metric - baseline
                    row[key] = drop / baseline
                    save()
                    bar.update(1)
                if loss_ceiling is not None and row[key] > loss_ceiling:
                    rest = sum(1 for r2 in ratios[i + 1:] if ratio_key(r2) not in row)
                    if rest:
                        bar.total -= rest
                        bar.refresh()
                    break
            table[entry["name"]] = dict(sorted(row.items(), key=lambda kv: float(kv[0])))
    finally:
        bar.close()
    state["complete"] = True
    save()

    wanted = {ratio_key(r) for r in ratios}
    result_table = {e["name"]: {k: v for k, v in table[e["name"]].items() if k in wanted} for e in targets}
    return {"baseline": baseline, "table": result_table, "evaluations": evaluations, "criterion": criterion,
            "ratios": ratios}


def select_groups(prunable: list[dict], params, path: str) -> list[dict]:
    """The groups of `prunable` named in `params` (group or parameter names), in model order; None: all of them."""
    if params is None:
        return list(prunable)
    by_name = {e["name"]: e for e in prunable} | {e["param_name"]: e for e in prunable}
    unknown = [p for p in params if p not in by_name]
    if unknown:
        raise RecipeError(f"not prunable groups of this model: {unknown[:5]}; prunable ones start "
                          f"{[e['name'] for e in prunable[:5]]}", path=path)
    chosen = {by_name[p]["name"] for p in params}
    return [e for e in prunable if e["name"] in chosen]


def _load_checkpoint(path: Path, criterion: str, weights_sha256: str, fresh: dict) -> dict:
    from ..fileio import read_json

    try:
        state = read_json(path)
    except (OSError, ValueError) as e:
        raise StageError(f"cannot read the sensitivity checkpoint {path} ({e}); delete it to start over") from e
    if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
        raise StageError(f"{path} is not a slimrecipe sensitivity checkpoint; delete it to start over")
    if state.get("criterion") != criterion:
        raise StageError(f"the checkpoint {path} was measured with criterion {state.get('criterion')!r}, "
                         f"not {criterion!r}; delete it or use the same criterion")
    if state.get("weights_sha256") != weights_sha256:
        raise StageError(f"the checkpoint {path} was measured on other weights; delete it to start over")
    table = state.get("table")
    if not isinstance(table, dict) or not all(isinstance(row, dict) for row in table.values()):
        raise StageError(f"the checkpoint {path} is damaged (no table); delete it to start over")
    baseline = state.get("baseline")
    if baseline is not None and (not isinstance(baseline, (int, float)) or baseline <= 0):
        raise StageError(f"the checkpoint {path} has an invalid baseline {baseline!r}; delete it to start over")
    return {**fresh, **state, "complete": False}
