"""Channel surgery: remove a group's channels from every member tensor and shrink the layers that own them.

The result is a plain, smaller model (no masks, no backup buffers): its ``state_dict`` loads into a fresh model
on which the same groups were pruned, and it saves with ``paddle.jit.save``.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from slimrecipe.paddle_env import paddle as _paddle

from .graph import Group


def _place_of(tensor):
    p = _paddle()
    place = tensor.value().get_tensor()._place()
    if place.is_gpu_place():
        return p.CUDAPlace(place.gpu_device_id())
    if place.is_cuda_pinned_place():
        return p.CUDAPinnedPlace()
    return p.CPUPlace()


def _write(param, array: np.ndarray) -> None:
    # set_value() refuses a new shape; writing the underlying tensor keeps the Parameter object (its name,
    # trainability and attributes) and changes its shape. Works on Paddle 2.6 and 3.3.
    param.value().get_tensor().set(np.ascontiguousarray(array), _place_of(param))
    if getattr(param, "grad", None) is not None:
        param.clear_gradient(False)  # a gradient of the old shape would break the next optimiser step


def _owners(model) -> dict:
    """Structured parameter name -> (layer, attribute key)."""
    owners = {}
    for lname, layer in model.named_sublayers(include_self=True):
        for key, param in layer._parameters.items():
            if param is not None:
                owners.setdefault(f"{lname}.{key}" if lname else key, (layer, key))
    return owners


# One small function per layer kind: make the layer's bookkeeping agree with its new weight shapes.
def _resize_conv(layer, depthwise: bool) -> None:
    shape = layer.weight.shape
    transposed = isinstance(layer, _paddle().nn.Conv2DTranspose)
    if depthwise:
        layer._in_channels = layer._out_channels = layer._groups = int(shape[0])
    elif transposed:
        layer._in_channels, layer._out_channels = int(shape[0]), int(shape[1]) * layer._groups
    else:
        layer._out_channels, layer._in_channels = int(shape[0]), int(shape[1]) * layer._groups


def _resize_norm(layer) -> None:
    layer._num_features = int(layer.weight.shape[0] if layer.weight is not None else layer._mean.shape[0])


def _resize_layer(layer, roles: set) -> None:
    p = _paddle()
    if isinstance(layer, p.nn.layer.conv._ConvNd):
        _resize_conv(layer, "depthwise" in roles)
    elif hasattr(layer, "_num_features") and "bn" in roles:
        _resize_norm(layer)
    # Linear layers and plain parameters keep no channel counts besides their tensors.


def prune_group(model, group: Group, remove: Sequence[int]) -> None:
    """Remove channels ``remove`` (indices in [0, group.channels)) of ``group`` from ``model``, in place.

    Groups from the same :func:`channel_groups` call can be pruned one after another: the offsets of the other
    groups' members in shared tensors (a conv fed by a concat) are shifted here.
    """
    remove = sorted({int(i) for i in remove})
    if not group.prunable:
        raise ValueError(f"group {group.name} is not prunable: {group.reason}")
    if remove and (remove[0] < 0 or remove[-1] >= group.channels):
        raise ValueError(f"channel indices for group {group.name} must lie in [0, {group.channels}), got {remove}")
    if len(remove) >= group.channels:
        raise ValueError(f"cannot remove all {group.channels} channels of group {group.name}")
    if (group.channels - len(remove)) % group.divisor:
        raise ValueError(f"group {group.name} must keep a multiple of {group.divisor} channels")
    if not remove:
        return
    owners = _owners(model)
    # All positions to delete per tensor axis (one tensor can hold the group twice, e.g. concat([x, x])).
    cuts: dict = {}
    for m in group.members:
        if m.param not in owners:
            raise ValueError(f"group {group.name} names parameter {m.param}, which the model does not have")
        cuts.setdefault((m.param, m.axis), set()).update(m.indices(remove))
    roles: dict = {}
    for (name, axis), positions in cuts.items():
        layer, key = owners[name]
        param = layer._parameters[key]
        _write(param, np.delete(param.numpy(), sorted(positions), axis=axis))
        roles.setdefault(id(layer), (layer, set()))[1].update(m.role for m in group.members if m.param == name)
    for layer, layer_roles in roles.values():
        _resize_layer(layer, layer_roles)
    for peer in group.peers:
        if peer is group:
            continue
        for m in peer.members:
            positions = cuts.get((m.param, m.axis))
            if positions:
                m.offset -= sum(1 for q in positions if q < m.offset)
    group.channels -= len(remove)
