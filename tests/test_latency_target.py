"""Latency targets: the planner against brute force, unreachable budgets, the latency table, the correction rounds
with a stand-in runtime, and the recipe key. No real timing here: that lives in bench/latency_target.py."""

from __future__ import annotations

import itertools
from types import SimpleNamespace

import pytest

from slimrecipe.errors import RecipeError

SHAPE = [3, 16, 16]
CHANNELS = (8, 16, 24)


def build(channels=CHANNELS):
    from slimrecipe.models.vision import tiny_cnn

    return tiny_cnn({"channels": list(channels)}, SimpleNamespace(input_shape=SHAPE, num_classes=10))


@pytest.fixture(scope="module")
def tiny():
    from slimrecipe.pruning import prunable_params

    model = build()
    names = [e["name"] for e in prunable_params(model, SHAPE)]
    assert len(names) == 3
    # irregular rows: a group that is nearly free to prune, one that costs a lot, one whose loss dips (noise)
    table = {names[0]: {0.25: 0.02, 0.5: 0.09, 0.75: 0.30},
             names[1]: {0.25: 0.001, 0.5: 0.004, 0.75: 0.02},
             names[2]: {0.25: 0.03, 0.5: 0.02, 0.75: 0.05}}
    return SimpleNamespace(model=model, names=names, table=table, channels=dict(zip(names, CHANNELS)))


