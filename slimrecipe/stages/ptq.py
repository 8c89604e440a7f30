"""`ptq`: post-training int8 quantization of the current float model, with accuracy control, for onnxruntime or
for Paddle Inference.

The stage calibrates on training images, quantizes, measures the int8 model with the recipe's metric on the
validation split, and, when `max_metric_loss` is set and exceeded, returns the most sensitive layers to float
round by round.

- `runtime: onnxruntime` (QDQ ONNX by ``onnxruntime.quantization``) leaves the model's weights alone: the
  `export` stage's `onnx` target rebuilds this very int8 model from the recorded ranges and float layers and
  checks that it computes what was measured here; the `paddle_inference` target exports the float model.
- `runtime: paddle_inference` quantizes with slimrecipe's own QAT quanters (no PACT, no training) and leaves the
  quantized model as the run's model, as the `qat` stage does: the `export` stage writes it as an int8 Paddle
  Inference program, and as QDQ ONNX for the `onnx` target, each checked against it.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np

from ..errors import StageError
from ..fileio import sha256_file
from ..registry import register

SCHEMA = {
    "type": "object",
    "additionalProperties": False,
    "properties": {
        "runtime": {"enum": ["onnxruntime", "paddle_inference"], "default": "onnxruntime",
                    "description": "the runtime the int8 model is made for. onnxruntime: onnxruntime.quantization, "
                                   "QDQ ONNX (the paddle_inference export stays float). paddle_inference: "
                                   "slimrecipe's QAT quanters (pact: false) calibrated without training, exported as "
                                   "an int8 Paddle program (for devices that run int8 Paddle programs; on x86 CPUs "
                                   "it runs slower than float) and as QDQ ONNX. The keys marked 'onnxruntime only' "
                                   "are ignored with paddle_inference"},
        "calibration": {
            "type": "object",
            "additionalProperties": False,
            "properties": {
                "images": {"type": "integer", "minimum": 1, "maximum": 100000, "default": 32,
                           "description": "training images the activation ranges are measured on (drawn by seed)"},
                "method": {"enum": ["minmax", "percentile", "entropy"], "default": "percentile",
                           "description": "onnxruntime only: activation range: the extremes seen, a percentile of "
                                          "|x|, or the range that keeps the histogram's entropy (KL divergence). "
                                          "paddle_inference: each activation's scale is the mean of its abs-max "
                                          "over the calibration images"},
                "percentile": {"type": "number", "exclusiveMinimum": 90, "maximum": 100, "default": 99.999,
                               "description": "onnxruntime only, method percentile: the percentile of |x| taken "
                                              "as the range"},
            },
            "default": {},
        },
        "per_channel": {"type": "boolean", "default": True, "description": "one weight scale per output channel"},
        "activation_type": {"enum": ["uint8", "int8"], "default": "uint8",
                            "description": "onnxruntime only: activations' int8 type (uint8: onnxruntime's "
                                           "choice for x86 CPUs); paddle_inference activations are int8"},
        "reduce_range": {"type": "boolean", "default": False,
                         "description": "onnxruntime only: 7-bit weights, for x86 CPUs without VNNI that "
                                        "saturate 8-bit sums"},
        "op_types": {"type": "array", "minItems": 1, "uniqueItems": True,
                     "items": {"enum": ["Conv", "ConvTranspose", "MatMul", "Gemm", "Add", "Mul", "Concat", "Resize",
                                        "Sigmoid", "HardSigmoid", "HardSwish", "AveragePool", "GlobalAveragePool",
                                        "MaxPool", "Relu", "Clip", "Transpose"]},
                     "default": ["Conv", "ConvTranspose", "MatMul", "Gemm"],
                     "description": "onnxruntime only: ONNX op types quantized (weights and inputs); accuracy control "
                                    "ranks and returns to float only the weighted ones (Conv, ConvTranspose, "
                                    "MatMul, Gemm). paddle_inference quantizes Conv2D, Conv2DTranspose and "
                                    "Linear layers (weights, inputs and outputs)"},
        "max_metric_loss": {"type": ["number", "null"], "minimum": 0, "default": None,
                            "description": "largest metric loss of the int8 model against the float model it "
                                           "comes from (0.01: one point); while it is exceeded, the most "
                                           "sensitive layers go back to float. null: quantize every layer"},
        "max_rounds": {"type": "integer", "minimum": 1, "maximum": 100, "default": 5,
                       "description": "rounds of returning layers to float before giving up (closest kept)"},
        "layers_per_round": {"type": "integer", "minimum": 1, "maximum": 1000, "default": 2,
                             "description": "layers returned to float per round, most sensitive first"},
        "probe_images": {"type": "integer", "minimum": 1, "maximum": 1000, "default": 8,
                         "description": "calibration images the per-layer error is measured on"},
        "dynamic_hw": {"type": "boolean", "default": False,
                       "description": "onnxruntime only: free height and width in the ONNX model (detectors evaluate "
                                      "any size)"},
        "opset": {"type": "integer", "minimum": 13, "maximum": 17, "default": 13,
                  "description": "onnxruntime only: ONNX opset of the float export (per-channel QDQ needs 13 or "
                                 "more)"},
    },
}


# keys that only mean something for onnxruntime: a paddle_inference run ignores them and says so
ONNXRUNTIME_ONLY = ("calibration.method", "calibration.percentile", "activation_type", "reduce_range", "op_types",
                    "dynamic_hw", "opset")


@register("stage", "ptq", schema=SCHEMA)
def ptq(state, params: dict) -> dict:
    """Calibrate, quantize, measure; hand sensitive layers back to float while the loss exceeds the budget."""
    if state.quanter is not None:
        raise StageError("ptq quantizes a float model; this one was quantized by qat already "
                         "(a recipe runs ptq or qat, not both)")
    if params["runtime"] == "paddle_inference":
        return _ptq_paddle_inference(state, params)
    return _ptq_onnxruntime(state, params)


def _ptq_onnxruntime(state, params: dict) -> dict:
    from .. import ptq as lib
    from ..exporters import ExportContext, float_onnx_bytes
    from ..pruning import count_flops, count_params

    sdir = state.stage_dir
    model = state.model
    model.eval()
    settings = lib.Settings(method=params["calibration"].get("method", "percentile"),
                            percentile=params["calibration"].get("percentile", 99.999),
                            per_channel=params["per_channel"], activation_type=params["activation_type"],
                            reduce_range=params["reduce_range"], op_types=tuple(params["op_types"]))
    images, indices = calibration_images(state.data.train, params["calibration"].get("images", 32), state.seed)
    ctx = ExportContext(model, state.input_shape, params["dynamic_hw"], images[:1], sdir)
    prepared = lib.prepare(float_onnx_bytes(ctx, params["opset"]), sdir / "model.float.onnx")
    layers = lib.quantizable_layers(prepared, [t for t in settings.op_types if t in lib.DEFAULT_OP_TYPES])
    if not layers:
        raise StageError(f"the model has no {'/'.join(settings.op_types)} layer to quantize (ptq.op_types)")
    names = _param_names(model)
    for layer in layers:
        layer["param"] = _param_for(layer["weight"], names)
    print(f"  calibrating {len(layers)} layers on {len(images)} training images ({settings.method})")
    ranges = lib.calibrate(prepared, images, settings, sdir / "calibration.json")

    threads = lib.threads_for_evaluation()
    float_metric = state.evaluate(RuntimeModel(lib.session(prepared, threads)))

    def measure(float_layers: list[str]) -> float:
        with tempfile.TemporaryDirectory(prefix="slimrecipe-ptq-round-") as tmp:
            f = lib.quantize(prepared, ranges, settings, Path(tmp) / "int8.onnx", exclude=float_layers)
            return state.evaluate(RuntimeModel(lib.session(f, threads)))

    ranking: list[dict] = []

    def rank() -> list[str]:
        probe = images[: params["probe_images"]]
        print(f"  measuring each layer's int8 error on {len(probe)} calibration images")
        ranking.extend(lib.layer_sensitivity(prepared, ranges, settings, layers, probe, threads=threads))
        return [r["node"] for r in ranking]

    ctl = lib.accuracy_control(measure, float_metric, rank, max_loss=params["max_metric_loss"],
                               max_rounds=params["max_rounds"], per_round=params["layers_per_round"],
                               higher_is_better=state.metric.higher_is_better)
    if ctl.message:
        print(f"  {ctl.message}")
    chosen = ctl.rounds[ctl.chosen]
    delivered = lib.quantize(prepared, ranges, settings, sdir / "model.int8.onnx", exclude=chosen.float_layers)
    by_node = {layer["node"]: layer for layer in (ranking or layers)}
    print(f"  delivered: {len(chosen.float_layers)} of {len(layers)} layers in float, {state.metric.name} "
          f"{chosen.metric:.4f} (float {float_metric:.4f})")
    rel = lambda p: str(Path(p).relative_to(state.run_dir))  # noqa: E731
    return {
        "runtime": params["runtime"],
        "settings": settings.to_json(),
        "calibration": {"images": len(images), "indices": indices, "seed": state.seed, "ranges_file": rel(ranges),
                        "ranges_sha256": sha256_file(ranges)},
        **_control_record(ctl, float_metric, params["max_metric_loss"], by_node),
        "layer_ranking": ranking,
        "quantizable_layers": len(layers),
        "model_file": rel(delivered),
        "float_model_file": rel(prepared),
        "size_bytes": {"float": prepared.stat().st_size, "int8": delivered.stat().st_size},
        "flops": count_flops(model, state.input_shape),
        "params": count_params(model),
        "ptq": {"runtime": params["runtime"], "ranges": rel(ranges), "settings": settings.to_json(),
                "float_layers": list(chosen.float_layers), "measured_model": rel(delivered),
                "dynamic_hw": params["dynamic_hw"], "opset": params["opset"]},
    }


def _ptq_paddle_inference(state, params: dict) -> dict:
    """slimrecipe's QAT quanters on a copy of the float model, calibrated on training images; the model delivered
    (fewest layers in float within the budget) becomes the run's model, quantized as a QAT model is."""
    from .. import ptq as lib
    from ..pruning import count_flops, count_params
    from ._training import save_weights

    float_model = state.model
    float_model.eval()
    per_channel = params["per_channel"]
    images, indices = calibration_images(state.data.train, params["calibration"].get("images", 32), state.seed)
    print(f"  paddle_inference: slimrecipe's quanters (weights {'per channel' if per_channel else 'per tensor'}, "
          f"activations and layer outputs per tensor, scale: the mean abs-max over {len(images)} training images); "
          f"ptq.{', ptq.'.join(ONNXRUNTIME_ONLY)} apply to onnxruntime only")
    float_metric = state.evaluate(float_model)
    out = lib.paddle_ptq(float_model, images, state.evaluate, per_channel=per_channel,
                         max_loss=params["max_metric_loss"], max_rounds=params["max_rounds"],
                         per_round=params["layers_per_round"], probe_images=params["probe_images"],
                         higher_is_better=state.metric.higher_is_better, float_metric=float_metric)
    ctl = out.control
    if ctl.message:
        print(f"  {ctl.message}")
    chosen = ctl.rounds[ctl.chosen]
    by_node = {layer["node"]: layer for layer in (out.ranking or out.layers)}
    print(f"  delivered: {len(chosen.float_layers)} of {len(out.layers)} layers in float, {state.metric.name} "
          f"{chosen.metric:.4f} (float {float_metric:.4f})")
    weights = save_weights(out.model, state.stage_dir / "model.pdparams")
    return {
        "runtime": params["runtime"],
        "settings": {"per_channel": per_channel,
                     "weights": "int8, abs-max " + ("per output channel" if per_channel else "per tensor"),
                     "activations": "int8 per tensor, layer inputs and outputs, scale: mean abs-max over the "
                                    "calibration images",
                     "layer_types": list(lib.PADDLE_LAYER_TYPES), "conv_bn_folded": True},
        "ignored_settings": [f"ptq.{k}" for k in ONNXRUNTIME_ONLY],
        "calibration": {"images": len(images), "indices": indices, "seed": state.seed},
        **_control_record(ctl, float_metric, params["max_metric_loss"], by_node),
        "layer_ranking": out.ranking,
        "quantizable_layers": len(out.layers),
        "flops": count_flops(float_model, state.input_shape),
        "params": count_params(float_model),
        # the quantized model is the run's model from here on, as after qat: the export stage exports it as such
        "checkpoint": state.set_model(out.model, weights, quanter=out.quanter, quant_config=out.quanter.config),
    }


