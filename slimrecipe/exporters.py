"""Export targets that prove themselves: save, reload with the deployment runtime, check parity; plus latency.

Each exporter (`paddle_inference`, `onnx`) writes the model, loads it back with the runtime that will serve
it (Paddle Inference predictor, onnxruntime session), runs it on the context's sample batch and refuses
(``StageError``) an export whose outputs differ from the in-memory model's by more than its tolerance. The
reloaded predictor/session comes back as ``ExportResult.runner`` so that :func:`interleaved_latency` can time
the very artefacts that were written.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import tempfile
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np

from .errors import StageError
from .fileio import sha256_tree, write_bytes
from .paddle_env import ensure_dynamic_mode, paddle
from .registry import register

INPUT_NAME = "x"
MODEL_PREFIX = "model"
_QDQ_OPS = ("QuantizeLinear", "DequantizeLinear")


@dataclass
class ExportContext:
    model: Any  # paddle.nn.Layer, already pruned/quantized
    input_shape: list[int]  # [C, H, W]
    dynamic_hw: bool  # export H and W as unknown dims (text detection takes any size)
    sample: np.ndarray  # float32 [N, C, H, W], the parity batch
    out_dir: Path
    quanter: Any = None  # the QAT quanter the model was quantized with, else None
    ptq: dict | None = None  # the `ptq` stage's record (onnxruntime int8: ranges, layers kept float), else None

    def input_spec(self):
        p = paddle()
        c, h, w = self.input_shape
        shape = [None, c, None, None] if self.dynamic_hw else [None, c, h, w]
        return [p.static.InputSpec(shape=shape, dtype="float32", name=INPUT_NAME)]

    def checked_sample(self) -> np.ndarray:
        x = np.ascontiguousarray(self.sample, dtype=np.float32)
        c, h, w = self.input_shape
        if x.ndim != 4 or x.shape[1] != c or (not self.dynamic_hw and tuple(x.shape[2:]) != (h, w)):
            raise StageError(f"parity sample has shape {list(x.shape)}; the export expects "
                             f"[N, {c}, {'H, W' if self.dynamic_hw else f'{h}, {w}'}]")
        return x


@dataclass
class ExportResult:
    target: str
    path: Path  # the directory holding the export
    files: dict[str, str]  # path relative to `path` -> sha256
    size_bytes: int
    parity: dict  # max_abs_diff, atol, rtol, tolerance, ok, ...
    details: dict = field(default_factory=dict)  # target-specific facts (threads, opset, QDQ node counts...)
    runner: Callable[[np.ndarray], np.ndarray] | None = field(default=None, repr=False, compare=False)

    def to_json(self) -> dict:
        return {"target": self.target, "path": str(self.path), "files": dict(self.files),
                "size_bytes": self.size_bytes, "parity": dict(self.parity), "details": dict(self.details)}


class Runner:
    """A reloaded model as ``np.ndarray -> np.ndarray`` (its first output); ``run_all`` returns every output."""

    def __init__(self, run_all: Callable[[np.ndarray], list[np.ndarray]], target: str, threads: int,
                 output_names: list[str] | None = None):
        self.run_all = run_all
        self.target = target
        self.threads = threads
        self.output_names = output_names or []

    def __call__(self, x: np.ndarray) -> np.ndarray:
        return self.run_all(x)[0]

    def __repr__(self) -> str:
        return f"Runner({self.target}, threads={self.threads})"


_TOLERANCE_PROPS = {
    "atol": {"type": "number", "minimum": 0, "default": 1e-4,
             "description": "float model: allowed max abs difference from the in-memory model"},
    "rtol": {"type": "number", "minimum": 0, "default": 1e-4,
             "description": "float model: extra allowance, as a fraction of the largest |output|"},
    "atol_quantized": {"type": "number", "minimum": 0, "default": 1e-2,
                       "description": "quantized model: allowed max abs difference (int8 rounding differs "
                                      "between fake-quant training ops and the runtime's kernels)"},
    "rtol_quantized": {"type": "number", "minimum": 0, "default": 5e-2,
                       "description": "quantized model: extra allowance, as a fraction of the largest |output|"},
    "quantile_quantized": {"type": "number", "exclusiveMinimum": 0, "maximum": 1, "default": 1.0,
                           "description": "quantized model: compare this quantile of |difference| (1: the max); "
                                          "0.999 suits dense outputs such as probability maps"},
    "threads": {"type": "integer", "minimum": 1, "maximum": 256, "default": 1,
                "description": "CPU threads of the reloaded runtime (parity run and latency)"},
}

PADDLE_INFERENCE_SCHEMA = {
    "$schema": "https://json-schema.org/draft/2020-12/schema",
    "type": "object",
    "additionalProperties": False,
    "properties": {
        **_TOLERANCE_PROPS,
        "mkldnn": {"type": "boolean", "default": True,
                   "description": "run the predictor with oneDNN (MKL-DNN) kernels"},
        "onednn_int8": {"type": "boolean", "default": False,
                        "description": "quantized model: ask the predictor for oneDNN int8 kernels (needs mkldnn; "
                                       "the parity check still applies: see the result's note)"},
    },
}

# Measured on a 2-core x86 CPU (ResNet-ish, 13 convs, 224x224, batch 1, 1 thread, interleaved): Paddle
# Inference with QDQ ops 3.5x (Paddle 3.3.1) / 7.1x (2.6.2) slower than the float export; oneDNN int8 1.8x
# faster but wrong (max abs diff 2.6 on outputs of magnitude 2.5); onnxruntime QDQ 1.6x faster than onnxruntime
# float. Every quantized paddle_inference result says so.
PADDLE_INT8_NOTE = (
    "int8 Paddle Inference runs the quantize/dequantize ops in float on x86 CPUs (measured 3.5-7x slower than "
    "the float export); oneDNN int8 (onednn_int8: true) ran faster but did not reproduce the model, so the "
    "parity check refuses it. For int8 kernels on a CPU use the onnx target (QDQ, onnxruntime QLinearConv); "
    "the export table times every artifact of this run."
)
PADDLE_PTQ_NOTE = (
    "the ptq stage made an int8 model for onnxruntime (the onnx target); this Paddle Inference export is the "
    "float model it was made from"
)
PADDLE3_INT8_FALLBACK_NOTE = (
    "Paddle 3 could not save this quantized model as an int8 Paddle Inference program ({error}): under PIR its "
    "dequantize_linear kernel quantizes instead of dequantizing, and the legacy-program route failed for this "
    "model. Exported instead: the model with its weights on the int8 grid and the activation rounding left "
    "out, as a float program, checked against that same model in memory (max_abs_diff_vs_quantized_model says "
    "how far it is from the QAT model). For int8 kernels use the "
    "onnx target (QDQ, onnxruntime)."
)

ONNX_SCHEMA = {
    "$schema": "https://json-schema.org/draft/2020-12/schema",
    "type": "object",
    "additionalProperties": False,
    "properties": {
        **_TOLERANCE_PROPS,
        "opset": {"type": "integer", "minimum": 7, "maximum": 17, "default": 13,
                  "description": "ONNX opset for paddle2onnx (raised automatically if an op needs more; "
                                 "quantized models need 13 or more for per-channel QDQ)"},
        "require_qdq": {"type": "boolean", "default": True,
                        "description": "quantized model: fail unless the ONNX graph has "
                                       "QuantizeLinear/DequantizeLinear nodes"},
    },
}


def _with_defaults(params: dict | None, schema: dict) -> dict:
    out = {k: v["default"] for k, v in schema["properties"].items() if "default" in v}
    out.update(params or {})
    return out


def _flatten(out) -> list:
    if isinstance(out, dict):
        out = list(out.values())
    if isinstance(out, (list, tuple)):
        return [a for o in out for a in _flatten(o)]
    return [np.asarray(out.numpy() if hasattr(out, "numpy") else out)]


def eager_outputs(model, x: np.ndarray) -> list[np.ndarray]:
    """The in-memory model's outputs on ``x`` in eval mode (the model's train/eval mode is restored)."""
    p = paddle()
    ensure_dynamic_mode()
    was_training = model.training
    model.eval()
    try:
        with p.no_grad():
            return _flatten(model(p.to_tensor(x)))
    finally:
        if was_training:
            model.train()


def check_parity(target: str, reference: list[np.ndarray], got: list[np.ndarray], *, atol: float, rtol: float,
                 quantized: bool, where: Path | None = None, quantile: float = 1.0, enforce: bool = True) -> dict:
    """Figures comparing a reloaded export with the in-memory model; ``StageError`` when out of tolerance,
    unless ``enforce`` is false (the figures are then recorded, ``enforced: false``, and not judged)."""
    at = f" at {where}" if where else ""
    if len(reference) != len(got) or any(r.shape != g.shape for r, g in zip(reference, got)):
        raise StageError(f"{target} export{at} does not reproduce the in-memory model: output shapes "
                         f"{[list(g.shape) for g in got]} instead of {[list(r.shape) for r in reference]}")
    # quantile < 1 judges dense outputs (a detector's probability map) by all but their worst pixels: int8
    # rounding moves a few pixels on text edges a lot and the rest hardly at all
    diffs = [float(np.quantile(np.abs(r.astype(np.float64) - g), quantile)) if r.size else 0.0
             for r, g in zip(reference, got)]
    max_ref = max((float(np.max(np.abs(r))) if r.size else 0.0) for r in reference)
    max_diff = max(diffs)
    tolerance = atol + rtol * max_ref
    finite = all(np.all(np.isfinite(g)) for g in got)
    parity = {
        "max_abs_diff": max(float(np.max(np.abs(r.astype(np.float64) - g))) if r.size else 0.0
                            for r, g in zip(reference, got)),
        "quantile": quantile,
        "abs_diff_at_quantile": max_diff,
        "max_abs_reference": max_ref,
        "max_rel_diff": max_diff / max_ref if max_ref > 0 else (0.0 if max_diff == 0 else float("inf")),
        "atol": atol,
        "rtol": rtol,
        "tolerance": tolerance,
        "quantized": quantized,
        "batch": int(reference[0].shape[0]) if reference[0].ndim else 1,
        "ok": bool(finite and max_diff <= tolerance),
        "enforced": enforce,
    }
    first = reference[0]
    if first.ndim == 2 and first.shape[1] > 1:
        # a classifier's decisions are what a user sees change
        parity["top1_agreement"] = float(np.mean(first.argmax(1) == got[0].argmax(1)))
    if enforce and not parity["ok"]:
        worst = int(np.argmax(diffs))
        raise StageError(
            f"{target} export{at} does not reproduce the in-memory model on the parity batch of "
            f"{parity['batch']}: {'max abs diff' if quantile >= 1 else f'abs diff at quantile {quantile:g}'} "
            f"{max_diff:.6g} (output {worst}) > tolerance {tolerance:.6g} "
            f"(atol {atol:g} + rtol {rtol:g} x max |reference| {max_ref:.6g})"
            + ("" if finite else "; the export produced non-finite values")
            + ("; tolerances for quantized models are atol_quantized/rtol_quantized" if quantized else ""))
    return parity


def forget_stale_trace_records() -> int:
    """Drop dy2static's leftover parameter records; returns how many programs' records were dropped.

    Paddle 2.6 records the parameters a traced program uses in a process-wide dict keyed by ``id(program)``
    and pops them when the trace ends. PaddleSlim's graph tracing (``dygraph_flops``, building a pruner)
    adds records that are never popped; when a later ``paddle.jit.save`` builds a Program that happens to
    reuse a dead program's id, it inherits that program's parameters and fails with ``KeyError:
    '<param>_deepcopy_N'`` -- now and then, depending on memory reuse. Call only outside a trace.
    """
    paddle()
    try:
        from paddle.jit.dy2static.program_translator import ProgramTranslator
    except ImportError:
        translator = None
    else:
        translator = ProgramTranslator.get_instance()
    dropped, found = 0, 0
    for recorder in (getattr(translator, "_params_recorder", None), getattr(translator, "_inplace_map", None)):
        records = getattr(recorder, "params_dict", None)
        if isinstance(records, dict):
            found += 1
            dropped += len(records)
            records.clear()
    if not found:
        warnings.warn(f"Paddle {paddle().__version__} no longer keeps dy2static's parameter records where slimrecipe "
                      "clears them before saving; if a save fails with KeyError '<param>_deepcopy_N', this "
                      "workaround (slimrecipe.exporters.forget_stale_trace_records) needs updating", stacklevel=2)
    return dropped


def _export_form(model, target: str | None):
    """The context ``model`` is saved in for ``target``: a model may define ``export_form(target)`` to trace
    differently per runtime (the detectors upsample without interpolation ops for Paddle Inference)."""
    form = getattr(model, "export_form", None)
    return form(target) if form is not None and target else contextlib.nullcontext()


def _save_paddle(ctx: ExportContext, prefix: Path, model=None, target: str | None = None) -> tuple[Path, Path]:
    """Paddle inference files at ``prefix`` in the running Paddle's format (Paddle 3: ``.json``; 2.6:
    ``.pdmodel``; plus ``.pdiparams``); returns (program file, params file). A quantized model goes through
    :func:`slimrecipe.qat.save_quantized` unless ``model`` (a float stand-in) is given. ``target``: the export
    the files are for (see :func:`_export_form`)."""
    from .qat import save_quantized, saved_files

    p = paddle()
    ensure_dynamic_mode()
    forget_stale_trace_records()
    if ctx.quanter is not None and model is None:
        with _export_form(ctx.model, target):
            return save_quantized(ctx.model, ctx.quanter, prefix, ctx.input_spec())
    model = ctx.model if model is None else model
    was_training = model.training
    model.eval()
    try:
        # names of the program's tensors from a fresh counter: the same model saves to the same names however
        # often it was saved before in this process (Paddle 2.6 numbers them on; the ptq stage's ranges are keyed
        # by them and must find them again in the export)
        with p.utils.unique_name.guard(), _export_form(model, target):
            p.jit.save(model, str(prefix), input_spec=ctx.input_spec())
    finally:
        ensure_dynamic_mode()
        if was_training:
            model.train()
    return saved_files(prefix)


def _replace_dir(staging: Path, final: Path) -> None:
    # the old export stays whole until the new one is complete
    if final.exists():
        old = final.with_name(f".{final.name}.old-{os.getpid()}")
        os.replace(final, old)
        os.replace(staging, final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(staging, final)


def _files_and_size(root: Path) -> tuple[dict[str, str], int]:
    files = sha256_tree(root)
    return files, sum((root / rel).stat().st_size for rel in files)


ONEDNN_INTERP_NOTE = (
    "Paddle 3.3's oneDNN executor cannot run *_interp ops of a PIR program (their scale is an array of "
    "doubles: Paddle issue #79749), so the predictor keeps oneDNN's fused kernels but leaves op placement "
    "to Paddle's CPU kernels (delete_pass('onednn_placement_pass')); do the same in your predictor")


def onednn_cannot_place(model_file: Path) -> bool:
    """True for a PIR program (``.json``) with an interpolation op: oneDNN placement breaks it on Paddle 3.3."""
    model_file = Path(model_file)
    return model_file.suffix == ".json" and re.search(r'"1\.\w+_interp"', model_file.read_text()) is not None


def paddle_predictor(model_file: Path, params_file: Path, threads: int = 1, mkldnn: bool = True,
                     int8: bool = False, ir_optim: bool = True) -> Runner:
    """A Paddle Inference CPU predictor for a saved model, as a :class:`Runner` (``int8``: oneDNN int8 kernels;
    ``ir_optim=False``: run the graph as stored, without Paddle's fusing passes)."""
    p = paddle()
    config = p.inference.Config(str(model_file), str(params_file))
    config.disable_gpu()
    config.disable_glog_info()
    if not ir_optim:
        config.switch_ir_optim(False)
    config.set_cpu_math_library_num_threads(threads)
    if mkldnn:
        config.enable_mkldnn()
        if int8:
            (getattr(config, "enable_onednn_int8", None) or config.enable_mkldnn_int8)()
        if onednn_cannot_place(model_file):
            config.delete_pass("onednn_placement_pass")
    else:
        config.disable_mkldnn()
    predictor = p.inference.create_predictor(config)
    in_names = predictor.get_input_names()
    if len(in_names) != 1:
        raise StageError(f"the saved model at {model_file} has inputs {in_names}; expected one")
    handle = predictor.get_input_handle(in_names[0])
    out_handles = [predictor.get_output_handle(n) for n in predictor.get_output_names()]

    def run_all(x: np.ndarray) -> list[np.ndarray]:
        handle.reshape(list(x.shape))
        handle.copy_from_cpu(np.ascontiguousarray(x, dtype=np.float32))
        predictor.run()
        return [h.copy_to_cpu() for h in out_handles]

    return Runner(run_all, "paddle_inference", threads, predictor.get_output_names())


def _publish(target: str, out_dir: Path, build: Callable[[Path], tuple[Runner, dict, dict]]) -> ExportResult:
    """Build an export in a staging directory, verify it there, and only then move it to ``out_dir/target``.

    ``build(staging)`` writes the files, reloads them and runs the parity check, returning the runner, the
    parity figures and the details. A rejected export never replaces a good one: it is kept at
    ``out_dir/<target>.rejected`` for inspection. Runtimes load the files into memory, so moving the
    directory afterwards does not disturb the runner.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    final = out_dir / target
    staging = Path(tempfile.mkdtemp(prefix=f".{target}.", dir=out_dir))
    try:
        try:
            runner, parity, details = build(staging)
        except StageError as e:
            rejected = out_dir / f"{target}.rejected"
            _replace_dir(staging, rejected)
            raise StageError(f"{e}; the rejected export is kept at {rejected}") from None
        _replace_dir(staging, final)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    files, size = _files_and_size(final)
    return ExportResult(target, final, files, size, parity, details, runner)


def _tolerances(prm: dict, quantized: bool) -> dict:
    if quantized:
        return {"atol": prm["atol_quantized"], "rtol": prm["rtol_quantized"], "quantile": prm["quantile_quantized"]}
    return {"atol": prm["atol"], "rtol": prm["rtol"]}


@register("exporter", "paddle_inference", schema=PADDLE_INFERENCE_SCHEMA)
def export_paddle_inference(params: dict, ctx: ExportContext) -> ExportResult:
    """Paddle Inference model (the running Paddle's format), reloaded by a CPU predictor and checked for parity."""
    prm = _with_defaults(params, PADDLE_INFERENCE_SCHEMA)
    x = ctx.checked_sample()
    quantized = ctx.quanter is not None
    if prm["onednn_int8"] and not prm["mkldnn"]:
        raise StageError("export.targets.paddle_inference: onednn_int8 needs mkldnn: true")
    reference = eager_outputs(ctx.model, x)
    target = "paddle_inference"

    def build(staging: Path):
        note = PADDLE_INT8_NOTE if quantized else (PADDLE_PTQ_NOTE if ctx.ptq else None)
        expected, extra = reference, {}
        try:
            model_file, params_file = _save_paddle(ctx, staging / MODEL_PREFIX, target=target)
        except Exception as e:  # noqa: BLE001 -- Paddle 3's legacy-program save fails inside Paddle for some models
            from .qat import _pir_on, float_twin

            if not quantized or not _pir_on():
                raise
            ensure_dynamic_mode()
            twin, _ = float_twin(ctx.model, ctx.quanter)
            model_file, params_file = _save_paddle(ctx, staging / MODEL_PREFIX, model=twin, target=target)
            note = PADDLE3_INT8_FALLBACK_NOTE.format(error=f"{type(e).__name__}: {str(e).splitlines()[-1][:160]}")
            # what was exported is the twin: check the export against it, and say how far it is from the QAT model
            expected = eager_outputs(twin, x)
            extra["max_abs_diff_vs_quantized_model"] = float(max(
                np.max(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64))) for a, b in zip(expected, reference)))
        runner = paddle_predictor(model_file, params_file, threads=prm["threads"], mkldnn=prm["mkldnn"],
                                  int8=prm["onednn_int8"])
        parity = check_parity(target, expected, runner.run_all(x), quantized=quantized,
                              **_tolerances(prm, quantized))
        details = {**extra, "threads": prm["threads"], "mkldnn": prm["mkldnn"], "onednn_int8": prm["onednn_int8"],
                   "input_name": INPUT_NAME, "dynamic_hw": ctx.dynamic_hw, "quantized": quantized,
                   "paddle": paddle().__version__, "model_file": model_file.name, "params_file": params_file.name}
        if prm["mkldnn"] and onednn_cannot_place(model_file):
            details["onednn_placement"] = ONEDNN_INTERP_NOTE
        if note:
            details["note"] = note
        return runner, parity, details

    return _publish(target, ctx.out_dir, build)


