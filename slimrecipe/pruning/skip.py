"""Skip rules: which prunable groups stay whole, each with the rule that kept it."""

from __future__ import annotations

import math
import re

from ..errors import Problem, RecipeError
from .sensitivity_file import _number, resolve_table
from .targets import _loss_at

CONV_TYPES = ("conv", "depthwise", "grouped", "transpose", "linear")
SKIP_RULES = ("first_n", "names", "patterns", "types", "loss_above", "min_channels")


def _ordinal(n: int) -> str:
    suffix = "th" if 10 <= n % 100 <= 20 else {1: "st", 2: "nd", 3: "rd"}.get(n % 10, "th")
    return f"{n}{suffix}"


def apply_skip_rules(prunable: list[dict], table: dict | None, rules: dict | None,
                     *, path: str = "skip") -> tuple[list[str], dict[str, str]]:
    """Which prunable parameters stay candidates for pruning, and why each of the others is skipped.

    Rules (an unused one may be absent, null, ``[]`` or ``first_n: 0``): ``first_n`` (the N prunable
    convolutions nearest the input), ``names`` (exact, structured or PaddleSlim names), ``patterns`` (regexes,
    full match on either name), ``types`` (conv, depthwise, grouped, transpose), ``loss_above: {ratio,
    max_loss}`` (sensitivity at ``ratio``, interpolated, above ``max_loss``:
    needs ``table``), ``min_channels`` (skips a parameter that has at most that many output channels; the
    others are clamped to keep at least that many when the plan is made). A selecting rule, or any single name
    or pattern, that matches nothing is an error unless the rule is listed in ``allow_empty``; ``min_channels``
    is a limit, not a selection, and is never an error for that. The first rule in the order above names the
    reason a parameter is skipped.
    """
    # recipes spell an unused rule as null, [] or first_n: 0
    rules = {k: v for k, v in (rules or {}).items() if v is not None and v != [] and not (k == "first_n" and v == 0)}
    allow_empty = rules.pop("allow_empty", None) or []
    problems: list = []

    def fail(message: str, where: str) -> None:
        problems.append(Problem(where, message))

    if not isinstance(allow_empty, list) or any(r not in SKIP_RULES for r in allow_empty):
        fail(f"allow_empty lists rule names, some of {list(SKIP_RULES)}; got {allow_empty!r}", f"{path}.allow_empty")
        allow_empty = [r for r in allow_empty if r in SKIP_RULES] if isinstance(allow_empty, list) else []
    for key in rules:
        if key not in SKIP_RULES:
            fail(f"unknown skip rule {key!r}; the rules are {list(SKIP_RULES)} and allow_empty", f"{path}.{key}")

    names = [e["name"] for e in prunable]
    sample = ", ".join(names[:4]) + (", ..." if len(names) > 4 else "")
    reasons: dict[str, str] = {}

    def skip(entry: dict, reason: str) -> None:
        reasons.setdefault(entry["name"], reason)

    def nothing(rule: str, where: str, what: str) -> None:
        if rule not in allow_empty:
            fail(f"{what} matches no prunable parameter (they are: {sample}); fix it, or list {rule!r} in "
                 f"{path}.allow_empty", where)

    if "first_n" in rules:
        n = rules["first_n"]
        if isinstance(n, bool) or not isinstance(n, int) or n < 0:
            fail(f"first_n must be a whole number of convolutions, got {n!r}", f"{path}.first_n")
        else:
            for e in prunable[:n]:
                skip(e, f"{path}.first_n: {_ordinal(e['index'] + 1)} prunable convolution from the input")

    if "names" in rules:
        listed = rules["names"]
        if not isinstance(listed, list) or not all(isinstance(x, str) for x in listed):
            fail(f"names must be a list of parameter names, got {listed!r}", f"{path}.names")
        else:
            for i, want in enumerate(listed):
                hits = [e for e in prunable if want in (e["name"], e["param_name"])]
                for e in hits:
                    skip(e, f"{path}.names: listed")
                if not hits:
                    nothing("names", f"{path}.names[{i}]", f"name {want!r}")

    if "patterns" in rules:
        pats = rules["patterns"]
        if not isinstance(pats, list) or not all(isinstance(x, str) for x in pats):
            fail(f"patterns must be a list of regular expressions, got {pats!r}", f"{path}.patterns")
        else:
            for i, pat in enumerate(pats):
                try:
                    rx = re.compile(pat)
                except re.error as e:
                    fail(f"invalid regular expression {pat!r}: {e}", f"{path}.patterns[{i}]")
                    continue
                hits = [e for e in prunable if rx.fullmatch(e["name"]) or rx.fullmatch(e["param_name"])]
                for e in hits:
                    skip(e, f"{path}.patterns[{i}]: matches {pat!r}")
                if not hits:
                    nothing("patterns", f"{path}.patterns[{i}]", f"pattern {pat!r}")

    if "types" in rules:
        types = rules["types"]
        if not isinstance(types, list) or any(t not in CONV_TYPES for t in types):
            fail(f"types must be a list of {list(CONV_TYPES)}, got {types!r}", f"{path}.types")
        else:
            hits = [e for e in prunable if e["type"] in types]
            for e in hits:
                skip(e, f"{path}.types: {e['type']} convolution")
            if not hits:
                nothing("types", f"{path}.types",
                        f"types {types} (PaddleSlim prunes depthwise and transposed convolutions only through "
                        "the convolution before them, so they are never listed)")

    if "loss_above" in rules:
        spec = rules["loss_above"]
        where = f"{path}.loss_above"
        ok = isinstance(spec, dict) and set(spec) == {"ratio", "max_loss"}
        r, limit = (_number(spec.get("ratio")), _number(spec.get("max_loss"))) if ok else (None, None)
        if not ok or r is None or limit is None or not 0 < r < 1 or not math.isfinite(limit):
            fail(f"loss_above must be {{ratio: r in (0, 1), max_loss: x}}, got {spec!r}", where)
        elif not table:
            fail("loss_above needs a sensitivity table: compute one (sensitivity stage) or give sensitivity.file",
                 where)
        else:
            resolved = resolve_table(prunable, table)
            hits = []
            for e in prunable:
                row = resolved.get(e["name"])
                if row:
                    loss = _loss_at(row, r)
                    if loss > limit:
                        hits.append(e)
                        skip(e, f"{where}: loss {loss:.4g} at ratio {r:g} > {limit:g}")
            if not hits:
                nothing("loss_above", where, f"loss_above {{ratio: {r:g}, max_loss: {limit:g}}}")

    if "min_channels" in rules:
        m = rules["min_channels"]
        if isinstance(m, bool) or not isinstance(m, int) or m < 1:
            fail(f"min_channels must be a positive integer, got {m!r}", f"{path}.min_channels")
        else:
            for e in prunable:
                if e["channels"] <= m:
                    skip(e, f"{path}.min_channels: only {e['channels']} output channels (minimum {m})")

    if problems:
        raise RecipeError(problems)
    kept = [n for n in names if n not in reasons]
    if prunable and not kept:
        raise RecipeError(f"these rules skip every prunable parameter ({len(names)}): nothing would be pruned",
                          path=path)
    return kept, {n: reasons[n] for n in names if n in reasons}
