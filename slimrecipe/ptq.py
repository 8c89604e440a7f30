"""Post-training int8 quantization, for onnxruntime or for Paddle Inference: calibrate once on training images,
quantize, and hand the layers that suffer most back to float until the metric loss fits the recipe's budget.

onnxruntime: the float model goes to ONNX the way the `onnx` exporter writes it, then through onnxruntime's own
pre-processing (shape inference; conv-BN and bias folding) and ``onnxruntime.quantization.quantize_static``:
weights per output channel (int8), activations per tensor (uint8 or int8), scales from a calibration pass over
training images (min-max, percentile or entropy). The calibration pass runs once; its ranges are kept in a
JSON file (onnxruntime's calibration cache), so every later quantization of the same model, with some layers
left in float, reuses them and differs only in which layers are quantized.

Paddle Inference: the float model is quantized with slimrecipe's own QAT quanters (:mod:`slimrecipe.qat`:
conv-BN folded first, int8 weights per channel, activations and layer outputs with the plain abs-max observer,
no PACT) and calibrated by forward passes over training images, without any training. The result is a QAT
model like any other, which the `export` stage saves as an int8 Paddle Inference program (and as QDQ ONNX).
``paddle.quantization.PTQ`` is not used: on Paddle 3.3 it calibrates but cannot save its model.

Which layers go back to float is measured, not guessed: each quantizable layer is quantized on its own and the
model's outputs on a few training images are compared with the float model's (signal-to-quantization-noise
ratio, dB); the layers with the lowest ratio go first.
"""

from __future__ import annotations

import contextlib
import copy
import io
import logging
import os
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from .errors import StageError

METHODS = {"minmax": "MinMax", "percentile": "Percentile", "entropy": "Entropy"}
DEFAULT_OP_TYPES = ("Conv", "ConvTranspose", "MatMul", "Gemm")
# what onnxruntime's QDQ quantizer can put on the int8 grid besides weighted layers: quantizing these too keeps
# more of the graph in int8 between convolutions (bench/ptq_det.py: 1.32x against 1.29x on the PP-OCRv4 det)
QDQ_OP_TYPES = DEFAULT_OP_TYPES + ("Add", "Mul", "Concat", "Resize", "Sigmoid", "HardSigmoid", "HardSwish",
                                   "AveragePool", "GlobalAveragePool", "MaxPool", "Relu", "Clip", "Transpose")
INPUT_NAME = "x"


@dataclass(frozen=True)
class Settings:
    """How to quantize: the recipe's `ptq` keys that change the int8 model."""

    method: str = "minmax"
    percentile: float = 99.999
    per_channel: bool = True
    activation_type: str = "uint8"
    reduce_range: bool = False
    op_types: tuple[str, ...] = DEFAULT_OP_TYPES

    def to_json(self) -> dict:
        return {**asdict(self), "op_types": list(self.op_types)}

    @classmethod
    def from_json(cls, d: dict) -> "Settings":
        return cls(**{**d, "op_types": tuple(d.get("op_types") or DEFAULT_OP_TYPES)})


def _ort_quant():
    try:
        from onnxruntime import quantization as q
    except ImportError as e:
        raise StageError(f"post-training quantization needs the 'onnx' extra (pip install 'slimrecipe[onnx]'): {e}") from e
    return q


@contextlib.contextmanager
def _quiet():
    # onnxruntime.quantization logs advice ("consider pre-processing") through the root logger on every call
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)
    try:
        yield
    finally:
        root.setLevel(level)


