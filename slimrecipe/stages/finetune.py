"""`finetune`: train the pruned model back to accuracy, optionally distilling from the unpruned baseline."""

from __future__ import annotations

from ..registry import register
from ._training import DISTILL_SCHEMA, fit, loop_schema, save_weights

SCHEMA = loop_schema({"distill": DISTILL_SCHEMA})


@register("stage", "finetune", schema=SCHEMA)
def finetune(state, params: dict) -> dict:
    """Finetune the current model; checkpoints let an interrupted finetune resume."""
    model = state.model
    distill = params["distill"]
    teacher = state.baseline_model() if distill["enabled"] else None
    before = state.evaluate(model)
    fit_result = fit(state, model, params, out_dir=state.stage_dir / "checkpoint", desc="finetune",
                     teacher=teacher, distill=distill)
    weights = save_weights(model, state.stage_dir / "model.pdparams")
    figures = state.measure(model)
    print(f"  {state.metric.name}: {before:.4f} before finetune -> {figures['metric']:.4f} after")
    return {**figures, "metric_before": before, "fit": fit_result, "checkpoint": state.set_model(model, weights)}
