"""Paddle layers of the DB text detector: MobileNetV3-large backbone, DB FPN neck, DB head, and the DB loss.

Importing this module imports Paddle, so only the `db_mobilenet_v3` plugin function imports it.
Sub-layer attribute names follow PaddleOCR's det_mv3_db model, so that a PaddleOCR dygraph checkpoint
(keys such as ``backbone.stage0.0.expand_conv.conv.weight``) loads into this model unchanged.
"""

from __future__ import annotations

import contextlib
import contextvars

from slimrecipe.paddle_env import paddle as _paddle

paddle = _paddle()
nn = paddle.nn
F = paddle.nn.functional

# MobileNetV3-large inverted-residual blocks: (kernel, expanded channels, output channels, SE, activation, stride).
MOBILENET_V3_LARGE_BLOCKS = (
    (3, 16, 16, False, "relu", 1),
    (3, 64, 24, False, "relu", 2),
    (3, 72, 24, False, "relu", 1),
    (5, 72, 40, True, "relu", 2),
    (5, 120, 40, True, "relu", 1),
    (5, 120, 40, True, "relu", 1),
    (3, 240, 80, False, "hardswish", 2),
    (3, 200, 80, False, "hardswish", 1),
    (3, 184, 80, False, "hardswish", 1),
    (3, 184, 80, False, "hardswish", 1),
    (3, 480, 112, True, "hardswish", 1),
    (3, 672, 112, True, "hardswish", 1),
    (5, 672, 160, True, "hardswish", 2),
    (5, 960, 160, True, "hardswish", 1),
    (5, 960, 160, True, "hardswish", 1),
)
# Blocks that start a new output stage (feature strides 8, 16, 32); stage 0 ends at stride 4.
STAGE_START_BLOCKS = (3, 6, 12)
LAST_CONV_CHANNELS = 960
STEM_CHANNELS = 16