def onnx_op_counts(onnx_file: Path) -> dict[str, int]:
    """How many nodes of each op type the ONNX graph (subgraphs included) has."""
    return _onnx_facts(onnx_file)[0]


def _onnx_facts(onnx_file: Path) -> tuple[dict[str, int], int | None]:
    import onnx

    model = onnx.load(str(onnx_file), load_external_data=False)
    counts: dict[str, int] = {}

    def walk(graph):
        for node in graph.node:
            counts[node.op_type] = counts.get(node.op_type, 0) + 1
            for attr in node.attribute:
                if attr.type == onnx.AttributeProto.GRAPH:
                    walk(attr.g)

    walk(model.graph)
    opset = max((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), default=None)
    return counts, opset


def _int8_kernels(op_counts: dict[str, int]) -> dict[str, int]:
    return {op: n for op, n in sorted(op_counts.items())
            if op.startswith("QLinear") or "Integer" in op or op.startswith("DynamicQuantize")}


def onnx_session(onnx_file: Path, threads: int = 1, record_kernels: bool = False) -> tuple[Runner, dict]:
    """An onnxruntime CPU session as a :class:`Runner`, and the int8 kernel ops onnxruntime chose.

    ``record_kernels`` has onnxruntime write its optimized graph (to a temporary file) so the ops it really
    runs (QLinearConv, MatMulInteger...) can be counted: QDQ nodes in the file alone do not prove int8 kernels.
    """
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    so.log_severity_level = 3
    kernels: dict = {}
    with tempfile.TemporaryDirectory(prefix="slimrecipe-ort-") as tmp:
        if record_kernels:
            so.optimized_model_filepath = str(Path(tmp) / "optimized.onnx")
        session = ort.InferenceSession(str(onnx_file), so, providers=["CPUExecutionProvider"])
        if record_kernels and Path(so.optimized_model_filepath).exists():
            kernels = _int8_kernels(onnx_op_counts(Path(so.optimized_model_filepath)))
    inputs = session.get_inputs()
    if len(inputs) != 1:
        raise StageError(f"the ONNX model at {onnx_file} has inputs {[i.name for i in inputs]}; expected one")
    in_name = inputs[0].name

    def run_all(x: np.ndarray) -> list[np.ndarray]:
        return session.run(None, {in_name: np.ascontiguousarray(x, dtype=np.float32)})

    return Runner(run_all, "onnx", threads), kernels


