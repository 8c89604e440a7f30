"""Latency targets: a latency model of a model's channel groups measured on this machine, and plans under a budget.

The pieces, from the bottom up:

- :class:`LatencyBench` exports a model to a runtime (onnxruntime or Paddle Inference, through the exporters, so
  the timed artefact is the one a deployment would load) and times it interleaved with the unpruned export;
  a *share* is the median over rounds of the in-round ratio candidate / baseline.
- :class:`LatencyTable` is the latency model: per channel group, the change of share when only that group is
  pruned, measured at a few widths (NetAdapt's per-layer tables, at the granularity of channel groups) and
  interpolated linearly in between. The share of a configuration ``{group: kept channels}`` is
  ``1 + sum(delta_g(kept_g))``.

  Why additive is defensible: an inference runtime runs the layers one after another, and pruning a group
  changes only the layers that hold its tensors (the convolutions producing those channels and the ones
  reading them); on a CPU with one stream of work their times add up. Where it fails: a convolution whose
  input *and* output channels both shrink costs ``c_in * c_out``, so the two groups' savings multiply rather
  than add (the additive sum over-predicts the saving of deep cuts); kernels switch algorithm at some widths
  (SIMD blocks of 8 or 16, im2col vs direct), so the latency is a staircase that linear interpolation smooths
  (a width off the block of 8 can even be slower than the unpruned width: when the plan may keep such widths,
  each group is also measured at one of them, and the extra cost is added to every off-block width); and fixed
  costs (memory traffic, runtime overhead) do not shrink at all. Hence the correction: a few whole
  candidate plans are exported and measured, and the table's predicted saving is scaled by the measured one
  (``alpha``) before planning again (HALP's latency-aware planning, checked by measurement).
- :func:`ratios_for_latency_target` plans under a budget with any ``cost_fn(config) -> float``: the least
  estimated sensitivity loss whose cost is within ``target_share`` of the unpruned cost.
- :func:`plan_latency` ties them together for the prune stage; :meth:`LatencyOutcome.verify` times the pruned
  model against the baseline once more and says how close it landed.
"""

from __future__ import annotations

import copy
import os
import platform
import sys
import tempfile
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

from ..errors import RecipeError
from .targets import _check_align, _check_min_channels, _kept_channels, _loss_at, _points

PATH = "prune.target.latency"
RUNTIMES = ("onnxruntime", "paddle_inference")
TABLE_FORMAT = "slimrecipe.latency_table/1"
# the channel block of CPU runtimes' fast convolution layouts (onnxruntime's NCHWc, oneDNN's nChw8c/16c): a width
# off it can run slower than the unpruned width (measured here: ResNet-18 with unaligned widths at 1.12x the
# baseline's latency), so the table measures what leaving it costs
BLOCK = 8
# a measured plan this close to the asked share (relative) ends the correction rounds; the promise is 5%
GOOD_ENOUGH = 0.025

LATENCY_SCHEMA = {
    "type": "object",
    "additionalProperties": False,
    "required": ["share"],
    "properties": {
        "share": {"type": "number", "exclusiveMinimum": 0, "exclusiveMaximum": 1,
                  "description": "the pruned model's latency as a share of the unpruned model's"},
        "runtime": {"enum": list(RUNTIMES), "default": "onnxruntime",
                    "description": "the runtime the latency is measured on (CPU)"},
        "threads": {"type": "integer", "minimum": 1, "maximum": 256, "default": 1,
                    "description": "CPU threads of the runtime"},
        "batch": {"type": "integer", "minimum": 1, "maximum": 1024, "default": 1, "description": "batch size"},
        "input": {"type": ["array", "null"], "items": {"type": "integer", "minimum": 1}, "minItems": 3,
                  "maxItems": 3, "default": None,
                  "description": "[C, H, W] of the timed input (default: the dataset's input shape)"},
        "widths": {"type": "array", "minItems": 1, "uniqueItems": True,
                   "items": {"type": "number", "exclusiveMinimum": 0, "exclusiveMaximum": 1},
                   "default": [0.25, 0.5, 0.75],
                   "description": "latency table: the ratios each group is measured at, alone"},
        "repeats": {"type": "integer", "minimum": 5, "maximum": 10000, "default": 40,
                    "description": "interleaved timing rounds per measurement (the median is used)"},
        "rounds": {"type": "integer", "minimum": 1, "maximum": 10, "default": 3,
                   "description": "whole candidate plans measured to correct the table's prediction"},
        "cache": {"type": "boolean", "default": True,
                  "description": "reuse a latency table measured for the same model, input and runtime"},
    },
}
# `prune.target.latency`: the settings above, or only the share (`prune.target.latency=0.5`)
TARGET_SCHEMA = {
    "oneOf": [{"type": "number", "exclusiveMinimum": 0, "exclusiveMaximum": 1}, LATENCY_SCHEMA],
    "description": "latency share to reach on a runtime: a number (the share) or {share, runtime, threads, "
                   "batch, input, widths, repeats, rounds, cache}",
}


