"""Channel dependency graph of a Paddle dygraph model: which tensors must lose the same channels together.

The model is traced once with ``paddle.jit.to_static`` (a PIR program on Paddle 3.x, a legacy ``Program`` on
Paddle 2.6). One small adapter per Paddle line turns the program into the same list of :class:`_Op`; one
propagation pass (DepGraph style, after Torch-Pruning) then follows every channel set from the layer that
creates it (convolution, transposed convolution, linear) through the ops that keep channels apart
(normalisation, activations, pooling, resizing, residual adds, SE gates, concat ...) to the layers that read it.

Anything the pass does not understand makes the touched groups unprunable, with the op named in
``Group.reason``: a group is either pruned exactly or not at all.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Sequence

from slimrecipe.paddle_env import paddle as _paddle


@dataclass
class Member:
    """One tensor that loses channels when its group is pruned."""

    param: str  # structured parameter name (a state_dict key)
    axis: int  # axis of that tensor that loses channels
    offset: int = 0  # where the group's channels start along that axis (>0 for concat-fed consumers)
    role: str = ""  # conv_out, conv_in, depthwise, transpose_out, transpose_in, bn, bias, linear_in, linear_out, affine
    span: int = 1  # entries each channel owns along the axis (a linear layer after flattening C x H x W: H*W)

    def indices(self, channels: Sequence[int]) -> list[int]:
        """Positions along ``axis`` that belong to the given group channels."""
        return [self.offset + c * self.span + k for c in channels for k in range(self.span)]


@dataclass
class Group:
    """Channels that are pruned together: the same indices leave every member tensor."""

    name: str  # structured name of the leading producer's weight (first in execution order)
    index: int  # 0 = nearest the input
    channels: int
    type: str  # conv | depthwise | grouped | transpose | linear
    members: list[Member]
    prunable: bool
    reason: str | None = None
    divisor: int = 1  # the kept channel count must be a multiple of this
    # The other groups of the same trace: pruning this group shifts their offsets in shared tensors.
    peers: list["Group"] = field(default_factory=list, repr=False, compare=False)

    def __str__(self) -> str:
        state = "prunable" if self.prunable else f"not prunable: {self.reason}"
        lines = [f"group {self.index} {self.name} ({self.type}, {self.channels} channels, {state})"]
        for m in self.members:
            span = f" span {m.span}" if m.span != 1 else ""
            lines.append(f"  {m.param:<48} axis {m.axis} offset {m.offset:<5} {m.role}{span}")
        return "\n".join(lines)


class TraceError(RuntimeError):
    """The model could not be traced into a static program."""


# ---------------------------------------------------------------------------------------------------------------
# Tracing: one adapter per Paddle line, both producing the same normalised op list.


@dataclass
class _Op:
    type: str  # canonical name, without "pd_op." or a trailing "_"
    inputs: dict  # slot -> list of value ids (constant operands are moved into attrs)
    outputs: list  # main output value ids
    attrs: dict
    where: str  # the layer that emitted the op, for messages


@dataclass
class _Trace:
    ops: list
    shapes: dict  # value id -> list[int]
    params: dict  # value id -> static parameter name
    outputs: list  # value ids of the model outputs


# Legacy (Paddle 2.6) op names -> the PIR names used below.
_ALIASES = {
    "elementwise_add": "add", "elementwise_sub": "subtract", "elementwise_mul": "multiply",
    "elementwise_div": "divide", "elementwise_max": "maximum", "elementwise_min": "minimum",
    "reshape2": "reshape", "squeeze2": "squeeze", "unsqueeze2": "unsqueeze", "transpose2": "transpose",
    "flatten_contiguous_range": "flatten", "flatten2": "flatten", "matmul_v2": "matmul",
    "nearest_interp_v2": "nearest_interp", "bilinear_interp_v2": "bilinear_interp",
    "bicubic_interp_v2": "bicubic_interp", "linear_interp_v2": "linear_interp", "hard_swish": "hardswish",
    "hard_sigmoid": "hardsigmoid", "reduce_mean": "mean", "reduce_sum": "sum", "reduce_max": "max",
    "reduce_min": "min", "split_with_num": "split", "brelu": "hardtanh", "isnan_v2": "isnan",
    "fill_any_like": "full_like",
}
# Extra outputs that are not the op's result (statistics, masks, shape records).
_SIDE_OUTPUTS = {"xshape", "meanout", "varianceout", "savedmean", "savedvariance", "reservespace", "mean_out",
                 "variance_out", "saved_mean", "saved_variance", "reserve_space", "mask"}


def _canonical(name: str) -> str:
    name = name.split(".", 1)[1] if name.startswith("pd_op.") else name
    if name.endswith("_") and not name.endswith("__"):
        name = name[:-1]
    return _ALIASES.get(name, name)


def _nested_ops(op):
    try:
        blocks = list(op.blocks())
    except Exception:  # noqa: BLE001 -- ops without regions
        return []
    found = []
    for block in blocks:
        for inner in block.ops:
            found.append(inner)
            found.extend(_nested_ops(inner))
    return found


def _slot_names(op, kind: str, count: int) -> list:
    generic = [f"{kind}{i}" for i in range(count)]
    # Control-flow ops carry no slot names; asking for their output names crashes Paddle 3.3 (SIGSEGV).
    if op.num_regions() > 0:
        return generic
    try:
        op.get_input_names()
    except Exception:  # noqa: BLE001 -- no OpYamlInfoInterface: no names either way
        return generic
    return list(op.get_input_names() if kind == "input" else op.get_output_names())


def _captured_values(op) -> list:
    inner = _nested_ops(op)
    if not inner:
        return []
    produced = {r.id for o in inner for r in o.results()}
    captured = []
    for o in inner:
        for value in o.operands_source():
            if value.initialized() and value.id not in produced and value.id not in captured:
                captured.append(value.id)
    return captured


def _pir_trace(program, outputs) -> _Trace:
    ops = list(program.global_block().ops)
    combined, unpacked, consts = {}, {}, {}
    shapes, params = {}, {}

    def shape_of(value):
        try:
            return [int(d) for d in value.shape]
        except Exception:  # noqa: BLE001 -- vectors and null operands have no shape
            return None

    for op in ops:
        kind = op.name()
        if kind == "builtin.combine":
            combined[op.result(0).id] = [v.id for v in op.operands_source()]
        elif kind == "builtin.split":
            unpacked[op.operand_source(0).id] = [v.id for v in op.results()]
        elif kind in ("pd_op.full", "pd_op.full_int_array"):
            consts[op.result(0).id] = op.attrs()["value"]
        elif kind == "builtin.parameter":
            params[op.result(0).id] = op.attrs()["parameter_name"]
        for value in op.results():
            s = shape_of(value)
            if s is not None:
                shapes[value.id] = s

    result = []
    for op in ops:
        kind = op.name()
        if kind.startswith("builtin.") or kind in ("pd_op.full", "pd_op.full_int_array", "pd_op.data"):
            continue
        attrs = {k: v for k, v in op.attrs().items() if k not in ("op_callstack", "stop_gradient")}
        inputs = {}
        for slot, value in zip(_slot_names(op, "input", op.num_operands()), op.operands_source()):
            if not value.initialized():
                continue
            if value.id in consts:
                attrs[slot] = consts[value.id]
            elif value.id in combined:
                parts = combined[value.id]
                if all(p in consts for p in parts):
                    attrs[slot] = [consts[p] for p in parts]
                else:
                    inputs[slot] = [p for p in parts if p not in consts]
            else:
                inputs[slot] = [value.id]
        captured = _captured_values(op)
        if captured:  # control flow: values its inner blocks read from outside (never followed inside)
            inputs["captured"] = captured
        outs = []
        for slot, value in zip(_slot_names(op, "output", op.num_results()), op.results()):
            if slot.lower() in _SIDE_OUTPUTS:
                continue
            outs.extend(unpacked.get(value.id, [value.id]))
        where = str(attrs.pop("struct_name", "") or "").strip("/")
        result.append(_Op(_canonical(kind), inputs, outs, attrs, where or f"op {len(result)}"))
    return _Trace(result, shapes, params, [v.id for v in outputs])


def _legacy_trace(program, outputs) -> _Trace:
    block = program.global_block()
    param_names = {p.name for p in block.all_parameters()}
    shapes = {}
    for name, var in block.vars.items():
        try:
            shapes[name] = [int(d) for d in var.shape]
        except Exception:  # noqa: BLE001 -- readers and other shapeless variables
            pass
    result = []
    for op in block.ops:
        if op.type in ("feed", "fetch", "fill_constant", "assign_value"):
            continue
        inputs = {slot.lower(): list(op.input(slot)) for slot in op.input_names if op.input(slot)}
        outs = [n for slot in op.output_names if slot.lower() not in _SIDE_OUTPUTS
                for n in op.output(slot) if n not in param_names]
        attrs = {n: op.attr(n) for n in op.attr_names if n not in ("op_callstack", "op_namescope")}
        if op.type == "transpose2":
            attrs["perm"] = attrs.get("axis")
        if op.type.startswith("reduce_"):
            attrs["axis"] = [] if attrs.get("reduce_all") else attrs.get("dim", [])
            attrs["keepdim"] = attrs.get("keep_dim", False)
        if op.type in ("matmul_v2",):
            attrs["transpose_x"], attrs["transpose_y"] = attrs.get("trans_x"), attrs.get("trans_y")
        if op.type.startswith("elementwise_") and attrs.get("axis", -1) != -1:
            kind = op.type + "_with_axis"  # old-style broadcasting from a given axis: not followed
        else:
            kind = _canonical(op.type)
        if op.has_attr("sub_block"):  # control flow: treat every name its blocks read as an input
            inputs["captured"] = _legacy_captured(program, op._block_attr_id("sub_block"))
        result.append(_Op(kind, inputs, outs, attrs, f"op {len(result)} ({op.type})"))
    return _Trace(result, shapes, {n: n for n in param_names}, [v.name for v in outputs])


def _legacy_captured(program, index: int) -> list:
    names = []
    for op in program.block(index).ops:
        for slot in op.input_names:
            names.extend(n for n in op.input(slot) if n not in names)
        if op.has_attr("sub_block"):
            names.extend(n for n in _legacy_captured(program, op._block_attr_id("sub_block")) if n not in names)
    return names


def _full_shape(model_input: Sequence[int]) -> list[int]:
    shape = [int(d) for d in model_input]
    if len(shape) == 3:
        shape = [2] + shape  # a batch of 2 keeps the batch axis apart from the size-1 axes
    if len(shape) != 4:
        raise ValueError(f"input_shape must be [C, H, W] or [N, C, H, W], got {list(model_input)}")
    return shape


def _modes(model) -> list:
    """Every sublayer's training flag: a model may keep some layers (frozen BN) in eval mode on purpose."""
    return [(layer, layer.training) for layer in model.sublayers(include_self=True)]