def prepare(float_onnx: bytes, out: Path) -> Path:
    """The float ONNX as quantization wants it: shapes inferred, BN and bias adds folded into the convolutions
    (onnxruntime's ``quant_pre_process``), written to ``out``."""
    import onnx

    _ort_quant()
    from onnxruntime.quantization.shape_inference import quant_pre_process

    model = onnx.load_from_string(float_onnx)
    _constants_to_initializers(model)
    # symbolic shape inference serves transformers and gives up on a detector's free height and width; ONNX's
    # own shape inference is enough for convolutions. A file, not a ModelProto: onnxruntime 1.32's
    # pre-processing mishandles in-memory models on that path.
    with tempfile.TemporaryDirectory(prefix="slimrecipe-ptq-prep-") as tmp, _quiet():
        src = Path(tmp) / "float.onnx"
        onnx.save(model, str(src))
        quant_pre_process(str(src), str(out), skip_symbolic_shape=True)
    return Path(out)


def _constants_to_initializers(model) -> None:
    """paddle2onnx writes weights as Constant nodes; onnxruntime's quantizer and optimizer want initializers
    (per-channel weight scales, conv-BN folding)."""
    kept = []
    for node in model.graph.node:
        if node.op_type == "Constant" and len(node.attribute) == 1 and node.attribute[0].name == "value":
            tensor = model.graph.initializer.add()
            tensor.CopyFrom(node.attribute[0].t)
            tensor.name = node.output[0]
        else:
            kept.append(node)
    del model.graph.node[:]
    model.graph.node.extend(kept)
    # paddle2onnx leaves shape constants nothing reads; onnxruntime warns about each one on every session
    used = {name for node in model.graph.node for name in node.input} | {o.name for o in model.graph.output}
    unused = [t for t in model.graph.initializer if t.name not in used]
    for t in unused:
        model.graph.initializer.remove(t)


def quantizable_layers(prepared: Path, op_types: Sequence[str] = DEFAULT_OP_TYPES) -> list[dict]:
    """The nodes quantization would touch: name, op type and weight initializer, in graph order."""
    import onnx

    graph = onnx.load(str(prepared)).graph
    weights = {i.name for i in graph.initializer}
    out = []
    for node in graph.node:
        if node.op_type in op_types:
            if not node.name:
                raise StageError(f"{prepared}: a {node.op_type} node has no name; onnxruntime cannot exclude it")
            w = next((i for i in node.input[1:2] if i in weights), None)
            out.append({"node": node.name, "op": node.op_type, "weight": w})
    return out


def _reader(images: Sequence[np.ndarray], input_name: str = INPUT_NAME):
    """onnxruntime's calibration data reader over CHW float32 images, one image per batch."""
    q = _ort_quant()

    class Images(q.CalibrationDataReader):
        def __init__(self):
            self.i = 0

        def get_next(self):
            if self.i >= len(images):
                return None
            self.i += 1
            return {input_name: np.ascontiguousarray(images[self.i - 1][None], dtype=np.float32)}

        def __len__(self):
            return len(images)

    return Images()


def quantize(prepared: Path, ranges: Path, settings: Settings, out: Path, *, exclude: Sequence[str] = (),
             only: Sequence[str] | None = None, images: Sequence[np.ndarray] | None = None) -> Path:
    """Write the QDQ int8 model of ``prepared`` to ``out``.

    With ``images``, calibrate on them first and store the ranges at ``ranges`` (which must not exist yet);
    without, reuse the ranges stored there. ``exclude`` stays float; ``only``, when given, is all that is
    quantized.
    """
    q = _ort_quant()
    ranges = Path(ranges)
    if images is None and not ranges.is_file():
        raise StageError(f"no calibration ranges at {ranges}: calibrate first")
    if images is not None and ranges.exists():
        raise StageError(f"calibration ranges already exist at {ranges}; calibrating again would mix two passes")
    reader = None
    if images is not None:
        if not len(images):
            raise StageError("calibration needs at least one image")
        reader = _reader(images)
    qtype = {"uint8": q.QuantType.QUInt8, "int8": q.QuantType.QInt8}[settings.activation_type]
    extra = {"CalibPercentile": float(settings.percentile)} if settings.method == "percentile" else {}
    with _quiet():
        q.quantize_static(
            str(prepared), str(out), reader, quant_format=q.QuantFormat.QDQ,
            op_types_to_quantize=list(settings.op_types), per_channel=settings.per_channel,
            reduce_range=settings.reduce_range, activation_type=qtype, weight_type=q.QuantType.QInt8,
            nodes_to_quantize=list(only) if only is not None else None, nodes_to_exclude=list(exclude),
            calibrate_method=getattr(q.CalibrationMethod, METHODS[settings.method]),
            extra_options=extra, calibration_cache_path=str(ranges))
    return Path(out)


