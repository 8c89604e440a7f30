"""Post-training int8 quantization on onnxruntime: calibrate once, quantize to QDQ, and hand the layers that
suffer most back to float until the metric loss fits the recipe's budget.

The float model goes to ONNX the way the `onnx` exporter writes it, then through onnxruntime's own
pre-processing (shape inference; conv-BN and bias folding) and ``onnxruntime.quantization.quantize_static``:
weights per output channel (int8), activations per tensor (uint8 or int8), scales from a calibration pass over
training images (min-max, percentile or entropy). The calibration pass runs once; its ranges are kept in a
JSON file (onnxruntime's calibration cache), so every later quantization of the same model, with some layers
left in float, reuses them and differs only in which layers are quantized.

Which layers go back to float is measured, not guessed: each quantizable layer is quantized on its own and the
model's outputs on a few training images are compared with the float model's (signal-to-quantization-noise
ratio, dB); the layers with the lowest ratio go first.
"""

from __future__ import annotations

import contextlib
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
