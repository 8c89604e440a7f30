"""Choosing ratios: per-parameter ratios from a sensitivity table, kept channel counts, alignment."""

from __future__ import annotations

import math

from ..errors import RecipeError


def _points(row: dict) -> list[tuple[float, float]]:
    return sorted((float(r), float(v)) for r, v in row.items())


def ratios_for_metric_loss(table: dict, max_loss: float) -> dict[str, float]:
    """Per parameter, the largest tested ratio whose loss is at most ``max_loss``, moved linearly toward the
    next tested ratio by how much loss is left; parameters that never stay within it are left out."""
    ratios = {}
    for param, row in table.items():
        pts = _points(row)
        for i in range(len(pts) - 1, -1, -1):
            r0, l0 = pts[i]
            if l0 <= max_loss:
                if i == len(pts) - 1:
                    ratios[param] = r0
                else:
                    r1, l1 = pts[i + 1]  # l1 > max_loss >= l0: pts[i] is the largest within the budget
                    ratios[param] = r0 + (max_loss - l0) * (r1 - r0) / (l1 - l0)
                break
    return ratios


def _loss_at(row: dict, ratio: float) -> float:
    """Loss at any ratio by linear interpolation; 0 at ratio 0, the last measured loss past the last point."""
    pts = [(0.0, 0.0)] + _points(row)
    for (r0, l0), (r1, l1) in zip(pts, pts[1:]):
        if ratio <= r1:
            return l0 + (ratio - r0) * (l1 - l0) / (r1 - r0) if r1 > r0 else l1
    return pts[-1][1]


def _kept_channels(channels: int, ratio: float, align: int | None = None, min_channels: int | None = None) -> int:
    """Channels a parameter keeps at ``ratio``: PaddleSlim's count, then aligned, then clamped.

    PaddleSlim prunes ``round(channels * ratio)`` filters and always keeps one. With ``align`` the kept count
    becomes the nearest multiple of ``align`` (at least ``align``) not above ``channels``, or ``channels``
    itself (unpruned) when that is nearer. ``min_channels`` then raises it to at least that many (a multiple of
    ``align`` again), never above ``channels``.
    """
    if ratio <= 0:
        return channels
    kept = channels - min(channels - 1, int(round(channels * ratio)))
    if align:
        options = {m * align for m in range(1, channels // align + 1)} | {channels}
        kept = min(options, key=lambda k: (abs(k - kept), -k))
    if min_channels and kept < min_channels:
        kept = min_channels if not align else align * math.ceil(min_channels / align)
    return min(kept, channels)


def _check_align(align, path: str = "prune.align") -> int | None:
    if align in (None, 1):
        return None
    if isinstance(align, bool) or not isinstance(align, int) or align < 1:
        raise RecipeError(f"align must be a positive integer such as 8 or 16, got {align!r}", path=path)
    return align


def _check_min_channels(min_channels, path: str = "skip.min_channels") -> int | None:
    if min_channels is None:
        return None
    if isinstance(min_channels, bool) or not isinstance(min_channels, int) or min_channels < 1:
        raise RecipeError(f"min_channels must be a positive integer, got {min_channels!r}", path=path)
    return min_channels


