"""The report says plainly what was asked and what was delivered: latency targets and post-training int8."""

from __future__ import annotations

from slimrecipe.stages.report import _plot_latency, render_markdown


def _latency_record(measured: float) -> dict:
    return {"asked_share": 0.5, "predicted_share": 0.499, "measured_share": measured,
            "relative_error": abs(measured - 0.5) / 0.5, "within_5_percent": abs(measured - 0.5) / 0.5 <= 0.05,
            "baseline_ms": 1.0, "pruned_ms": measured, "flops_speedup": 2.0, "measured_speedup": 1 / measured,
            "measured_over_flops_speedup": 1 / measured / 2.0, "estimated_loss": 0.03, "runtime": "onnxruntime",
            "threads": 1, "batch": 1, "input": [3, 32, 32], "repeats": 40,
            "candidates": [{"round": 1, "predicted_share": 0.5, "measured_share": 0.61, "flops_share": 0.6,
                            "estimated_loss": 0.01},
                           {"round": 2, "predicted_share": 0.5, "measured_share": measured, "flops_share": 0.5,
                            "estimated_loss": 0.03}]}


def _report(**extra) -> dict:
    return {"recipe": "r", "metric_name": "top1", "phases": [], "exports": {}, "plan": None, "ptq": None,
            "rounds": None, "latency_target": None, "run_dir": "/x", "seconds": {}, **extra}


def test_latency_target_section_says_whether_it_landed(tmp_path):
    hit = render_markdown(_report(latency_target=_latency_record(0.51)))
    assert "## Latency target" in hit and "asked 0.500" in hit and "measured 0.510" in hit
    assert "within 5%." in hit and "| 2 | 0.500 | 0.510 |" in hit
    miss = render_markdown(_report(latency_target=_latency_record(0.6)))
    assert "NOT within 5% (off by 20.0%)" in miss
    _plot_latency(_report(latency_target=_latency_record(0.51)), tmp_path / "lat.png")
    assert (tmp_path / "lat.png").stat().st_size > 1000


def test_ptq_section_lists_rounds_and_layers_kept_float():
    ptq = {"runtime": "onnxruntime", "settings": {"method": "percentile", "per_channel": True,
                                                  "activation_type": "uint8"},
           "metric_float": 0.9, "metric": 0.89, "loss": 0.01, "max_metric_loss": 0.01, "met": True, "message": "",
           "rounds": [{"round": 0, "float_layers": [], "metric": 0.7, "loss": 0.2},
                      {"round": 1, "float_layers": ["Conv.3"], "metric": 0.89, "loss": 0.01}],
           "chosen_round": 1, "quantizable_layers": 12, "calibration_images": 32,
           "float_layers": [{"node": "Conv.3", "op": "Conv", "weight": "conv2d_3.w_0", "param": "stem.conv.weight",
                             "sqnr_db": 4.5}]}
    text = render_markdown(_report(ptq=ptq))
    assert "## Post-training int8 (accuracy control)" in text and "budget 0.01: met" in text
    assert "| 1 (delivered) | 1 | 0.8900 | +0.0100 |" in text
    assert "`stem.conv.weight` (Conv, node `Conv.3`, 4.5 dB)" in text


def test_a_profile_cannot_go_with_a_sweep_over_recipes(run_cli):
    r = run_cli("-m", "+recipe=cls_prune,cls_prune_ptq", "+profile=smoke")
    assert r.returncode == 2 and "sweep over recipes" in r.stderr and "Traceback" not in r.stderr
