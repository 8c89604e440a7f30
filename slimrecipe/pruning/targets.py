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


def ratios_for_flops_target(model, input_shape, table: dict, target_cut: float, *, params=None,
                            tolerance: float = 0.01, align: int | None = None,
                            min_channels: int | None = None) -> tuple[dict[str, float], float]:
    """Ratios that remove ``target_cut`` of the FLOPs (within ``tolerance``), spending loss where it is cheapest.

    Bisects the metric-loss threshold given to :func:`ratios_for_metric_loss`; where the cut jumps over the
    target (a parameter entering at its first tested ratio, a non-monotonic row, channel rounding) it bisects
    between the two ratio sets on either side, then tries moving single parameters by one channel (or one
    ``align`` step). The result never overshoots the target by more than ``tolerance``. Returned ratios are
    final: :func:`make_plan` with the same ``align`` and ``min_channels`` keeps exactly these channel counts,
    and the model is unchanged. ``params`` limits pruning to those parameters (default: all in ``table``).
    """
    path = "prune.target.flops"
    if isinstance(target_cut, bool) or not isinstance(target_cut, (int, float)) or not 0 < target_cut < 1:
        raise RecipeError(f"the FLOPs cut must lie strictly between 0 and 1, got {target_cut!r}", path=path)
    if not 0 < tolerance < 1:
        raise RecipeError(f"tolerance must lie strictly between 0 and 1, got {tolerance!r}",
                          path="prune.tolerance")
    align = _check_align(align)
    min_channels = _check_min_channels(min_channels)
    from .plan import FlopsProbe

    probe = FlopsProbe(model, input_shape)
    # rows may be keyed by PaddleSlim's internal names of the leading weights
    structured = {p.name: n for n, p in model.named_parameters()}
    table = {k if k in probe.channels else structured.get(k, k): v for k, v in table.items()}
    if params is not None:
        unknown = [p for p in params if (p if p in probe.channels else structured.get(p)) not in probe.channels]
        if unknown:
            raise RecipeError(f"not prunable groups of this model: {unknown[:5]}", path=path)
        chosen = {p if p in probe.channels else structured[p] for p in params}
        table = {k: v for k, v in table.items() if k in chosen}
    table = {k: v for k, v in table.items() if k in probe.channels and v}
    if not table:
        raise RecipeError("no sensitivity measurements for any parameter left to prune: compute sensitivity "
                          "for them, or relax the skip rules", path=path)
    lo_window, hi_window = target_cut - tolerance, target_cut + tolerance

    def config(ratios: dict[str, float]) -> dict[str, int]:
        return {n: _kept_channels(probe.channels[n], ratios.get(n, 0.0), align, min_channels) for n in table}

    def est_loss(kept: dict[str, int]) -> float:
        return sum(_loss_at(table[n], (probe.channels[n] - k) / probe.channels[n]) for n, k in kept.items())

    best: list = []  # [(distance, est_loss, cut, kept)]

    def consider(kept: dict[str, int]) -> float:
        c = probe.cut(kept)
        if lo_window <= c <= hi_window:
            best.append((abs(c - target_cut), est_loss(kept), c, kept))
        return c

    losses = sorted({float(v) for row in table.values() for v in row.values()})
    t_lo, t_hi = losses[0] - 1.0, losses[-1]
    # the largest ratios everywhere: the edge of the reachable range, and the costliest way to reach it, so it
    # is only a last resort even when it lands in the window
    top_config = config(ratios_for_metric_loss(table, t_hi))
    top = probe.cut(top_config)
    if top < lo_window:
        raise RecipeError(
            f"a FLOPs cut of {target_cut:g} is out of reach: pruning every parameter to its largest measured "
            f"ratio cuts {top:.4f}, so the reachable range is 0 to {top:.4f}. Measure larger ratios, "
            f"prune more parameters, or lower the target", path=path)

    for _ in range(60):  # bisect the loss threshold
        if best or t_hi - t_lo < 1e-12:
            break
        mid = (t_lo + t_hi) / 2
        if consider(config(ratios_for_metric_loss(table, mid))) < target_cut:
            t_lo = mid
        else:
            t_hi = mid

    if not best:  # the cut jumps across the window at one threshold: blend the ratio sets on either side
        r_lo, r_hi = ratios_for_metric_loss(table, t_lo), ratios_for_metric_loss(table, t_hi)
        a_lo, a_hi = 0.0, 1.0

        def blend(a: float) -> dict[str, int]:
            return config({n: (1 - a) * r_lo.get(n, 0.0) + a * r_hi.get(n, 0.0) for n in table})

        for _ in range(60):
            if best or blend(a_lo) == blend(a_hi) or a_hi - a_lo < 1e-12:
                break
            mid = (a_lo + a_hi) / 2
            if consider(blend(mid)) < target_cut:
                a_lo = mid
            else:
                a_hi = mid
        below, above = blend(a_lo), blend(a_hi)
        # then one channel (or align step) of one parameter at a time, greedily: up from below and down
        # from above, the move with the least loss per FLOP first, never leaving the side it started on
        budget = [20 * len(table) + 50]
        for start, step in ((below, -1), (above, +1)):
            current = dict(start)
            while not best and budget[0] > 0:
                base_cut, base_loss, moves = probe.cut(current), est_loss(current), []
                for n in table:
                    k = _neighbour(current[n], step, probe.channels[n], align, min_channels)
                    if k is None:
                        continue
                    budget[0] -= 1
                    cand = {**current, n: k}
                    c = consider(cand)
                    if step < 0 and base_cut < c <= hi_window:
                        moves.append(((est_loss(cand) - base_loss) / (c - base_cut), cand))
                    elif step > 0 and lo_window <= c < base_cut:
                        moves.append(((est_loss(cand) - base_loss) / (base_cut - c), cand))
                if not moves:
                    break
                current = min(moves, key=lambda m: m[0])[1]
        if not best:
            consider(top_config)
        if not best:
            raise RecipeError(
                f"a FLOPs cut of {target_cut:g} ± {tolerance:g} falls between the channel steps the search could "
                f"take: it found cuts of {probe.cut(below):.4f} and {probe.cut(above):.4f} on either side"
                f"{f' with align {align}' if align else ''}. Choose a target near one of them, widen "
                f"prune.tolerance{', or use a smaller align' if align else ''}", path=path)

    _, _, achieved, kept = min(best, key=lambda b: (b[0], b[1]))
    ratios = {n: (probe.channels[n] - k) / probe.channels[n] for n, k in kept.items() if k < probe.channels[n]}
    return ratios, achieved


def _neighbour(kept: int, step: int, channels: int, align: int | None, min_channels: int | None) -> int | None:
    """The next allowed channel count below (step -1) or above (+1) ``kept``, or None."""
    unit = align or 1
    floor = max(unit, min_channels or 1)
    if step < 0:
        k = (kept - 1) // unit * unit
        return k if k >= floor else None
    if kept >= channels:
        return None
    k = (kept // unit + 1) * unit
    return min(k, channels)
