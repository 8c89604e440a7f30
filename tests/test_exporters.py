"""Exporters reload what they wrote and refuse exports that do not reproduce the model; latency is interleaved."""

from __future__ import annotations

import json
import re
import types

import jsonschema
import numpy as np
import pytest

from slimrecipe.errors import StageError
from slimrecipe.exporters import (
    ExportContext,
    eager_outputs,
    export_onnx,
    export_paddle_inference,
    forget_stale_trace_records,
    interleaved_latency,
    onnx_op_counts,
)
from slimrecipe.fileio import sha256_file
from slimrecipe.models._db_layers import export_form, upsample_like
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


def _paddle3() -> bool:
    return int(paddle().__version__.split(".")[0]) >= 3


def test_paddle_inference_export_writes_the_running_paddles_format_and_reloads(float_exports):
    model, results = float_exports
    r = results["paddle_inference"]
    program = "model.json" if _paddle3() else "model.pdmodel"  # Paddle 3 saves PIR programs as JSON
    assert {program, "model.pdiparams"} <= set(r.files) and r.details["model_file"] == program
    assert not ({"model.json", "model.pdmodel"} - {program}) & set(r.files)
    for rel, digest in r.files.items():
        assert sha256_file(r.path / rel) == digest
    assert r.size_bytes == sum((r.path / rel).stat().st_size for rel in r.files)
    # the runner is the reloaded predictor: it agrees with the model on inputs it never saw
    x = _sample(n=3, seed=7)
    with paddle().no_grad():
        expected = model(paddle().to_tensor(x)).numpy()
    np.testing.assert_allclose(r.runner(x), expected, atol=1e-4)


def test_onnx_export_reloads_and_matches(float_exports):
    model, results = float_exports
    r = results["onnx"]
    assert r.details["opset"] >= 13 and r.details["has_qdq"] is False
    assert list(r.files) == ["model.onnx"] and sha256_file(r.path / "model.onnx") == r.files["model.onnx"]
    x = _sample(n=2, seed=8)
    with paddle().no_grad():
        expected = model(paddle().to_tensor(x)).numpy()
    np.testing.assert_allclose(r.runner(x), expected, atol=1e-4)


def test_results_serialise_without_the_runner(float_exports):
    _, results = float_exports
    for r in results.values():
        doc = json.loads(json.dumps(r.to_json()))
        assert "runner" not in doc and doc["target"] == r.target and doc["files"] == r.files


@pytest.mark.parametrize("exporter", [export_paddle_inference, export_onnx])
def test_an_export_that_differs_from_the_model_is_refused_with_figures(exporter, tmp_path):
    good = exporter({}, _ctx(_tiny_model(), tmp_path))
    ctx = _ctx(EagerOnlyShift.build(), tmp_path)
    with pytest.raises(StageError) as err:
        exporter({}, ctx)
    msg = str(err.value)
    assert msg.startswith(f"{good.target} export") and "max abs diff 1" in msg and "batch of 4" in msg
    # the refused export does not replace the good one; it is kept aside for inspection
    assert {rel: sha256_file(good.path / rel) for rel in good.files} == good.files
    assert (tmp_path / f"{good.target}.rejected").is_dir() and f"{good.target}.rejected" in msg


def test_the_tolerance_is_the_users_and_the_difference_is_recorded(tmp_path):
    ctx = _ctx(EagerOnlyShift.build(), tmp_path)
    with pytest.raises(StageError, match="tolerance 0.9"):
        export_paddle_inference({"atol": 0.9, "rtol": 0}, ctx)
    r = export_paddle_inference({"atol": 1.1, "rtol": 0}, ctx)  # the same export passes a looser tolerance
    assert r.parity["tolerance"] == 1.1 and abs(r.parity["max_abs_diff"] - 1.0) < 1e-4


def test_dynamic_hw_export_takes_other_sizes(tmp_path):
    ctx = _ctx(_tiny_model(), tmp_path, sample=_sample(n=2), dynamic_hw=True)
    for r in (export_paddle_inference({}, ctx), export_onnx({}, ctx)):
        assert r.details["input_name"] == "x"
        assert r.runner(_sample(n=1, hw=(24, 20))).shape == (1, 10)