def _paddle2onnx(model_file: Path, params_file: Path, opset: int) -> bytes:
    """paddle2onnx 1.x (Paddle 2.6) or 2.x (Paddle 3) in memory. With no ``save_file``, 2.x skips its polygraphy
    folding, which would otherwise try to pip-install onnx_graphsurgeon at run time."""
    import paddle2onnx

    try:
        model_bytes = paddle2onnx.export(str(model_file), str(params_file), save_file=None, opset_version=opset,
                                         auto_upgrade_opset=True, verbose=False, enable_onnx_checker=True,
                                         deploy_backend="onnxruntime")
    except Exception as e:  # noqa: BLE001 -- 2.x logs its own error and then fails on an unbound result
        raise StageError(f"paddle2onnx {getattr(paddle2onnx, '__version__', '?')} could not convert "
                         f"{model_file.name}: {type(e).__name__}: {e}") from e
    if not model_bytes:
        raise StageError(f"paddle2onnx returned no model for {model_file.name}")
    return model_bytes


# ops that commute with symmetric (zero point 0) rounding: moving a QuantizeLinear/DequantizeLinear pair from
# after them to before them changes no value
_QDQ_TRANSPARENT = ("Relu", "MaxPool", "Reshape", "Flatten", "Squeeze", "Unsqueeze", "Transpose", "Identity")
_QUANTIZABLE_ONNX = ("Conv", "ConvTranspose", "MatMul", "Gemm")


