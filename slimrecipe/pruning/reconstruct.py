"""Reconstruction after pruning: refit each layer of the pruned model so that it computes what the unpruned model
computed there, by least squares on features of a few training batches (as ThiNet and He et al.'s Channel
Pruning do).

Removing a channel takes away everything it contributed to the layers that read it; BatchNorm networks such as
PPLCNetV3 lose more than the channel's small weights suggest, and the errors compound from layer to layer. Going
from the input on, every convolution (one group: plain, not depthwise) and linear layer of the pruned model is
refitted on its *pruned* inputs against the *unpruned* model's outputs at the same positions, so each layer also
absorbs the error of the layers before it. The fit is ridge regression pulled towards the layer's current
weights; the intercept goes to the layer's bias, or to the running mean of the BatchNorm that reads its output.
Only values change, never shapes: the model still fits its plan.
"""

from __future__ import annotations

from typing import Callable, Iterable

import numpy as np

from slimrecipe.paddle_env import paddle as _paddle

from .graph import Group


def _conv_geometry(layer):
    """(kernel, stride, padding, dilation) as pairs, or None when the layer is not a plain zero-padded conv."""
    def pair(v):
        v = list(v) if isinstance(v, (list, tuple)) else [v, v]
        return [int(x) for x in v] if len(v) == 2 else None

    pad = layer._padding
    if isinstance(pad, str) or getattr(layer, "_padding_mode", "zeros") != "zeros":
        return None
    if isinstance(pad, (list, tuple)) and len(pad) == 4:
        if pad[0] != pad[1] or pad[2] != pad[3]:
            return None
        pad = [pad[0], pad[2]]
    geometry = [pair(v) for v in (layer._kernel_size, layer._stride, pad, layer._dilation)]
    return None if any(g is None for g in geometry) else geometry


def _blockwise_kernel(layer):
    """(kh, kw) of a transposed conv whose kernel equals its stride (no padding, dilation or output padding), where
    every output pixel comes from one input pixel through one kernel tap; None for any other transposed conv."""
    geometry = _conv_geometry(layer)
    if geometry is None or layer.output_padding not in (0, None, [0, 0]):
        return None
    kernel, stride, pad, dilation = geometry
    return kernel if stride == kernel and pad == [0, 0] and dilation == [1, 1] else None


def fittable_layers(model) -> list[tuple[str, object]]:
    """The layers a reconstruction refits: plain (one group, NCHW, zero-padded) convolutions, blockwise transposed
    convolutions (kernel = stride, one group, NCHW) and linear layers."""
    p = _paddle()
    out = []
    for name, layer in model.named_sublayers():
        if isinstance(layer, (p.nn.Conv2D, p.nn.Conv2DTranspose)):
            plain = isinstance(layer, p.nn.Conv2D)
            geometry = _conv_geometry(layer) if plain else _blockwise_kernel(layer)
            if layer._groups == 1 and layer._data_format == "NCHW" and geometry is not None:
                out.append((name, layer))
        elif isinstance(layer, p.nn.Linear):
            out.append((name, layer))
    return out


def removed_outputs(groups: Iterable[Group], removed: dict[str, list[int]]) -> dict[str, list[int]]:
    """Structured weight name -> the output positions it loses, for every weight whose outputs lose channels.

    ``groups`` are the *unpruned* model's groups (offsets as traced), ``removed`` the applied plan's removed
    channels per group name. A conv's outputs are axis 0 of its weight, a transposed conv's and a linear layer's
    axis 1.
    """
    lost: dict[str, set] = {}
    for g in groups:
        cut = removed.get(g.name) or []
        if not cut:
            continue
        for m in g.members:
            if m.role in ("conv_out", "transpose_out", "linear_out", "depthwise"):
                lost.setdefault(m.param, set()).update(m.indices(cut))
    return {name: sorted(positions) for name, positions in lost.items()}


