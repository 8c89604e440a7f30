"""How much each channel of a group matters: magnitude (L1, L2), FPGM and first-order Taylor criteria.

A group's score is the sum over its member tensors, each normalised by its mean score first, so that a large
tensor (a 3x3 conv) does not drown a small one (a BN scale). Running statistics (BN mean and variance) are not
weights and are left out.
"""

from __future__ import annotations

from typing import Callable, Iterable

import numpy as np

from .graph import Group, Member

CRITERIA = ("l1_norm", "l2_norm", "fpgm", "taylor")


def _channel_rows(array: np.ndarray, member: Member, channels: int) -> np.ndarray:
    """[channels, everything else]: the slice of ``array`` each group channel owns."""
    moved = np.moveaxis(array, member.axis, 0)
    block = moved[member.offset: member.offset + channels * member.span]
    return block.reshape(channels, -1).astype(np.float64)


def _member_score(rows: np.ndarray, criterion: str) -> np.ndarray:
    if criterion == "l1_norm" or criterion == "taylor":
        return np.abs(rows).sum(axis=1)
    if criterion == "l2_norm":
        return np.sqrt((rows ** 2).sum(axis=1))
    if criterion == "fpgm":
        # Filters near the geometric median of the others are the most replaceable: small total distance.
        # |a - b|^2 = |a|^2 + |b|^2 - 2ab: a [C, C] Gram matrix instead of a [C, C, D] difference tensor.
        squares = (rows ** 2).sum(axis=1)
        gram = rows @ rows.T
        distances = np.sqrt(np.maximum(squares[:, None] + squares[None, :] - 2 * gram, 0.0))
        return distances.sum(axis=1)
    raise ValueError(f"unknown criterion {criterion!r}; choose one of {list(CRITERIA)}")


def _weights(model) -> dict:
    return {name: param for name, param in model.named_parameters() if not param.stop_gradient}


def group_importance(model, group: Group, criterion: str, taylor: dict | None = None) -> np.ndarray:
    """Score of each of the group's ``channels`` (higher = keep). ``taylor`` comes from :func:`taylor_scores`."""
    if criterion not in CRITERIA:
        raise ValueError(f"unknown criterion {criterion!r}; choose one of {list(CRITERIA)}")
    if criterion == "taylor" and taylor is None:
        raise ValueError("the taylor criterion needs the scores of taylor_scores(model, batches, loss_fn)")
    weights = _weights(model)
    total = np.zeros(group.channels)
    for m in group.members:
        if m.param not in weights:
            continue  # BN running statistics and frozen tensors
        if criterion == "taylor":
            if m.param not in taylor:
                continue
            source = np.asarray(taylor[m.param])
        else:
            source = weights[m.param].numpy()
        score = _member_score(_channel_rows(source, m, group.channels), criterion)
        mean = score.mean()
        if mean > 0:
            total += score / mean
    return total


def taylor_scores(model, batches: Iterable, loss_fn: Callable) -> dict[str, np.ndarray]:
    """First-order Taylor importance |w * dL/dw| per trainable parameter, summed over ``batches``.

    ``loss_fn(model, batch)`` returns a scalar loss tensor; one backward pass per batch, no optimiser step.
    """
    weights = _weights(model)
    scores = {name: np.zeros(param.shape, dtype=np.float64) for name, param in weights.items()}
    for param in weights.values():
        param.clear_gradient(False)
    for batch in batches:
        loss = loss_fn(model, batch)
        loss.backward()
        for name, param in weights.items():
            if param.grad is not None:
                scores[name] += np.abs(param.numpy().astype(np.float64) * param.grad.numpy())
        for param in weights.values():
            param.clear_gradient(False)
    return scores


def channels_to_remove(importance, n_remove: int) -> list[int]:
    """The ``n_remove`` least important channels, as sorted indices (ties: the lower index goes first)."""
    order = np.argsort(np.asarray(importance), kind="stable")
    return sorted(int(i) for i in order[:max(0, int(n_remove))])
