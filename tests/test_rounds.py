"""prune.target.eval_metric_loss as the delivered model's loss: rounds of prune -> finetune that back off until
the target is met, within a budget, resumable, recorded in rounds.json and the report.

The tiny cls_prune recipe runs its real train, evaluate, sensitivity and prune stages; in place of finetune a
test stage scores the pruned model by a fixed rule of its FLOPs cut, so which round meets the target is known
in advance (the rounds are what is under test, not finetuning)."""

from __future__ import annotations

import json

import pytest

from slimrecipe import registry
from slimrecipe.config import compose, validate
from slimrecipe.run import execute

STAGES = "stages=[train,evaluate,sensitivity,prune,_test_score,report]"


@pytest.fixture
def scoring():
    """A stage that delivers ``rule(baseline metric, FLOPs cut, round)`` and counts its calls."""
    box = {"rule": None, "calls": [], "interrupt_at": None}

    @registry.register("stage", "_test_score")
    def score(state, params):
        cut = state.results["prune"]["flops_cut"]
        k = state.round["index"]
        box["calls"].append(k)
        if box["interrupt_at"] == len(box["calls"]):
            raise KeyboardInterrupt
        return {"metric": box["rule"](state.results["evaluate"]["metric"], cut, k)}

    yield box
    registry.REGISTRIES["stage"].unregister("_test_score")


def _recipe(target: float, rounds: int, reach: float = 20):
    return validate(compose(["+recipe=cls_prune", "+profile=smoke", STAGES, "~prune.target.per_layer_loss",
                             f"+prune.target.eval_metric_loss={target}", f"+prune.rounds={rounds}",
                             f"+prune.first_round_reach={reach}", "+report.detections=0"]))


def _rounds(run_dir):
    return json.loads((run_dir / "rounds.json").read_text())


def _delivered_round(run_dir):
    return json.loads((run_dir / "stages" / "4-prune" / "result.json").read_text())["round"]


def test_backs_off_until_met_and_stops_there(scoring, tmp_path):
    scoring["rule"] = lambda base, cut, k: base - 0.5 * cut
    recipe = _recipe(target=0.03, rounds=5)
    run_dir = tmp_path / "run"
    state = execute(recipe, run_dir)
    doc = _rounds(run_dir)
    cuts = [r["flops_cut"] for r in doc["rounds"]]
    assert doc["met"] is True and doc["delivered"] == len(doc["rounds"]) - 1 < 5
    assert all(b < a for a, b in zip(cuts, cuts[1:])), cuts  # each round prunes less
    assert [r["met"] for r in doc["rounds"]] == [False] * (len(cuts) - 1) + [True]
    assert doc["rounds"][-1]["loss"] <= 0.03 < doc["rounds"][-2]["loss"]
    assert scoring["calls"] == list(range(len(cuts)))  # one scoring per round, none after the target was met
    # the run's own stage directories, plan and final state are the delivered round's
    assert _delivered_round(run_dir) == doc["delivered"]
    plan = json.loads((run_dir / "plan.json").read_text())
    assert plan == json.loads((run_dir / "stages" / "4-prune" / "result.json").read_text())["checkpoint"]["plan"]
    assert state.results["prune"]["flops_cut"] == pytest.approx(cuts[-1])
    for k in range(len(cuts) - 1):
        assert json.loads((run_dir / "rounds" / str(k) / "4-prune" / "result.json").read_text())["round"] == k
    report = (run_dir / "report.md").read_text()
    assert "## Rounds (prune.target.eval_metric_loss)" in report and "(target met)" in report
    assert (run_dir / "report_rounds.png").is_file()


def test_unmeetable_target_keeps_the_closest_round_and_says_so(scoring, tmp_path, capsys):
    # round 1 is far worse than round 0: the closest is an earlier round, which must come back
    scoring["rule"] = lambda base, cut, k: base - 0.9 if k == 1 else base - 0.5 * cut
    recipe = _recipe(target=0.001, rounds=2, reach=100)
    run_dir = tmp_path / "run"
    state = execute(recipe, run_dir)
    doc = _rounds(run_dir)
    assert doc["met"] is False and len(doc["rounds"]) == 2 and doc["delivered"] == 0
    assert "was not met within 2 round(s)" in doc["message"] and "delivering round 0" in doc["message"]
    assert "was not met" in capsys.readouterr().out
    assert _delivered_round(run_dir) == 0
    assert state.results["_test_score"]["metric"] == pytest.approx(doc["rounds"][0]["metric"])
    assert state.results["prune"]["flops_cut"] == pytest.approx(doc["rounds"][0]["flops_cut"])
    assert json.loads((run_dir / "rounds" / "1" / "4-prune" / "result.json").read_text())["round"] == 1
    assert json.loads((run_dir / "plan.json").read_text()) == json.loads(
        (run_dir / "rounds" / "0" / "plan.json").read_text())
    assert "NOT met" in (run_dir / "report.md").read_text()


def test_interrupted_round_resumes_into_the_same_plan(scoring, tmp_path):
    scoring["rule"] = lambda base, cut, k: base - 0.5 * cut
    recipe = _recipe(target=0.03, rounds=5)
    reference = execute(recipe, tmp_path / "reference")
    n_rounds = len(_rounds(tmp_path / "reference")["rounds"])
    assert n_rounds >= 2
    scoring["calls"].clear()
    scoring["interrupt_at"] = 2  # killed while scoring round 1, after round 0 was archived
    run_dir = tmp_path / "run"
    with pytest.raises(KeyboardInterrupt):
        execute(recipe, run_dir)
    assert _rounds(run_dir)["current"] == 1 and (run_dir / "rounds" / "0" / "4-prune").is_dir()
    scoring["interrupt_at"] = None
    state = execute(recipe, run_dir)  # what `slimrecipe resume` does
    assert scoring["calls"] == [0, 1] + list(range(1, n_rounds))  # round 0 not redone
    assert _rounds(run_dir)["rounds"] == _rounds(tmp_path / "reference")["rounds"]
    assert state.results["prune"]["checkpoint"]["plan"] == reference.results["prune"]["checkpoint"]["plan"]


def test_a_kill_between_moves_is_finished_on_resume(scoring, tmp_path):
    scoring["rule"] = lambda base, cut, k: base - 0.9 if k == 1 else base - 0.5 * cut
    recipe = _recipe(target=0.001, rounds=2, reach=100)
    run_dir = tmp_path / "run"
    execute(recipe, run_dir)
    # as if killed after rounds.json chose round 0 but before round 1's prune directory moved out
    (run_dir / "stages" / "4-prune").rename(run_dir / "rounds" / "0" / "4-prune")
    (run_dir / "rounds" / "1" / "4-prune").rename(run_dir / "stages" / "4-prune")
    calls = len(scoring["calls"])
    state = execute(recipe, run_dir)
    assert len(scoring["calls"]) == calls  # nothing ran again
    assert _delivered_round(run_dir) == 0 and state.results["prune"]["round"] == 0
    assert json.loads((run_dir / "rounds" / "1" / "4-prune" / "result.json").read_text())["round"] == 1


def test_per_layer_loss_keeps_paddlex_meaning_without_rounds(tmp_path):
    recipe = validate(compose(["+recipe=cls_prune", "+profile=smoke",
                               "stages=[train,evaluate,sensitivity,prune,report]", "+report.detections=0"]))
    assert recipe["prune"]["target"] == {"per_layer_loss": 0.2}
    execute(recipe, tmp_path / "run")
    assert not (tmp_path / "run" / "rounds.json").exists()