def calibrate(prepared: Path, images: Sequence[np.ndarray], settings: Settings, ranges: Path) -> Path:
    """Measure the activation ranges on ``images`` and keep them at ``ranges`` (written atomically)."""
    from .fileio import atomic_write

    with tempfile.TemporaryDirectory(prefix="slimrecipe-ptq-") as tmp:
        staged = Path(tmp) / "ranges.json"
        with contextlib.redirect_stdout(io.StringIO()):  # the entropy calibrator prints its progress
            quantize(prepared, staged, settings, Path(tmp) / "calibrated.onnx", images=images)
        data = staged.read_bytes()
    atomic_write(ranges, lambda p: p.write_bytes(data))
    return Path(ranges)


def session(onnx_file: Path, threads: int = 1):
    """An onnxruntime CPU session as ``np.ndarray -> list[np.ndarray]``."""
    from .exporters import onnx_session

    runner, _ = onnx_session(Path(onnx_file), threads=threads)
    return runner


def sqnr_db(reference: list[np.ndarray], got: list[np.ndarray]) -> float:
    """Signal-to-quantization-noise ratio of ``got`` against ``reference`` over all outputs, in dB."""
    signal = sum(float(np.sum(np.square(r.astype(np.float64)))) for r in reference)
    noise = sum(float(np.sum(np.square(r.astype(np.float64) - g))) for r, g in zip(reference, got))
    if noise == 0:
        return float("inf")
    return 10.0 * np.log10(max(signal, 1e-30) / noise)


def layer_sensitivity(prepared: Path, ranges: Path, settings: Settings, layers: list[dict],
                      probe: Sequence[np.ndarray], *, threads: int = 1, progress: bool = True) -> list[dict]:
    """Each layer quantized on its own: SQNR of the model's outputs on ``probe`` against the float model's.

    Returns the layers, most sensitive (lowest SQNR) first, each with its ``sqnr_db``.
    """
    float_run = session(prepared, threads)
    reference = [float_run.run_all(x[None]) for x in probe]
    out = []
    bar = _progress(layers, "per-layer int8 error", progress)
    with tempfile.TemporaryDirectory(prefix="slimrecipe-ptq-layer-") as tmp:
        for layer in bar:
            f = quantize(prepared, ranges, settings, Path(tmp) / "one.onnx", only=[layer["node"]])
            run = session(f, threads)
            got = [run.run_all(x[None]) for x in probe]
            db = sqnr_db([a for r in reference for a in r], [a for g in got for a in g])
            out.append({**layer, "sqnr_db": round(float(db), 3) if np.isfinite(db) else None})
    return sorted(out, key=lambda d: (d["sqnr_db"] is None, d["sqnr_db"] if d["sqnr_db"] is not None else 0.0))


def _progress(items, desc: str, enabled: bool):
    if not enabled:
        return items
    try:
        from tqdm import tqdm
    except ImportError:
        return items
    return tqdm(items, desc=f"  {desc}", leave=False, disable=None)


@dataclass
class Round:
    float_layers: list[str]
    metric: float
    loss: float

    def to_json(self) -> dict:
        return {"float_layers": list(self.float_layers), "metric": self.metric, "loss": self.loss}


@dataclass
class Control:
    """The outcome of accuracy control: every round, the one delivered, and whether it met the budget."""

    rounds: list[Round] = field(default_factory=list)
    chosen: int = 0
    met: bool | None = None  # None: no budget was set
    message: str = ""


