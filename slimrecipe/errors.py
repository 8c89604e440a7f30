"""The one error type for recipe mistakes: each problem names the recipe path at fault."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Problem:
    path: str  # dotted recipe path, e.g. "prune.target.flops"; "" for the recipe as a whole
    message: str

    def __str__(self) -> str:
        return f"{self.path or '<recipe>'}: {self.message}"


class RecipeError(Exception):
    """A recipe is wrong. Carries every problem found, not only the first."""

    def __init__(self, problems: list[Problem] | Problem | str, path: str = ""):
        if isinstance(problems, str):
            problems = [Problem(path, problems)]
        elif isinstance(problems, Problem):
            problems = [problems]
        self.problems = list(problems)
        super().__init__(self.render())

    def render(self) -> str:
        n = len(self.problems)
        head = f"recipe error{'s' if n != 1 else ''} ({n}):"
        return "\n".join([head] + [f"  - {p}" for p in self.problems])


class StageError(Exception):
    """A stage ran but its result is not acceptable (a failed parity check, a refused input)."""
