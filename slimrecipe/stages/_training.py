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
        "name": {"enum": ["adam", "adamw", "momentum", "sgd"], "default": "adam"},
        "lr": {"type": "number", "exclusiveMinimum": 0, "maximum": 10, "default": 0.001},
        "weight_decay": {"type": "number", "minimum": 0, "maximum": 1, "default": 0.0,
                         "description": "L2 (adam, momentum, sgd) or decoupled (adamw) weight decay; 0: none"},
        "momentum": {"type": "number", "minimum": 0, "exclusiveMaximum": 1, "default": 0.9,
                     "description": "momentum only"},
    },
}
SCHEDULE_SCHEMA = {
    "type": "object",
    "additionalProperties": False,
    "properties": {
        "name": {"enum": ["constant", "cosine", "step"], "default": "constant"},
        "warmup_steps": {"type": "integer", "minimum": 0, "default": 0},
        "step_size": {"type": ["integer", "null"], "minimum": 1, "default": None,
                      "description": "step schedule: steps between decays (null: a third of the steps)"},
        "gamma": {"type": "number", "exclusiveMinimum": 0, "maximum": 1, "default": 0.1,
                  "description": "step schedule: decay"},
    },
}
LOOP_PROPERTIES = {
    "epochs": {"type": "number", "exclusiveMinimum": 0, "default": 1, "description": "passes over the training split"},
    "steps": {"type": ["integer", "null"], "minimum": 1, "default": None,
              "description": "optimizer steps; overrides epochs"},
    "batch_size": {"type": "integer", "minimum": 1, "maximum": 4096, "default": 64},
    "optimizer": OPTIMIZER_SCHEMA,
    "schedule": SCHEDULE_SCHEMA,
    "eval_every": {"type": "integer", "minimum": 0, "default": 0,
                   "description": "evaluate every K steps (0: at the end only)"},
    "keep_best": {"type": "boolean", "default": True,
                  "description": "end with the best evaluated weights, not the last"},
    "eval_batch_size": {"type": "integer", "minimum": 1, "default": 128},
    "checkpoint_every": {"type": ["integer", "null"], "minimum": 1, "default": None,
                         "description": "steps between resumable checkpoints (null: once per epoch)"},
}
DISTILL_SCHEMA = {
    "type": "object",
    "additionalProperties": False,
    "properties": {
        "enabled": {"type": "boolean", "default": False},
        "weight": {"type": "number", "minimum": 0, "default": 1.0, "description": "weight of the distillation loss"},
        "temperature": {"type": "number", "exclusiveMinimum": 0, "default": 2.0},
    },
}


def loop_schema(extra: dict | None = None) -> dict:
    return {"type": "object", "additionalProperties": False, "properties": {**LOOP_PROPERTIES, **(extra or {})}}


def default_loss(outputs, batch):
    return paddle().nn.functional.cross_entropy(outputs, batch[1])


def batch_loss(model):
    """``loss(m, batch)``: the training loss of ``m`` on ``batch`` (``model``'s own ``loss``, else cross-entropy)."""
    loss_of = getattr(model, "loss", None) or default_loss
    return lambda m, batch: loss_of(m(batch[0]), batch)


