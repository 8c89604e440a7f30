"""Filter pruning on PaddleSlim's dygraph pruner: what can be pruned, sensitivity, ratio planning, exact plans.

Parameters are named by their structured name (the ``state_dict`` key, e.g. ``"features.3.conv.0.weight"``):
Paddle's internal names (``conv2d_7.w_0``) depend on how many layers the process built before, so they differ
between a trained model and a fresh one, and between a model and its deep copy. Tables written by PaddleSlim
use the internal names; :func:`resolve_table` maps them onto a model.

A plan records the channel count each parameter keeps, and is re-applied as is to a fresh model before its
weights are loaded (STACK.md trap 8); the pruning is never re-derived from the weights at that point.
"""

from __future__ import annotations

import io
import logging
import math
import pickle
import re
import struct
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable

from ..errors import Problem, RecipeError, StageError
from ..paddle_env import ensure_dynamic_mode, paddle, paddleslim

_log = logging.getLogger(__name__)

CRITERIA = {"l1_norm": "L1NormFilterPruner", "l2_norm": "L2NormFilterPruner", "fpgm": "FPGMFilterPruner"}
CONV_TYPES = ("conv", "depthwise", "grouped", "transpose")
SKIP_RULES = ("first_n", "names", "patterns", "types", "loss_above", "min_channels")
PLAN_FORMAT = "slimrecipe.prune_plan/1"
CHECKPOINT_FORMAT = "slimrecipe.sensitivity/1"

# The one class a PaddleSlim dygraph sensitivity file may name (FilterPruner.sensitive() pickles it).
PADDLESLIM_STATUS = ("paddleslim.dygraph.prune.filter_pruner", "Status")


# --------------------------------------------------------------------------------------------- helpers


def ratio_key(ratio: float) -> str:
    """How a ratio is written as a JSON key: ``0.30000000000000004`` and ``0.3`` are the same point."""
    return f"{float(ratio):.6g}"


def _full_shape(input_shape) -> list[int]:
    """A per-sample image shape ``[C, H, W]`` gets a batch of 1; a longer shape is taken as already batched."""
    try:
        shape = [int(s) for s in input_shape]
    except (TypeError, ValueError):
        raise StageError(f"input_shape must be a list of integers, got {input_shape!r}") from None
    if not shape or any(s <= 0 for s in shape):
        raise StageError(f"input_shape must be positive integers, got {shape}")
    return [1, *shape] if len(shape) == 3 else shape


@contextmanager
def _dynamic_mode_restored():
    # PaddleSlim traces in static mode and does not switch back when the trace fails (STACK.md traps 2-3)
    try:
        yield
    finally:
        ensure_dynamic_mode()


def _place_of(tensor):
    p = paddle()
    place = tensor.value().get_tensor()._place()
    if place.is_cpu_place():
        return p.CPUPlace()
    if place.is_cuda_pinned_place():
        return p.CUDAPinnedPlace()
    if place.is_gpu_place():
        return p.CUDAPlace(place.gpu_device_id())
    raise StageError(f"cannot restore a tensor on {place}")


def _set_tensor(tensor, array) -> None:
    # set_value() refuses a new shape; pruning changes shapes, so write the underlying tensor like PaddleSlim does
    tensor.value().get_tensor().set(array, _place_of(tensor))


def _backup_names(model) -> set[str]:
    return {p.name.replace(".", "_") + "_backup" for p in model.parameters()}


def _drop_backups(model) -> None:
    """Remove the ``<param>_backup`` buffers PaddleSlim registers while pruning (STACK.md trap 9)."""
    names = _backup_names(model)
    for layer in model.sublayers(include_self=True):
        for key in [k for k in layer._buffers if k in names]:
            del layer._buffers[key]
            layer._non_persistable_buffer_names_set.discard(key)


class _Snapshot:
    """Everything pruning changes on a model, copied, so that a trial can be undone bit for bit.

    PaddleSlim's own restore (``PruningPlan.restore``) copies back from the backup buffers as float32, restores
    only the tensors it pruned, and leaves ``_origin_groups`` behind; when pruning fails halfway it is never
    called at all. This restores every parameter and buffer in its own dtype, the convolution groups, the
    buffer set and the train/eval flags, whatever happened in between.
    """

    _MISSING = object()

    def __init__(self, model):
        import numpy as np

        self.layers = []
        for layer in model.sublayers(include_self=True):
            tensors = []
            for store in (layer._parameters, layer._buffers):
                for t in store.values():
                    if t is not None:
                        tensors.append((t, np.array(t.numpy(), copy=True)))
            self.layers.append((
                layer,
                dict(layer._buffers),
                set(layer._non_persistable_buffer_names_set),
                layer.__dict__.get("_groups", self._MISSING),
                "_origin_groups" in layer.__dict__,
                layer.training,
                tensors,
            ))

    def restore(self) -> None:
        import numpy as np

        for layer, buffers, non_persistable, groups, had_origin, training, tensors in self.layers:
            for key in [k for k in layer._buffers if k not in buffers]:
                del layer._buffers[key]
            layer._non_persistable_buffer_names_set.clear()
            layer._non_persistable_buffer_names_set.update(non_persistable)
            if groups is not self._MISSING:
                layer._groups = groups
            if not had_origin:
                layer.__dict__.pop("_origin_groups", None)
            layer.training = training
            for t, saved in tensors:
                now = t.numpy()
                if now.shape != saved.shape or now.dtype != saved.dtype or not np.array_equal(now, saved):
                    _set_tensor(t, saved)
                    if t.numpy().dtype != saved.dtype:
                        raise StageError(f"could not restore {t.name} in its own dtype {saved.dtype}")


def _new_pruner(model, shape: list[int], criterion: str, path: str):
    """A PaddleSlim filter pruner, built now: it ranks filters by the weights it sees here (STACK.md trap 4)."""
    if criterion not in CRITERIA:
        raise RecipeError(f"unknown criterion {criterion!r}; choose one of {sorted(CRITERIA)}", path=path)
    cls = getattr(paddleslim().dygraph, CRITERIA[criterion])
    try:
        with _dynamic_mode_restored():
            return cls(model, shape, skip_leaves=True)
    except Exception as e:  # noqa: BLE001 -- any tracing failure means the same thing to the user
        raise StageError(f"PaddleSlim could not trace the model with an input of shape {shape} "
                         f"({type(e).__name__}: {e})") from e


