"""The training loop shared by `train`, `finetune` and `qat`: optimizer, schedule, periodic evaluation, best
checkpoint, optional distillation, and resumable checkpoints."""

from __future__ import annotations

import copy
from pathlib import Path

from ..batching import iterate_batches
from ..fileio import atomic_write, read_json, write_json
from ..paddle_env import paddle

OPTIMIZER_SCHEMA = {
    "type": "object",
    "additionalProperties": False,
    "properties": {
        "name": {"enum": ["adam", "adamw", "momentum", "sgd"]},
        "lr": {"type": "number", "exclusiveMinimum": 0, "maximum": 10},
        "weight_decay": {"type": "number", "minimum": 0, "maximum": 1},
        "momentum": {"type": "number", "minimum": 0, "exclusiveMaximum": 1, "description": "momentum only"},
    },
}
SCHEDULE_SCHEMA = {
    "type": "object",
    "additionalProperties": False,
    "properties": {
        "name": {"enum": ["constant", "cosine", "step"]},
        "warmup_steps": {"type": "integer", "minimum": 0},
        "step_size": {"type": "integer", "minimum": 1, "description": "step schedule: steps between decays"},
        "gamma": {"type": "number", "exclusiveMinimum": 0, "maximum": 1, "description": "step schedule: decay"},
    },
}
LOOP_PROPERTIES = {
    "epochs": {"type": "number", "exclusiveMinimum": 0, "description": "passes over the training split"},
    "steps": {"type": ["integer", "null"], "minimum": 1, "description": "optimizer steps; overrides epochs"},
    "batch_size": {"type": "integer", "minimum": 1, "maximum": 4096},
    "optimizer": OPTIMIZER_SCHEMA,
    "schedule": SCHEDULE_SCHEMA,
    "eval_every": {"type": "integer", "minimum": 0, "description": "evaluate every K steps (0: at the end only)"},
    "keep_best": {"type": "boolean", "description": "end with the best evaluated weights, not the last"},
    "eval_batch_size": {"type": "integer", "minimum": 1},
    "checkpoint_every": {"type": "integer", "minimum": 1, "description": "steps between resumable checkpoints"},
}
DISTILL_SCHEMA = {
    "type": "object",
    "additionalProperties": False,
    "properties": {
        "enabled": {"type": "boolean"},
        "weight": {"type": "number", "minimum": 0, "description": "weight of the distillation loss"},
        "temperature": {"type": "number", "exclusiveMinimum": 0},
    },
}


def loop_schema(extra: dict | None = None) -> dict:
    return {"type": "object", "additionalProperties": False, "properties": {**LOOP_PROPERTIES, **(extra or {})}}


def default_loss(outputs, batch):
    return paddle().nn.functional.cross_entropy(outputs, batch[1])


