"""QAT on paddle.quantization: the config schema, PACT, weight rounding, conv-BN folding, and quantized exports
that reproduce the in-memory quantized model (and not the float one)."""

from __future__ import annotations

import copy
import types

import jsonschema
import numpy as np
import pytest

from slimrecipe import qat
from slimrecipe.errors import RecipeError, StageError
from slimrecipe.exporters import ExportContext, eager_outputs, export_onnx, export_paddle_inference
from slimrecipe.paddle_env import paddle

SHAPE = [3, 16, 16]
# An export against the in-memory fake-quant model: the same arithmetic up to float summation order, so most
# outputs agree to TIGHT (the median does); a rounding tie that goes the other way moves one activation by one
# int8 step, which moves the logits of that image by up to ~0.02 here (seen on Paddle 2.6 with oneDNN).
TIGHT = 1e-4
ONE_STEP = 0.05


def assert_reproduces(got, expected, what=""):
    diff = np.abs(got - expected)
    assert np.median(diff) <= TIGHT and diff.max() < ONE_STEP, (what, float(np.median(diff)), float(diff.max()))


def _tiny_model(seed=0, channels=(8, 16)):
    from slimrecipe.models.vision import tiny_cnn

    paddle().seed(seed)
    model = tiny_cnn({"channels": list(channels)}, types.SimpleNamespace(input_shape=SHAPE, num_classes=10))
    model.eval()
    return model


def _quantized(model) -> list:
    """The quantized layers of a model, in order (wrapped in an output quanter by default)."""
    layers = dict(model.named_sublayers())
    return [layers[n] for n in qat.quantized_layers(model)]


def _batches(n, batch=16, seed=0):
    rs = np.random.RandomState(seed)
    return [rs.rand(batch, *SHAPE).astype("float32") for _ in range(n)]


def _brightest_channel_data(n, seed):
    """Images whose label is the channel with the largest mean (3 classes): learnt in a few dozen steps."""
    rs = np.random.RandomState(seed)
    x = rs.rand(n, *SHAPE).astype("float32")
    y = rs.randint(0, 3, size=n)
    x[np.arange(n), y] += 0.6
    return x, y.astype("int64")


def _train(model, x, y, steps, batch=32, lr=3e-3, seed=0):
    p = paddle()
    model.train()
    opt = p.optimizer.Adam(parameters=model.parameters(), learning_rate=lr)
    rs = np.random.RandomState(seed)
    losses = []
    for _ in range(steps):
        idx = rs.randint(0, len(x), size=batch)
        loss = p.nn.functional.cross_entropy(model(p.to_tensor(x[idx])), p.to_tensor(y[idx]))
        loss.backward()
        opt.step()
        opt.clear_grad()
        losses.append(float(loss))
    model.eval()
    return losses


def _accuracy(model, x, y):
    return float((eager_outputs(model, x)[0].argmax(1) == y).mean())


# ---------------------------------------------------------------------------------------------- the schema
def test_defaults_live_in_the_schema_and_every_key_is_described():
    jsonschema.Draft202012Validator.check_schema(qat.QAT_PARAMS_SCHEMA)
    props = qat.QAT_PARAMS_SCHEMA["properties"]
    assert qat.QAT_PARAMS_SCHEMA["additionalProperties"] is False
    assert all("default" in p and p.get("description") for p in props.values())
    assert qat.make_quanter({}).config == {k: p["default"] for k, p in props.items()}
    assert qat.make_quanter({"moving_rate": 1 / 2}).config["moving_rate"] == 0.5


@pytest.mark.parametrize("config, path", [
    ({"weight_quantize_type": "range_abs_max"}, "qat.config.weight_quantize_type"),
    ({"weight_bits": 32}, "qat.config.weight_bits"),
    ({"pact": "yes"}, "qat.config.pact"),
    ({"quantizable_layer_type": ["Conv3D"]}, "qat.config.quantizable_layer_type.0"),
    ({"activation_preprocess_type": "PACT"}, "qat.config"),  # a PaddleSlim key: gone, and said so
])
def test_a_bad_config_is_a_recipe_error_naming_its_path(config, path):
    with pytest.raises(RecipeError) as err:
        qat.make_quanter(config)
    assert any(p.path == path for p in err.value.problems), err.value.render()