def _ordinal(n: int) -> str:
    suffix = "th" if 10 <= n % 100 <= 20 else {1: "st", 2: "nd", 3: "rd"}.get(n % 10, "th")
    return f"{n}{suffix}"


# --------------------------------------------------------------------------------- what can be pruned


def prunable_params(model, input_shape) -> list[dict]:
    """Every convolution weight PaddleSlim's dygraph pruner can prune on its output channels, from the input on.

    Each entry: ``name`` (structured name), ``param_name`` (Paddle's internal name, what PaddleSlim tables use),
    ``shape``, ``channels`` (output channels), ``type`` (``conv``), ``index`` (0 = nearest the input) and
    ``coupled``: the other convolution weights whose first axis loses the same channels when this one is
    pruned (a following depthwise or transposed convolution, the other convolutions of a residual sum). A
    weight coupled to an earlier one is pruned through it and is not listed itself.

    Left out, because PaddleSlim 2.6's dygraph pruner breaks the model on them: transposed convolutions (the
    pruner refuses them), depthwise and grouped convolutions as the weight being pruned (it rewrites their
    ``groups`` from the output count alone), and any weight whose channels feed a grouped (not depthwise)
    convolution (its group-wise mask does not match the weight's shape). So in practice every entry's type is
    ``conv``; the other types exist for :func:`apply_skip_rules`.
    """
    return _analyse(model, _full_shape(input_shape))[0]


def _conv_type(op_type: str, groups, weight_shape) -> str:
    if op_type == "conv2d_transpose":
        return "transpose"
    if op_type == "depthwise_conv2d" or (groups and groups > 1 and weight_shape[1] == 1):
        return "depthwise"
    if groups and groups > 1:
        return "grouped"
    return "conv"


def _analyse(model, shape: list[int], criterion: str = "l1_norm", path: str = "prune.criterion"):
    """(prunable entries, the pruner that found them, {internal name: structured name}).

    The graph is always traced in eval mode, so a model gives the same prunable set whether it comes fresh
    (train mode) or trained (eval mode); branches used only in training (DB's threshold head) are left whole.
    """
    was_training = model.training
    model.eval()
    try:
        pruner = _new_pruner(model, shape, criterion, path)
    finally:
        if was_training:
            model.train()
    structured = {}
    for name, p in model.named_parameters():
        structured.setdefault(p.name, name)
    conv_ops = ("conv2d", "depthwise_conv2d", "conv2d_transpose")
    found, seen = [], set()
    for coll in pruner.collections:
        master = coll.master_name
        if coll.master_axis != 0 or master in seen or master not in structured or master in pruner.skip_vars:
            continue
        details = coll.all_pruning_details()
        own = [d for d in details if d.name == master and d.axis == 0 and d.op.type() in conv_ops]
        if not own:
            continue
        weight_shape = list(own[0].var.shape())
        kind = _conv_type(own[0].op.type(), own[0].op.attr("groups"), weight_shape)
        feeds_grouped = any(
            d.axis == 1 and d.op.type() in conv_ops and (d.op.attr("groups") or 1) > 1 for d in details)
        if kind != "conv" or feeds_grouped:
            continue
        seen.add(master)
        coupled = []
        for d in details:
            if d.name != master and d.axis == 0 and d.op.type() in conv_ops and d.name in structured:
                if structured[d.name] not in coupled:
                    coupled.append(structured[d.name])
        found.append((own[0].op.idx(), {
            "name": structured[master], "param_name": master, "shape": weight_shape,
            "channels": int(weight_shape[0]), "type": kind, "coupled": coupled,
        }))
    found.sort(key=lambda item: item[0])
    entries = []
    for i, (_, entry) in enumerate(found):
        entry["index"] = i
        entries.append(entry)
    return entries, pruner, structured


def resolve_table(prunable: list[dict], table: dict, recipe_path: str = "sensitivity.file") -> dict:
    """A sensitivity table keyed by structured names: PaddleSlim's internal names are mapped onto the model.

    Rows for parameters that are not prunable are dropped (a static-API table lists every convolution);
    a table that matches none of the model's prunable parameters is a ``RecipeError``.
    """
    by_internal = {e["param_name"]: e["name"] for e in prunable}
    names = {e["name"] for e in prunable}
    out, unknown = {}, []
    for key, row in table.items():
        name = key if key in names else by_internal.get(key)
        if name is None:
            unknown.append(key)
        else:
            out[name] = row
    if table and not out:
        raise RecipeError(
            f"the sensitivity table names none of this model's prunable parameters (it has {sorted(table)[:3]}"
            f"...; the model's start {[e['name'] for e in prunable[:3]]} ...): it was computed on another model",
            path=recipe_path)
    if unknown:
        _log.warning("sensitivity rows for parameters that are not prunable here were ignored: %s", unknown[:5])
    return out


# --------------------------------------------------------------------------------------------- counting


def count_flops(model, input_shape, *, only_conv: bool = True) -> float:
    """Multiply-adds of the model's convolutions and fully connected layers for one input.

    This is PaddleSlim's ``flops()`` measure, the one its pruned-FLOPs figures use. ``only_conv=False`` adds
    its rough counts for pooling, batch norm and activations.
    """
    shape = _full_shape(input_shape)
    try:
        with _dynamic_mode_restored():
            return float(paddleslim().analysis.flops(model, shape, only_conv=only_conv))
    except Exception as e:  # noqa: BLE001
        raise StageError(f"could not count FLOPs with an input of shape {shape} ({type(e).__name__}: {e})") from e


def count_params(model, *, trainable_only: bool = False) -> int:
    """Number of values in the model's parameters, each shared parameter once.

    Counts trainable weights and the non-trainable ones Paddle also keeps as parameters (batch-norm running
    mean and variance), i.e. what a saved model holds; never buffers, so never PaddleSlim's ``_backup`` copies.
    """
    total, seen = 0, set()
    for p in model.parameters():
        if id(p) in seen or (trainable_only and p.stop_gradient):
            continue
        seen.add(id(p))
        total += int(math.prod(p.shape))
    return total


# ------------------------------------------------------------------------------------------ sensitivity


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


def _fingerprint(model) -> str:
    """sha256 of the weights, keyed by structured name: a checkpoint belongs to the weights it measured."""
    import hashlib

    import numpy as np

    h = hashlib.sha256()
    for key, value in sorted(pruned_state_dict(model).items()):
        arr = np.ascontiguousarray(value.numpy())
        h.update(f"{key}|{arr.dtype}|{arr.shape}|".encode())
        h.update(arr.tobytes())
    return h.hexdigest()


