"""N:M (e.g. 2:4, 4:8) linear kernels: each row keeps ``n`` values per group of ``m`` inputs.

The format is an ELL-like layout with a fixed number of slots per row, so no row pointers are
needed and every row has the same work (balanced parallel rows).

* few rows of x (row-vector): ``R`` consecutive output rows are interleaved slot by slot
  (values and positions stored (N/R, slots, R)), so one slot of R rows is one contiguous vector
  of weights; the x values are gathered by (group * m + position).
* many rows of x (M-vector): x transposed to (K, M) and every stored value multiplies a register
  tile of x rows, as in the CSR SpMM kernel, with the column computed from the 8-bit position.
"""

from __future__ import annotations

import numpy as np
from sparsecc.sparsity import PackedNM
from sparsecc.targets.base import Capabilities

from ._common import drop_param, finish, lanes, mvec_tile, round_up, transpose_pad, untranspose


def _rows_per_vector(n_out: int, v: int) -> int:
    r = v
    while n_out % r:
        r //= 2
    return r


def _uses_row_vector(m: int, caps: Capabilities) -> bool:
    return m < lanes(caps)


def nm_args(packed: PackedNM, m: int, caps: Capabilities) -> list[np.ndarray]:
    """The arrays :func:`nm_linear`'s kernel takes after x, in order: values (f32) and positions
    (uint8), interleaved by groups of R rows for the row-vector schedule."""
    values = packed.values.astype(np.float32)
    positions = packed.positions.astype(np.uint8)
    if _uses_row_vector(m, caps):
        n_out, slots = values.shape
        r = _rows_per_vector(n_out, lanes(caps))
        values = values.reshape(n_out // r, r, slots).transpose(0, 2, 1)
        positions = positions.reshape(n_out // r, r, slots).transpose(0, 2, 1)
    return [np.ascontiguousarray(values), np.ascontiguousarray(positions)]


def _row_vector(m: int, n_out: int, k: int, keep: int, group: int, r: int, tile: int, has_bias: bool):
    from tvm.script import tirx as T

    groups = k // group
    slots = groups * keep
    full, tail = divmod(m, tile)

    @T.macro
    def rows(x, values, positions, bias, y, g, m0, mt):
        acc = T.decl_buffer((mt, r), "float32", scope="local")
        for mm in T.unroll(mt):
            for i in T.vectorized(r):
                if has_bias:
                    acc[mm, i] = bias[g * r + i]
                else:
                    acc[mm, i] = T.float32(0)
        for gr in range(groups):
            for sl in T.unroll(keep):
                for mm in T.unroll(mt):
                    for i in T.vectorized(r):
                        acc[mm, i] = acc[mm, i] + values[g, gr * keep + sl, i] * x[
                            m0 + mm, gr * group + T.Cast("int32", positions[g, gr * keep + sl, i])]
        for mm in T.unroll(mt):
            for i in T.vectorized(r):
                y[m0 + mm, g * r + i] = acc[mm, i]

    @T.prim_func
    def kernel(x: T.Buffer((m, k), "float32"), values: T.Buffer((n_out // r, slots, r), "float32"),
               positions: T.Buffer((n_out // r, slots, r), "uint8"),
               bias: T.Buffer((n_out,), "float32"), y: T.Buffer((m, n_out), "float32")):
        for g in T.parallel(n_out // r):
            for t in range(full):
                rows(x, values, positions, bias, y, g, t * tile, tile)
            if tail > 0:
                rows(x, values, positions, bias, y, g, full * tile, tail)

    return kernel


def _m_vector(m: int, n_out: int, k: int, keep: int, group: int, has_bias: bool, caps: Capabilities):
    from tvm.script import tirx as T

    groups = k // group
    slots = groups * keep
    tile = mvec_tile(m, 1, caps)
    mp = round_up(m, tile)
    transpose = transpose_pad(m, k, mp)
    copy_out = untranspose(m, n_out, mp, has_bias, lanes(caps))

    @T.prim_func
    def kernel(x: T.Buffer((m, k), "float32"), values: T.Buffer((n_out, slots), "float32"),
               positions: T.Buffer((n_out, slots), "uint8"),
               bias: T.Buffer((n_out,), "float32"), y: T.Buffer((m, n_out), "float32")):
        xt = T.decl_buffer((k, mp), "float32")
        yt = T.decl_buffer((n_out, mp), "float32")
        transpose(x, xt)
        for n in T.parallel(n_out):
            for t in range(mp // tile):
                acc = T.decl_buffer((tile,), "float32", scope="local")
                for v in T.vectorized(tile):
                    acc[v] = T.float32(0)
                for gr in range(groups):
                    for sl in T.unroll(keep):
                        for v in T.vectorized(tile):
                            acc[v] = acc[v] + values[n, gr * keep + sl] * xt[
                                gr * group + T.Cast("int32", positions[n, gr * keep + sl]), t * tile + v]
                for v in T.vectorized(tile):
                    yt[n, t * tile + v] = acc[v]
        copy_out(yt, bias, y)

    return kernel, tile


def nm_linear(m: int, packed: PackedNM, has_bias: bool, caps: Capabilities,
              name: str = "sparse_linear_nm"):
    """Scheduled TIR PrimFunc for y = x @ W.T (+ b) with W in N:M form (arrays from
    :func:`nm_args`). Parameters: x (m, K) f32, values, positions (uint8), [bias (N,)], y (m, N)."""
    n_out, k = packed.shape
    if _uses_row_vector(m, caps):
        r = _rows_per_vector(n_out, lanes(caps))
        tile = max(1, min(m, 8))
        func = _row_vector(m, n_out, k, packed.n, packed.m, r, tile, has_bias)
        schedule = f"nm-rowvec {packed.n}:{packed.m} rows{r} tile{tile} gather"
    else:
        func, tile = _m_vector(m, n_out, k, packed.n, packed.m, has_bias, caps)
        schedule = f"nm-mvec {packed.n}:{packed.m} tile{tile}"
    func = func if has_bias else drop_param(func, "bias")
    return finish(func, name, schedule)
