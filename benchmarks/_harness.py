"""Timing helpers shared by sparsecc's benchmarks.

The machine these run on is shared and noisy, so every comparison is made side by side in one
process: the implementations are interleaved in round-robin blocks (load from other processes
hits them alike), each block repeats a call enough times to last a few milliseconds (timer and
scheduler granularity stay small against it), and the reported number is the median block.
The load average is recorded around every measurement so a reader can discard disturbed runs.

Thread counts must be fixed before torch, ONNX Runtime or TVM start their thread pools:
:func:`pin_threads` sets the environment and is meant to run before those imports.
"""

from __future__ import annotations

import os
import shlex
import statistics
import sys
import time
from collections.abc import Callable
from typing import Any


def pin_threads(threads: int) -> None:
    """Fix the thread count of every runtime a benchmark uses.

    TVM's runtime reads ``TVM_NUM_THREADS`` when its thread pool first starts and OpenMP (torch,
    MKL) reads ``OMP_NUM_THREADS`` at load, so this must run before ``import torch`` / ``import
    tvm``. torch and ONNX Runtime also get the count explicitly after import (see
    :func:`configure_torch` and the sessions' ``intra_op_num_threads``).
    """
    value = str(threads)
    for var in ("TVM_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        os.environ[var] = value


def configure_torch(threads: int) -> None:
    import torch

    torch.set_num_threads(threads)
    torch.set_num_interop_threads(1)


def tvm_threads() -> int:
    """Worker threads TVM's runtime pool actually uses (starts the pool if needed)."""
    import tvm

    return int(tvm.runtime.num_threads())


def command_line() -> str:
    return " ".join(shlex.quote(a) for a in [os.path.basename(sys.executable), *sys.argv])


def load() -> tuple[float, float, float]:
    return os.getloadavg()


def calibrate(fn: Callable[[], Any], warmup: int = 3) -> float:
    """Seconds per call after ``warmup`` calls (a rough single-call estimate)."""
    for _ in range(warmup):
        fn()
    t0 = time.perf_counter()
    fn()
    once = time.perf_counter() - t0
    if once < 1e-3:
        # Short calls: average a few so one timer tick or interrupt does not set the block size.
        reps = max(1, int(1e-3 / max(once, 1e-7)))
        t0 = time.perf_counter()
        for _ in range(reps):
            fn()
        once = (time.perf_counter() - t0) / reps
    return once


def interleave(fns: dict[str, Callable[[], Any]], *, rounds: int = 15, block_seconds: float = 3e-3,
               warmup: int = 3) -> dict[str, dict[str, float]]:
    """Time several functions in round-robin blocks; per function: median, 25th and 75th
    percentile seconds per call, and calls per block.

    Each function gets its own block length (calls per block) so that a 20 us kernel and a 20 ms
    one are both measured over about ``block_seconds`` per block.
    """
    per_block = {name: max(1, round(block_seconds / max(calibrate(fn, warmup), 1e-7)))
                 for name, fn in fns.items()}
    samples: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            reps = per_block[name]
            t0 = time.perf_counter()
            for _ in range(reps):
                fn()
            samples[name].append((time.perf_counter() - t0) / reps)
    result: dict[str, dict[str, float]] = {}
    for name, values in samples.items():
        values.sort()
        q = statistics.quantiles(values, n=4) if len(values) > 1 else [values[0]] * 3
        result[name] = {"median": statistics.median(values), "q1": q[0], "q3": q[2],
                        "calls_per_block": float(per_block[name])}
    return result
