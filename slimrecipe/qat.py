"""Quantization-aware training on ``paddle.quantization`` (Paddle 2.6 and 3.x): the recipe's `qat.config`, the
quanters (per-channel abs-max weights, moving-average abs-max or PACT activations), conv-BN folding, saving.

The quantized model is Paddle's own QAT model (``QuantedConv2D``/``QuantedLinear`` wrappers, plus our
``QuantedConv2DTranspose``) with quanters of ours where Paddle has none:

- weights: :class:`AbsMaxWeightQuanter` rounds each output channel (or the whole tensor) to ``weight_bits``
  against its current abs-max, with a straight-through gradient;
- activations, ``pact: true``: :class:`PACTQuanter` clips the input to ``[-alpha, alpha]`` and rounds it to
  ``activation_bits`` with alpha as the scale. alpha is a learnable parameter: straight-through gradient for
  the input inside the clip, PACT's gradient for alpha (+1 above alpha, -1 below -alpha, 0 inside). It starts
  at the abs-max of the first training-mode batch it sees (so calibration or the first training step sets it);
- activations, ``pact: false``: Paddle's ``FakeQuanterWithAbsMaxObserver`` (moving-average abs-max);
- outputs (``quantize_outputs``): the same moving-average quanter after each quantized layer, in Paddle's
  ``ObserveWrapper``, so that the deployed graph is int8 from one convolution to the next.

Saving converts a copy to Paddle's deployable form (``quantize_linear``/``dequantize_linear`` around each
quantized layer, weights stored rounded; ``onnx_format: true``) or keeps the training-time fake-quant ops
(``onnx_format: false``), then ``paddle.jit.save``. The ONNX exporter does not go through Paddle's QDQ ops
(paddle2onnx 2.x converts only fp8 ones): it exports :func:`float_twin` and puts the scales back as ONNX QDQ.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import Problem, RecipeError, StageError
from .paddle_env import ensure_dynamic_mode, paddle

QAT_PARAMS_SCHEMA: dict = {
    "$schema": "https://json-schema.org/draft/2020-12/schema",
    "title": "qat.config",
    "description": "quantization-aware training on paddle.quantization: what is quantized, and how",
    "type": "object",
    "additionalProperties": False,
    "properties": {
        "pact": {
            "type": "boolean", "default": True,
            "description": "PACT on activations: clip to a learnt [-alpha, alpha] and quantize with alpha as the "
                           "scale (false: moving-average abs-max scale, no learnt clipping)",
        },
        "pact_lr_multiplier": {
            "type": "number", "exclusiveMinimum": 0, "default": 1.0,
            "description": "learning-rate multiplier of the PACT alphas (they start at the abs-max of the "
                           "first batch; weight decay of the optimizer also shrinks them, as in the PACT paper)",
        },
        "weight_quantize_type": {
            "enum": ["channel_wise_abs_max", "abs_max"], "default": "channel_wise_abs_max",
            "description": "weight scale: the abs-max of each output channel, or of the whole tensor",
        },
        "weight_bits": {
            "type": "integer", "minimum": 2, "maximum": 16, "default": 8,
            "description": "bits of quantized weights (int8 kernels of onnxruntime need 8)",
        },
        "activation_bits": {
            "type": "integer", "minimum": 2, "maximum": 16, "default": 8,
            "description": "bits of quantized activations (int8 kernels of onnxruntime need 8)",
        },
        "moving_rate": {
            "type": "number", "exclusiveMinimum": 0, "exclusiveMaximum": 1, "default": 0.9,
            "description": "decay of the moving-average activation abs-max (pact: false)",
        },
        "quantize_outputs": {
            "type": "boolean", "default": True,
            "description": "also fake-quantize each quantized layer's output (moving-average abs-max, "
                           "activation_bits): the deployed graph is then int8 from conv to conv, which "
                           "onnxruntime needs to run its convolutions as QLinearConv",
        },
        "quantizable_layer_type": {
            "type": "array", "minItems": 1, "uniqueItems": True,
            "items": {"enum": ["Conv2D", "Linear", "Conv2DTranspose"]},
            "default": ["Conv2D", "Linear"],
            "description": "layer types whose weights and inputs are quantized",
        },
        "fuse_conv_bn": {
            "type": "boolean", "default": False,
            "description": "fold each BatchNorm2D into the Conv2D registered just before it, before quantizing, "
                           "so the quantized weights are the ones deployed (checked on a batch when one is given)",
        },
        "onnx_format": {
            "type": "boolean", "default": True,
            "description": "save quantize_linear/dequantize_linear (QDQ) ops with rounded weights (needed by "
                           "the onnx exporter); false saves the training-time fake-quant ops",
        },
        "float_layers": {
            "type": "array", "uniqueItems": True, "items": {"type": "string", "minLength": 1}, "default": [],
            "description": "layers left in float, by structured name (as in the state dict, e.g. layer1.0.conv1): "
                           "neither their weights nor their inputs or outputs are quantized (the ptq stage's "
                           "accuracy control for paddle_inference writes this)",
        },
    },
}


def schema_defaults() -> dict:
    """Every key of `qat.config` with its schema default."""
    return {k: copy.deepcopy(p["default"]) for k, p in QAT_PARAMS_SCHEMA["properties"].items()}


def resolve_config(config: dict | None, path: str = "qat.config") -> dict:
    """A recipe's `qat.config` checked against the schema, with the schema's defaults filled in."""
    config = dict(config or {})
    _validate(config, path)
    resolved = schema_defaults()
    resolved.update(copy.deepcopy(config))
    resolved["moving_rate"] = float(resolved["moving_rate"])  # YAML gives 1 for 1.0
    resolved["pact_lr_multiplier"] = float(resolved["pact_lr_multiplier"])
    resolved["quantizable_layer_type"] = list(resolved["quantizable_layer_type"])
    resolved["float_layers"] = list(resolved["float_layers"])
    return resolved


def _validate(config: dict, path: str) -> None:
    import jsonschema

    validator = jsonschema.Draft202012Validator(QAT_PARAMS_SCHEMA)
    errors = sorted(validator.iter_errors(config), key=lambda e: list(e.absolute_path))
    if errors:
        raise RecipeError([
            Problem(".".join([path, *map(str, e.absolute_path)]), e.message) for e in errors])


@dataclass
class Quanter:
    """What a model was quantized with: the resolved config and Paddle's ``QAT`` object built from it."""

    config: dict
    qat: Any = field(repr=False)

    @property
    def onnx_format(self) -> bool:
        return bool(self.config["onnx_format"])


