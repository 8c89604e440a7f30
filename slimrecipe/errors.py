"""User mistakes (a recipe, an input file, a missing install) and the one error type for recipe mistakes.

A :class:`UserError` is shortened to its message (exit 2, no traceback): the user can fix it. Anything else
that escapes is a bug of ours and keeps its traceback.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Problem:
    path: str  # dotted recipe path, e.g. "prune.target.flops"; "" for the recipe as a whole
    message: str

    def __str__(self) -> str:
        return f"{self.path or '<recipe>'}: {self.message}"


class UserError(Exception):
    """Something the user can fix; the command prints the message and exits 2."""

    def render(self) -> str:
        return str(self)


class MissingDependency(UserError):
    """A package the recipe needs is not installed; the message says which extra installs it."""


class RecipeError(UserError):
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
