"""Choosing one candidate per layer under a budget: the solver behind the ``search`` pass.

Every layer offers candidates (dense, or a pattern at a sparsity), each with a predicted time,
an error and a count of kept weights. A plan picks one candidate per layer. The three budgets a
user can give are three instances of one problem, a multiple-choice knapsack:

* ``latency`` F: the least total error whose total time is at most F x the all-dense time;
* ``sparsity`` S: the least total error keeping at most (1 - S) of the weights (ties: faster);
* ``max_error`` E: the least total time whose total error is at most E.

:func:`solve` minimizes one quantity subject to a bound on another exactly, up to the bound's
discretization, by dynamic programming over the bound (``resolution`` cells between the least
possible use and the limit); a returned plan always respects the real budget.
:func:`lagrangian_front` traces the convex part of the time/error trade-off (each layer picks its
``time + lam * error`` minimum for a sweep of ``lam``), the curve a report draws.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from .errors import SparseccError


class SearchError(SparseccError):
    """No plan meets the budget, or the search was asked something it cannot answer."""


@dataclass(frozen=True)
class Candidate:
    """One way to build one layer."""

    pattern: str | None  # None: dense
    sparsity: float
    seconds: float  # predicted time of the layer's kernel
    error: float  # the layer's output error on calibration data (relative, squared)
    kept: int  # weights the layer keeps

    @property
    def label(self) -> str:
        return "dense" if self.pattern is None else f"{self.pattern}@{self.sparsity:g}"


def _value(candidate: Candidate, what: str) -> float:
    return float(getattr(candidate, what))


def solve(choices: Sequence[Sequence[Candidate]], minimize: str, bound: str, limit: float,
          resolution: int = 2000, tie_break: str | None = None) -> list[int]:
    """Indices (one per layer) of the candidates minimizing the sum of ``minimize`` subject to the
    sum of ``bound`` being at most ``limit`` (``minimize`` / ``bound``: "seconds", "error" or
    "kept"); among equal optima, the least sum of ``tie_break``. Raises :class:`SearchError` when
    even the smallest bound exceeds ``limit``.

    The bound is measured on a grid of ``resolution`` cells, each layer's use rounded to the
    nearest cell (exact for uses that sum to the limit); if the plan's real sum then exceeds
    ``limit``, it is solved again with every use rounded up, which cannot exceed it. Uses below
    1e-12 of the bound's largest value count as nothing, so "respects" is up to that."""
    picks = _solve_grid(choices, minimize, bound, limit, resolution, tie_break, round_up=False)
    if totals(choices, picks)[bound] - limit <= _tolerance(choices, bound, limit):
        return picks
    return _solve_grid(choices, minimize, bound, limit, resolution, tie_break, round_up=True)


def _solve_grid(choices: Sequence[Sequence[Candidate]], minimize: str, bound: str, limit: float,
                resolution: int, tie_break: str | None, round_up: bool) -> list[int]:
    if not choices or any(not c for c in choices):
        raise SearchError("every layer needs at least one candidate")
    floor = sum(min(_value(c, bound) for c in layer) for layer in choices)
    if floor > limit * (1 + 1e-12) + 1e-300:
        raise SearchError(f"no plan meets the budget: the least total {bound} is {floor:.4g}, "
                          f"above the limit {limit:.4g}")
    # Only what the bound leaves above its floor needs a grid: shift each layer by its cheapest.
    slack = limit - floor
    lows = [min(_value(c, bound) for c in layer) for layer in choices]
    # uses within rounding of nothing are nothing (a sum the float limit cannot tell apart)
    tolerance = _tolerance(choices, bound, limit)
    cell = slack / resolution if slack > tolerance else 0.0
    cells = resolution if slack > tolerance else 0
    inf = math.inf
    # best[b] = least objective using at most b cells of slack; choice[layer][b] = candidate index
    best = np.zeros(cells + 1)
    second = np.zeros(cells + 1)
    picks: list[np.ndarray] = []
    for layer, low in zip(choices, lows, strict=True):
        new_best = np.full(cells + 1, inf)
        new_second = np.full(cells + 1, inf)
        pick = np.full(cells + 1, -1, dtype=np.int64)
        for index, cand in enumerate(layer):
            used = _cells(_value(cand, bound) - low, cell, cells, tolerance, round_up)
            if used > cells:
                continue
            objective = np.full(cells + 1, inf)
            tie = np.full(cells + 1, inf)
            objective[used:] = best[: cells + 1 - used] + _value(cand, minimize)
            tie[used:] = second[: cells + 1 - used] + (_value(cand, tie_break) if tie_break else 0.0)
            better = (objective < new_best) | ((objective == new_best) & (tie < new_second))
            new_best = np.where(better, objective, new_best)
            new_second = np.where(better, tie, new_second)
            pick = np.where(better, index, pick)
        best, second = new_best, new_second
        picks.append(pick)
    b = int(np.argmin(best + 0.0))
    if not np.isfinite(best[b]):
        raise SearchError(f"no plan meets the budget on {bound}")
    # walk back: each layer's pick at the remaining slack, then remove what it used
    chosen: list[int] = []
    for layer, low, pick in zip(reversed(choices), reversed(lows), reversed(picks), strict=True):
        index = int(pick[b])
        chosen.append(index)
        b -= _cells(_value(layer[index], bound) - low, cell, cells, tolerance, round_up)
    chosen.reverse()
    return chosen


def _tolerance(choices: Sequence[Sequence[Candidate]], bound: str, limit: float) -> float:
    """What a sum of ``bound`` cannot tell from nothing: 1e-12 of its largest value."""
    return 1e-12 * max(abs(limit), max(abs(_value(c, bound)) for layer in choices for c in layer))


def _cells(extra: float, cell: float, cells: int, tolerance: float, round_up: bool) -> int:
    """Grid cells a layer's bound above its cheapest candidate takes (the nearest cell, or the
    next one up; more than the grid when there is no slack at all)."""
    if extra <= tolerance:
        return 0
    if cell <= 0 or extra > cell * (cells + 1):
        return cells + 1
    return math.ceil(extra / cell - 1e-9) if round_up else int(round(extra / cell))


def totals(choices: Sequence[Sequence[Candidate]], picks: Sequence[int]) -> dict[str, float]:
    """Sums of seconds, error and kept weights of a plan."""
    chosen = [layer[i] for layer, i in zip(choices, picks, strict=True)]
    return {"seconds": sum(c.seconds for c in chosen), "error": sum(c.error for c in chosen),
            "kept": float(sum(c.kept for c in chosen))}


def lagrangian_front(choices: Sequence[Sequence[Candidate]], points: int = 24) -> list[list[int]]:
    """Plans on the convex time/error front: for each ``lam`` of a geometric sweep every layer takes
    its least ``seconds + lam * error``; duplicates removed, from fastest to most accurate."""
    seconds = sum(min(c.seconds for c in layer) for layer in choices)
    errors = [c.error for layer in choices for c in layer if c.error > 0]
    if not errors:
        return [[min(range(len(layer)), key=lambda i, layer=layer: layer[i].seconds) for layer in choices]]
    # lam spans the ratio of a layer's time to the smallest and largest errors
    lo = seconds / len(choices) / max(errors) / 100
    hi = seconds / min(errors) * 100
    plans: list[list[int]] = []
    for lam in np.geomspace(lo, hi, points):
        plan = [min(range(len(layer)), key=lambda i, layer=layer: (layer[i].seconds + lam * layer[i].error,
                                                                   layer[i].error)) for layer in choices]
        if plan not in plans:
            plans.append(plan)
    return plans
