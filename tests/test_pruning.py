"""Pruning library: listing, counting, sensitivity (exact restore, resume), safe sensitivity files, planning."""

from __future__ import annotations

import json
import math
import os
import pickle
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from slimrecipe import pruning
from slimrecipe.errors import RecipeError, StageError
from slimrecipe.fileio import read_json, write_json

DATA = SimpleNamespace(input_shape=[3, 16, 16], num_classes=10)
SHAPE = [3, 16, 16]
REPO = Path(__file__).resolve().parent.parent


def P():
    from slimrecipe.paddle_env import paddle

    return paddle()


def build(channels=(8, 16, 32)):
    from slimrecipe.models.vision import tiny_cnn

    return tiny_cnn({"channels": list(channels)}, DATA)


@pytest.fixture(scope="module")
def trained(trained_tiny_cnn):
    """A tiny_cnn [16, 32, 64] trained briefly on a synthetic 10-class task, plus its held-out batch."""
    x, y = trained_tiny_cnn.batches[0]
    return SimpleNamespace(state=trained_tiny_cnn.state, x=x, y=y)


def trained_copy(trained):
    model = build((16, 32, 64))
    model.set_state_dict({k: v.copy() for k, v in trained.state.items()})
    model.eval()
    return model


def accuracy(trained):
    x = P().to_tensor(trained.x)

    def evaluate(model):
        return float((model(x).numpy().argmax(1) == trained.y).mean())

    return evaluate


def state_of(model) -> dict:
    return {k: v.numpy().copy() for k, v in model.state_dict().items()}


def assert_same_state(model, before: dict):
    after = state_of(model)
    assert list(after) == list(before)
    for k in before:
        assert after[k].shape == before[k].shape, k
        assert after[k].dtype == before[k].dtype, k
        assert np.array_equal(after[k], before[k]), k


def smooth_table(scale=None):
    scale = scale or {"0.weight": 0.5, "4.weight": 0.3, "8.weight": 0.8}
    return {name: {round(r, 1): s * r for r in np.arange(0.1, 1.0, 0.1)} for name, s in scale.items()}


# ------------------------------------------------------------------------------ listing and counting


def test_prunable_params_in_input_order_with_coupled_weights():
    nn = P().nn

    class Net(nn.Layer):
        def __init__(self):
            super().__init__()
            # defined out of forward order on purpose
            self.c3 = nn.Conv2D(8, 16, 3, padding=1)
            self.c1 = nn.Conv2D(3, 8, 3, padding=1)
            self.c2 = nn.Conv2D(8, 8, 3, padding=1)
            self.dw = nn.Conv2D(16, 16, 3, padding=1, groups=16)
            self.up = nn.Conv2DTranspose(16, 8, 2, stride=2)
            self.head = nn.Conv2D(8, 4, 1)

        def forward(self, x):
            a = self.c1(x)
            b = self.c2(a) + a  # c2 must lose the same channels as c1
            return self.head(self.up(self.dw(self.c3(b))))

    entries = pruning.prunable_params(Net(), [3, 8, 8])
    # the transposed convolution's output is a group of its own; the head's output is the model's: not listed
    assert [e["name"] for e in entries] == ["c1.weight", "c3.weight", "up.weight"]
    assert [e["index"] for e in entries] == [0, 1, 2]
    assert {"c1.weight@0", "c2.weight@0", "c2.weight@1", "c3.weight@1"} <= set(entries[0]["members"])
    assert {"c3.weight@0", "dw.weight@0", "up.weight@0"} <= set(entries[1]["members"])
    assert "up.weight@1" in entries[2]["members"] and "head.weight@1" in entries[2]["members"]
    assert [e["type"] for e in entries] == ["conv", "conv", "transpose"] and entries[1]["channels"] == 16

    tiny = pruning.prunable_params(build(), SHAPE)
    assert [(e["name"], e["channels"]) for e in tiny] == [("0.weight", 8), ("4.weight", 16), ("8.weight", 32)]


