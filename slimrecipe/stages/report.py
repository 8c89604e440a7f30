"""`report`: the outcome of a run in ten seconds: report.md, report.json and a picture."""

from __future__ import annotations

from ..fileio import atomic_write, write_json, write_text
from ..registry import register

SCHEMA = {"type": "object", "additionalProperties": False,
          "properties": {"plot": {"type": "boolean", "default": True, "description": "draw report.png"},
                         "detections": {"type": "integer", "minimum": 0, "maximum": 12, "default": 3,
                                        "description": "text detectors (hmean metric): draw this many validation "
                                                       "images with the labels and the baseline's and the "
                                                       "compressed model's boxes side by side "
                                                       "(report_detections.png)"}}}

# stage name -> row label, in the order a model moves through a recipe
PHASES = (("evaluate", "baseline"), ("prune", "pruned"), ("finetune", "finetuned"), ("qat", "quantized (QAT)"),
          ("ptq", "int8 (PTQ)"))


def collect(state) -> dict:
    rows = []
    for stage, label in PHASES:
        r = state.results.get(stage)
        if not r:
            continue
        figures = r.get("after", r)
        if "metric" in figures:
            rows.append({"phase": label, "metric": figures["metric"], "flops": figures.get("flops"),
                         "params": figures.get("params")})
    base = rows[0] if rows else None
    for row in rows:
        for k in ("metric", "flops", "params"):
            if base and base.get(k) and row.get(k) is not None:
                row[f"{k}_vs_baseline"] = row[k] / base[k]
    exports = (state.results.get("export") or {}).get("targets", {})
    plan = (state.results.get("prune") or {}).get("plan_summary")
    return {"recipe": state.recipe["name"], "metric_name": state.metric.name, "phases": rows, "exports": exports,
            "plan": plan, "ptq": _ptq_summary(state.results.get("ptq"), exports), "rounds": _rounds(state.run_dir),
            "latency_target": (state.results.get("prune") or {}).get("latency"),
            "reconstruction": (state.results.get("prune") or {}).get("reconstruction"),
            "run_dir": str(state.run_dir),
            "seconds": {k: v.get("seconds") for k, v in state.results.items()}}


def render_markdown(rep: dict) -> str:
    m = rep["metric_name"]
    lines = [f"# {rep['recipe']}", "", f"Run directory: `{rep['run_dir']}`", ""]
    lines += [f"| phase | {m} | Δ {m} | FLOPs | FLOPs vs base | params | params vs base |", "|---|---|---|---|---|---|---|"]
    base = rep["phases"][0]["metric"] if rep["phases"] else None
    for r in rep["phases"]:
        delta = f"{r['metric'] - base:+.4f}" if base is not None else ""
        lines.append(f"| {r['phase']} | {r['metric']:.4f} | {delta} | {_si(r.get('flops'))} | "
                     f"{_ratio(r.get('flops_vs_baseline'))} | {_si(r.get('params'))} | {_ratio(r.get('params_vs_baseline'))} |")
    if rep["exports"]:
        lines += ["", "## Exports (baseline and compressed model, timed interleaved in one process)", "",
                  "| target | model | size | size vs base | latency (ms) | speed-up vs base | parity max abs diff |",
                  "|---|---|---|---|---|---|---|"]
        for name, e in rep["exports"].items():
            b = e.get("baseline") or {}
            lat_b = (b.get("latency") or {}).get("median_ms")
            for who, label in (("baseline", "baseline"), ("pruned_float", "pruned (float)"),
                               ("compressed", "compressed")):
                if who not in e:
                    continue
                x = e[who]
                lat = (x.get("latency") or {}).get("median_ms")
                lines.append(
                    f"| {name} | {label} | {_mb(x.get('size_bytes'))} | "
                    f"{_ratio(x['size_bytes'] / b['size_bytes'] if b.get('size_bytes') else None)} | "
                    f"{_num(lat)} | {_x(lat_b / lat if lat_b and lat else None)} | "
                    f"{x['parity']['max_abs_diff']:.2e} |")
        any_lat = next(iter(rep["exports"].values())).get("latency_setup")
        if any_lat:
            lines += ["", f"Latency: {any_lat}"]
    if rep.get("plan"):
        p = rep["plan"]
        lines += ["", "## Pruning plan", "", f"{p['pruned']} of {p['prunable']} prunable convolutions pruned, "
                  f"{p['skipped']} skipped (see plan.json for the rule behind each)."]
        r = rep.get("reconstruction")
        if r:
            lines[-1] += (f" After the cut, {r['layers']} layers were refitted by least squares to the unpruned "
                          f"model's outputs on {r['images']} training images (relative output error, summed over "
                          f"those layers: {r['error_before']:.3g} before, {r['error_after']:.3g} after); the pruned "
                          f"row is the refitted model.")
    if rep.get("rounds"):
        lines += ["", *_rounds_lines(rep["rounds"], m)]
    if rep.get("latency_target"):
        lines += ["", *_latency_lines(rep["latency_target"])]
    if rep.get("ptq"):
        lines += ["", *_ptq_lines(rep["ptq"], m)]
    lines += ["", "Stage times (s): " + ", ".join(f"{k} {v:.0f}" for k, v in rep["seconds"].items() if v is not None)]
    return "\n".join(lines) + "\n"


