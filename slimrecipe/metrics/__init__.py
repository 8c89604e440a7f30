"""Metric plugins: ``fn(params: dict) -> Metric``; a Metric evaluates a model on a dataset split."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable


@dataclass
class Metric:
    name: str
    # evaluate(model, dataset, batch_size, collate_fn) -> float, model already in eval mode
    evaluate: Callable[..., float]
    higher_is_better: bool = True
    extra: Any = None
