"""Block-sparse-row (BSR) linear kernels: y = x @ W.T + b with W cut into r x c blocks.

Two schedules:

* *row-vector* (r a multiple of the vector width, or few rows of x): the r output rows of a block
  live in one vector; for each stored block every x row broadcasts one scalar per block column and
  does one fused multiply-add. The weights are read once per tile of x rows and x needs no copy.
* *M-vector* (narrow blocks with many x rows): x is first transposed into a (K, M) scratch so
  that one input column of x is a contiguous vector of M values; each stored weight is broadcast
  and multiplies a register tile of ``tile`` x rows. CSR is the 1 x 1 case of this schedule.

Blocks are stored (nblocks, c, r) (transposed from the packed (nblocks, r, c)) so the r values of a
block column are one contiguous vector load.
"""

from __future__ import annotations

import numpy as np
from sparsecc.sparsity import PackedBSR
from sparsecc.targets.base import Capabilities

from ._common import ACC_SCOPE, ceil_div, drop_param, finish, lanes, mvec_tile, round_up, transpose_pad, untranspose


def bsr_args(packed: PackedBSR, m: int = 1, caps: Capabilities | None = None) -> list[np.ndarray]:
    """The arrays :func:`bsr_linear`'s kernel takes after x, in order: indptr, indices and the
    blocks transposed to (nblocks, c, r)."""
    r, c = packed.block
    data = np.ascontiguousarray(packed.data.transpose(0, 2, 1), dtype=np.float32)
    indices = packed.indices.astype(np.int32)
    if indices.shape[0] == 0:
        # Kernels declare at least one stored block; it is never read (every block row is empty).
        indices = np.zeros(1, np.int32)
        data = np.zeros((1, c, r), np.float32)
    return [packed.indptr.astype(np.int32), indices, data]


def _row_vector(m: int, n_out: int, k: int, r: int, c: int, nblocks: int, has_bias: bool,
                tile: int, name: str):
    from tvm.script import tirx as T

    nbr = n_out // r
    full, tail = divmod(m, tile)
    # nblocks may be 0; a zero-length buffer is still a valid parameter but keep extents >= 1.
    nbl = max(nblocks, 1)

    @T.macro
    def block_row(x, indptr, indices, data, bias, y, br, m0, mt):
        acc = T.decl_buffer((mt, r), "float32", scope=ACC_SCOPE)
        for mm in T.unroll(mt):
            for i in T.vectorized(r):
                if has_bias:
                    acc[mm, i] = bias[br * r + i]
                else:
                    acc[mm, i] = T.float32(0)
        for b in range(indptr[br], indptr[br + 1]):
            for j in T.unroll(c):
                for mm in T.unroll(mt):
                    for i in T.vectorized(r):
                        acc[mm, i] = acc[mm, i] + data[b, j, i] * x[m0 + mm, indices[b] * c + j]
        for mm in T.unroll(mt):
            for i in T.vectorized(r):
                y[m0 + mm, br * r + i] = acc[mm, i]

    @T.prim_func
    def kernel(x: T.Buffer((m, k), "float32"), indptr: T.Buffer((nbr + 1,), "int32"),
               indices: T.Buffer((nbl,), "int32"), data: T.Buffer((nbl, c, r), "float32"),
               bias: T.Buffer((n_out,), "float32"), y: T.Buffer((m, n_out), "float32")):
        for br in T.parallel(nbr):
            for mt in range(full):
                block_row(x, indptr, indices, data, bias, y, br, mt * tile, tile)
            if tail > 0:
                block_row(x, indptr, indices, data, bias, y, br, full * tile, tail)

    return kernel


