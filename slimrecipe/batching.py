"""Batches of numpy samples as Paddle tensors (no DataLoader workers: they cost more than they save on 2 cores)."""

from __future__ import annotations

from typing import Iterator, Sequence

import numpy as np

from .paddle_env import paddle


def stack_samples(samples: list[tuple]) -> list:
    return [np.stack([s[i] for s in samples]) for i in range(len(samples[0]))]


def iterate_batches(dataset: Sequence, batch_size: int, *, shuffle: bool = False, seed: int = 0,
                    collate_fn=None, drop_last: bool = False, indices=None) -> Iterator[list]:
    """Yield batches; numpy arrays become tensors, anything a collate_fn leaves as a list stays a list."""
    p = paddle()
    order = np.arange(len(dataset)) if indices is None else np.asarray(indices)
    if shuffle:
        order = np.random.default_rng(seed).permutation(order)
    collate = collate_fn or stack_samples
    for start in range(0, len(order), batch_size):
        chunk = order[start:start + batch_size]
        if drop_last and len(chunk) < batch_size:
            break
        batch = collate([dataset[int(i)] for i in chunk])
        yield [p.to_tensor(b) if isinstance(b, np.ndarray) else b for b in batch]


class Subset:
    """The first ``n`` samples of a dataset (a fixed, reproducible subset for sensitivity analysis)."""

    def __init__(self, dataset: Sequence, n: int | None):
        self.dataset, self.n = dataset, len(dataset) if n is None else min(n, len(dataset))

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i):
        if i >= self.n:
            raise IndexError(i)
        return self.dataset[i]
