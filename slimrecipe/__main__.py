"""`python -m slimrecipe` is the `slimrecipe` command."""

from .cli import entry

entry()
