"""Helpers the kernel test modules share: build a PrimFunc for this host, run it, and compare with
the float64 masked-dense reference."""

from __future__ import annotations

import numpy as np
import tvm
from sparsecc.targets import get_target

TARGET = get_target("x86")
DEV = tvm.cpu()


def run_kernel(func, inputs: list[np.ndarray], m: int, n_out: int) -> np.ndarray:
    """Compile ``func`` and call it on ``inputs`` with a NaN-filled (m, n_out) output, so an
    output element the kernel never writes shows up."""
    ex = tvm.compile(func, target=TARGET.tvm_target())
    args = [tvm.runtime.tensor(np.ascontiguousarray(a), DEV) for a in inputs]
    y = tvm.runtime.tensor(np.full((m, n_out), np.nan, np.float32), DEV)
    ex[str(func.attrs["global_symbol"])](*args, y)
    return y.numpy()


def check_close(got: np.ndarray, ref: np.ndarray) -> None:
    scale = max(1.0, float(np.abs(ref).max()))
    np.testing.assert_allclose(got, ref, rtol=1e-4, atol=1e-4 * scale)


def reference(x: np.ndarray, w: np.ndarray, bias: np.ndarray | None) -> np.ndarray:
    ref = x.astype(np.float64) @ w.astype(np.float64).T
    return ref + bias if bias is not None else ref


def awkward_rows(w: np.ndarray, rng) -> np.ndarray:
    """An empty row, a fully dense row, rows with one nonzero in the first / last column."""
    n_out, k = w.shape
    w[1] = 0
    w[2] = rng.standard_normal(k)
    w[3] = 0
    w[3, 0] = 1.5
    w[4] = 0
    w[4, k - 1] = -2.0
    return w
