"""Timing side by side: the one way sparsecc measures speed (demo, examples, benchmarks).

The machines are shared and noisy, so implementations are never timed one after another: they
take turns in round-robin blocks, each block long enough (about ``block_seconds``) to swamp timer
resolution, and the median over rounds is reported. Ratios are only meaningful within one call.
"""

from __future__ import annotations

import contextlib
import os
import statistics
import time
from collections.abc import Callable, Iterator
from typing import Any


@contextlib.contextmanager
def one_cpu() -> Iterator[None]:
    """Run the block with the calling thread held on one CPU (the highest it may use), restoring
    its CPU set after. Single-threaded kernel timings use it so a thread is not moved between CPUs
    mid-measurement; on this machine it made runs of the same kernel more alike in short tests,
    though slow stretches of up to 1.5x still come on either CPU (see ``targets.tuning.explore``).
    Threads a runtime starts inside the block inherit the one CPU, so multi-threaded timings must
    not use it."""
    setter = getattr(os, "sched_setaffinity", None)
    before = os.sched_getaffinity(0) if setter is not None else set()
    if setter is None or len(before) <= 1:
        yield
        return
    setter(0, {max(before)})
    try:
        yield
    finally:
        setter(0, before)


def seconds_per_call(fn: Callable[[], Any], warmup: int = 3) -> float:
    """A rough single-call time after ``warmup`` calls (sets each function's block length)."""
    for _ in range(warmup):
        fn()
    start = time.perf_counter()
    fn()
    once = time.perf_counter() - start
    if once < 1e-3:
        # Short calls: average a few so one timer tick or interrupt does not set the block length.
        reps = max(1, int(1e-3 / max(once, 1e-7)))
        start = time.perf_counter()
        for _ in range(reps):
            fn()
        once = (time.perf_counter() - start) / reps
    return once


def interleave(fns: dict[str, Callable[[], Any]], *, rounds: int = 15, block_seconds: float = 3e-3,
               warmup: int = 3) -> dict[str, dict[str, float]]:
    """Time functions in round-robin blocks; per function: median, 25th and 75th percentile
    seconds per call, and calls per block (each function gets its own block length, so a 20 us
    kernel and a 20 ms model are both measured over about ``block_seconds`` per block)."""
    per_block = {name: max(1, round(block_seconds / max(seconds_per_call(fn, warmup), 1e-7)))
                 for name, fn in fns.items()}
    samples: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            reps = per_block[name]
            start = time.perf_counter()
            for _ in range(reps):
                fn()
            samples[name].append((time.perf_counter() - start) / reps)
    result: dict[str, dict[str, float]] = {}
    for name, values in samples.items():
        values.sort()
        quartiles = statistics.quantiles(values, n=4) if len(values) > 1 else [values[0]] * 3
        result[name] = {"median": statistics.median(values), "q1": quartiles[0], "q3": quartiles[2],
                        "calls_per_block": float(per_block[name])}
    return result


def median_latency(fns: dict[str, Callable[[], Any]], *, rounds: int = 9,
                   block_seconds: float = 0.05) -> dict[str, float]:
    """Median seconds per call of each function, measured side by side with ``interleave``."""
    timed = interleave(fns, rounds=rounds, block_seconds=block_seconds)
    return {name: entry["median"] for name, entry in timed.items()}
