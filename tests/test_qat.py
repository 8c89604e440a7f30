"""PACT QAT: the config schema says what PaddleSlim really takes; quantized models train, export and reload."""

from __future__ import annotations

import copy
import types

import jsonschema
import numpy as np
import pytest

from slimrecipe import qat
from slimrecipe.errors import RecipeError, StageError
from slimrecipe.exporters import ExportContext, eager_outputs, export_onnx, export_paddle_inference
from slimrecipe.paddle_env import paddle, paddleslim

SHAPE = [3, 16, 16]


def _tiny_model(seed=0):
    from slimrecipe.models.vision import tiny_cnn

    paddle().seed(seed)
    model = tiny_cnn({"channels": [8, 16]}, types.SimpleNamespace(input_shape=SHAPE, num_classes=10))
    model.eval()
    return model


def _batches(n, batch=16, seed=0):
    rs = np.random.RandomState(seed)
    return [rs.rand(batch, *SHAPE).astype("float32") for _ in range(n)]


def _train(model, steps, seed=0):
    p = paddle()
    model.train()
    opt = p.optimizer.Adam(parameters=model.parameters(), learning_rate=1e-3)
    rs = np.random.RandomState(seed)
    losses = []
    for x in _batches(steps, seed=seed):
        y = p.to_tensor(rs.randint(0, 10, size=(len(x),)).astype("int64"))
        loss = p.nn.functional.cross_entropy(model(p.to_tensor(x)), y)
        loss.backward()
        opt.step()
        opt.clear_grad()
        losses.append(float(loss))
    model.eval()
    return losses


def test_schema_lists_every_paddleslim_key_with_its_default():
    from paddleslim.dygraph.quant.qat import _quant_config_default

    paddleslim()
    assert qat.PADDLESLIM_DEFAULTS == _quant_config_default
    props = qat.QAT_PARAMS_SCHEMA["properties"]
    jsonschema.Draft202012Validator.check_schema(qat.QAT_PARAMS_SCHEMA)
    assert qat.QAT_PARAMS_SCHEMA["additionalProperties"] is False
    assert set(props) == set(_quant_config_default) | {"pact"}
    for key, default in _quant_config_default.items():
        assert props[key]["default"] == default, key
    assert props["pact"]["default"] is True
    assert all(p.get("description") for p in props.values())


def test_every_value_the_schema_allows_builds_a_quanter():
    props = qat.QAT_PARAMS_SCHEMA["properties"]
    trials = [{k: v} for k, p in props.items() if "enum" in p for v in p["enum"]]
    trials += [{"quantizable_layer_type": [t]} for t in props["quantizable_layer_type"]["items"]["enum"]]
    trials += [{"weight_bits": 4, "activation_bits": 16, "window_size": 1, "moving_rate": 0.5},
               {"fuse_conv_bn": True, "onnx_format": False, "pact": False}]
    for config in trials:
        assert qat.make_quanter(config) is not None, config


def test_pact_is_on_by_default_and_can_be_turned_off():
    assert qat.resolve_config({})["activation_preprocess_type"] == "PACT"
    assert qat.resolve_config({"pact": False})["activation_preprocess_type"] is None
    assert qat.resolve_config({"activation_preprocess_type": None})["activation_preprocess_type"] is None
    assert qat.resolve_config({"moving_rate": 0.5})["moving_rate"] == 0.5
    assert "pact" not in qat.resolve_config({"pact": True})  # PaddleSlim never sees the shorthand


@pytest.mark.parametrize("config, path", [
    ({"pact": True, "activation_preprocess_type": None}, "qat.config.pact"),
    ({"activation_quantize_type": "range_abs_max"}, "qat.config.activation_quantize_type"),
    ({"weight_bits": 32}, "qat.config.weight_bits"),
    ({"quantizable_layer_type": ["Conv3D"]}, "qat.config.quantizable_layer_type.0"),
    ({"act_bits": 8}, "qat.config"),
])
def test_a_bad_config_is_a_recipe_error_naming_its_path(config, path):
    with pytest.raises(RecipeError) as err:
        qat.make_quanter(config)
    assert any(p.path == path for p in err.value.problems), err.value.render()