def _restore_modes(modes) -> None:
    for layer, training in modes:
        layer.training = training


def trace(model, input_shape: Sequence[int]) -> _Trace:
    """Trace ``model`` in training mode (so training-only branches are seen); the model is left as it was."""
    p = _paddle()
    from paddle.static import InputSpec

    shape = _full_shape(input_shape)
    modes = _modes(model)
    model.train()
    try:
        # Converting the bound forward (not the layer) leaves `model.forward` untouched.
        static = p.jit.to_static(model.forward, input_spec=[InputSpec(shape, "float32", "x")], full_graph=True)
        concrete = static.concrete_program
        program = concrete.main_program
        outputs = [o for o in p.utils.flatten(concrete.outputs) if o is not None]
        if isinstance(program, p.base.framework.Program):
            return _legacy_trace(program, outputs)
        return _pir_trace(program, outputs)
    except Exception as e:  # noqa: BLE001 -- any tracing failure means the same thing to the caller
        raise TraceError(f"could not trace {type(model).__name__} with an input of shape {shape} "
                         f"({type(e).__name__}: {e})") from e
    finally:
        if not p.in_dynamic_mode():
            p.disable_static()
        _restore_modes(modes)


# ---------------------------------------------------------------------------------------------------------------
# Channel propagation.


