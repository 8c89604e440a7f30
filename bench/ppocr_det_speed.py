"""The flagship's exports against the unpruned PP-OCRv4 mobile det, each runtime timed interleaved in one process.

Reads a finished ``ocr_det_prune`` run directory (its ``export/`` tree and ``report.json``) and times, per input
size, batch 1, one thread, the runners of each runtime interleaved (the order reversed every round):

- Paddle Inference: the baseline's export, the pruned float model's;
- onnxruntime: the baseline's export, the pruned float model's, and the compressed (int8 QDQ, from QAT or PTQ) one
  when there is one.

The hmean of each phase is the run's own (60 held-out scenes); the speed-ups here are medians over rounds.
Run from the repository root:

    python bench/ppocr_det_speed.py RUN_DIR [--sizes 640 960] [--repeats 40] [--also-paddle NAME=RUN_DIR]

``--also-paddle old=RUN_DIR`` times another run's Paddle Inference exports in the same loop, as ``old_baseline``
and ``old_pruned_float`` (say, a run exported before a change to the Paddle Inference export).

Figures go to bench/results/ppocr_det_speed.json (ppocr_det_speed_<tag>.json with ``--tag``).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _results import write_results  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("run_dir", type=Path)
    ap.add_argument("--sizes", nargs="+", type=int, default=[640], help="square input sides (multiples of 32)")
    ap.add_argument("--repeats", type=int, default=40)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--tag", default="", help="suffix of the JSON file (ppocr_det_speed_<tag>.json)")
    ap.add_argument("--also-paddle", action="append", default=[], metavar="NAME=RUN_DIR",
                    help="another run's Paddle Inference exports, timed in the same loop as NAME_baseline and "
                         "NAME_pruned_float")
    args = ap.parse_args()

    from slimrecipe.exporters import interleaved_latency, onnx_session, paddle_predictor

    export = args.run_dir / "export"
    report = json.loads((args.run_dir / "report.json").read_text())
    phases = {p["phase"]: p for p in report["phases"]}

    def pi(folder: Path):
        model = next(f for f in folder.iterdir() if f.suffix in (".json", ".pdmodel"))
        return paddle_predictor(model, model.with_suffix(".pdiparams"), threads=1)

    def ort(folder: Path):
        return onnx_session(next(folder.glob("*.onnx")), threads=1)[0]

    def floats(export: Path) -> Path:
        # a run that quantizes keeps its float pruned model under pruned_float/; otherwise that is the export itself
        return export / "pruned_float" if (export / "pruned_float").is_dir() else export

    # a quantized phase: "quantized (QAT)" or "int8 (PTQ)"
    quantized = next((name for name in phases if "QAT" in name or "PTQ" in name), None)
    runtimes = {
        "paddle_inference": {"baseline": pi(export / "baseline" / "paddle_inference"),
                             "pruned_float": pi(floats(export) / "paddle_inference")},
        "onnxruntime": {"baseline": ort(export / "baseline" / "onnx"), "pruned_float": ort(floats(export) / "onnx")},
    }
    if quantized:
        runtimes["onnxruntime"]["int8_" + ("qat" if "QAT" in quantized else "ptq")] = ort(export / "onnx")
    for item in args.also_paddle:
        name, _, other = item.partition("=")
        other = Path(other) / "export"
        runtimes["paddle_inference"][f"{name}_baseline"] = pi(other / "baseline" / "paddle_inference")
        runtimes["paddle_inference"][f"{name}_pruned_float"] = pi(floats(other) / "paddle_inference")
    figures = {"hmean": {k: v["metric"] for k, v in phases.items()},
               "flops": {k: v.get("flops") for k, v in phases.items()}, "latency": {}}
    rng = np.random.default_rng(0)
    for size in args.sizes:
        x = rng.uniform(-1, 1, size=(1, 3, size, size)).astype(np.float32)
        for runtime, runners in runtimes.items():
            timed = interleaved_latency(runners, x, repeats=args.repeats, warmup=args.warmup)
            figures["latency"][f"{runtime}@{size}"] = timed
            line = "  ".join(f"{n} {timed[n]['median_ms']:.1f} ms ({1 / timed[n]['paired_ratio']:.2f}x)"
                             for n in runners)
            print(f"{runtime:<17} {size}x{size}: {line}", flush=True)
    print("hmean: " + ", ".join(f"{k} {v:.4f}" for k, v in figures["hmean"].items()))
    write_results("ppocr_det_speed" + (f"_{args.tag}" if args.tag else ""), figures,
                  {**vars(args), "run_dir": str(args.run_dir), "threads": 1, "batch": 1, "recipe": report["recipe"]})


if __name__ == "__main__":
    main()