def test_onednn_int8_without_onednn_is_refused(tmp_path):
    with pytest.raises(StageError, match="onednn_int8 needs mkldnn"):
        export_paddle_inference({"onednn_int8": True, "mkldnn": False}, _ctx(_tiny_model(), tmp_path))


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


def test_stale_trace_records_are_dropped_before_saving(tmp_path):
    # Paddle 2.6 keeps dy2static's parameter records keyed by id(program); a record never popped (PaddleSlim's
    # FLOPs count left them) is inherited by a later save whose Program reuses that id
    from paddle.jit.dy2static.program_translator import ProgramTranslator

    recorder = getattr(ProgramTranslator.get_instance(), "_params_recorder", None)
    records = getattr(recorder, "params_dict", None)
    if not isinstance(records, dict):
        pytest.skip(f"Paddle {paddle().__version__} keeps no dy2static parameter records to go stale")
    records[12345] = ["stale"]
    model = _tiny_model()
    r = export_paddle_inference({}, _ctx(model, tmp_path))
    assert 12345 not in records and forget_stale_trace_records() == 0
    np.testing.assert_allclose(r.runner(_sample()), model(paddle().to_tensor(_sample())).numpy(), atol=1e-4)


def test_the_trace_record_workaround_warns_when_paddle_moved_the_records(monkeypatch):
    from paddle.jit.dy2static.program_translator import ProgramTranslator

    translator = ProgramTranslator.get_instance()
    monkeypatch.setattr(translator, "_params_recorder", None)
    monkeypatch.setattr(translator, "_inplace_map", None)
    with pytest.warns(UserWarning, match="forget_stale_trace_records"):
        assert forget_stale_trace_records() == 0


def test_a_narrower_model_exports_smaller_files_by_about_its_parameter_ratio(tmp_path):
    from slimrecipe.models.vision import tiny_cnn

    def build(channels):
        paddle().seed(0)
        m = tiny_cnn({"channels": channels}, types.SimpleNamespace(input_shape=SHAPE, num_classes=10))
        m.eval()
        return m

    full, pruned = build([32, 64]), build([16, 32])  # what pruning half of every layer's filters leaves
    n_full = sum(int(np.prod(p.shape)) for p in full.parameters())
    n_pruned = sum(int(np.prod(p.shape)) for p in pruned.parameters())
    for exporter, weights_file in ((export_paddle_inference, "model.pdiparams"), (export_onnx, "model.onnx")):
        a = exporter({}, _ctx(full, tmp_path / "full"))
        b = exporter({}, _ctx(pruned, tmp_path / "pruned"))
        size_ratio = (b.path / weights_file).stat().st_size / (a.path / weights_file).stat().st_size
        assert abs(size_ratio - n_pruned / n_full) < 0.05, (weights_file, size_ratio, n_pruned / n_full)
        assert b.size_bytes < a.size_bytes


def test_onnx_export_fetches_nothing_and_reports_no_failure(tmp_path, capfd, monkeypatch):
    import subprocess

    def no_installs(*args, **kwargs):
        raise AssertionError(f"something ran a subprocess during export: {args}")

    monkeypatch.setattr(subprocess, "run", no_installs)
    monkeypatch.setattr(subprocess, "check_call", no_installs)
    monkeypatch.setattr(subprocess, "Popen", no_installs)
    export_onnx({}, _ctx(_tiny_model(seed=3), tmp_path))
    out = capfd.readouterr()
    text = (out.out + out.err).lower()
    assert "pip" not in text and "fail" not in text and "error" not in text, text


