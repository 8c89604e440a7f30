"""Structured channel pruning on a dependency graph of the model, one module per concern.

- :mod:`.graph`: trace a model once and derive its channel groups (every tensor that loses the same channels);
- :mod:`.importance`: which channels of a group matter least (L1, L2, FPGM, first-order Taylor);
- :mod:`.surgery`: remove channels from every member of a group, in place, leaving a plain smaller model;
- :mod:`.plan`: prunable groups, plans (channel counts and the rule behind each), applying and re-applying them;
- :mod:`.sensitivity`: metric loss per group and ratio; :mod:`.sensitivity_file`: reading tables from files
  (the restricted unpickler, alone);
- :mod:`.targets`: ratios for a tolerated loss or a FLOPs cut; :mod:`.skip`: the skip rules.
"""

from __future__ import annotations

from .graph import count_flops
from .plan import (PLAN_FORMAT, analyse, apply_plan, count_params, full_shape, load_pruned, make_plan,
                   prunable_params)
from .sensitivity import compute_sensitivity, ratio_key
from .sensitivity_file import load_sensitivity_file, resolve_table
from .skip import CONV_TYPES, SKIP_RULES, apply_skip_rules
from .targets import ratios_for_flops_target, ratios_for_metric_loss

__all__ = [
    "CONV_TYPES", "PLAN_FORMAT", "SKIP_RULES", "analyse", "apply_plan", "apply_skip_rules", "compute_sensitivity",
    "count_flops", "count_params", "full_shape", "load_pruned", "load_sensitivity_file", "make_plan",
    "prunable_params", "ratio_key", "ratios_for_flops_target", "ratios_for_metric_loss", "resolve_table",
]