def accuracy_control(measure: Callable[[list[str]], float], float_metric: float, ranking: Callable[[], list[str]],
                     *, max_loss: float | None, max_rounds: int, per_round: int,
                     higher_is_better: bool = True, echo=print) -> Control:
    """Quantize everything; while the loss exceeds ``max_loss``, return the next ``per_round`` most sensitive
    layers to float and measure again, at most ``max_rounds`` times.

    ``measure(float_layers)`` is the metric of the model with those layers left in float; ``ranking()`` lists
    the layers most sensitive first (called only when a round is needed). The first round that meets the budget
    is delivered (fewest layers in float); when none does, the round closest to it, with a message saying so.
    """
    def loss_of(metric: float) -> float:
        return (float_metric - metric) if higher_is_better else (metric - float_metric)

    ctl = Control()
    m = measure([])
    ctl.rounds.append(Round([], m, loss_of(m)))
    echo(f"  int8, every layer: {m:.4f} (loss {loss_of(m):+.4f} against float {float_metric:.4f})")
    if max_loss is None:
        return ctl
    order: list[str] | None = None
    while ctl.rounds[-1].loss > max_loss and len(ctl.rounds) <= max_rounds:
        order = ranking() if order is None else order
        keep = order[: len(ctl.rounds) * per_round]
        if len(keep) == len(ctl.rounds[-1].float_layers):
            break  # every quantizable layer is float already
        m = measure(keep)
        ctl.rounds.append(Round(keep, m, loss_of(m)))
        echo(f"  round {len(ctl.rounds) - 1}: {len(keep)} layer(s) in float -> {m:.4f} (loss {loss_of(m):+.4f})")
    met = [i for i, r in enumerate(ctl.rounds) if r.loss <= max_loss]
    if met:
        ctl.chosen, ctl.met = met[0], True
    else:
        ctl.chosen = min(range(len(ctl.rounds)), key=lambda i: (ctl.rounds[i].loss, len(ctl.rounds[i].float_layers)))
        best = ctl.rounds[ctl.chosen]
        ctl.met = False
        ctl.message = (f"ptq.max_metric_loss {max_loss:g} was not met within {len(ctl.rounds) - 1} round(s) "
                       f"(ptq.max_rounds {max_rounds}, ptq.layers_per_round {per_round}): kept the closest, "
                       f"{len(best.float_layers)} layer(s) in float, loss {best.loss:+.4f}")
    return ctl


def threads_for_evaluation() -> int:
    return max(1, min(4, os.cpu_count() or 1))


# ---------------------------------------------------------------------------------------------- Paddle Inference
# the layer types that are quantized: those of the onnxruntime default (Conv, ConvTranspose, MatMul, Gemm)
PADDLE_LAYER_TYPES = ("Conv2D", "Conv2DTranspose", "Linear")
_OBSERVED = "._observed"  # the suffix Paddle's ObserveWrapper adds to a layer whose output is quantized


def paddle_quant_config(per_channel: bool = True, float_layers: Sequence[str] = ()) -> dict:
    """The `qat.config` of a model quantized after training for Paddle Inference (resolved, every key set)."""
    from .qat import resolve_config

    return resolve_config({
        "pact": False,  # PACT learns its clipping while training: without training it is only abs-max
        "weight_quantize_type": "channel_wise_abs_max" if per_channel else "abs_max",
        "quantize_outputs": True, "quantizable_layer_type": list(PADDLE_LAYER_TYPES), "fuse_conv_bn": True,
        "onnx_format": True, "float_layers": list(float_layers)})


def paddle_quantize(float_model, config: dict, images: Sequence[np.ndarray], example: np.ndarray | None = None):
    """A quantized copy of ``float_model`` (left untouched), calibrated on ``images``: (model, quanter).

    ``example`` (a float32 batch) proves that folding BatchNorm into the convolutions kept the outputs.
    """
    from .qat import make_quanter, quantize

    model = copy.deepcopy(float_model)
    model.eval()
    quanter = make_quanter(config)
    quantize(model, quanter, example=example)
    calibrate_observers(model, images)
    return model, quanter