def staircase_cost(channels):
    """Additive, but far from linear: each group's cost steps every 4 channels, plus a fixed overhead."""
    weights = [3.0, 1.7, 0.9]

    def cost(kept):
        return 1.0 + sum(w * (-(-kept[n] // 4)) + 0.05 * kept[n] for w, n in zip(weights, channels))

    return cost


def brute_force(tiny, cost_fn, share, align=None):
    """Every combination of allowed widths: least estimated loss within the budget, of equal losses the costliest."""
    from slimrecipe.pruning.latency import estimated_loss

    names, ch = tiny.names, tiny.channels
    options = []
    for n in names:
        floor = ch[n] - round(ch[n] * 0.75)  # the widths the sensitivity rows cover
        unit = align or 1
        options.append([ch[n]] + [k for k in range(unit, ch[n], unit) if k >= floor])
    full = {n: ch[n] for n in names}
    budget = share * cost_fn(full)
    best = None
    for combo in itertools.product(*options):
        kept = dict(zip(names, combo))
        c = cost_fn(kept)
        if c <= budget:
            key = (estimated_loss(tiny.table, ch, kept), -c)
            if best is None or key < best[0]:
                best = (key, kept)
    return best


@pytest.mark.parametrize("share", [0.4, 0.55, 0.7, 0.9])
@pytest.mark.parametrize("align", [None, 4])
def test_planner_finds_the_brute_force_plan(tiny, share, align):
    from slimrecipe.pruning.latency import estimated_loss, ratios_for_latency_target

    cost = staircase_cost(tiny.names)
    (want_loss, neg_cost), want = brute_force(tiny, cost, share, align)
    plan = ratios_for_latency_target(tiny.model, SHAPE, tiny.table, share, cost, tolerance=0.2, align=align)
    full = {n: tiny.channels[n] for n in tiny.names}
    got = {**full, **plan.kept}
    assert plan.estimated_loss == pytest.approx(want_loss, abs=1e-12)
    assert estimated_loss(tiny.table, tiny.channels, got) == pytest.approx(want_loss, abs=1e-12)
    assert cost(got) == pytest.approx(-neg_cost, abs=1e-9)
    assert plan.predicted_share == pytest.approx(cost(got) / cost(full))
    assert plan.predicted_share <= share
    if align:
        assert all(k % align == 0 for k in plan.kept.values())


def test_ratios_make_the_planned_plan(tiny):
    from slimrecipe.pruning import make_plan
    from slimrecipe.pruning.latency import ratios_for_latency_target

    plan = ratios_for_latency_target(tiny.model, SHAPE, tiny.table, 0.5, staircase_cost(tiny.names),
                                     tolerance=0.2, align=4, min_channels=4)
    made = make_plan(tiny.model, SHAPE, None, plan.ratios, align=4, min_channels=4)
    assert {n: p["channels_after"] for n, p in made["params"].items() if p["ratio"] > 0} == plan.kept


def test_unreachable_budget_names_the_key(tiny):
    from slimrecipe.pruning.latency import ratios_for_latency_target

    with pytest.raises(RecipeError) as e:
        ratios_for_latency_target(tiny.model, SHAPE, tiny.table, 0.1, staircase_cost(tiny.names), tolerance=0.2)
    assert e.value.problems[0].path == "prune.target.latency.share"
    assert "out of reach" in str(e.value) and "0.1" in str(e.value)


def test_coarse_steps_that_undershoot_are_refused(tiny):
    from slimrecipe.pruning.latency import ratios_for_latency_target

    def lumpy(kept):  # only pruning group 0 below half saves anything, and then a lot
        return 10.0 - (6.0 if kept[tiny.names[0]] <= 4 else 0.0)

    with pytest.raises(RecipeError, match="prune.tolerance"):
        ratios_for_latency_target(tiny.model, SHAPE, tiny.table, 0.9, lumpy, tolerance=0.05)
    plan = ratios_for_latency_target(tiny.model, SHAPE, tiny.table, 0.9, lumpy, tolerance=0.6)
    assert plan.kept == {tiny.names[0]: 4} and plan.predicted_share == pytest.approx(0.4)


def test_non_additive_cost_stays_within_budget(tiny):
    """FLOPs multiply across neighbouring groups: the plan is still checked against the cost function itself."""
    from slimrecipe.pruning.latency import ratios_for_latency_target
    from slimrecipe.pruning.plan import FlopsProbe

    probe = FlopsProbe(tiny.model, SHAPE)

    def flops_share(kept):
        return 1.0 - probe.cut(kept)

    plan = ratios_for_latency_target(tiny.model, SHAPE, tiny.table, 0.5, flops_share, tolerance=0.2)
    assert 0.3 <= flops_share({**{n: tiny.channels[n] for n in tiny.names}, **plan.kept}) <= 0.5


def test_latency_table_interpolates_and_predicts_additively():
    from slimrecipe.pruning.latency import LatencyTable

    t = LatencyTable({"a": 32, "b": 16}, {"a": {24: -0.1, 16: -0.3}, "b": {8: -0.2}})
    assert t.delta("a", 32) == 0.0 and t.delta("a", 28) == pytest.approx(-0.05)
    assert t.delta("a", 20) == pytest.approx(-0.2) and t.delta("a", 8) == pytest.approx(-0.5)  # extrapolated
    assert t.share({"a": 24, "b": 8}) == pytest.approx(0.7)
    assert LatencyTable.from_json(t.to_json()).share({"a": 20, "b": 12}) == pytest.approx(t.share({"a": 20, "b": 12}))
    # a width off the channel block measured slower than its neighbours: every off-block width pays the same extra
    t.unaligned = {"a": {23: 0.2}}
    assert t.delta("a", 23) == pytest.approx(0.2) and t.delta("a", 20) == pytest.approx(-0.2 + 0.325)
    assert t.delta("a", 16) == pytest.approx(-0.3) and t.delta("a", 24) == pytest.approx(-0.1)
    assert LatencyTable.from_json(t.to_json()).delta("a", 20) == pytest.approx(t.delta("a", 20))


def test_unaligned_probes_only_when_the_plan_may_leave_the_block():
    from slimrecipe.pruning.latency import unaligned_probes

    measured = {"a": [48, 32, 16], "b": [6, 4]}
    assert unaligned_probes({"a": 64, "b": 8}, measured, None) == {"a": [31]}
    assert unaligned_probes({"a": 64, "b": 8}, measured, 8) == {}


class FlopsRuntime:
    """Stands in for an exported model on a runtime: its latency is its FLOPs plus a fixed overhead."""

    exports = 0

    def __init__(self, model, settings, seed=0):
        from slimrecipe.pruning import count_flops

        self.settings = settings
        self.flops = lambda m: count_flops(m, [1, *settings["input"]]) + 4e4
        self.base = self.flops(model)

    def share(self, model=None, runner=None):
        FlopsRuntime.exports += 1
        s = self.flops(model) / self.base
        return {"share": s, "ratio_of_medians": s, "baseline_ms": 1.0, "candidate_ms": s}


def test_plan_latency_corrects_the_table_and_verifies(tiny, tmp_path, monkeypatch, capsys):
    """The additive table over-predicts deep cuts (FLOPs multiply); measured whole plans correct it; the table is
    cached per model and runtime; the verification reports asked, predicted and measured shares."""
    from slimrecipe.pruning import latency
    from slimrecipe.pruning.latency import _pruned_copy, plan_latency
    from slimrecipe.pruning.plan import analyse

    monkeypatch.setattr(latency, "LatencyBench", FlopsRuntime)
    spec = {"share": 0.45, "widths": [0.25, 0.5, 0.75], "rounds": 4}
    FlopsRuntime.exports = 0
    out = plan_latency(tiny.model, SHAPE, tiny.table, spec, tolerance=0.05, cache_dir=tmp_path, identity="tiny",
                       progress=False)
    assert out.table_cache == "miss" and FlopsRuntime.exports == 9 + len(out.candidates)
    first = out.candidates[0]
    assert first["measured_share"] > first["table_share"] + 0.02  # the additive table promised too much
    if len(out.candidates) > 1:
        assert out.candidates[1]["alpha"] < 1.0
    groups, _ = analyse(tiny.model, SHAPE)
    report = out.verify(_pruned_copy(tiny.model, groups, out.plan.kept))
    assert report["asked_share"] == 0.45 and report["within_5_percent"]
    assert abs(report["measured_share"] - 0.45) <= 0.05 * 0.45
    assert report["flops_speedup"] > 1.5 and report["measured_over_flops_speedup"] < 1.0  # the overhead stays
    assert "asked 0.450" in capsys.readouterr().out

    FlopsRuntime.exports = 0
    again = plan_latency(tiny.model, SHAPE, tiny.table, spec, tolerance=0.05, cache_dir=tmp_path, identity="tiny",
                         progress=False)
    assert again.table_cache == "hit" and FlopsRuntime.exports == len(again.candidates)
    other = plan_latency(tiny.model, SHAPE, tiny.table, {**spec, "threads": 2}, tolerance=0.05, cache_dir=tmp_path,
                         identity="tiny", progress=False)
    assert other.table_cache == "miss"


def test_settings_fill_defaults_and_accept_a_bare_share():
    from slimrecipe.pruning.latency import latency_settings

    s = latency_settings(0.5, [3, 32, 32])
    assert s["share"] == 0.5 and s["runtime"] == "onnxruntime" and s["threads"] == 1 and s["batch"] == 1
    assert s["input"] == [3, 32, 32]
    assert latency_settings({"share": 0.4, "input": [3, 64, 64]}, [3, 32, 32])["input"] == [3, 64, 64]
    with pytest.raises(RecipeError, match="strictly between"):
        latency_settings({"share": 1.0}, [3, 32, 32])


def test_recipe_key_accepted_and_refused(run_cli):
    base = ("validate", "+recipe=cls_prune", "~prune.target.eval_metric_loss")
    ok = run_cli(*base, "+prune.target.latency.share=0.5", "+prune.target.latency.runtime=paddle_inference")
    assert ok.returncode == 0, ok.stderr
    assert run_cli(*base, "+prune.target.latency=0.5").returncode == 0
    bad = run_cli(*base, "+prune.target.latency.share=1.5")
    assert bad.returncode == 2 and "Traceback" not in bad.stderr
    assert "prune.target.latency.share" in bad.stderr and "must be < 1" in bad.stderr
    bad = run_cli(*base, "+prune.target.latency.share=0.5", "+prune.target.latency.runtime=tensorrt")
    assert bad.returncode == 2 and "prune.target.latency.runtime" in bad.stderr
    both = run_cli("validate", "+recipe=cls_prune", "+prune.target.latency=0.5")
    assert both.returncode == 2 and "prune.target" in both.stderr