def compute_sensitivity(model, input_shape, evaluate: Callable[[Any], float], *, ratios, criterion: str = "l1_norm",
                        params=None, loss_ceiling: float | None = None, checkpoint_path=None,
                        progress: bool = True, higher_is_better: bool = True) -> dict:
    """Relative metric loss when each prunable parameter alone loses each share of its filters.

    ``evaluate(model) -> float`` (higher is better) is called once for the baseline and once per point. Each
    point is saved to ``checkpoint_path`` as it is measured; a later call with the same weights and criterion
    skips the points already there (and the baseline). The model is the same afterwards, bit for bit, even if
    ``evaluate`` raises. Returns ``{"baseline", "table": {param: {ratio_key: loss}}, "evaluations" (calls made
    by this call), "criterion", "ratios"}``.
    """
    from tqdm import tqdm

    from ..fileio import write_json

    ratios = _check_ratios(ratios, "sensitivity.ratios")
    if criterion not in CRITERIA:
        raise RecipeError(f"unknown criterion {criterion!r}; choose one of {sorted(CRITERIA)}",
                          path="sensitivity.criterion")
    if loss_ceiling is not None:
        if isinstance(loss_ceiling, bool) or not isinstance(loss_ceiling, (int, float)) \
                or not math.isfinite(loss_ceiling):
            raise RecipeError(f"loss_ceiling must be a finite number, got {loss_ceiling!r}",
                              path="sensitivity.loss_ceiling")
    shape = _full_shape(input_shape)
    ensure_dynamic_mode()
    prunable, pruner, _ = _analyse(model, shape, criterion, "sensitivity.criterion")
    targets = _select(prunable, params, "sensitivity.params")
    fingerprint = _fingerprint(model)
    # taken before the baseline: whatever evaluate() or a failed trial does, the model ends as it came
    snapshot = _Snapshot(model)

    state = {"format": CHECKPOINT_FORMAT, "criterion": criterion, "input_shape": list(input_shape),
             "weights_sha256": fingerprint, "baseline": None, "table": {}, "complete": False}
    checkpoint = Path(checkpoint_path) if checkpoint_path else None
    if checkpoint is not None and checkpoint.exists():
        state = _load_checkpoint(checkpoint, criterion, fingerprint, state)

    def save() -> None:
        if checkpoint is not None:
            state["ratios"] = sorted({float(r) for row in state["table"].values() for r in row} | set(ratios))
            write_json(checkpoint, state)

    evaluations = 0

    def measure() -> float:
        nonlocal evaluations
        evaluations += 1
        value = evaluate(model)
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
            baseline = measure()
            if baseline <= 0:
                raise StageError(
                    f"the model's baseline metric is {baseline:g}: a sensitivity analysis measures the metric's "
                    "relative drop, which means nothing for a model that scores 0 or less. Train the model "
                    "first (or evaluate on more samples) before analysing its sensitivity.")
            state["baseline"] = baseline
            save()
        baseline = float(state["baseline"])
        snapshot.restore()

        for entry in targets:
            row = table.setdefault(entry["name"], {})
            for i, r in enumerate(ratios):
                key = ratio_key(r)
                if key not in row:
                    try:
                        try:
                            with _dynamic_mode_restored():
                                pruner.prune_var(entry["param_name"], 0, r)
                        except Exception as e:  # noqa: BLE001
                            raise StageError(f"PaddleSlim could not prune {entry['name']} by {r:g} "
                                             f"({type(e).__name__}: {e})") from e
                        metric = measure()
                    finally:
                        snapshot.restore()
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
        snapshot.restore()
    state["complete"] = True
    save()

    wanted = {ratio_key(r) for r in ratios}
    result_table = {e["name"]: {k: v for k, v in table[e["name"]].items() if k in wanted} for e in targets}
    return {"baseline": baseline, "table": result_table, "evaluations": evaluations, "criterion": criterion,
            "ratios": ratios}


def _select(prunable: list[dict], params, path: str) -> list[dict]:
    if params is None:
        return list(prunable)
    by_name = {e["name"]: e for e in prunable} | {e["param_name"]: e for e in prunable}
    unknown = [p for p in params if p not in by_name]
    if unknown:
        raise RecipeError(f"not prunable parameters of this model: {unknown[:5]}; prunable ones start "
                          f"{[e['name'] for e in prunable[:5]]}", path=path)
    chosen = {by_name[p]["name"] for p in params}
    return [e for e in prunable if e["name"] in chosen]


def _load_checkpoint(path: Path, criterion: str, fingerprint: str, fresh: dict) -> dict:
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
    if state.get("weights_sha256") != fingerprint:
        raise StageError(f"the checkpoint {path} was measured on other weights; delete it to start over")
    table = state.get("table")
    if not isinstance(table, dict) or not all(isinstance(row, dict) for row in table.values()):
        raise StageError(f"the checkpoint {path} is damaged (no table); delete it to start over")
    baseline = state.get("baseline")
    if baseline is not None and (not isinstance(baseline, (int, float)) or baseline <= 0):
        raise StageError(f"the checkpoint {path} has an invalid baseline {baseline!r}; delete it to start over")
    return {**fresh, **state, "complete": False}


# ---------------------------------------------------------------------------------- sensitivity files


class _StatusStandIn:
    """Receives the attributes of a pickled PaddleSlim ``Status`` without importing or running PaddleSlim."""

    def __setstate__(self, state):
        if not isinstance(state, dict):
            raise pickle.UnpicklingError("a Status object whose state is not a dict")
        self.state = state


class _DTypeStandIn:
    """A numpy dtype spec, kept as data: only the byte layout of a few numeric scalars is understood."""

    CODES = {"f2": "e", "f4": "f", "f8": "d", "i1": "b", "i2": "h", "i4": "i", "i8": "q",
             "u1": "B", "u2": "H", "u4": "I", "u8": "Q", "b1": "?"}

    def __init__(self, spec, align=False, copy=False):
        if spec not in self.CODES:
            raise pickle.UnpicklingError(f"numpy dtype {spec!r} is not a plain number")
        self.code = self.CODES[spec]
        self.order = "<"

    def __setstate__(self, state):
        if isinstance(state, tuple) and len(state) > 1 and state[1] in ("<", ">", "|", "="):
            self.order = {"|": "<"}.get(state[1], state[1])