def insert_qdq(model, layers) -> dict:
    """Put a quantized model's quantization into a float ONNX graph as QuantizeLinear/DequantizeLinear nodes.

    ``layers`` are :class:`slimrecipe.qat.QuantizedLayer` records; each names the weight of one
    Conv/ConvTranspose/MatMul/Gemm. Its weight becomes int8 + (per-channel) DequantizeLinear, its data input
    gets a Q/DQ pair with the activation scale, and its output (after the bias, which is folded into the Conv
    first) one with the output scale when the model quantized outputs. DQ -> Conv -> Q is the pattern that
    onnxruntime runs as QLinearConv. Without output scales, the input pair is also put on the output of the op
    that feeds the layer through ops that commute with rounding (Relu, MaxPool, reshapes): exact, and it gives
    that op the Q it needs. Returns counts of what was inserted.
    """
    import onnx
    from onnx import helper, numpy_helper

    graph = model.graph
    inits = {i.name: i for i in graph.initializer}
    consumers: dict[str, list] = {}
    producers: dict[str, Any] = {}
    for node in graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
        for name in node.output:
            producers[name] = node
    graph_outputs = {o.name for o in graph.output}

    def source(name: str) -> str:
        while name in producers and producers[name].op_type == "Identity":
            name = producers[name].input[0]
        return name

    by_weight = {}  # weight name -> the nodes using it (paddle2onnx may put an Identity in between)
    for node in graph.node:
        if node.op_type in _QUANTIZABLE_ONNX and len(node.input) > 1:
            by_weight.setdefault(source(node.input[1]), []).append(node)
    new_nodes: list = []
    counts = {"weights": 0, "activations": 0, "outputs": 0, "moved_input": 0, "biases_folded": 0}
    requantized: dict[tuple[str, float], str] = {}

    def const(name, array):
        graph.initializer.append(numpy_helper.from_array(array, name))
        return name

    def qdq(tensor: str, scale: float, bits: int, tag: str, dq_name: str | None = None) -> str:
        key = (tensor, scale)
        if key in requantized:
            return requantized[key]
        qmax = float(2 ** (bits - 1) - 1)
        # one tensor read by layers with different input scales gets one Q/DQ pair per scale
        base = f"{tensor}.{tag}"
        uses = sum(1 for t, _ in requantized if t == tensor)
        base = f"{base}{uses}" if uses else base
        s = const(f"{base}.scale", np.asarray(scale / qmax, dtype=np.float32))
        z = const(f"{base}.zero_point", np.asarray(0, dtype=np.int8))
        q, dq = f"{base}.q", dq_name or f"{base}.dq"
        new_nodes.append(helper.make_node("QuantizeLinear", [tensor, s, z], [q], name=q))
        new_nodes.append(helper.make_node("DequantizeLinear", [q, s, z], [dq], name=f"{base}.dq"))
        requantized[key] = dq
        return dq

    def rewire(tensor: str, new: str) -> None:
        # the new Q node reads `tensor` too, but is not in `consumers`: it keeps its input
        for node in consumers.get(tensor, []):
            for i, name in enumerate(node.input):
                if name == tensor:
                    node.input[i] = new

    def constant_value(name: str):
        # paddle2onnx 1.x stores weights as initializers, 2.x as Constant nodes
        if name in inits:
            return numpy_helper.to_array(inits[name])
        node = producers.get(name)
        if node is not None and node.op_type == "Constant":
            for attr in node.attribute:
                if attr.name == "value":
                    return numpy_helper.to_array(attr.t)
        return None

    def drop_constant(name: str) -> None:
        if name in inits:
            graph.initializer.remove(inits.pop(name))
        elif name in producers:
            graph.node.remove(producers.pop(name))

    def resolved(name: str):
        # a constant, possibly behind Identity/Reshape (how paddle2onnx writes a conv bias); None if not constant
        value = constant_value(name)
        node = producers.get(name)
        if value is not None or node is None:
            return value
        if node.op_type == "Identity":
            return resolved(node.input[0])
        if node.op_type == "Reshape":
            data, shape = resolved(node.input[0]), resolved(node.input[1])
            if data is not None and shape is not None and 0 not in shape.tolist():
                return data.reshape(shape)
        return None

    def fold_bias(conv) -> None:
        # Conv -> Add(per-channel constant) becomes one Conv with a bias: onnxruntime's QDQ fusion wants the
        # quantized output right after the Conv
        users = consumers.get(conv.output[0], [])
        if len(users) != 1 or users[0].op_type != "Add" or conv.output[0] in graph_outputs:
            return
        add = users[0]
        other = add.input[1] if add.input[0] == conv.output[0] else add.input[0]
        bias = resolved(other)
        channels = constant_value(source(conv.input[1])).shape[0]
        if bias is None or bias.size != channels or bias.ndim != 4 or bias.shape[1] != channels:
            return
        bias = bias.reshape(-1).astype(np.float32)
        if len(conv.input) > 2 and conv.input[2]:
            old = constant_value(conv.input[2])
            if old is None:
                return
            bias = bias + old.reshape(-1)
        name = const(f"{conv.output[0]}.folded_bias", bias)
        if len(conv.input) > 2:
            conv.input[2] = name
        else:
            conv.input.append(name)
        out = add.output[0]
        graph.node.remove(add)
        consumers[conv.output[0]] = []
        conv.output[0] = out
        producers[out] = conv
        counts["biases_folded"] += 1

    for layer in layers:
        for node in by_weight.get(layer.weight, []):
            if node.op_type == "Conv" and constant_value(source(node.input[1])) is not None:
                fold_bias(node)

    def layer_output(node) -> str:
        # Paddle quantizes a layer's output after its bias; a Conv's bias is folded in already, a MatMul's or a
        # ConvTranspose's is an Add of a constant behind an Identity or two
        out = node.output[0]
        if node.op_type == "Conv":
            return out
        while out not in graph_outputs and len(consumers.get(out, [])) == 1:
            user = consumers[out][0]
            if user.op_type == "Identity":
                out = user.output[0]
                continue
            if user.op_type == "Add":
                other = user.input[1] if user.input[0] == out else user.input[0]
                if resolved(other) is not None:
                    return user.output[0]
            break
        return node.output[0]

    quantized_outputs: set[str] = set()
    for layer in layers:
        if layer.output_scale is None:
            continue
        for node in by_weight.get(layer.weight, []):
            out = layer_output(node)
            if out in graph_outputs:
                # the model's output itself is quantized: the DequantizeLinear takes over its name
                producer = producers[out]
                producer.output[list(producer.output).index(out)] = f"{out}.float"
                qdq(f"{out}.float", layer.output_scale, layer.activation_bits, "out", dq_name=out)
            else:
                rewire(out, qdq(out, layer.output_scale, layer.activation_bits, "out"))
            quantized_outputs.add(out)
            counts["outputs"] += 1

    missing, unused = [], []
    for layer in layers:
        nodes = by_weight.get(layer.weight)
        w = constant_value(layer.weight) if nodes else None
        if w is None:
            # a layer the exported (eval) forward never runs, e.g. DB's threshold branch, has no weight here
            (missing if nodes or constant_value(layer.weight) is not None else unused).append(layer.name)
            continue
        if layer.weight_bits > 8 or layer.activation_bits > 8:
            raise StageError(f"layer {layer.name}: ONNX QDQ export supports up to 8 bits "
                             f"(weight_bits {layer.weight_bits}, activation_bits {layer.activation_bits})")
        w = w.astype(np.float32)
        qmax = float(2 ** (layer.weight_bits - 1) - 1)
        scales = np.maximum(np.asarray(layer.weight_scales, dtype=np.float32).reshape(-1), 1e-8)
        if layer.weight_axis >= 0:
            shape = [1] * w.ndim
            shape[layer.weight_axis] = -1
            wq = np.round(w / scales.reshape(shape) * qmax)
            scale_arr = (scales / qmax).astype(np.float32)
            zp_arr = np.zeros(scales.shape, dtype=np.int8)
        else:
            wq = np.round(w / scales[0] * qmax)
            scale_arr = np.asarray(scales[0] / qmax, dtype=np.float32)
            zp_arr = np.asarray(0, dtype=np.int8)
        wq_name = const(f"{layer.weight}.int8", np.clip(wq, -qmax - 1, qmax).astype(np.int8))
        s = const(f"{layer.weight}.scale", scale_arr)
        z = const(f"{layer.weight}.zero_point", zp_arr)
        attrs = {"axis": layer.weight_axis} if layer.weight_axis >= 0 else {}
        drop_constant(layer.weight)
        # the DequantizeLinear takes over the float weight's name: its users need no rewiring
        new_nodes.append(helper.make_node("DequantizeLinear", [wq_name, s, z], [layer.weight],
                                          name=f"{layer.weight}.dq", **attrs))
        counts["weights"] += 1
        if layer.activation_scale is None:
            continue
        for node in nodes:
            data = node.input[0]
            node.input[0] = qdq(data, layer.activation_scale, layer.activation_bits, "act")
            counts["activations"] += 1
            if quantized_outputs:
                continue  # the producers' outputs are quantized already (quantize_outputs)
            # walk back through rounding-transparent single-consumer ops to the producer's output
            tensor = data
            while len(consumers.get(tensor, [])) == 1 and tensor in producers and \
                    producers[tensor].op_type in _QDQ_TRANSPARENT and \
                    len(consumers.get(producers[tensor].input[0], [])) == 1 and tensor not in graph_outputs:
                tensor = producers[tensor].input[0]
            if tensor != data and tensor in producers and tensor not in graph_outputs and \
                    len(consumers.get(tensor, [])) == 1:
                rewire(tensor, qdq(tensor, layer.activation_scale, layer.activation_bits, "pre"))
                counts["moved_input"] += 1
    if missing or len(unused) == len(layers):
        raise StageError("the ONNX graph has no Conv/MatMul reading the weights of the quantized layers "
                         f"{missing or unused}")
    counts["unused_layers"] = len(unused)
    # nodes must be in topological order: rebuild the list, each new node after its input's producer
    order = list(graph.node) + new_nodes
    del graph.node[:]
    graph.node.extend(_toposort(order, {i.name for i in graph.input} | {i.name for i in graph.initializer}))
    onnx.checker.check_model(model)
    return counts


