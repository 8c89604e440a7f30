"""Which parts of the flagship's pruned detector survive post-training int8 on onnxruntime, and what each mix costs.

Reads a finished ``ocr_det_prune`` run directory (its finetuned model), exports it to ONNX, calibrates once on
32 training scenes (by default the percentile calibration and op types of ``ocr_det_ptq``: every op between
the convolutions int8 too), then quantizes it once per arm, each arm leaving some parts of the network in float, and
evaluates each on the run's 60 held-out scenes. All arms, the float pruned model and the unpruned baseline's
export are then timed interleaved on onnxruntime (batch 1, one thread, 640x640).

A part is a span of the graph, from the first convolution of a module prefix (``backbone.blocks3``,
``neck.inp_conv``, ``head.binarize``; two dotted levels) to the next one, with every op in between (the
backbone's ``layer_list`` convolutions run after all blocks, among the neck's first ops, and count with them).
Run from the repository root:

    python bench/ppocr_det_int8_parts.py RUN_DIR --arms "" "backbone.conv1,backbone.blocks2" ... [--repeats 30]
        [--method percentile --percentile 99.999]    # --repeats 0: no timing

Figures go to bench/results/ppocr_det_int8_parts.json (``_<tag>`` with ``--tag``).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _results import write_results  # noqa: E402

OP_TYPES = ("Conv", "ConvTranspose", "Add", "Mul", "Concat", "Resize", "Sigmoid", "HardSigmoid", "HardSwish",
            "AveragePool", "GlobalAveragePool", "MaxPool", "Relu", "Clip", "Transpose")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("run_dir", type=Path)
    ap.add_argument("--arms", nargs="+", default=[""],
                    help="per arm, the comma-separated parts left in float ('' quantizes everything)")
    ap.add_argument("--repeats", type=int, default=30)
    ap.add_argument("--size", type=int, default=640)
    ap.add_argument("--op-types", nargs="+", default=list(OP_TYPES), help="ONNX op types quantized")
    ap.add_argument("--method", choices=["percentile", "minmax", "entropy"], default="percentile")
    ap.add_argument("--percentile", type=float, default=99.999)
    ap.add_argument("--tag", default="")
    args = ap.parse_args()

    import onnx

    from slimrecipe import ptq as lib
    from slimrecipe.exporters import ExportContext, float_onnx_bytes, interleaved_latency, onnx_session
    from slimrecipe.run import execute, load_run_recipe
    from slimrecipe.stages.ptq import RuntimeModel, _param_for, _param_names, calibration_images

    state = execute(load_run_recipe(args.run_dir), args.run_dir, echo=lambda *_: None)  # a finished run: loads it
    model = state.model
    model.eval()
    settings = lib.Settings(method=args.method, percentile=args.percentile, op_types=tuple(args.op_types))
    images, _ = calibration_images(state.data.train, 32, state.seed)
    work = Path(tempfile.mkdtemp(prefix="slimrecipe-int8-parts-"))
    ctx = ExportContext(model, state.input_shape, True, images[:1], work)
    prepared = lib.prepare(float_onnx_bytes(ctx, 13), work / "float.onnx")
    ranges = lib.calibrate(prepared, images, settings, work / "calibration.json")

    nodes = [n.name for n in onnx.load(str(prepared)).graph.node]
    names = _param_names(model)
    start: dict[str, int] = {}
    for layer in lib.quantizable_layers(prepared, ["Conv", "ConvTranspose"]):
        part = ".".join((_param_for(layer["weight"], names) or "?").split(".")[:2])
        start.setdefault(part, nodes.index(layer["node"]))
    order = sorted(start.items(), key=lambda kv: kv[1]) + [("end", len(nodes))]
    span = {part: (order[i][1], order[i + 1][1]) for i, (part, _) in enumerate(order[:-1])}
    print("parts: " + ", ".join(f"{p} ({b - a} ops)" for p, (a, b) in span.items()), flush=True)

    threads = lib.threads_for_evaluation()
    figures = {"float_hmean": state.evaluate(RuntimeModel(lib.session(prepared, threads))), "arms": {}}
    print(f"float pruned: hmean {figures['float_hmean']:.4f}", flush=True)
    files = {}
    for i, arm in enumerate(args.arms):
        parts = [p for p in arm.split(",") if p]
        unknown = [p for p in parts if p not in span]
        if unknown:
            raise SystemExit(f"unknown part(s) {unknown}; parts: {list(span)}")
        exclude = [n for p in parts for n in nodes[span[p][0]:span[p][1]]]
        files[arm or "all int8"] = lib.quantize(prepared, ranges, settings, work / f"arm{i}.onnx", exclude=exclude)
        hmean = state.evaluate(RuntimeModel(lib.session(files[arm or "all int8"], threads)))
        figures["arms"][arm or "all int8"] = {"float_parts": parts, "float_ops": len(exclude), "hmean": hmean}
        print(f"float {arm or '(nothing)'}: {len(exclude)} of {len(nodes)} ops float, hmean {hmean:.4f}", flush=True)

    figures["baseline_hmean"] = state.results["evaluate"]["metric"]
    name = "ppocr_det_int8_parts" + (f"_{args.tag}" if args.tag else "")
    settings_doc = {**vars(args), "run_dir": str(args.run_dir), "calibration": settings.to_json(), "threads": 1,
                    "batch": 1, "input": [1, 3, args.size, args.size]}
    if args.repeats == 0:
        write_results(name, figures, settings_doc)
        return
    x = np.random.default_rng(0).uniform(-1, 1, (1, 3, args.size, args.size)).astype(np.float32)
    runners = {"baseline": onnx_session(args.run_dir / "export" / "baseline" / "onnx" / "model.onnx", 1)[0],
               "pruned float": onnx_session(prepared, 1)[0], **{k: onnx_session(f, 1)[0] for k, f in files.items()}}
    timed = interleaved_latency(runners, x, repeats=args.repeats, warmup=3)
    figures["latency"] = timed
    for arm in runners:
        print(f"{arm:<60} {timed[arm]['median_ms']:7.1f} ms  {1 / timed[arm]['paired_ratio']:.2f}x", flush=True)
    write_results(name, figures, settings_doc)


if __name__ == "__main__":
    main()
