"""`export`: every target of `export.targets`, reloaded and checked against the in-memory model, then timed
interleaved with the same export of the unpruned baseline."""

from __future__ import annotations

import numpy as np

from .. import registry
from ..batching import stack_samples
from ..registry import register

SCHEMA = {
    "type": "object",
    "additionalProperties": False,
    "required": ["targets"],
    "properties": {
        "targets": {"type": "object", "description": "exporter plugin -> its parameters"},
        "sample_batch": {"type": "integer", "minimum": 1, "maximum": 256, "default": 8,
                         "description": "validation images used for the parity check"},
        "dynamic_hw": {"type": "boolean", "default": False, "description": "export with free height and width (detectors)"},
        "compare_baseline": {"type": "boolean", "default": True, "description": "also export the unpruned baseline and time both"},
        "float_reference": {"type": "boolean", "default": True,
                            "description": "when the model is quantized, also export and time the float pruned "
                                           "model, so pruning's and quantization's effects show apart"},
        "latency": {
            "type": "object",
            "additionalProperties": False,
            "properties": {
                "repeats": {"type": "integer", "minimum": 1, "maximum": 10000, "default": 50},
                "warmup": {"type": "integer", "minimum": 0, "maximum": 1000, "default": 5},
                "batch_size": {"type": "integer", "minimum": 1, "maximum": 256, "default": 1},
            },
        },
    },
}


@register("stage", "export", schema=SCHEMA)
def export(state, params: dict) -> dict:
    """Export, reload, check parity, measure size and CPU latency against the baseline's export."""
    from ..exporters import ExportContext, interleaved_latency

    model = state.model
    model.eval()
    data = state.data
    n = min(params["sample_batch"], len(data.val))
    collate = data.collate_fn or stack_samples
    sample = np.asarray(collate([data.val[i] for i in range(n)])[0], dtype=np.float32)
    lat = params["latency"]
    lat_x = sample[: lat["batch_size"]]
    baseline = state.baseline_model() if params["compare_baseline"] else None
    pruned_float = None
    if params["float_reference"] and state.quanter:
        pruned_float = _float_pruned_model(state)
    elif params["float_reference"] and state.ptq and state.plan:
        pruned_float = model  # ptq leaves the weights alone: the float pruned model is the current one
    out = {"targets": {}}
    for name, target_params in params["targets"].items():
        plugin = registry.get("exporter", name, f"export.targets.{name}")
        target_params = target_params or {}
        dyn = params["dynamic_hw"]
        res = plugin.obj(target_params, ExportContext(model, state.input_shape, dyn, sample,
                                                      state.run_dir / "export", state.quanter, state.ptq))
        entry = {"compressed": res.to_json()}
        runners = {"compressed": res.runner}
        if baseline is not None:
            base = plugin.obj(target_params, ExportContext(baseline, state.input_shape, dyn, sample,
                                                           state.run_dir / "export" / "baseline", None))
            entry["baseline"] = base.to_json()
            runners = {"baseline": base.runner, "compressed": res.runner}
        if pruned_float is not None:
            ref = plugin.obj(target_params, ExportContext(pruned_float, state.input_shape, dyn, sample,
                                                          state.run_dir / "export" / "pruned_float", None))
            entry["pruned_float"] = ref.to_json()
            runners["pruned_float"] = ref.runner
        timing = interleaved_latency(runners, lat_x, repeats=lat["repeats"], warmup=lat["warmup"])
        for who in runners:
            entry[who]["latency"] = timing[who]
        entry["latency_setup"] = (f"median of {lat['repeats']} runs after {lat['warmup']} warm-up, "
                                  f"batch {len(lat_x)}, input {list(lat_x.shape[1:])}, "
                                  f"{timing.get('threads', '?')} thread(s), baseline and compressed interleaved")
        out["targets"][name] = entry
        c = entry["compressed"]
        msg = f"  {name}: {c['size_bytes'] / 2**20:.2f} MB, parity max abs diff {c['parity']['max_abs_diff']:.2e}"
        if baseline is not None:
            b = entry["baseline"]
            msg += (f"; latency {b['latency']['median_ms']:.2f} ms (baseline) vs {c['latency']['median_ms']:.2f} ms, "
                    f"size {b['size_bytes'] / 2**20:.2f} MB (baseline)")
        if pruned_float is not None:
            msg += f"; float pruned model {entry['pruned_float']['latency']['median_ms']:.2f} ms"
        if c["details"].get("note"):
            msg += f"\n    note: {c['details']['note']}"
        print(msg)
    return out


def _float_pruned_model(state):
    """The last float (not quantized) model of the run: pruned and finetuned, before QAT."""
    for name in reversed(list(state.results)):
        ckpt = state.results[name].get("checkpoint")
        if ckpt and ckpt.get("quant_config") is None:
            model, _ = state.build_model(plan=ckpt.get("plan"), weights=state.run_dir / ckpt["weights"])
            return model
    return None