@dataclass(frozen=True)
class _Seg:
    gid: int | None  # None: channels no prunable layer produced (e.g. the model input)
    count: int
    span: int = 1


@dataclass(frozen=True)
class _Chan:
    """Which groups' channels a value carries, along which axis, in which order."""

    axis: int
    segs: tuple

    def positions(self):
        pos = 0
        for seg in self.segs:
            yield pos, seg
            pos += seg.count * seg.span

    def size(self) -> int:
        return sum(s.count * s.span for s in self.segs)

    def gids(self):
        return [s.gid for s in self.segs if s.gid is not None]


@dataclass
class _Pending:
    leader: str
    order: int
    channels: int
    type: str
    members: list = field(default_factory=list)
    reasons: list = field(default_factory=list)


_UNARY = {
    "relu", "relu6", "hardswish", "hardsigmoid", "sigmoid", "tanh", "swish", "silu", "gelu", "leaky_relu", "elu",
    "selu", "celu", "mish", "softplus", "softsign", "hardtanh", "hardshrink", "softshrink", "tanh_shrink",
    "thresholded_relu", "logsigmoid", "exp", "expm1", "abs", "square", "sqrt", "rsqrt", "reciprocal", "log",
    "log1p", "sin", "cos", "floor", "ceil", "round", "sign", "pow", "scale", "clip", "cast", "assign", "dropout",
    "pool2d", "max_pool2d_with_index", "nearest_interp", "bilinear_interp", "bicubic_interp", "linear_interp",
    "pad3d", "pad", "expand", "tile", "erf", "increment", "isnan", "isinf", "isfinite",
}
_BINARY = {"add", "subtract", "multiply", "divide", "maximum", "minimum", "elementwise_pow", "fmax", "fmin"}
_RESHAPES = {"reshape", "flatten", "squeeze", "unsqueeze"}
_REDUCTIONS = {"mean", "sum", "max", "min", "amax", "amin", "prod", "logsumexp"}
_HARMLESS = {"shape", "shape64", "full_like", "zeros_like", "ones_like"}  # read only shapes, never values
_SHAPE_FOLLOWING = {"full_like", "zeros_like", "ones_like"}  # constants shaped like their input at run time
_NORMS = {"batch_norm", "instance_norm", "sync_batch_norm"}