@pytest.mark.parametrize("config, act, scale_sizes", [
    ({}, "PACTQuanter", [8, 16, 10]),
    ({"pact": False}, "MovingAverageAbsMaxQuanter", [8, 16, 10]),
    ({"weight_quantize_type": "abs_max"}, "PACTQuanter", [1, 1, 1]),
    ({"quantizable_layer_type": ["Linear"]}, "PACTQuanter", [10]),
])
def test_the_config_decides_what_is_quantized_and_how(config, act, scale_sizes):
    model = qat.quantize(_tiny_model(), qat.make_quanter(config))
    wrapped = _quantized(model)
    assert [type(m.activation_quanter).__name__ for m in wrapped] == [act] * len(scale_sizes)
    # channel-wise: one scale per output channel (Conv2D axis 0, Linear axis 1)
    assert [int(m.weight_quanter.scales().shape[0]) for m in wrapped] == scale_sizes


def test_a_model_without_quantizable_layers_is_refused():
    nn = paddle().nn
    with pytest.raises(StageError, match="quantizable_layer_type"):
        qat.quantize(nn.Sequential(nn.ReLU()), qat.make_quanter({}))


# ---------------------------------------------------------------------------------------------- the quanters
def test_pact_clips_at_alpha_and_alpha_gets_pacts_gradient():
    p = paddle()
    model = qat.quantize(_tiny_model(), qat.make_quanter({}))
    pact = qat.pact_layers(model)[0]
    pact.train()
    x0 = p.to_tensor(np.linspace(-2, 2, 41, dtype="float32").reshape(1, 41))
    pact(x0)  # the first training batch sets alpha to its abs-max (2.0)
    assert abs(float(pact.alpha.numpy()[0]) - 2.0) < 1e-6
    pact.alpha.set_value(p.to_tensor([1.0]))
    x = p.to_tensor(np.linspace(-2, 2, 41, dtype="float32").reshape(1, 41), stop_gradient=False)
    y = pact(x)
    got = y.numpy().ravel()
    assert got.max() == pytest.approx(1.0) and got.min() == pytest.approx(-1.0)  # clipped at +-alpha
    assert len(np.unique(np.round(got * 127))) <= 255  # on the int8 grid of step alpha/127
    y.sum().backward()
    xs = np.linspace(-2, 2, 41)
    # d sum / d alpha = #(x > alpha) - #(x < -alpha); straight-through inside the clip, zero outside
    assert float(pact.alpha.grad.numpy()[0]) == pytest.approx((xs > 1).sum() - (xs < -1).sum())
    np.testing.assert_array_equal(x.grad.numpy().ravel(), (np.abs(xs) <= 1).astype("float32"))


def test_pact_alpha_is_learnt_by_training():
    model = qat.quantize(_tiny_model(), qat.make_quanter({"pact_lr_multiplier": 10.0}))
    x, y = _brightest_channel_data(64, seed=1)
    _train(model, x, y, steps=1)
    before = [float(a.alpha.numpy()[0]) for a in qat.pact_layers(model)]
    _train(model, x, y, steps=5)
    after = [float(a.alpha.numpy()[0]) for a in qat.pact_layers(model)]
    assert all(abs(a - b) > 1e-4 for a, b in zip(after, before)), (before, after)


def test_weights_are_rounded_per_output_channel_to_the_bits_asked():
    model = qat.quantize(_tiny_model(), qat.make_quanter({"weight_bits": 2}))
    twin, layers = qat.float_twin(model, qat.make_quanter({"weight_bits": 2}))
    w = _quantized(twin)[0].weight.numpy().reshape(8, -1)
    for row, scale in zip(w, layers[0].weight_scales):
        # 2 bits, symmetric: each channel holds only -max, 0, +max of its own abs-max
        assert set(np.round(np.unique(row) / scale, 5)) <= {-1.0, 0.0, 1.0}
    assert len({float(s) for s in layers[0].weight_scales}) > 1