def _toposort(nodes: list, available: set) -> list:
    ready = set(available)
    pending = list(nodes)
    out = []
    while pending:
        progressed = False
        rest = []
        for node in pending:
            if all(not name or name in ready for name in node.input):
                out.append(node)
                ready.update(node.output)
                progressed = True
            else:
                rest.append(node)
        if not progressed:
            raise StageError(f"ONNX graph has a cycle or a missing input after QDQ insertion: {rest[0].name}")
        pending = rest
    return out


@register("exporter", "onnx", schema=ONNX_SCHEMA)
def export_onnx(params: dict, ctx: ExportContext) -> ExportResult:
    """ONNX model via paddle2onnx (QDQ form for a quantized model), reloaded by onnxruntime and checked."""
    prm = _with_defaults(params, ONNX_SCHEMA)
    x = ctx.checked_sample()
    ptq = ctx.ptq is not None and ctx.quanter is None
    quantized = ctx.quanter is not None
    if quantized and not ctx.quanter.onnx_format:
        raise StageError("the onnx exporter needs a model quantized with onnx_format: true (QDQ ops); "
                         "this one was quantized with onnx_format: false")
    if quantized and prm["opset"] < 13:
        raise StageError(f"export.targets.onnx.opset: a quantized model needs opset 13 or more (per-channel "
                         f"QDQ); got {prm['opset']}")
    paddle()  # paddle2onnx imports paddle: let paddle_env do it first (zlib)
    try:
        import onnx
        import onnxruntime  # noqa: F401
        import paddle2onnx  # noqa: F401
    except ImportError as e:
        raise StageError(f"the onnx exporter needs the 'onnx' extra (pip install 'slimrecipe[onnx]'): {e}") from e
    reference = eager_outputs(ctx.model, x)
    target = "onnx"

    def build(staging: Path):
        onnx_file = staging / f"{MODEL_PREFIX}.onnx"
        inserted = ptq_facts = None
        if quantized:
            # paddle2onnx 2.x maps only fp8 quantize_linear (int8 aborts the process): export the float twin
            # and put the quantization back as ONNX QDQ nodes ourselves, the same way on 1.x
            from .qat import float_twin

            twin, layers = float_twin(ctx.model, ctx.quanter)
            proto = onnx.load_from_string(float_onnx_bytes(ctx, prm["opset"], model=twin))
            inserted = insert_qdq(proto, layers)
            write_bytes(onnx_file, proto.SerializeToString())
        elif ptq:
            ptq_facts = _ptq_onnx(ctx, prm["opset"], onnx_file)
        else:
            write_bytes(onnx_file, float_onnx_bytes(ctx, prm["opset"]))
        op_counts, opset = _onnx_facts(onnx_file)
        qdq = {op: op_counts.get(op, 0) for op in _QDQ_OPS}
        has_qdq = all(qdq.values())
        int8 = quantized or ptq
        if int8 and prm["require_qdq"] and not has_qdq:
            raise StageError(f"the ONNX export of the quantized model has no QDQ pairs ({qdq}); "
                             "onnxruntime would run it in float")
        runner, kernels = onnx_session(onnx_file, threads=prm["threads"], record_kernels=int8)
        got = runner.run_all(x)
        # a ptq model must be the very int8 model whose metric the ptq stage measured (checked exactly below);
        # how far it lies from the float model is then recorded, not judged: the metric has judged it
        parity = check_parity(target, reference, got, quantized=int8, enforce=not ptq, **_tolerances(prm, int8))
        details = {"threads": prm["threads"], "opset_requested": prm["opset"], "opset": opset,
                   "input_name": INPUT_NAME, "dynamic_hw": ctx.dynamic_hw, "quantized": int8,
                   "model_file": onnx_file.name, "qdq_nodes": qdq, "has_qdq": has_qdq,
                   "ort_int8_kernels": kernels}
        if inserted is not None:
            details["qdq_inserted"] = inserted
        if ptq_facts is not None:
            details["ptq"] = {**ptq_facts, **_same_as_measured(ctx, got, x)}
        return runner, parity, details

    return _publish(target, ctx.out_dir, build)


