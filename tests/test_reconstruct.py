"""Reconstruction after pruning: each refitted layer computes what the unpruned model computed there."""

from __future__ import annotations

import copy
from types import SimpleNamespace

import numpy as np
import pytest

from slimrecipe import pruning
from slimrecipe.pruning.reconstruct import reconstruct

SHAPE = [3, 16, 16]


def P():
    from slimrecipe.paddle_env import paddle

    return paddle()


def tiny(channels=(16, 32, 64)):
    from slimrecipe.models.vision import tiny_cnn

    return tiny_cnn({"channels": list(channels)}, SimpleNamespace(input_shape=SHAPE, num_classes=10))


@pytest.fixture(scope="module")
def trained(trained_tiny_cnn):
    """tiny_cnn (bias-free 3x3 convs, each followed by BatchNorm; a linear head), trained briefly; two batches."""
    model = tiny()
    model.set_state_dict({k: v.copy() for k, v in trained_tiny_cnn.state.items()})
    model.eval()
    fit, held_out = trained_tiny_cnn.batches
    return SimpleNamespace(model=model, fit=fit[0], held_out=held_out)


def prune(teacher, shape, ratios=None, removed=None):
    """(pruned copy, the teacher's groups, removed channels per group) for ``ratios`` or explicit ``removed``."""
    model = copy.deepcopy(teacher)
    groups, prunable = pruning.analyse(teacher, shape)
    plan = pruning.make_plan(model, shape, prunable, ratios or {k: len(v) / 8 for k, v in removed.items()})
    for name, channels in (removed or {}).items():
        plan["params"][name]["removed"] = channels
    plan = pruning.apply_plan(model, shape, plan)
    return model, groups, {n: item["removed"] for n, item in plan["params"].items()}, plan


def test_refitted_layers_bring_the_pruned_model_back_towards_its_teacher(trained):
    p = P()
    teacher = trained.model
    model, groups, removed, _ = prune(teacher, SHAPE, {"0.weight": 0.5, "4.weight": 0.5, "8.weight": 0.5})
    x, y = p.to_tensor(trained.held_out[0]), trained.held_out[1]
    reference = teacher(x).numpy()
    before = np.abs(model(x).numpy() - reference).mean()
    info = reconstruct(model, teacher, groups, removed, [p.to_tensor(trained.fit)], samples=4096)
    after = np.abs(model(x).numpy() - reference).mean()
    # the first conv reads the unchanged input (its kept filters already compute what they did): not refitted
    assert info["layers"] == 3
    assert info["error_after"] < 0.5 * info["error_before"]
    # judged on images the fit never saw
    assert after < 0.5 * before
    accuracy = float((model(x).numpy().argmax(1) == y).mean())
    assert accuracy >= float((teacher(x).numpy().argmax(1) == y).mean()) - 0.1


def pointwise_net():
    """1x1 convs (no padding: every position sees the same constant), bias-free, each followed by BatchNorm."""
    nn = P().nn
    return nn.Sequential(nn.Conv2D(3, 8, 1, bias_attr=False), nn.BatchNorm2D(8), nn.ReLU(),
                         nn.Conv2D(8, 8, 1, bias_attr=False), nn.BatchNorm2D(8), nn.ReLU(),
                         nn.AdaptiveAvgPool2D(1), nn.Flatten(), nn.Linear(8, 4))


def cut_and_refit_exactly(teacher, shape, removed, images):
    """Prune ``removed`` from ``teacher``, check that the cut moves the output, refit without ridge on ``images``
    random inputs and check that the refit brings the output back; (model, plan, refit info, inputs)."""
    p = P()
    model, groups, removed, plan = prune(teacher, shape, removed=removed)
    x = p.to_tensor(np.random.default_rng(0).normal(size=(images, *shape)).astype("float32"))
    reference = teacher(x).numpy()
    assert np.abs(model(x).numpy() - reference).max() > 1e-2  # the cut alone changes the output
    info = reconstruct(model, teacher, groups, removed, [x], ridge=0.0)
    assert np.abs(model(x).numpy() - reference).max() < 1e-4
    return model, plan, info, x