def calibrate_observers(model, images: Sequence[np.ndarray]) -> int:
    """Set the activation scales of a quantized model from ``images`` (CHW float32): each input and output
    quanter's scale becomes the mean over the images of the abs-max of what it sees in the *float* model.

    Not :func:`slimrecipe.qat.calibrate`, which runs the fake-quant model in training mode: there every quanter
    sees activations already rounded upstream (a layer that int8 ruins then hands zeros to every scale after
    it), dropout is active, and the moving average forgets the first images. Here the quanters only watch: the
    forward passes run the float model in evaluation mode, one image at a time. Returns the number of quanters
    calibrated.
    """
    from .paddle_env import paddle
    from .qat import _layers

    p = paddle()
    observer_type = _layers().MovingAverageAbsMaxQuanter
    seen: dict[int, list[float]] = {}

    class Watch(p.nn.Layer):
        """Stands in for a quanter during calibration: records the abs-max of each image, passes it on unrounded."""

        def __init__(self, quanter):
            super().__init__()
            self.quanter = quanter

        def forward(self, x):
            seen.setdefault(id(self.quanter), []).append(float(p.max(p.abs(x))))
            return x

    def stand_in(owner, attr):
        q = owner._sub_layers.get(attr)
        return Watch(q) if isinstance(q, observer_type) else None  # weight quanters: bypassed (float weights)

    observers = [m for m in model.sublayers() if isinstance(m, observer_type)]
    model.eval()
    with _quanters_replaced(model, (), stand_in), p.no_grad():
        for x in images:
            model(p.to_tensor(np.ascontiguousarray(x[None], dtype=np.float32)))
    with p.no_grad():
        for q in observers:
            if id(q) in seen:  # a quanter of a branch that evaluation never runs keeps its initial scale
                scale = max(float(np.mean(seen[id(q)])), 1e-8)
                # the moving average's state agrees with the scale, as if it had seen one batch of this abs-max
                q._scale.set_value(p.full([1], scale, dtype="float32"))
                q._accum.set_value(p.full([1], scale, dtype="float32"))
                q._state.set_value(p.ones([1], dtype="float32"))
    return len(seen)


def paddle_quantized_layers(model) -> list[dict]:
    """The quantized layers of a quantized model, in order: structured name (what `float_layers` takes), layer
    type and weight name, in the records the report lists."""
    from .qat import quantized_layers

    layers = dict(model.named_sublayers())
    out = []
    for name in quantized_layers(model):
        plain = name[: -len(_OBSERVED)] if name.endswith(_OBSERVED) else name
        op = type(layers[name]).__name__.replace("Quanted", "", 1)
        out.append({"node": plain, "op": op, "weight": f"{plain}.weight", "param": f"{plain}.weight"})
    return out


@contextlib.contextmanager
def only_quantized(model, keep):
    """Within the block, the quantized layers not named in ``keep`` compute in float: their weight, input and
    output quanters are bypassed (the calibrated scales are left as they are)."""
    with _quanters_replaced(model, keep, lambda owner, attr: None):
        yield model


@contextlib.contextmanager
def _quanters_replaced(model, keep, stand_in):
    """Within the block, every quanter of the quantized layers not named in ``keep`` is replaced by
    ``stand_in(owner, attr)`` (None or an identity: bypassed); they are put back on leaving."""
    from .paddle_env import paddle

    identity = paddle().nn.Identity()  # Paddle first through paddle_env (it loads zlib before Paddle)
    from paddle.nn.quant.format import ConvertibleQuantedLayer
    from paddle.quantization.wrapper import ObserveWrapper

    slots = []
    for name, layer in model.named_sublayers():
        if isinstance(layer, ObserveWrapper) and isinstance(layer._observed, ConvertibleQuantedLayer):
            if name not in keep:
                slots.append((layer, "_observer"))
        elif isinstance(layer, ConvertibleQuantedLayer):
            plain = name[: -len(_OBSERVED)] if name.endswith(_OBSERVED) else name
            if plain not in keep:
                slots += [(layer, "weight_quanter"), (layer, "activation_quanter")]
    saved = [(owner, attr, owner._sub_layers.get(attr)) for owner, attr in slots]
    try:
        for owner, attr in slots:
            new = stand_in(owner, attr)
            # an ObserveWrapper calls its observer unconditionally: it needs a layer, not None
            owner._sub_layers[attr] = identity if new is None and attr == "_observer" else new
        yield model
    finally:
        for owner, attr, quanter in saved:
            owner._sub_layers[attr] = quanter


