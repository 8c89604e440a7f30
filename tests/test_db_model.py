"""The `db_mobilenet_v3` model plugin: shapes, DB loss, PaddleOCR configs and weights, pruning and export."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import numpy as np
import pytest

from slimrecipe.datasets import DataBundle
from slimrecipe.errors import RecipeError
from slimrecipe.models import db
from slimrecipe.paddle_env import paddle
from slimrecipe.pruning import apply_plan, count_flops, make_plan, prunable_params

SMALL = {"scale": 0.35, "neck_channels": 64}
SIZE = 64


def bundle(size=SIZE, channels=3):
    return DataBundle(train=[], val=[], input_shape=[channels, size, size], manifest={})


def build(params=None, size=SIZE):
    return db.db_mobilenet_v3(dict(SMALL if params is None else params), bundle(size))


def parameter_count(model):
    return sum(int(np.prod(value.shape)) for value in model.state_dict().values())


def rectangle_batch(batch_size=2, size=SIZE):
    """A bright rectangle per image, with DB-style labels: shrink map inside it, threshold ring around its edge."""
    p = paddle()
    rng = np.random.default_rng(0)
    images = rng.normal(0, 0.1, (batch_size, 3, size, size)).astype("float32")
    shrink = np.zeros((batch_size, size, size), "float32")
    threshold = np.full((batch_size, size, size), 0.3, "float32")
    threshold_mask = np.zeros((batch_size, size, size), "float32")
    for i in range(batch_size):
        top, left = 12 + 4 * i, 10 + 6 * i
        images[i, :, top:top + 20, left:left + 36] += 1.0
        shrink[i, top + 3:top + 17, left + 3:left + 33] = 1
        threshold_mask[i, top - 3:top + 23, left - 3:left + 39] = 1
        threshold[i, top - 3:top + 23, left - 3:left + 39] = 0.7
        threshold[i, top + 3:top + 17, left + 3:left + 33] = 0.3
    shrink_mask = np.ones_like(shrink)
    return [p.to_tensor(a) for a in (images, shrink, shrink_mask, threshold, threshold_mask)]


DET_MV3_DB = """\
Global:
  use_gpu: false
  pretrained_model: {pretrained}
  checkpoints:
Architecture:
  model_type: det
  algorithm: DB
  Transform:
  Backbone:
    name: MobileNetV3
    scale: 0.35
    model_name: large
  Neck:
    name: DBFPN
    out_channels: 64
  Head:
    name: DBHead
    k: 50
Loss:
  name: DBLoss
  balance_loss: true
  main_loss_type: DiceLoss
  alpha: 5
  beta: 10
  ohem_ratio: 3
