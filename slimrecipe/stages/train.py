"""`train`: the baseline model, trained once per content hash and reused from the cache afterwards."""

from __future__ import annotations

import shutil

from ..cache import cache_entry
from ..fileio import atomic_write, read_json, sha256_file, sha256_json, write_json
from ..registry import register
from ._training import fit, loop_schema, save_weights

SCHEMA = loop_schema({
    "cache": {"type": "boolean", "default": True, "description": "reuse a baseline trained earlier on the same inputs"},
})


def cache_key(state, params: dict) -> str:
    """Everything that decides the trained weights: model, data, training settings, seed, library versions."""
    from ..snapshot import environment

    env = environment()
    return sha256_json({
        "model": {k: v for k, v in state.recipe["model"].items()},
        "data": state.data.manifest,
        "train": {k: v for k, v in params.items() if k != "cache"},
        "metric": state.recipe["metric"],
        "seed": state.seed,
        "versions": {k: env["packages"].get(k) for k in ("paddlepaddle", "paddlepaddle-gpu", "numpy")},
    })[:24]


@register("stage", "train", schema=SCHEMA)
def train(state, params: dict) -> dict:
    """Train the baseline (from `model.weights` if given, else from scratch); cached by content hash."""
    key = cache_key(state, params)
    cached = state.cache_dir / "baselines" / key
    weights = state.stage_dir / "model.pdparams"
    # result.json is written last: it marks a complete entry; a concurrent job training the same baseline waits
    with cache_entry(cached, marker="result.json", enabled=params["cache"]) as entry:
        if entry.ready:
            shutil.copyfile(cached / "model.pdparams", weights)
            result = read_json(cached / "result.json")
            result.update(cache="hit", cache_key=key)
            print(f"  baseline reused from cache {cached} (metric {result['metric']:.4f})")
        else:
            model = state.model
            fit_result = fit(state, model, params, out_dir=state.stage_dir / "checkpoint", desc="train")
            save_weights(model, weights)
            result = {"metric": state.evaluate(model), "fit": fit_result}
            if params["cache"]:
                atomic_write(cached / "model.pdparams", lambda tmp: shutil.copyfile(weights, tmp))
                write_json(cached / "result.json", result)
            result.update(cache="miss", cache_key=key)
            shutil.rmtree(state.stage_dir / "checkpoint", ignore_errors=True)
    result["weights_path"] = str(weights)
    result["weights_sha256"] = sha256_file(weights)
    result["checkpoint"] = state.set_model(state.model if result["cache"] == "miss" else _load(state, weights), weights)
    return result


def _load(state, weights):
    model, _ = state.build_model(weights=weights)
    return model
