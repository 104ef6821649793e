"""Dense linear kernel (GEMM / GEMV) for layers kept dense: y = x @ W.T + b.

The weight is re-laid out at build time into panels of ``nr`` output features, ``(N/nr, K, nr)``
(zero-padded), so the inner loop reads one contiguous vector of ``nr`` weights per input column.
A register tile of ``mr`` x rows x ``nr`` outputs accumulates over a block of ``kc`` input
columns (the panel block stays in L1/L2 while every x tile passes over it); panels run in
parallel. At M = 1 the tile is one row wide and ``nr`` is several vectors, which gives several
independent multiply-add chains while the weight streams from memory.
"""

from __future__ import annotations

import numpy as np
from sparsecc.targets.base import Capabilities

from ._common import ACC_SCOPE, ceil_div, drop_param, finish, lanes


def dense_params(m: int, caps: Capabilities) -> tuple[int, int, int]:
    """(mr, nr, kc): rows of x per register tile, outputs per panel, inputs per K block."""
    v = lanes(caps)
    if m < 4:
        return m, 4 * v, 1 << 30
    return 6, 2 * v, 256


def dense_args(weight: np.ndarray, m: int, caps: Capabilities) -> list[np.ndarray]:
    """The packed weight panels (N/nr, K, nr) the dense kernel takes after x."""
    _, nr, _ = dense_params(m, caps)
    n_out, k = weight.shape
    panels = ceil_div(n_out, nr)
    padded = np.zeros((panels * nr, k), np.float32)
    padded[:n_out] = weight
    return [np.ascontiguousarray(padded.reshape(panels, nr, k).transpose(0, 2, 1))]


def dense_linear(m: int, shape: tuple[int, int], has_bias: bool, caps: Capabilities,
                 name: str = "dense_linear"):
    """Scheduled TIR PrimFunc for a dense linear of weight ``shape`` (N, K).

    Parameters: x (m, K) f32, panels (N/nr, K, nr) f32 from :func:`dense_args`, [bias (N,)],
    y (m, N) f32.
    """
    from tvm.script import tirx as T

    n_out, k = shape
    mr, nr, kc = dense_params(m, caps)
    kc = min(kc, k)
    n_kb = ceil_div(k, kc)
    full_panels, tail_n = divmod(n_out, nr)
    panels = ceil_div(n_out, nr)
    full_m, tail_m = divmod(m, mr)

    @T.macro
    def tile(x, wp, bias, y, nb, kb, m0, rows, cols):
        acc = T.decl_buffer((rows, cols), "float32", scope=ACC_SCOPE)
        if kb == 0:
            for mm in T.unroll(rows):
                for i in T.vectorized(cols):
                    if has_bias:
                        acc[mm, i] = bias[nb * nr + i]
                    else:
                        acc[mm, i] = T.float32(0)
        else:
            for mm in T.unroll(rows):
                for i in T.vectorized(cols):
                    acc[mm, i] = y[m0 + mm, nb * nr + i]
        for kk in range(T.min(kc, k - kb * kc)):
            for mm in T.unroll(rows):
                for i in T.vectorized(cols):
                    acc[mm, i] = acc[mm, i] + x[m0 + mm, kb * kc + kk] * wp[nb, kb * kc + kk, i]
        for mm in T.unroll(rows):
            for i in T.vectorized(cols):
                y[m0 + mm, nb * nr + i] = acc[mm, i]

    @T.macro
    def panel(x, wp, bias, y, nb, cols):
        for kb in range(n_kb):
            for mt in range(full_m):
                tile(x, wp, bias, y, nb, kb, mt * mr, mr, cols)
            if tail_m > 0:
                tile(x, wp, bias, y, nb, kb, full_m * mr, tail_m, cols)

    @T.prim_func
    def kernel(x: T.Buffer((m, k), "float32"), wp: T.Buffer((panels, k, nr), "float32"),
               bias: T.Buffer((n_out,), "float32"), y: T.Buffer((m, n_out), "float32")):
        for nb in T.parallel(full_panels):
            panel(x, wp, bias, y, nb, nr)
        if tail_n > 0:
            panel(x, wp, bias, y, full_panels, tail_n)

    func = kernel if has_bias else drop_param(kernel, "bias")
    return finish(func, name, f"dense-panels mr{mr} nr{nr} kc{min(kc, k)}")
