"""The plan solver: exact against brute force on small synthetic tables, budgets respected, the
front ordered, impossible budgets refused."""

from __future__ import annotations

import itertools

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from sparsecc.search import Candidate, SearchError, lagrangian_front, solve, totals


def table(rows: list[list[tuple[float, float, int]]]) -> list[list[Candidate]]:
    return [[Candidate(None if i == 0 else "unstructured", 0.1 * i, s, e, k) for i, (s, e, k) in enumerate(layer)]
            for layer in rows]


def brute_force(choices, minimize, bound, limit, tie_break=None):
    # the solver counts sums within 1e-12 of the bound's scale as meeting it; so does this
    slack = 1e-12 * max(abs(limit), max(abs(getattr(c, bound)) for layer in choices for c in layer))
    best = None
    for picks in itertools.product(*(range(len(layer)) for layer in choices)):
        t = totals(choices, picks)
        if t[bound] > limit + slack:
            continue
        key = (round(t[minimize], 12), round(t[tie_break], 12) if tie_break else 0)
        if best is None or key < best[0]:
            best = (key, picks)
    return best


KNOWN = table([
    # (seconds, error, kept) per candidate; candidate 0 is dense
    [(10.0, 0.0, 100), (6.0, 0.02, 50), (4.0, 0.08, 30)],
    [(20.0, 0.0, 200), (12.0, 0.05, 100), (7.0, 0.30, 50)],
    [(5.0, 0.0, 50), (4.5, 0.01, 25)],
])


def test_known_optimum_under_each_budget() -> None:
    # max-error 0.08: fastest plan whose errors sum to at most 0.08 -> (6, 12, 4.5) with 0.02+0.05+0.01
    assert solve(KNOWN, "seconds", "error", 0.08) == [1, 1, 1]
    # latency 0.65 of dense (35 s -> 22.75 s): least error -> 0.02 + 0.05 + 0.0 at 6 + 12 + 5 = 23 > 22.75,
    # so 6 + 12 + 4.5 = 22.5 with error 0.08
    assert solve(KNOWN, "error", "seconds", 0.65 * 35.0) == [1, 1, 1]
    # latency 0.8 (28 s): only the second layer must be sparse -> 10 + 12 + 5 = 27 s, error 0.05
    assert solve(KNOWN, "error", "seconds", 28.0) == [0, 1, 0]
    # keep at most 50 % of 350 weights (175): least error
    assert tuple(solve(KNOWN, "error", "kept", 175)) == brute_force(KNOWN, "error", "kept", 175)[1] == (1, 1, 1)


def test_impossible_budget_is_refused() -> None:
    with pytest.raises(SearchError, match="no plan meets the budget"):
        solve(KNOWN, "error", "seconds", 10.0)  # fastest possible is 4 + 7 + 4.5
    with pytest.raises(SearchError, match="at least one candidate"):
        solve([[]], "error", "seconds", 1.0)


@settings(max_examples=60, deadline=None)
@given(st.lists(st.lists(st.tuples(st.floats(0.5, 10), st.floats(0, 1), st.integers(1, 100)), min_size=1, max_size=4),
                min_size=1, max_size=5),
       st.sampled_from([("error", "seconds"), ("seconds", "error"), ("error", "kept")]), st.floats(0.0, 1.0))
def test_matches_brute_force(rows, objective_bound, fraction) -> None:
    choices = table(rows)
    minimize, bound = objective_bound
    low = sum(min(getattr(c, bound) for c in layer) for layer in choices)
    high = sum(max(getattr(c, bound) for c in layer) for layer in choices)
    limit = low + fraction * (high - low)
    picks = solve(choices, minimize, bound, limit, resolution=4000)
    got = totals(choices, picks)
    scale = max(abs(getattr(c, bound)) for layer in choices for c in layer)
    assert got[bound] <= limit + 1e-9 * max(limit, scale)  # the real budget holds, not only the grid's
    expected = brute_force(choices, minimize, bound, limit)[0][0]
    # exact up to the grid: rounding each layer's bound up by at most one cell can only exclude
    # plans within len(rows) cells of the limit; check against brute force with that margin
    margin = len(rows) * (high - low) / 4000
    strict = brute_force(choices, minimize, bound, limit - margin)
    assert got[minimize] <= (strict[0][0] if strict else got[minimize]) + 1e-9
    assert got[minimize] >= expected - 1e-9


def test_uses_below_float_resolution_count_as_nothing() -> None:
    # the second layer's cheaper candidate adds 1e-38 error: 1.0 + 1e-38 is 1.0, within a limit of 1.0
    choices = table([[(1.0, 1.0, 1)], [(2.0, 0.0, 1), (1.0, 1.175494351e-38, 1)]])
    assert solve(choices, "seconds", "error", 1.0) == [0, 1]


def test_lagrangian_front_runs_from_fastest_to_most_accurate() -> None:
    front = lagrangian_front(KNOWN)
    points = [totals(KNOWN, plan) for plan in front]
    assert front[0] == [2, 2, 1] and front[-1] == [0, 0, 0]
    pairs = zip(points, points[1:], strict=False)
    assert all(a["seconds"] <= b["seconds"] and a["error"] >= b["error"] for a, b in pairs)