def blockrow_mvec(m: int, n_out: int, k: int, r: int, c: int, nblocks: int, has_bias: bool,
                  caps: Capabilities, name: str):
    """M-vectorized block-row kernel (see module doc); also serves CSR as r = c = 1.

    Parameters: x (m, k), indptr (n_out/r + 1,), indices (nblocks,), data (nblocks, c, r),
    [bias (n_out,)], y (m, n_out).
    """
    from tvm.script import tirx as T

    nbr = n_out // r
    # Rows of a block handled per pass over the block row: all of them, except for tall blocks
    # (16 x 1, 32 x 1) taken 8 rows at a time, so the accumulators (8 x tile) span two vectors of x
    # rows: 8 weight broadcasts and 2 loads of x per 16 multiply-adds instead of 16 + 1.
    rc = 8 if r > 8 and r % 8 == 0 else r
    n_chunks = r // rc
    tile = mvec_tile(m, rc, caps)
    mp = round_up(m, tile)
    n_tiles = mp // tile
    nbl = max(nblocks, 1)
    transpose = transpose_pad(m, k, mp)
    copy_out = untranspose(m, n_out, mp, has_bias, lanes(caps))

    @T.prim_func
    def kernel(x: T.Buffer((m, k), "float32"), indptr: T.Buffer((nbr + 1,), "int32"),
               indices: T.Buffer((nbl,), "int32"), data: T.Buffer((nbl, c, r), "float32"),
               bias: T.Buffer((n_out,), "float32"), y: T.Buffer((m, n_out), "float32")):
        xt = T.decl_buffer((k, mp), "float32")
        yt = T.decl_buffer((n_out, mp), "float32")
        transpose(x, xt)
        for br in T.parallel(nbr):
            for ch in range(n_chunks):
                for t in range(n_tiles):
                    acc = T.decl_buffer((rc, tile), "float32", scope=ACC_SCOPE)
                    for i in T.unroll(rc):
                        for v in T.vectorized(tile):
                            acc[i, v] = T.float32(0)
                    for b in range(indptr[br], indptr[br + 1]):
                        for j in T.unroll(c):
                            for i in T.unroll(rc):
                                for v in T.vectorized(tile):
                                    acc[i, v] = acc[i, v] + data[b, j, ch * rc + i] * xt[indices[b] * c + j,
                                                                                         t * tile + v]
                    for i in T.unroll(rc):
                        for v in T.vectorized(tile):
                            yt[br * r + ch * rc + i, t * tile + v] = acc[i, v]
        copy_out(yt, bias, y)

    func = kernel if has_bias else drop_param(kernel, "bias")
    chunks = f" rows{rc}x{n_chunks}" if n_chunks > 1 else ""
    return finish(func, name, f"bsr-mvec r{r}c{c}{chunks} tile{tile} mpad{mp}")


def bsr_linear(m: int, packed: PackedBSR, has_bias: bool, caps: Capabilities,
               name: str = "sparse_linear_bsr"):
    """Scheduled TIR PrimFunc for y = x @ W.T (+ b) with W in BSR (see :func:`bsr_args`).

    Parameters of the PrimFunc: x (m, K) f32, indptr, indices, data (nblocks, c, r), [bias (N,)],
    y (m, N) f32.
    """
    n_out, k = packed.shape
    r, c = packed.block
    nblocks = int(packed.indices.shape[0])
    v = lanes(caps)
    # Tall blocks (r a multiple of the vector) at two vectors of x rows or more, with long rows of
    # x: the M-vector schedule in row chunks. The row-vector one broadcasts each x value from its
    # own row, rows 4 KiB apart at K = 1024 that all fall in one L1 set; interleaved timings at
    # AVX-512, 70 % 16x1: 1.33x at 32x1024 -> 512, 1.31x at 64, 1.10x at 128; 1.05x at 64x256,
    # but 0.44x at 1024x64 -> 64 (short rows stay in L1, and transposing x and y costs more than
    # the multiply), hence the K bound.
    mvec_tall = r % v == 0 and m >= 2 * v and k >= 256
    if not mvec_tall and (r % v == 0 or m < v or r * 2 > v and m < 2 * v):
        # Accumulators: tile x (r / v) vectors; keep them near 16 registers.
        tile = max(1, min(m, 16 // max(1, ceil_div(r, v))))
        func = _row_vector(m, n_out, k, r, c, nblocks, has_bias, tile, name)
        func = func if has_bias else drop_param(func, "bias")
        return finish(func, name, f"bsr-rowvec r{r}c{c} tile{tile}")
    return blockrow_mvec(m, n_out, k, r, c, nblocks, has_bias, caps, name)