def make_quanter(config: dict | None = None) -> Quanter:
    """A :class:`Quanter` for a recipe's `qat.config` (validated; ``RecipeError`` names the bad key)."""
    resolved = resolve_config(config)
    p = paddle()
    from paddle.quantization import QAT, QuantConfig

    L = _layers()
    nn = p.nn
    types = {"Conv2D": nn.Conv2D, "Linear": nn.Linear, "Conv2DTranspose": nn.Conv2DTranspose}
    weight = L.Factory(L.AbsMaxWeightQuanter, bit_length=resolved["weight_bits"],
                       channel_wise=resolved["weight_quantize_type"] == "channel_wise_abs_max")
    if resolved["pact"]:
        activation = L.Factory(L.PACTQuanter, bit_length=resolved["activation_bits"],
                               lr_multiplier=resolved["pact_lr_multiplier"])
    else:
        activation = L.Factory(L.MovingAverageAbsMaxQuanter, moving_rate=resolved["moving_rate"],
                               bit_length=resolved["activation_bits"])
    q_config = QuantConfig(activation=None, weight=None)
    q_config.add_qat_layer_mapping(nn.Conv2DTranspose, L.QuantedConv2DTranspose)
    q_config.add_type_config([types[t] for t in resolved["quantizable_layer_type"]],
                             activation=activation, weight=weight)
    return Quanter(resolved, QAT(q_config))


