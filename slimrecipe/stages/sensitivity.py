"""`sensitivity`: how much the metric drops when each convolution alone loses a share of its filters.

Sources: `compute` (estimated here, cached by content hash, resumable), `file` (slimrecipe JSON or a PaddleSlim
pickle, read without running any code from it), `builtin` (tables shipped with the package).

A computed table comes from one of two estimators (`method`): `measure` evaluates every (group, ratio) on a
pruned copy, optionally after recomputing the copy's BatchNorm statistics on `bn_recalibration` training batches;
`taylor` scores every group at every ratio from `taylor_batches` backward passes and maps the scores onto the
metric's loss by measuring `taylor_calibration` candidates. The method and its settings are part of the table's
`computed_on` and so of its cache key.

A computed table can be split over jobs: `shard: i/n` measures every n-th group (round-robin in model order,
starting at the i-th), writes that part to the cache next to the full table (``<key>.shard-<i>of<n>.json``) and
ends the run, since a partial table cannot drive pruning. A run without a shard merges the parts it finds there
and measures only the groups still missing; `slimrecipe sensitivity-merge` merges parts kept elsewhere (each
sharded run's own `sensitivity.json`).
"""

from __future__ import annotations

import re
from pathlib import Path

from ..batching import Subset
from ..cache import cache_entry, locked
from ..errors import Problem, RecipeError, UserError
from ..fileio import read_json, sha256_file, sha256_json, write_json
from ..registry import register

BUILTIN_DIR = Path(__file__).resolve().parent.parent / "sensitivities"
BUILTIN_TABLES = sorted(p.stem for p in BUILTIN_DIR.glob("*.json"))
SHARD_PATTERN = r"^[0-9]+/[0-9]+$"

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
        "method": {"enum": ["measure", "taylor"], "default": "measure",
                   "description": "measure: evaluate each group at each ratio; taylor: one-shot first-order Taylor "
                                  "scores from a few backward passes, calibrated by a few evaluations (compute)"},
        "bn_recalibration": {"type": "integer", "minimum": 0, "default": 0,
                             "description": "recompute a pruned candidate's BatchNorm statistics on this many "
                                            "training batches before evaluating it (0: off)"},
        "taylor_batches": {"type": "integer", "minimum": 1, "default": 8,
                           "description": "method taylor: training batches of backward passes"},
        "taylor_calibration": {"type": "integer", "minimum": 0, "default": 8,
                               "description": "method taylor: candidates evaluated to map scores onto the metric's "
                                              "loss (0: the table holds the predicted training-loss rise)"},
        "train_batch_size": {"type": "integer", "minimum": 1, "default": 32,
                             "description": "batch size of the training batches of taylor and bn_recalibration"},
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
        "shard": {"type": ["string", "null"], "pattern": SHARD_PATTERN, "default": None,
                  "description": "i/n (1 <= i <= n): measure only the i-th of n disjoint sets of groups, store that "
                                 "part in the cache and end the run; a run without a shard merges the parts "
                                 "(source: compute, cache: true). Sweep it: sensitivity.shard=1/2,2/2"},
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
    shard = doc.get("shard")
    print(f"  sensitivity of {n} parameters ({doc['source']}{f', shard {shard}' if shard else ''}) -> {out}")
    result = {"source": doc["source"], "params": n, "evaluations": doc.get("evaluations_this_run", 0),
              "cache": doc.get("cache"), "table_path": str(out), "plot": plot and str(plot), "inputs": inputs}
    if shard:  # a part of the table: nothing after this stage may use it as the whole
        result["shard"] = shard
        result["end_run"] = (f"sensitivity.shard={shard} measured {n} of {len(doc['groups'])} groups. Once every "
                             "shard is done, the same recipe without sensitivity.shard merges the parts from the "
                             "cache and goes on to prune (or: slimrecipe sensitivity-merge)")
    return result


