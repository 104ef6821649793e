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
    :func:`configure_torch` and :func:`ort_session_options`).

    With more than one thread, no pool may spin: TVM's workers spin-wait for the next parallel
    region by default, and so do ONNX Runtime's and OpenMP's, so in an interleaved comparison the
    runtime timed second finds the cores still busy with the first one's spinning workers (2
    threads, M = 1: ORT timed 2-3x slower next to TVM than alone). Every pool sleeps between
    regions instead, alike for all runtimes.
    """
    value = str(threads)
    for var in ("TVM_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        os.environ[var] = value
    if threads > 1:
        os.environ["TVM_THREAD_POOL_SPIN_COUNT"] = "0"
        os.environ["OMP_WAIT_POLICY"] = "PASSIVE"


def ort_session_options(threads: int) -> Any:
    """ONNX Runtime session options for a benchmark: ``threads`` intra-op threads, one inter-op,
    sequential, all graph optimizations, and no spinning when there is more than one thread (see
    :func:`pin_threads`)."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    if threads > 1:
        opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return opts


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


def machine_peaks(threads: int) -> dict[str, float]:
    """This machine's bars for reading achieved numbers against: DRAM copy bandwidth (numpy, one
    256 MiB array, read + write bytes counted), the fp32 FMA peak of the probed vector width
    (2 FMA units per core at the clock /proc/cpuinfo reports) and ONNX Runtime's dense GEMM
    (2048^3) at ``threads`` threads."""
    import time

    import numpy as np
    from sparsecc.targets.x86 import capabilities, cpu_ghz

    src = np.ones(64 * 1024 * 1024, np.float32)
    dst = np.empty_like(src)
    best = float("inf")
    for _ in range(5):
        start = time.perf_counter()
        np.copyto(dst, src)
        best = min(best, time.perf_counter() - start)
    caps = capabilities()
    fma_peak = caps.vector_lanes_f32 * 2 * 2 * cpu_ghz() * threads

    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    n = 2048
    w = np.random.default_rng(0).standard_normal((n, n)).astype(np.float32)
    graph = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["y"])], "gemm",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [n, n])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [n, n])],
                              initializer=[numpy_helper.from_array(w, "w")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 9
    sess = ort.InferenceSession(model.SerializeToString(), ort_session_options(threads),
                                providers=["CPUExecutionProvider"])
    x = w.copy()
    sess.run(None, {"x": x})
    gemm = float("inf")
    for _ in range(3):
        start = time.perf_counter()
        sess.run(None, {"x": x})
        gemm = min(gemm, time.perf_counter() - start)
    return {"dram_copy_gbs": 2 * src.nbytes / best / 1e9, "fma_peak_gflops": fma_peak,
            "ort_gemm_gflops": 2 * n ** 3 / gemm / 1e9}