def quantize(model, quanter: Quanter, example=None):
    """Wrap ``model``'s quantizable layers with fake-quant in place; returns ``model``.

    With ``fuse_conv_bn`` each Conv2D directly followed by its BatchNorm2D is folded first; ``example`` (a
    float32 batch), when given, proves the folding kept the model's eval outputs (``StageError`` if not).
    Activation scales start uncalibrated: train, or :func:`calibrate`, before evaluating or exporting.
    """
    ensure_dynamic_mode()
    was_training = model.training
    if quanter.config["fuse_conv_bn"]:
        fuse_conv_bn(model, example)
    hidden = _hide(model, quanter.config["float_layers"])
    model.train()  # Paddle's QAT refuses a model in eval mode
    try:
        quanter.qat.quantize(model, inplace=True)
        if quanter.config["quantize_outputs"]:
            _quantize_outputs(model, quanter.config)
    finally:
        for (parent, name), layer in hidden.items():
            parent._sub_layers[name] = layer
        model.train() if was_training else model.eval()
    if not quantized_layers(model):
        raise StageError(f"qat found no layer of the types {quanter.config['quantizable_layer_type']} to quantize "
                         "(qat.config.quantizable_layer_type)")
    return model


def _hide(model, names) -> dict:
    """Swap the `float_layers` out of the model for placeholders, so that Paddle's QAT does not wrap them (its
    per-layer configs match Paddle's generated layer names, not structured ones); the caller puts them back."""
    if not names:
        return {}
    layers = dict(model.named_sublayers())
    missing = [n for n in names if n not in layers]
    if missing:
        raise StageError(f"qat.config.float_layers: the model has no layer named {missing[:5]}")
    hidden = {}
    for name in names:
        prefix, _, attr = name.rpartition(".")
        parent = layers[prefix] if prefix else model
        hidden[(parent, attr)] = parent._sub_layers[attr]
        parent._sub_layers[attr] = paddle().nn.Identity()
    return hidden


def _quantize_outputs(model, config: dict) -> None:
    # Paddle's ObserveWrapper(observe_input=False) runs the layer, then the quanter; Paddle's convert() turns
    # the quanter into quantize/dequantize ops like any other
    paddle()
    from paddle.nn.quant.format import ConvertibleQuantedLayer
    from paddle.quantization.wrapper import ObserveWrapper

    L = _layers()
    for parent in [model, *model.sublayers()]:
        for name, child in list(parent.named_children()):
            if isinstance(child, ConvertibleQuantedLayer) and not isinstance(parent, ObserveWrapper):
                quanter = L.MovingAverageAbsMaxQuanter(child, moving_rate=config["moving_rate"],
                                                       bit_length=config["activation_bits"])
                parent._sub_layers[name] = ObserveWrapper(quanter, child, observe_input=False)


def quantized_layers(model) -> list[str]:
    """Names of the layers that QAT wrapped (their weights and inputs are quantized)."""
    paddle()
    from paddle.nn.quant.format import ConvertibleQuantedLayer

    return [n for n, m in model.named_sublayers() if isinstance(m, ConvertibleQuantedLayer)]


def pact_layers(model) -> list:
    """The PACT activation quanters of a quantized model."""
    L = _layers()
    return [m for m in model.sublayers() if isinstance(m, L.PACTQuanter)]


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
    if was_training:
        model.train()
    if before is not None:
        after = eager_outputs(model, example)
        diff = max(float(abs(a - b).max()) for a, b in zip(after, before))
        scale = max(float(abs(b).max()) for b in before)
        if diff > 1e-3 * (1.0 + scale):
            raise StageError(f"fuse_conv_bn changed the model's outputs (max abs diff {diff:.4g}): the "
                             f"Conv2D/BatchNorm2D pairs {pairs} guessed from registration order are not "
                             "all used as conv -> bn; set fuse_conv_bn: false")
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


def deployable_copy(model, quanter: Quanter):
    """An eval-mode copy of a quantized model as it is saved: QDQ ops and rounded weights when
    ``onnx_format``, else the fake-quant model itself. ``model`` is left untouched."""
    ensure_dynamic_mode()
    _refresh_weight_scales(model)
    out = copy.deepcopy(model)
    out.eval()
    if quanter.onnx_format:
        out = quanter.qat.convert(out, inplace=True)
        out.eval()
    return out