def parse_shard(text: str | None) -> tuple[int, int] | None:
    """``"i/n"`` -> ``(i, n)``, checked: 1 <= i <= n; None stays None."""
    if text is None:
        return None
    match = re.fullmatch(SHARD_PATTERN, str(text))
    if not match:
        raise RecipeError(f"got {text!r}; expected i/n, e.g. 1/2", path="sensitivity.shard")
    index, count = (int(x) for x in str(text).split("/"))
    if not 1 <= index <= count:
        raise RecipeError(f"got {text!r}; shard i/n needs 1 <= i <= n (the i-th of n jobs)", path="sensitivity.shard")
    return index, count


def recipe_problems(recipe: dict) -> list[Problem]:
    """What the schema cannot say about `sensitivity.shard`: 1 <= i <= n, and only a computed table is sharded."""
    section = recipe.get("sensitivity")
    shard = section.get("shard") if isinstance(section, dict) else None
    if not isinstance(shard, str) or not re.fullmatch(SHARD_PATTERN, shard):
        return []  # absent, or a malformed string the schema already reports
    try:
        parse_shard(shard)
    except RecipeError as e:
        return e.problems
    if section.get("source", "compute") != "compute":
        return [Problem("sensitivity.shard", f"only a computed table can be sharded; source is {section['source']!r}")]
    return []


def _compute(state, params: dict) -> dict:
    ratios = sorted(float(r) for r in params["ratios"])
    criterion = params["criterion"]
    subset = Subset(state.data.val, params["subset"])
    batch_size = int(params["batch_size"])
    method = params["method"]
    computed_on = {
        "weights_sha256": sha256_file(state.weights) if state.weights else None,
        "plan": state.plan,
        "data": sha256_json(state.data.manifest), "subset": len(subset),
        "metric": state.recipe["metric"], "criterion": criterion, "ratios": ratios,
        "loss_ceiling": params["loss_ceiling"] if method == "measure" else None, "params": params["params"],
        "estimator": estimator_settings(params),
    }
    key = sha256_json(computed_on)[:24]
    about = {"source": "compute", "computed_on": computed_on, "cache_key": key}
    use_cache = params["cache"]
    cache_dir = state.cache_dir / "sensitivity"

    def measure(names: list[str], entry: Path) -> dict:
        """Measure the groups ``names``, resumably: the checkpoint sits next to the entry it makes, under its lock
        (in the stage's own directory when the cache is off)."""
        from ..pruning import compute_sensitivity

        checkpoint = (entry.with_suffix(".partial.json") if use_cache
                      else state.stage_dir / "sensitivity.partial.json")
        bn_batches = training_batches(state, params["bn_recalibration"], params["train_batch_size"])
        evaluate = lambda m: state.evaluate(m, subset, batch_size)  # noqa: E731
        if method == "taylor":  # one shot, seconds: nothing worth checkpointing
            from ..pruning.sensitivity import taylor_sensitivity
            from ._training import batch_loss

            result = taylor_sensitivity(
                state.model, state.input_shape, evaluate,
                training_batches(state, params["taylor_batches"], params["train_batch_size"]),
                batch_loss(state.model), ratios=ratios, criterion=criterion, params=names,
                calibration=params["taylor_calibration"], higher_is_better=state.metric.higher_is_better,
                bn_batches=bn_batches)
        else:
            result = compute_sensitivity(
                state.model, state.input_shape, evaluate,
                ratios=ratios, criterion=criterion, params=names, loss_ceiling=params["loss_ceiling"],
                higher_is_better=state.metric.higher_is_better, checkpoint_path=checkpoint, progress=True,
                bn_batches=bn_batches,
            )
        return {"baseline": result["baseline"], "table": _str_keys(result["table"]),
                "evaluations": result["evaluations"], "checkpoint": checkpoint}

    full = cache_dir / f"{key}.json"
    shard = parse_shard(params["shard"])
    if shard is not None:
        return _compute_shard(shard, _groups(state, params), about, full, measure, use_cache)
    with cache_entry(full, enabled=use_cache) as entry:
        if entry.ready:
            doc = read_json(full)
            doc.update(cache="hit", evaluations_this_run=0)
            print(f"  sensitivity reused from cache {full}")
            return doc
        groups = _groups(state, params)
        about["groups"] = groups
        parts = _finished_shards(cache_dir, key) if use_cache else []
        merged = merge_shards(parts) if parts else {**about, "baseline": None, "table": {}}
        missing = [g for g in groups if g not in merged["table"]]
        if parts:
            print(f"  sensitivity merged from shards {', '.join(merged['merged_shards'])} of {full.name}: "
                  f"{len(groups) - len(missing)} groups measured, {len(missing)} missing")
        measured = measure(missing, full) if missing or not parts else None
        if measured:
            merged["table"].update(measured["table"])
            if merged["baseline"] is None:
                merged["baseline"] = measured["baseline"]
        doc = {**merged, **about, "table": {g: merged["table"][g] for g in groups}}
        if use_cache:
            write_json(full, doc)
            if measured:
                measured["checkpoint"].unlink(missing_ok=True)
    doc.update(cache="merged" if parts else "miss", evaluations_this_run=measured["evaluations"] if measured else 0)
    return doc