"""


def write_config(tmp_path, text=None, pretrained=""):
    path = tmp_path / "det_mv3_db.yml"
    path.write_text(text if text is not None else DET_MV3_DB.format(pretrained=pretrained))
    return path


def test_validation_reads_the_plugin_without_importing_paddle():
    code = ("import sys, slimrecipe.models.db as m; from slimrecipe.registry import REGISTRIES; "
            "assert 'db_mobilenet_v3' in REGISTRIES['model']; assert 'paddle' not in sys.modules, 'paddle imported'")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_schema_is_valid_and_every_param_is_described():
    from jsonschema import Draft202012Validator

    Draft202012Validator.check_schema(db.DB_SCHEMA)
    assert db.DB_SCHEMA["additionalProperties"] is False
    for name, spec in db.DB_SCHEMA["properties"].items():
        assert spec.get("description"), name
    assert db.DB_SCHEMA["properties"]["pretrained"]["x-file"] is True
    assert db.DB_SCHEMA["properties"]["paddleocr_config"]["x-file"] is True
    errors = list(Draft202012Validator(db.DB_SCHEMA).iter_errors({"scale": 0, "neck_channels": 30}))
    assert len(errors) == 2


def test_training_mode_gives_three_maps_and_eval_mode_only_the_probability_map():
    model = build()
    images = paddle().rand([2, 3, SIZE, SIZE])
    model.train()
    maps = model(images)["maps"]
    assert maps.shape == [2, 3, SIZE, SIZE]
    assert 0 <= float(maps.min()) and float(maps.max()) <= 1  # probability, threshold, binary are all in [0, 1]
    model.eval()
    probability = model(images)
    assert probability.shape == [2, 1, SIZE, SIZE]
    assert 0 <= float(probability.min()) and float(probability.max()) <= 1


def test_backbone_gives_four_stages_at_strides_4_to_32_with_channels_divisible_by_8():
    model = build({"scale": 0.5})
    features = model.backbone(paddle().rand([1, 3, 128, 128]))
    assert [f.shape[2] for f in features] == [32, 16, 8, 4]
    assert [f.shape[1] for f in features] == [16, 24, 56, 480] == model.backbone.out_channels
    without_se = build({"scale": 0.5, "disable_se": True})
    assert parameter_count(without_se) < parameter_count(model)
    assert not any("mid_se" in key for key in without_se.state_dict())


def test_input_size_not_divisible_by_32_is_refused():
    with pytest.raises(RecipeError, match="divisible by 32"):
        build(size=100)


def test_loss_is_finite_and_decreases_over_a_few_steps_on_a_rectangle():
    p = paddle()
    p.seed(0)
    model = build()
    batch = rectangle_batch()
    optimizer = p.optimizer.Adam(learning_rate=2e-3, parameters=model.parameters())
    model.train()
    totals = []
    for _ in range(8):
        loss = model.loss(model(batch[0]), batch)
        loss.backward()
        optimizer.step()
        optimizer.clear_grad()
        totals.append(float(loss))
    assert all(np.isfinite(totals))
    assert totals[-1] < 0.7 * totals[0], totals
    parts = {name: float(value) for name, value in model.last_loss_parts.items()}
    assert set(parts) == {"shrink", "threshold", "binary", "total"}
    assert parts["total"] == pytest.approx(parts["shrink"] + parts["threshold"] + parts["binary"], rel=1e-5)


def test_loss_needs_training_mode_outputs():
    model = build()
    batch = rectangle_batch()
    model.eval()
    with pytest.raises(ValueError, match="eval mode"):
        model.loss(model(batch[0]), batch)


def test_balanced_bce_keeps_only_the_hardest_negatives():
    from slimrecipe.models._db_layers import balanced_bce

    p = paddle()
    # One positive (predicted 0.5), three hard negatives (0.9) and many easy ones (0.01): with a ratio of 3, the
    # easy negatives must not dilute the loss.
    probability = np.full((1, 4, 8), 0.01, "float32")
    target = np.zeros_like(probability)
    probability[0, 0, 0], target[0, 0, 0] = 0.5, 1
    probability[0, 1, :3] = 0.9
    expected = (-np.log(0.5) + 3 * -np.log(0.1)) / 4
    loss = balanced_bce(p.to_tensor(probability), p.to_tensor(target), p.ones([1, 4, 8]), ohem_ratio=3)
    assert float(loss) == pytest.approx(expected, rel=1e-4)


def test_paddleocr_config_builds_the_same_network_as_the_params(tmp_path):
    config = write_config(tmp_path)
    from_config = build({"paddleocr_config": str(config)})
    from_params = build({"scale": 0.35, "neck_channels": 64, "k": 50})
    assert parameter_count(from_config) == parameter_count(from_params)
    assert [list(v.shape) for v in from_config.state_dict().values()] == \
           [list(v.shape) for v in from_params.state_dict().values()]
    # PaddleOCR's main_loss_type: DiceLoss trains the shrink map with Dice, and so does the built model.
    assert from_config.loss_settings == {"alpha": 5.0, "beta": 10.0, "ohem_ratio": 3.0, "shrink_loss": "dice"}


@pytest.mark.parametrize(("old", "new", "key"), [
    ("name: MobileNetV3", "name: ResNet", "Architecture.Backbone.name: 'ResNet' is not supported; supported: MobileNetV3"),
    ("algorithm: DB", "algorithm: EAST", "Architecture.algorithm: 'EAST'"),
    ("model_type: det", "model_type: rec", "Architecture.model_type: 'rec'"),
    ("model_name: large", "model_name: small", "Architecture.Backbone.model_name: 'small'"),
    ("name: DBFPN", "name: RSEFPN", "Architecture.Neck.name: 'RSEFPN'"),
    ("name: DBHead", "name: PFHeadLocal", "Architecture.Head.name: 'PFHeadLocal'"),
    ("    out_channels: 64", "    out_channels: 64\n    use_asf: true", "Architecture.Neck.use_asf: true"),
    ("  Transform:", "  Transform: TPS", "Architecture.Transform"),
    ("main_loss_type: DiceLoss", "main_loss_type: DiceFocalLoss", "Loss.main_loss_type: 'DiceFocalLoss'"),
    ("name: DBLoss", "name: EASTLoss", "Loss.name: 'EASTLoss'"),
])
def test_paddleocr_config_that_differs_from_det_mv3_db_is_refused_naming_the_key(tmp_path, old, new, key):
    text = DET_MV3_DB.format(pretrained="")
    assert old in text
    config = write_config(tmp_path, text.replace(old, new, 1))
    with pytest.raises(RecipeError, match="not supported") as caught:
        db.resolve_settings({"paddleocr_config": str(config)})
    assert key in str(caught.value)
    assert caught.value.problems[0].path == db.CONFIG_PATH


def test_paddleocr_config_excludes_the_network_params(tmp_path):
    config = write_config(tmp_path)
    with pytest.raises(RecipeError, match="cannot be combined") as caught:
        db.resolve_settings({"paddleocr_config": str(config), "scale": 0.5})
    assert caught.value.problems[0].path == "model.params.scale"


def test_weights_named_by_the_config_are_loaded(tmp_path):
    p = paddle()
    trained = build()
    p.save(trained.state_dict(), str(tmp_path / "best_accuracy.pdparams"))
    # PaddleOCR names weights without the .pdparams suffix.
    config = write_config(tmp_path, pretrained="./best_accuracy")
    loaded = build({"paddleocr_config": str(config)})
    for key, value in trained.state_dict().items():
        assert np.array_equal(value.numpy(), loaded.state_dict()[key].numpy()), key


def test_backbone_only_weights_load_into_the_backbone(tmp_path):
    p = paddle()
    source = build()
    p.save(source.backbone.state_dict(), str(tmp_path / "backbone.pdparams"))
    loaded = build({**SMALL, "pretrained": str(tmp_path / "backbone.pdparams")})
    assert np.array_equal(loaded.backbone.conv.conv.weight.numpy(), source.backbone.conv.conv.weight.numpy())


def test_weights_of_another_width_or_names_are_refused(tmp_path):
    p = paddle()
    p.save(build({"scale": 0.5, "neck_channels": 64}).state_dict(), str(tmp_path / "wide.pdparams"))
    with pytest.raises(RecipeError, match="another shape") as caught:
        build({**SMALL, "pretrained": str(tmp_path / "wide.pdparams")})
    assert caught.value.problems[0].path == "model.params.pretrained"
    p.save({"conv1_weights": p.zeros([8, 3, 3, 3])}, str(tmp_path / "static_names.pdparams"))
    with pytest.raises(RecipeError, match="conv1_weights"):
        build({**SMALL, "pretrained": str(tmp_path / "static_names.pdparams")})


def test_missing_weights_named_by_the_config_are_refused_unless_overridden(tmp_path):
    config = write_config(tmp_path, pretrained="./pretrain_models/MobileNetV3_large_x0_5_pretrained")
    with pytest.raises(RecipeError, match="Global.pretrained_model"):
        db.resolve_settings({"paddleocr_config": str(config)})
    paddle().save(build().state_dict(), str(tmp_path / "mine.pdparams"))
    _, weights, _ = db.resolve_settings({"paddleocr_config": str(config), "pretrained": str(tmp_path / "mine.pdparams")})
    assert weights == str(tmp_path / "mine.pdparams")


def test_pruning_a_backbone_neck_and_head_conv_cuts_flops_and_the_model_still_runs():
    paddle().seed(0)
    model = build()
    model.train()
    shape = [3, SIZE, SIZE]
    flops_before = count_flops(model, [1, *shape])
    prunable = {e["name"] for e in prunable_params(model, shape)}
    # the FPN adds in2..in5: one group, led by in5_conv
    targets = ["backbone.stage2.1.expand_conv.conv.weight", "neck.in5_conv.weight", "head.binarize.conv1.weight"]
    assert set(targets) <= prunable and "neck.in2_conv.weight" not in prunable
    expand = model.backbone.stages[2][1].expand_conv.conv.weight.shape[0]
    apply_plan(model, shape, make_plan(model, shape, None, {name: 0.3 for name in targets}))
    assert model.backbone.stages[2][1].expand_conv.conv.weight.shape[0] == expand - round(0.3 * expand)
    assert model.neck.in2_conv.weight.shape[0] == model.neck.in5_conv.weight.shape[0] < 64
    # the head's conv1 feeds a norm and conv2: all lose the same channels
    assert model.head.binarize.conv2.weight.shape[0] == model.head.binarize.conv1.weight.shape[0] < 16
    assert count_flops(model, [1, *shape]) < 0.9 * flops_before
    batch = rectangle_batch()
    loss = model.loss(model(batch[0]), batch)
    assert np.isfinite(float(loss))
    model.eval()
    assert model(batch[0]).shape == [2, 1, SIZE, SIZE]


def test_exported_model_takes_any_multiple_of_32_and_reproduces_the_eval_output(tmp_path):
    p = paddle()
    model = build()
    model.eval()
    prefix = str(tmp_path / "inference")
    p.jit.save(model, prefix, input_spec=[p.static.InputSpec([None, 3, None, None], "float32", "x")])
    loaded = p.jit.load(prefix)
    for shape in ([1, 3, 64, 64], [2, 3, 96, 128]):
        images = p.rand(shape)
        assert np.allclose(loaded(images).numpy(), model(images).numpy(), atol=1e-5)


def test_config_file_that_is_not_yaml_mapping_is_refused(tmp_path):
    config = write_config(tmp_path, textwrap.dedent("- just\n- a list\n"))
    with pytest.raises(RecipeError, match="not a PaddleOCR config"):
        db.resolve_settings({"paddleocr_config": str(config)})