def test_qat_moves_accuracy_only_within_a_bound_and_the_model_is_really_quantized():
    x, y = _brightest_channel_data(256, seed=0)
    xv, yv = _brightest_channel_data(128, seed=7)
    model = _tiny_model(channels=(4, 8))
    _train(model, x, y, steps=40)
    float_acc = _accuracy(model, xv, yv)
    assert float_acc >= 0.8  # the task is learnt, so a loss of accuracy would show
    float_model = copy.deepcopy(model)
    qat.quantize(model, qat.make_quanter({"fuse_conv_bn": True, "activation_bits": 4, "weight_bits": 4}),
                 example=xv[:8])
    qat.calibrate(model, [x[i:i + 32] for i in range(0, 128, 32)])
    _train(model, x, y, steps=10, lr=1e-3)
    q_acc = _accuracy(model, xv, yv)
    assert abs(q_acc - float_acc) <= 0.1, (float_acc, q_acc)
    # 4-bit rounding is visible in the logits: the quantized model is not the float one
    assert np.abs(eager_outputs(model, xv)[0] - eager_outputs(float_model, xv)[0]).max() > 1e-2


# ---------------------------------------------------------------------------------------------- conv-BN folding
def test_fuse_conv_bn_folds_batchnorm_and_keeps_outputs():
    nn = paddle().nn
    model = _tiny_model()
    x = _batches(1)[0][:4]
    before = eager_outputs(model, x)[0]
    assert qat.fuse_conv_bn(model, example=x) == [["0", "1"], ["4", "5"]]
    assert not [m for m in model.sublayers() if isinstance(m, nn.BatchNorm2D)]
    np.testing.assert_allclose(eager_outputs(model, x)[0], before, atol=1e-4)


def test_the_fold_check_catches_a_broken_fold(monkeypatch):
    from paddle.quantization.imperative import fuse_utils

    def drop_bn_without_folding(model, pairs, inplace=True):  # what a broken fold would do
        for _, bn in pairs:  # tiny_cnn is one Sequential: the names are its children's
            model._sub_layers[bn] = paddle().nn.Identity()
        return model

    model = _tiny_model()
    with paddle().no_grad():  # BN statistics far from identity, so that dropping it shows
        model[1]._mean.set_value(model[1]._mean + 0.5)
    monkeypatch.setattr(fuse_utils, "fuse_layers", drop_bn_without_folding)
    with pytest.raises(StageError, match="fuse_conv_bn changed the model's outputs"):
        qat.quantize(model, qat.make_quanter({"fuse_conv_bn": True}), example=_batches(1)[0][:4])


# ---------------------------------------------------------------------------------------------- exports
@pytest.fixture(scope="module")
def quantized(tmp_path_factory):
    x, y = _brightest_channel_data(128, seed=3)
    model = _tiny_model()
    quanter = qat.make_quanter({"fuse_conv_bn": True})
    qat.quantize(model, quanter, example=x[:4])
    qat.calibrate(model, [x[i:i + 32] for i in range(0, 128, 32)])
    _train(model, x, y, steps=3, lr=1e-3)
    sample = _batches(1, batch=4, seed=9)[0]
    ctx = ExportContext(model, SHAPE, False, sample, tmp_path_factory.mktemp("q"), quanter)
    pd_result = export_paddle_inference({}, ctx)
    dynamic_after_paddle_save = paddle().in_dynamic_mode()
    onnx_result = export_onnx({}, ctx)
    return types.SimpleNamespace(model=model, quanter=quanter, ctx=ctx, pd=pd_result, onnx=onnx_result,
                                 dynamic_after_paddle_save=dynamic_after_paddle_save)


def test_quantized_onnx_is_qdq_with_int8_weights_that_onnxruntime_runs_as_int8(quantized):
    import onnx

    r = quantized.onnx
    model = onnx.load(str(r.path / "model.onnx"))
    ops = [n.op_type for n in model.graph.node]
    assert ops.count("QuantizeLinear") >= 3 and ops.count("DequantizeLinear") >= 6  # 3 quantized layers
    int8_weights = [i for i in model.graph.initializer if i.data_type == onnx.TensorProto.INT8 and len(i.dims) > 1]
    assert len(int8_weights) == 3
    # the optimized graph, not the file: with quantize_outputs every conv is int8 from input to output
    assert r.details["ort_int8_kernels"].get("QLinearConv", 0) == 2


def test_without_output_quantization_onnx_still_reproduces_the_model(tmp_path):
    quanter = qat.make_quanter({"fuse_conv_bn": True, "quantize_outputs": False})
    model = qat.quantize(_tiny_model(), quanter, example=_batches(1)[0][:4])
    qat.calibrate(model, _batches(4))
    x = _batches(1, batch=4, seed=2)[0]
    r = export_onnx({}, ExportContext(model, SHAPE, False, x, tmp_path, quanter))
    assert_reproduces(r.runner(x), eager_outputs(model, x)[0])
    # the first conv's input pair is moved back across Relu/MaxPool to its output: that one still runs as int8
    assert r.details["qdq_inserted"]["moved_input"] == 1
    assert r.details["ort_int8_kernels"].get("QLinearConv", 0) == 1