def estimator_settings(params: dict) -> dict:
    """How a computed table is estimated: the method and only the settings it uses (they key the cache)."""
    settings = {"method": params["method"], "bn_recalibration": int(params["bn_recalibration"])}
    if params["method"] == "taylor":
        settings.update(taylor_batches=int(params["taylor_batches"]),
                        taylor_calibration=int(params["taylor_calibration"]))
    if params["method"] == "taylor" or settings["bn_recalibration"]:
        settings["train_batch_size"] = int(params["train_batch_size"])
    return settings


def training_batches(state, count: int, batch_size: int) -> list:
    """The first ``count`` shuffled training batches (the run's seed): the same ones for every candidate."""
    from ..batching import iterate_batches

    if not count:
        return []
    if len(state.data.train) < batch_size:
        raise RecipeError(f"train_batch_size {batch_size} is larger than the training split "
                          f"({len(state.data.train)} samples)", path="sensitivity.train_batch_size")
    batches = iterate_batches(state.data.train, batch_size, shuffle=True, seed=state.seed, drop_last=True)
    return [b for _, b in zip(range(count), batches)]


def _groups(state, params: dict) -> list[str]:
    """The groups the table covers, in model order (found by tracing the model)."""
    from ..pruning.sensitivity import select_groups

    return [e["name"] for e in select_groups(_prunable(state), params["params"], "sensitivity.params")]


def _compute_shard(shard: tuple[int, int], groups: list[str], about: dict, full: Path, measure, use_cache: bool):
    """Measure this shard's groups (every n-th, from the i-th) into ``<key>.shard-<i>of<n>.json``."""
    index, count = shard
    label = f"{index}/{count}"
    about = {**about, "groups": groups}
    mine = groups[index - 1::count]
    part = full.with_name(f"{full.stem}.shard-{index}of{count}.json")
    if use_cache and full.is_file():  # the whole table is there already: this part is a slice of it
        whole = read_json(full)
        doc = {**about, "shard": label, "baseline": whole["baseline"],
               "table": {g: whole["table"][g] for g in mine}}
        print(f"  sensitivity shard {label} taken from the full table in the cache {full}")
        return {**doc, "cache": "hit", "evaluations_this_run": 0}
    with cache_entry(part, enabled=use_cache) as entry:
        if entry.ready:
            print(f"  sensitivity shard {label} reused from cache {part}")
            return {**read_json(part), "cache": "hit", "evaluations_this_run": 0}
        measured = measure(mine, part)
        doc = {**about, "shard": label, "baseline": measured["baseline"], "table": measured["table"]}
        if use_cache:
            write_json(part, doc)
            measured["checkpoint"].unlink(missing_ok=True)
    return {**doc, "cache": "miss", "evaluations_this_run": measured["evaluations"]}


