"""PACT quantization-aware training on PaddleSlim's dygraph QAT: the recipe's `qat.config`, the quanter, saving.

How PACT is switched on in PaddleSlim 2.6: ``paddleslim.QAT(config={"activation_preprocess_type": "PACT"})``
(or, equivalently, ``QAT(config, act_preprocess=paddleslim.dygraph.quant.qat.PACT)``). Either way Paddle's
``ImperativeQuantAware`` gets PaddleSlim's ``PACT`` layer as ``act_preprocess_layer``: every quantized
Conv2D/Linear clips its input to ``[-alpha, alpha]`` (alpha learnable, initialised to 100, learning-rate
multiplier 1000) before the activation fake-quant. At save time PaddleSlim strips the PACT layers by
re-quantizing a copy of the *float* model it took inside ``quantize()`` and loading the trained weights into
it; the activation scales learnt on clipped activations keep the clipping in the exported model.
"""

from __future__ import annotations

import copy
import weakref
from typing import Any

from .errors import Problem, RecipeError, StageError
from .paddle_env import ensure_dynamic_mode, paddle, paddleslim

# PaddleSlim 2.6's `_quant_config_default`, verbatim (a test keeps them equal).
PADDLESLIM_DEFAULTS: dict[str, Any] = {
    "weight_preprocess_type": None,
    "activation_preprocess_type": None,
    "weight_quantize_type": "channel_wise_abs_max",
    "activation_quantize_type": "moving_average_abs_max",
    "weight_bits": 8,
    "activation_bits": 8,
    "dtype": "int8",
    "window_size": 10000,
    "moving_rate": 0.9,
    "quantizable_layer_type": ["Conv2D", "Linear"],
    "fuse_conv_bn": False,
    "onnx_format": True,
}

# Allowed values are what PaddleSlim's checks AND Paddle 2.6's ImperativeQuantAware both accept: PaddleSlim's
# own lists are wider (e.g. range_abs_max) but Paddle then fails on them with a bare AssertionError.
QAT_PARAMS_SCHEMA: dict = {
    "$schema": "https://json-schema.org/draft/2020-12/schema",
    "title": "qat.config",
    "description": "PaddleSlim dygraph QAT config (paddleslim.QAT) plus the `pact` shorthand.",
    "type": "object",
    "additionalProperties": False,
    "properties": {
        "pact": {
            "type": "boolean", "default": True,
            "description": "PACT clipping of activations: shorthand for activation_preprocess_type 'PACT' "
                           "(false: null). If both are given they must agree.",
        },
        "weight_quantize_type": {
            "enum": ["channel_wise_abs_max", "abs_max"], "default": "channel_wise_abs_max",
            "description": "weight fake-quant: one scale per output channel, or one per tensor",
        },
        "activation_quantize_type": {
            "enum": ["moving_average_abs_max"], "default": "moving_average_abs_max",
            "description": "activation fake-quant; the only type dygraph QAT in Paddle 2.6 supports",
        },
        "weight_bits": {
            "type": "integer", "minimum": 1, "maximum": 16, "default": 8,
            "description": "bits of quantized weights (onnxruntime int8 kernels need 8)",
        },
        "activation_bits": {
            "type": "integer", "minimum": 1, "maximum": 16, "default": 8,
            "description": "bits of quantized activations (onnxruntime int8 kernels need 8)",
        },
        "dtype": {"enum": ["int8"], "default": "int8", "description": "data type after quantization"},
        "window_size": {
            "type": "integer", "minimum": 1, "default": 10000,
            "description": "window of range_abs_max; accepted but unused by dygraph QAT",
        },
        "moving_rate": {
            "type": "number", "exclusiveMinimum": 0, "exclusiveMaximum": 1, "default": 0.9,
            "description": "decay of the moving-average activation scale",
        },
        "quantizable_layer_type": {
            "type": "array", "minItems": 1, "uniqueItems": True,
            "items": {"enum": ["Conv2D", "Linear", "Conv2DTranspose"]},
            "default": ["Conv2D", "Linear"],
            "description": "layer types whose weights and inputs are fake-quantized",
        },
        "weight_preprocess_type": {
            "enum": ["PACT", None], "default": None,
            "description": "PACT clipping of weights before quantization (null: none)",
        },
        "activation_preprocess_type": {
            "enum": ["PACT", None], "default": None,
            "description": "PACT clipping of activations before quantization (null: none); see `pact`",
        },
        "fuse_conv_bn": {
            "type": "boolean", "default": False,
            "description": "fold each BatchNorm2D into the Conv2D registered just before it, before "
                           "quantizing (done by slimrecipe: Paddle 2.6's own folding is a no-op)",
        },
        "onnx_format": {
            "type": "boolean", "default": True,
            "description": "save quantize_linear/dequantize_linear (QDQ) ops with int8 weights; "
                           "required by the onnx exporter",
        },
    },
}

