"""Rounds of prune -> finetune (-> quantize) under `prune.target.eval_metric_loss`: the tolerated loss of the
model the run delivers, not of each layer alone.

The run measures the delivered model at the end of its compression span (prune and every stage after it but
export and report: finetune, qat, ptq). When the loss against the baseline exceeds the target, the round's stage directories move to
``rounds/<k>/``, the run goes back to the baseline (the last checkpoint before prune) and prunes again with a
smaller FLOPs cut: the previous round's cut times `prune.backoff`, planned from the sensitivity table, so the
least sensitive groups keep being pruned and the most sensitive ones are given back first. The first round that
meets the target is delivered; when none does within `prune.rounds`, the round closest to it is, with a message
that says so.

``rounds.json`` records every round. It is written before any directory moves, and every span stage's result
names its round, so a run killed at any point resumes into the same plan.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from .fileio import read_json, write_json

# stages that only read the delivered model: they run once, after the rounds
AFTER_ROUNDS = ("export", "report")
ROUNDS_FILE = "rounds.json"
DEFAULT_ROUNDS = 3
DEFAULT_BACKOFF = 0.5


class BackOff:
    """The round loop of one run; ``None`` from :meth:`for_recipe` when the recipe has no end-result target."""

    def __init__(self, recipe: dict, run_dir: Path, stages: list[str], dirs: list[Path]):
        prune = recipe.get("prune") or {}
        self.target = float(prune["target"]["eval_metric_loss"])
        self.max_rounds = int(prune.get("rounds", DEFAULT_ROUNDS))
        self.backoff = float(prune.get("backoff", DEFAULT_BACKOFF))
        self.run_dir = Path(run_dir)
        self.stages, self.dirs = stages, dirs
        self.start = stages.index("prune")
        self.end = max(i for i, s in enumerate(stages) if i >= self.start and s not in AFTER_ROUNDS)
        self.file = self.run_dir / ROUNDS_FILE
        self.doc = read_json(self.file) if self.file.exists() else {
            "target_loss": self.target, "max_rounds": self.max_rounds, "backoff": self.backoff,
            "span": stages[self.start:self.end + 1], "rounds": [], "current": 0, "flops_target": None,
            "delivered": None, "met": None, "message": ""}

    @classmethod
    def for_recipe(cls, recipe: dict, run_dir: Path, stages: list[str], dirs: list[Path]) -> "BackOff | None":
        target = ((recipe.get("prune") or {}).get("target") or {})
        if "prune" not in stages or "eval_metric_loss" not in target:
            return None
        return cls(recipe, run_dir, stages, dirs)

    # ------------------------------------------------------------------ state of the loop
    @property
    def finished(self) -> bool:
        return self.doc["delivered"] is not None

    def in_span(self, i: int) -> bool:
        return self.start <= i <= self.end

    def round_info(self) -> dict:
        """What the prune stage reads: which round this is and, after the first, the FLOPs cut to plan for."""
        return {"index": self.doc["current"], "flops": self.doc["flops_target"], "target_loss": self.target}

    def resume(self, echo) -> None:
        """Put every directory where ``rounds.json`` says it belongs (after a kill between two moves)."""
        if self.finished:
            self._place(self.doc["delivered"], echo)
        else:
            for i in range(self.start, self.end + 1):
                r = self._round_of(self.dirs[i])
                if r is not None and r != self.doc["current"]:
                    self._move(self.dirs[i], self._round_dir(r) / self.dirs[i].name)

    # ------------------------------------------------------------------ the decision after a span
    def after_span(self, state, echo) -> bool:
        """Record the round just finished; True when the run must prune again (from the baseline)."""
        k = self.doc["current"]
        metric = float(state.results[self.stages[self.end]]["metric"])
        base = self._baseline_metric(state)
        higher = getattr(state.metric, "higher_is_better", True)
        loss = (base - metric) if higher else (metric - base)
        prune_result = state.results["prune"]
        entry = {"round": k, "flops_target": self.doc["flops_target"], "flops_cut": prune_result.get("flops_cut"),
                 "flops": prune_result.get("flops"), "params": prune_result.get("params"),
                 "pruned_metric": prune_result.get("metric"), "metric": metric, "baseline_metric": base,
                 "loss": loss, "met": loss <= self.target}
        self.doc["rounds"] = [r for r in self.doc["rounds"] if r["round"] != k] + [entry]
        echo(f"[round {k}] FLOPs cut {entry['flops_cut']:.1%}: delivered {state.metric.name} {metric:.4f}, "
             f"loss {loss:+.4f} against {base:.4f} (target {self.target:g}) -> "
             + ("met" if entry["met"] else "missed"))
        if entry["met"]:
            self.doc.update(delivered=k, met=True)
            write_json(self.file, self.doc)
            return False
        if k + 1 < self.max_rounds and (entry["flops_cut"] or 0) > 0.005:
            self.doc.update(current=k + 1, flops_target=round(entry["flops_cut"] * self.backoff, 4))
            write_json(self.file, self.doc)  # first the record, then the moves: a resume finishes them
            self._archive(k)
            echo(f"[round {k + 1}] back to the baseline; pruning to a FLOPs cut of {self.doc['flops_target']:.1%}")
            return True
        closest = min(self.doc["rounds"], key=lambda r: (r["loss"], -(r["flops_cut"] or 0)))
        self.doc.update(delivered=closest["round"], met=False, message=(
            f"prune.target.eval_metric_loss {self.target:g} was not met within {len(self.doc['rounds'])} "
            f"round(s) (prune.rounds {self.max_rounds}, prune.backoff {self.backoff:g}): delivering round "
            f"{closest['round']}, the closest (loss {closest['loss']:+.4f}, FLOPs cut {closest['flops_cut']:.1%})"))
        write_json(self.file, self.doc)
        echo(f"  {self.doc['message']}")
        if closest["round"] != k:
            self._place(closest["round"], echo)
        return False

    def rewind_needed(self) -> bool:
        """After :meth:`after_span` chose an earlier round, the state must be rebuilt from its results."""
        return self.finished and self.doc["delivered"] != max(r["round"] for r in self.doc["rounds"])

    # ------------------------------------------------------------------ moving directories
    def _baseline_metric(self, state) -> float:
        if "evaluate" in state.results and "metric" in state.results["evaluate"]:
            return float(state.results["evaluate"]["metric"])
        return float(state.results["prune"]["before"]["metric"])

    def _round_dir(self, k: int) -> Path:
        return self.run_dir / "rounds" / str(k)

    def _round_of(self, sdir: Path) -> int | None:
        f = sdir / "result.json"
        if not f.exists():
            return None
        return read_json(f).get("round")

    def _archive(self, k: int) -> None:
        dest = self._round_dir(k)
        dest.mkdir(parents=True, exist_ok=True)
        plan = self.run_dir / "plan.json"
        if plan.exists():
            shutil.copyfile(plan, dest / "plan.json")
        for i in range(self.start, self.end + 1):
            self._move(self.dirs[i], dest / self.dirs[i].name)

    def _place(self, k: int, echo) -> None:
        """Make round ``k``'s directories (and plan) the run's own; the others go to rounds/."""
        for i in range(self.start, self.end + 1):
            r = self._round_of(self.dirs[i])
            if r is not None and r != k:
                self._move(self.dirs[i], self._round_dir(r) / self.dirs[i].name)
            kept = self._round_dir(k) / self.dirs[i].name
            if kept.exists() and not self.dirs[i].exists():
                self._move(kept, self.dirs[i])
        plan = self._round_dir(k) / "plan.json"
        if plan.exists():
            shutil.copyfile(plan, self.run_dir / "plan.json")

    @staticmethod
    def _move(src: Path, dest: Path) -> None:
        if not src.exists():
            return
        dest.parent.mkdir(parents=True, exist_ok=True)
        if dest.exists():
            shutil.rmtree(dest)
        os.replace(src, dest)
