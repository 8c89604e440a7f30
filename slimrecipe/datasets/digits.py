"""`digits`: scikit-learn's handwritten digits (1,797 real 8x8 scans, shipped with the package), upscaled."""

from __future__ import annotations

import numpy as np

from ..registry import register
from . import DataBundle


@register(
    "dataset",
    "digits",
    schema={
        "type": "object",
        "additionalProperties": False,
        "properties": {
            "size": {"type": "integer", "minimum": 8, "maximum": 256,
                     "description": "side of the upscaled image (bilinear); the scans are 8x8"},
            "channels": {"enum": [1, 3], "description": "3 repeats the grey channel, as ImageNet models expect"},
            "val_fraction": {"type": "number", "exclusiveMinimum": 0, "exclusiveMaximum": 1,
                             "description": "share of each class held out for validation"},
            "split_seed": {"type": "integer", "minimum": 0, "description": "seed of the fixed train/val split"},
            "limit": {"type": ["integer", "null"], "minimum": 20,
                      "description": "use only the first N images (tests, smoke runs)"},
        },
    },
)
def digits(params: dict, ctx) -> DataBundle:
    """scikit-learn's digits, stratified fixed split, upscaled and standardised."""
    from sklearn.datasets import load_digits

    size = params.get("size", 32)
    channels = params.get("channels", 3)
    val_fraction = params.get("val_fraction", 0.2)
    split_seed = params.get("split_seed", 0)
    raw = load_digits()
    x, y = raw.images.astype(np.float32) / 16.0, raw.target.astype(np.int64)
    if params.get("limit"):
        x, y = x[: params["limit"]], y[: params["limit"]]

    rng = np.random.default_rng(split_seed)
    val_idx = []
    for c in np.unique(y):  # stratified: every class in both splits
        idx = np.flatnonzero(y == c)
        rng.shuffle(idx)
        val_idx.extend(idx[: max(1, round(len(idx) * val_fraction))])
    val_mask = np.zeros(len(y), bool)
    val_mask[val_idx] = True

    images = _upscale(x, size)
    images = (images - 0.5) / 0.5
    images = np.repeat(images[:, None], channels, axis=1).astype(np.float32)
    train = _ArrayDataset(images[~val_mask], y[~val_mask])
    val = _ArrayDataset(images[val_mask], y[val_mask])
    manifest = {
        "source": "sklearn.datasets.load_digits",
        "params": {"size": size, "channels": channels, "val_fraction": val_fraction, "split_seed": split_seed,
                   "limit": params.get("limit")},
        "train": len(train), "val": len(val),
        "val_indices_sha": __import__("hashlib").sha256(np.flatnonzero(val_mask).tobytes()).hexdigest(),
    }
    return DataBundle(train, val, [channels, size, size], manifest, num_classes=10)


def _upscale(x: np.ndarray, size: int) -> np.ndarray:
    """Bilinear resize of a stack of square images (numpy only: no Paddle needed to build data)."""
    n, h, _ = x.shape
    coords = (np.arange(size) + 0.5) * h / size - 0.5
    lo = np.clip(np.floor(coords).astype(int), 0, h - 1)
    hi = np.clip(lo + 1, 0, h - 1)
    w = np.clip(coords - lo, 0, 1).astype(np.float32)
    rows = x[:, lo, :] * (1 - w)[None, :, None] + x[:, hi, :] * w[None, :, None]
    return rows[:, :, lo] * (1 - w)[None, None, :] + rows[:, :, hi] * w[None, None, :]


class _ArrayDataset:
    def __init__(self, x: np.ndarray, y: np.ndarray):
        self.x, self.y = x, y

    def __len__(self) -> int:
        return len(self.y)

    def __getitem__(self, i):
        return self.x[i], self.y[i]