def test_counts():
    model = build()
    # conv+fc multiply-adds: 8*27*16*16 + 16*72*8*8 + 32*144*4*4 + 32*10
    assert pruning.count_flops(model, SHAPE) == 55296 + 73728 + 73728 + 320
    # weights + batch-norm scale/shift/mean/variance + linear
    assert pruning.count_params(model) == 216 + 1152 + 4608 + 4 * (8 + 16 + 32) + 330
    assert pruning.count_params(model, trainable_only=True) == 216 + 1152 + 4608 + 2 * (8 + 16 + 32) + 330

    plan = pruning.apply_plan(model, SHAPE, pruning.make_plan(model, SHAPE, None, {"0.weight": 0.5}))
    assert plan["params"]["0.weight"]["channels_after"] == 4 and len(plan["params"]["0.weight"]["removed"]) == 4
    assert pruning.count_params(model) == 108 + 576 + 4608 + 4 * (4 + 16 + 32) + 330
    assert pruning.count_flops(model, SHAPE) == 55296 / 2 + 73728 / 2 + 73728 + 320


# ------------------------------------------------------------------------------------------- plans


def test_plan_on_trained_model_reapplied_to_fresh_model_gives_identical_outputs(trained, tmp_path):
    model = trained_copy(trained)
    original_first = model[0].weight.numpy().copy()
    prunable = pruning.prunable_params(model, SHAPE)
    plan = pruning.make_plan(model, SHAPE, prunable, {"0.weight": 0.5, "4.weight": 0.25}, {},
                             criterion="l1_norm")
    plan = pruning.apply_plan(model, SHAPE, plan)
    write_json(tmp_path / "plan.json", plan)
    assert [model[i].weight.shape[0] for i in (0, 4, 8)] == [8, 24, 64]
    assert not any("_backup" in k for k in model.state_dict())

    # the plan records which channels went; the trained filters that stay keep their order (trap 4)
    removed = plan["params"]["0.weight"]["removed"]
    assert len(removed) == 8 and removed == sorted(removed)
    kept = [i for i in range(16) if i not in removed]
    assert np.array_equal(model[0].weight.numpy(), original_first[kept])

    weights = model.state_dict()
    x = P().to_tensor(trained.x)
    expected = model(x).numpy()

    fresh = build((16, 32, 64))  # other internal parameter names, random weights
    assert fresh[0].weight.name != model[0].weight.name
    pruning.load_pruned(fresh, SHAPE, read_json(tmp_path / "plan.json"), weights)
    fresh.eval()
    assert np.array_equal(fresh(x).numpy(), expected)
    assert not any("_backup" in k for k in fresh.state_dict())


def test_load_pruned_fails_loudly_on_weights_from_another_plan(trained):
    model = trained_copy(trained)
    prunable = pruning.prunable_params(model, SHAPE)
    plan_a = pruning.make_plan(model, SHAPE, prunable, {"4.weight": 0.5}, {})
    plan_b = pruning.make_plan(model, SHAPE, prunable, {"4.weight": 0.25}, {})
    plan_a = pruning.apply_plan(model, SHAPE, plan_a)
    weights = dict(model.state_dict())
    with pytest.raises(StageError, match=r"shape .*4\.weight \[16, 16, 3, 3\] vs \[24, 16, 3, 3\]"):
        pruning.load_pruned(build((16, 32, 64)), SHAPE, plan_b, weights)
    del weights["9.bias"]
    with pytest.raises(StageError, match=r"missing \['9\.bias'\]"):
        pruning.load_pruned(build((16, 32, 64)), SHAPE, plan_a, weights)


def test_apply_plan_refuses_a_plan_for_another_architecture():
    big = build((16, 32, 64))
    plan = pruning.make_plan(big, SHAPE, pruning.prunable_params(big, SHAPE), {"0.weight": 0.5}, {})
    small = build()
    before = state_of(small)
    with pytest.raises(StageError, match="channels before pruning"):
        pruning.apply_plan(small, SHAPE, plan)
    assert_same_state(small, before)