def _control_record(ctl, float_metric: float, max_loss, by_node: dict) -> dict:
    """What the result says of an accuracy control (either runtime): each round, and the one delivered."""
    chosen = ctl.rounds[ctl.chosen]
    return {"metric_float": float_metric, "metric": chosen.metric, "loss": chosen.loss, "max_metric_loss": max_loss,
            "met": ctl.met, "message": ctl.message,
            "rounds": [dict(r.to_json(), round=i) for i, r in enumerate(ctl.rounds)], "chosen_round": ctl.chosen,
            "float_layers": [by_node[n] for n in chosen.float_layers]}


def calibration_images(train, n: int, seed: int) -> tuple[list[np.ndarray], list[int]]:
    """``n`` training images (the model input of each sample), drawn without replacement by ``seed``."""
    if not len(train):
        raise StageError("ptq calibrates on training images, and the training split is empty")
    rng = np.random.default_rng([seed, 0x9779])
    indices = sorted(int(i) for i in rng.choice(len(train), size=min(n, len(train)), replace=False))
    return [np.asarray(train[i][0], dtype=np.float32) for i in indices], indices


def _param_names(model) -> dict[str, str]:
    """Paddle's internal tensor name (what the ONNX initializers are called) -> the structured parameter name."""
    return {p.name: name for name, p in model.named_parameters()}


def _param_for(weight: str | None, names: dict[str, str]) -> str | None:
    # onnxruntime's pre-processing renames folded weights with a prefix (ConvBnFusion_W_conv2d_3.w_0)
    if weight is None:
        return None
    return next((v for k, v in names.items() if weight == k or weight.endswith("_" + k)), None)


class RuntimeModel:
    """An exported model behind a dygraph model's call, so that the recipe's own metric can measure it."""

    training = False

    def __init__(self, runner):
        self.runner = runner

    def eval(self):
        return self

    def train(self, mode: bool = True):
        raise StageError("an exported model cannot be trained")

    def __call__(self, x):
        from ..paddle_env import paddle

        out = self.runner.run_all(x.numpy() if hasattr(x, "numpy") else np.asarray(x, dtype=np.float32))
        return paddle().to_tensor(out[0]) if len(out) == 1 else [paddle().to_tensor(o) for o in out]