def _rounds(run_dir) -> dict | None:
    from pathlib import Path

    from ..fileio import read_json
    from ..rounds import ROUNDS_FILE

    f = Path(run_dir) / ROUNDS_FILE
    return read_json(f) if f.exists() else None


def _rounds_lines(r: dict, m: str) -> list[str]:
    rounds = sorted(r["rounds"], key=lambda x: x["round"])
    delivered = next((x for x in rounds if x["round"] == r["delivered"]), None)
    outcome = ("not finished" if delivered is None else
               f"delivered round {delivered['round']}: {m} {delivered['metric']:.4f}, loss "
               f"{delivered['loss']:+.4f}, FLOPs cut {delivered['flops_cut']:.1%} "
               + ("(target met)" if r["met"] else "(target NOT met: the closest round)"))
    lines = ["## Rounds (prune.target.eval_metric_loss)", "",
             f"Asked: the delivered model loses at most {r['target_loss']:g} of the baseline's {m}, within "
             f"{r['max_rounds']} round(s), each missed round's FLOPs cut times {r['backoff']:g}. {outcome}.", "",
             f"| round | FLOPs cut asked | FLOPs cut | {m} after prune | {m} delivered | loss | met |",
             "|---|---|---|---|---|---|---|"]
    for x in rounds:
        asked = "first round (per-layer rule)" if x["flops_target"] is None else f"{x['flops_target']:.1%}"
        mark = " (delivered)" if x["round"] == r["delivered"] else ""
        lines.append(f"| {x['round']}{mark} | {asked} | {x['flops_cut']:.1%} | {x['pruned_metric']:.4f} | "
                     f"{x['metric']:.4f} | {x['loss']:+.4f} | {'yes' if x['met'] else 'no'} |")
    if r.get("message"):
        lines += ["", r["message"]]
    lines += ["", "![rounds](report_rounds.png)"]
    return lines


def _latency_lines(t: dict) -> list[str]:
    lines = ["## Latency target (prune.target.latency)", "",
             f"On {t['runtime']}, {t['threads']} thread(s), batch {t['batch']}, input {'x'.join(map(str, t['input']))}, "
             f"the float pruned model against the unpruned one, timed interleaved ({t['repeats']} rounds): asked "
             f"{t['asked_share']:.3f} of the baseline's latency, planned {t['predicted_share']:.3f}, measured "
             f"{t['measured_share']:.3f} ({t['baseline_ms']:.3f} -> {t['pruned_ms']:.3f} ms), "
             + ("within 5%." if t["within_5_percent"] else f"NOT within 5% (off by {t['relative_error']:.1%})."),
             "", f"Speed-up {t['measured_speedup']:.2f}x measured against {t['flops_speedup']:.2f}x by FLOPs "
             f"(measured / FLOPs speed-up {t['measured_over_flops_speedup']:.2f}; `prune.align` moves it).", "", "| candidate | planned share | measured share | FLOPs share | estimated loss |",
             "|---|---|---|---|---|"]
    for c in t.get("candidates") or []:
        lines.append(f"| {c['round']} | {c['predicted_share']:.3f} | {c['measured_share']:.3f} | "
                     f"{c['flops_share']:.3f} | {c['estimated_loss']:+.4f} |")
    lines += ["", "![latency candidates](report_latency.png)"]
    return lines


