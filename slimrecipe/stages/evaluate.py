"""`evaluate`: the current model's metric, FLOPs and parameter count (the baseline, when run first)."""

from __future__ import annotations

from ..registry import register

SCHEMA = {
    "type": "object",
    "additionalProperties": False,
    "properties": {"batch_size": {"type": "integer", "minimum": 1, "maximum": 4096, "default": 128}},
}


@register("stage", "evaluate", schema=SCHEMA)
def evaluate(state, params: dict) -> dict:
    """Measure the current model on the validation split."""
    figures = state.measure(batch_size=int(params["batch_size"]))
    print(f"  {state.metric.name} {figures['metric']:.4f}  FLOPs {figures['flops']:.4g}  params {figures['params']:,}")
    return {**figures, "metric_name": state.metric.name, "val_samples": len(state.data.val)}