def test_plan_covers_every_parameter_and_align_gives_multiples(trained):
    model = trained_copy(trained)
    prunable = pruning.prunable_params(model, SHAPE)
    plan = pruning.make_plan(model, SHAPE, prunable, {"0.weight": 0.3, "4.weight": 0.55, "8.weight": 0.2},
                             {}, align=8)
    after = {n: p["channels_after"] for n, p in plan["params"].items()}
    # 16*0.7 keeps 11 -> 8; 32*0.45 keeps 14 -> 16; 64*0.8 keeps 51 -> 48
    assert after == {"0.weight": 8, "4.weight": 16, "8.weight": 48}
    for p in plan["params"].values():
        assert p["ratio"] == 1 - p["channels_after"] / p["channels_before"]
    pruning.apply_plan(model, SHAPE, plan)
    assert [model[i].weight.shape[0] for i in (0, 4, 8)] == [8, 16, 48]

    skipped = {"0.weight": "skip.first_n: 1st prunable convolution from the input"}
    plan = pruning.make_plan(None, SHAPE, prunable, {"0.weight": 0.5, "8.weight": 0.5}, skipped)
    assert {k: v for k, v in plan["params"]["0.weight"].items() if k != "members"} == {
        "ratio": 0.0, "channels_before": 16, "channels_after": 16, "rule": skipped["0.weight"]}
    assert plan["params"]["4.weight"]["rule"] == "kept" and plan["params"]["4.weight"]["ratio"] == 0
    assert plan["params"]["8.weight"]["channels_after"] == 32


# ------------------------------------------------------------------------------------------ sensitivity


def test_sensitivity_measures_every_point_and_leaves_the_model_unchanged(trained):
    model = trained_copy(trained)
    before = state_of(model)
    evaluate = accuracy(trained)
    baseline = evaluate(model)
    result = pruning.compute_sensitivity(model, SHAPE, evaluate, ratios=[0.5, 0.25], progress=False)
    assert result["baseline"] == baseline > 0.5
    assert result["evaluations"] == 1 + 3 * 2
    assert result["ratios"] == [0.25, 0.5] and result["criterion"] == "l1_norm"
    assert list(result["table"]) == ["0.weight", "4.weight", "8.weight"]
    assert all(list(row) == ["0.25", "0.5"] for row in result["table"].values())
    assert_same_state(model, before)
    assert [model[i]._groups for i in (0, 4, 8)] == [1, 1, 1] and not model.training
    assert evaluate(model) == baseline


def test_sensitivity_measures_pruned_copies_and_never_the_model_itself(trained):
    model = trained_copy(trained)
    x = P().to_tensor(trained.x)
    seen = []

    def careless(m):  # runs in train mode: moves the batch-norm statistics of whatever it is given
        seen.append(m[0].weight.shape[0])
        m.train()
        m(x)
        return 1.0

    pruning.compute_sensitivity(model, SHAPE, careless, ratios=[0.5], params=["0.weight"], progress=False)
    assert seen == [16, 8]  # the baseline, then a copy without half of the first group's channels
    assert [model[i].weight.shape[0] for i in (0, 4, 8)] == [16, 32, 64]


def test_sensitivity_of_a_lower_is_better_metric(trained):
    model = trained_copy(trained)
    error = accuracy(trained)
    result = pruning.compute_sensitivity(model, SHAPE, lambda m: 1.5 - error(m), ratios=[0.75], progress=False,
                                         higher_is_better=False)
    # pruning raises the error: a positive loss, as for a falling accuracy
    assert all(row["0.75"] > 0 for row in result["table"].values())


@pytest.mark.parametrize("criterion", ["l2_norm", "fpgm"])
def test_sensitivity_other_criteria(trained, criterion):
    model = trained_copy(trained)
    before = state_of(model)
    result = pruning.compute_sensitivity(model, SHAPE, accuracy(trained), ratios=[0.5], criterion=criterion,
                                         params=["4.weight"], progress=False)
    assert list(result["table"]) == ["4.weight"] and result["evaluations"] == 2
    assert_same_state(model, before)


