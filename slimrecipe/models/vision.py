"""Classifier model plugins: `paddle_vision` (a whitelisted paddle.vision.models constructor) and `tiny_cnn`."""

from __future__ import annotations

from ..paddle_env import paddle
from ..registry import register

# Only these constructors can be named by a recipe: a recipe never names an import path.
VISION_ARCHS = (
    "resnet18", "resnet34", "resnet50",
    "mobilenet_v1", "mobilenet_v2", "mobilenet_v3_small", "mobilenet_v3_large",
    "vgg11", "vgg13", "vgg16",
    "shufflenet_v2_x0_5", "shufflenet_v2_x1_0",
)
SCALED = {"mobilenet_v1", "mobilenet_v2", "mobilenet_v3_small", "mobilenet_v3_large"}


@register(
    "model",
    "paddle_vision",
    schema={
        "type": "object",
        "additionalProperties": False,
        "required": ["arch"],
        "properties": {
            "arch": {"enum": list(VISION_ARCHS), "description": "constructor in paddle.vision.models"},
            "scale": {"type": "number", "exclusiveMinimum": 0, "maximum": 4,
                      "description": "width multiplier (MobileNets only)"},
            "num_classes": {"type": ["integer", "null"], "minimum": 2,
                            "description": "default: the dataset's class count"},
        },
    },
)
def paddle_vision(params: dict, data):
    """A classifier from paddle.vision.models, trained from scratch."""
    from paddle.vision import models

    arch = params["arch"]
    kwargs = {"num_classes": params.get("num_classes") or data.num_classes}
    if "scale" in params:
        if arch not in SCALED:
            from ..errors import RecipeError

            raise RecipeError(f"'scale' applies to {sorted(SCALED)} only, not {arch!r}", path="model.params.scale")
        kwargs["scale"] = params["scale"]
    paddle()
    return getattr(models, arch)(**kwargs)


@register(
    "model",
    "tiny_cnn",
    schema={
        "type": "object",
        "additionalProperties": False,
        "properties": {
            "channels": {"type": "array", "items": {"type": "integer", "minimum": 1}, "minItems": 1,
                         "description": "output channels of each conv-bn-relu block (each halves the size)"},
            "num_classes": {"type": ["integer", "null"], "minimum": 2},
        },
    },
)
def tiny_cnn(params: dict, data):
    """A few conv-bn-relu blocks and a linear head: for tests and smoke runs."""
    nn = paddle().nn
    channels = params.get("channels", [8, 16, 32])
    num_classes = params.get("num_classes") or data.num_classes
    layers, cin = [], data.input_shape[0]
    for cout in channels:
        layers += [nn.Conv2D(cin, cout, 3, padding=1, bias_attr=False), nn.BatchNorm2D(cout), nn.ReLU(),
                   nn.MaxPool2D(2)]
        cin = cout
    return nn.Sequential(*layers, nn.AdaptiveAvgPool2D(1), nn.Flatten(), nn.Linear(cin, num_classes))