def save_quantized(model, quanter: Quanter, path_prefix, input_spec) -> tuple[Path, Path]:
    """``paddle.jit.save`` of :func:`deployable_copy` at ``path_prefix``; returns (model file, params file).

    A QDQ model (``onnx_format``) is saved as a legacy ``.pdmodel`` program on Paddle 3 too: under PIR, Paddle
    3.3's ``dequantize_linear`` kernel quantizes instead of dequantizing (the saved ``.json`` predicts garbage),
    while the legacy program runs correctly in Paddle 3.3's predictor. Always returns to dynamic mode.
    """
    import contextlib

    p = paddle()
    deployable = deployable_copy(model, quanter)
    legacy = quanter.onnx_format and _pir_on()
    guard = p.pir_utils.OldIrGuard() if legacy else contextlib.nullcontext()
    try:
        with guard:
            p.jit.save(deployable, str(path_prefix), input_spec=input_spec)
    finally:
        ensure_dynamic_mode()
    return saved_files(path_prefix)


def saved_files(path_prefix) -> tuple[Path, Path]:
    """The (program, params) files ``paddle.jit.save`` wrote at ``path_prefix``: ``.json`` (PIR) or ``.pdmodel``."""
    prefix = Path(path_prefix)
    for suffix in (".json", ".pdmodel"):
        program = prefix.with_name(prefix.name + suffix)
        if program.exists():
            return program, prefix.with_name(prefix.name + ".pdiparams")
    raise StageError(f"paddle.jit.save wrote no program at {prefix}(.json|.pdmodel)")


def _pir_on() -> bool:
    flags = paddle().get_flags(["FLAGS_enable_pir_api"]) if hasattr(paddle(), "get_flags") else {}
    return bool(flags.get("FLAGS_enable_pir_api", False))


@dataclass
class QuantizedLayer:
    """What an exporter needs to quantize one layer outside Paddle (ONNX QDQ): all scales in abs-max units."""

    name: str
    weight: str  # the weight parameter's name in the saved program
    weight_scales: Any  # np.ndarray, one per output channel (or one)
    weight_axis: int  # -1: per tensor
    weight_bits: int
    activation_scale: float | None
    activation_bits: int
    output_scale: float | None = None  # quantize_outputs


def float_twin(model, quanter: Quanter) -> tuple[Any, list[QuantizedLayer]]:
    """An eval-mode float copy computing what ``model`` computes, minus the activation rounding: each quantized
    layer's weight replaced by its fake-quantized value, its quanters removed. Returned with each layer's
    scales, so that an exporter can put the quantization back as QDQ nodes of its own format."""
    import numpy as np

    p = paddle()
    from paddle.nn.quant.format import ConvertibleQuantedLayer

    from paddle.quantization.wrapper import ObserveWrapper

    L = _layers()
    ensure_dynamic_mode()
    _refresh_weight_scales(model)
    twin = copy.deepcopy(model)
    twin.eval()
    layers = []
    output_scales = {}
    with p.no_grad():
        for wrapper in twin.sublayers():
            if isinstance(wrapper, ObserveWrapper) and isinstance(wrapper._observed, ConvertibleQuantedLayer):
                output_scales[id(wrapper._observed)] = _scalar(wrapper._observer.scales())
                wrapper._sub_layers["_observer"] = p.nn.Identity()
        for name, layer in twin.named_sublayers():
            if not isinstance(layer, ConvertibleQuantedLayer):
                continue
            wq = getattr(layer, "weight_quanter", None)
            aq = getattr(layer, "activation_quanter", None)
            if not isinstance(wq, L.AbsMaxWeightQuanter):
                raise StageError(f"layer {name} has weight quanter {type(wq).__name__}; expected slimrecipe's")
            layer.weight.set_value(wq(layer.weight))
            layers.append(QuantizedLayer(name, layer.weight.name, np.asarray(wq.scales().numpy(), dtype=np.float32),
                                         wq.quant_axis(), wq.bit_length(),
                                         None if aq is None else _scalar(aq.scales()),
                                         aq.bit_length() if aq is not None else 8,
                                         output_scales.get(id(layer))))
            layer._sub_layers["weight_quanter"] = None
            layer._sub_layers["activation_quanter"] = None
    return twin, layers