def float_onnx_bytes(ctx: ExportContext, opset: int, model=None) -> bytes:
    """The float model (``model``, else the context's) as ONNX bytes, through a Paddle inference save."""
    with tempfile.TemporaryDirectory(prefix="slimrecipe-onnx-src-") as tmp:
        model_file, params_file = _save_paddle(ctx, Path(tmp) / MODEL_PREFIX, model=model)
        return _paddle2onnx(model_file, params_file, opset)


def _ptq_onnx(ctx: ExportContext, opset: int, onnx_file: Path) -> dict:
    """The `ptq` stage's int8 model made again from the float export: same pre-processing, the ranges it
    calibrated, the layers it left in float."""
    from . import ptq as ptq_mod

    rec = ctx.ptq
    with tempfile.TemporaryDirectory(prefix="slimrecipe-ptq-export-") as tmp:
        prepared = ptq_mod.prepare(float_onnx_bytes(ctx, opset), Path(tmp) / "prepared.onnx")
        ptq_mod.quantize(prepared, Path(rec["ranges"]), ptq_mod.Settings.from_json(rec["settings"]), onnx_file,
                         exclude=rec["float_layers"])
    return {"calibration_ranges": str(rec["ranges"]), "float_layers": list(rec["float_layers"]),
            "settings": rec["settings"]}


