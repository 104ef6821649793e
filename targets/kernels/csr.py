"""Compressed-sparse-row (CSR) linear kernels: y = x @ W.T + b for unstructured sparsity.

* M = 1 (SpMV): rows run in parallel; the nonzeros of a row are consumed a vector at a time (the
  x values are gathered by column index) into a vector accumulator, so a row has ``lanes``
  independent multiply-add chains instead of one scalar chain; the ragged end of the row is a
  scalar loop and the vector is summed once per row.
* M > 1 (SpMM): x is transposed per tile of up to 64 rows so every nonzero multiplies a contiguous
  register tile of x rows (4 zmm). The nonzeros are regrouped into blocks of K columns (see
  :func:`_spmm_plan`) so the transposed-x panel a block reads stays in L1; chunks of output rows run
  in parallel, keep their accumulators in an L1 scratch across K blocks, and write y through a
  16 x 16 register transpose. Column indices are uint16 when K allows.
"""

from __future__ import annotations

import numpy as np
from sparsecc.sparsity import PackedCSR
from sparsecc.targets.base import Capabilities

from ._common import ACC_SCOPE, ceil_div, drop_param, finish, lanes, pow2_at_least, round_up

#: L1 bytes the SpMM's transposed-x panel of one K block may take (see :func:`_spmm_plan`)
_PANEL_BYTES = 24 * 1024
#: nonzeros a row should have per K block, on average, for the block to pay for itself
_NNZ_PER_BLOCK_ROW = 32