def test_a_removed_constant_channel_is_absorbed_exactly_by_the_next_batchnorm():
    p = P()
    p.seed(1)
    teacher = pointwise_net()
    teacher.eval()
    # channel 3 of the first block outputs relu(0 * x + 2) = 2 everywhere: what it fed the next conv is a constant
    gamma, beta = teacher[1].weight.numpy(), teacher[1].bias.numpy()
    gamma[3], beta[3] = 0.0, 2.0
    teacher[1].weight.set_value(gamma)
    teacher[1].bias.set_value(beta)
    shape = [3, 8, 8]
    model, plan, info, x = cut_and_refit_exactly(teacher, shape, {"0.weight": [3]}, images=16)
    assert info["layers"] == 1  # the second conv; the head then reads what the teacher's head read
    # only values changed: the weights load into a fresh model pruned by the same plan
    fresh = pointwise_net()
    pruning.load_pruned(fresh, shape, plan, model.state_dict())
    fresh.eval()
    assert np.array_equal(fresh(x).numpy(), model(x).numpy())


def test_a_blockwise_transposed_conv_absorbs_a_removed_duplicate_channel_exactly():
    # a DB head: 3x3 conv-BN-ReLU, then 2x transposed convs; channel 3 of the first block duplicates channel 2, so
    # the first transposed conv can take over what channel 3 fed it (its taps for channel 2 add channel 3's)
    p = P()
    p.seed(2)
    nn = p.nn
    teacher = nn.Sequential(nn.Conv2D(3, 8, 3, padding=1, bias_attr=False), nn.BatchNorm2D(8), nn.ReLU(),
                            nn.Conv2DTranspose(8, 4, 2, stride=2), nn.BatchNorm2D(4), nn.ReLU(),
                            nn.Conv2DTranspose(4, 1, 2, stride=2))
    teacher.eval()
    weight = teacher[0].weight.numpy()
    weight[3] = weight[2]
    teacher[0].weight.set_value(weight)
    _, _, info, _ = cut_and_refit_exactly(teacher, [3, 8, 8], {"0.weight": [3]}, images=8)
    # the first conv reads the input, unchanged: only the transposed convs can have brought the output back
    assert info["layers"] >= 1


def test_a_model_pruned_otherwise_than_said_is_refused_with_the_layer(trained):
    p = P()
    model, groups, removed, _ = prune(trained.model, SHAPE, {"4.weight": 0.5})
    with pytest.raises(ValueError, match=r"^4: the teacher's 32 outputs do not map onto .*\[16, 16, 3, 3\]"):
        reconstruct(model, trained.model, groups, {}, [p.to_tensor(trained.fit)])


def run(tmp_path, name: str, *overrides: str):
    from slimrecipe.config import compose, validate
    from slimrecipe.run import execute

    recipe = validate(compose(["+recipe=cls_prune", "+profile=smoke", "stages=[train,sensitivity,prune]", "sensitivity.plot=false",
                               f"cache_dir={tmp_path / 'cache'}", *overrides]))
    return execute(recipe, tmp_path / name, echo=lambda *_: None)


def test_the_prune_stage_reconstructs_unless_told_not_to(tmp_path):
    on = run(tmp_path, "on")
    off = run(tmp_path, "off", "prune.reconstruct.enabled=false")
    info = on.results["prune"]["reconstruction"]
    assert info["layers"] >= 1 and info["images"] == 64 and info["error_after"] < info["error_before"]
    assert "reconstruction" not in off.results["prune"]
    # the same plan, other weights
    weights_on = on.model.state_dict()
    weights_off = off.model.state_dict()
    assert {k: list(v.shape) for k, v in weights_on.items()} == {k: list(v.shape) for k, v in weights_off.items()}
    assert any(not np.array_equal(v.numpy(), weights_off[k].numpy()) for k, v in weights_on.items())