def _same_as_measured(ctx: ExportContext, got: list[np.ndarray], x: np.ndarray) -> dict:
    """The exported int8 model must compute what the `ptq` stage measured: same outputs on the parity batch."""
    measured = Path(ctx.ptq["measured_model"])
    if not measured.is_file():
        raise StageError(f"the int8 model the ptq stage measured is gone ({measured}); run the ptq stage again")
    want = onnx_session(measured)[0].run_all(x)
    diff = max(float(np.max(np.abs(a.astype(np.float64) - b))) if a.size else 0.0 for a, b in zip(want, got))
    if diff > 1e-5:
        raise StageError(f"the exported int8 model differs from the one the ptq stage measured ({measured}): "
                         f"max abs diff {diff:.3g} on the parity batch")
    return {"measured_model": str(measured), "max_abs_diff_vs_measured": diff}


LATENCY_RESERVED = ("setup", "threads")


def interleaved_latency(runners: dict[str, Callable[[np.ndarray], Any]], x: np.ndarray, repeats: int = 30,
                        warmup: int = 5) -> dict:
    """Time ``runners`` on ``x`` interleaved in one process; the first runner is the baseline.

    Each round runs every runner once, in an order that reverses every round (A B, B A, ...), so that drift
    of a shared machine and cache effects fall on all alike. Warm-up rounds are not timed. Returns, keyed by
    runner name: median/p90/mean/min ms, its thread count (``runner.threads`` when it has one),
    ``ratio_to_first`` (its median over the baseline's) and ``paired_ratio`` (median over rounds of the
    in-round ratio); plus ``threads`` (the runners' common thread count, else a dict) and ``setup``.
    """
    if not runners:
        raise ValueError("interleaved_latency needs at least one runner")
    if repeats < 1 or warmup < 0:
        raise ValueError("repeats must be >= 1 and warmup >= 0")
    clash = [n for n in runners if n in LATENCY_RESERVED]
    if clash:
        raise ValueError(f"runner names {clash} are reserved in the result; rename them")
    names = list(runners)
    x = np.ascontiguousarray(x, dtype=np.float32)
    for _ in range(warmup):
        for n in names:
            runners[n](x)
    times: dict[str, list[float]] = {n: [] for n in names}
    clock = time.perf_counter
    for r in range(repeats):
        for n in (names if r % 2 == 0 else names[::-1]):
            t0 = clock()
            runners[n](x)
            times[n].append((clock() - t0) * 1e3)
    first = names[0]
    base = np.asarray(times[first])
    med_first = float(np.median(base))
    out: dict[str, Any] = {}
    for n in names:
        t = np.asarray(times[n])
        med = float(np.median(t))
        out[n] = {
            "median_ms": med,
            "p90_ms": float(np.percentile(t, 90)),
            "mean_ms": float(np.mean(t)),
            "min_ms": float(np.min(t)),
            "threads": getattr(runners[n], "threads", None),
            "ratio_to_first": med / med_first if med_first > 0 else float("nan"),
            "paired_ratio": float(np.median(t / np.maximum(base, 1e-9))),
        }
    threads = {n: out[n]["threads"] for n in names}
    out["threads"] = next(iter(threads.values())) if len(set(threads.values())) == 1 else threads
    out["setup"] = {"baseline": first, "input_shape": list(x.shape), "repeats": repeats, "warmup": warmup,
                    "order": "interleaved, reversed every round", "cpu_count": os.cpu_count()}
    return out
