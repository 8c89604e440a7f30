"""Post-training int8 on onnxruntime and on Paddle Inference: deterministic calibration, accuracy control that
returns the right layers to float, and an exported int8 model that computes what the ptq stage measured."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("onnxruntime")
pytest.importorskip("paddle2onnx")

from slimrecipe import ptq as lib  # noqa: E402
from slimrecipe import qat  # noqa: E402
from slimrecipe.errors import StageError  # noqa: E402
from slimrecipe.exporters import (ExportContext, eager_outputs, export_onnx, export_paddle_inference,  # noqa: E402
                                  float_onnx_bytes, paddle_predictor)
from slimrecipe.paddle_env import paddle  # noqa: E402
from slimrecipe.stages.ptq import _param_for, calibration_images  # noqa: E402

SHAPE = [3, 12, 12]


def _three_convs(outlier: bool):
    """conv1 -> relu -> conv2 -> relu -> conv3. With ``outlier``, conv1's channel 0 is 1000x larger than the
    rest and conv2 ignores it: one int8 scale for the whole tensor between conv1 and conv2 then rounds the
    channels that matter to zero. onnxruntime's QDQ puts that tensor on the int8 grid when either conv1 (its
    output) or conv2 (its input) is quantized, so those two are the layers int8 hurts; conv3 is harmless."""
    p = paddle()
    p.seed(3)

    class Net(p.nn.Layer):
        def __init__(self):
            super().__init__()
            self.conv1 = p.nn.Conv2D(3, 8, 3, padding=1)
            self.conv2 = p.nn.Conv2D(8, 8, 3, padding=1)
            self.conv3 = p.nn.Conv2D(8, 4, 3, padding=1)
            self.relu = p.nn.ReLU()  # a sublayer, not a closure: Paddle 2.6's to_static cannot read closures

        def forward(self, x):
            return self.conv3(self.relu(self.conv2(self.relu(self.conv1(x)))))

    net = Net()
    if outlier:
        w1, b1 = net.conv1.weight.numpy(), net.conv1.bias.numpy()
        w1[0], b1[0] = np.abs(w1[0]) * 1000, 1000.0
        net.conv1.weight.set_value(w1)
        net.conv1.bias.set_value(b1)
        w2 = net.conv2.weight.numpy()
        w2[:, 0] = 0
        net.conv2.weight.set_value(w2)
    net.eval()
    return net


def _images(n: int, seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.random(SHAPE, dtype=np.float32) for _ in range(n)]


def _prepared(model, tmp_path: Path) -> Path:
    ctx = ExportContext(model, SHAPE, False, _images(1)[0][None], tmp_path)
    return lib.prepare(float_onnx_bytes(ctx, 13), tmp_path / "prepared.onnx")


def _outputs(onnx_file: Path, images) -> np.ndarray:
    run = lib.session(onnx_file)
    return np.concatenate([run(x[None]) for x in images])


def test_calibration_is_deterministic_by_seed(tmp_path):
    train = [(x, 0) for x in _images(40)]
    imgs_a, idx_a = calibration_images(train, 8, seed=7)
    imgs_b, idx_b = calibration_images(train, 8, seed=7)
    _, idx_c = calibration_images(train, 8, seed=8)
    assert idx_a == idx_b and idx_a != idx_c and len(set(idx_a)) == 8
    prepared = _prepared(_three_convs(outlier=False), tmp_path)
    for method in ("minmax", "percentile", "entropy"):
        settings = lib.Settings(method=method)
        a = lib.calibrate(prepared, imgs_a, settings, tmp_path / f"{method}_a.json")
        b = lib.calibrate(prepared, imgs_b, settings, tmp_path / f"{method}_b.json")
        assert json.loads(a.read_text()) == json.loads(b.read_text())
    # another draw of images gives other ranges
    c = lib.calibrate(prepared, [x for x, _ in train[30:38]], lib.Settings(), tmp_path / "other.json")
    assert json.loads(c.read_text()) != json.loads((tmp_path / "minmax_a.json").read_text())
    # the methods differ: percentile clips what min-max keeps
    assert (json.loads((tmp_path / "percentile_a.json").read_text())
            != json.loads((tmp_path / "minmax_a.json").read_text()))


def test_calibrating_twice_into_one_file_is_refused(tmp_path):
    prepared = _prepared(_three_convs(outlier=False), tmp_path)
    ranges = lib.calibrate(prepared, _images(4), lib.Settings(), tmp_path / "ranges.json")
    with pytest.raises(StageError, match="already exist"):
        lib.quantize(prepared, ranges, lib.Settings(), tmp_path / "q.onnx", images=_images(4))
    with pytest.raises(StageError, match="calibrate first"):
        lib.quantize(prepared, tmp_path / "missing.json", lib.Settings(), tmp_path / "q.onnx")


def test_unmeetable_tolerance_keeps_the_most_sensitive_layer_in_float(tmp_path):
    model = _three_convs(outlier=True)
    prepared = _prepared(model, tmp_path)
    images = _images(12)
    settings = lib.Settings()
    ranges = lib.calibrate(prepared, images[:8], settings, tmp_path / "ranges.json")
    layers = lib.quantizable_layers(prepared)
    names = {p.name: n for n, p in model.named_parameters()}
    param_of = {layer["node"]: _param_for(layer["weight"], names) for layer in layers}
    assert sorted(param_of.values()) == ["conv1.weight", "conv2.weight", "conv3.weight"]
    reference = _outputs(prepared, images[8:])

    def measure(float_layers):
        q = lib.quantize(prepared, ranges, settings, tmp_path / "round.onnx", exclude=float_layers)
        return -float(np.mean(np.abs(_outputs(q, images[8:]) - reference)))

    ranked = []

    def rank():
        ranked.extend(lib.layer_sensitivity(prepared, ranges, settings, layers, images[:4], progress=False))
        return [r["node"] for r in ranked]

    # a loss of 0 cannot be met while any layer is int8; one round may return two layers to float
    ctl = lib.accuracy_control(measure, 0.0, rank, max_loss=0.0, max_rounds=1, per_round=2, echo=lambda *_: None)
    order = [param_of[r["node"]] for r in ranked]
    assert sorted(order[:2]) == ["conv1.weight", "conv2.weight"] and order[2] == "conv3.weight", ranked
    assert ranked[1]["sqnr_db"] + 10 < ranked[2]["sqnr_db"]
    assert ctl.met is False and "was not met" in ctl.message and "max_rounds 1" in ctl.message
    assert len(ctl.rounds) == 2
    kept = ctl.rounds[ctl.chosen]
    assert sorted(param_of[n] for n in kept.float_layers) == ["conv1.weight", "conv2.weight"]
    assert kept.loss < ctl.rounds[0].loss / 10  # the closest result is the one kept, and it is much closer


def test_budget_met_at_once_needs_no_ranking(tmp_path):
    calls = []
    ctl = lib.accuracy_control(lambda fl: 0.99, 1.0, lambda: calls.append(1) or [], max_loss=0.02,
                               max_rounds=3, per_round=1, echo=lambda *_: None)
    assert ctl.met is True and ctl.chosen == 0 and not calls and len(ctl.rounds) == 1
    # a lower-is-better metric counts its loss the other way round
    ctl = lib.accuracy_control(lambda fl: 1.05, 1.0, lambda: ["a"], max_loss=0.02, max_rounds=1, per_round=1,
                               higher_is_better=False, echo=lambda *_: None)
    assert ctl.rounds[0].loss == pytest.approx(0.05) and ctl.met is False


def test_export_rebuilds_the_measured_int8_model_and_refuses_another(tmp_path):
    model = _three_convs(outlier=False)
    prepared = _prepared(model, tmp_path)
    settings = lib.Settings()
    ranges = lib.calibrate(prepared, _images(8), settings, tmp_path / "ranges.json")
    layers = [layer["node"] for layer in lib.quantizable_layers(prepared)]
    measured = lib.quantize(prepared, ranges, settings, tmp_path / "measured.onnx", exclude=layers[1:2])
    record = {"runtime": "onnxruntime", "ranges": str(ranges), "settings": settings.to_json(),
              "float_layers": layers[1:2], "measured_model": str(measured)}
    x = np.stack(_images(4, seed=5))
    # no tolerance at all against the float model: a ptq export is judged by being the measured int8 model (whose
    # metric the stage took), its distance from the float model is only recorded
    res = export_onnx({"atol_quantized": 0.0, "rtol_quantized": 0.0},
                      ExportContext(model, SHAPE, False, x, tmp_path / "out", ptq=record))
    assert res.parity["ok"] is False and res.parity["enforced"] is False and res.parity["max_abs_diff"] > 0
    facts = res.details["ptq"]
    assert res.details["quantized"] and res.details["has_qdq"]
    assert facts["max_abs_diff_vs_measured"] == 0.0 and facts["float_layers"] == layers[1:2]
    np.testing.assert_array_equal(res.runner(x), _outputs(measured, list(x)))
    # a measured model that is not what the record describes: the export says so
    lib.quantize(prepared, ranges, settings, measured, exclude=[])
    with pytest.raises(StageError, match="differs from the one the ptq stage measured"):
        export_onnx({"atol_quantized": 0.0, "rtol_quantized": 0.0},
                    ExportContext(model, SHAPE, False, x, tmp_path / "out2", ptq=record))


def test_ptq_and_qat_in_one_recipe_is_a_recipe_error(run_cli):
    r = run_cli("validate", "+recipe=cls_prune_ptq",
                "stages=[train,evaluate,sensitivity,prune,finetune,qat,ptq,export,report]")
    assert r.returncode == 2, r.stderr
    assert "stages[6]" in r.stderr and "ptq or with qat" in r.stderr and "Traceback" not in r.stderr


def test_cls_prune_ptq_smoke_end_to_end(run_cli, tmp_path):
    run_dir = tmp_path / "run"
    r = run_cli("+recipe=cls_prune_ptq", "+profile=smoke", f"hydra.run.dir={run_dir}", "ptq.max_metric_loss=0.0",
                "ptq.max_rounds=1", "ptq.layers_per_round=1")
    assert r.returncode == 0, r.stderr[-3000:]
    res = json.loads(next((run_dir / "stages").glob("*-ptq/result.json")).read_text())
    assert res["calibration"]["images"] == 16 and (run_dir / res["calibration"]["ranges_file"]).is_file()
    assert res["rounds"][0]["float_layers"] == [] and res["quantizable_layers"] >= 3
    if res["rounds"][0]["loss"] > 0:  # the budget of 0 was missed with every layer int8: one round followed
        assert len(res["rounds"]) == 2 and len(res["rounds"][1]["float_layers"]) == 1
        assert res["layer_ranking"] and res["layer_ranking"][0]["param"]
    onnx = json.loads(next((run_dir / "stages").glob("*-export/result.json")).read_text())["targets"]["onnx"]
    assert onnx["compressed"]["details"]["ptq"]["max_abs_diff_vs_measured"] == 0.0
    assert onnx["compressed"]["details"]["ort_int8_kernels"]
    report = (run_dir / "report.md").read_text()
    assert "| int8 (PTQ) |" in report and "## Post-training int8 (accuracy control)" in report


# ---------------------------------------------------------------------------------------------- paddle_inference
# as tests/test_qat.py judges a QAT export: the same arithmetic up to float summation order (median), and at
# most one int8 step where a rounding tie went the other way (max)
TIGHT = 1e-4
ONE_STEP = 0.05


def assert_reproduces(got, expected, what=""):
    diff = np.abs(got - expected)
    assert np.median(diff) <= TIGHT and diff.max() < ONE_STEP, (what, float(np.median(diff)), float(diff.max()))


def _scales(model) -> dict:
    return {k: v.numpy().copy() for k, v in model.state_dict().items() if k.endswith("_scale")}


def test_paddle_inference_calibration_is_deterministic_by_seed():
    model = _three_convs(outlier=False)
    x = np.stack(_images(3, seed=5))
    before = eager_outputs(model, x)[0]
    train = [(img, 0) for img in _images(40)]
    config = lib.paddle_quant_config()
    runs = {}
    for tag, seed in (("a", 7), ("b", 7), ("c", 8)):
        images, _ = calibration_images(train, 8, seed)
        runs[tag] = (images, *lib.paddle_quantize(model, config, images))
    (images_a, a, _), (_, b, _), (_, c, _) = runs["a"], runs["b"], runs["c"]
    scales_a, scales_b, scales_c = _scales(a), _scales(b), _scales(c)
    assert scales_a.keys() == scales_b.keys() and len(scales_a) == 9  # 3 layers: weight, input, output
    for k in scales_a:
        np.testing.assert_array_equal(scales_a[k], scales_b[k], err_msg=k)
    np.testing.assert_array_equal(eager_outputs(a, x)[0], eager_outputs(b, x)[0])
    # another draw of images gives other activation scales (the weight scales depend on the weights alone)
    moved = [k for k in scales_a if not np.array_equal(scales_a[k], scales_c[k])]
    assert moved and all("weight_quanter" not in k for k in moved)
    # the first layer's input scale is what the schema says: the mean over the images of each one's abs-max
    assert scales_a["conv1._observed.activation_quanter._scale"][0] == pytest.approx(
        np.mean([np.abs(img).max() for img in images_a]), rel=1e-6)
    np.testing.assert_array_equal(eager_outputs(model, x)[0], before)  # the float model is left alone


def test_paddle_inference_exports_reproduce_the_in_memory_ptq_model(tmp_path):
    from slimrecipe.models.vision import tiny_cnn

    shape = [3, 16, 16]
    paddle().seed(0)
    model = tiny_cnn({"channels": [8, 16]}, __import__("types").SimpleNamespace(input_shape=shape, num_classes=10))
    model.eval()
    rng = np.random.default_rng(0)
    images = [rng.random(shape, dtype=np.float32) for _ in range(8)]
    quantized, quanter = lib.paddle_quantize(model, lib.paddle_quant_config(), images, images[0][None])
    assert len(qat.quantized_layers(quantized)) == 3  # two convolutions (BatchNorm folded in) and the classifier
    ctx = ExportContext(quantized, shape, False, np.stack(images[:4]), tmp_path, quanter)
    pd = export_paddle_inference({}, ctx)
    x = rng.random([6, *shape], dtype=np.float32)
    expected = eager_outputs(quantized, x)[0]
    # the rounding is visible: a reload that ran the float model would fail the comparison below
    assert np.median(np.abs(eager_outputs(model, x)[0] - expected)) > 10 * TIGHT
    model_file, params_file = qat.saved_files(pd.path / "model")
    assert model_file.suffix == ".pdmodel" and pd.details["quantized"]  # an int8 (QDQ) program, legacy format
    assert_reproduces(paddle_predictor(model_file, params_file)(x), expected, "paddle_inference")
    # the onnx target writes the same model as QDQ, run by onnxruntime's int8 kernels
    onnx = export_onnx({}, ctx)
    assert onnx.details["has_qdq"] and onnx.details["ort_int8_kernels"]
    assert_reproduces(lib.session(onnx.path / "model.onnx")(x), expected, "onnx")


def test_paddle_inference_accuracy_control_leaves_the_culprits_in_float():
    model = _three_convs(outlier=True)
    images = _images(12)
    held_out = np.stack(images[8:])
    reference = eager_outputs(model, held_out)[0]

    def relative_error(m) -> float:  # lower is better; 0 for the float model
        return float(np.abs(eager_outputs(m, held_out)[0] - reference).mean() / np.abs(reference).mean())

    out = lib.paddle_ptq(model, images[:8], relative_error, max_loss=0.05, max_rounds=3, per_round=2,
                         probe_images=4, higher_is_better=False, echo=lambda *_: None)
    order = [r["node"] for r in out.ranking]
    assert sorted(order[:2]) == ["conv1", "conv2"] and order[2] == "conv3", out.ranking
    assert out.ranking[1]["sqnr_db"] + 10 < out.ranking[2]["sqnr_db"]
    ctl = out.control
    assert ctl.rounds[0].loss > 0.5 and ctl.met is True and ctl.chosen == 1 and len(ctl.rounds) == 2
    assert sorted(ctl.rounds[1].float_layers) == ["conv1", "conv2"] and ctl.rounds[1].loss <= 0.05
    # the model delivered is the one measured, with only conv3 quantized
    assert [layer["node"] for layer in lib.paddle_quantized_layers(out.model)] == ["conv3"]
    assert relative_error(out.model) == ctl.rounds[1].metric
    # and its config rebuilds it, as a resumed run does: same layers in float, same weights and scales
    assert sorted(out.quanter.config["float_layers"]) == ["conv1", "conv2"]
    rebuilt = qat.quantize(_three_convs(outlier=True), qat.make_quanter(out.quanter.config))
    rebuilt.set_state_dict(out.model.state_dict())
    np.testing.assert_array_equal(eager_outputs(rebuilt, held_out)[0], eager_outputs(out.model, held_out)[0])


def test_a_float_layer_the_model_does_not_have_is_named():
    with pytest.raises(StageError, match=r"qat.config.float_layers.*conv9"):
        qat.quantize(_three_convs(outlier=False), qat.make_quanter({"float_layers": ["conv1", "conv9"]}))


def test_the_paddle_inference_preset_drops_the_onnxruntime_keys(compose_recipe):
    recipe = compose_recipe("cls_prune_ptq", "ptq=paddle_inference")
    assert recipe["ptq"]["runtime"] == "paddle_inference" and recipe["ptq"]["max_metric_loss"] == 0.005
    assert not {"op_types", "activation_type", "reduce_range"} & set(recipe["ptq"])


def test_cls_prune_ptq_smoke_for_paddle_inference_end_to_end(tmp_path):
    from slimrecipe.config import compose, validate
    from slimrecipe.run import execute

    run_dir = tmp_path / "run"
    recipe = validate(compose(["+recipe=cls_prune_ptq", "+profile=smoke", "ptq.runtime=paddle_inference"]))
    execute(recipe, run_dir)
    res = json.loads(next((run_dir / "stages").glob("*-ptq/result.json")).read_text())
    assert res["runtime"] == "paddle_inference" and res["calibration"]["images"] == 16
    assert res["checkpoint"]["quant_config"]["pact"] is False and res["quantizable_layers"] >= 3
    targets = json.loads(next((run_dir / "stages").glob("*-export/result.json")).read_text())["targets"]
    pd, onnx = targets["paddle_inference"]["compressed"], targets["onnx"]["compressed"]
    assert pd["details"]["quantized"] and "pruned_float" in targets["paddle_inference"]
    assert onnx["details"]["has_qdq"] and onnx["details"]["ort_int8_kernels"]
    report = (run_dir / "report.md").read_text()
    assert "| int8 (PTQ) |" in report and "Runtime **paddle_inference**" in report
    assert "meant for devices that run int8 Paddle programs" in report and "fastest artifact measured" in report
    # a resumed run rebuilds the quantized model from the checkpoint: the metric and the exported program agree
    state = execute(recipe, run_dir)
    assert state.evaluate() == res["metric"]
    x = np.stack([state.data.val[i][0] for i in range(8)]).astype(np.float32)
    program, params = qat.saved_files(Path(pd["path"]) / "model")
    assert_reproduces(paddle_predictor(program, params)(x), eager_outputs(state.model, x)[0], "after resume")