def _patches(x: np.ndarray, geometry, positions: np.ndarray) -> np.ndarray:
    """[len(positions), C*kh*kw]: the conv's receptive field at flat output positions (n, oh, ow)."""
    (kh, kw), (sh, sw), (ph, pw), (dh, dw) = geometry
    n, c, h, w = x.shape
    oh = (h + 2 * ph - dh * (kh - 1) - 1) // sh + 1
    ow = (w + 2 * pw - dw * (kw - 1) - 1) // sw + 1
    b, rest = np.divmod(positions, oh * ow)
    r, s = np.divmod(rest, ow)
    padded = np.pad(x, ((0, 0), (0, 0), (ph, ph), (pw, pw)))
    out = np.empty((len(positions), c, kh, kw), dtype=np.float64)
    for i in range(kh):
        for j in range(kw):
            out[:, :, i, j] = padded[b, :, r * sh + i * dh, s * sw + j * dw]
    return out.reshape(len(positions), -1)


def _blocks(x: np.ndarray, kernel, positions: np.ndarray) -> np.ndarray:
    """[len(positions), C*kh*kw]: what a blockwise transposed conv multiplies at flat output positions (n, oh, ow):
    the input pixel (oh // kh, ow // kw) at the kernel tap (oh % kh, ow % kw), zeros at the other taps."""
    kh, kw = kernel
    n, c, h, w = x.shape
    b, rest = np.divmod(positions, h * kh * w * kw)
    r, s = np.divmod(rest, w * kw)
    out = np.zeros((len(positions), c, kh, kw), dtype=np.float64)
    rows = np.arange(len(positions))
    out[rows, :, r % kh, s % kw] = x[b, :, r // kh, s // kw]
    return out.reshape(len(positions), -1)


def _run_hooked(model, batch, handles) -> None:
    """One forward pass of ``model`` on ``batch`` without gradients; the hooks ``handles`` are removed after it."""
    try:
        with _paddle().no_grad():
            model(batch)
    finally:
        for h in handles:
            h.remove()


def _followers(model, batch) -> dict[int, object]:
    """id(conv or linear layer) -> the BatchNorm layer that reads its output directly, from one forward pass.

    Outputs are matched by identity, so each is held until the pass ends (a freed tensor's id can be reused):
    ``batch`` should be small.
    """
    p = _paddle()
    produced, follows = {}, {}
    norms = [layer for layer in model.sublayers() if isinstance(layer, p.nn.layer.norm._BatchNormBase)]

    def post(layer, inputs, output):
        produced[id(output)] = (layer, output)

    def pre(layer, inputs):
        src, out = produced.get(id(inputs[0]), (None, None))
        if src is not None and out is inputs[0]:
            follows[id(src)] = layer

    handles = [layer.register_forward_post_hook(post) for _, layer in fittable_layers(model)]
    handles += [layer.register_forward_pre_hook(pre) for layer in norms]
    _run_hooked(model, batch, handles)
    return follows


def _teacher_outputs(teacher, names: set, batch, samples: int, seed: int) -> dict:
    """Per layer: ``samples`` flat output positions (rows n, h, w) drawn at random, and the outputs there."""
    rng = np.random.default_rng(seed)
    drawn = {}

    def hook_for(name):
        def hook(layer, inputs, output):
            if name in drawn:
                return  # a layer called twice: its first call is the one refitted
            out = output.numpy()
            flat = out.transpose(0, 2, 3, 1).reshape(-1, out.shape[1]) if out.ndim == 4 \
                else out.reshape(-1, out.shape[-1])
            pos = np.sort(rng.choice(len(flat), size=min(samples, len(flat)), replace=False))
            drawn[name] = (pos, flat[pos].astype(np.float64))
        return hook

    _run_hooked(teacher, batch, [layer.register_forward_post_hook(hook_for(n))
                                 for n, layer in teacher.named_sublayers() if n in names])
    return drawn


def _ridge(features: np.ndarray, target: np.ndarray, prior: np.ndarray, ridge: float, intercept: bool):
    """argmin |[F 1] [W; b] - Y|^2 + lam |W - prior|^2, lam = ridge * mean diagonal of F^T F. Returns (W, b)."""
    if intercept:
        features = np.concatenate([features, np.ones((len(features), 1))], axis=1)
        prior = np.concatenate([prior, np.zeros((1, prior.shape[1]))])
    gram = features.T @ features
    lam = ridge * max(float(np.trace(gram)) / len(gram), 1e-12)
    penalty = np.full(len(gram), lam)
    if intercept:
        penalty[-1] = 0.0  # the intercept is free
    gram[np.diag_indices_from(gram)] += penalty
    solution = np.linalg.solve(gram, features.T @ target + penalty[:, None] * prior)
    return (solution[:-1], solution[-1]) if intercept else (solution, None)


def reconstruct(model, teacher, groups: list[Group], removed: dict[str, list[int]], batches: list, *,
                samples: int = 8192, ridge: float = 1e-2, seed: int = 0,
                progress: Callable | None = None) -> dict:
    """Refit ``model`` (pruned from ``teacher`` by ``removed``, see :func:`removed_outputs`) layer by layer, in place.

    ``batches`` are model inputs (tensors), run as one batch; ``groups`` are the teacher's channel groups. One
    teacher pass records each layer's outputs at ``samples`` random positions; then one pass of ``model`` refits
    every layer just before it runs, on the input it receives from the layers refitted before it. Both models are
    used in eval mode. Returns ``{"layers": refitted, "error_before": ..., "error_after": ...}``: the relative
    squared error of those layers' outputs against the teacher's, summed over layers, before and after the fit.
    """
    p = _paddle()
    modes = (model.training, teacher.training)
    model.eval()
    teacher.eval()
    lost = removed_outputs(groups, removed)
    layers = fittable_layers(model)
    batch = p.concat([b if hasattr(b, "numpy") else p.to_tensor(b) for b in batches]) if len(batches) > 1 \
        else batches[0]
    follows = _followers(model, batch[:1])
    targets = _teacher_outputs(teacher, {n for n, _ in layers}, batch, samples, seed)
    totals = {"layers": 0, "error_before": 0.0, "error_after": 0.0}
    done: set = set()

    def refit(name, layer, x):
        pos, target = targets[name]
        gone = lost.get(f"{name}.weight")
        if gone:
            target = np.delete(target, gone, axis=1)
        is_conv = isinstance(layer, p.nn.Conv2D)
        transposed = isinstance(layer, p.nn.Conv2DTranspose)
        weight = layer.weight.numpy().astype(np.float64)
        if target.shape[1] != weight.shape[0 if is_conv else 1]:
            raise ValueError(f"{name}: the teacher's {target.shape[1]} outputs do not map onto the pruned layer's "
                             f"weight {list(weight.shape)}")
        x = x.numpy()
        if is_conv:
            features = _patches(x, _conv_geometry(layer), pos)
            prior = weight.reshape(weight.shape[0], -1).T  # [C*kh*kw, out]
        elif transposed:
            features = _blocks(x, _blockwise_kernel(layer), pos)
            prior = weight.transpose(0, 2, 3, 1).reshape(-1, weight.shape[1])  # [in, out, kh, kw] -> [in*kh*kw, out]
        else:
            features = x.reshape(-1, x.shape[-1])[pos].astype(np.float64)
            prior = weight  # [in, out]
        bias = layer.bias.numpy().astype(np.float64) if layer.bias is not None else None
        current = features @ prior + (bias if bias is not None else 0.0)
        scale = max(float((target ** 2).sum()), 1e-12)
        before = float(((current - target) ** 2).sum()) / scale
        if before < 1e-10:
            return  # reads what the teacher's layer reads (the first layer): nothing to refit
        norm = follows.get(id(layer))
        w, b = _ridge(features, target, prior, ridge, intercept=bias is not None or norm is not None)
        fitted = features @ w + (b if b is not None else 0.0)
        totals["layers"] += 1
        totals["error_before"] += before
        totals["error_after"] += float(((fitted - target) ** 2).sum()) / scale
        if is_conv:
            w = w.T.reshape(weight.shape)
        elif transposed:
            w = w.reshape(weight.shape[0], *weight.shape[2:], weight.shape[1]).transpose(0, 3, 1, 2)
        layer.weight.set_value(w.astype(np.float32))
        if b is not None and bias is not None:
            layer.bias.set_value(b.astype(np.float32))
        elif b is not None:
            # BN(y) reads (y - mean): an output that lacks the intercept b is matched by a mean lowered by b
            norm._mean.set_value((norm._mean.numpy() - b).astype(np.float32))

    def hook_for(name):
        def hook(layer, inputs):
            if name in targets and name not in done:
                done.add(name)
                refit(name, layer, inputs[0])
                if progress:
                    progress(len(done), len(targets), name)
        return hook

    try:
        _run_hooked(model, batch, [layer.register_forward_pre_hook(hook_for(n)) for n, layer in layers])
    finally:
        model.train() if modes[0] else model.eval()
        teacher.train() if modes[1] else teacher.eval()
    return totals