def _numpy_scalar(dtype, data=None):
    if not isinstance(dtype, _DTypeStandIn) or not isinstance(data, bytes):
        raise pickle.UnpicklingError("a numpy scalar that is not a plain number")
    (value,) = struct.unpack(dtype.order + dtype.code, data)
    return value


def _reconstructor(cls, base, state=None):
    # protocol 0/1 pickles build objects through copyreg._reconstructor; allow it for the stand-in only
    if cls is not _StatusStandIn or base is not object or state is not None:
        raise pickle.UnpicklingError("copyreg._reconstructor for something other than PaddleSlim's Status")
    return _StatusStandIn()


def _latin1_bytes(text, encoding="latin1"):
    # protocol 0-2 pickles write bytes (numpy scalars' payload) as _codecs.encode(text, "latin1")
    if not isinstance(text, str) or encoding not in ("latin1", "latin-1"):
        raise pickle.UnpicklingError("_codecs.encode used for something other than bytes")
    return text.encode("latin1")


_ALLOWED_GLOBALS = {
    PADDLESLIM_STATUS: _StatusStandIn,
    ("numpy.core.multiarray", "scalar"): _numpy_scalar,
    ("numpy._core.multiarray", "scalar"): _numpy_scalar,
    ("numpy", "dtype"): _DTypeStandIn,
    ("copyreg", "_reconstructor"): _reconstructor,
    ("builtins", "object"): object,
    ("_codecs", "encode"): _latin1_bytes,
}


class _SafeUnpickler(pickle.Unpickler):
    """Unpickles plain containers and PaddleSlim's Status; refuses every other global (a pickle runs what it names)."""

    def __init__(self, data: bytes, source: str, recipe_path: str):
        super().__init__(io.BytesIO(data))
        self.source = source
        self.recipe_path = recipe_path

    def find_class(self, module, name):
        allowed = _ALLOWED_GLOBALS.get((module, name))
        if allowed is None:
            raise RecipeError(
                f"{self.source} was not loaded: it names the Python global `{module}.{name}`, and unpickling "
                "would run it. A sensitivity file may only hold PaddleSlim's Status object or a plain "
                "{param: {ratio: loss}} dict; regenerate it, or convert it to JSON where it was made.",
                path=self.recipe_path)
        return allowed

    def persistent_load(self, pid):
        raise RecipeError(f"{self.source} was not loaded: it uses persistent ids, which a sensitivity file "
                          "never needs", path=self.recipe_path)


def load_sensitivity_file(path, recipe_path: str = "sensitivity.file", *,
                          prunable: list[dict] | None = None) -> dict[str, dict[float, float]]:
    """Read a sensitivity table: slimrecipe JSON, PaddleSlim's pickled dygraph ``Status`` or its static dict.

    Ratios are rounded to 6 decimals (the static API writes keys like ``0.30000000000000004``). Pickles are
    read by an unpickler that allows only PaddleSlim's ``Status`` class (rebuilt as plain data, without
    importing PaddleSlim) and numeric numpy scalars; anything else is refused before it can run. With
    ``prunable`` (from :func:`prunable_params`), rows are re-keyed to the model's structured names.
    """
    path = Path(path)
    if not path.is_file():
        raise RecipeError(f"sensitivity file {str(path)!r} does not exist", path=recipe_path)
    data = path.read_bytes()
    if data.lstrip()[:1] == b"{":
        import json

        try:
            raw = json.loads(data.decode("utf-8"))
        except (UnicodeDecodeError, ValueError) as e:
            raise RecipeError(f"{path} is not valid JSON ({e})", path=recipe_path) from None
        if isinstance(raw, dict) and isinstance(raw.get("table"), dict):
            raw = raw["table"]
    else:
        try:
            raw = _SafeUnpickler(data, str(path), recipe_path).load()
        except RecipeError:
            raise
        except Exception as e:  # noqa: BLE001 -- a damaged or foreign file, whatever the exception
            raise RecipeError(f"{path} is neither slimrecipe JSON nor a PaddleSlim sensitivity pickle "
                              f"({type(e).__name__}: {e})", path=recipe_path) from None
        if isinstance(raw, _StatusStandIn):
            raw = raw.state.get("sensitivies")
    table = _validate_table(raw, str(path), recipe_path)
    return resolve_table(prunable, table, recipe_path) if prunable is not None else table


def _number(value) -> float | None:
    if isinstance(value, bool):
        return None
    try:
        return float(value)
    except (TypeError, ValueError):
        return None


def _validate_table(raw, source: str, path: str) -> dict[str, dict[float, float]]:
    if not isinstance(raw, dict):
        raise RecipeError(f"{source}: expected {{param: {{ratio: loss}}}}, got {type(raw).__name__}", path=path)
    out = {}
    for param, row in raw.items():
        if not isinstance(param, str) or not param:
            raise RecipeError(f"{source}: parameter names must be strings, got {param!r}", path=path)
        if not isinstance(row, dict):
            raise RecipeError(f"{source}: {param}: expected {{ratio: loss}}, got {type(row).__name__}", path=path)
        clean = {}
        for r, loss in row.items():
            ratio = _number(r)
            if ratio is None or not math.isfinite(ratio) or not 0 < ratio < 1:
                raise RecipeError(f"{source}: {param}: ratio {r!r} is not a number strictly between 0 and 1",
                                  path=path)
            value = _number(loss)
            if value is None or not math.isfinite(value):
                raise RecipeError(f"{source}: {param}: the loss at ratio {r!r} is {loss!r}, not a finite number",
                                  path=path)
            key = round(ratio, 6)
            if key in clean:
                raise RecipeError(f"{source}: {param}: ratio {key:g} appears twice", path=path)
            clean[key] = value
        if clean:  # PaddleSlim writes an empty row for a parameter it was about to measure
            out[param] = dict(sorted(clean.items()))
    if not out:
        raise RecipeError(f"{source} holds no sensitivity measurements", path=path)
    return out


# ------------------------------------------------------------------------------------- choosing ratios


def _points(row: dict) -> list[tuple[float, float]]:
    return sorted((float(r), float(v)) for r, v in row.items())


