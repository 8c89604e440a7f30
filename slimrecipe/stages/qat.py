"""`qat`: quantization-aware training (PACT activations by default) of the current (pruned, finetuned) model."""

from __future__ import annotations

import numpy as np

from ..batching import stack_samples
from ..qat import QAT_PARAMS_SCHEMA
from ..registry import register
from ._training import DISTILL_SCHEMA, fit, loop_schema, save_weights

SCHEMA = loop_schema({"config": QAT_PARAMS_SCHEMA, "distill": DISTILL_SCHEMA})
FOLD_CHECK_IMAGES = 4


@register("stage", "qat", schema=SCHEMA)
def qat(state, params: dict) -> dict:
    """Insert fake-quant layers (PACT on activations unless `pact: false`), train, keep the model for export."""
    from ..qat import make_quanter, quantize, quantized_layers

    model = state.model
    config = params.get("config") or {}
    float_metric = state.evaluate(model)
    quanter = make_quanter(config)
    # a few validation images prove that conv-BN folding (fuse_conv_bn) kept the model's outputs
    data = state.data
    n = min(FOLD_CHECK_IMAGES, len(data.val))
    example = np.asarray((data.collate_fn or stack_samples)([data.val[i] for i in range(n)])[0], dtype=np.float32)
    quantize(model, quanter, example=example)
    print(f"  quantized {len(quantized_layers(model))} layers "
          f"({', '.join(quanter.config['quantizable_layer_type'])}; pact={quanter.config['pact']})")
    distill = params.get("distill") or {}
    teacher = state.baseline_model() if distill.get("enabled") else None
    fit_result = fit(state, model, params, out_dir=state.stage_dir / "checkpoint", desc="qat",
                     teacher=teacher, distill=distill)
    weights = save_weights(model, state.stage_dir / "model.pdparams")
    figures = state.measure(model)
    print(f"  {state.metric.name}: {float_metric:.4f} float -> {figures['metric']:.4f} after QAT")
    return {**figures, "metric_float": float_metric, "fit": fit_result, "config": config,
            "checkpoint": state.set_model(model, weights, quanter=quanter, quant_config=config)}
