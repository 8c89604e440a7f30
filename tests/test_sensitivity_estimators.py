"""Cheaper sensitivity estimators: one-shot Taylor tables, BatchNorm recalibration, their recipe keys and cache keys."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from slimrecipe.fileio import read_json
from slimrecipe.pruning.sensitivity import (calibration_map, compute_sensitivity, recalibrate_batchnorm,
                                            taylor_sensitivity)

SHAPE = [3, 16, 16]
DATA = SimpleNamespace(input_shape=SHAPE, num_classes=4)


def P():
    from slimrecipe.paddle_env import paddle

    return paddle()


def build(channels=(8, 8, 8)):
    from slimrecipe.models.vision import tiny_cnn

    P().seed(0)
    return tiny_cnn({"channels": list(channels)}, DATA)


@pytest.fixture(scope="module")
def task(train_briefly):
    """A tiny_cnn trained briefly on a synthetic 4-class task; training batches and a held-out set."""
    p = P()
    rng = np.random.default_rng(0)
    protos = rng.normal(size=(4, *SHAPE)).astype("float32")

    def sample(n):
        y = rng.integers(0, 4, n)
        return (protos[y] + 0.7 * rng.normal(size=(n, *SHAPE))).astype("float32"), y.astype("int64")

    model = train_briefly(build(), sample, steps=30, batch_size=32)
    train = [[p.to_tensor(x), p.to_tensor(y)] for x, y in (sample(32) for _ in range(12))]
    held_x, held_y = sample(256)
    state = {k: v.numpy().copy() for k, v in model.state_dict().items()}
    return SimpleNamespace(state=state, train=train, x=held_x, y=held_y)


def trained_copy(task):
    model = build()
    model.set_state_dict({k: v.copy() for k, v in task.state.items()})
    model.eval()
    return model


def accuracy(task):
    def evaluate(model):
        model.eval()
        with P().no_grad():
            logits = model(P().to_tensor(task.x)).numpy()
        return float((logits.argmax(1) == task.y).mean())

    return evaluate


def cross_entropy(model, batch):
    return P().nn.functional.cross_entropy(model(batch[0]), batch[1])


def test_taylor_table_ranks_a_zeroed_group_least_sensitive(task):
    model = trained_copy(task)
    # half the middle group's channels carry nothing (conv filters, BatchNorm scale and shift, and the next conv's
    # input slices all 0): pruning half of that group costs nothing, and the criterion removes those first
    zeroed = {"4.weight": 0, "5.weight": 0, "5.bias": 0, "8.weight": 1}  # parameter: the axis of the channels
    for name, param in model.named_parameters():
        if name in zeroed:
            value = param.numpy().copy()
            np.moveaxis(value, zeroed[name], 0)[:4] = 0
            param.set_value(value)
    before = {k: v.numpy().copy() for k, v in model.state_dict().items()}
    ratios = [0.25, 0.5, 0.75]
    raw = taylor_sensitivity(model, SHAPE, accuracy(task), task.train[:4], cross_entropy, ratios=ratios,
                             calibration=0)
    table = raw["table"]
    assert set(table) == {"0.weight", "4.weight", "8.weight"}
    assert all(set(row) == {"0.25", "0.5", "0.75"} for row in table.values())
    assert raw["evaluations"] == 1  # the baseline only: no evaluation per (group, ratio)
    for ratio in ("0.25", "0.5"):
        assert table["4.weight"][ratio] == 0
        assert min(table["0.weight"][ratio], table["8.weight"][ratio]) > 0
    assert table["4.weight"]["0.75"] > 0  # past the empty channels it costs something too
    # the analysis leaves the model alone (weights and BatchNorm statistics)
    assert all(np.array_equal(v.numpy(), before[k]) for k, v in model.state_dict().items())

    calibrated = taylor_sensitivity(model, SHAPE, accuracy(task), task.train[:4], cross_entropy, ratios=ratios,
                                    calibration=3)
    assert calibrated["evaluations"] == 1 + 3 and len(calibrated["calibration_points"]) == 3
    table = calibrated["table"]
    assert all(0 <= v <= 1 for row in table.values() for v in row.values())
    assert table["4.weight"]["0.5"] == 0
    # a measured candidate keeps its measured loss
    for point in calibrated["calibration_points"]:
        assert table[point["group"]][point["ratio"]] == pytest.approx(point["loss"])


def test_calibration_map_is_monotone_through_zero_and_capped():
    to_loss = calibration_map([(1.0, 0.1), (2.0, 0.05), (4.0, 0.4)])  # the middle point violates monotonicity
    xs = np.linspace(0, 20, 81)
    ys = [to_loss(x) for x in xs]
    assert to_loss(0) == 0 and all(b >= a for a, b in zip(ys, ys[1:]))
    assert to_loss(1.5) == pytest.approx(0.075)  # the two disagreeing points pooled
    assert to_loss(8.0) == pytest.approx(0.8) and to_loss(100.0) == 1.0


def test_recalibrated_statistics_are_those_of_the_pruned_model(task):
    from slimrecipe.pruning.plan import analyse
    from slimrecipe.pruning.sensitivity import pruned_copy

    model = trained_copy(task)
    groups, _ = analyse(model, SHAPE)
    candidate = pruned_copy(model, groups, "0.weight", 0.5, "l1_norm")
    assert recalibrate_batchnorm(candidate, task.train[:4]) == 3
    assert not candidate.training
    # what the second BatchNorm sees, with the first one normalising by batch statistics as it did
    seen = []
    handle = candidate[5].register_forward_pre_hook(lambda layer, inputs: seen.append(inputs[0].numpy()))
    candidate.train()
    with P().no_grad():
        for batch in task.train[:4]:
            candidate(batch[0])
    handle.remove()
    candidate.eval()
    x = np.concatenate(seen).astype(np.float64)
    mean, variance = x.mean(axis=(0, 2, 3)), x.var(axis=(0, 2, 3))
    stale = pruned_copy(model, groups, "0.weight", 0.5, "l1_norm")  # the unpruned model's statistics
    assert np.abs(stale[5]._mean.numpy() - mean).max() > 0.05
    np.testing.assert_allclose(candidate[5]._mean.numpy(), mean, rtol=2e-3, atol=2e-3)
    np.testing.assert_allclose(candidate[5]._variance.numpy(), variance, rtol=2e-3, atol=2e-3)


def test_bn_recalibration_moves_the_measured_loss_toward_the_finetuned_one(task):
    p = P()
    model = trained_copy(task)
    evaluate = accuracy(task)
    baseline = evaluate(model)
    plain = compute_sensitivity(model, SHAPE, evaluate, ratios=[0.5], params=["0.weight"], progress=False)
    recal = compute_sensitivity(model, SHAPE, evaluate, ratios=[0.5], params=["0.weight"], progress=False,
                                bn_batches=task.train[:4])
    loss_plain, loss_recal = plain["table"]["0.weight"]["0.5"], recal["table"]["0.weight"]["0.5"]

    from slimrecipe.pruning.plan import analyse
    from slimrecipe.pruning.sensitivity import pruned_copy

    groups, _ = analyse(model, SHAPE)
    finetuned = pruned_copy(model, groups, "0.weight", 0.5, "l1_norm")
    opt = p.optimizer.Adam(learning_rate=0.003, parameters=finetuned.parameters())
    finetuned.train()
    for batch in task.train * 2:
        loss = cross_entropy(finetuned, batch)
        loss.backward()
        opt.step()
        opt.clear_grad()
    loss_finetuned = (baseline - evaluate(finetuned)) / baseline
    assert loss_plain != loss_recal
    assert abs(loss_recal - loss_finetuned) < abs(loss_plain - loss_finetuned), (loss_plain, loss_recal,
                                                                                 loss_finetuned)


def test_a_checkpoint_from_another_recalibration_is_refused(task, tmp_path):
    from slimrecipe.errors import StageError

    model = trained_copy(task)
    checkpoint = tmp_path / "partial.json"
    compute_sensitivity(model, SHAPE, accuracy(task), ratios=[0.5], params=["8.weight"], progress=False,
                        checkpoint_path=checkpoint)
    with pytest.raises(StageError, match="BatchNorm recalibration"):
        compute_sensitivity(model, SHAPE, accuracy(task), ratios=[0.5], params=["8.weight"], progress=False,
                            checkpoint_path=checkpoint, bn_batches=task.train[:2])


# ---------------------------------------------------------------- the recipe keys, through the stage


@pytest.mark.parametrize("override, key", [("sensitivity.method=guess", "sensitivity.method"),
                                           ("sensitivity.bn_recalibration=-1", "sensitivity.bn_recalibration"),
                                           ("sensitivity.taylor_batches=0", "sensitivity.taylor_batches")])
def test_a_bad_estimator_setting_exits_2_naming_the_key(run_cli, tmp_path, override, key):
    out = run_cli("validate", "+recipe=cls_prune", override, cwd=tmp_path)
    assert out.returncode == 2, out.stderr
    assert key in out.stderr + out.stdout and "Traceback" not in out.stderr


def test_the_taylor_preset_validates(compose_recipe):
    recipe = compose_recipe("cls_prune", "sensitivity=taylor")
    assert recipe["sensitivity"]["method"] == "taylor" and recipe["sensitivity"]["bn_recalibration"] == 4


def run(tmp: Path, name: str, cache: Path, *overrides: str):
    from slimrecipe.config import compose, validate
    from slimrecipe.run import execute

    recipe = validate(compose(["+recipe=cls_prune", "+profile=smoke", "stages=[train,sensitivity,prune]",
                               f"cache_dir={cache}", "sensitivity.plot=false", *overrides]))
    return execute(recipe, tmp / name, echo=lambda *_: None)


TAYLOR = ["sensitivity.method=taylor", "sensitivity.taylor_batches=2", "sensitivity.taylor_calibration=2"]


def test_each_method_has_its_own_cache_key_and_says_so_in_the_table(tmp_path):
    cache = tmp_path / "cache"
    docs = {}
    for name, overrides in {"measure": [], "measure_other_taylor": ["sensitivity.taylor_batches=2"],
                            "measure_bn": ["sensitivity.bn_recalibration=2"],
                            "taylor": TAYLOR, "taylor_again": TAYLOR}.items():
        state = run(tmp_path, name, cache, *overrides)
        docs[name] = read_json(state.run_dir / "sensitivity.json")
        assert "prune" in state.results  # the prune stage consumed the table
    estimator = {n: d["computed_on"]["estimator"] for n, d in docs.items()}
    assert estimator["measure"] == {"method": "measure", "bn_recalibration": 0}
    assert estimator["measure_bn"]["bn_recalibration"] == 2
    assert estimator["taylor"]["method"] == "taylor" and estimator["taylor"]["taylor_batches"] == 2
    keys = {n: d["cache_key"] for n, d in docs.items()}
    assert len({keys["measure"], keys["measure_bn"], keys["taylor"]}) == 3
    assert keys["measure_other_taylor"] == keys["measure"]  # settings a method does not use do not split the cache
    assert docs["measure_other_taylor"]["cache"] == "hit"
    assert keys["taylor_again"] == keys["taylor"] and docs["taylor_again"]["cache"] == "hit"
    assert docs["taylor"]["evaluations_this_run"] == 1 + 2  # the baseline and the calibration candidates
    assert set(docs["taylor"]["table"]) == set(docs["measure"]["table"])


def test_taylor_tables_shard_and_merge(tmp_path):
    cache = tmp_path / "cache"
    parts = [run(tmp_path, f"shard{i}", cache, *TAYLOR, f"sensitivity.shard={i}/2") for i in (1, 2)]
    merged = run(tmp_path, "merged", cache, *TAYLOR)
    doc = read_json(merged.run_dir / "sensitivity.json")
    assert doc["cache"] == "merged" and merged.results["sensitivity"]["evaluations"] == 0
    measured = [set(read_json(s.run_dir / "sensitivity.json")["table"]) for s in parts]
    assert measured[0].isdisjoint(measured[1]) and measured[0] | measured[1] == set(doc["table"])