def paddle_layer_sensitivity(model, probe: Sequence[np.ndarray], *, progress: bool = True) -> list[dict]:
    """Each layer of a calibrated quantized model quantized on its own (the others bypassed): SQNR of the
    model's outputs on ``probe`` against every layer in float. Most sensitive (lowest SQNR) first."""
    from .exporters import eager_outputs

    layers = paddle_quantized_layers(model)

    def outputs():
        return [a for x in probe for a in eager_outputs(model, np.ascontiguousarray(x[None], dtype=np.float32))]

    with only_quantized(model, ()):
        reference = outputs()
    out = []
    for layer in _progress(layers, "per-layer int8 error", progress):
        with only_quantized(model, {layer["node"]}):
            db = sqnr_db(reference, outputs())
        out.append({**layer, "sqnr_db": round(float(db), 3) if np.isfinite(db) else None})
    return sorted(out, key=lambda d: (d["sqnr_db"] is None, d["sqnr_db"] if d["sqnr_db"] is not None else 0.0))


@dataclass
class PaddleOutcome:
    """What :func:`paddle_ptq` delivers: the quantized model and its quanter (whose config names the layers left
    in float), the accuracy control's rounds, every quantizable layer, and the per-layer ranking if one was made."""

    model: object
    quanter: object
    control: Control
    layers: list[dict]
    ranking: list[dict]


def paddle_ptq(float_model, images: Sequence[np.ndarray], evaluate: Callable[[object], float], *,
               per_channel: bool = True, max_loss: float | None = None, max_rounds: int = 5, per_round: int = 2,
               probe_images: int = 8, higher_is_better: bool = True, float_metric: float | None = None,
               echo=print) -> PaddleOutcome:
    """Quantize a copy of ``float_model`` for Paddle Inference, calibrated on ``images``; while the metric loss
    (``evaluate(model)``, against ``float_metric`` or the float model's) exceeds ``max_loss``, leave the layers
    whose int8 error alone is worst in float. Each round's model is quantized and calibrated from scratch with
    its float layers, so the model delivered is the very one measured, and one that its config rebuilds."""
    example = np.ascontiguousarray(images[0][None], dtype=np.float32)  # proves the conv-BN folding
    if float_metric is None:
        float_metric = evaluate(float_model)
    built: dict[tuple, tuple] = {}  # float layers -> (model, quanter) of each round

    def measure(float_layers: list[str]) -> float:
        key = tuple(float_layers)
        if key not in built:
            built[key] = paddle_quantize(float_model, paddle_quant_config(per_channel, float_layers), images, example)
        return evaluate(built[key][0])

    ranking: list[dict] = []

    def rank() -> list[str]:
        probe = images[:probe_images]
        echo(f"  measuring each layer's int8 error on {len(probe)} calibration images")
        ranking.extend(paddle_layer_sensitivity(built[()][0], probe))
        # the least sensitive layer stays int8 whatever happens: without one, the model is the float model
        return [r["node"] for r in ranking][:-1]

    ctl = accuracy_control(measure, float_metric, rank, max_loss=max_loss, max_rounds=max_rounds,
                           per_round=per_round, higher_is_better=higher_is_better, echo=echo)
    model, quanter = built[tuple(ctl.rounds[ctl.chosen].float_layers)]
    return PaddleOutcome(model, quanter, ctl, paddle_quantized_layers(built[()][0]), ranking)
