"""The dependency-graph pruner: channel groups, exact surgery, importance and FLOPs on tiny models.

The central check: removing channels of a group gives the same output as the unpruned model in which those
channels were silenced where they are read (the input slices of every consumer's weight set to zero).
"""

from __future__ import annotations

import copy

import numpy as np
import pytest

from slimrecipe.paddle_env import paddle as _paddle
from slimrecipe.pruning.graph import TraceError, channel_groups, count_flops
from slimrecipe.pruning.importance import CRITERIA, channels_to_remove, group_importance, taylor_scores
from slimrecipe.pruning.surgery import prune_group

paddle = _paddle()
nn = paddle.nn
F = nn.functional

SHAPE = [3, 16, 16]
READERS = ("conv_in", "transpose_in", "linear_in")


# ---------------------------------------------------------------------------------------------------------------
# Tiny models, one structure each.

def conv_bn(cin, cout, k=3, stride=1, groups=1, act=True):
    layers = [nn.Conv2D(cin, cout, k, stride=stride, padding=k // 2, groups=groups, bias_attr=False),
              nn.BatchNorm2D(cout)]
    if act:
        layers.append(nn.ReLU())
    return nn.Sequential(*layers)


class Head(nn.Layer):
    """Global pool + linear: the model output is a few logits, so the features before it are prunable."""

    def __init__(self, cin, classes=3):
        super().__init__()
        self.fc = nn.Linear(cin, classes)

    def forward(self, x):
        return self.fc(paddle.flatten(F.adaptive_avg_pool2d(x, 1), 1))


class ConvChain(nn.Layer):
    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv2D(3, 8, 3, padding=1)
        self.c2 = nn.Conv2D(8, 6, 3, padding=1)
        self.c3 = nn.Conv2D(6, 4, 1)
        self.head = Head(4)

    def forward(self, x):
        return self.head(self.c3(F.relu(self.c2(F.relu(self.c1(x))))))


class ConvBNReLU(nn.Layer):
    def __init__(self):
        super().__init__()
        self.a = conv_bn(3, 8)
        self.b = conv_bn(8, 6, stride=2)
        self.head = Head(6)

    def forward(self, x):
        return self.head(self.b(self.a(x)))


class DepthwiseSeparable(nn.Layer):
    def __init__(self):
        super().__init__()
        self.stem = conv_bn(3, 8)
        self.dw = conv_bn(8, 8, groups=8)
        self.pw = conv_bn(8, 6, k=1)
        self.head = Head(6)

    def forward(self, x):
        return self.head(self.pw(self.dw(self.stem(x))))


class Grouped(nn.Layer):
    def __init__(self):
        super().__init__()
        self.stem = conv_bn(3, 8)
        self.grouped = conv_bn(8, 8, groups=2)
        self.after = conv_bn(8, 6)
        self.head = Head(6)

    def forward(self, x):
        return self.head(self.after(self.grouped(self.stem(x))))


class TransposedHead(nn.Layer):
    """A DB-like upsampling head: conv, then two 2x transposed convs back to the input size."""

    def __init__(self):
        super().__init__()
        self.down = conv_bn(3, 8, stride=4)
        self.up1 = nn.Conv2DTranspose(8, 6, 2, stride=2)
        self.bn1 = nn.BatchNorm2D(6)
        self.up2 = nn.Conv2DTranspose(6, 1, 2, stride=2)

    def forward(self, x):
        return F.sigmoid(self.up2(F.relu(self.bn1(self.up1(self.down(x))))))


class FlattenLinear(nn.Layer):
    """A linear layer on a flattened C x H x W map (each channel owns H*W columns), then a second linear."""

    def __init__(self):
        super().__init__()
        self.conv = conv_bn(3, 4, stride=4)  # -> 4 x 4 x 4
        self.fc1 = nn.Linear(64, 10)
        self.fc2 = nn.Linear(10, 2)

    def forward(self, x):
        return self.fc2(F.relu(self.fc1(paddle.flatten(self.conv(x), 1))))


class PooledLinear(nn.Layer):
    def __init__(self):
        super().__init__()
        self.conv = conv_bn(3, 6, stride=2)
        self.fc1 = nn.Linear(6, 8)
        self.fc2 = nn.Linear(8, 2)

    def forward(self, x):
        x = paddle.mean(self.conv(x), axis=[2, 3])
        return self.fc2(F.hardswish(self.fc1(x)))


class Residual(nn.Layer):
    def __init__(self):
        super().__init__()
        self.stem = conv_bn(3, 8)
        self.b1 = conv_bn(8, 8, act=False)
        self.b2 = conv_bn(8, 8, act=False)
        self.head = Head(8)

    def forward(self, x):
        x = self.stem(x)
        y = x + self.b1(self.mid_pass(x))
        z = y - self.b2(y)
        return self.head(F.relu(z))

    def mid_pass(self, x):
        return x * 0.5


class SE(nn.Layer):
    def __init__(self, channels, reduction=4):
        super().__init__()
        self.pool = nn.AdaptiveAvgPool2D(1)
        self.conv1 = nn.Conv2D(channels, channels // reduction, 1)
        self.conv2 = nn.Conv2D(channels // reduction, channels, 1)

    def forward(self, x):
        return x * F.hardsigmoid(self.conv2(F.relu(self.conv1(self.pool(x)))))


class SEBlock(nn.Layer):
    def __init__(self):
        super().__init__()
        self.expand = conv_bn(3, 8, k=1)
        self.dw = conv_bn(8, 8, groups=8)
        self.se = SE(8, reduction=2)
        self.project = conv_bn(8, 6, k=1, act=False)
        self.head = Head(6)

    def forward(self, x):
        return self.head(self.project(self.se(self.dw(self.expand(x)))))


class ConcatBranches(nn.Layer):
    """Two branches concatenated and read by one conv (offsets 0 and 4), and by a depthwise conv."""

    def __init__(self):
        super().__init__()
        self.left = conv_bn(3, 4)
        self.right = conv_bn(3, 6, k=1)
        self.dw = conv_bn(10, 10, groups=10)
        self.fuse = conv_bn(10, 8)
        self.head = Head(8)

    def forward(self, x):
        x = paddle.concat([self.left(x), self.right(x)], axis=1)
        return self.head(self.fuse(self.dw(x)))


class SplitChannels(nn.Layer):
    """``paddle.split`` along channels: the split sizes live in the code, so the split group is not prunable."""

    def __init__(self):
        super().__init__()
        self.stem = conv_bn(3, 8)
        self.a = conv_bn(4, 6)
        self.b = conv_bn(4, 6)
        self.head = Head(6)

    def forward(self, x):
        left, right = paddle.split(self.stem(x), 2, axis=1)
        return self.head(self.a(left) + self.b(right))


class InterpolatePool(nn.Layer):
    def __init__(self):
        super().__init__()
        self.c1 = conv_bn(3, 8)
        self.c2 = conv_bn(8, 6)
        self.c3 = conv_bn(6, 4)
        self.head = Head(4)

    def forward(self, x):
        x = F.max_pool2d(self.c1(x), 2)
        x = F.avg_pool2d(self.c2(x), 2)
        x = F.interpolate(x, scale_factor=2, mode="bilinear")
        return self.head(self.c3(x))


class LearnableAffine(nn.Layer):
    """PPLCNetV3's LearnableAffineBlock: scalar scale and bias, independent of the channels."""

    def __init__(self):
        super().__init__()
        self.scale = self.create_parameter([1], default_initializer=nn.initializer.Constant(1.2))
        self.bias = self.create_parameter([1], default_initializer=nn.initializer.Constant(0.1))

    def forward(self, x):
        return self.scale * x + self.bias


class RepLayer(nn.Layer):
    """PPLCNetV3's LearnableRepLayer in training form: kxk and 1x1 conv-BN branches plus an identity BN."""

    def __init__(self, channels):
        super().__init__()
        self.identity = nn.BatchNorm2D(channels)
        self.kxk = nn.LayerList([conv_bn(channels, channels, 3, act=False) for _ in range(2)])
        self.one = conv_bn(channels, channels, 1, act=False)
        self.lab = LearnableAffine()
        self.act_lab = LearnableAffine()

    def forward(self, x):
        out = self.identity(x) + self.one(x)
        for branch in self.kxk:
            out = out + branch(x)
        return self.act_lab(F.hardswish(self.lab(out)))


class ReparamConv(nn.Layer):
    """The deployed form: one conv with bias (``reparam_conv``), then the affine blocks."""

    def __init__(self, cin, cout):
        super().__init__()
        self.reparam_conv = nn.Conv2D(cin, cout, 3, padding=1)
        self.lab = LearnableAffine()

    def forward(self, x):
        return F.hardswish(self.lab(self.reparam_conv(x)))


class LCNetLike(nn.Layer):
    def __init__(self):
        super().__init__()
        self.stem = conv_bn(3, 8)
        self.rep = RepLayer(8)
        self.deployed = ReparamConv(8, 6)
        self.head = Head(6)

    def forward(self, x):
        return self.head(self.deployed(self.rep(self.stem(x))))


class ChannelShuffle(nn.Layer):
    """A reshape that mixes channels (ShuffleNet's channel shuffle): its group is not prunable."""

    def __init__(self):
        super().__init__()
        self.stem = conv_bn(3, 8)
        self.after = conv_bn(8, 6)
        self.head = Head(6)

    def forward(self, x):
        x = self.stem(x)
        n, c, h, w = x.shape
        x = paddle.reshape(x, [n, 2, c // 2, h, w]).transpose([0, 2, 1, 3, 4]).reshape([n, c, h, w])
        return self.head(self.after(x))


class SwapAxes(nn.Layer):
    """Channels moved to a spatial axis before a conv reads them: not prunable, whatever follows."""

    def __init__(self):
        super().__init__()
        self.stem = conv_bn(3, 16)
        self.after = conv_bn(16, 6)
        self.head = Head(6)

    def forward(self, x):
        return self.head(self.after(paddle.transpose(self.stem(x), [0, 2, 1, 3])))


class RawMatmul(nn.Layer):
    """A raw ``create_parameter`` mixing channels through matmul: not a layer the pruner knows."""

    def __init__(self):
        super().__init__()
        self.stem = conv_bn(3, 8)
        self.mix = self.create_parameter([8, 8])
        self.after = conv_bn(8, 6)
        self.head = Head(6)

    def forward(self, x):
        x = self.stem(x).transpose([0, 2, 3, 1])
        x = paddle.matmul(x, self.mix).transpose([0, 3, 1, 2])
        return self.head(self.after(x))


class SpatialAttention(nn.Layer):
    """A one-channel map broadcast over the channels: it gates positions, not channels."""

    def __init__(self):
        super().__init__()
        self.stem = conv_bn(3, 8)
        self.attention = nn.Conv2D(8, 1, 3, padding=1)
        self.after = conv_bn(8, 6)
        self.head = Head(6)

    def forward(self, x):
        x = self.stem(x)
        return self.head(self.after(x * F.sigmoid(self.attention(x))))


class SharedAndRepeated(nn.Layer):
    """One conv applied twice (its two outputs must be one group) and a tensor concatenated with itself."""

    def __init__(self):
        super().__init__()
        self.stem = conv_bn(3, 8)
        self.shared = nn.Conv2D(8, 6, 3, padding=1)
        self.fuse = conv_bn(12, 6)
        self.head = Head(6)

    def forward(self, x):
        x = self.stem(x)
        y = self.shared(x) + F.interpolate(self.shared(F.avg_pool2d(x, 2)), scale_factor=2)
        return self.head(self.fuse(paddle.concat([y, y], axis=1)))


class LayerScale(nn.Layer):
    """A raw per-channel parameter (ConvNeXt's layer scale) broadcast over the channels: it is sliced too."""

    def __init__(self):
        super().__init__()
        self.stem = conv_bn(3, 8)
        self.gamma = self.create_parameter([8], default_initializer=nn.initializer.Constant(0.5))
        self.after = conv_bn(8, 6)
        self.head = Head(6)

    def forward(self, x):
        x = self.stem(x) * self.gamma.reshape([1, -1, 1, 1])
        return self.head(self.after(x))


class DataDependentBranch(nn.Layer):
    """A tensor-valued ``if`` becomes control flow in the program: channels read inside it are not followed."""

    def __init__(self):
        super().__init__()
        self.stem = conv_bn(3, 8)
        self.a = conv_bn(8, 6)
        self.b = conv_bn(8, 6)
        self.head = Head(6)

    def forward(self, image):
        x = self.stem(image)
        if image.mean() > 0:
            y = self.a(x)
        else:
            y = self.b(x)
        return self.head(y)


class NanGuard(nn.Layer):
    """PaddleOCR's training-time ``fix_nan``: where(isnan(x), zeros_like(x), x) keeps the channels of x."""

    def __init__(self):
        super().__init__()
        self.stem = conv_bn(3, 8)
        self.head = Head(8)

    def forward(self, x):
        x = self.stem(x)
        if self.training:
            x = paddle.where(paddle.isnan(x), paddle.zeros_like(x), x)
        return self.head(x)


PRUNABLE_MODELS = [ConvChain, ConvBNReLU, DepthwiseSeparable, Grouped, TransposedHead, FlattenLinear,
                   PooledLinear, Residual, SEBlock, ConcatBranches, SplitChannels, InterpolatePool, LCNetLike,
                   SpatialAttention, SharedAndRepeated, LayerScale, NanGuard]


# ---------------------------------------------------------------------------------------------------------------
# Helpers.

def build(cls):
    """A model with random weights and BN statistics, so that BN in eval mode is not the identity."""
    paddle.seed(7)
    model = cls()
    rng = np.random.default_rng(7)
    for name, p in model.named_parameters():
        if name.endswith("_variance"):
            p.set_value(rng.uniform(0.5, 2.0, p.shape).astype("float32"))
        elif name.endswith("_mean") or (name.endswith(".weight") and len(p.shape) == 1) or name.endswith("bias"):
            p.set_value(rng.normal(0.2, 0.5, p.shape).astype("float32"))
    model.eval()
    return model


def fresh(cls, state):
    model = cls()
    model.set_state_dict(state)
    model.eval()
    return model


def silence(model, groups_and_removed):
    """Zero the slices of every consumer's weight that read the removed channels: the exact equivalent."""
    params = dict(model.named_parameters())
    for group, removed in groups_and_removed:
        for m in group.members:
            if m.role in READERS:
                w = params[m.param].numpy()
                index = [slice(None)] * w.ndim
                index[m.axis] = m.indices(removed)
                w[tuple(index)] = 0
                params[m.param].set_value(w)


def every_other(group):
    return list(range(0, group.channels, 2))


def run(model, x):
    with paddle.no_grad():
        out = model(x)
    return out.numpy()


def sample():
    return paddle.to_tensor(np.random.default_rng(3).normal(size=[2] + SHAPE).astype("float32"))


@pytest.fixture(scope="module")
def traced():
    """(weights, groups) of each model class, traced once per test module; tests deep-copy the groups."""
    cache = {}

    def get(cls):
        if cls not in cache:
            model = build(cls)
            state = {k: v.numpy().copy() for k, v in model.state_dict().items()}
            cache[cls] = (state, channel_groups(model, SHAPE))
        return cache[cls]

    return get


def by_name(groups, name):
    return next(g for g in groups if g.name == name)


# ---------------------------------------------------------------------------------------------------------------
# Groups found in each structure.

def test_conv_chain_groups_and_printing(traced):
    _, groups = traced(ConvChain)
    assert [g.name for g in groups] == ["c1.weight", "c2.weight", "c3.weight", "head.fc.weight"]
    assert [g.prunable for g in groups] == [True, True, True, False]
    assert groups[-1].reason == "reaches the model output"
    c1 = groups[0]
    assert {(m.param, m.axis, m.role) for m in c1.members} == {
        ("c1.weight", 0, "conv_out"), ("c1.bias", 0, "bias"), ("c2.weight", 1, "conv_in")}
    text = str(c1)
    assert "c1.weight" in text and "c2.weight" in text and "conv_in" in text and "8 channels" in text


def test_depthwise_joins_its_input_group(traced):
    _, groups = traced(DepthwiseSeparable)
    stem = by_name(groups, "stem.0.weight")
    roles = {(m.param, m.role) for m in stem.members}
    assert ("dw.0.weight", "depthwise") in roles and ("dw.1.weight", "bn") in roles
    assert ("pw.0.weight", "conv_in") in roles
    assert not any(g.name == "dw.0.weight" for g in groups)


def test_grouped_conv_groups_are_not_prunable(traced):
    _, groups = traced(Grouped)
    for name in ("stem.0.weight", "grouped.0.weight"):
        g = by_name(groups, name)
        assert not g.prunable and "grouped convolution grouped.0.weight" in g.reason
    assert by_name(groups, "after.0.weight").prunable


def test_transposed_conv_layout(traced):
    _, groups = traced(TransposedHead)
    up1 = by_name(groups, "up1.weight")
    assert up1.prunable and up1.type == "transpose"
    assert {(m.param, m.axis, m.role) for m in up1.members} >= {
        ("up1.weight", 1, "transpose_out"), ("up2.weight", 0, "transpose_in"), ("bn1.weight", 0, "bn")}
    assert not by_name(groups, "up2.weight").prunable


def test_flatten_into_linear_owns_hw_columns(traced):
    _, groups = traced(FlattenLinear)
    conv = by_name(groups, "conv.0.weight")
    fc1_in = next(m for m in conv.members if m.param == "fc1.weight")
    assert (fc1_in.axis, fc1_in.span, fc1_in.role) == (0, 16, "linear_in")
    assert by_name(groups, "fc1.weight").prunable


def test_residual_add_and_subtract_merge_groups(traced):
    _, groups = traced(Residual)
    stem = by_name(groups, "stem.0.weight")
    params = {m.param for m in stem.members}
    assert {"b1.0.weight", "b2.0.weight", "head.fc.weight"} <= params
    assert not any(g.name in ("b1.0.weight", "b2.0.weight") for g in groups)


def test_se_gate_joins_the_gated_group(traced):
    _, groups = traced(SEBlock)
    expand = by_name(groups, "expand.0.weight")
    roles = {(m.param, m.role) for m in expand.members}
    assert {("se.conv2.weight", "conv_out"), ("se.conv1.weight", "conv_in"), ("project.0.weight", "conv_in"),
            ("dw.0.weight", "depthwise")} <= roles
    assert by_name(groups, "se.conv1.weight").prunable


def test_concat_gives_offsets(traced):
    _, groups = traced(ConcatBranches)
    right = by_name(groups, "right.0.weight")
    offsets = {(m.param, m.axis): m.offset for m in right.members}
    assert offsets[("fuse.0.weight", 1)] == 4 and offsets[("dw.0.weight", 0)] == 4
    assert offsets[("right.0.weight", 0)] == 0
    assert by_name(groups, "left.0.weight").prunable and right.prunable


def test_split_along_channels_is_not_prunable(traced):
    _, groups = traced(SplitChannels)
    stem = by_name(groups, "stem.0.weight")
    assert not stem.prunable and "split" in stem.reason
    assert by_name(groups, "a.0.weight").prunable  # a and b merge through the add


def test_learnable_affine_scalars_are_channel_independent(traced):
    _, groups = traced(LCNetLike)
    stem = by_name(groups, "stem.0.weight")
    params = {m.param for m in stem.members}
    assert {"rep.identity.weight", "rep.one.0.weight", "rep.kxk.0.0.weight", "rep.kxk.1.0.weight",
            "deployed.reparam_conv.weight"} <= params
    assert not any("lab" in p for p in params)
    assert stem.prunable and by_name(groups, "deployed.reparam_conv.weight").prunable


@pytest.mark.parametrize("cls, op", [(ChannelShuffle, "reshape"), (SwapAxes, "axis 2"), (RawMatmul, "matmul")])
def test_unsupported_ops_block_their_group(traced, cls, op):
    _, groups = traced(cls)
    stem = by_name(groups, "stem.0.weight")
    assert not stem.prunable and op in stem.reason
    assert by_name(groups, "after.0.weight").prunable


def test_broadcast_shared_and_raw_per_channel_parameters(traced):
    _, groups = traced(SpatialAttention)
    assert by_name(groups, "stem.0.weight").prunable
    _, groups = traced(SharedAndRepeated)
    shared = by_name(groups, "shared.weight")
    assert shared.prunable and {m.offset for m in shared.members if m.param == "fuse.0.weight"} == {0, 6}
    assert sum(g.name == "shared.weight" for g in groups) == 1
    _, groups = traced(LayerScale)
    stem = by_name(groups, "stem.0.weight")
    assert stem.prunable and ("gamma", 0, "affine") in {(m.param, m.axis, m.role) for m in stem.members}


def test_nan_guard_keeps_its_group_prunable(traced):
    stem = by_name(traced(NanGuard)[1], "stem.0.weight")
    assert stem.prunable, stem.reason


def test_control_flow_blocks_the_groups_it_reads(traced):
    _, groups = traced(DataDependentBranch)
    stem = by_name(groups, "stem.0.weight")
    assert not stem.prunable and "unsupported op" in stem.reason
    assert not any(g.prunable and g.name.startswith(("a.", "b.")) for g in groups)


# ---------------------------------------------------------------------------------------------------------------
# Surgery is exact, and the result is a normal model.

@pytest.mark.parametrize("cls", PRUNABLE_MODELS, ids=lambda c: c.__name__)
def test_every_prunable_group_prunes_exactly(traced, cls):
    state, groups = traced(cls)
    prunable = [g for g in groups if g.prunable and g.channels > 1]
    assert prunable
    x = sample()
    changed = []
    for group in prunable:
        trial = copy.deepcopy(groups)
        g = trial[group.index]
        removed = every_other(g)
        reference = fresh(cls, state)
        silence(reference, [(g, removed)])
        model = fresh(cls, state)
        before = run(model, x)
        prune_group(model, g, removed)
        after = run(model, x)
        assert np.abs(after - run(reference, x)).max() <= 1e-5, f"{cls.__name__}: {g}"
        changed.append(np.abs(after - before).max() > 1e-6)
    assert any(changed), "no pruning changed the output: the check above could not fail"


@pytest.mark.parametrize("cls", PRUNABLE_MODELS, ids=lambda c: c.__name__)
def test_all_groups_pruned_model_trains_saves_and_reloads(traced, cls, tmp_path):
    state, groups = traced(cls)
    x = sample()
    pruned_groups = copy.deepcopy(groups)
    plan = [(g, every_other(g)) for g in pruned_groups if g.prunable and g.channels > 1]
    reference = fresh(cls, state)
    silence(reference, plan)
    model = fresh(cls, state)
    for g, removed in plan:
        prune_group(model, g, removed)
    expected = run(model, x)
    assert np.abs(expected - run(reference, x)).max() <= 1e-5
    originals = [o for o in groups if o.prunable and o.channels > 1]
    assert all(g.channels == orig.channels - len(removed) for (g, removed), orig in zip(plan, originals))

    model.train()
    out = model(x)
    out.mean().backward()
    assert all(p.grad is None or list(p.grad.shape) == list(p.shape) for p in model.parameters())
    model.clear_gradients()
    model.eval()
    expected = run(model, x)  # the training step moved the BN statistics

    again = copy.deepcopy(groups)
    twin = fresh(cls, state)
    for g in again:
        if g.prunable and g.channels > 1:
            prune_group(twin, g, every_other(g))
    twin.set_state_dict(model.state_dict())
    twin.eval()
    assert np.abs(run(twin, x) - expected).max() == 0
    assert not any("backup" in k for k in model.state_dict())

    from paddle.static import InputSpec

    prefix = str(tmp_path / "pruned")
    paddle.jit.save(model, prefix, input_spec=[InputSpec([None] + SHAPE, "float32")])
    loaded = paddle.jit.load(prefix)
    loaded.eval()
    assert np.abs(run(loaded, x) - expected).max() <= 1e-5
    assert paddle.in_dynamic_mode()


def test_prune_group_refuses_unprunable_and_bad_indices(traced):
    state, groups = traced(ConvChain)
    model = fresh(ConvChain, state)
    with pytest.raises(ValueError, match="not prunable"):
        prune_group(model, groups[-1], [0])
    g = copy.deepcopy(groups)[0]
    with pytest.raises(ValueError, match="must lie in"):
        prune_group(model, g, [8])
    with pytest.raises(ValueError, match="cannot remove all"):
        prune_group(model, g, range(8))


def test_pruned_layers_report_their_new_sizes(traced):
    state, groups = traced(ConcatBranches)
    model = fresh(ConcatBranches, state)
    trial = copy.deepcopy(groups)
    prune_group(model, by_name(trial, "left.0.weight"), [0, 1])
    prune_group(model, by_name(trial, "right.0.weight"), [5])
    assert (model.dw[0]._in_channels, model.dw[0]._out_channels, model.dw[0]._groups) == (7, 7, 7)
    assert model.fuse[0]._in_channels == 7 and model.dw[1]._num_features == 7
    assert list(model.fuse[0].weight.shape) == [8, 7, 3, 3]
    assert by_name(trial, "right.0.weight").members[0].offset == 0
    assert {m.offset for m in by_name(trial, "right.0.weight").members if m.param == "fuse.0.weight"} == {2}


# ---------------------------------------------------------------------------------------------------------------
# Tracing leaves no trace.

def test_tracing_restores_mode_and_weights():
    model = build(ConvBNReLU)
    model.train()
    model.a[1].eval()  # a frozen BN inside a training model keeps its own mode
    before = {k: v.numpy().copy() for k, v in model.state_dict().items()}
    channel_groups(model, [1] + SHAPE)
    count_flops(model, SHAPE)
    assert model.training and not model.a[1].training and model.b[1].training and paddle.in_dynamic_mode()
    assert all(np.array_equal(before[k], v.numpy()) for k, v in model.state_dict().items())
    assert "StaticFunction" not in type(model.forward).__name__


class Untraceable(nn.Layer):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2D(3, 4, 3)

    def forward(self, x):
        if not paddle.in_dynamic_mode():
            raise RuntimeError("this model only runs eagerly")
        return self.conv(x)


def test_tracing_failure_is_a_clear_error():
    with pytest.raises(TraceError, match="could not trace Untraceable"):
        channel_groups(Untraceable(), SHAPE)
    assert paddle.in_dynamic_mode()
    with pytest.raises(ValueError, match="input_shape"):
        channel_groups(ConvChain(), [16, 16])


# ---------------------------------------------------------------------------------------------------------------
# Importance and FLOPs.

@pytest.mark.parametrize("criterion", CRITERIA)
def test_zeroed_channel_is_removed_first(traced, criterion):
    state, groups = traced(ConvBNReLU)
    model = fresh(ConvBNReLU, state)
    group = groups[0]
    params = dict(model.named_parameters())
    for m in group.members:
        if m.role != "bn" or m.param.endswith(".weight") or m.param.endswith(".bias"):
            w = params[m.param].numpy()
            index = [slice(None)] * w.ndim
            index[m.axis] = m.indices([3])
            w[tuple(index)] = 0
            params[m.param].set_value(w)
    taylor = None
    if criterion == "taylor":
        model.train()
        taylor = taylor_scores(model, [sample(), sample()], lambda mdl, batch: (mdl(batch) ** 2).mean())
    scores = group_importance(model, group, criterion, taylor)
    assert scores.shape == (group.channels,)
    assert channels_to_remove(scores, 1) == [3]
    assert channels_to_remove(scores, 3)[0] <= 3 and 3 in channels_to_remove(scores, 3)


def test_importance_refuses_unknown_criterion(traced):
    state, groups = traced(ConvBNReLU)
    with pytest.raises(ValueError, match="unknown criterion"):
        group_importance(fresh(ConvBNReLU, state), groups[0], "random")


class FlopsNet(nn.Layer):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2D(3, 8, 3, padding=1)  # 16*16 * 8 * 3*9 = 55296
        self.pw = nn.Conv2D(8, 4, 1, stride=2)  # 8*8 * 4 * 8 = 2048
        self.up = nn.Conv2DTranspose(4, 2, 2, stride=2)  # 8*8 input pixels * 4 * 2*2*2 = 2048
        self.dw = nn.Conv2D(2, 2, 3, padding=1, groups=2)  # 16*16 * 2 * 9 = 4608
        self.fc = nn.Linear(2, 5)  # 10

    def forward(self, x):
        x = self.dw(self.up(self.pw(self.conv(x))))
        return self.fc(paddle.flatten(F.adaptive_avg_pool2d(x, 1), 1))


def test_count_flops_matches_hand_count():
    model = FlopsNet()
    model.train()
    assert count_flops(model, SHAPE) == 55296 + 2048 + 2048 + 4608 + 10
    assert model.training


# ---------------------------------------------------------------------------------------------------------------
# The repo's DB detector: the neck's concat-fed convs and the head's transposed convs are prunable.

def test_db_detector_neck_and_head_are_prunable():
    from slimrecipe.models._db_layers import DBDetector

    paddle.seed(0)
    model = DBDetector(scale=0.5, neck_channels=256)
    model.eval()
    groups = channel_groups(model, [3, 64, 64])
    prunable = {g.name for g in groups if g.prunable}
    for name in ("neck.p5_conv.weight", "neck.p2_conv.weight", "head.binarize.conv1.weight",
                 "head.binarize.conv2.weight", "head.thresh.conv2.weight", "neck.in5_conv.weight",
                 "backbone.conv.conv.weight"):
        assert name in prunable, name
    assert "head.binarize.conv3.weight" not in prunable
    p5 = by_name(groups, "neck.p5_conv.weight")
    assert {m.offset for m in p5.members if m.param == "head.thresh.conv1.weight"} == {0}
    p2 = by_name(groups, "neck.p2_conv.weight")
    assert {m.offset for m in p2.members if m.param == "head.binarize.conv1.weight"} == {192}
    # One group: prune it and compare with the silenced reference in eval mode.
    state = {k: v.numpy().copy() for k, v in model.state_dict().items()}
    x = paddle.to_tensor(np.random.default_rng(0).normal(size=[1, 3, 64, 64]).astype("float32"))
    reference = DBDetector(scale=0.5, neck_channels=256)
    reference.set_state_dict(state)
    reference.eval()
    silence(reference, [(p2, every_other(p2))])
    prune_group(model, p2, every_other(p2))
    assert np.abs(run(model, x) - run(reference, x)).max() <= 1e-5