def test_interrupted_sensitivity_resumes_where_it_stopped(trained, tmp_path):
    ratios = [0.2, 0.4, 0.6]
    full = pruning.compute_sensitivity(trained_copy(trained), SHAPE, accuracy(trained), ratios=ratios,
                                       progress=False)
    assert full["evaluations"] == 10

    model = trained_copy(trained)
    before = state_of(model)
    evaluate, calls = accuracy(trained), []

    def flaky(m):
        calls.append(1)
        if len(calls) > 4:  # the baseline and 3 points get through
            raise KeyboardInterrupt
        return evaluate(m)

    checkpoint = tmp_path / "sens.partial.json"
    with pytest.raises(KeyboardInterrupt):
        pruning.compute_sensitivity(model, SHAPE, flaky, ratios=ratios, checkpoint_path=checkpoint,
                                    progress=False)
    assert_same_state(model, before)  # restored although evaluate raised mid-trial
    assert sum(len(r) for r in read_json(checkpoint)["table"].values()) == 3

    resumed = pruning.compute_sensitivity(model, SHAPE, evaluate, ratios=ratios, checkpoint_path=checkpoint,
                                          progress=False)
    assert resumed["table"] == full["table"]
    assert resumed["evaluations"] == full["evaluations"] - 4
    assert_same_state(model, before)

    # a checkpoint belongs to the weights it measured
    other = trained_copy(trained)
    other[0].weight.set_value(other[0].weight.numpy() * 2)
    with pytest.raises(StageError, match="other weights"):
        pruning.compute_sensitivity(other, SHAPE, evaluate, ratios=ratios, checkpoint_path=checkpoint,
                                    progress=False)


def test_loss_ceiling_stops_raising_a_parameters_ratio():
    model = build()
    original = {e["name"]: e["channels"] for e in pruning.prunable_params(model, SHAPE)}

    def kept_share(m):  # the loss of one parameter pruned alone is the share of its filters removed
        params = dict(m.named_parameters())
        return math.prod(params[n].shape[0] / c for n, c in original.items())

    result = pruning.compute_sensitivity(model, SHAPE, kept_share, ratios=[0.1 * i for i in range(1, 10)],
                                         loss_ceiling=0.3, progress=True)
    # 8 filters: 1, 2, 2, 3 removed -> stops after 0.4 (0.375); 16: 2, 3, 5 -> 0.3125; 32: 3, 6, 10 -> 0.3125
    assert {n: list(row) for n, row in result["table"].items()} == {
        "0.weight": ["0.1", "0.2", "0.3", "0.4"], "4.weight": ["0.1", "0.2", "0.3"],
        "8.weight": ["0.1", "0.2", "0.3"]}
    assert result["table"]["0.weight"]["0.4"] == pytest.approx(3 / 8)
    assert result["evaluations"] == 1 + 4 + 3 + 3


def test_untrained_model_is_refused():
    model = build()
    before, calls = state_of(model), []
    with pytest.raises(StageError, match="baseline metric is 0.*Train the model first"):
        pruning.compute_sensitivity(model, SHAPE, lambda m: calls.append(1) or 0.0, ratios=[0.5],
                                    progress=False)
    assert len(calls) == 1
    assert_same_state(model, before)


# ---------------------------------------------------------------------------------- sensitivity files


class _System:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


class _Open:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return open, (str(self.marker), "w")


class _Eval:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return eval, (f"__import__('pathlib').Path({str(self.marker)!r}).touch()",)


def test_malicious_pickles_are_refused_and_run_nothing(tmp_path):
    marker = tmp_path / "pwned"
    cases = {
        "system": ({"0.weight": {0.1: _System(marker)}}, r"`posix\.system`"),
        "open": ({"0.weight": {0.1: _Open(marker)}}, r"`io\.open`"),
        "eval": ({"0.weight": {0.1: _Eval(marker)}}, r"`builtins\.eval`"),
    }
    for label, (payload, refused) in cases.items():
        f = tmp_path / f"{label}.pickle"
        f.write_bytes(pickle.dumps(payload))
        with pytest.raises(RecipeError, match=refused) as err:
            pruning.load_sensitivity_file(f, recipe_path="sensitivity.file")
        assert err.value.problems[0].path == "sensitivity.file"
        assert not marker.exists()

    # the Status class's module holds other classes; only Status itself is allowed
    module, name = b"paddleslim.dygraph.prune.filter_pruner", b"FilterPruner"
    evil = (b"\x80\x04\x8c" + bytes([len(module)]) + module + b"\x94\x8c" + bytes([len(name)]) + name
            + b"\x94\x93\x94)\x81\x94.")
    (tmp_path / "other.pickle").write_bytes(evil)
    with pytest.raises(RecipeError, match=r"filter_pruner\.FilterPruner"):
        pruning.load_sensitivity_file(tmp_path / "other.pickle")