def make_divisible(value: float, divisor: int = 8) -> int:
    """Round a scaled channel count to a multiple of ``divisor``, never dropping more than 10% below it."""
    rounded = max(divisor, int(value + divisor / 2) // divisor * divisor)
    if rounded < 0.9 * value:
        rounded += divisor
    return rounded


def _activation(name: str | None):
    if name is None:
        return None
    if name == "relu":
        return nn.ReLU()
    if name == "hardswish":
        return nn.Hardswish()
    raise ValueError(f"unknown activation {name!r}")


class ConvBNActivation(nn.Layer):
    def __init__(self, in_channels, out_channels, kernel_size, stride=1, groups=1, activation=None):
        super().__init__()
        self.conv = nn.Conv2D(in_channels, out_channels, kernel_size, stride=stride,
                              padding=(kernel_size - 1) // 2, groups=groups, bias_attr=False)
        self.bn = nn.BatchNorm2D(out_channels)
        self.activation = _activation(activation)

    def forward(self, x):
        x = self.bn(self.conv(x))
        return self.activation(x) if self.activation is not None else x


class SqueezeExcitation(nn.Layer):
    def __init__(self, channels, reduction=4):
        super().__init__()
        self.avg_pool = nn.AdaptiveAvgPool2D(1)
        self.conv1 = nn.Conv2D(channels, channels // reduction, 1)
        self.conv2 = nn.Conv2D(channels // reduction, channels, 1)

    def forward(self, x):
        weights = F.hardsigmoid(self.conv2(F.relu(self.conv1(self.avg_pool(x)))))
        return x * weights


class InvertedResidual(nn.Layer):
    def __init__(self, in_channels, mid_channels, out_channels, kernel_size, stride, use_se, activation):
        super().__init__()
        self.has_shortcut = stride == 1 and in_channels == out_channels
        self.expand_conv = ConvBNActivation(in_channels, mid_channels, 1, activation=activation)
        self.bottleneck_conv = ConvBNActivation(mid_channels, mid_channels, kernel_size, stride=stride,
                                                groups=mid_channels, activation=activation)
        self.mid_se = SqueezeExcitation(mid_channels) if use_se else None
        self.linear_conv = ConvBNActivation(mid_channels, out_channels, 1)

    def forward(self, inputs):
        x = self.bottleneck_conv(self.expand_conv(inputs))
        if self.mid_se is not None:
            x = self.mid_se(x)
        x = self.linear_conv(x)
        return inputs + x if self.has_shortcut else x


class MobileNetV3Large(nn.Layer):
    """Returns the features at strides 4, 8, 16 and 32; ``out_channels`` lists their channel counts."""

    def __init__(self, in_channels=3, scale=0.5, disable_se=False):
        super().__init__()
        channels = make_divisible(STEM_CHANNELS * scale)
        self.conv = ConvBNActivation(in_channels, channels, 3, stride=2, activation="hardswish")
        stages, blocks = [], []
        self.out_channels = []
        for index, (kernel, expanded, out, use_se, activation, stride) in enumerate(MOBILENET_V3_LARGE_BLOCKS):
            if index in STAGE_START_BLOCKS:
                stages.append(blocks)
                self.out_channels.append(channels)
                blocks = []
            out = make_divisible(scale * out)
            blocks.append(InvertedResidual(channels, make_divisible(scale * expanded), out, kernel, stride,
                                           use_se and not disable_se, activation))
            channels = out
        last = make_divisible(scale * LAST_CONV_CHANNELS)
        blocks.append(ConvBNActivation(channels, last, 1, activation="hardswish"))
        stages.append(blocks)
        self.out_channels.append(last)
        # Registered as stage0..stage3 (PaddleOCR's checkpoint names), kept in a list for the forward loop.
        self.stages = []
        for index, stage_blocks in enumerate(stages):
            stage = nn.Sequential(*stage_blocks)
            self.add_sublayer(f"stage{index}", stage)
            self.stages.append(stage)

    def forward(self, x):
        x = self.conv(x)
        features = []
        for stage in self.stages:
            x = stage(x)
            features.append(x)
        return features


def _kaiming_uniform():
    return paddle.ParamAttr(initializer=nn.initializer.KaimingUniform())


class DBFPN(nn.Layer):
    """Fuses the four backbone features into one map at stride 4 with ``out_channels`` channels."""

    def __init__(self, in_channels, out_channels=256):
        super().__init__()
        self.out_channels = out_channels
        branch = out_channels // 4
        for level, channels in zip((2, 3, 4, 5), in_channels):
            self.add_sublayer(f"in{level}_conv", nn.Conv2D(channels, out_channels, 1, weight_attr=_kaiming_uniform(),
                                                           bias_attr=False))
            self.add_sublayer(f"p{level}_conv", nn.Conv2D(out_channels, branch, 3, padding=1,
                                                          weight_attr=_kaiming_uniform(), bias_attr=False))

    def forward(self, features):
        c2, c3, c4, c5 = features
        in5 = self.in5_conv(c5)
        out4 = self.in4_conv(c4) + upsample_like(in5, c4)
        out3 = self.in3_conv(c3) + upsample_like(out4, c3)
        out2 = self.in2_conv(c2) + upsample_like(out3, c2)
        p5 = upsample_like(self.p5_conv(in5), c2)
        p4 = upsample_like(self.p4_conv(out4), c2)
        p3 = upsample_like(self.p3_conv(out3), c2)
        return paddle.concat([p5, p4, p3, self.p2_conv(out2)], axis=1)


_REPEATED_UPSAMPLING = contextvars.ContextVar("repeated_upsampling", default=False)


def upsample_like(x, ref):
    """Nearest-neighbour upsampling of ``x`` to ``ref``'s height and width (an FPN's 2x, 4x, 8x on inputs that
    are multiples of 32). A size, not a scale factor: Paddle 3.3 saves a scale factor as an array of doubles,
    which paddle2onnx 2.1 cannot read (Paddle issue #79749). Saved for Paddle Inference (:func:`export_form`), traced
    as a repeat instead."""
    if _REPEATED_UPSAMPLING.get():
        return _repeat_like(x, ref)
    return F.interpolate(x, size=paddle.shape(ref)[2:], mode="nearest")


def _repeat_like(x, ref):
    """``upsample_like`` without an interpolation op: each pixel repeated f = ceil(ref side / x side) times along
    each axis (unsqueeze, expand, reshape), cropped to ``ref``'s size. The same as nearest interpolation wherever
    ``ref``'s sides are multiples of ``x``'s, which every FPN level is on inputs whose sides are multiples of 32
    (PaddleOCR's detector preprocessing rounds them so). Paddle 3.3's oneDNN executor cannot run any
    interpolation op of a PIR program (their ``scale`` attribute is an array of doubles, #79749); Paddle
    Inference with oneDNN left off their placement ran the unpruned PP-OCRv4 det at 640x640 2.3x slower."""
    n, c, h, w = (paddle.shape(x)[i] for i in range(4))
    big_h, big_w = paddle.shape(ref)[2], paddle.shape(ref)[3]
    fh, fw = (big_h + h - 1) // h, (big_w + w - 1) // w
    y = x.unsqueeze([3, 5]).expand([n, c, h, fh, w, fw]).reshape([n, c, h * fh, w * fw])
    return y[:, :, :big_h, :big_w]


@contextlib.contextmanager
def export_form(target: str):
    """The context a detector is saved in for an export ``target``: for Paddle Inference, upsampling without
    interpolation ops (:func:`_repeat_like`), so that oneDNN runs the whole program; for ONNX the model as it is
    (onnxruntime runs its Resize op in its blocked layout, faster than a repeat)."""
    token = _REPEATED_UPSAMPLING.set(target == "paddle_inference")
    try:
        yield
    finally:
        _REPEATED_UPSAMPLING.reset(token)


def _uniform_bias(fan_in):
    bound = 1.0 / fan_in ** 0.5
    return paddle.ParamAttr(initializer=nn.initializer.Uniform(-bound, bound))


def _batch_norm(channels):
    # A small positive shift keeps the following ReLU from starting dead.
    return nn.BatchNorm2D(channels, weight_attr=paddle.ParamAttr(initializer=nn.initializer.Constant(1.0)),
                          bias_attr=paddle.ParamAttr(initializer=nn.initializer.Constant(1e-4)))


class DBMapBranch(nn.Layer):
    """One full-resolution map in [0, 1]: 3x3 conv, then two 2x transposed convs back to the input size."""

    def __init__(self, in_channels):
        super().__init__()
        mid = in_channels // 4
        self.conv1 = nn.Conv2D(in_channels, mid, 3, padding=1, bias_attr=False)
        self.conv_bn1 = _batch_norm(mid)
        self.conv2 = nn.Conv2DTranspose(mid, mid, 2, stride=2, weight_attr=_kaiming_uniform(),
                                        bias_attr=_uniform_bias(mid))
        self.conv_bn2 = _batch_norm(mid)
        self.conv3 = nn.Conv2DTranspose(mid, 1, 2, stride=2, weight_attr=_kaiming_uniform(),
                                        bias_attr=_uniform_bias(mid))

    def forward(self, x):
        x = F.relu(self.conv_bn1(self.conv1(x)))
        x = F.relu(self.conv_bn2(self.conv2(x)))
        return F.sigmoid(self.conv3(x))


class DBHead(nn.Layer):
    """Training: {"maps": [shrink probability, threshold, approximate binary]}; eval: the probability map only."""

    def __init__(self, in_channels, k=50.0):
        super().__init__()
        self.k = float(k)
        self.binarize = DBMapBranch(in_channels)
        self.thresh = DBMapBranch(in_channels)

    def forward(self, x):
        probability = self.binarize(x)
        if not self.training:
            return probability
        threshold = self.thresh(x)
        # Differentiable binarization: a steep sigmoid of (P - T), so the threshold map gets gradients.
        binary = paddle.reciprocal(1 + paddle.exp(-self.k * (probability - threshold)))
        return {"maps": paddle.concat([probability, threshold, binary], axis=1)}


class DBDetector(nn.Layer):
    """The DB text detector; ``loss(outputs, batch)`` is its training loss (see :func:`db_loss_parts`)."""

    def __init__(self, in_channels=3, scale=0.5, disable_se=False, neck_channels=256, k=50.0,
                 alpha=5.0, beta=10.0, ohem_ratio=3.0, shrink_loss="bce"):
        super().__init__()
        self.backbone = MobileNetV3Large(in_channels, scale, disable_se)
        self.neck = DBFPN(self.backbone.out_channels, neck_channels)
        self.head = DBHead(neck_channels, k)
        self.loss_settings = {"alpha": float(alpha), "beta": float(beta), "ohem_ratio": float(ohem_ratio),
                              "shrink_loss": shrink_loss}
        self.last_loss_parts: dict = {}

    def forward(self, x):
        return self.head(self.neck(self.backbone(x)))

    export_form = staticmethod(export_form)  # how the exporters save it for each target

    def loss(self, outputs, batch):
        """Weighted DB loss of one training batch ``[images, shrink_map, shrink_mask, threshold_map, threshold_mask]``.

        The weighted parts of the last call stay in ``last_loss_parts`` (detached), for logging.
        """
        if not isinstance(outputs, dict):
            raise ValueError("the DB loss needs the training-mode outputs (shrink, threshold and binary maps); "
                             "the model is in eval mode, where it returns the probability map only")
        parts = db_loss_parts(outputs["maps"], *batch[1:5], **self.loss_settings)
        self.last_loss_parts = {name: value.detach() for name, value in parts.items()}
        return parts["total"]


def _as_maps(label, like):
    label = paddle.cast(label if isinstance(label, paddle.Tensor) else paddle.to_tensor(label), like.dtype)
    return label.squeeze(1) if label.ndim == 4 else label


def balanced_bce(probability, target, mask, ohem_ratio):
    """BCE over all positives and the hardest negatives, at most ``ohem_ratio`` per positive."""
    positive = target * mask
    negative = (1 - target) * mask
    positive_count = int(positive.sum())
    negative_count = int(min(float(negative.sum()), positive_count * ohem_ratio))
    loss = F.binary_cross_entropy(probability, target, reduction="none")
    positive_loss = (loss * positive).sum()
    if negative_count == 0:
        return positive_loss / (positive_count + 1e-6)
    hardest_negative_loss = paddle.topk((loss * negative).flatten(), negative_count)[0].sum()
    return (positive_loss + hardest_negative_loss) / (positive_count + negative_count + 1e-6)


def dice_loss(prediction, target, mask):
    intersection = (prediction * target * mask).sum()
    union = (prediction * mask).sum() + (target * mask).sum() + 1e-6
    return 1 - 2.0 * intersection / union


def masked_l1(prediction, target, mask):
    return (paddle.abs(prediction - target) * mask).sum() / (mask.sum() + 1e-6)


def db_loss_parts(maps, shrink_map, shrink_mask, threshold_map, threshold_mask, *, alpha=5.0, beta=10.0,
                  ohem_ratio=3.0, shrink_loss="bce"):
    """The weighted terms of the DB loss and their sum, as scalar tensors.

    ``maps`` is [N, 3, H, W] (shrink probability, threshold, binary); labels are [N, H, W] or [N, 1, H, W].
    ``shrink_loss="dice"`` reproduces PaddleOCR's ``main_loss_type: DiceLoss``, whose "balanced" term
    reduces to a Dice loss on the shrink map.
    """
    probability, threshold, binary = maps[:, 0], maps[:, 1], maps[:, 2]
    shrink_map, shrink_mask = _as_maps(shrink_map, maps), _as_maps(shrink_mask, maps)
    threshold_map, threshold_mask = _as_maps(threshold_map, maps), _as_maps(threshold_mask, maps)
    if shrink_loss == "dice":
        shrink = dice_loss(probability, shrink_map, shrink_mask)
    else:
        shrink = balanced_bce(probability, shrink_map, shrink_mask, ohem_ratio)
    parts = {
        "shrink": alpha * shrink,
        "threshold": beta * masked_l1(threshold, threshold_map, threshold_mask),
        "binary": dice_loss(binary, shrink_map, shrink_mask),
    }
    parts["total"] = parts["shrink"] + parts["threshold"] + parts["binary"]
    return parts
