"""One run: stages in recipe order over one shared state, each result written when its stage completes.

A stage is ``fn(state: RunState, params: dict) -> dict``. The dict it returns is written to
``stages/<n>-<name>/result.json``; a stage whose result file exists is not run again, which is how an
interrupted run resumes. A stage that changes the model saves its weights and names them under
``"checkpoint"`` in its result, so a resumed run can rebuild the model (plan re-applied, weights loaded)
without re-running anything. A stage whose result has ``"end_run"`` (a message) is the run's last.
"""

from __future__ import annotations

import time
from pathlib import Path
from types import SimpleNamespace

from . import registry
from .errors import RecipeError, StageError
from .fileio import read_json, write_json

RESOLVED_RECIPE = "recipe.resolved.yaml"


class RunState:
    """What travels through the stages: the recipe, the data, the metric, the current model."""

    def __init__(self, recipe: dict, run_dir: Path):
        self.recipe = recipe
        self.run_dir = Path(run_dir)
        self.cache_dir = Path(recipe["cache_dir"]).expanduser()
        self.seed = int(recipe["seed"])
        self.results: dict[str, dict] = {}
        self.stage_dir: Path | None = None
        self.inputs: dict[str, str] = {}  # label -> path of every input file, hashed into the snapshot
        self.weights: Path | None = _opt_path(recipe["model"].get("weights"))
        if self.weights:
            self.inputs["model.weights"] = str(self.weights)
        self.plan: dict | None = None
        self.quant_config: dict | None = None
        self.quanter = None
        self.ptq: dict | None = None  # the `ptq` stage's record, with its files' paths made absolute
        self.round: dict | None = None  # under an end-result loss target: which round of pruning this is
        self._model = None
        self._data = None
        self._metric = None

    # ------------------------------------------------------------------ lazily built pieces
    @property
    def data(self):
        if self._data is None:
            spec = self.recipe["dataset"]
            plugin = registry.get("dataset", spec["name"], "dataset.name")
            ctx = SimpleNamespace(cache_dir=self.cache_dir / "data", seed=self.seed)
            self._data = plugin.obj(spec.get("params") or {}, ctx)
        return self._data

    @property
    def metric(self):
        if self._metric is None:
            spec = self.recipe["metric"]
            self._metric = registry.get("metric", spec["name"], "metric.name").obj(spec.get("params") or {})
        return self._metric

    def build_model(self, *, plan: dict | None = None, weights: Path | None = None, quant_config=None):
        """A fresh model from the recipe; the plan re-applied (never re-derived), then the weights loaded."""
        from .paddle_env import paddle

        spec = self.recipe["model"]
        model = registry.get("model", spec["name"], "model.name").obj(spec.get("params") or {}, self.data)
        if plan:
            from .pruning import apply_plan

            apply_plan(model, self.input_shape, plan)  # the plan's removed channels: shapes only, weights follow
        quanter = None
        if quant_config is not None:
            from .qat import make_quanter, quantize

            quanter = make_quanter(quant_config)
            quantize(model, quanter)
        if weights:
            try:
                _load_exact(model, self._read_weights(weights), weights)
            except StageError as e:
                if self._is_recipe_weights(weights):
                    raise RecipeError(str(e), path="model.weights") from None
                raise
        model.eval()
        return model, quanter

    def _read_weights(self, weights: Path) -> dict:
        """A weights file as a state dict, read without running any code from it (a pickle is untrusted input).

        The recipe's own ``model.weights`` failing to read is a recipe error naming the file; one of the run's
        own checkpoints failing to read is a stage error.
        """
        from .models.weights import load_state

        try:
            return load_state(weights)
        except RecipeError as e:
            if self._is_recipe_weights(weights):
                raise
            raise StageError(str(e)) from e

    def _is_recipe_weights(self, weights: Path) -> bool:
        return Path(weights) == _opt_path(self.recipe["model"].get("weights"))

    @property
    def model(self):
        if self._model is None:
            self._model, self.quanter = self.build_model(plan=self.plan, weights=self.weights,
                                                         quant_config=self.quant_config)
        return self._model

    def set_model(self, model, weights: Path, *, plan: dict | None = None, quanter=None, quant_config=None) -> dict:
        """Adopt a changed model; returns the checkpoint record a stage puts in its result."""
        self._model = model
        self.weights = Path(weights)
        if plan is not None:
            self.plan = plan
        if quant_config is not None:
            self.quant_config, self.quanter = quant_config, quanter
        return {"weights": str(Path(weights).relative_to(self.run_dir)), "plan": self.plan,
                "quant_config": self.quant_config}

    def baseline_model(self):
        """The unpruned model with the baseline weights (distillation teacher, latency reference)."""
        model, _ = self.build_model(weights=self.baseline_weights)
        return model

    @property
    def baseline_weights(self) -> Path | None:
        return Path(self.results["train"]["weights_path"]) if "train" in self.results else _opt_path(
            self.recipe["model"].get("weights"))

    @property
    def input_shape(self) -> list[int]:
        return list(self.data.input_shape)

    # ------------------------------------------------------------------ measuring
    @property
    def eval_batch_size(self) -> int:
        """The recipe's `evaluate.batch_size`: every evaluation of a run batches alike (padding can move a metric)."""
        from .config import apply_defaults
        from .stages.evaluate import SCHEMA

        return int(apply_defaults(SCHEMA, self.recipe.get("evaluate"))["batch_size"])

    def evaluate(self, model=None, dataset=None, batch_size: int | None = None) -> float:
        model = self.model if model is None else model
        was_training = model.training
        model.eval()
        from .paddle_env import paddle

        with paddle().no_grad():
            value = float(self.metric.evaluate(model, self.data.val if dataset is None else dataset,
                                               batch_size or self.eval_batch_size, self.data.collate_fn))
        if was_training:
            model.train()
        return value

    def measure(self, model=None, batch_size: int | None = None) -> dict:
        """Metric, FLOPs and parameter count of a model (the current one by default)."""
        from .pruning import count_flops, count_params

        model = self.model if model is None else model
        return {"metric": self.evaluate(model, batch_size=batch_size),
                "flops": count_flops(model, self.input_shape), "params": count_params(model)}

    # ------------------------------------------------------------------ bookkeeping
    def rewind(self, keep: list[str]) -> None:
        """Forget every stage's result but ``keep``'s, and go back to the model those stages left."""
        kept = [(name, self.results[name]) for name in keep if name in self.results]
        self.results = {}
        self.weights = _opt_path(self.recipe["model"].get("weights"))
        self.plan = self.quant_config = self.quanter = self.ptq = self._model = None
        for name, result in kept:
            self.absorb(name, result, from_disk=True)

    def absorb(self, name: str, result: dict, *, from_disk: bool = False) -> None:
        """Take a completed stage's result into the state; ``from_disk`` when resuming a stage done earlier."""
        self.results[name] = result
        ckpt = result.get("checkpoint")
        if ckpt:
            self.weights = self.run_dir / ckpt["weights"]
            self.plan = ckpt.get("plan")
            self.quant_config = ckpt.get("quant_config")
            if from_disk:
                self._model = None  # rebuilt on demand: plan re-applied, weights loaded
        if result.get("ptq"):
            rec = dict(result["ptq"])
            for key in ("ranges", "measured_model"):
                rec[key] = str(self.run_dir / rec[key])
            self.ptq = rec
        for label, path in (result.get("inputs") or {}).items():
            self.inputs[label] = path