def test_quantized_exports_reproduce_the_quantized_model_not_the_float_one(quantized):
    x = _batches(1, batch=6, seed=11)[0]
    q_out = eager_outputs(quantized.model, x)[0]
    twin, _ = qat.float_twin(quantized.model, quantized.quanter)  # same weights, no activation rounding
    unrounded = eager_outputs(twin, x)[0]
    assert np.median(np.abs(unrounded - q_out)) > 10 * TIGHT  # so the checks below can tell them apart
    for r in (quantized.pd, quantized.onnx):
        assert_reproduces(r.runner(x), q_out, r.target)


def test_quantized_paddle_export_is_a_legacy_program_and_says_int8_is_not_faster(quantized):
    r = quantized.pd
    # Paddle 3.3's PIR dequantize_linear kernel is wrong: QDQ programs are saved in the legacy format
    assert {"model.pdmodel", "model.pdiparams"} <= set(r.files) and not any(f.endswith(".json") for f in r.files)
    assert "onnx target" in r.details["note"] and r.details["quantized"] is True


def test_export_returns_to_dynamic_mode_and_a_re_export_carries_new_weights(quantized):
    assert quantized.dynamic_after_paddle_save and paddle().in_dynamic_mode()
    model, ctx = quantized.model, quantized.ctx
    assert type(model.forward).__name__ == "method"  # not turned into a static function by the save
    with paddle().no_grad():
        head = _quantized(model)[-1].weight
        head.set_value(-head)  # logits change sign
    x = ctx.sample
    for exporter in (export_paddle_inference, export_onnx):
        again = exporter({}, ExportContext(model, SHAPE, False, x, ctx.out_dir / "again", ctx.quanter))
        assert_reproduces(again.runner(x), eager_outputs(model, x)[0], again.target)
        assert np.abs(again.runner(x) - quantized.pd.runner(x)).max() > 0.1
    with paddle().no_grad():
        head.set_value(-head)


@pytest.mark.parametrize("exporter", [export_paddle_inference, export_onnx])
def test_a_quantized_export_that_differs_from_the_model_is_refused(exporter, tmp_path, monkeypatch):
    from slimrecipe import exporters

    quanter = qat.make_quanter({"fuse_conv_bn": True})
    model = qat.quantize(_tiny_model(), quanter, example=_batches(1)[0][:4])
    qat.calibrate(model, _batches(3))
    real_save = exporters._save_paddle

    def save_a_perturbed_model(ctx, prefix, model=None, target=None):
        with paddle().no_grad():  # after the reference outputs were taken, before the files are written
            for m in (ctx.model, model):
                if m is not None:
                    head = _quantized(m)[-1]
                    head.weight.set_value(head.weight * 3.0)
        return real_save(ctx, prefix, model, target)

    monkeypatch.setattr(exporters, "_save_paddle", save_a_perturbed_model)
    ctx = ExportContext(model, SHAPE, False, _batches(1, batch=4)[0], tmp_path, quanter)
    with pytest.raises(StageError, match=r"max abs diff \d") as err:
        exporter({}, ctx)
    target = "paddle_inference" if exporter is export_paddle_inference else "onnx"
    assert str(err.value).startswith(f"{target} export") and "tolerances for quantized models" in str(err.value)


def test_onnx_export_refuses_a_model_quantized_without_onnx_format(tmp_path):
    model = _tiny_model()
    quanter = qat.make_quanter({"onnx_format": False})
    qat.quantize(model, quanter)
    qat.calibrate(model, _batches(3))
    ctx = ExportContext(model, SHAPE, False, _batches(1, batch=2)[0], tmp_path, quanter)
    with pytest.raises(StageError, match="onnx_format"):
        export_onnx({}, ctx)
    # the fake-quant training ops still run in Paddle Inference, and reproduce the model
    r = export_paddle_inference({}, ctx)
    x = _batches(1, batch=3, seed=4)[0]
    assert_reproduces(r.runner(x), eager_outputs(model, x)[0])
    assert paddle().in_dynamic_mode() and type(model.forward).__name__ == "method"