def _paddleslim_status_pickle(path, sensitivities: dict) -> None:
    """A pickle shaped like PaddleSlim's FilterPruner.sensitive() file (a pickled Status), made without it."""
    import types

    module_name = "paddleslim.dygraph.prune.filter_pruner"
    status_module = types.ModuleType(module_name)

    class Status:
        def __init__(self):
            self.sensitivies = sensitivities
            self.accumulates = {}
            self.is_ckp = True

    Status.__module__, Status.__qualname__ = module_name, "Status"
    status_module.Status = Status
    saved = {k: sys.modules.get(k) for k in ("paddleslim", "paddleslim.dygraph", "paddleslim.dygraph.prune",
                                             module_name)}
    try:
        for k in saved:
            sys.modules[k] = status_module if k == module_name else types.ModuleType(k)
        path.write_bytes(pickle.dumps(Status(), protocol=2))
    finally:
        for k, v in saved.items():
            if v is None:
                sys.modules.pop(k, None)
            else:
                sys.modules[k] = v


def test_paddleslim_status_file_loads_to_the_same_numbers(tmp_path):
    model = build()
    written = {model[0].weight.name: {0.1: np.float64(0.01), 0.30000000000000004: 0.05},
               model[4].weight.name: {0.1: 0.0, 0.2: np.float32(0.25)}}
    path = tmp_path / "status.pickle"
    _paddleslim_status_pickle(path, written)
    assert path.read_bytes().find(b"filter_pruner") > 0  # a pickled Status object, not a plain dict
    expected = {p: {round(float(r), 6): float(v) for r, v in row.items()} for p, row in written.items()}

    assert pruning.load_sensitivity_file(path) == expected
    prunable = pruning.prunable_params(model, SHAPE)
    by_name = pruning.load_sensitivity_file(path, prunable=prunable)
    assert by_name["4.weight"] == expected[model[4].weight.name]

    # read without importing Paddle or PaddleSlim: the Status class is rebuilt as plain data
    code = ("import json, sys; from slimrecipe.pruning import load_sensitivity_file as load; "
            f"t = load({str(path)!r}); "
            "assert not any(m.split('.')[0] in ('paddle', 'paddleslim') for m in sys.modules), 'imported'; "
            "print(json.dumps({p: {str(r): v for r, v in row.items()} for p, row in t.items()}))")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout) == {p: {str(r): v for r, v in row.items()} for p, row in expected.items()}


def test_static_api_dict_pickle_and_json_tables(tmp_path):
    static = {"conv2d_0.w_0": {r: np.float64(r) / 4 for r in np.arange(0.1, 1, 0.1)},
              "conv2d_1.w_0": {0.5: 0.25, np.float32(0.25): np.float32(0.125)}}
    assert 0.30000000000000004 in static["conv2d_0.w_0"]
    for protocol in (0, 2, 4):
        f = tmp_path / f"static{protocol}.pickle"
        f.write_bytes(pickle.dumps(static, protocol=protocol))
        table = pruning.load_sensitivity_file(f)
        assert list(table["conv2d_0.w_0"]) == [0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9]
        assert table["conv2d_0.w_0"][0.3] == pytest.approx(0.075)
        assert table["conv2d_1.w_0"] == {0.25: 0.125, 0.5: 0.25}

    wrapped, plain = tmp_path / "wrapped.json", tmp_path / "plain.json"
    write_json(wrapped, {"baseline": 0.9, "table": {"4.weight": {"0.1": 0.01, "0.2": 0.03}}})
    write_json(plain, {"4.weight": {"0.1": 0.01, "0.2": 0.03}})
    assert pruning.load_sensitivity_file(wrapped) == pruning.load_sensitivity_file(plain) == {
        "4.weight": {0.1: 0.01, 0.2: 0.03}}