def test_interleaved_latency_interleaves_and_reports_every_runner():
    calls = []

    def runner(name):
        def run(x):
            calls.append(name)
            return x

        return run

    out = interleaved_latency({"base": runner("a"), "other": runner("b")}, _sample(n=1), repeats=6, warmup=1)
    assert calls[:2] == ["a", "b"]  # warm-up
    assert calls[2:] == ["a", "b", "b", "a"] * 3  # A B, then B A: position effects fall on both
    assert out["setup"]["baseline"] == "base" and out["base"]["ratio_to_first"] == 1.0
    assert set(out["other"]) >= {"median_ms", "p90_ms", "mean_ms", "min_ms", "ratio_to_first", "paired_ratio"}
    with pytest.raises(ValueError, match="reserved"):
        interleaved_latency({"setup": runner("a")}, _sample(n=1))


class _UpsamplingNeck(paddle().nn.Layer):
    def __init__(self):
        super().__init__()
        self.down = paddle().nn.Conv2D(3, 4, 3, stride=2, padding=1)

    def forward(self, x):
        return upsample_like(self.down(x), x)


@pytest.mark.parametrize("factor", [2, 4, 8])
def test_upsampling_saved_for_paddle_inference_repeats_pixels_as_nearest_interpolation_does(factor):
    x = paddle().to_tensor(np.random.RandomState(0).rand(2, 3, 5, 7).astype("float32"))
    ref = paddle().zeros([1, 1, 5 * factor, 7 * factor])
    with export_form("paddle_inference"):
        repeated = upsample_like(x, ref).numpy()
    interpolated = upsample_like(x, ref).numpy()
    assert repeated.shape == (2, 3, 5 * factor, 7 * factor)
    np.testing.assert_array_equal(repeated, interpolated)
    # a size that is not a multiple (no FPN level on a multiple-of-32 input) still comes out at ref's size
    with export_form("paddle_inference"):
        assert upsample_like(x, paddle().zeros([1, 1, 9, 13])).shape == [2, 3, 9, 13]


class _DetectorLikeNeck(_UpsamplingNeck):
    export_form = staticmethod(export_form)


def test_a_detector_saved_for_paddle_inference_has_no_interpolation_op_and_onednn_places_all_of_it(tmp_path):
    # the detectors trace their upsampling as a repeat for Paddle Inference (oneDNN then runs the whole program)
    # and keep the Resize op for ONNX (onnxruntime runs it in its blocked layout)
    paddle().seed(0)
    model = _DetectorLikeNeck()
    model.eval()
    x = np.random.RandomState(0).rand(1, 3, 64, 96).astype("float32")
    ctx = ExportContext(model, [3, 64, 96], True, x, tmp_path, None)
    r = export_paddle_inference({"mkldnn": True}, ctx)
    if r.details["model_file"].endswith(".json"):  # Paddle 3's PIR program (Paddle 2.6's oneDNN runs interp ops)
        ops = set(re.findall(r'"1\.(\w+)"', (r.path / r.details["model_file"]).read_text()))
        assert "expand" in ops and not [op for op in ops if op.endswith("_interp")]
    assert "onednn_placement" not in r.details
    assert np.abs(r.runner(x) - eager_outputs(model, x)[0]).max() < 1e-4
    onnx = export_onnx({}, ctx)
    assert onnx_op_counts(onnx.path / "model.onnx").get("Resize") == 1


def test_an_upsampling_detector_neck_runs_in_paddle_inference_with_onednn(tmp_path):
    # Paddle 3.3's oneDNN executor cannot run interpolation ops of a saved PIR program (Paddle issue #79749);
    # the predictor leaves their placement to Paddle's CPU kernels and the export says so
    paddle().seed(0)
    model = _UpsamplingNeck()
    model.eval()
    x = np.random.RandomState(0).rand(1, 3, 64, 96).astype("float32")
    r = export_paddle_inference({"mkldnn": True}, ExportContext(model, [3, 64, 96], True, x, tmp_path, None))
    assert r.runner(x).shape == (1, 4, 64, 96)
    assert np.abs(r.runner(x) - eager_outputs(model, x)[0]).max() < 1e-4
    is_pir = r.details["model_file"].endswith(".json")
    assert ("onednn_placement" in r.details) == is_pir