def latency_settings(spec, default_input) -> dict:
    """The target's settings with the schema's defaults filled in (a bare number is the share)."""
    from ..config import apply_defaults

    spec = {"share": spec} if isinstance(spec, (int, float)) and not isinstance(spec, bool) else dict(spec)
    out = apply_defaults(LATENCY_SCHEMA, spec)
    share = out.get("share")
    if isinstance(share, bool) or not isinstance(share, (int, float)) or not 0 < share < 1:
        raise RecipeError(f"the latency share must lie strictly between 0 and 1, got {share!r}", path=f"{PATH}.share")
    if out["runtime"] not in RUNTIMES:
        raise RecipeError(f"unknown runtime {out['runtime']!r}; choose one of {list(RUNTIMES)}",
                          path=f"{PATH}.runtime")
    out["input"] = [int(d) for d in (out["input"] or default_input)]
    return out


# --------------------------------------------------------------------------- planning


@dataclass
class LatencyPlan:
    ratios: dict[str, float]  # for make_plan: it keeps exactly ``kept``
    kept: dict[str, int]  # channels each planned group keeps
    predicted_share: float  # cost_fn(kept) / cost_fn(unpruned)
    estimated_loss: float  # sum of the sensitivity losses at the planned ratios


def _group_channels(model, input_shape, table: dict, params) -> tuple[dict[str, int], dict]:
    """Prunable groups' channel counts, and the table keyed by structured names, restricted to ``params``."""
    from .plan import analyse

    channels = {e["name"]: e["channels"] for e in analyse(model, input_shape)[1]}
    structured = {p.name: n for n, p in model.named_parameters()}
    table = {k if k in channels else structured.get(k, k): v for k, v in table.items()}
    if params is not None:
        chosen = {p if p in channels else structured.get(p) for p in params}
        unknown = [p for p in params if (p if p in channels else structured.get(p)) not in channels]
        if unknown:
            raise RecipeError(f"not prunable groups of this model: {unknown[:5]}", path=PATH)
        table = {k: v for k, v in table.items() if k in chosen}
    return channels, {k: v for k, v in table.items() if k in channels and v}