@pytest.mark.parametrize("content, message", [
    ({"4.weight": {"1.5": 0.1}}, "ratio '1.5' is not a number strictly between 0 and 1"),
    ({"4.weight": {"0.5": None}}, "loss at ratio '0.5' is None"),
    ({"4.weight": [0.1, 0.2]}, "expected {ratio: loss}"),
    ({}, "holds no sensitivity measurements"),
])
def test_invalid_tables_name_the_problem(tmp_path, content, message):
    f = tmp_path / "bad.json"
    write_json(f, content)
    with pytest.raises(RecipeError, match=re_escape(message)) as err:
        pruning.load_sensitivity_file(f, recipe_path="sensitivity.file")
    assert err.value.problems[0].path == "sensitivity.file"


def test_unreadable_or_missing_files(tmp_path):
    (tmp_path / "junk.bin").write_bytes(b"\x00\x01 not a pickle")
    with pytest.raises(RecipeError, match="neither slimrecipe JSON nor a PaddleSlim"):
        pruning.load_sensitivity_file(tmp_path / "junk.bin")
    with pytest.raises(RecipeError, match="does not exist"):
        pruning.load_sensitivity_file(tmp_path / "missing.json")


def re_escape(text):
    import re

    return re.escape(text)


# ------------------------------------------------------------------------------------ choosing ratios


def test_ratios_for_metric_loss_interpolates_toward_the_next_ratio():
    table = {
        "a": {0.1: 0.01, 0.2: 0.03, 0.3: 0.10},  # 0.2 is within 0.05: 0.2 + 0.02/0.07 * 0.1
        "b": {0.1: 0.20, 0.2: 0.30},  # never within: left out
        "c": {"0.1": 0.0, "0.5": 0.01},  # within at the last ratio: that ratio
        "d": {0.1: 0.0, 0.2: 0.20, 0.3: 0.01},  # largest ratio within wins, even past a worse one
        "e": {0.2: 0.04, 0.4: 0.06},  # 0.2 + 0.01/0.02 * 0.2
    }
    ratios = pruning.ratios_for_metric_loss(table, 0.05)
    assert set(ratios) == {"a", "c", "d", "e"}
    assert ratios["a"] == pytest.approx(0.2 + 0.1 * 2 / 7)
    assert ratios["c"] == 0.5 and ratios["d"] == 0.3
    assert ratios["e"] == pytest.approx(0.3)


def test_flops_target_lands_within_one_point(trained):
    model = trained_copy(trained)
    before = state_of(model)
    base = pruning.count_flops(model, SHAPE)
    table = smooth_table()
    for target in (0.2, 0.4, 0.6):
        ratios, achieved = pruning.ratios_for_flops_target(model, SHAPE, table, target, tolerance=0.01)
        assert abs(achieved - target) <= 0.01
        pruned = trained_copy(trained)
        plan = pruning.make_plan(pruned, SHAPE, pruning.prunable_params(pruned, SHAPE), ratios, {})
        pruning.apply_plan(pruned, SHAPE, plan)
        assert 1 - pruning.count_flops(pruned, SHAPE) / base == pytest.approx(achieved)
    # cheapest first: the least sensitive parameter is pruned hardest
    assert ratios["4.weight"] > ratios["0.weight"]
    assert_same_state(model, before)


def test_flops_target_on_a_coarse_net_with_a_flat_table():
    # every loss equal: the threshold cannot separate anything, so the search blends ratio sets and steps
    # single channels; 8 filters in the first layer make each of its channels ~8% of the FLOPs
    model = build()
    flat = {n: {0.1 * i: 0.0 for i in range(1, 10)} for n in ("0.weight", "4.weight", "8.weight")}
    for target in (0.3, 0.6):
        _, achieved = pruning.ratios_for_flops_target(model, SHAPE, flat, target, tolerance=0.01)
        assert abs(achieved - target) <= 0.01