def _plot_latency(rep: dict, path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    t = rep["latency_target"]
    cands = t.get("candidates") or []
    fig, ax = plt.subplots(figsize=(5.5, 3.6))
    ax.axvline(t["asked_share"], color="#c33", ls="--", lw=1, label="asked share")
    ax.axvspan(t["asked_share"] * 0.95, t["asked_share"] * 1.05, color="#c33", alpha=0.08, label="±5%")
    ax.scatter([c["measured_share"] for c in cands], [c["estimated_loss"] for c in cands], color="#c93",
               label="candidates measured")
    ax.scatter([t["measured_share"]], [t["estimated_loss"]], color="#3a7", s=70, edgecolors="black",
               label="delivered (re-timed)", zorder=3)
    ax.set_xlabel("measured latency / baseline latency")
    ax.set_ylabel("estimated metric loss (sensitivity)")
    ax.set_title(f"latency target on {t['runtime']}", fontsize=9)
    ax.legend(fontsize=7)
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=100))
    plt.close(fig)


def _plot_rounds(rep: dict, path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    r = rep["rounds"]
    rounds = sorted(r["rounds"], key=lambda x: x["round"])
    fig, ax = plt.subplots(figsize=(5.5, 3.6))
    base = rounds[0]["baseline_metric"]
    ax.axhline(base, color="#888", lw=1, label="baseline")
    ax.axhline(base - r["target_loss"], color="#c33", lw=1, ls="--", label="baseline - target loss")
    for x in rounds:
        colour = "#3a7" if x["met"] else "#c93"
        ax.scatter([x["flops_cut"] * 100], [x["metric"]], color=colour, s=60 if x["round"] == r["delivered"] else 25,
                   edgecolors="black" if x["round"] == r["delivered"] else "none", zorder=3)
        ax.annotate(f"round {x['round']}", (x["flops_cut"] * 100, x["metric"]), fontsize=7,
                    textcoords="offset points", xytext=(4, 4))
    ax.set_xlabel("FLOPs cut (%)")
    ax.set_ylabel(f"{rep['metric_name']} delivered")
    ax.set_title("rounds: delivered metric against FLOPs cut", fontsize=9)
    ax.legend(fontsize=7)
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=100))
    plt.close(fig)


def _ptq_summary(r: dict | None, exports: dict | None = None) -> dict | None:
    if not r:
        return None
    keys = ("runtime", "settings", "metric_float", "metric", "loss", "max_metric_loss", "met", "message", "rounds",
            "chosen_round", "float_layers", "quantizable_layers", "ignored_settings")
    out = {k: r.get(k) for k in keys} | {"calibration_images": r["calibration"]["images"]}
    # every exported artifact's latency, so that the section can point to the fastest one
    out["artifacts"] = [
        {"artifact": where, "target": target, "model": who, "median_ms": x["latency"]["median_ms"],
         "float_program": "max_abs_diff_vs_quantized_model" in (x.get("details") or {})}
        for target, e in (exports or {}).items()
        for who, where in (("compressed", f"export/{target}"), ("pruned_float", f"export/pruned_float/{target}"),
                           ("baseline", f"export/baseline/{target}"))
        for x in [e.get(who)] if x and (x.get("latency") or {}).get("median_ms")]
    return out


_PTQ_MODELS = {"compressed": "int8", "pruned_float": "float, pruned", "baseline": "float, unpruned baseline"}
_PTQ_FLOAT_PROGRAMS = {"pruned_float": "the pruned model's float program",
                       "baseline": "the unpruned baseline's float program"}


def _ptq_lines(p: dict, m: str) -> list[str]:
    s = p["settings"]
    budget = "no budget (every layer int8)" if p["max_metric_loss"] is None else (
        f"budget {p['max_metric_loss']:g}: " + ("met" if p["met"] else "NOT met, closest kept"))
    if p["runtime"] == "paddle_inference":
        how = (f"Runtime **paddle_inference**: slimrecipe's quanters (those of QAT, without PACT) calibrated on "
               f"{p['calibration_images']} training images, no training; weights int8 "
               f"{'per channel' if s['per_channel'] else 'per tensor'}, layer inputs and outputs int8 per tensor "
               f"(scale: mean abs-max)")
    else:
        how = (f"Runtime **{p['runtime']}**: calibrated on {p['calibration_images']} training images "
               f"({s['method']}), weights {'per channel' if s['per_channel'] else 'per tensor'}, activations "
               f"{s['activation_type']} per tensor")
    lines = ["## Post-training int8 (accuracy control)", "",
             f"{how}; {p['quantizable_layers']} quantizable layers; {m} of the float model {p['metric_float']:.4f}; "
             f"{budget}.", "", f"| round | layers in float | {m} | loss |", "|---|---|---|---|"]
    for r in p["rounds"]:
        mark = " (delivered)" if r["round"] == p["chosen_round"] else ""
        lines.append(f"| {r['round']}{mark} | {len(r['float_layers'])} | {r['metric']:.4f} | {r['loss']:+.4f} |")
    if p["float_layers"]:
        lines += ["", "Layers kept in float (most sensitive first; SQNR of the outputs with that layer alone int8):", ""]
        for layer in p["float_layers"]:
            db = layer.get("sqnr_db")
            lines.append(f"- `{layer.get('param') or layer['weight'] or layer['node']}` ({layer['op']}, node "
                         f"`{layer['node']}`{f', {db:.1f} dB' if db is not None else ''})")
    if p.get("message"):
        lines += ["", p["message"]]
    if p["runtime"] == "paddle_inference":
        lines += ["", *_ptq_paddle_inference_lines(p)]
    return lines


