"""N:M (e.g. 2:4, 4:8) linear kernels: each row keeps ``n`` values per group of ``m`` inputs.

The format is an ELL-like layout with a fixed number of slots per row, so no row pointers are
needed and every row has the same work (balanced parallel rows).

* few rows of x (row-vector): ``R`` consecutive output rows are interleaved slot by slot
  (values and positions stored (N/R, slots, R)), so one slot of R rows is one contiguous vector
  of weights; the x values are gathered by (group * m + position).
* the same with AVX-512 and 16-row groups (*window-permute*): TVM scalarizes a vector load at
  non-affine indices (16 scalar loads and inserts per slot), so instead one contiguous window of
  16 x values (16 / m groups) is loaded once and each slot picks its lanes from that register with
  one ``vpermps``. The stored positions are then relative to the window (0..15, still 8-bit).
* many rows of x (M-vector): x transposed to (K, M) and every stored value multiplies a register
  tile of x rows, as in the CSR SpMM kernel, with the column computed from the 8-bit position.
"""

from __future__ import annotations

import numpy as np
from sparsecc.sparsity import PackedNM
from sparsecc.targets.base import Capabilities

from ._common import ACC_SCOPE, drop_param, finish, lanes, mvec_tile, round_up, transpose_pad, untranspose


def _rows_per_vector(n_out: int, v: int) -> int:
    r = v
    while n_out % r:
        r //= 2
    return r


def _uses_row_vector(m: int, caps: Capabilities) -> bool:
    return m < lanes(caps)


#: lanes of the x window the permute schedule selects from (one zmm of f32)
_WINDOW = 16


def _uses_window_permute(m: int, n_out: int, k: int, group: int, caps: Capabilities) -> bool:
    return ("avx512f" in caps.features and lanes(caps) == _WINDOW and _uses_row_vector(m, caps)
            and n_out % _WINDOW == 0 and k % _WINDOW == 0 and _WINDOW % group == 0)


def nm_args(packed: PackedNM, m: int, caps: Capabilities) -> list[np.ndarray]:
    """The arrays :func:`nm_linear`'s kernel takes after x, in order: values (f32) and positions
    (uint8), interleaved by groups of R rows for the row-vector schedule."""
    values = packed.values.astype(np.float32)
    positions = packed.positions.astype(np.uint8)
    if _uses_row_vector(m, caps):
        n_out, slots = values.shape
        r = _rows_per_vector(n_out, lanes(caps))
        if _uses_window_permute(m, n_out, packed.shape[1], packed.m, caps):
            # slot s belongs to group s // n, which is group (s // n) % (16 / m) of its window
            group_in_window = (np.arange(slots) // packed.n) % (_WINDOW // packed.m)
            positions = (positions + (group_in_window * packed.m)[None, :]).astype(np.uint8)
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
        acc = T.decl_buffer((mt, r), "float32", scope=ACC_SCOPE)
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


def _window_permute(m: int, n_out: int, k: int, keep: int, group: int, tile: int, has_bias: bool):
    from tvm.script import tirx as T

    w = _WINDOW
    slots = k // group * keep
    per_window = w // group * keep
    full, tail = divmod(m, tile)

    @T.macro
    def rows(x, values, positions, bias, y, g, m0, mt):
        acc = T.decl_buffer((mt, w), "float32", scope=ACC_SCOPE)
        for mm in T.unroll(mt):
            if has_bias:
                acc[mm, T.Ramp(0, 1, w)] = bias[T.Ramp(g * w, 1, w)]
            else:
                acc[mm, T.Ramp(0, 1, w)] = T.Broadcast(T.float32(0), w)
        for wi in range(k // w):
            for sl in T.unroll(per_window):
                for mm in T.unroll(mt):
                    acc[mm, T.Ramp(0, 1, w)] = acc[mm, T.Ramp(0, 1, w)] + values[
                        g, wi * per_window + sl, T.Ramp(0, 1, w)] * T.call_llvm_pure_intrin(
                        "float32x16", "llvm.x86.avx512.permvar.sf.512", x[m0 + mm, T.Ramp(wi * w, 1, w)],
                        T.Cast("int32x16", positions[g, wi * per_window + sl, T.Ramp(0, 1, w)]))
        for mm in T.unroll(mt):
            y[m0 + mm, T.Ramp(g * w, 1, w)] = acc[mm, T.Ramp(0, 1, w)]

    @T.prim_func
    def kernel(x: T.Buffer((m, k), "float32"), values: T.Buffer((n_out // w, slots, w), "float32"),
               positions: T.Buffer((n_out // w, slots, w), "uint8"),
               bias: T.Buffer((n_out,), "float32"), y: T.Buffer((m, n_out), "float32")):
        for g in T.parallel(n_out // w):
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
                acc = T.decl_buffer((tile,), "float32", scope=ACC_SCOPE)
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
    if _uses_window_permute(m, n_out, k, packed.m, caps):
        tile = max(1, min(m, 8))
        func = _window_permute(m, n_out, k, packed.n, packed.m, tile, has_bias)
        schedule = f"nm-rowvec {packed.n}:{packed.m} rows{_WINDOW} tile{tile} window-permute"
    elif _uses_row_vector(m, caps):
        r = _rows_per_vector(n_out, lanes(caps))
        tile = max(1, min(m, 8))
        func = _row_vector(m, n_out, k, packed.n, packed.m, r, tile, has_bias)
        schedule = f"nm-rowvec {packed.n}:{packed.m} rows{r} tile{tile} gather"
    else:
        func, tile = _m_vector(m, n_out, k, packed.n, packed.m, has_bias, caps)
        schedule = f"nm-mvec {packed.n}:{packed.m} tile{tile}"
    func = func if has_bias else drop_param(func, "bias")
    return finish(func, name, schedule)
