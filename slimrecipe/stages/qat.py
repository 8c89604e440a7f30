"""`qat`: PACT quantization-aware training of the current (pruned, finetuned) model."""

from __future__ import annotations

from ..registry import register
from ._training import DISTILL_SCHEMA, fit, loop_schema, save_weights
from ..qat import QAT_PARAMS_SCHEMA

SCHEMA = loop_schema({"config": QAT_PARAMS_SCHEMA, "distill": DISTILL_SCHEMA})


@register("stage", "qat", schema=SCHEMA)
def qat(state, params: dict) -> dict:
    """Insert fake-quant ops (PACT on activations), train, keep the quantized model for export."""
    from ..qat import make_quanter, quantize

    model = state.model
    config = params.get("config") or {}
    float_metric = state.evaluate(model)
    quanter = make_quanter(config)
    quantize(model, quanter)
    distill = params.get("distill") or {}
    teacher = state.baseline_model() if distill.get("enabled") else None
    fit_result = fit(state, model, params, out_dir=state.stage_dir / "checkpoint", desc="qat",
                     teacher=teacher, distill=distill)
    weights = save_weights(model, state.stage_dir / "model.pdparams")
    figures = state.measure(model)
    print(f"  {state.metric.name}: {float_metric:.4f} float -> {figures['metric']:.4f} after QAT")
    return {**figures, "metric_float": float_metric, "fit": fit_result, "config": config,
            "checkpoint": state.set_model(model, weights, quanter=quanter, quant_config=config)}
