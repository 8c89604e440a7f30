"""`top_k_accuracy`: share of validation samples whose label is among the model's k best classes."""

from __future__ import annotations

import numpy as np

from ..registry import register
from . import Metric


@register(
    "metric",
    "top_k_accuracy",
    schema={
        "type": "object",
        "additionalProperties": False,
        "properties": {"k": {"type": "integer", "minimum": 1, "description": "top-k (1: plain accuracy)"}},
    },
)
def top_k_accuracy(params: dict) -> Metric:
    """Top-k accuracy of a classifier."""
    k = params.get("k", 1)

    def evaluate(model, dataset, batch_size, collate_fn=None) -> float:
        from ..batching import iterate_batches

        hits = total = 0
        for batch in iterate_batches(dataset, batch_size, collate_fn=collate_fn):
            logits = model(batch[0]).numpy()
            labels = batch[1].numpy().reshape(-1)
            topk = np.argsort(-logits, axis=1)[:, :k]
            hits += int((topk == labels[:, None]).any(axis=1).sum())
            total += len(labels)
        return hits / max(total, 1)

    return Metric(f"top{k}_accuracy", evaluate)