def fit(state, model, params: dict, *, out_dir: Path, desc: str, teacher=None, distill: dict | None = None) -> dict:
    """Train ``model`` in place; returns the history and the evaluated metrics. Resumes from ``out_dir``."""
    from tqdm import tqdm

    p = paddle()
    data = state.data
    batch_size = int(params.get("batch_size", 64))
    steps_per_epoch = max(1, len(data.train) // batch_size)
    total = int(params.get("steps") or round(float(params.get("epochs", 1)) * steps_per_epoch))
    eval_every = int(params.get("eval_every", 0))
    ckpt_every = int(params.get("checkpoint_every", steps_per_epoch))
    keep_best = bool(params.get("keep_best", True))
    eval_bs = int(params.get("eval_batch_size", 128))

    scheduler = _schedule(params.get("schedule") or {}, (params.get("optimizer") or {}).get("lr", 1e-3), total)
    opt = _optimizer(params.get("optimizer") or {}, scheduler, model.parameters())
    loss_fn = getattr(model, "loss", None) or default_loss
    distill = distill or {}
    use_teacher = teacher is not None and distill.get("enabled")
    if use_teacher:
        teacher.eval()

    out_dir.mkdir(parents=True, exist_ok=True)
    progress_file = out_dir / "progress.json"
    step, history, best = 0, [], {"metric": None, "step": None}
    if progress_file.exists():  # an interrupted fit: carry on from its last checkpoint
        saved = read_json(progress_file)
        step, history, best = saved["step"], saved["history"], saved["best"]
        model.set_state_dict(p.load(str(out_dir / "last.pdparams")))
        # Paddle keys optimizer moments by per-process parameter names, which a rebuilt model does not share:
        # a resumed fit keeps its weights and learning-rate schedule and restarts the moment estimates
        if isinstance(scheduler, p.optimizer.lr.LRScheduler) and saved.get("scheduler"):
            scheduler.set_state_dict(saved["scheduler"])
    best_state = p.load(str(out_dir / "best.pdparams")) if (out_dir / "best.pdparams").exists() else None

    def evaluate_now():
        nonlocal best_state
        value = state.evaluate(model, batch_size=eval_bs)
        history.append({"step": step, "metric": value})
        if best["metric"] is None or value > best["metric"]:
            best.update(metric=value, step=step)
            best_state = copy.deepcopy(model.state_dict())
            _save(best_state, out_dir / "best.pdparams")
        return value

    model.train()
    bar = tqdm(total=total, initial=step, desc=desc, unit="step", leave=False, dynamic_ncols=True, disable=None)
    epoch = step // steps_per_epoch
    while step < total:
        done_in_epoch = step - epoch * steps_per_epoch  # > 0 only right after a resume
        batches = iterate_batches(data.train, batch_size, shuffle=True, seed=state.seed + epoch, drop_last=True)
        for i, batch in enumerate(batches):
            if step >= total:
                break
            if i < done_in_epoch:
                continue
            outputs = model(batch[0])
            loss = loss_fn(outputs, batch)
            if use_teacher:
                with p.no_grad():
                    t_out = teacher(batch[0])
                loss = loss + float(distill.get("weight", 1.0)) * distillation_loss(
                    outputs, t_out, float(distill.get("temperature", 2.0)))
            loss.backward()
            opt.step()
            opt.clear_grad()
            if isinstance(scheduler, p.optimizer.lr.LRScheduler):
                scheduler.step()
            step += 1
            bar.update(1)
            bar.set_postfix(loss=f"{float(loss):.4f}")
            if eval_every and step % eval_every == 0 and step < total:
                evaluate_now()
                model.train()
            if step % ckpt_every == 0 and step < total:
                _save(model.state_dict(), out_dir / "last.pdparams")
                sched_state = scheduler.state_dict() if isinstance(scheduler, p.optimizer.lr.LRScheduler) else None
                write_json(progress_file, {"step": step, "history": history, "best": best, "scheduler": sched_state})
        epoch += 1
    bar.close()
    final = evaluate_now()
    if keep_best and best_state is not None and best["metric"] > final:
        model.set_state_dict(best_state)
    model.eval()
    return {"steps": total, "history": history, "final_metric": final, "best": best,
            "ended_with": "best" if keep_best and best["metric"] > final else "last"}


def distillation_loss(student, teacher, temperature: float):
    """KL divergence of softened class distributions; mean squared error for dense (dict/map) outputs."""
    F = paddle().nn.functional
    if isinstance(student, dict):
        key = next(iter(student))
        return F.mse_loss(student[key], teacher[key] if isinstance(teacher, dict) else teacher)
    t = temperature
    return F.kl_div(F.log_softmax(student / t, axis=-1), F.softmax(teacher / t, axis=-1), reduction="batchmean") * t * t


def save_weights(model, path: Path) -> Path:
    """Save a model's weights atomically, without PaddleSlim's `_backup` buffers (STACK.md trap 9)."""
    from ..pruning import pruned_state_dict

    return _save(pruned_state_dict(model), path)


def _save(obj, path: Path) -> Path:
    return atomic_write(path, lambda tmp: paddle().save(obj, str(tmp)))


def _optimizer(cfg: dict, lr, parameters):
    opt = paddle().optimizer
    name = cfg.get("name", "adam")
    wd = cfg.get("weight_decay", 0.0) or None
    if name == "adam":
        return opt.Adam(learning_rate=lr, parameters=parameters, weight_decay=wd)
    if name == "adamw":
        return opt.AdamW(learning_rate=lr, parameters=parameters, weight_decay=wd or 0.01)
    if name == "momentum":
        return opt.Momentum(learning_rate=lr, momentum=cfg.get("momentum", 0.9), parameters=parameters,
                            weight_decay=wd)
    return opt.SGD(learning_rate=lr, parameters=parameters, weight_decay=wd)


def _schedule(cfg: dict, lr: float, total: int):
    sched = paddle().optimizer.lr
    name = cfg.get("name", "constant")
    warmup = int(cfg.get("warmup_steps", 0))
    if name == "cosine":
        base = sched.CosineAnnealingDecay(lr, T_max=max(1, total - warmup))
    elif name == "step":
        base = sched.StepDecay(lr, step_size=int(cfg.get("step_size", max(1, total // 3))), gamma=cfg.get("gamma", 0.1))
    else:
        base = lr
    if warmup:
        return sched.LinearWarmup(base, warmup_steps=warmup, start_lr=lr * 0.01, end_lr=lr)
    return base