def ratios_for_metric_loss(table: dict, max_loss: float) -> dict[str, float]:
    """Per parameter, the largest tested ratio whose loss is at most ``max_loss``, moved linearly toward the
    next tested ratio by how much loss is left; parameters that never stay within it are left out."""
    ratios = {}
    for param, row in table.items():
        pts = _points(row)
        for i in range(len(pts) - 1, -1, -1):
            r0, l0 = pts[i]
            if l0 <= max_loss:
                if i == len(pts) - 1:
                    ratios[param] = r0
                else:
                    r1, l1 = pts[i + 1]  # l1 > max_loss >= l0: pts[i] is the largest within the budget
                    ratios[param] = r0 + (max_loss - l0) * (r1 - r0) / (l1 - l0)
                break
    return ratios


def _loss_at(row: dict, ratio: float) -> float:
    """Loss at any ratio by linear interpolation; 0 at ratio 0, the last measured loss past the last point."""
    pts = [(0.0, 0.0)] + _points(row)
    for (r0, l0), (r1, l1) in zip(pts, pts[1:]):
        if ratio <= r1:
            return l0 + (ratio - r0) * (l1 - l0) / (r1 - r0) if r1 > r0 else l1
    return pts[-1][1]


def _kept_channels(channels: int, ratio: float, align: int | None = None, min_channels: int | None = None) -> int:
    """Channels a parameter keeps at ``ratio``: PaddleSlim's count, then aligned, then clamped.

    PaddleSlim prunes ``round(channels * ratio)`` filters and always keeps one. With ``align`` the kept count
    becomes the nearest multiple of ``align`` (at least ``align``) not above ``channels``, or ``channels``
    itself (unpruned) when that is nearer. ``min_channels`` then raises it to at least that many (a multiple of
    ``align`` again), never above ``channels``.
    """
    if ratio <= 0:
        return channels
    kept = channels - min(channels - 1, int(round(channels * ratio)))
    if align:
        options = {m * align for m in range(1, channels // align + 1)} | {channels}
        kept = min(options, key=lambda k: (abs(k - kept), -k))
    if min_channels and kept < min_channels:
        kept = min_channels if not align else align * math.ceil(min_channels / align)
    return min(kept, channels)


def _check_align(align, path: str = "prune.align") -> int | None:
    if align in (None, 1):
        return None
    if isinstance(align, bool) or not isinstance(align, int) or align < 1:
        raise RecipeError(f"align must be a positive integer such as 8 or 16, got {align!r}", path=path)
    return align


def _check_min_channels(min_channels, path: str = "skip.min_channels") -> int | None:
    if min_channels is None:
        return None
    if isinstance(min_channels, bool) or not isinstance(min_channels, int) or min_channels < 1:
        raise RecipeError(f"min_channels must be a positive integer, got {min_channels!r}", path=path)
    return min_channels


class _FlopsProbe:
    """FLOPs cut of a channel configuration, measured by pruning a copy of the model and restoring it."""

    def __init__(self, model, shape: list[int], criterion: str):
        import copy

        try:
            self.model = copy.deepcopy(model)
        except Exception:  # noqa: BLE001 -- a model that cannot be copied is probed in place, then restored
            self.model = model
        self.shape = shape
        entries, self.pruner, _ = _analyse(self.model, shape, criterion)
        self.internal = {e["name"]: e["param_name"] for e in entries}
        self.channels = {e["name"]: e["channels"] for e in entries}
        self.base = count_flops(self.model, shape)
        self.snapshot = _Snapshot(self.model)
        self.cache: dict[tuple, float] = {}

    def cut(self, kept: dict[str, int]) -> float:
        key = tuple(sorted((n, k) for n, k in kept.items() if k < self.channels[n]))
        if key not in self.cache:
            ratios = {self.internal[n]: (self.channels[n] - k) / self.channels[n] for n, k in key}
            try:
                if ratios:
                    with _dynamic_mode_restored():
                        self.pruner.prune_vars(ratios, 0)
                flops = count_flops(self.model, self.shape)
            finally:
                self.snapshot.restore()
            self.cache[key] = (self.base - flops) / self.base
        return self.cache[key]


def ratios_for_flops_target(model, input_shape, table: dict, target_cut: float, *, params=None,
                            tolerance: float = 0.01, criterion: str = "l1_norm", align: int | None = None,
                            min_channels: int | None = None) -> tuple[dict[str, float], float]:
    """Ratios that remove ``target_cut`` of the FLOPs (within ``tolerance``), spending loss where it is cheapest.

    Bisects the metric-loss threshold given to :func:`ratios_for_metric_loss`; where the cut jumps over the
    target (a parameter entering at its first tested ratio, a non-monotonic row, channel rounding) it bisects
    between the two ratio sets on either side, then tries moving single parameters by one channel (or one
    ``align`` step). The result never overshoots the target by more than ``tolerance``. Returned ratios are
    final: :func:`make_plan` with the same ``align`` and ``min_channels`` keeps exactly these channel counts,
    and the model is unchanged. ``params`` limits pruning to those parameters (default: all in ``table``).
    """
    path = "prune.target.flops"
    if isinstance(target_cut, bool) or not isinstance(target_cut, (int, float)) or not 0 < target_cut < 1:
        raise RecipeError(f"the FLOPs cut must lie strictly between 0 and 1, got {target_cut!r}", path=path)
    if not 0 < tolerance < 1:
        raise RecipeError(f"tolerance must lie strictly between 0 and 1, got {tolerance!r}",
                          path="prune.tolerance")
    align = _check_align(align)
    min_channels = _check_min_channels(min_channels)
    shape = _full_shape(input_shape)
    probe = _FlopsProbe(model, shape, criterion)
    # rows may be keyed by PaddleSlim's internal names, which are the original model's, not the copy's
    structured = {p.name: n for n, p in model.named_parameters()}
    table = {k if k in probe.channels else structured.get(k, k): v for k, v in table.items()}
    if params is not None:
        unknown = [p for p in params if (p if p in probe.channels else structured.get(p)) not in probe.channels]
        if unknown:
            raise StageError(f"not prunable parameters of this model: {unknown[:5]}")
        chosen = {p if p in probe.channels else structured[p] for p in params}
        table = {k: v for k, v in table.items() if k in chosen}
    table = {k: v for k, v in table.items() if k in probe.channels and v}
    if not table:
        raise RecipeError("no sensitivity measurements for any parameter left to prune: compute sensitivity "
                          "for them, or relax the skip rules", path=path)
    lo_window, hi_window = target_cut - tolerance, target_cut + tolerance

    def config(ratios: dict[str, float]) -> dict[str, int]:
        return {n: _kept_channels(probe.channels[n], ratios.get(n, 0.0), align, min_channels) for n in table}

    def est_loss(kept: dict[str, int]) -> float:
        return sum(_loss_at(table[n], (probe.channels[n] - k) / probe.channels[n]) for n, k in kept.items())

    best: list = []  # [(distance, est_loss, cut, kept)]

    def consider(kept: dict[str, int]) -> float:
        c = probe.cut(kept)
        if lo_window <= c <= hi_window:
            best.append((abs(c - target_cut), est_loss(kept), c, kept))
        return c

    losses = sorted({float(v) for row in table.values() for v in row.values()})
    t_lo, t_hi = losses[0] - 1.0, losses[-1]
    # the largest ratios everywhere: the edge of the reachable range, and the costliest way to reach it, so it
    # is only a last resort even when it lands in the window
    top_config = config(ratios_for_metric_loss(table, t_hi))
    top = probe.cut(top_config)
    if top < lo_window:
        raise RecipeError(
            f"a FLOPs cut of {target_cut:g} is out of reach: pruning every parameter to its largest measured "
            f"ratio cuts {top:.4f}, so the reachable range is 0 to {top:.4f}. Measure larger ratios, "
            f"prune more parameters, or lower the target", path=path)

    for _ in range(60):  # bisect the loss threshold
        if best or t_hi - t_lo < 1e-12:
            break
        mid = (t_lo + t_hi) / 2
        if consider(config(ratios_for_metric_loss(table, mid))) < target_cut:
            t_lo = mid
        else:
            t_hi = mid

    if not best:  # the cut jumps across the window at one threshold: blend the ratio sets on either side
        r_lo, r_hi = ratios_for_metric_loss(table, t_lo), ratios_for_metric_loss(table, t_hi)
        a_lo, a_hi = 0.0, 1.0

        def blend(a: float) -> dict[str, int]:
            return config({n: (1 - a) * r_lo.get(n, 0.0) + a * r_hi.get(n, 0.0) for n in table})

        for _ in range(60):
            if best or blend(a_lo) == blend(a_hi) or a_hi - a_lo < 1e-12:
                break
            mid = (a_lo + a_hi) / 2
            if consider(blend(mid)) < target_cut:
                a_lo = mid
            else:
                a_hi = mid
        below, above = blend(a_lo), blend(a_hi)
        # then one channel (or align step) of one parameter at a time, greedily: up from below and down
        # from above, the move with the least loss per FLOP first, never leaving the side it started on
        budget = [20 * len(table) + 50]
        for start, step in ((below, -1), (above, +1)):
            current = dict(start)
            while not best and budget[0] > 0:
                base_cut, base_loss, moves = probe.cut(current), est_loss(current), []
                for n in table:
                    k = _neighbour(current[n], step, probe.channels[n], align, min_channels)
                    if k is None:
                        continue
                    budget[0] -= 1
                    cand = {**current, n: k}
                    c = consider(cand)
                    if step < 0 and base_cut < c <= hi_window:
                        moves.append(((est_loss(cand) - base_loss) / (c - base_cut), cand))
                    elif step > 0 and lo_window <= c < base_cut:
                        moves.append(((est_loss(cand) - base_loss) / (base_cut - c), cand))
                if not moves:
                    break
                current = min(moves, key=lambda m: m[0])[1]
        if not best:
            consider(top_config)
        if not best:
            raise RecipeError(
                f"a FLOPs cut of {target_cut:g} ± {tolerance:g} falls between the channel steps the search could "
                f"take: it found cuts of {probe.cut(below):.4f} and {probe.cut(above):.4f} on either side"
                f"{f' with align {align}' if align else ''}. Choose a target near one of them, widen "
                f"prune.tolerance{', or use a smaller align' if align else ''}", path=path)

    _, _, achieved, kept = min(best, key=lambda b: (b[0], b[1]))
    ratios = {n: (probe.channels[n] - k) / probe.channels[n] for n, k in kept.items() if k < probe.channels[n]}
    return ratios, achieved


def _neighbour(kept: int, step: int, channels: int, align: int | None, min_channels: int | None) -> int | None:
    """The next allowed channel count below (step -1) or above (+1) ``kept``, or None."""
    unit = align or 1
    floor = max(unit, min_channels or 1)
    if step < 0:
        k = (kept - 1) // unit * unit
        return k if k >= floor else None
    if kept >= channels:
        return None
    k = (kept // unit + 1) * unit
    return min(k, channels)


# ------------------------------------------------------------------------------------------ skip rules


def apply_skip_rules(prunable: list[dict], table: dict | None, rules: dict | None,
                     *, path: str = "skip") -> tuple[list[str], dict[str, str]]:
    """Which prunable parameters stay candidates for pruning, and why each of the others is skipped.

    Rules (an unused one may be absent, null, ``[]`` or ``first_n: 0``): ``first_n`` (the N prunable
    convolutions nearest the input), ``names`` (exact, structured or PaddleSlim names), ``patterns`` (regexes,
    full match on either name), ``types`` (conv, depthwise, grouped, transpose), ``loss_above: {ratio,
    max_loss}`` (sensitivity at ``ratio``, interpolated, above ``max_loss``:
    needs ``table``), ``min_channels`` (skips a parameter that has at most that many output channels; the
    others are clamped to keep at least that many when the plan is made). A selecting rule, or any single name
    or pattern, that matches nothing is an error unless the rule is listed in ``allow_empty``; ``min_channels``
    is a limit, not a selection, and is never an error for that. The first rule in the order above names the
    reason a parameter is skipped.
    """
    # recipes spell an unused rule as null, [] or first_n: 0
    rules = {k: v for k, v in (rules or {}).items() if v is not None and v != [] and not (k == "first_n" and v == 0)}
    allow_empty = rules.pop("allow_empty", None) or []
    problems: list = []

    def fail(message: str, where: str) -> None:
        problems.append(Problem(where, message))

    if not isinstance(allow_empty, list) or any(r not in SKIP_RULES for r in allow_empty):
        fail(f"allow_empty lists rule names, some of {list(SKIP_RULES)}; got {allow_empty!r}", f"{path}.allow_empty")
        allow_empty = [r for r in allow_empty if r in SKIP_RULES] if isinstance(allow_empty, list) else []
    for key in rules:
        if key not in SKIP_RULES:
            fail(f"unknown skip rule {key!r}; the rules are {list(SKIP_RULES)} and allow_empty", f"{path}.{key}")

    names = [e["name"] for e in prunable]
    sample = ", ".join(names[:4]) + (", ..." if len(names) > 4 else "")
    reasons: dict[str, str] = {}

    def skip(entry: dict, reason: str) -> None:
        reasons.setdefault(entry["name"], reason)

    def nothing(rule: str, where: str, what: str) -> None:
        if rule not in allow_empty:
            fail(f"{what} matches no prunable parameter (they are: {sample}); fix it, or list {rule!r} in "
                 f"{path}.allow_empty", where)

    if "first_n" in rules:
        n = rules["first_n"]
        if isinstance(n, bool) or not isinstance(n, int) or n < 0:
            fail(f"first_n must be a whole number of convolutions, got {n!r}", f"{path}.first_n")
        else:
            for e in prunable[:n]:
                skip(e, f"{path}.first_n: {_ordinal(e['index'] + 1)} prunable convolution from the input")

    if "names" in rules:
        listed = rules["names"]
        if not isinstance(listed, list) or not all(isinstance(x, str) for x in listed):
            fail(f"names must be a list of parameter names, got {listed!r}", f"{path}.names")
        else:
            for i, want in enumerate(listed):
                hits = [e for e in prunable if want in (e["name"], e["param_name"])]
                for e in hits:
                    skip(e, f"{path}.names: listed")
                if not hits:
                    nothing("names", f"{path}.names[{i}]", f"name {want!r}")

    if "patterns" in rules:
        pats = rules["patterns"]
        if not isinstance(pats, list) or not all(isinstance(x, str) for x in pats):
            fail(f"patterns must be a list of regular expressions, got {pats!r}", f"{path}.patterns")
        else:
            for i, pat in enumerate(pats):
                try:
                    rx = re.compile(pat)
                except re.error as e:
                    fail(f"invalid regular expression {pat!r}: {e}", f"{path}.patterns[{i}]")
                    continue
                hits = [e for e in prunable if rx.fullmatch(e["name"]) or rx.fullmatch(e["param_name"])]
                for e in hits:
                    skip(e, f"{path}.patterns[{i}]: matches {pat!r}")
                if not hits:
                    nothing("patterns", f"{path}.patterns[{i}]", f"pattern {pat!r}")

    if "types" in rules:
        types = rules["types"]
        if not isinstance(types, list) or any(t not in CONV_TYPES for t in types):
            fail(f"types must be a list of {list(CONV_TYPES)}, got {types!r}", f"{path}.types")
        else:
            hits = [e for e in prunable if e["type"] in types]
            for e in hits:
                skip(e, f"{path}.types: {e['type']} convolution")
            if not hits:
                nothing("types", f"{path}.types",
                        f"types {types} (PaddleSlim prunes depthwise and transposed convolutions only through "
                        "the convolution before them, so they are never listed)")

    if "loss_above" in rules:
        spec = rules["loss_above"]
        where = f"{path}.loss_above"
        ok = isinstance(spec, dict) and set(spec) == {"ratio", "max_loss"}
        r, limit = (_number(spec.get("ratio")), _number(spec.get("max_loss"))) if ok else (None, None)
        if not ok or r is None or limit is None or not 0 < r < 1 or not math.isfinite(limit):
            fail(f"loss_above must be {{ratio: r in (0, 1), max_loss: x}}, got {spec!r}", where)
        elif not table:
            fail("loss_above needs a sensitivity table: compute one (sensitivity stage) or give sensitivity.file",
                 where)
        else:
            resolved = resolve_table(prunable, table)
            hits = []
            for e in prunable:
                row = resolved.get(e["name"])
                if row:
                    loss = _loss_at(row, r)
                    if loss > limit:
                        hits.append(e)
                        skip(e, f"{where}: loss {loss:.4g} at ratio {r:g} > {limit:g}")
            if not hits:
                nothing("loss_above", where, f"loss_above {{ratio: {r:g}, max_loss: {limit:g}}}")

    if "min_channels" in rules:
        m = rules["min_channels"]
        if isinstance(m, bool) or not isinstance(m, int) or m < 1:
            fail(f"min_channels must be a positive integer, got {m!r}", f"{path}.min_channels")
        else:
            for e in prunable:
                if e["channels"] <= m:
                    skip(e, f"{path}.min_channels: only {e['channels']} output channels (minimum {m})")

    if problems:
        raise RecipeError(problems)
    kept = [n for n in names if n not in reasons]
    if prunable and not kept:
        raise RecipeError(f"these rules skip every prunable parameter ({len(names)}): nothing would be pruned",
                          path=path)
    return kept, {n: reasons[n] for n in names if n in reasons}


# --------------------------------------------------------------------------------------------- plans


def make_plan(model, input_shape, prunable: list[dict], ratios: dict[str, float], skipped: dict[str, str] | None = None,
              *, criterion: str = "l1_norm", align: int | None = None, min_channels: int | None = None) -> dict:
    """The pruning plan: the exact channel count every prunable parameter keeps.

    ``{"format", "criterion", "align", "min_channels", "input_shape", "params": {name: {"ratio",
    "channels_before", "channels_after", "rule"}}}``, covering every prunable parameter in order from the
    input; a skipped one has ratio 0 and its skip reason as ``rule``, the others ``"kept"`` (with a ``note``
    when ``min_channels`` raised its count). ``ratio`` is ``1 - channels_after / channels_before``.
    """
    if criterion not in CRITERIA:
        raise RecipeError(f"unknown criterion {criterion!r}; choose one of {sorted(CRITERIA)}",
                          path="prune.criterion")
    align = _check_align(align)
    min_channels = _check_min_channels(min_channels)
    skipped = skipped or {}
    if prunable is None:
        prunable = prunable_params(model, input_shape)
    by_any = {e["name"]: e for e in prunable} | {e["param_name"]: e for e in prunable}
    unknown = [k for k in ratios if k not in by_any]
    if unknown:
        raise StageError(f"ratios for parameters that are not prunable: {unknown[:5]}")
    wanted = {by_any[k]["name"]: float(v) for k, v in ratios.items()}
    params = {}
    for e in prunable:
        before = e["channels"]
        ratio = wanted.get(e["name"], 0.0)
        if not 0 <= ratio < 1 or not math.isfinite(ratio):
            raise StageError(f"ratio {ratio!r} for {e['name']} is outside [0, 1)")
        item = {"ratio": 0.0, "channels_before": before, "channels_after": before, "rule": "kept"}
        if e["name"] in skipped:
            item["rule"] = skipped[e["name"]]
        elif ratio > 0:
            after = _kept_channels(before, ratio, align, min_channels)
            if min_channels and after > _kept_channels(before, ratio, align):
                item["note"] = f"skip.min_channels: kept {after} channels"
            item.update(ratio=(before - after) / before, channels_after=after)
        params[e["name"]] = item
    return {"format": PLAN_FORMAT, "criterion": criterion, "align": align, "min_channels": min_channels,
            "input_shape": list(input_shape), "params": params}


def _check_plan(plan) -> None:
    if not isinstance(plan, dict) or not isinstance(plan.get("params"), dict):
        raise StageError("not a pruning plan: expected a dict with a 'params' mapping")
    if plan.get("criterion", "l1_norm") not in CRITERIA:
        raise StageError(f"the plan names an unknown criterion {plan.get('criterion')!r}")
    for name, item in plan["params"].items():
        before, after = (item.get("channels_before"), item.get("channels_after")) if isinstance(item, dict) \
            else (None, None)
        if not all(isinstance(v, int) and not isinstance(v, bool) for v in (before, after)) \
                or not 1 <= after <= before:
            raise StageError(f"the plan's entry for {name} is invalid: {item!r}")


def apply_plan(model, input_shape, plan: dict):
    """Prune ``model`` in place to exactly the plan's channel counts, ranking filters by its current weights.

    The plan must have been made for this architecture (same prunable parameters, same channel counts before).
    On the trained model this chooses which filters go; on a fresh model it only reproduces the shapes, before
    the pruned weights are loaded (:func:`load_pruned`). PaddleSlim's ``_backup`` buffers are removed
    afterwards. Build any optimizer after this call: its state is not pruned.
    """
    _check_plan(plan)
    shape = _full_shape(input_shape)
    criterion = plan.get("criterion", "l1_norm")
    ensure_dynamic_mode()
    prunable, pruner, _ = _analyse(model, shape, criterion)
    by_name = {e["name"]: e for e in prunable}
    missing = [n for n in by_name if n not in plan["params"]]
    extra = [n for n in plan["params"] if n not in by_name]
    if missing or extra:
        raise StageError(f"the plan does not fit this model: it lacks {missing[:5]} and names {extra[:5]}, "
                         "which are not prunable here (a plan for another architecture?)")
    wrong = [(n, plan["params"][n]["channels_before"], e["channels"]) for n, e in by_name.items()
             if plan["params"][n]["channels_before"] != e["channels"]]
    if wrong:
        raise StageError("the plan does not fit this model: channels before pruning (plan vs model) differ for "
                         + ", ".join(f"{n} ({a} vs {b})" for n, a, b in wrong[:5]))
    ratios = {}
    for name, item in plan["params"].items():
        before, after = item["channels_before"], item["channels_after"]
        if after < before:
            ratios[by_name[name]["param_name"]] = (before - after) / before
    if not ratios:
        return model
    snapshot = _Snapshot(model)
    try:
        with _dynamic_mode_restored():
            pruner.prune_vars(ratios, 0)
        params = dict(model.named_parameters())
        off = [(n, item["channels_after"], params[n].shape[0]) for n, item in plan["params"].items()
               if params[n].shape[0] != item["channels_after"]]
        if off:
            raise StageError("pruning did not give the plan's channel counts (plan vs result): "
                             + ", ".join(f"{n} ({a} vs {b})" for n, a, b in off[:5]))
        count_flops(model, shape)  # a static trace: fails if the pruned shapes do not fit together
    except Exception as e:
        snapshot.restore()
        if isinstance(e, StageError):
            raise
        raise StageError(f"PaddleSlim could not apply the plan ({type(e).__name__}: {e})") from e
    _drop_backups(model)
    _sync_layer_attributes(model)
    return model


def _sync_layer_attributes(model) -> None:
    """Make layers' channel attributes match their pruned weights.

    PaddleSlim prunes tensors but leaves `_out_channels`, `_in_channels` and `_num_features` as they were;
    code that rebuilds a layer from them (Paddle's conv-bn fusion) would build the unpruned shape.
    """
    nn = paddle().nn
    for layer in model.sublayers(include_self=True):
        if isinstance(layer, (nn.Conv2D, nn.Conv1D, nn.Conv3D)) and getattr(layer, "weight", None) is not None:
            layer._out_channels = layer.weight.shape[0]
            layer._in_channels = layer.weight.shape[1] * layer._groups
        elif isinstance(layer, (nn.Conv2DTranspose,)) and getattr(layer, "weight", None) is not None:
            layer._in_channels = layer.weight.shape[0]
            layer._out_channels = layer.weight.shape[1] * layer._groups
        elif isinstance(layer, (nn.BatchNorm2D, nn.BatchNorm1D, nn.BatchNorm)) and getattr(layer, "weight", None) is not None:
            layer._num_features = layer.weight.shape[0]


def pruned_state_dict(model) -> dict:
    """``model.state_dict()`` without PaddleSlim's ``<param>_backup`` buffers (STACK.md trap 9)."""
    backups = _backup_names(model)
    return {k: v for k, v in model.state_dict().items() if k.rsplit(".", 1)[-1] not in backups}


def load_pruned(fresh_model, input_shape, plan: dict, state_dict: dict):
    """Re-apply ``plan`` to a freshly built model, then load ``state_dict`` into it, checking every tensor.

    Any missing, unexpected or differently shaped tensor is a ``StageError`` (``_backup`` entries in
    ``state_dict`` are ignored). Returns the model.
    """
    import numpy as np

    apply_plan(fresh_model, input_shape, plan)
    expected = pruned_state_dict(fresh_model)
    given = {k: v for k, v in state_dict.items() if k in expected or not k.endswith("_backup")}
    missing = [k for k in expected if k not in given]
    unexpected = [k for k in given if k not in expected]
    shapes = [(k, list(given[k].shape), list(v.shape)) for k, v in expected.items()
              if k in given and list(given[k].shape) != list(v.shape)]
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
    fresh_model.set_state_dict(given)
    for key, value in pruned_state_dict(fresh_model).items():
        src = given[key]
        src = src.numpy() if hasattr(src, "numpy") else np.asarray(src)
        if not np.array_equal(value.numpy(), src.astype(value.numpy().dtype)):
            raise StageError(f"{key} did not load: its value differs after set_state_dict")
    return fresh_model