def _ptq_paddle_inference_lines(p: dict) -> list[str]:
    """What the int8 Paddle model is for, and which measured artifact runs fastest here."""
    arts = p.get("artifacts") or []
    mine = next((a for a in arts if a["target"] == "paddle_inference" and a["model"] == "compressed"), None)
    text = ("The int8 Paddle model is meant for devices that run int8 Paddle programs; an x86 CPU is not one "
            "(Paddle Inference runs the quantize/dequantize ops in float there).")
    if mine is None:
        return [text + " It was not exported (the export stage's paddle_inference target writes it)."]
    ref = next((a for a in arts if a["target"] == "paddle_inference" and a["model"] == "pruned_float"), None) or \
        next((a for a in arts if a["target"] == "paddle_inference" and a["model"] == "baseline"), None)
    text += f" Here `{mine['artifact']}` ran in {mine['median_ms']:.2f} ms"
    if ref is not None:
        text += (f" against {ref['median_ms']:.2f} ms for {_PTQ_FLOAT_PROGRAMS[ref['model']]} "
                 f"({ref['median_ms'] / mine['median_ms']:.2f}x as fast)")
    text += "."
    if mine["float_program"]:
        text += (" Paddle could not save it as an int8 program: it was written as a float program with its weights "
                 "on the int8 grid (see the export's note).")
    ours = [a for a in arts if a["model"] != "baseline"]
    fastest = min(ours or arts, key=lambda a: a["median_ms"])
    text += (f" The fastest artifact measured on this machine: `{fastest['artifact']}` "
             f"({fastest['target']}, {_PTQ_MODELS[fastest['model']]}), {fastest['median_ms']:.2f} ms")
    base = min((a for a in arts if a["model"] == "baseline"), key=lambda a: a["median_ms"], default=None)
    if ours and base is not None and base["median_ms"] < fastest["median_ms"]:
        text += f" (the unpruned baseline's `{base['artifact']}` ran faster still: {base['median_ms']:.2f} ms)"
    return [text + "; latencies are in the Exports table."]


def summary_table(rep: dict) -> str:
    """The few lines printed at the end of a run."""
    m = rep["metric_name"]
    out = [f"{'phase':<18}{m:>16}{'FLOPs':>12}{'params':>12}"]
    for r in rep["phases"]:
        out.append(f"{r['phase']:<18}{r['metric']:>16.4f}{_si(r.get('flops')):>12}{_si(r.get('params')):>12}")
    for name, e in rep["exports"].items():
        b, c = e.get("baseline") or {}, e["compressed"]
        lat_b, lat_c = (b.get("latency") or {}).get("median_ms"), (c.get("latency") or {}).get("median_ms")
        if lat_b and lat_c:
            line = (f"export {name}: {_mb(b.get('size_bytes'))} -> {_mb(c.get('size_bytes'))}, "
                    f"latency {lat_b:.2f} -> {lat_c:.2f} ms ({lat_b / lat_c:.2f}x)")
            lat_f = ((e.get("pruned_float") or {}).get("latency") or {}).get("median_ms")
            if lat_f:
                line += f"; float pruned {lat_f:.2f} ms ({lat_b / lat_f:.2f}x)"
            out.append(line)
        else:
            out.append(f"export {name}: {_mb(c.get('size_bytes'))}")
    return "\n".join(out)


@register("stage", "report", schema=SCHEMA)
def report(state, params: dict) -> dict:
    """Write report.md / report.json (and report.png) from the stages' results."""
    rep = collect(state)
    write_json(state.run_dir / "report.json", rep)
    write_text(state.run_dir / "report.md", render_markdown(rep))
    if params["plot"] and rep["phases"]:
        _plot(rep, state.run_dir / "report.png")
    if params["plot"] and rep.get("rounds") and rep["rounds"]["rounds"]:
        _plot_rounds(rep, state.run_dir / "report_rounds.png")
    if params["plot"] and rep.get("latency_target"):
        _plot_latency(rep, state.run_dir / "report_latency.png")
    if params["detections"] and state.metric.name == "hmean" and len(state.data.val):
        _draw_detections(state, params["detections"], state.run_dir / "report_detections.png")
        write_text(state.run_dir / "report.md", render_markdown(rep) + "\n![detections](report_detections.png)\n")
    return {"summary_table": summary_table(rep)}


