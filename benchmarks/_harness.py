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
import sys
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


def interleave(fns: dict[str, Callable[[], Any]], **options: Any) -> dict[str, dict[str, float]]:
    """Round-robin timing, from the package so the demo, examples and benchmarks measure one way.
    Imported here, not at module top, so :func:`pin_threads` can run before torch loads."""
    from sparsecc.timing import interleave as package_interleave

    return package_interleave(fns, **options)