def test_conv2d_transpose_is_quantized_and_exported(tmp_path):
    nn = paddle().nn
    paddle().seed(0)
    model = nn.Sequential(nn.Conv2D(3, 4, 3, padding=1), nn.ReLU(), nn.Conv2DTranspose(4, 2, 2, stride=2))
    model.eval()
    quanter = qat.make_quanter({"quantizable_layer_type": ["Conv2D", "Conv2DTranspose"]})
    qat.quantize(model, quanter)
    conv, deconv = _quantized(model)
    assert [type(conv).__name__, type(deconv).__name__] == ["QuantedConv2D", "QuantedConv2DTranspose"]
    assert int(deconv.weight_quanter.scales().shape[0]) == 2  # per output channel: axis 1 of [in, out, k, k]
    qat.calibrate(model, _batches(3))
    x = _batches(1, batch=2, seed=5)[0]
    ctx = ExportContext(model, SHAPE, False, x, tmp_path, quanter)
    for exporter in (export_paddle_inference, export_onnx):
        r = exporter({}, ctx)
        assert r.runner(x).shape == (2, 2, 32, 32)
        assert_reproduces(r.runner(x), eager_outputs(model, x)[0], r.target)


def test_paddle3_falls_back_to_a_float_program_when_the_int8_save_fails_and_says_so(tmp_path, monkeypatch):
    if not qat._pir_on():
        pytest.skip("the fallback exists for Paddle 3 (PIR) only; Paddle 2.6 saves int8 programs as they are")
    from slimrecipe import exporters

    model = _tiny_model()
    quanter = qat.make_quanter({})
    qat.quantize(model, quanter)
    qat.calibrate(model, _batches(3))

    def failing_int8_save(*args, **kwargs):
        raise TypeError("sigmoid(): argument (position 1) must be Value, but got Variable")

    monkeypatch.setattr(qat, "save_quantized", failing_int8_save)
    ctx = ExportContext(model, SHAPE, False, _batches(1, batch=4)[0], tmp_path, quanter)
    r = export_paddle_inference({}, ctx)
    assert "could not save this quantized model" in r.details["note"] and "must be Value" in r.details["note"]
    assert r.details["model_file"].endswith(".json")
    twin, _ = qat.float_twin(model, quanter)
    x = _batches(1, batch=3, seed=5)[0]
    assert_reproduces(r.runner(x), eager_outputs(twin, x)[0])
    assert r.details["max_abs_diff_vs_quantized_model"] > 0  # the activation rounding it leaves out
    assert paddle().in_dynamic_mode()


_nn = paddle().nn
_F = paddle().nn.functional


class _Fork(_nn.Layer):
    """One activation read by two convolutions (each with its own input scale), and a branch that only training
    runs (like DB's threshold map): what the detectors' QDQ export met."""

    def __init__(self):
        super().__init__()
        self.stem = _nn.Conv2D(3, 4, 3, padding=1)
        self.left, self.right = _nn.Conv2D(4, 2, 1), _nn.Conv2D(4, 2, 1)
        self.train_only = _nn.Conv2D(4, 2, 1)

    def forward(self, x):
        y = _F.relu(self.stem(x))
        out = self.left(y) + self.right(y * 3.0)
        return [out, self.train_only(y)] if self.training else out


def test_onnx_qdq_export_of_a_shared_input_and_a_training_only_branch(tmp_path):
    import onnx

    paddle().seed(0)
    model = _Fork()
    quanter = qat.make_quanter({})
    qat.quantize(model, quanter)
    qat.calibrate(model, _batches(3))
    left, right = (layer.activation_quanter for layer in _quantized(model)[1:3])
    # two scales on one tensor: two Q/DQ pairs, two names
    assert float(left.scales().numpy().reshape(-1)[0]) != float(right.scales().numpy().reshape(-1)[0])
    x = _batches(1, batch=2, seed=5)[0]
    r = export_onnx({}, ExportContext(model, SHAPE, False, x, tmp_path, quanter))
    onnx.checker.check_model(onnx.load(str(r.path / "model.onnx")))  # initializer names are unique
    assert r.details["qdq_inserted"]["unused_layers"] == 1  # train_only: not in the exported (eval) graph
    assert_reproduces(r.runner(x), eager_outputs(model, x)[0])
