"""Exporters reload what they wrote and refuse exports that do not reproduce the model; latency is interleaved."""

from __future__ import annotations

import json
import time
import types

import jsonschema
import numpy as np
import pytest

from slimrecipe.errors import StageError
from slimrecipe.exporters import (
    ExportContext,
    export_onnx,
    export_paddle_inference,
    forget_stale_trace_records,
    interleaved_latency,
    onnx_op_counts,
)
from slimrecipe.fileio import sha256_file
from slimrecipe.paddle_env import paddle
from slimrecipe.registry import REGISTRIES

SHAPE = [3, 16, 16]
_PD = None  # the paddle module, bound lazily: dy2static must see a module global, not a call


def _tiny_model(seed=0):
    from slimrecipe.models.vision import tiny_cnn

    paddle().seed(seed)
    model = tiny_cnn({"channels": [4, 8]}, types.SimpleNamespace(input_shape=SHAPE, num_classes=10))
    model.eval()
    return model


def _ctx(model, out_dir, sample=None, dynamic_hw=False, quanter=None):
    return ExportContext(model, SHAPE, dynamic_hw, _sample() if sample is None else sample, out_dir, quanter)


def _sample(n=4, hw=(16, 16), seed=0):
    return np.random.RandomState(seed).randn(n, SHAPE[0], *hw).astype("float32")


class EagerOnlyShift:
    """Adds 1 only in dynamic mode: a forward whose Python branch the static export cannot see."""

    @staticmethod
    def build():
        global _PD
        _PD = paddle()
        nn = _PD.nn

        class Shifted(nn.Layer):
            def __init__(self):
                super().__init__()
                self.body = _tiny_model()

            def forward(self, x):
                y = self.body(x)
                if _PD.in_dynamic_mode():
                    y = y + 1.0
                return y

        model = Shifted()
        model.eval()
        return model


@pytest.fixture(scope="module")
def float_exports(tmp_path_factory):
    model = _tiny_model()
    ctx = _ctx(model, tmp_path_factory.mktemp("f"))
    return model, {r.target: r for r in (export_paddle_inference({}, ctx), export_onnx({}, ctx))}


def test_paddle_inference_export_reloads_and_matches(float_exports):
    model, results = float_exports
    r = results["paddle_inference"]
    assert r.parity["ok"] and r.parity["max_abs_diff"] < 1e-4
    assert {"model.pdmodel", "model.pdiparams"} <= set(r.files)
    for rel, digest in r.files.items():
        assert sha256_file(r.path / rel) == digest
    assert r.size_bytes == sum((r.path / rel).stat().st_size for rel in r.files)
    # the runner is the reloaded predictor: it agrees with the model on inputs it never saw
    x = _sample(n=3, seed=7)
    with paddle().no_grad():
        expected = model(paddle().to_tensor(x)).numpy()
    np.testing.assert_allclose(r.runner(x), expected, atol=1e-4)


def test_onnx_export_reloads_and_matches(float_exports):
    _, results = float_exports
    r = results["onnx"]
    assert r.parity["ok"] and r.parity["max_abs_diff"] < 1e-4
    assert r.details["opset"] >= 13 and r.details["has_qdq"] is False
    assert list(r.files) == ["model.onnx"] and sha256_file(r.path / "model.onnx") == r.files["model.onnx"]
    assert r.runner(_sample(n=1)).shape == (1, 10)


def test_results_serialise_without_the_runner(float_exports):
    _, results = float_exports
    for r in results.values():
        doc = json.loads(json.dumps(r.to_json()))
        assert "runner" not in doc and doc["parity"]["ok"] is True and doc["target"] == r.target


@pytest.mark.parametrize("exporter", [export_paddle_inference, export_onnx])
def test_an_export_that_differs_from_the_model_is_refused_with_figures(exporter, tmp_path):
    good = exporter({}, _ctx(_tiny_model(), tmp_path))
    ctx = _ctx(EagerOnlyShift.build(), tmp_path)
    with pytest.raises(StageError) as err:
        exporter({}, ctx)
    msg = str(err.value)
    assert "max abs diff 1" in msg and "tolerance" in msg and "batch of 4" in msg
    # the refused export does not replace the good one; it is kept aside for inspection
    assert {rel: sha256_file(good.path / rel) for rel in good.files} == good.files
    assert (tmp_path / f"{good.target}.rejected").is_dir() and f"{good.target}.rejected" in msg