def _scalar(tensor) -> float:
    import numpy as np

    return float(np.asarray(tensor.numpy()).reshape(-1)[0])


def _refresh_weight_scales(model) -> None:
    # a weight quanter remembers the scale of the last forward; the optimizer has moved the weights since
    L = _layers()
    p = paddle()
    from paddle.nn.quant.format import ConvertibleQuantedLayer

    with p.no_grad():
        for layer in model.sublayers():
            if isinstance(layer, ConvertibleQuantedLayer) and not layer.converted:
                for weight_name, quanter_name in layer.weights_to_quanters():
                    q = getattr(layer, quanter_name, None)
                    if isinstance(q, L.AbsMaxWeightQuanter):
                        q.observe(getattr(layer, weight_name))


_LAYERS = None
_P = None  # paddle, once _define_layers ran
_F = None  # paddle.nn.functional


def _qmax(bits: int) -> float:
    return float(2 ** (bits - 1) - 1)


def _layers():
    """The quanter and layer classes, defined on first use (they subclass Paddle's, which is imported lazily)."""
    global _LAYERS
    if _LAYERS is None:
        _LAYERS = _define_layers()
    return _LAYERS


def _define_layers():
    import types as _types

    global _P, _F
    # the layers' forwards name Paddle through module globals: Paddle 2.6's dy2static cannot see closure variables
    _P = paddle()
    _F = _P.nn.functional
    from paddle.nn.quant.format import ConvertibleQuantedLayer
    from paddle.quantization.base_quanter import BaseQuanter
    from paddle.quantization.factory import QuanterFactory
    from paddle.quantization.quanters.abs_max import FakeQuanterWithAbsMaxObserverLayer

    def _frozen_parameter(layer, shape, value):
        # state saved with the weights; a parameter rather than a buffer, as in Paddle's own quanters: Paddle
        # 2.6's jit.save fails on buffers that the traced program only reads ("not initialized")
        attr = _P.ParamAttr(initializer=_P.nn.initializer.Constant(value), trainable=False)
        param = layer.create_parameter(shape=shape, attr=attr, dtype="float32")
        param.stop_gradient = True
        return param

    class Factory(QuanterFactory):
        """Builds one quanter per quantized layer (``QuantConfig`` takes factories, not layers)."""

        def __init__(self, cls, **kwargs):
            super().__init__(**kwargs)
            self._cls = cls

        def _get_class(self):
            return self._cls

    class AbsMaxWeightQuanter(BaseQuanter):
        """Fake-quantizes a weight against its current abs-max, per output channel or per tensor (STE)."""

        def __init__(self, layer, bit_length=8, channel_wise=True):
            super().__init__()
            self._bit_length = int(bit_length)
            # output channels: axis 0 of a Conv2D weight [out, in/g, kh, kw]; axis 1 of a Linear weight
            # [in, out] and of a Conv2DTranspose weight [in, out/g, kh, kw]
            axis = 0 if isinstance(layer, _P.nn.Conv2D) else 1
            self._axis = axis if channel_wise else -1
            n = layer.weight.shape[axis] if channel_wise else 1
            self._scale = _frozen_parameter(self, [n], 1.0)

        def _scale_of(self, w):
            if self._axis < 0:
                s = _P.max(_P.abs(w)).reshape([1])
            else:
                dims = [d for d in range(len(w.shape)) if d != self._axis]
                s = _P.amax(_P.abs(w), axis=dims)
            return _P.clip(s, min=1e-8)

        def observe(self, w):
            self._scale.set_value(self._scale_of(w.detach()))

        def forward(self, w):
            # detach the scale, not the weight: Paddle 2.6's static detach of a parameter makes a persistable
            # copy that jit.save then finds uninitialized
            s = self._scale_of(w).detach()
            if _P.in_dynamic_mode():
                self._scale.set_value(s)
            if self._axis >= 0:
                shape = [1] * len(w.shape)
                shape[self._axis] = -1
                s = s.reshape(shape)
            q = _qmax(self._bit_length)
            wq = _P.round(w / s * q) * s / q
            return w + (wq - w).detach()

        def scales(self):
            return self._scale

        def zero_points(self):
            return _P.zeros_like(self._scale)

        def quant_axis(self):
            return self._axis

        def bit_length(self):
            return self._bit_length

    class PACTQuanter(BaseQuanter):
        """PACT: clip to a learnt ``[-alpha, alpha]``, quantize with alpha as the scale (STE for the input,
        PACT's gradient for alpha). alpha starts at the abs-max of the first training-mode batch."""

        def __init__(self, layer, bit_length=8, lr_multiplier=1.0):
            super().__init__()
            self._bit_length = int(bit_length)
            attr = _P.ParamAttr(initializer=_P.nn.initializer.Constant(1.0), learning_rate=float(lr_multiplier))
            self.alpha = self.create_parameter(shape=[1], attr=attr, dtype="float32")
            self._initialized = _frozen_parameter(self, [1], 0.0)

        def forward(self, x):
            if _P.in_dynamic_mode() and self.training and float(self._initialized.numpy().reshape(-1)[0]) == 0.0:
                with _P.no_grad():
                    self.alpha.set_value(_P.clip(_P.max(_P.abs(x.detach())), min=1e-4).reshape([1]))
                    self._initialized.set_value(_P.ones([1], dtype="float32"))
            a = _P.clip(self.alpha, min=1e-6)
            # d/dx = 1 inside, 0 outside; d/dalpha = +1 above alpha, -1 below -alpha, 0 inside
            clipped = x - _F.relu(x - a) + _F.relu(-a - x)
            step = a.detach() / _qmax(self._bit_length)
            xq = _P.round(clipped / step) * step
            return clipped + (xq - clipped).detach()

        def scales(self):
            return self.alpha.detach()

        def zero_points(self):
            return _P.zeros([1], dtype="float32")

        def quant_axis(self):
            return -1

        def bit_length(self):
            return self._bit_length

    class MovingAverageAbsMaxQuanter(FakeQuanterWithAbsMaxObserverLayer):
        """Paddle's moving-average abs-max fake quanter, with a zero point Paddle 3's converter can read."""

        def zero_points(self):
            return _P.zeros([1], dtype="float32")

    class QuantedConv2DTranspose(ConvertibleQuantedLayer):
        """Conv2DTranspose with fake-quantized input and weight (Paddle has no QAT wrapper for it)."""

        def __init__(self, layer, q_config):
            super().__init__()
            for attr in ("_stride", "_padding", "_dilation", "_groups", "_data_format"):
                setattr(self, attr, getattr(layer, attr))
            self._output_padding = layer.output_padding
            self.weight = layer.weight
            self.bias = layer.bias
            self.weight_quanter = q_config.weight._instance(layer) if q_config.weight is not None else None
            self.activation_quanter = (q_config.activation._instance(layer)
                                       if q_config.activation is not None else None)

        def forward(self, x, output_size=None):
            w = self.weight
            if self.activation_quanter is not None:
                x = self.activation_quanter(x)
            if self.weight_quanter is not None:
                w = self.weight_quanter(w)
            return _F.conv2d_transpose(x, w, bias=self.bias, stride=self._stride, padding=self._padding,
                                      output_padding=self._output_padding if output_size is None else 0,
                                      dilation=self._dilation,
                                      groups=self._groups, output_size=output_size, data_format=self._data_format)

        def weights_to_quanters(self):
            return [("weight", "weight_quanter")]

        def activation_quanters(self):
            return ["activation_quanter"]

    return _types.SimpleNamespace(Factory=Factory, AbsMaxWeightQuanter=AbsMaxWeightQuanter,
                                  PACTQuanter=PACTQuanter, MovingAverageAbsMaxQuanter=MovingAverageAbsMaxQuanter,
                                  QuantedConv2DTranspose=QuantedConv2DTranspose)