class _Propagation:
    def __init__(self, trace_: _Trace, model):
        p = _paddle()
        self.t = trace_
        self.ann: dict = {}  # value id -> _Chan
        self.shape_following: set = set()  # value ids of constants shaped like an annotated tensor
        self.views: dict = {}  # value id -> static parameter name, for parameters and their reshapes
        self.parent: dict = {}
        self.groups: dict = {}  # gid -> _Pending
        self.misused: dict = {}  # static parameter name -> why it cannot be sliced
        self.owner = {}  # static parameter name -> (structured name, layer)
        for lname, layer in model.named_sublayers(include_self=True):
            for key, param in layer._parameters.items():
                if param is not None and param.name not in self.owner:
                    self.owner[param.name] = (f"{lname}.{key}" if lname else key, layer)
        self.conv_types = (p.nn.layer.conv._ConvNd,)
        self.linear_types = (p.nn.Linear,)
        for vid, name in trace_.params.items():
            self.views[vid] = name

    # -- groups ---------------------------------------------------------------------------------------------
    def find(self, gid):
        while self.parent[gid] != gid:
            self.parent[gid] = self.parent[self.parent[gid]]
            gid = self.parent[gid]
        return gid

    def new_group(self, weight: str, channels: int, kind: str) -> int:
        gid = len(self.parent)
        self.parent[gid] = gid
        self.groups[gid] = _Pending(self.name(weight), gid, channels, kind)
        return gid

    def union(self, a, b):
        a, b = self.find(a), self.find(b)
        if a == b:
            return
        if self.groups[b].order < self.groups[a].order:
            a, b = b, a
        self.parent[b] = a
        self.groups[a].members += self.groups[b].members
        self.groups[a].reasons += self.groups[b].reasons

    def block(self, chan_or_gids, reason: str):
        gids = chan_or_gids.gids() if isinstance(chan_or_gids, _Chan) else chan_or_gids
        for gid in gids:
            if gid is not None:
                self.groups[self.find(gid)].reasons.append(reason)

    def name(self, static_name: str) -> str:
        return self.owner.get(static_name, (static_name, None))[0]

    def add_members(self, chan: _Chan, param: str, axis: int, role: str):
        """``param`` reads (or holds) the channels of ``chan`` along ``axis``, in the same order."""
        for pos, seg in chan.positions():
            if seg.gid is not None:
                member = Member(self.name(param), axis, pos, role, seg.span)
                self.groups[self.find(seg.gid)].members.append(member)

    # -- helpers ----------------------------------------------------------------------------------------------
    def shape(self, vid):
        return self.t.shapes.get(vid)

    def slot(self, op, *names):
        for n in names:
            if op.inputs.get(n):
                return op.inputs[n][0]
        return None

    def touched(self, op):
        ids = [v for vs in op.inputs.values() for v in vs]
        return [v for v in ids if v in self.ann], [v for v in ids if v in self.views]

    def unsupported(self, op, why: str | None = None):
        annotated, views = self.touched(op)
        reason = f"unsupported op {op.type} at {op.where}" + (f": {why}" if why else "")
        for v in annotated:
            self.block(self.ann[v], reason)
        for v in views:
            self.misused.setdefault(self.views[v], f"parameter {self.name(self.views[v])} used by {op.type} "
                                                   f"at {op.where}")

    def layer_of(self, static_name):
        return self.owner.get(static_name, (None, None))[1]

    # -- the pass ---------------------------------------------------------------------------------------------
    def run(self):
        for op in self.t.ops:
            for out in op.outputs:  # a legacy program can write a name again: forget what it held
                self.ann.pop(out, None)
                self.views.pop(out, None)
            annotated, views = self.touched(op)
            if not annotated and not views:
                continue
            handler = getattr(self, f"_op_{op.type}", None)
            if handler is None:
                if op.type in _UNARY:
                    handler = self._unary
                elif op.type in _BINARY:
                    handler = self._binary
                elif op.type in _RESHAPES:
                    handler = self._reshape
                elif op.type in _REDUCTIONS:
                    handler = self._reduction
                elif op.type in _NORMS:
                    handler = self._norm
                elif op.type in _HARMLESS:
                    if op.type in _SHAPE_FOLLOWING:
                        self.shape_following.update(op.outputs)
                    continue
                else:
                    self.unsupported(op)
                    continue
            handler(op)
        for vid in self.t.outputs:
            if vid in self.ann:
                self.block(self.ann[vid], "reaches the model output")

    def _main(self, op):
        return self.slot(op, "x", "input")

    def _only_main_touched(self, op) -> bool:
        main = self._main(op)
        annotated, views = self.touched(op)
        return all(v == main for v in annotated + views)

    def _unary(self, op):
        x = self._main(op)
        if not self._only_main_touched(op) or not op.outputs:
            return self.unsupported(op, "channels enter through a side input")
        out = op.outputs[0]
        if x in self.views:
            self.views[out] = self.views[x]
            return
        chan, in_shape, out_shape = self.ann[x], self.shape(x), self.shape(out)
        if in_shape is None or out_shape is None or len(in_shape) != len(out_shape) \
                or in_shape[chan.axis] != out_shape[chan.axis]:
            return self.unsupported(op, "it changes the channel axis")
        self.ann[out] = chan

    def _binary(self, op):
        x, y = self.slot(op, "x"), self.slot(op, "y")
        out = op.outputs[0] if op.outputs else None
        if x is None or y is None or out is None:
            return self.unsupported(op)
        if x not in self.ann and y not in self.ann:
            # A parameter scaled or shifted by a scalar is still that parameter, channel for channel.
            for view, scalar in ((x, y), (y, x)):
                if view in self.views and scalar not in self.views and math.prod(self.shape(scalar) or [0]) == 1:
                    self.views[out] = self.views[view]
                    return
            return self.unsupported(op)
        out_shape = self.shape(out)
        known = [v for v in (x, y) if v in self.ann]
        other = [v for v in (x, y) if v not in self.ann]
        lead = self.ann[known[0]]
        rank = len(self.shape(known[0]))
        from_right = lead.axis - rank
        if len(known) == 2:
            second = self.ann[known[1]]
            if second.axis - len(self.shape(known[1])) != from_right:
                return self.unsupported(op, "its operands carry channels on different axes")
            if second.size() == 1 and lead.size() > 1:
                pass  # a one-channel map (spatial attention) broadcast over the channels: no channel pairing
            elif lead.size() == 1 and second.size() > 1:
                lead = second
            else:
                self.merge(lead, second, op)
        else:
            other_shape = self.shape(other[0])
            pos = len(other_shape) + from_right if other_shape is not None else -1
            size = other_shape[pos] if other_shape is not None and 0 <= pos < len(other_shape) else 1
            one_channel_bias = size == 1 and lead.size() == 1 and other[0] in self.views and 0 <= pos and \
                isinstance(self.layer_of(self.views[other[0]]), self.conv_types + self.linear_types)
            if size != 1 or one_channel_bias:
                if other[0] in self.views:
                    if not self.attach_view(other[0], other_shape, pos, lead, op):
                        return
                else:
                    self.block(lead, f"{op.type} at {op.where} mixes the channels with a tensor the pruner "
                                     "cannot follow")
            elif other[0] in self.views:
                pass  # a scalar parameter (e.g. a learnable affine scale) is channel-independent
        self.ann[out] = _Chan(len(out_shape) + from_right, lead.segs)

    def _op_where(self, op):
        # where(condition, x, y) is elementwise: every full-size operand carries the same channels. A constant
        # made by zeros_like & co. follows its input's shape when channels go, so it carries none of its own.
        operands = [self.slot(op, n) for n in ("condition", "x", "y")]
        out = op.outputs[0] if op.outputs else None
        if None in operands or out is None:
            return self.unsupported(op)
        chans = []
        for v in operands:
            if v in self.ann:
                if self.shape(v) != self.shape(out):
                    return self.unsupported(op, "an operand is broadcast")
                chans.append(self.ann[v])
            elif v not in self.shape_following:
                return self.unsupported(op, "an operand the pruner cannot follow")
        for other in chans[1:]:
            self.merge(chans[0], other, op)
        self.ann[out] = chans[0]

    def attach_view(self, vid, view_shape, pos, chan: _Chan, op) -> bool:
        """A parameter broadcast over the channels (a bias, a per-channel scale): it loses channels too."""
        static = self.views[vid]
        param_shape = self.t.shapes.get(self._param_vid(static))
        big_view = [i for i, d in enumerate(view_shape) if d != 1]
        big_param = [i for i, d in enumerate(param_shape or []) if d != 1]
        if chan.size() == 1 and param_shape is not None and math.prod(param_shape) == 1:
            big_view, big_param = [pos], [0]  # the bias of a one-channel output
        if big_view != [pos] or len(big_param) != 1 or param_shape[big_param[0]] != view_shape[pos] \
                or view_shape[pos] != chan.size():
            self.misused.setdefault(static, f"parameter {self.name(static)} used by {op.type} at {op.where} "
                                            "is not per-channel")
            self.block(chan, f"{op.type} at {op.where} applies a parameter that is not per-channel")
            return False
        layer = self.layer_of(static)
        if isinstance(layer, self.conv_types) or isinstance(layer, self.linear_types):
            role = "bias"
        else:
            role = "affine"
        self.add_members(chan, static, big_param[0], role)
        return True

    def _param_vid(self, static):
        for vid, name in self.t.params.items():
            if name == static:
                return vid
        return None

    def merge(self, a: _Chan, b: _Chan, op):
        if [(s.count, s.span) for s in a.segs] != [(s.count, s.span) for s in b.segs]:
            self.block(a, f"{op.type} at {op.where} combines tensors whose channels come in different layouts")
            self.block(b, f"{op.type} at {op.where} combines tensors whose channels come in different layouts")
            return
        for sa, sb in zip(a.segs, b.segs):
            if sa.gid is not None and sb.gid is not None:
                self.union(sa.gid, sb.gid)
            elif sa.gid is not None or sb.gid is not None:
                self.block([sa.gid, sb.gid], f"{op.type} at {op.where} combines the channels with channels no "
                                              "prunable layer produced")

    def _norm(self, op):
        x = self._main(op)
        if x not in self.ann or not op.outputs:
            return self.unsupported(op)
        chan = self.ann[x]
        for slot in ("scale", "bias", "mean", "variance"):
            vid = self.slot(op, slot)
            if vid is None:
                continue
            if vid not in self.views or self.shape(vid) != [chan.size()]:
                return self.unsupported(op, f"its {slot} is not a per-channel parameter")
        data_format = str(op.attrs.get("data_format", "NCHW"))
        expected = 1 if data_format.startswith("NC") else len(self.shape(x)) - 1
        if chan.axis != expected:
            return self.unsupported(op, "it normalises along an axis that does not carry the channels")
        for slot in ("scale", "bias", "mean", "variance"):
            vid = self.slot(op, slot)
            if vid is not None:
                self.add_members(chan, self.views[vid], 0, "bn")
        self.ann[op.outputs[0]] = chan

    def _conv_like(self, op, transposed: bool):
        x, w = self.slot(op, "input", "x"), self.slot(op, "filter")
        extra = [v for v in self.touched(op)[0] + self.touched(op)[1] if v not in (x, w)]
        layer = self.layer_of(self.t.params.get(w)) if w in self.t.params else None
        if extra or x in self.views or not isinstance(layer, self.conv_types) or not op.outputs:
            why = "its weight is not a Paddle convolution layer's parameter" if not isinstance(
                layer, self.conv_types) else None
            return self.unsupported(op, why)
        static = self.t.params[w]
        wshape = self.shape(w)
        groups = int(op.attrs.get("groups", 1) or 1)
        if transposed:
            in_ch, out_ch, in_axis, out_axis = wshape[0], wshape[1] * groups, 0, 1
        else:
            in_ch, out_ch, in_axis, out_axis = wshape[1] * groups, wshape[0], 1, 0
        chan = self.ann.get(x)
        out = op.outputs[0]
        if chan is not None and (chan.axis != 1 or any(s.span != 1 for s in chan.segs)):
            self.block(chan, f"{op.type} at {op.where} reads its channels on axis 1, but they are on axis "
                             f"{chan.axis}")
            chan = None
        if str(op.attrs.get("data_format", "NCHW")) not in ("NCHW", "AnyLayout"):
            return self.unsupported(op, "only NCHW convolutions are followed")
        kind = "transpose" if transposed else "conv"
        if groups == 1:
            if chan is not None:
                self.add_members(chan, static, in_axis, f"{kind}_in")
            gid = self.new_group(static, out_ch, kind)
            self.groups[gid].members.append(Member(self.name(static), out_axis, 0, f"{kind}_out"))
            self.ann[out] = _Chan(1, (_Seg(gid, out_ch),))
        elif groups == in_ch == out_ch:
            if chan is not None:
                self.add_members(chan, static, 0, "depthwise")
                self.ann[out] = chan
        else:
            reason = f"grouped convolution {self.name(static)} (groups={groups})"
            if chan is not None:
                self.block(chan, reason)
            gid = self.new_group(static, out_ch, "grouped")
            self.groups[gid].reasons.append(reason)
            self.groups[gid].members.append(Member(self.name(static), out_axis, 0, f"{kind}_out"))
            self.ann[out] = _Chan(1, (_Seg(gid, out_ch),))

    def _op_conv2d(self, op):
        self._conv_like(op, transposed=False)

    _op_depthwise_conv2d = _op_conv2d

    def _op_conv2d_transpose(self, op):
        self._conv_like(op, transposed=True)

    _op_depthwise_conv2d_transpose = _op_conv2d_transpose

    def _op_matmul(self, op):
        x, w = self.slot(op, "x"), self.slot(op, "y")
        layer = self.layer_of(self.t.params.get(w)) if w in self.t.params else None
        if x in self.views or not isinstance(layer, self.linear_types) or op.attrs.get("transpose_x") \
                or op.attrs.get("transpose_y") or not op.outputs:
            return self.unsupported(op, "it is not a Paddle Linear layer")
        static, wshape, out = self.t.params[w], self.shape(w), op.outputs[0]
        chan = self.ann.get(x)
        if chan is not None:
            if chan.axis != len(self.shape(x)) - 1:
                self.block(chan, f"linear layer {self.name(static)} reads axis -1, but the channels are on axis "
                                 f"{chan.axis}")
            else:
                self.add_members(chan, static, 0, "linear_in")
        gid = self.new_group(static, wshape[1], "linear")
        self.groups[gid].members.append(Member(self.name(static), 1, 0, "linear_out"))
        self.ann[out] = _Chan(len(self.shape(out)) - 1, (_Seg(gid, wshape[1]),))

    def _op_concat(self, op):
        parts = op.inputs.get("x", [])
        out = op.outputs[0] if op.outputs else None
        if out is None or any(v in self.views for v in parts) or not parts:
            return self.unsupported(op)
        rank = len(self.shape(out))
        axis = int(op.attrs.get("axis", 0))
        axis = axis + rank if axis < 0 else axis
        chans = [self.ann.get(v) for v in parts]
        if all(c is None or c.axis == axis for c in chans):
            segs = []
            for v, c in zip(parts, chans):
                segs.extend(c.segs if c is not None else (_Seg(None, self.shape(v)[axis]),))
            self.ann[out] = _Chan(axis, tuple(segs))
            return
        # Concatenated along another axis: every part must carry the same channels.
        lead = next(c for c in chans if c is not None)
        for v, c in zip(parts, chans):
            if c is None:
                if self.shape(v)[lead.axis] != 1:
                    self.block(lead, f"concat at {op.where} joins the channels with a tensor the pruner cannot "
                                     "follow")
            elif c.axis != lead.axis:
                return self.unsupported(op, "its parts carry channels on different axes")
            else:
                self.merge(lead, c, op)
        self.ann[out] = lead

    def _op_split(self, op):
        x = self._main(op)
        if x not in self.ann or not self._only_main_touched(op):
            return self.unsupported(op)
        chan = self.ann[x]
        rank = len(self.shape(x))
        axis = int(op.attrs.get("axis", 0))
        axis = axis + rank if axis < 0 else axis
        if axis != chan.axis:
            for out in op.outputs:
                self.ann[out] = chan
            return
        # The split sizes are written in the model's code and do not follow a pruned channel count.
        self.block(chan, f"{op.type} at {op.where} splits the channels at sizes fixed in the model code")
        start = 0
        for out in op.outputs:
            stop = start + self.shape(out)[axis]
            segs = []
            for pos, seg in chan.positions():
                lo, hi = max(pos, start), min(pos + seg.count * seg.span, stop)
                if lo < hi:
                    segs.append(_Seg(seg.gid, (hi - lo) // seg.span, seg.span))
            self.ann[out] = _Chan(axis, tuple(segs))
            start = stop

    def _op_transpose(self, op):
        x = self._main(op)
        if not self._only_main_touched(op) or not op.outputs:
            return self.unsupported(op)
        if x in self.views:
            self.views[op.outputs[0]] = self.views[x]
            return
        perm = [int(p) for p in op.attrs.get("perm") or []]
        chan = self.ann[x]
        if chan.axis not in perm:
            return self.unsupported(op)
        self.ann[op.outputs[0]] = _Chan(perm.index(chan.axis), chan.segs)

    def _reshape(self, op):
        x = self._main(op)
        if not self._only_main_touched(op) or not op.outputs:
            return self.unsupported(op)
        out = op.outputs[0]
        if x in self.views:
            self.views[out] = self.views[x]
            return
        chan, src, dst = self.ann[x], self.shape(x), self.shape(out)
        if src is None or dst is None or min(src + dst) < 0:
            return self.unsupported(op, "its shapes are not static")
        before = math.prod(src[:chan.axis])
        # The output axis that starts where the channel axis starts (skipping new size-1 axes).
        for k in range(len(dst)):
            if math.prod(dst[:k]) == before and dst[k] != 1:
                break
        else:
            return self.unsupported(op, "it mixes the channels with other axes")
        if math.prod(dst[:k]) != before:
            return self.unsupported(op, "it mixes the channels with other axes")
        # dst[k] must be the channel axis times a run of the following axes (flattening H and W into it).
        merged, j = src[chan.axis], chan.axis + 1
        while merged < dst[k] and j < len(src):
            merged *= src[j]
            j += 1
        if merged != dst[k]:
            return self.unsupported(op, "it mixes the channels with other axes")
        scale = dst[k] // src[chan.axis]
        self.ann[out] = _Chan(k, tuple(_Seg(s.gid, s.count, s.span * scale) for s in chan.segs))

    def _reduction(self, op):
        x = self._main(op)
        if x not in self.ann or not self._only_main_touched(op) or not op.outputs:
            return self.unsupported(op)
        chan, rank = self.ann[x], len(self.shape(x))
        axes = op.attrs.get("axis", [])
        axes = [axes] if isinstance(axes, int) else list(axes or [])
        axes = sorted(a + rank if a < 0 else a for a in axes) or list(range(rank))
        if chan.axis in axes:
            return self.unsupported(op, "it reduces over the channels")
        keep = bool(op.attrs.get("keepdim", op.attrs.get("keep_dim", False)))
        axis = chan.axis if keep else chan.axis - sum(1 for a in axes if a < chan.axis)
        self.ann[op.outputs[0]] = _Chan(axis, chan.segs)

    def _op_slice(self, op):
        x = self._main(op)
        if x not in self.ann or not self._only_main_touched(op) or not op.outputs:
            return self.unsupported(op)
        chan = self.ann[x]
        axes = [int(a) for a in op.attrs.get("axes", [])]
        if chan.axis in axes:
            return self.unsupported(op, "it slices the channels")
        dropped = [int(a) for a in op.attrs.get("decrease_axis", []) or []]
        self.ann[op.outputs[0]] = _Chan(chan.axis - sum(1 for a in dropped if a < chan.axis), chan.segs)

    _op_strided_slice = _op_slice

    # -- result -----------------------------------------------------------------------------------------------
    def result(self) -> list[Group]:
        # A tensor slice shared by two groups (a shared weight applied twice) ties them together.
        holders = {}
        for gid, pending in self.groups.items():
            if self.find(gid) == gid:
                for m in pending.members:
                    holders.setdefault((m.param, m.axis, m.offset), []).append(gid)
        for gids in holders.values():
            for other in gids[1:]:
                self.union(gids[0], other)
        roots = sorted({self.find(g) for g in self.groups}, key=lambda g: self.groups[g].order)
        ranges = {}
        for root in roots:
            pending = self.groups[root]
            unique = []
            for m in pending.members:
                if m not in unique:
                    unique.append(m)
            pending.members = unique
            for m in unique:
                ranges.setdefault((m.param, m.axis), []).append(
                    (m.offset, m.offset + pending.channels * m.span, root, m.span))
        for spans in ranges.values():
            for i, (start, stop, root, _) in enumerate(spans):
                for start2, stop2, root2, _ in spans[i + 1:]:
                    if root2 != root and start < stop2 and start2 < stop:
                        self.groups[root].reasons.append("shares channels of a tensor with another group")
                        self.groups[root2].reasons.append("shares channels of a tensor with another group")
        name_to_static = {v[0]: k for k, v in self.owner.items()}
        param_shapes = {self.name(static): self.t.shapes.get(vid) for vid, static in self.t.params.items()}
        groups = []
        for index, root in enumerate(roots):
            pending = self.groups[root]
            reasons = list(pending.reasons)
            for m in pending.members:
                static = name_to_static.get(m.param)
                if static in self.misused:
                    reasons.append(self.misused[static])
                if static is None or static not in self.owner:
                    reasons.append(f"parameter {m.param} belongs to no layer of the model")
                shape = param_shapes.get(m.param)
                if not shape or m.axis >= len(shape) or m.offset + pending.channels * m.span > shape[m.axis]:
                    # Never slice on a guess: channel counts that do not add up mean the trace was misread.
                    reasons.append(f"{m.param} does not hold {pending.channels} channels at offset {m.offset} "
                                   f"on axis {m.axis}")
            groups.append(Group(pending.leader, index, pending.channels, pending.type, pending.members,
                                not reasons, reasons[0] if reasons else None))
        for g in groups:
            g.peers = groups
        return groups


def channel_groups(model, input_shape: Sequence[int]) -> list[Group]:
    """All channel groups of ``model`` (prunable or not), in execution order of their leading layer.

    ``input_shape`` is [C, H, W] or [N, C, H, W]. Groups of one call stay consistent when several of them are
    pruned one after another with :func:`slimrecipe.pruning.surgery.prune_group`.
    """
    propagation = _Propagation(trace(model, input_shape), model)
    propagation.run()
    return propagation.result()


def count_flops(model, input_shape: Sequence[int]) -> float:
    """Multiply-adds of the convolutions, transposed convolutions and linear layers, in eval mode, batch 1."""
    p = _paddle()
    shape = [int(d) for d in input_shape]
    shape = [1] + shape if len(shape) == 3 else shape
    total = [0.0]

    def conv_hook(layer, inputs, output):
        w = layer.weight.shape
        if isinstance(layer, p.nn.Conv2DTranspose) or type(layer).__name__.endswith("Conv2DTranspose"):
            # Every input pixel meets every kernel tap of its group's output channels.
            total[0] += math.prod(inputs[0].shape) * w[1] * w[2] * w[3]
        else:
            total[0] += math.prod(output.shape) * w[1] * w[2] * w[3]

    def linear_hook(layer, inputs, output):
        total[0] += math.prod(output.shape) * layer.weight.shape[0]

    handles = []
    for layer in model.sublayers(include_self=True):
        # QAT wraps layers (QuantedConv2D, QuantedLinear, ...) without subclassing them: count those by name
        kind = type(layer).__name__.replace("Quanted", "")
        if isinstance(layer, (p.nn.Conv2D, p.nn.Conv2DTranspose)) or kind in ("Conv2D", "Conv2DTranspose"):
            handles.append(layer.register_forward_post_hook(conv_hook))
        elif isinstance(layer, p.nn.Linear) or kind == "Linear":
            handles.append(layer.register_forward_post_hook(linear_hook))
    modes = _modes(model)
    model.eval()
    try:
        with p.no_grad():
            model(p.zeros(shape, "float32"))
    finally:
        for h in handles:
            h.remove()
        _restore_modes(modes)
    return total[0]