def fit(state, model, params: dict, *, out_dir: Path, desc: str, teacher=None, distill: dict | None = None) -> dict:
    """Train ``model`` in place; returns the history and the evaluated metrics. Resumes from ``out_dir``."""
    from tqdm import tqdm

    from ..config import apply_defaults
    from ..errors import RecipeError

    p = paddle()
    data = state.data
    params = apply_defaults(loop_schema(), params)
    batch_size = int(params["batch_size"])
    if len(data.train) < batch_size:
        # every epoch drops its last partial batch: with fewer samples than one batch no step would ever run
        raise RecipeError(f"batch_size {batch_size} is larger than the training split ({len(data.train)} samples); "
                          "lower it or give more training data", path=f"{desc}.batch_size")
    steps_per_epoch = len(data.train) // batch_size
    total = int(params["steps"] or max(1, round(float(params["epochs"]) * steps_per_epoch)))
    eval_every = int(params["eval_every"])
    ckpt_every = int(params["checkpoint_every"] or steps_per_epoch)
    keep_best = bool(params["keep_best"])
    eval_bs = int(params["eval_batch_size"])
    better = _better(state.metric)

    scheduler = _schedule(params["schedule"], params["optimizer"]["lr"], total)
    opt = _optimizer(params["optimizer"], scheduler, model.parameters())
    loss_fn = getattr(model, "loss", None) or default_loss
    distill = apply_defaults(DISTILL_SCHEMA, distill)
    use_teacher = teacher is not None and distill["enabled"]
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
        if best["metric"] is None or better(value, best["metric"]):
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
                loss = loss + float(distill["weight"]) * distillation_loss(
                    outputs, t_out, float(distill["temperature"]))
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
    use_best = keep_best and best_state is not None and better(best["metric"], final)
    if use_best:
        model.set_state_dict(best_state)
    model.eval()
    return {"steps": total, "history": history, "final_metric": final, "best": best,
            "ended_with": "best" if use_best else "last"}


def _better(metric):
    """``better(a, b)``: is metric value a strictly better than b, in the metric's own direction."""
    if getattr(metric, "higher_is_better", True):
        return lambda a, b: a > b
    return lambda a, b: a < b


def distillation_loss(student, teacher, temperature: float):
    """KL divergence of softened class distributions; mean squared error for dense (dict/map) outputs."""
    F = paddle().nn.functional
    if isinstance(student, dict):
        s = next(iter(student.values()))
        t = next(iter(teacher.values())) if isinstance(teacher, dict) else teacher
        # a DB student's training maps start with the probability map that the eval-mode teacher returns
        return F.mse_loss(s[:, :t.shape[1]], t)
    t = temperature
    return F.kl_div(F.log_softmax(student / t, axis=-1), F.softmax(teacher / t, axis=-1), reduction="batchmean") * t * t


def save_weights(model, path: Path) -> Path:
    """Save a model's weights atomically."""
    return _save(model.state_dict(), path)


def _save(obj, path: Path) -> Path:
    return atomic_write(path, lambda tmp: paddle().save(obj, str(tmp)))


def _optimizer(cfg: dict, lr, parameters):
    opt = paddle().optimizer
    name, wd = cfg["name"], float(cfg["weight_decay"])
    if name == "adamw":  # decoupled decay: AdamW's own default (0.01) would apply if it were not passed
        return opt.AdamW(learning_rate=lr, parameters=parameters, weight_decay=wd)
    l2 = wd or None
    if name == "adam":
        return opt.Adam(learning_rate=lr, parameters=parameters, weight_decay=l2)
    if name == "momentum":
        return opt.Momentum(learning_rate=lr, momentum=cfg["momentum"], parameters=parameters, weight_decay=l2)
    if name == "sgd":
        return opt.SGD(learning_rate=lr, parameters=parameters, weight_decay=l2)
    raise ValueError(f"unknown optimizer {name!r}: the schema should have refused it")


def _schedule(cfg: dict, lr: float, total: int):
    sched = paddle().optimizer.lr
    name = cfg["name"]
    warmup = int(cfg["warmup_steps"])
    if name == "cosine":
        base = sched.CosineAnnealingDecay(lr, T_max=max(1, total - warmup))
    elif name == "step":
        base = sched.StepDecay(lr, step_size=int(cfg["step_size"] or max(1, total // 3)), gamma=cfg["gamma"])
    elif name == "constant":
        base = lr
    else:
        raise ValueError(f"unknown schedule {name!r}: the schema should have refused it")
    if warmup:
        return sched.LinearWarmup(base, warmup_steps=warmup, start_lr=lr * 0.01, end_lr=lr)
    return base
