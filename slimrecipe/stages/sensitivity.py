"""`sensitivity`: how much the metric drops when each convolution alone loses a share of its filters.

Sources: `compute` (measured here, cached by content hash, resumable), `file` (slimrecipe JSON or a PaddleSlim
pickle, read without running any code from it), `builtin` (tables shipped with the package).
"""

from __future__ import annotations

from pathlib import Path

from ..batching import Subset
from ..fileio import read_json, sha256_file, sha256_json, write_json
from ..registry import register

BUILTIN_DIR = Path(__file__).resolve().parent.parent / "sensitivities"
BUILTIN_TABLES = sorted(p.stem for p in BUILTIN_DIR.glob("*.json"))

SCHEMA = {
    "type": "object",
    "additionalProperties": False,
    "properties": {
        "source": {"enum": ["compute", "file", "builtin"], "default": "compute"},
        "ratios": {"type": "array", "minItems": 1, "uniqueItems": True,
                   "items": {"type": "number", "exclusiveMinimum": 0, "exclusiveMaximum": 1},
                   "default": [0.1, 0.3, 0.5, 0.7],
                   "description": "pruning ratios tried for every parameter (compute)"},
        "criterion": {"enum": ["l1_norm", "l2_norm", "fpgm"], "default": "l1_norm",
                      "description": "filter ranking (compute)"},
        "subset": {"type": ["integer", "null"], "minimum": 1, "default": None,
                   "description": "evaluate on the first N validation samples (null: all)"},
        "loss_ceiling": {"type": ["number", "null"], "exclusiveMinimum": 0, "default": None,
                         "description": "stop raising a parameter's ratio once its loss passes this"},
        "params": {"type": ["array", "null"], "items": {"type": "string"}, "default": None,
                   "description": "analyse only these parameters (null: every prunable one)"},
        "batch_size": {"type": "integer", "minimum": 1, "default": 128},
        "cache": {"type": "boolean", "default": True, "description": "reuse a table computed on the same inputs"},
        "file": {"type": ["string", "null"], "x-file": True, "default": None,
                 "description": "a sensitivity file: slimrecipe JSON or a PaddleSlim pickle (source: file)"},
        "builtin": {"type": ["string", "null"], "enum": [None, *BUILTIN_TABLES], "default": None,
                    "description": "a table shipped with slimrecipe (source: builtin)"},
        "plot": {"type": "boolean", "default": True},
    },
    "allOf": [
        {"if": {"properties": {"source": {"const": "file"}}, "required": ["source"]},
         "then": {"required": ["file"], "properties": {"file": {"type": "string"}}}},
        {"if": {"properties": {"source": {"const": "builtin"}}, "required": ["source"]},
         "then": {"required": ["builtin"], "properties": {"builtin": {"type": "string"}}}},
    ],
}


@register("stage", "sensitivity", schema=SCHEMA)
def sensitivity(state, params: dict) -> dict:
    """Produce `sensitivity.json`: {param: {ratio: relative metric loss}} and what it was computed on."""
    source = params["source"]
    inputs = {}
    if source == "compute":
        doc = _compute(state, params)
    elif source == "file":
        from ..pruning import load_sensitivity_file

        path = Path(params["file"]).expanduser()
        table = load_sensitivity_file(path, recipe_path="sensitivity.file", prunable=_prunable(state))
        doc = {"source": "file", "table": _str_keys(table),
               "computed_on": {"file": str(path), "file_sha256": sha256_file(path)}}
        inputs = {"sensitivity.file": str(path)}
    else:
        path = BUILTIN_DIR / f"{params['builtin']}.json"
        from ..pruning import resolve_table

        doc = read_json(path)
        doc["source"] = f"builtin:{params['builtin']}"
        doc["table"] = resolve_table(_prunable(state), doc["table"], "sensitivity.builtin")
        inputs = {"sensitivity.builtin": str(path)}
    out = state.run_dir / "sensitivity.json"
    write_json(out, doc)
    plot = None
    if params["plot"]:
        plot = plot_sensitivity(doc["table"], state.run_dir / "sensitivity.png", title=state.recipe["name"])
    n = len(doc["table"])
    print(f"  sensitivity of {n} parameters ({doc['source']}) -> {out}")
    return {"source": doc["source"], "params": n, "evaluations": doc.get("evaluations_this_run", 0),
            "cache": doc.get("cache"), "table_path": str(out), "plot": plot and str(plot), "inputs": inputs}


def _compute(state, params: dict) -> dict:
    from ..pruning import compute_sensitivity

    ratios = sorted(float(r) for r in params["ratios"])
    criterion = params["criterion"]
    subset = Subset(state.data.val, params["subset"])
    batch_size = int(params["batch_size"])
    computed_on = {
        "weights_sha256": sha256_file(state.weights) if state.weights else None,
        "plan": state.plan,
        "data": sha256_json(state.data.manifest), "subset": len(subset),
        "metric": state.recipe["metric"], "criterion": criterion, "ratios": ratios,
        "loss_ceiling": params["loss_ceiling"], "params": params["params"],
    }
    key = sha256_json(computed_on)[:24]
    cache_dir = state.cache_dir / "sensitivity"
    cached = cache_dir / f"{key}.json"
    if params["cache"] and cached.exists():
        doc = read_json(cached)
        doc.update(cache="hit", evaluations_this_run=0)
        print(f"  sensitivity reused from cache {cached}")
        return doc
    model = state.model
    result = compute_sensitivity(
        model, state.input_shape, lambda m: state.evaluate(m, subset, batch_size),
        ratios=ratios, criterion=criterion, params=params["params"], loss_ceiling=params["loss_ceiling"],
        higher_is_better=state.metric.higher_is_better,
        checkpoint_path=cache_dir / f"{key}.partial.json", progress=True,
    )
    doc = {"source": "compute", "baseline": result["baseline"], "table": _str_keys(result["table"]),
           "computed_on": computed_on, "cache_key": key}
    write_json(cached, doc)
    (cache_dir / f"{key}.partial.json").unlink(missing_ok=True)
    doc.update(cache="miss", evaluations_this_run=result["evaluations"])
    return doc


def _str_keys(table: dict) -> dict:
    return {p: {_ratio_key(r): float(v) for r, v in row.items()} for p, row in table.items()}


def _ratio_key(r) -> str:
    return f"{float(r):.6g}"


def _prunable(state) -> list[dict]:
    from ..pruning import prunable_params

    return prunable_params(state.model, state.input_shape)


def plot_sensitivity(table: dict, path: Path, title: str = "") -> Path | None:
    """One line per parameter: relative metric loss against pruning ratio."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from ..fileio import atomic_write

    fig, ax = plt.subplots(figsize=(9, 5.5))
    for name, row in table.items():
        pts = sorted((float(r), float(v)) for r, v in row.items())
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", ms=3, lw=1, label=name)
    ax.set_xlabel("pruning ratio (share of filters removed)")
    ax.set_ylabel("relative metric loss")
    ax.set_title(f"sensitivity {title}".strip())
    ax.grid(alpha=0.3)
    if len(table) <= 24:
        ax.legend(fontsize=6, ncol=2, loc="upper left")
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=110))
    plt.close(fig)
    return path
