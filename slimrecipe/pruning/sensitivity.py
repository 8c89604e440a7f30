"""Sensitivity: the relative metric loss when each prunable channel group alone loses a share of its channels.

Two estimators fill the same table ``{group: {ratio: loss}}``:

- measured (:func:`compute_sensitivity`): one evaluation per (group, ratio) on a pruned copy, optionally after
  recomputing that copy's BatchNorm statistics on a few training batches (:func:`recalibrate_batchnorm`), which
  removes the statistics shift that finetuning would remove first;
- one-shot first-order Taylor (:func:`taylor_sensitivity`): a few backward passes give, for every channel, the
  product of its activation and the loss gradient; the predicted loss of removing a set of channels is read off
  those products for every group and ratio at once, then mapped onto the metric's relative loss by measuring a
  handful of candidates (calibration).
"""

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
# the member roles through which a group's channels enter a layer that is linear in its input: summing w * dL/dw
# over those slices gives sum(a * dL/da) over the group's activations, the first-order effect of removing them
CONSUMER_ROLES = ("conv_in", "transpose_in", "linear_in")
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
                        progress: bool = True, higher_is_better: bool = True, bn_batches=None) -> dict:
    """Relative metric loss when each prunable group alone loses each share of its channels.

    ``evaluate(model) -> float`` is called once for the baseline and once per point, each time on a pruned copy
    (``model`` itself is never changed). The loss is the metric's drop relative to the baseline, in the metric's
    own direction (``higher_is_better``). Each point is saved to ``checkpoint_path`` as it is measured; a later
    call with the same weights, criterion and recalibration skips the points already there. ``bn_batches`` (a list
    of training batches): recompute each pruned copy's BatchNorm statistics on them before evaluating it. Returns
    ``{"baseline", "table": {group: {ratio_key: loss}}, "evaluations" (calls made by this call), "criterion",
    "ratios"}``.
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
    bn_batches = list(bn_batches or [])
    state = {"format": CHECKPOINT_FORMAT, "criterion": criterion, "input_shape": list(input_shape),
             "weights_sha256": fingerprint(model), "bn_recalibration": len(bn_batches), "baseline": None,
             "table": {}, "complete": False}
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
                    candidate = pruned_copy(model, groups, entry["name"], r, criterion)
                    if bn_batches:
                        recalibrate_batchnorm(candidate, bn_batches)
                    metric = measure(candidate)
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


def _batchnorm_layers(model) -> list:
    from ..paddle_env import paddle

    base = paddle().nn.layer.norm._BatchNormBase
    return [layer for layer in model.sublayers(include_self=True) if isinstance(layer, base)]


def recalibrate_batchnorm(model, batches) -> int:
    """Recompute the running mean and variance of every BatchNorm layer of ``model`` from ``batches`` (each a list
    whose first item is the input), in place; returns the number of layers recalibrated.

    The layers normalise by batch statistics during these passes (as in training), so each layer sees inputs
    already shaped by the recalibrated layers before it. The statistics are pooled over all batches with equal
    weight (not a moving average); the weights are not changed. The model is left in eval mode.
    """
    import numpy as np

    from ..paddle_env import paddle

    p = paddle()
    layers = _batchnorm_layers(model)
    if not layers:
        return 0
    sums: dict[int, list] = {id(layer): [] for layer in layers}

    def hook(layer, inputs):
        x = inputs[0]
        channel_axis = 1 if str(getattr(layer, "_data_format", "NCHW")).startswith("NC") else len(x.shape) - 1
        axes = [a for a in range(len(x.shape)) if a != channel_axis]
        xs = x.numpy().astype(np.float64)
        sums[id(layer)].append((xs.mean(axis=tuple(axes)), (xs ** 2).mean(axis=tuple(axes))))

    handles = [layer.register_forward_pre_hook(hook) for layer in layers]
    model.train()
    try:
        with p.no_grad():
            for batch in batches:
                model(batch[0])
    finally:
        for handle in handles:
            handle.remove()
        model.eval()
    for layer in layers:
        stats = sums[id(layer)]
        if not stats:
            continue  # not on the forward path
        mean = np.mean([m for m, _ in stats], axis=0)
        variance = np.maximum(np.mean([q for _, q in stats], axis=0) - mean ** 2, 0.0)
        layer._mean.set_value(mean.astype(layer._mean.numpy().dtype))
        layer._variance.set_value(variance.astype(layer._variance.numpy().dtype))
    return len(layers)


def channel_gradient_products(model, groups, names, batches, loss_fn) -> dict[str, "np.ndarray"]:
    """Per group in ``names``: a [batches, channels] array of sum(a * dL/da) over each channel's activations.

    Read off the consumers of the group (the convolutions and linear layers that take its channels as input):
    for a layer linear in its input, sum(w * dL/dw) over the weights that read channel c equals sum(a_c * dL/da_c)
    over what flows into that layer. One backward pass per batch, on a copy in training mode (the outputs a
    model's own loss expects; the copy's BatchNorm statistics move, ``model``'s do not).
    """
    import numpy as np

    from .importance import _channel_rows

    model = copy.deepcopy(model)
    model.train()
    weights = {name: param for name, param in model.named_parameters() if not param.stop_gradient}
    chosen = [g for g in groups if g.name in set(names)]
    members = {g.name: [m for m in g.members if m.role in CONSUMER_ROLES and m.param in weights] for g in chosen}
    products: dict[str, list] = {g.name: [] for g in chosen}
    for batch in batches:
        loss = loss_fn(model, batch)
        loss.backward()
        arrays = {}
        for g in chosen:
            row = np.zeros(g.channels)
            for m in members[g.name]:
                param = weights[m.param]
                if param.grad is None:
                    continue
                if m.param not in arrays:
                    arrays[m.param] = param.numpy().astype(np.float64) * param.grad.numpy().astype(np.float64)
                row += _channel_rows(arrays[m.param], m, g.channels).sum(axis=1)
            products[g.name].append(row)
        for param in weights.values():
            param.clear_gradient(False)
    return {name: np.array(rows) for name, rows in products.items()}


def predicted_loss(products, removed) -> float:
    """Predicted rise of the training loss when the channels ``removed`` go: the size of the first-order term
    (the mean over batches of -sum(a * dL/da)) plus the Fisher term (half the mean square over batches).

    At a trained minimum the first-order term averages near zero; the spread of its per-batch values is what
    tells an unused channel (always ~0) from one the loss leans on. The first-order term counts by its size:
    a removal that the linear term says would lower the loss is not trusted to.
    """
    import numpy as np

    if len(removed) == 0:
        return 0.0
    per_batch = -products[:, list(removed)].sum(axis=1)
    return float(abs(per_batch.mean()) + 0.5 * (per_batch ** 2).mean())


def calibration_map(points: list[tuple[float, float]]) -> Callable[[float], float]:
    """A non-decreasing map from predicted loss to measured relative metric loss through (0, 0) and the measured
    ``points`` (pooled where they disagree with monotonicity), linear between them and proportional beyond the
    last one, capped at 1 (a relative loss cannot exceed it for a metric that bottoms out at 0)."""
    import numpy as np

    pts = sorted((max(float(x), 0.0), float(y)) for x, y in points)
    blocks: list[list[float]] = []  # pool adjacent violators: [sum_x, sum_y, n]
    for x, y in pts:
        blocks.append([x, y, 1])
        while len(blocks) > 1 and blocks[-2][1] / blocks[-2][2] > blocks[-1][1] / blocks[-1][2]:
            last = blocks.pop()
            blocks[-1] = [a + b for a, b in zip(blocks[-1], last)]
    xs = [0.0] + [b[0] / b[2] for b in blocks]
    ys = [0.0] + [max(b[1] / b[2], 0.0) for b in blocks]
    ys = list(np.maximum.accumulate(ys))

    def to_metric_loss(x: float) -> float:
        x = max(float(x), 0.0)
        if x <= xs[-1]:
            return float(np.interp(x, xs, ys))
        if xs[-1] <= 0:
            return float(min(ys[-1], 1.0))
        return float(min(max(ys[-1] * x / xs[-1], ys[-1]), 1.0))

    return to_metric_loss


def taylor_sensitivity(model, input_shape, evaluate: Callable[[Any], float], batches, loss_fn, *, ratios,
                       criterion: str = "l1_norm", params=None, calibration: int = 8, higher_is_better: bool = True,
                       bn_batches=None) -> dict:
    """The sensitivity table from one-shot first-order Taylor scores: no evaluation per (group, ratio).

    ``batches`` (training batches) and ``loss_fn(model, batch) -> scalar loss`` give every channel's products
    (:func:`channel_gradient_products`); for each group and ratio, the channels the sensitivity ``criterion`` would
    remove are scored together (:func:`predicted_loss`). ``calibration`` candidates (spread over the range of
    predictions) are then pruned and evaluated, with BatchNorm recalibrated on ``bn_batches`` when given, and the
    predictions mapped onto the measured relative losses (:func:`calibration_map`); with ``calibration=0`` the
    table holds the raw predicted rise of the training loss, which ranks groups but is not a metric loss.
    ``evaluate`` runs ``1 + calibration`` times. Returns what :func:`compute_sensitivity` returns, plus
    ``"predicted"`` (the raw table) and ``"calibration_points"``.
    """
    import numpy as np

    ratios = _check_ratios(ratios, "sensitivity.ratios")
    if criterion not in SENSITIVITY_CRITERIA:
        raise RecipeError(f"unknown criterion {criterion!r}; choose one of {list(SENSITIVITY_CRITERIA)}",
                          path="sensitivity.criterion")
    if isinstance(calibration, bool) or not isinstance(calibration, int) or calibration < 0:
        raise RecipeError(f"must be a whole number >= 0, got {calibration!r}", path="sensitivity.taylor_calibration")
    batches = list(batches)
    if not batches:
        raise RecipeError("give at least one training batch", path="sensitivity.taylor_batches")
    full_shape(input_shape)
    groups, prunable = analyse(model, input_shape)
    targets = [e["name"] for e in select_groups(prunable, params, "sensitivity.params")]
    by_name = {g.name: g for g in groups}
    products = channel_gradient_products(model, groups, targets, batches, loss_fn)
    predicted: dict[str, dict[str, float]] = {}
    for name in targets:
        group = by_name[name]
        # least important first, ties to the lower index: the order channels_to_remove takes them in
        ranked = np.argsort(np.asarray(group_importance(model, group, criterion)), kind="stable")
        row = {}
        for r in ratios:
            n_remove = group.channels - _kept_channels(group.channels, r)
            row[ratio_key(r)] = predicted_loss(products[name], ranked[:n_remove])
        predicted[name] = row

    evaluations = 0

    def measure(candidate) -> float:
        nonlocal evaluations
        evaluations += 1
        value = float(evaluate(candidate))
        if not math.isfinite(value):
            raise StageError(f"evaluate() returned {value}")
        return value

    baseline = measure(model)
    if baseline <= 0:
        raise StageError(f"the model's baseline metric is {baseline:g}: a sensitivity analysis measures the metric's "
                         "relative drop, which means nothing for a model that scores 0 or less")
    points = []
    cells = sorted(((v, name, key) for name, row in predicted.items() for key, v in row.items()))
    if calibration and cells:
        picks = sorted({int(round(i)) for i in np.linspace(0, len(cells) - 1, min(calibration, len(cells)))})
        bn_batches = list(bn_batches or [])
        for i in picks:
            value, name, key = cells[i]
            candidate = pruned_copy(model, groups, name, float(key), criterion)
            if bn_batches:
                recalibrate_batchnorm(candidate, bn_batches)
            metric = measure(candidate)
            drop = baseline - metric if higher_is_better else metric - baseline
            points.append({"group": name, "ratio": key, "predicted": value, "loss": drop / baseline})
        to_loss = calibration_map([(pt["predicted"], pt["loss"]) for pt in points])
        table = {name: {k: to_loss(v) for k, v in row.items()} for name, row in predicted.items()}
        for pt in points:  # a candidate measured is known, not predicted
            table[pt["group"]][pt["ratio"]] = pt["loss"]
    else:
        table = {name: dict(row) for name, row in predicted.items()}
    return {"baseline": baseline, "table": table, "evaluations": evaluations, "criterion": criterion,
            "ratios": ratios, "predicted": predicted, "calibration_points": points}


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
    if state.get("bn_recalibration", 0) != fresh["bn_recalibration"]:
        raise StageError(f"the checkpoint {path} was measured with {state.get('bn_recalibration', 0)} BatchNorm "
                         f"recalibration batches, not {fresh['bn_recalibration']}; delete it or use the same setting")
    if state.get("weights_sha256") != weights_sha256:
        raise StageError(f"the checkpoint {path} was measured on other weights; delete it to start over")
    table = state.get("table")
    if not isinstance(table, dict) or not all(isinstance(row, dict) for row in table.values()):
        raise StageError(f"the checkpoint {path} is damaged (no table); delete it to start over")
    baseline = state.get("baseline")
    if baseline is not None and (not isinstance(baseline, (int, float)) or baseline <= 0):
        raise StageError(f"the checkpoint {path} has an invalid baseline {baseline!r}; delete it to start over")
    return {**fresh, **state, "complete": False}