def test_flops_target_with_align_and_paddleslim_names(trained):
    model = trained_copy(trained)
    internal = {e["name"]: e["param_name"] for e in pruning.prunable_params(model, SHAPE)}
    table = {internal[n]: row for n, row in smooth_table().items()}
    ratios, achieved = pruning.ratios_for_flops_target(model, SHAPE, table, 0.5, tolerance=0.03, align=8)
    assert abs(achieved - 0.5) <= 0.03
    plan = pruning.make_plan(model, SHAPE, pruning.prunable_params(model, SHAPE), ratios, {}, align=8)
    assert all(p["channels_after"] % 8 == 0 for p in plan["params"].values())


def test_flops_target_out_of_reach_says_the_reachable_range(trained):
    model = trained_copy(trained)
    table = {"4.weight": {0.1: 0.01, 0.2: 0.02}}
    with pytest.raises(RecipeError, match=r"reachable range is 0 to 0\.\d+") as err:
        pruning.ratios_for_flops_target(model, SHAPE, table, 0.5)
    assert err.value.problems[0].path == "prune.target.flops"


# ------------------------------------------------------------------------------------------ skip rules


@pytest.fixture(scope="module")
def tiny_prunable():
    return pruning.prunable_params(build(), SHAPE)


def test_skip_rules_select_and_explain(tiny_prunable):
    internal = tiny_prunable[2]["param_name"]
    kept, skipped = pruning.apply_skip_rules(tiny_prunable, None, {"first_n": 2})
    assert kept == ["8.weight"]
    assert skipped == {"0.weight": "skip.first_n: 1st prunable convolution from the input",
                       "4.weight": "skip.first_n: 2nd prunable convolution from the input"}

    kept, skipped = pruning.apply_skip_rules(tiny_prunable, None, {"names": ["4.weight", internal]})
    assert kept == ["0.weight"] and skipped["8.weight"] == "skip.names: listed"

    kept, skipped = pruning.apply_skip_rules(tiny_prunable, None, {"patterns": [r"[04]\.weight"]})
    assert kept == ["8.weight"] and skipped["4.weight"] == r"skip.patterns[0]: matches '[04]\\.weight'"

    table = {"0.weight": {0.25: 0.1, 0.75: 0.5}, "4.weight": {0.5: 0.1}, "8.weight": {0.5: 0.5}}
    kept, skipped = pruning.apply_skip_rules(tiny_prunable, table, {"loss_above": {"ratio": 0.5, "max_loss": 0.2}})
    assert kept == ["4.weight"]  # 0.weight interpolates to 0.3 at 0.5
    assert skipped["0.weight"] == "skip.loss_above: loss 0.3 at ratio 0.5 > 0.2"

    kept, skipped = pruning.apply_skip_rules(tiny_prunable, None, {"min_channels": 16})
    assert kept == ["8.weight"]
    assert skipped["0.weight"] == "skip.min_channels: only 8 output channels (minimum 16)"

    kept, skipped = pruning.apply_skip_rules(tiny_prunable, None, {"types": ["depthwise"], "allow_empty": ["types"]})
    assert kept == ["0.weight", "4.weight", "8.weight"] and skipped == {}


def test_min_channels_clamps_the_planned_count(tiny_prunable):
    plan = pruning.make_plan(None, SHAPE, tiny_prunable, {"8.weight": 0.9}, {}, min_channels=12)
    assert plan["params"]["8.weight"]["channels_after"] == 12
    assert plan["params"]["8.weight"]["note"] == "skip.min_channels: kept 12 channels"
    plan = pruning.make_plan(None, SHAPE, tiny_prunable, {"8.weight": 0.9}, {}, min_channels=12, align=8)
    assert plan["params"]["8.weight"]["channels_after"] == 16