SHARD_FILE = re.compile(r"[0-9a-f]+\.shard-[0-9]+of[0-9]+\.json")  # a finished part, not its .partial.json


def _finished_shards(cache_dir: Path, key: str) -> list[dict]:
    """The shard parts of table ``key`` in the cache, after waiting for the shards still being measured."""
    for lock in sorted(cache_dir.glob(f".{key}.shard-*.json.lock")):  # the lock of every shard ever started
        with locked(cache_dir / lock.name.removeprefix(".").removesuffix(".lock")):  # free once its job is done
            pass
    return [read_json(p) for p in sorted(cache_dir.glob(f"{key}.shard-*.json")) if SHARD_FILE.fullmatch(p.name)]


def merge_shards(parts: list[dict]) -> dict:
    """Shard parts of one analysis (one cache key) as one doc: their rows together, in model order.

    Rows measured by more than one part (shards of sweeps with different n) are the same measurement; the first
    one is kept. The result may miss groups no part measured: ``groups`` lists all of them.
    """
    keys = sorted({str(p.get("cache_key")) for p in parts})
    if len(keys) != 1:
        raise UserError(f"these shards belong to different analyses (cache keys {', '.join(keys)}): they measured "
                        "other weights, data, metric or settings")
    groups = parts[0]["groups"]
    table: dict[str, dict] = {}
    for part in parts:
        for name, row in part["table"].items():
            table.setdefault(name, row)
    baselines = {float(p["baseline"]) for p in parts}
    if max(baselines) - min(baselines) > 1e-9 * max(abs(b) for b in baselines):
        print(f"  warning: the shards measured different baselines {sorted(baselines)} (a non-deterministic "
              "evaluation?); their losses are relative to their own baseline")
    return {"source": "compute", "baseline": parts[0]["baseline"],
            "table": {g: table[g] for g in groups if g in table}, "computed_on": parts[0]["computed_on"],
            "cache_key": keys[0], "groups": groups,
            "merged_shards": sorted({p["shard"] for p in parts}, key=_shard_order)}


def _shard_order(label: str) -> tuple[int, int]:
    index, count = label.split("/")
    return int(count), int(index)


def merge_command(args: list[str]) -> int:
    """`slimrecipe sensitivity-merge PART... --out FILE`: the full table from the parts of a sharded analysis."""
    usage = ("usage: slimrecipe sensitivity-merge PART... --out FILE   "
             "(PART: a sharded run's directory or its sensitivity.json)")
    if "--out" not in args or args.index("--out") + 1 >= len(args):
        raise UserError(usage)
    i = args.index("--out")
    out, sources = Path(args[i + 1]), args[:i] + args[i + 2:]
    if not sources:
        raise UserError(usage)
    parts = []
    for source in sources:
        path = Path(source) / "sensitivity.json" if Path(source).is_dir() else Path(source)
        try:
            part = read_json(path)
        except (OSError, ValueError) as e:
            raise UserError(f"cannot read {path}: {e}") from None
        if not isinstance(part, dict) or not all(k in part for k in ("shard", "groups", "table", "cache_key")):
            raise UserError(f"{path} is not the sensitivity of a sharded run (no shard, groups, table, cache_key)")
        parts.append(part)
    doc = merge_shards(parts)
    missing = [g for g in doc["groups"] if g not in doc["table"]]
    if missing:
        raise UserError(f"shards {', '.join(doc['merged_shards'])} leave {len(missing)} of {len(doc['groups'])} "
                        f"groups unmeasured ({', '.join(missing[:5])}{' ...' if len(missing) > 5 else ''}); "
                        "add the missing shards' parts")
    write_json(out, doc)
    print(f"sensitivity of {len(doc['table'])} groups merged from shards {', '.join(doc['merged_shards'])} -> {out}"
          f"\nuse it with: sensitivity.source=file sensitivity.file={out}")
    return 0


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