# quanter -> untouched copy of the float model PaddleSlim took in quantize(); see save_quantized().
_FLOAT_COPIES: "weakref.WeakKeyDictionary[Any, Any]" = weakref.WeakKeyDictionary()


def resolve_config(config: dict | None, path: str = "qat.config") -> dict:
    """The PaddleSlim config a recipe's `qat.config` stands for: defaults filled, `pact` folded in, checked."""
    config = dict(config or {})
    _validate(config, path)
    pact = config.pop("pact", None)
    if pact is not None and "activation_preprocess_type" in config:
        if (config["activation_preprocess_type"] == "PACT") != bool(pact):
            raise RecipeError(
                f"pact={pact} contradicts activation_preprocess_type="
                f"{config['activation_preprocess_type']!r}; give one of them", path=f"{path}.pact")
    resolved = copy.deepcopy(PADDLESLIM_DEFAULTS)
    resolved.update(config)
    if "activation_preprocess_type" not in config:
        resolved["activation_preprocess_type"] = "PACT" if (True if pact is None else pact) else None
    # PaddleSlim asserts on the Python types, and YAML gives 1 for 1.0
    resolved["moving_rate"] = float(resolved["moving_rate"])
    resolved["quantizable_layer_type"] = list(resolved["quantizable_layer_type"])
    return resolved


def _validate(config: dict, path: str) -> None:
    import jsonschema

    validator = jsonschema.Draft202012Validator(QAT_PARAMS_SCHEMA)
    errors = sorted(validator.iter_errors(config), key=lambda e: list(e.absolute_path))
    if errors:
        raise RecipeError([
            Problem(".".join([path, *map(str, e.absolute_path)]), e.message) for e in errors])


def make_quanter(config: dict | None = None):
    """A ``paddleslim.QAT`` built from a recipe's `qat.config` (PACT on activations unless ``pact: false``)."""
    resolved = resolve_config(config)
    return paddleslim().dygraph.quant.QAT(config=resolved)


def has_preprocess(quanter) -> bool:
    """True when PACT (on activations or weights) is in the quantized model, and so stripped at save time."""
    return quanter.config.get("activation_preprocess_type") == "PACT" or \
        quanter.config.get("weight_preprocess_type") == "PACT"


def quantize(model, quanter, example=None):
    """Insert fake-quant (and PACT) layers into ``model`` in place; returns ``model``.

    With ``fuse_conv_bn`` each Conv2D directly followed by its BatchNorm2D is folded first (Paddle 2.6's
    own fusion is a no-op: it fuses a copy and drops it). ``example`` (a float32 batch), when given, proves
    the folding kept the model's eval outputs. The moving-average activation scales start uncalibrated: train,
    or :func:`calibrate`, before evaluating or exporting.
    """
    ensure_dynamic_mode()
    was_training = model.training
    if quanter.config.get("fuse_conv_bn"):
        fuse_conv_bn(model, example)
    quanter.quantize(model, inplace=True)
    if has_preprocess(quanter):
        # PaddleSlim's save re-quantizes quanter._model (its float copy) in place: a second save would wrap
        # its layers twice, the trained weights would no longer load, and the first save's would be exported
        _FLOAT_COPIES[quanter] = copy.deepcopy(quanter._model)
    model.train() if was_training else model.eval()
    return model