@pytest.mark.parametrize("rules, path, message", [
    ({"types": ["depthwise"]}, "skip.types", "matches no prunable parameter (they are: 0.weight, 4.weight"),
    ({"names": ["8.weight", "nope"]}, "skip.names[1]", "name 'nope' matches no prunable parameter"),
    ({"patterns": [".*", "("]}, "skip.patterns[1]", "invalid regular expression '('"),
    ({"patterns": ["head.*"]}, "skip.patterns[0]", "pattern 'head.*' matches no prunable parameter"),
    ({"loss_above": {"ratio": 0.5, "max_loss": 0.1}}, "skip.loss_above", "needs a sensitivity table"),
    ({"first_n": -1}, "skip.first_n", "whole number"),
    ({"first_n": 3}, "skip", "skip every prunable parameter"),
    ({"frist_n": 1}, "skip.frist_n", "unknown skip rule"),
    ({"types": ["depthwise"], "allow_empty": ["type"]}, "skip.allow_empty", "allow_empty lists rule names"),
])
def test_skip_rule_mistakes_name_the_rule(tiny_prunable, rules, path, message):
    with pytest.raises(RecipeError) as err:
        pruning.apply_skip_rules(tiny_prunable, None, rules)
    assert path in [p.path for p in err.value.problems]
    assert message in str(err.value)


def test_unused_rules_as_recipes_spell_them(tiny_prunable):
    rules = {"first_n": 0, "names": [], "patterns": [], "types": [], "loss_above": None, "min_channels": None,
             "allow_empty": []}
    assert pruning.apply_skip_rules(tiny_prunable, None, rules) == (["0.weight", "4.weight", "8.weight"], {})


def test_allow_empty_applies_per_rule(tiny_prunable):
    kept, skipped = pruning.apply_skip_rules(
        tiny_prunable, None, {"names": ["gone.weight"], "patterns": ["0\\..*"], "allow_empty": ["names"]})
    assert kept == ["4.weight", "8.weight"] and list(skipped) == ["0.weight"]


# ---------------------------------------------------------------------------------------------------------------
# prune.backend: paddleslim -- PaddleSlim picks the channels, slimrecipe's surgery applies them

def test_paddleslim_backend_is_refused_off_paddle_26_with_the_reason():
    from slimrecipe.stages.prune import _check_paddleslim_backend

    if P().__version__.startswith("2.6"):
        pytest.skip("Paddle 2.6 is the line the paddleslim backend runs on")
    with pytest.raises(RecipeError) as info:
        _check_paddleslim_backend("l1_norm")
    assert info.value.problems[0].path == "prune.backend" and "Paddle 2.6" in str(info.value)


def test_paddleslim_backend_prunes_the_channels_paddleslim_prunes():
    import copy

    from slimrecipe.stages.prune import paddleslim_choices

    if not P().__version__.startswith("2.6"):
        pytest.skip(f"PaddleSlim runs on Paddle 2.6 only; this is {P().__version__}")
    import importlib.util

    if importlib.util.find_spec("paddleslim") is None:
        pytest.skip("the paddleslim extra is not installed")
    from slimrecipe.paddle_env import paddleslim

    slim = paddleslim()  # installed but broken: this fails, it does not skip
    P().seed(0)
    model = build()
    model.eval()
    groups, prunable = pruning.analyse(model, SHAPE)
    chosen = [e["name"] for e in prunable[:2]]
    plan = pruning.make_plan(model, SHAPE, prunable, {chosen[0]: 0.5, chosen[1]: 0.25}, groups=groups)
    reference = copy.deepcopy(model)
    pruner = slim.dygraph.L1NormFilterPruner(reference, [1, *SHAPE])
    names = {k: p.name for k, p in reference.named_parameters()}
    for name in chosen:
        item = plan["params"][name]
        pruner.prune_vars({names[name]: 1 - item["channels_after"] / item["channels_before"]}, axis=0)
    choices = paddleslim_choices(model, SHAPE, plan, groups)
    assert all(choices["params"][n]["removed"] for n in chosen)
    pruned = copy.deepcopy(model)
    pruning.apply_plan(pruned, SHAPE, choices)
    x = P().to_tensor(np.random.default_rng(0).normal(size=[2, *SHAPE]).astype("float32"))
    with P().no_grad():
        assert np.abs(pruned(x).numpy() - reference(x).numpy()).max() < 1e-5
    # slimrecipe's own L1 (over every member of the group) picks other channels here: the check above can fail
    own = pruning.apply_plan(copy.deepcopy(model), SHAPE, plan)
    assert any(own["params"][n]["removed"] != choices["params"][n]["removed"] for n in chosen)