def _load_exact(model, state: dict, source) -> None:
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    bad = [f"{k}: file {list(state[k].shape)} vs model {list(own[k].shape)}" for k in own
           if k in state and list(state[k].shape) != list(own[k].shape)]
    if missing or bad:
        raise StageError(f"weights {source} do not fit the model: missing {missing[:5]} mismatched {bad[:5]}")
    model.set_state_dict({k: state[k] for k in own})


def _opt_path(p) -> Path | None:
    return Path(p).expanduser() if p else None


def stage_dirs(run_dir: Path, stages: list[str]) -> list[Path]:
    return [Path(run_dir) / "stages" / f"{i}-{name}" for i, name in enumerate(stages, 1)]


def execute(recipe: dict, run_dir: Path, *, echo=print) -> RunState:
    """Run (or resume) every stage of a validated recipe in ``run_dir``.

    Under `prune.target.eval_metric_loss` the stages from prune to the last quantize or finetune stage may run
    more than once (see :mod:`slimrecipe.rounds`); every other stage runs once.
    """
    from . import snapshot
    from .config import apply_defaults
    from .paddle_env import seed_everything
    from .rounds import BackOff

    run_dir = Path(run_dir)
    snapshot.begin(recipe, run_dir)
    seed_everything(int(recipe["seed"]))
    state = RunState(recipe, run_dir)
    stages = recipe["stages"]
    dirs = stage_dirs(run_dir, stages)
    rounds = BackOff.for_recipe(recipe, run_dir, stages, dirs)
    if rounds is not None:
        rounds.resume(echo)
    i = 0
    while i < len(stages):
        name, sdir = stages[i], dirs[i]
        if rounds is not None and rounds.in_span(i):
            state.round = rounds.round_info()
        result_file = sdir / "result.json"
        if result_file.exists():
            state.absorb(name, read_json(result_file), from_disk=True)
            echo(f"[{sdir.name}] done earlier, skipped")
        else:
            plugin = registry.get("stage", name, "stages")
            sdir.mkdir(parents=True, exist_ok=True)
            state.stage_dir = sdir
            echo(f"[{sdir.name}] running")
            t0 = time.perf_counter()
            result = plugin.obj(state, apply_defaults(plugin.schema, recipe.get(name))) or {}
            result["seconds"] = round(time.perf_counter() - t0, 2)
            if rounds is not None and rounds.in_span(i):
                result["round"] = state.round["index"]
            write_json(result_file, result)
            state.absorb(name, result)
            echo(f"[{sdir.name}] done in {result['seconds']:.1f}s")
        if _ends_run(state.results[name], sdir, echo):
            break
        if rounds is not None and i == rounds.end and not rounds.finished:
            again = rounds.after_span(state, echo)
            if again or rounds.rewind_needed():
                state.rewind(stages[:rounds.start])
            if again:
                i = rounds.start
                continue
            if rounds.rewind_needed():  # an earlier round is delivered: take its results back
                for j in range(rounds.start, rounds.end + 1):
                    state.absorb(stages[j], read_json(dirs[j] / "result.json"), from_disk=True)
        i += 1
    snapshot.finish(state)
    return state


def _ends_run(result: dict, sdir: Path, echo) -> bool:
    """A stage may end the run after itself (a sharded sensitivity: later stages must not see a partial table);
    its result says why under ``"end_run"``."""
    if result.get("end_run"):
        echo(f"[{sdir.name}] the run ends here: {result['end_run']}")
        return True
    return False


def load_run_recipe(run_dir: Path) -> dict:
    import yaml

    f = Path(run_dir) / RESOLVED_RECIPE
    if not f.exists():
        raise RecipeError(f"{run_dir} is not a slimrecipe run directory (no {RESOLVED_RECIPE})")
    return yaml.safe_load(f.read_text(encoding="utf-8"))