def candidate_widths(channels: int, row: dict, align: int | None, min_channels: int | None) -> list[int]:
    """Channel counts a group may keep, widest first: every count (a multiple of ``align``, at least
    ``min_channels``) from the unpruned width down to the width at the largest ratio the sensitivity row
    measured (the loss beyond it is unknown)."""
    deepest = max(r for r, _ in _points(row))
    floor = _kept_channels(channels, deepest, align, min_channels)
    unit = align or 1
    lowest = max(unit, floor)
    return [channels] + [k for k in range((channels - 1) // unit * unit, lowest - 1, -unit) if 0 < k < channels]


def estimated_loss(table: dict, channels: dict[str, int], kept: dict[str, int]) -> float:
    """Sum over groups of the sensitivity loss at each group's ratio (linear between measured ratios)."""
    return sum(_loss_at(table[n], (channels[n] - k) / channels[n]) for n, k in kept.items())


def _pareto(cost: np.ndarray, loss: np.ndarray, cap: int) -> np.ndarray:
    """Indices of the points no other point beats: none cheaper (or as cheap) with a smaller loss.

    Points of equal loss and different cost are all kept: the final choice prefers the costlier of two plans of
    equal loss (it prunes less), and which one fits depends on the groups still to come. Over ``cap`` points,
    costs are binned (``cap`` bins) keeping the least loss in each, which bounds the search on large models."""
    order = np.lexsort((loss, cost))
    c, l = cost[order], loss[order]
    first = np.r_[True, c[1:] != c[:-1]]
    best_before = np.r_[np.inf, np.minimum.accumulate(l)[:-1]]
    keep = order[first & (l <= best_before)]
    if len(keep) > cap:
        span = cost[keep].max() - cost[keep].min()
        bins = np.floor((cost[keep] - cost[keep].min()) / (span / cap if span > 0 else 1.0)).astype(np.int64)
        by_bin = np.lexsort((-cost[keep], loss[keep], bins))
        first_in_bin = np.r_[True, bins[by_bin][1:] != bins[by_bin][:-1]]
        keep = keep[by_bin[first_in_bin]]
        sub = _pareto(cost[keep], loss[keep], len(keep))
        keep = keep[sub]
    return keep


def ratios_for_latency_target(model, input_shape, table: dict, target_share: float,
                              cost_fn: Callable[[dict[str, int]], float], *, tolerance: float = 0.01,
                              align: int | None = None, min_channels: int | None = None, params=None,
                              front_cap: int = 4000, max_checks: int = 64) -> LatencyPlan:
    """The plan of least estimated sensitivity loss whose cost is at most ``target_share`` of the unpruned cost.

    ``cost_fn(config)`` gives the cost (a latency, any unit) of a configuration ``{group: kept channels}`` that
    names every group of ``table``. It is read one group at a time (every other group unpruned), which
    decomposes it into per-group changes; the plan of least loss under the budget is then found exactly for
    that sum by dynamic programming over groups, keeping at each step only the Pareto front of (cost, loss)
    partial plans (every channel count is a candidate, or every ``align`` step; groups are cut no deeper than
    their largest measured ratio). When ``cost_fn`` is additive (the measured latency table is), that is the
    plan a brute-force search over every combination finds: least loss, and of equal losses the one that prunes
    least. When it is not, front plans are checked with ``cost_fn`` itself, in order of loss, and the first
    within the budget is taken. The planned share must not undershoot the target by more than ``tolerance``.
    """
    if isinstance(target_share, bool) or not isinstance(target_share, (int, float)) or not 0 < target_share < 1:
        raise RecipeError(f"the latency share must lie strictly between 0 and 1, got {target_share!r}",
                          path=f"{PATH}.share")
    if not 0 < tolerance < 1:
        raise RecipeError(f"tolerance must lie strictly between 0 and 1, got {tolerance!r}", path="prune.tolerance")
    align = _check_align(align)
    min_channels = _check_min_channels(min_channels)
    channels, table = _group_channels(model, input_shape, table, params)
    if not table:
        raise RecipeError("no sensitivity measurements for any group left to prune: compute sensitivity for "
                          "them, or relax the skip rules", path=PATH)
    names = sorted(table, key=list(channels).index)  # from the input on
    full = {n: channels[n] for n in names}
    base = float(cost_fn(full))
    if not base > 0:
        raise RecipeError(f"the latency model gives the unpruned model a cost of {base!r}", path=PATH)
    budget = target_share * base
    widths = {n: candidate_widths(channels[n], table[n], align, min_channels) for n in names}
    delta = {n: np.array([float(cost_fn({**full, n: k})) - base for k in widths[n]]) for n in names}
    loss = {n: np.array([_loss_at(table[n], (channels[n] - k) / channels[n]) for k in widths[n]]) for n in names}

    # least cost the groups after each step can still add: partial plans that cannot reach the budget go
    rest_min = np.r_[np.cumsum([delta[n].min() for n in names][::-1])[::-1][1:], 0.0]
    cost, lss = np.zeros(1), np.zeros(1)
    back: list[tuple[np.ndarray, np.ndarray]] = []
    for i, n in enumerate(names):
        c = (cost[:, None] + delta[n][None, :]).ravel()
        l = (lss[:, None] + loss[n][None, :]).ravel()
        parent = np.repeat(np.arange(len(cost)), len(widths[n]))
        choice = np.tile(np.arange(len(widths[n])), len(cost))
        reachable = np.flatnonzero(base + c + rest_min[i] <= budget * (1 + 1e-12))
        if not len(reachable):
            deepest = base + sum(d.min() for d in delta.values())
            raise RecipeError(
                f"a latency share of {target_share:g} is out of reach: pruning every group as far as its "
                f"sensitivity was measured{f' (align {align})' if align else ''} reaches a predicted share of "
                f"{deepest / base:.3f}. Measure larger ratios, prune more groups, or ask for a larger share",
                path=f"{PATH}.share")
        keep = reachable[_pareto(c[reachable], l[reachable], front_cap)]
        cost, lss = c[keep], l[keep]
        back.append((parent[keep], choice[keep]))

    def config(j: int) -> dict[str, int]:
        out = {}
        for n, (parent, choice) in zip(reversed(names), reversed(back)):
            out[n] = widths[n][choice[j]]
            j = parent[j]
        return {n: out[n] for n in names}

    # least loss first; of equal losses the costlier (less pruned); the additive estimate first, then cost_fn
    order = np.lexsort((-cost, lss))
    chosen = None
    for j in order[:max_checks]:
        kept = config(int(j))
        share = float(cost_fn(kept)) / base
        if share <= target_share * (1 + 1e-9):
            chosen = (kept, share, float(lss[j]))
            break
    if chosen is None:
        raise RecipeError(f"none of the {min(max_checks, len(order))} plans of least loss meets a latency share of "
                          f"{target_share:g} by the latency model, though its per-group sum says they do: the "
                          "model is far from additive here; ask for a larger share", path=f"{PATH}.share")
    kept, share, est = chosen
    if share < target_share - tolerance:
        raise RecipeError(
            f"a latency share of {target_share:g} - {tolerance:g} falls between the channel steps the plan can "
            f"take: the plan of least loss under it predicts {share:.4f}{f' with align {align}' if align else ''}. "
            f"Widen prune.tolerance{', or use a smaller align' if align else ''}", path=f"{PATH}.share")
    ratios = {n: (channels[n] - k) / channels[n] for n, k in kept.items() if k < channels[n]}
    return LatencyPlan(ratios, {n: k for n, k in kept.items() if k < channels[n]}, share, est)


# --------------------------------------------------------------------------- measuring


class LatencyBench:
    """Exports models to one runtime and times them against the unpruned model's export, interleaved."""

    def __init__(self, model, settings: dict, seed: int = 0):
        self.settings = settings
        self.input_shape = list(settings["input"])
        rng = np.random.default_rng(seed)
        self.x = rng.standard_normal((settings["batch"], *self.input_shape)).astype(np.float32)
        self.baseline = self.runner(model)

    def runner(self, model):
        """The model exported to the runtime (parity-checked by the exporter) and reloaded, as a callable."""
        from ..exporters import ExportContext, export_onnx, export_paddle_inference

        export = export_onnx if self.settings["runtime"] == "onnxruntime" else export_paddle_inference
        # runtimes hold the model in memory; paddle2onnx's banner, once per candidate, would bury the progress bar
        with tempfile.TemporaryDirectory(prefix="slimrecipe-latency-") as tmp, _quiet_stdout():
            ctx = ExportContext(model, self.input_shape, False, self.x[:4], Path(tmp))
            return export({"threads": self.settings["threads"]}, ctx).runner

    def share(self, model=None, runner=None) -> dict:
        """``model`` (or an already exported ``runner``) timed against the baseline: its share and medians."""
        from ..exporters import interleaved_latency

        runner = runner or self.runner(model)
        t = interleaved_latency({"baseline": self.baseline, "candidate": runner}, self.x,
                                repeats=self.settings["repeats"], warmup=3)
        return {"share": t["candidate"]["paired_ratio"], "ratio_of_medians": t["candidate"]["ratio_to_first"],
                "baseline_ms": t["baseline"]["median_ms"], "candidate_ms": t["candidate"]["median_ms"]}


@contextmanager
def _quiet_stdout():
    """Native code's writes to stdout (file descriptor 1) go nowhere inside the block; errors still raise."""
    sys.stdout.flush()
    saved = os.dup(1)
    try:
        with open(os.devnull, "w") as null:
            os.dup2(null.fileno(), 1)
            yield
    finally:
        sys.stdout.flush()
        os.dup2(saved, 1)
        os.close(saved)


@dataclass
class LatencyTable:
    """Per group, the change of latency share measured with only that group pruned: ``{group: {kept: delta}}``."""

    channels: dict[str, int]
    deltas: dict[str, dict[int, float]]
    baseline_ms: float = float("nan")
    facts: dict = field(default_factory=dict)
    # per group, widths off the runtime's channel block measured too: what leaving the block costs on top
    unaligned: dict[str, dict[int, float]] = field(default_factory=dict)

    def delta(self, name: str, kept: int) -> float:
        """The measured change at ``kept`` channels, linear between measured widths (0 at the full width) and
        along the narrowest segment below the narrowest measured width."""
        ch = self.channels[name]
        if kept >= ch or not self.deltas.get(name):
            return 0.0
        pts = sorted({**{int(k): float(v) for k, v in self.deltas[name].items()}, ch: 0.0}.items())
        ks, ds = [k for k, _ in pts], [d for _, d in pts]
        if kept < ks[0]:
            smooth = ds[0] + (kept - ks[0]) * (ds[1] - ds[0]) / (ks[1] - ks[0])
        else:
            smooth = float(np.interp(kept, ks, ds))
        probes = self.unaligned.get(name)
        if probes and kept % BLOCK:
            aligned = LatencyTable(self.channels, {name: self.deltas[name]})
            smooth += float(np.mean([d - aligned.delta(name, k) for k, d in probes.items()]))
        return smooth

    def share(self, kept: dict[str, int]) -> float:
        """Predicted latency share of a configuration: 1 plus every group's measured change."""
        return 1.0 + sum(self.delta(n, k) for n, k in kept.items())

    def to_json(self) -> dict:
        return {"format": TABLE_FORMAT, "channels": self.channels, "baseline_ms": self.baseline_ms,
                "deltas": {n: {str(k): v for k, v in row.items()} for n, row in self.deltas.items()},
                "unaligned": {n: {str(k): v for k, v in row.items()} for n, row in self.unaligned.items()},
                "facts": self.facts}

    @classmethod
    def from_json(cls, doc: dict) -> LatencyTable:
        def rows(part):
            return {n: {int(k): float(v) for k, v in row.items()} for n, row in (doc.get(part) or {}).items()}

        return cls(dict(doc["channels"]), rows("deltas"), doc["baseline_ms"], doc["facts"], rows("unaligned"))


def _pruned_copy(model, groups, kept: dict[str, int]):
    """A copy of ``model`` with each named group cut to its kept count (the last channels go: which channels go
    does not change the latency)."""
    from .surgery import prune_group

    model, groups = copy.deepcopy((model, groups))
    by_name = {g.name: g for g in groups}
    for n, k in kept.items():
        if k < by_name[n].channels:
            prune_group(model, by_name[n], list(range(k, by_name[n].channels)))
    return model


def table_widths(channels: dict[str, int], names, widths, align, min_channels) -> dict[str, list[int]]:
    """The kept counts the table measures per group: each ratio of ``widths`` as the plan would round it."""
    out = {}
    for n in names:
        ks = sorted({_kept_channels(channels[n], r, align, min_channels) for r in widths} - {channels[n]},
                    reverse=True)
        if ks:
            out[n] = ks
    return out


def unaligned_probes(channels: dict[str, int], measured: dict[str, list[int]], align) -> dict[str, list[int]]:
    """One width per group off the runtime's channel block (the middle measured width minus one), measured when
    the plan may keep such widths (``align`` not a multiple of :data:`BLOCK`) and the group's measured widths are
    on the block; none otherwise."""
    if align and align % BLOCK == 0:
        return {}
    out = {}
    for n, ks in measured.items():
        if channels[n] % BLOCK == 0 and all(k % BLOCK == 0 for k in ks):
            out[n] = [ks[len(ks) // 2] - 1]
    return out


def measure_latency_table(model, groups, bench: LatencyBench, to_measure: dict[str, list[int]],
                          probes: dict[str, list[int]] | None = None, *, progress: bool = True) -> LatencyTable:
    """Time the model with one group at a time cut to each of its widths (and ``probes``, widths off the
    channel block), against the unpruned export."""
    from tqdm import tqdm

    channels = {g.name: g.channels for g in groups if g.prunable}
    probes = probes or {}
    found: dict[str, dict[str, dict[int, float]]] = {"deltas": {}, "unaligned": {}}
    base_ms = []
    work = [("deltas", n, k) for n, ks in to_measure.items() for k in ks]
    work += [("unaligned", n, k) for n, ks in probes.items() for k in ks]
    with tqdm(total=len(work), desc="latency table", unit="export", disable=None if progress else True,
              leave=False) as bar:
        for part, n, k in work:
            m = bench.share(_pruned_copy(model, groups, {n: k}))
            found[part].setdefault(n, {})[k] = m["share"] - 1.0
            base_ms.append(m["baseline_ms"])
            bar.update()
    return LatencyTable(channels, found["deltas"], float(np.median(base_ms)) if base_ms else float("nan"),
                        unaligned=found["unaligned"])


def _versions() -> dict:
    from importlib import metadata

    out = {}
    for pkg in ("paddlepaddle", "paddle2onnx", "onnxruntime"):
        try:
            out[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            out[pkg] = None
    return out


def load_or_measure_table(model, groups, bench: LatencyBench, to_measure: dict[str, list[int]],
                          probes: dict[str, list[int]] | None = None, *, cache_dir: Path | None, identity,
                          progress: bool = True) -> tuple[LatencyTable, str]:
    """The latency table from the cache (same model, widths, input, runtime, threads, versions and machine),
    else measured and stored there. Returns it and ``"hit"``, ``"miss"`` or ``"off"``."""
    from ..cache import cache_entry
    from ..fileio import read_json, sha256_json, write_json

    s = bench.settings
    facts = {"model": identity, "channels": {g.name: g.channels for g in groups if g.prunable},
             "widths": to_measure, "unaligned": probes or {}, "input": s["input"], "batch": s["batch"],
             "runtime": s["runtime"],
             "threads": s["threads"], "repeats": s["repeats"], "versions": _versions(),
             "machine": {"node": platform.node(), "machine": platform.machine(), "processor": platform.processor(),
                         "cpu_count": os.cpu_count()}}
    key = sha256_json(facts)[:24]
    if cache_dir is None or not s["cache"]:
        table = measure_latency_table(model, groups, bench, to_measure, probes, progress=progress)
        table.facts = {**facts, "key": key}
        return table, "off"
    with cache_entry(Path(cache_dir) / f"{key}.json") as entry:
        if entry.ready:
            return LatencyTable.from_json(read_json(entry.path)), "hit"
        table = measure_latency_table(model, groups, bench, to_measure, probes, progress=progress)
        table.facts = {**facts, "key": key}
        write_json(entry.path, table.to_json())
        return table, "miss"


# --------------------------------------------------------------------------- the prune stage's entry point


@dataclass
class LatencyOutcome:
    settings: dict
    plan: LatencyPlan
    bench: LatencyBench
    table: LatencyTable
    candidates: list[dict]  # every whole plan measured, in order
    table_cache: str
    base_flops: float

    @property
    def ratios(self) -> dict[str, float]:
        return self.plan.ratios

    @property
    def predicted_share(self) -> float:
        return self.plan.predicted_share

    def verify(self, pruned_model) -> dict:
        """Export the pruned model, time it interleaved with the baseline export: the stage's latency record."""
        from .graph import count_flops

        s = self.settings
        m = self.bench.share(pruned_model)
        flops_speedup = self.base_flops / count_flops(pruned_model, [1, *s["input"]])
        measured_speedup = 1.0 / m["share"]
        miss = abs(m["share"] - s["share"]) / s["share"]
        out = {"asked_share": s["share"], "predicted_share": self.plan.predicted_share, "measured_share": m["share"],
               "relative_error": miss, "within_5_percent": miss <= 0.05,
               "baseline_ms": m["baseline_ms"], "pruned_ms": m["candidate_ms"],
               "flops_speedup": flops_speedup, "measured_speedup": measured_speedup,
               "measured_over_flops_speedup": measured_speedup / flops_speedup,
               "estimated_loss": self.plan.estimated_loss,
               "runtime": s["runtime"], "threads": s["threads"], "batch": s["batch"], "input": s["input"],
               "repeats": s["repeats"],
               "table": {"cache": self.table_cache, "key": self.table.facts.get("key"),
                         "measurements": sum(len(v) for part in (self.table.deltas, self.table.unaligned)
                                             for v in part.values())},
               "candidates": self.candidates}
        print(f"  latency on {s['runtime']} ({s['threads']} thread{'s' if s['threads'] > 1 else ''}, batch "
              f"{s['batch']}, input {'x'.join(map(str, s['input']))}): asked {s['share']:.3f}, predicted "
              f"{self.plan.predicted_share:.3f}, measured {m['share']:.3f} "
              f"({'within' if out['within_5_percent'] else 'NOT within'} 5%); speed-up {measured_speedup:.2f}x "
              f"measured vs {flops_speedup:.2f}x by FLOPs "
              f"(ratio {out['measured_over_flops_speedup']:.2f})")
        return out


def plan_latency(model, input_shape, table: dict, spec, *, align=None, min_channels=None, tolerance: float = 0.01,
                 cache_dir: Path | None = None, identity=None, progress: bool = True) -> LatencyOutcome:
    """Plan the prune stage's latency target: measure (or reuse) the latency table, plan, measure the plan, scale
    the table's predicted saving by the measured one and plan again, up to ``rounds`` plans; keep the measured
    plan nearest the asked share. ``table`` is the sensitivity table of the groups that may be pruned."""
    from .graph import count_flops
    from .plan import analyse

    s = latency_settings(spec, input_shape)
    align = _check_align(align)
    min_channels = _check_min_channels(min_channels)
    groups, _ = analyse(model, input_shape)
    channels, rows = _group_channels(model, input_shape, table, None)
    bench = LatencyBench(model, s)
    to_measure = table_widths(channels, rows, s["widths"], align, min_channels)
    probes = unaligned_probes(channels, to_measure, align)
    lat, cache = load_or_measure_table(model, groups, bench, to_measure, probes, cache_dir=cache_dir,
                                       identity=identity, progress=progress)
    base_flops = count_flops(model, [1, *s["input"]])
    alpha, candidates, plans = 1.0, [], {}
    for r in range(s["rounds"]):
        def cost(kept, a=alpha):
            return 1.0 - a * (1.0 - lat.share(kept))

        try:
            plan = ratios_for_latency_target(model, input_shape, rows, s["share"], cost, tolerance=tolerance,
                                             align=align, min_channels=min_channels)
        except RecipeError as e:
            if not candidates:
                raise
            # corrected, the table says the share is out of reach: keep the nearest plan measured
            print(f"  latency plan {r + 1}: none, the corrected table (alpha {alpha:.2f}) says: "
                  f"{e.problems[0].message}")
            break
        key = tuple(sorted(plan.kept.items()))
        if key in plans:  # the corrected model chose a plan already measured
            break
        pruned = _pruned_copy(model, groups, plan.kept)
        m = bench.share(pruned)
        additive = lat.share(plan.kept)
        candidates.append({"round": r + 1, "alpha": alpha, "predicted_share": plan.predicted_share,
                           "table_share": additive, "measured_share": m["share"],
                           "estimated_loss": plan.estimated_loss,
                           "flops_share": count_flops(pruned, [1, *s["input"]]) / base_flops,
                           "kept": dict(plan.kept)})
        plans[key] = plan
        print(f"  latency plan {r + 1}: predicted {plan.predicted_share:.3f}, measured {m['share']:.3f} "
              f"(asked {s['share']:.3f}; estimated loss {plan.estimated_loss:.4f})")
        if abs(m["share"] - s["share"]) / s["share"] <= GOOD_ENOUGH:
            break
        if 1.0 - additive > 1e-3:  # the saving the plan really got over the one the table promised
            alpha = min(5.0, max(0.2, (1.0 - m["share"]) / (1.0 - additive)))
    best = min(candidates, key=lambda c: abs(c["measured_share"] - s["share"]))
    best["chosen"] = True
    return LatencyOutcome(s, plans[tuple(sorted(best["kept"].items()))], bench, lat, candidates, cache, base_flops)
