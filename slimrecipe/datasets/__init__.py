"""Dataset plugins. Each returns a :class:`DataBundle`; none imports Paddle at module import time."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Sequence


@dataclass
class DataBundle:
    """What a dataset plugin hands to the run.

    ``train`` and ``val`` are sequences (``__len__`` + ``__getitem__``) of tuples of numpy arrays; the first
    element of every tuple is the model input (float32, CHW). The rest is whatever the model's loss and the
    metric need (a class id; DB's shrink/threshold maps; polygons...).
    ``input_shape`` is one input's [C, H, W], used for FLOPs and export.
    ``manifest`` describes the data exactly enough to hash it (sizes, seeds, file hashes).
    """

    train: Sequence[Any]
    val: Sequence[Any]
    input_shape: list[int]
    manifest: dict
    num_classes: int | None = None
    extra: dict = field(default_factory=dict)
    collate_fn: Any = None  # optional, for samples that numpy stacking cannot batch (polygons)