def _spmm_plan(m: int, k: int, n_out: int, nnz: int, caps: Capabilities | None) -> tuple[int, int]:
    """(tile, kblock) of the SpMM: ``tile`` x rows per register tile and ``kblock`` input columns
    per block of the CSR.

    Every stored weight multiplies a ``tile``-wide row of transposed x. Without blocking K that
    row comes from a K x tile panel far larger than L1 (393 KB at K = 768, M = 128), and the
    L2 -> L1 traffic of one 4*tile-byte row per nonzero bounds the kernel (50 % sparse: 1.5x
    slower than with blocks of 96 columns). But every (block, row) pair costs a load and store of
    the accumulator and a mispredicted loop exit, which dominated at 90 % with 96-column blocks
    (10 nonzeros each). So a block is as wide as a 24 KiB (half of L1) panel allows, widened
    until a row has about 32 nonzeros in it; blocks are made equal so none is a tiny remainder.
    """
    v = max(4, caps.vector_lanes_f32) if caps is not None else 16
    # 4 vector registers of accumulators per nonzero (8 measured no faster).
    tile = min(round_up(m, v), 4 * v) if m >= v else pow2_at_least(m, 4)
    density = nnz / max(1, n_out * k)
    want = max(_PANEL_BYTES // (4 * tile), int(_NNZ_PER_BLOCK_ROW / max(density, 1e-6)))
    nkb = max(1, ceil_div(k, max(16, want)))
    return tile, round_up(ceil_div(k, nkb), 16)


def _index_dtype(k: int) -> str:
    # 2-byte column indices halve the index stream when they fit.
    return "uint16" if k <= 65536 else "int32"


def csr_args(packed: PackedCSR, m: int, caps: Capabilities | None = None) -> list[np.ndarray]:
    """The arrays :func:`csr_linear`'s kernel takes after x, in order (indptr, indices, data).

    For M > 1 the nonzeros are regrouped by K block (see :func:`_spmm_plan`): block ``b``'s
    rows come one after another, so ``indptr`` has ``nblocks * N + 1`` entries and row ``n`` of
    block ``b`` is ``[indptr[b * N + n], indptr[b * N + n + 1])``. ``caps`` must be the one
    :func:`csr_linear` got (the block size depends on the vector width).
    """
    n_out, k = packed.shape
    indptr = packed.indptr.astype(np.int32)
    indices = packed.indices.astype(np.int64)
    data = packed.data.astype(np.float32)
    if m > 1:
        _, kblock = _spmm_plan(m, k, n_out, packed.nnz, caps)
        nkb = ceil_div(k, kblock)
        rows = np.repeat(np.arange(n_out, dtype=np.int64), np.diff(packed.indptr))
        key = (indices // kblock) * n_out + rows
        # Stable: within a (block, row) the columns stay sorted.
        order = np.argsort(key, kind="stable")
        indices, data = indices[order], data[order]
        counts = np.bincount(key, minlength=nkb * n_out)
        indptr = np.concatenate([[0], np.cumsum(counts)]).astype(np.int32)
        idx_dtype = _index_dtype(k)
    else:
        idx_dtype = "int32"
    indices = indices.astype(idx_dtype)
    if packed.nnz == 0:
        # Kernels declare at least one stored element; it is never read (every row is empty).
        indices = np.zeros(1, idx_dtype)
        data = np.zeros(1, np.float32)
    return [indptr, indices, data]


def _spmv(n_out: int, k: int, nnz: int, has_bias: bool, v: int):
    from tvm.script import tirx as T

    nz = max(nnz, 1)

    @T.prim_func
    def kernel(x: T.Buffer((1, k), "float32"), indptr: T.Buffer((n_out + 1,), "int32"),
               indices: T.Buffer((nz,), "int32"), data: T.Buffer((nz,), "float32"),
               bias: T.Buffer((n_out,), "float32"), y: T.Buffer((1, n_out), "float32")):
        for n in T.parallel(n_out):
            acc = T.decl_buffer((v,), "float32", scope=ACC_SCOPE)
            tot = T.decl_buffer((1,), "float32", scope=ACC_SCOPE)
            for lane in T.vectorized(v):
                acc[lane] = T.float32(0)
            p0 = T.meta_var(indptr[n])
            count = T.meta_var(indptr[n + 1] - indptr[n])
            for q in range(count // v):
                for lane in T.vectorized(v):
                    acc[lane] = acc[lane] + data[p0 + q * v + lane] * x[0, indices[p0 + q * v + lane]]
            if has_bias:
                tot[0] = bias[n]
            else:
                tot[0] = T.float32(0)
            for p in range(p0 + count // v * v, indptr[n + 1]):
                tot[0] = tot[0] + data[p] * x[0, indices[p]]
            for lane in T.unroll(v):
                tot[0] = tot[0] + acc[lane]
            y[0, n] = tot[0]

    return kernel


def _shuffle_lanes(bit: int, upper: bool) -> list[int]:
    """Lanes of the two-source shuffle (lanes 0-15 from the lower row of a pair, 16-31 from the
    upper) that swaps row-index bit ``bit`` with column-index bit ``bit`` of a 16 x 16 block: four
    such stages (bits 0..3) transpose it."""
    s = 1 << bit
    if upper:
        return [16 + c if c & s else c ^ s for c in range(16)]
    return [16 + (c ^ s) if c & s else c for c in range(16)]


def _spmm(m: int, n_out: int, k: int, nnz: int, has_bias: bool, tile: int, kblock: int, idx_dtype: str,
          chunk: int | None = None):
    from tvm.script import tirx as T

    nz = max(nnz, 1)
    n_mt = ceil_div(m, tile)
    nkb = ceil_div(k, kblock)
    # Output rows per chunk: the chunk's accumulator rows (chunk x tile floats, 16 KiB) stay in L1
    # beside the x panel while every K block adds into them.
    if chunk is None:
        chunk = max(16, min(round_up(n_out, 16), (16 * 1024 // (4 * tile)) // 16 * 16))
    n_chunks = ceil_div(n_out, chunk)
    full, tail = divmod(n_out, chunk)
    strips = ceil_div(k, 16)

    # Row pairs of stage ``bit`` < 3 lie within one half of the block, stage 3 pairs row i of the
    # lower half with row i of the upper. Halves are separate (8 x 16) buffers: TVM gives a buffer
    # of 1 KiB or more heap workspace instead of a stack slot, and LLVM only keeps stack slots in
    # registers.
    @T.macro
    def _stage_within(src, dst, bit):
        for i in T.unroll(4):
            lo = T.meta_var((i // (1 << bit)) * (2 << bit) + i % (1 << bit))
            a = T.meta_var(src[lo, T.Ramp(0, 1, 16)])
            b = T.meta_var(src[lo + (1 << bit), T.Ramp(0, 1, 16)])
            dst[lo, T.Ramp(0, 1, 16)] = T.Shuffle([a, b], _shuffle_lanes(bit, False))
            dst[lo + (1 << bit), T.Ramp(0, 1, 16)] = T.Shuffle([a, b], _shuffle_lanes(bit, True))

    @T.macro
    def _stage_across(src_lo, src_hi, dst_lo, dst_hi):
        for i in T.unroll(8):
            a = T.meta_var(src_lo[i, T.Ramp(0, 1, 16)])
            b = T.meta_var(src_hi[i, T.Ramp(0, 1, 16)])
            dst_lo[i, T.Ramp(0, 1, 16)] = T.Shuffle([a, b], _shuffle_lanes(3, False))
            dst_hi[i, T.Ramp(0, 1, 16)] = T.Shuffle([a, b], _shuffle_lanes(3, True))

    @T.macro
    def _store_row(src, bias, y, row, col, j):
        if row < m:
            if has_bias:
                y[row, T.Ramp(col, 1, 16)] = src[j, T.Ramp(0, 1, 16)] + bias[T.Ramp(col, 1, 16)]
            else:
                y[row, T.Ramp(col, 1, 16)] = src[j, T.Ramp(0, 1, 16)]

    @T.macro
    def _store_one(yt, bias, y, row, col0, r, mm):
        if has_bias:
            y[row, col0 + r] = yt[r, mm] + bias[col0 + r]
        else:
            y[row, col0 + r] = yt[r, mm]

    @T.macro
    def do_chunk(x, xt, indptr, indices, data, bias, y, c, rows):
        yt = T.decl_buffer((rows, tile), "float32", scope=ACC_SCOPE)
        for mt in range(n_mt):
            for r in range(rows):
                for v in T.vectorized(tile):
                    yt[r, v] = T.float32(0)
            for kb in range(nkb):
                for r in range(rows):
                    acc = T.decl_buffer((tile,), "float32", scope=ACC_SCOPE)
                    for v in T.vectorized(tile):
                        acc[v] = yt[r, v]
                    row = T.meta_var(kb * n_out + c * chunk + r)
                    for p in range(indptr[row], indptr[row + 1]):
                        for v in T.vectorized(tile):
                            acc[v] = acc[v] + data[p] * xt[mt, T.Cast("int32", indices[p]), v]
                    for v in T.vectorized(tile):
                        yt[r, v] = acc[v]
            if rows % 16 == 0 and tile % 16 == 0:
                # yt holds y^T: transpose it 16 x 16 in registers (64 two-source shuffles per block)
                # so every y row gets 16-wide stores; reading yt with stride ``tile`` instead cost
                # one insert per element, about half the kernel's time at 90 % sparsity.
                for rb in range(rows // 16):
                    for mb in range(tile // 16):
                        if mt * tile + mb * 16 < m:
                            lo0 = T.decl_buffer((8, 16), "float32", scope=ACC_SCOPE)
                            hi0 = T.decl_buffer((8, 16), "float32", scope=ACC_SCOPE)
                            lo1 = T.decl_buffer((8, 16), "float32", scope=ACC_SCOPE)
                            hi1 = T.decl_buffer((8, 16), "float32", scope=ACC_SCOPE)
                            for i in T.unroll(8):
                                lo0[i, T.Ramp(0, 1, 16)] = yt[rb * 16 + i, T.Ramp(mb * 16, 1, 16)]
                                hi0[i, T.Ramp(0, 1, 16)] = yt[rb * 16 + 8 + i, T.Ramp(mb * 16, 1, 16)]
                            _stage_within(lo0, lo1, 0)
                            _stage_within(hi0, hi1, 0)
                            _stage_within(lo1, lo0, 1)
                            _stage_within(hi1, hi0, 1)
                            _stage_within(lo0, lo1, 2)
                            _stage_within(hi0, hi1, 2)
                            _stage_across(lo1, hi1, lo0, hi0)
                            for j in T.unroll(8):
                                _store_row(lo0, bias, y, mt * tile + mb * 16 + j, c * chunk + rb * 16, j)
                                _store_row(hi0, bias, y, mt * tile + mb * 16 + 8 + j, c * chunk + rb * 16, j)
            else:
                # Narrow tiles (few x rows) or a ragged last chunk: read yt strided, 16 rows at a
                # time (one vector of all ``rows`` took LLVM minutes to compile at 512).
                for mm in range(T.min(tile, m - mt * tile)):
                    for rb in range(rows // 16):
                        for r in T.vectorized(16):
                            _store_one(yt, bias, y, mt * tile + mm, c * chunk, rb * 16 + r, mm)
                    for r in range(rows % 16):
                        _store_one(yt, bias, y, mt * tile + mm, c * chunk, rows // 16 * 16 + r, mm)

    @T.prim_func
    def kernel(x: T.Buffer((m, k), "float32"), indptr: T.Buffer((nkb * n_out + 1,), "int32"),
               indices: T.Buffer((nz,), idx_dtype), data: T.Buffer((nz,), "float32"),
               bias: T.Buffer((n_out,), "float32"), y: T.Buffer((m, n_out), "float32")):
        # x transposed per tile of rows: xt[t, col, :] is a contiguous vector of x[t*tile : (t+1)*tile, col].
        xt = T.decl_buffer((n_mt, k, tile), "float32")
        for s in T.parallel(n_mt * strips):
            for mm in range(tile):
                for kk in range(16):
                    if (s % strips) * 16 + kk < k:
                        if (s // strips) * tile + mm < m:
                            xt[s // strips, (s % strips) * 16 + kk, mm] = x[(s // strips) * tile + mm,
                                                                            (s % strips) * 16 + kk]
                        else:
                            xt[s // strips, (s % strips) * 16 + kk, mm] = T.float32(0)
        for c in T.parallel(n_chunks):
            if c < full:
                do_chunk(x, xt, indptr, indices, data, bias, y, c, chunk)
            else:
                do_chunk(x, xt, indptr, indices, data, bias, y, c, max(tail, 1))

    return kernel


def csr_linear(m: int, packed: PackedCSR, has_bias: bool, caps: Capabilities,
               name: str = "sparse_linear_csr"):
    """Scheduled TIR PrimFunc for y = x @ W.T (+ b) with W in CSR (arrays from :func:`csr_args`).

    Parameters of the PrimFunc: x (m, K) f32, indptr (N+1,), indices (nnz,), data, [bias (N,)],
    y (m, N) f32.
    """
    n_out, k = packed.shape
    if m == 1:
        v = lanes(caps)
        func = _spmv(n_out, k, packed.nnz, has_bias, v)
        func = func if has_bias else drop_param(func, "bias")
        return finish(func, name, f"csr-spmv gather{v}")
    tile, kblock = _spmm_plan(m, k, n_out, packed.nnz, caps)
    idx_dtype = _index_dtype(k)
    func = _spmm(m, n_out, k, packed.nnz, has_bias, tile, kblock, idx_dtype)
    func = func if has_bias else drop_param(func, "bias")
    return finish(func, name, f"csr-spmm tile{tile} kblock{kblock} {idx_dtype}")