def test_the_tolerance_is_the_users_and_the_difference_is_recorded(tmp_path):
    ctx = _ctx(EagerOnlyShift.build(), tmp_path)
    r = export_paddle_inference({"atol": 1.5, "rtol": 0}, ctx)
    assert r.parity["ok"] and r.parity["tolerance"] == 1.5
    assert abs(r.parity["max_abs_diff"] - 1.0) < 1e-4


def test_dynamic_hw_export_takes_other_sizes(tmp_path):
    ctx = _ctx(_tiny_model(), tmp_path, sample=_sample(n=2), dynamic_hw=True)
    for r in (export_paddle_inference({}, ctx), export_onnx({}, ctx)):
        assert r.details["input_name"] == "x"
        assert r.runner(_sample(n=1, hw=(24, 20))).shape == (1, 10)


def test_a_sample_of_the_wrong_shape_is_refused(tmp_path):
    ctx = _ctx(_tiny_model(), tmp_path, sample=_sample(hw=(8, 8)))
    with pytest.raises(StageError, match="parity sample has shape"):
        export_paddle_inference({}, ctx)


def test_re_export_replaces_the_previous_one(tmp_path):
    ctx = _ctx(_tiny_model(), tmp_path)
    first = export_paddle_inference({}, ctx)
    ctx.model = _tiny_model(seed=1)
    second = export_paddle_inference({}, ctx)
    assert second.files["model.pdiparams"] != first.files["model.pdiparams"]
    assert sha256_file(second.path / "model.pdiparams") == second.files["model.pdiparams"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["paddle_inference"]  # no staging leftovers


def test_exporter_plugins_are_registered_with_strict_schemas():
    for name in ("paddle_inference", "onnx"):
        plugin = REGISTRIES["exporter"].get(name)
        schema = plugin.schema
        jsonschema.Draft202012Validator.check_schema(schema)
        assert schema["additionalProperties"] is False
        assert all("description" in p and ("type" in p or "enum" in p) for p in schema["properties"].values())
        validator = jsonschema.Draft202012Validator(schema)
        assert not list(validator.iter_errors({"threads": 2, "atol": 1e-3}))
        assert list(validator.iter_errors({"thread": 2}))
    assert not list(jsonschema.Draft202012Validator(REGISTRIES["exporter"].get("onnx").schema)
                    .iter_errors({"opset": 13, "require_qdq": True}))


def test_onnx_op_counts_sees_the_graph(float_exports):
    _, results = float_exports
    counts = onnx_op_counts(results["onnx"].path / "model.onnx")
    assert counts.get("Conv") == 2 and "QuantizeLinear" not in counts


def test_stale_trace_records_left_by_paddleslim_are_dropped_before_saving(tmp_path):
    # PaddleSlim's FLOPs count traces the model and never pops dy2static's parameter record; a later save whose
    # Program reuses that id would inherit the stale parameters (a KeyError seen now and then in a full run)
    from paddle.jit.dy2static.program_translator import ProgramTranslator
    from slimrecipe.paddle_env import paddleslim

    records = ProgramTranslator.get_instance()._params_recorder.params_dict
    model = _tiny_model()
    paddleslim().analysis.dygraph_flops(model, [1, *SHAPE])
    assert records
    assert export_paddle_inference({}, _ctx(model, tmp_path)).parity["ok"]
    assert not records
    assert forget_stale_trace_records() == 0


def test_interleaved_latency_reports_medians_and_ratio():
    calls = []

    def runner(name, seconds):
        def run(x):
            calls.append(name)
            time.sleep(seconds)
            return x

        return run

    out = interleaved_latency({"base": runner("a", 0.002), "slow": runner("b", 0.006)}, _sample(n=1),
                              repeats=6, warmup=1)
    assert calls[:2] == ["a", "b"]  # warm-up
    assert calls[2:] == ["a", "b", "b", "a"] * 3  # A B, then B A: position effects fall on both
    base, slow = out["base"], out["slow"]
    assert out["setup"]["baseline"] == "base" and base["ratio_to_first"] == 1.0
    assert base["median_ms"] >= 2 and slow["median_ms"] >= 6 and base["p90_ms"] >= base["median_ms"]
    assert 1.5 < slow["ratio_to_first"] < 4 and 1.5 < slow["paired_ratio"] < 4


def test_interleaved_latency_times_real_exports(float_exports):
    _, results = float_exports
    out = interleaved_latency({"pd": results["paddle_inference"].runner, "ort": results["onnx"].runner},
                              _sample(n=1), repeats=5, warmup=2)
    assert out["pd"]["threads"] == 1 and out["ort"]["threads"] == 1 and out["threads"] == 1
    assert out["ort"]["median_ms"] > 0 and out["ort"]["ratio_to_first"] > 0