def test_quantized_model_stays_close_to_float_and_trains_with_pact():
    p = paddle()
    model = _tiny_model()
    float_model = copy.deepcopy(model)
    quanter = qat.make_quanter({})
    assert qat.quantize(model, quanter) is model
    pact_layers = [m for m in model.sublayers() if type(m).__name__ == "PACT"]
    assert len(pact_layers) == 3  # one per quantized conv/linear

    assert qat.calibrate(model, _batches(30)) == 30
    x = _batches(1, seed=5)[0]
    got, ref = eager_outputs(model, x)[0], eager_outputs(float_model, x)[0]
    assert np.abs(got - ref).max() < 0.1 * np.abs(ref).max()
    assert (got.argmax(1) == ref.argmax(1)).mean() >= 0.9

    losses = _train(model, 3)
    assert all(np.isfinite(losses))
    # the clipping level is learnt: it gets a gradient
    model.train()
    loss = model(p.to_tensor(x)).mean()
    loss.backward()
    assert pact_layers[0].alpha.grad is not None
    model.clear_gradients()
    model.eval()


def test_fuse_conv_bn_really_folds_batchnorm_and_keeps_outputs():
    nn = paddle().nn
    model = _tiny_model()
    x = _batches(1)[0][:4]
    before = eager_outputs(model, x)[0]
    qat.quantize(model, qat.make_quanter({"fuse_conv_bn": True, "pact": False}), example=x)
    assert not [m for m in model.sublayers() if isinstance(m, nn.BatchNorm2D)]
    fused = _tiny_model()
    assert qat.fuse_conv_bn(fused, example=x) == [["0", "1"], ["4", "5"]]
    np.testing.assert_allclose(eager_outputs(fused, x)[0], before, atol=1e-4)


@pytest.fixture(scope="module")
def quantized_exports(tmp_path_factory):
    model = _tiny_model()
    quanter = qat.make_quanter({})
    qat.quantize(model, quanter)
    _train(model, 5)
    qat.calibrate(model, _batches(25, seed=1))
    ctx = ExportContext(model, SHAPE, False, _batches(1, batch=4, seed=9)[0], tmp_path_factory.mktemp("q"), quanter)
    pd_result = export_paddle_inference({}, ctx)
    in_dynamic_after_first = paddle().in_dynamic_mode()
    onnx_result = export_onnx({}, ctx)
    return model, ctx, pd_result, onnx_result, in_dynamic_after_first


def test_quantized_model_exports_to_both_targets_and_reloads(quantized_exports):
    model, ctx, pd_result, onnx_result, _ = quantized_exports
    for r in (pd_result, onnx_result):
        assert r.parity["ok"] and r.parity["quantized"] and r.parity["top1_agreement"] == 1.0
        assert r.runner(ctx.sample).shape == (4, 10)


def test_quantized_onnx_has_qdq_nodes_that_onnxruntime_runs_as_int8(quantized_exports):
    _, _, _, onnx_result, _ = quantized_exports
    d = onnx_result.details
    assert d["has_qdq"] and d["qdq_nodes"]["QuantizeLinear"] > 0 and d["qdq_nodes"]["DequantizeLinear"] > 0
    assert d["ort_int8_kernels"].get("QLinearConv", 0) >= 1


def test_export_returns_to_dynamic_mode_and_the_model_keeps_training(quantized_exports):
    model, ctx, _, _, in_dynamic_after_first = quantized_exports
    assert in_dynamic_after_first and paddle().in_dynamic_mode()
    assert type(model.forward).__name__ == "method"  # not turned into a static function by the save
    assert all(np.isfinite(_train(model, 1)))
    # it can be exported again, with its new weights: PaddleSlim's PACT save re-quantizes its float copy
    # in place, so a naive second save wraps layers twice and silently exports the first save's weights
    with paddle().no_grad():
        for name, param in model.named_parameters():
            if name in ("10._layer.weight", "10._layer.bias"):  # the classifier head: logits change sign
                param.set_value(-param.numpy())
    again = export_paddle_inference({}, ExportContext(model, SHAPE, False, ctx.sample, ctx.out_dir / "again",
                                                      ctx.quanter))
    assert again.parity["ok"] and paddle().in_dynamic_mode()


def test_onnx_export_refuses_a_model_quantized_without_onnx_format(tmp_path):
    model = _tiny_model()
    quanter = qat.make_quanter({"onnx_format": False, "pact": False})
    qat.quantize(model, quanter)
    ctx = ExportContext(model, SHAPE, False, _batches(1, batch=2)[0], tmp_path, quanter)
    with pytest.raises(StageError, match="onnx_format"):
        export_onnx({}, ctx)
    qat.calibrate(model, _batches(20))
    assert export_paddle_inference({}, ctx).parity["ok"]  # fake-quant ops: Paddle Inference still runs it
    assert paddle().in_dynamic_mode()
    assert type(model.forward).__name__ == "method"  # Paddle's save would have made it a static function