def conv_bn_pairs(model) -> list[list[str]]:
    """Names of (Conv2D, BatchNorm2D) siblings registered one after the other with matching channels."""
    nn = paddle().nn
    pairs = []
    for parent_name, parent in [("", model), *model.named_sublayers()]:
        children = list(parent.named_children())
        for (n1, a), (n2, b) in zip(children, children[1:]):
            if isinstance(a, nn.Conv2D) and isinstance(b, nn.BatchNorm2D) and \
                    a._out_channels == b._num_features:
                prefix = f"{parent_name}." if parent_name else ""
                pairs.append([prefix + n1, prefix + n2])
    return pairs


def fuse_conv_bn(model, example=None) -> list[list[str]]:
    """Fold BatchNorm2D into the Conv2D before it, in place (eval statistics); returns the fused pairs.

    Raises ``StageError`` if ``example`` is given and the folded model's eval outputs moved.
    """
    paddle()
    from paddle.quantization.imperative import fuse_utils

    from .exporters import eager_outputs

    pairs = conv_bn_pairs(model)
    if not pairs:
        return pairs
    was_training = model.training
    model.eval()
    before = eager_outputs(model, example) if example is not None else None
    fuse_utils.fuse_layers(model, pairs, inplace=True)
    if before is not None:
        after = eager_outputs(model, example)
        diff = max(float(abs(a - b).max()) for a, b in zip(after, before))
        scale = max(float(abs(b).max()) for b in before)
        if diff > 1e-3 * (1.0 + scale):
            raise StageError(f"fuse_conv_bn changed the model's outputs (max abs diff {diff:.4g}): the "
                             f"Conv2D/BatchNorm2D pairs {pairs} guessed from registration order are not "
                             "all used as conv -> bn; set fuse_conv_bn: false")
    if was_training:
        model.train()
    return pairs


def calibrate(model, batches) -> int:
    """Run training-mode forwards (no gradients) so the activation scales settle; BatchNorm stays frozen.

    Returns the number of batches run. Useful before exporting a quantized model that was not finetuned.
    """
    p = paddle()
    nn = p.nn
    was_training = model.training
    model.train()
    for layer in model.sublayers():
        if isinstance(layer, (nn.BatchNorm, nn.BatchNorm1D, nn.BatchNorm2D, nn.BatchNorm3D, nn.SyncBatchNorm)):
            layer.eval()
    n = 0
    with p.no_grad():
        for batch in batches:
            model(batch if isinstance(batch, p.Tensor) else p.to_tensor(batch))
            n += 1
    model.train() if was_training else model.eval()
    return n


def save_quantized(model, quanter, path_prefix, input_spec) -> None:
    """``quanter.save_quantized_model`` that can be called more than once and leaves ``model`` as it was.

    Writes ``<path_prefix>.pdmodel`` / ``.pdiparams``, and always returns to dynamic mode (STACK.md trap 3).
    """
    from .exporters import forget_stale_trace_records

    p = paddle()
    ensure_dynamic_mode()
    forget_stale_trace_records()
    if has_preprocess(quanter):
        if quanter not in _FLOAT_COPIES:
            raise StageError("a PACT model must be quantized with slimrecipe.qat.quantize() to be saved")
        quanter._model = copy.deepcopy(_FLOAT_COPIES[quanter])
        to_save = model  # PaddleSlim only reads its state_dict
    else:
        # Paddle's save would turn model.forward into a static function in place
        to_save = copy.deepcopy(model)
    was_training = model.training
    try:
        to_save.eval()
        quanter.save_quantized_model(to_save, str(path_prefix), input_spec=input_spec)
    finally:
        if not p.in_dynamic_mode():
            p.disable_static()
        model.train() if was_training else model.eval()