def _draw_detections(state, n: int, path) -> None:
    """Validation images with their labels (blue) and the detections (green matched, red not) of the baseline
    and of the compressed model, side by side."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    from ..datasets.db_transforms import resized_extent
    from ..metrics.det import _prob_map_from_output, boxes_from_prob_map, match_detections
    from ..paddle_env import paddle

    p = paddle()
    params = state.metric.extra["params"]
    models = [("baseline", state.baseline_model()), ("compressed", state.model)]
    for _, model in models:
        model.eval()
    n = min(n, len(state.data.val))
    fig, axes = plt.subplots(n, 2, figsize=(11, 4.2 * n), squeeze=False)
    for row in range(n):
        images, shape_infos, polys, ignores = state.data.collate_fn([state.data.val[row]])[:4]
        x = np.asarray(images, dtype=np.float32)
        resized_h, resized_w = resized_extent(shape_infos[0])
        scale = np.array([resized_w / float(shape_infos[0][1]), resized_h / float(shape_infos[0][0])])
        shown = x[0, ::-1, :resized_h, :resized_w].transpose(1, 2, 0)  # BGR -> RGB, the image without padding
        shown = (shown - shown.min()) / max(float(shown.max() - shown.min()), 1e-6)
        for col, (label, model) in enumerate(models):
            with p.no_grad():
                prob = _prob_map_from_output(model(p.to_tensor(x)))[0, 0, :resized_h, :resized_w]
            boxes, _ = boxes_from_prob_map(prob, int(shape_infos[0][0]), int(shape_infos[0][1]),
                                           thresh=params["thresh"], box_thresh=params["box_thresh"],
                                           unclip_ratio=params["unclip_ratio"], min_size=params["min_size"],
                                           box_type=params["box_type"])
            counts = match_detections(polys[0], ignores[0], boxes, params["iou_threshold"],
                                      params["ignore_overlap"])
            ax = axes[row][col]
            ax.imshow(shown)
            for poly, ignored in zip(polys[0], ignores[0]):
                ax.add_patch(plt.Polygon(np.asarray(poly) * scale, fill=False, lw=1, ls=":" if ignored else "-",
                                         ec="#36c"))
            for box in boxes:
                hit = match_detections(polys[0], ignores[0], [box], params["iou_threshold"],
                                       params["ignore_overlap"]).matched > 0
                ax.add_patch(plt.Polygon(np.asarray(box) * scale, fill=False, lw=1.5, ec="#2a2" if hit else "#d22"))
            ax.set_title(f"{label}: {counts.matched} of {counts.gt_care} labelled lines found, "
                         f"{counts.det_care - counts.matched} false", fontsize=9)
            ax.axis("off")
    fig.suptitle(f"{state.recipe['name']}: labels (blue), detections found (green) and false (red)", fontsize=10)
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=90))
    plt.close(fig)


def _plot(rep: dict, path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    phases = rep["phases"]
    fig, axes = plt.subplots(1, 3, figsize=(11, 3.4))
    labels = [p["phase"] for p in phases]
    for ax, key, title in zip(axes, ("metric", "flops_vs_baseline", "params_vs_baseline"),
                              (rep["metric_name"], "FLOPs vs baseline", "params vs baseline")):
        vals = [p.get(key) or 0 for p in phases]
        ax.bar(labels, vals, color=["#888"] + ["#3a7"] * (len(vals) - 1))
        ax.set_title(title)
        ax.tick_params(axis="x", rotation=30, labelsize=8)
        for i, v in enumerate(vals):
            ax.text(i, v, f"{v:.3f}", ha="center", va="bottom", fontsize=7)
    fig.suptitle(rep["recipe"])
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=100))
    plt.close(fig)


def _si(v) -> str:
    if v is None:
        return "-"
    for unit, div in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(v) >= div:
            return f"{v / div:.2f}{unit}"
    return f"{v:.0f}"


def _mb(b) -> str:
    return "-" if not b else f"{b / 2**20:.2f} MB"


def _ratio(r) -> str:
    return "-" if r is None else f"{r:.3f}"


def _x(r) -> str:
    return "-" if r is None else f"{r:.2f}x"


def _num(v) -> str:
    return "-" if v is None else f"{v:.2f}"
