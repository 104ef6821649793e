"""Block-sparse-row (BSR) linear kernels: y = x @ W.T + b with W cut into r x c blocks.

Three schedule families (:class:`BSRSchedule`):

* *rowvec* (few rows of x, M = 1 above all): the r output rows of a block live in one vector (two
  for r = 32); for each stored block every x row broadcasts one scalar per block column straight
  from x and does one fused multiply-add. At M = 1 one accumulator would make a block row one
  chain of dependent FMAs (4 cycles each), so the blocks are dealt round-robin to ``chains``
  independent accumulators that are summed at the end of the block row.
* *rowvec-xt* (M > 1): the same register tile of ``tile`` x rows times the r outputs of a block,
  but x is first copied into tiles xt (M / tile, K, tile), so the ``tile`` values a block column
  broadcasts are one contiguous run instead of ``tile`` loads a whole x row apart (rows 4 KiB
  apart at K = 1024 all fall in one L1 set).
* *rowvec-xe* (narrow blocks, r < the vector width, M > 1): one vector holds g = lanes / r x rows
  times the r outputs, so a 4-row block column is not a 4-lane multiply-add per x row. x is copied
  into xe, each value repeated over r lanes, so a whole vector of x operands is one aligned load;
  the r weights of a block column are broadcast to the g lane groups (one ``vbroadcastf32x4``).
* *mvec* (narrow blocks with many x rows): x is transposed into a (K, M) scratch so that one input
  column of x is a contiguous vector of M values; each stored weight is broadcast and multiplies a
  register tile of ``tile`` x rows.

Blocks are stored (nblocks, c, r) (transposed from the packed (nblocks, r, c)) so the r values of a
block column are one contiguous vector load. Block-column indices are uint16 when K / c allows
(half the index bytes of int32). When the blocks do not fit in L2, the rowvec families prefetch the
block stream about 2 KiB ahead (measured 15-35 % faster at 4096 x 4096, see :func:`_prefetch`).
"""

from __future__ import annotations

import dataclasses

import numpy as np
from sparsecc.sparsity import PackedBSR
from sparsecc.targets.base import Capabilities

from ._common import (
    ACC_SCOPE,
    cached_builder,
    ceil_div,
    check_weights,
    drop_param,
    finish,
    init_chains,
    lanes,
    mvec_tile,
    outer_loop,
    round_up,
    runs_serial,
    store_values,
    stored_dtype,
    tile_transpose,
    transpose_pad,
    untranspose,
    weights_marker,
    widen,
    with_detail,
)

FAMILIES = ("rowvec", "rowvec-xt", "rowvec-xe", "mvec")


@dataclasses.dataclass(frozen=True)
class BSRSchedule:
    """Tunable knobs of a BSR kernel.

    family: "rowvec", "rowvec-xt", "rowvec-xe" or "mvec" (module doc). tile: x rows per register tile (the M
    vector's width for mvec). chains: independent accumulators a block row's blocks are dealt to
    (rowvec families). rows: block rows handled per pass over a block row (mvec; r or a divisor of
    it). index: dtype of the block-column indices, "uint16" or "int32". prefetch: how many blocks
    ahead the rowvec families prefetch the block stream (0: none). weights: "float32" or
    "bfloat16" (block values stored as bf16 bits, widened to f32 on load; fp32 accumulation).
    """

    family: str = "rowvec"
    tile: int = 1
    chains: int = 1
    rows: int = 0
    index: str = "int32"
    prefetch: int = 0
    weights: str = "float32"

    def describe(self) -> str:
        parts = [f"bsr-{self.family}", f"tile{self.tile}"]
        if self.family == "mvec":
            parts.append(f"rows{self.rows}")
        else:
            parts.append(f"chains{self.chains}")
        parts.append(self.index)
        if self.prefetch:
            parts.append(f"prefetch{self.prefetch}")
        return " ".join(parts) + weights_marker(self.weights)


def _index_dtype(packed: PackedBSR) -> str:
    k = packed.shape[1]
    return "uint16" if k // packed.block[1] <= 65536 else "int32"


def _vectors(r: int, v: int) -> int:
    """Vector registers one accumulator row of a block (r lanes) takes."""
    return ceil_div(r, v)


def _prefetch(packed: PackedBSR, caps: Capabilities) -> int:
    """Blocks ahead to prefetch: about 2 KiB of the block stream when the blocks do not fit in
    half of L2 (4096 x 4096 at 50 %, M = 1: 4.4 ms -> 3.8 ms with 32 16x1 blocks ahead, 5.3 -> 4.3
    ms in a second run; at M = 8, 70 %: 3.3 -> 2.5 ms); in-cache weights gain nothing from it."""
    r, c = packed.block
    if packed.data.size * 4 <= caps.l2_bytes // 2:
        return 0
    return max(2, 2048 // (4 * r * c))


def _xe_ok(r: int, v: int) -> bool:
    """Whether the lane-packed rowvec-xe is the default for blocks r rows tall."""
    return r * 4 == v


def _default(m: int, packed: PackedBSR, caps: Capabilities) -> BSRSchedule:
    n_out, k = packed.shape
    r, _ = packed.block
    v = lanes(caps)
    index = _index_dtype(packed)
    nvec = _vectors(r, v)
    pf = _prefetch(packed, caps)
    if m == 1:
        # 4 chains of one vector each keep 2 FMA ports busy through the 4-cycle FMA latency
        # (768 x 768, 70 %: 15-33 us with 2-4 chains against 54 us with one).
        return BSRSchedule("rowvec", 1, max(1, 4 // nvec), 0, index, pf)
    # Tall blocks (r a multiple of the vector) at two vectors of x rows or more, with long rows of
    # x: the M-vector schedule in row chunks (70 % 16x1, against the row-vector schedule reading x
    # rows directly: 1.33x at 32x1024 -> 512, 1.31x at 64, 1.10x at 128; 1.05x at 64x256, but 0.44x
    # at 1024x64 -> 64: short rows stay in L1 and transposing x and y costs more than the multiply),
    # hence the K bound. Narrow blocks with many x rows take it too: a block column of 4 or 8
    # outputs fills only part of a vector.
    mvec_tall = r % v == 0 and m >= 2 * v and k >= 256
    if mvec_tall or (r % v and m >= v and not (r * 2 > v and m < 2 * v)):
        rows = 8 if r > 8 and r % 8 == 0 else r
        return BSRSchedule("mvec", mvec_tile(m, rows, caps), 1, rows, index)
    if _xe_ok(r, v):
        # 3072 x 768 at M = 8, 50 %, interleaved: 4x4 blocks 818-829 us against 1034 us with
        # rowvec-xt, 4x1 805 against 1142 us; 8x2 lost (717 against 450 us), hence r = 4 only.
        # Two chains: one vector of 4 x rows per accumulator leaves each chain latency-bound.
        return BSRSchedule("rowvec-xe", min(round_up(m, v // r), 8), 2, 0, index)
    # Register tile of about 16 accumulators; below 4 of them deal blocks to more chains.
    tile = min(m, max(1, 16 // nvec))
    chains = max(1, min(4, 4 // (tile * nvec)))
    return BSRSchedule("rowvec-xt", tile, chains, 0, index, pf)


def bsr_schedules(m: int, packed: PackedBSR, caps: Capabilities) -> list[BSRSchedule]:
    """Candidate schedules for this problem, the heuristic default first (all valid)."""
    r, _ = packed.block
    v = lanes(caps)
    nvec = _vectors(r, v)
    index = _index_dtype(packed)
    default = _default(m, packed, caps)
    pf = _prefetch(packed, caps)
    out = [default]
    if m == 1:
        for chains in (1, 2, 4, 8):
            out.append(BSRSchedule("rowvec", 1, chains, 0, index, pf))
        out.append(dataclasses.replace(default, prefetch=0 if pf else max(2, 2048 // (4 * r * packed.block[1]))))
        if index != "int32":
            out.append(dataclasses.replace(default, index="int32"))
    else:
        for tile in (4, 8, 16, 24 // nvec):
            tile = min(m, tile)
            if tile * nvec <= 24:
                out.append(BSRSchedule("rowvec-xt", tile, 1, 0, index, pf))
        out.append(BSRSchedule("rowvec", min(m, max(1, 16 // nvec)), 1, 0, index, pf))
        if r < v and v % r == 0:
            g = v // r
            for tile, chains in ((min(m, 8), 2), (min(m, 8), 4), (min(m, 16), 2)):
                out.append(BSRSchedule("rowvec-xe", round_up(tile, g), chains, 0, index))
        if m >= 2 * v or m >= v and r % v:
            rows = 8 if r > 8 and r % 8 == 0 else r
            out.append(BSRSchedule("mvec", mvec_tile(m, rows, caps), 1, rows, index))
            if rows != r:
                out.append(BSRSchedule("mvec", mvec_tile(m, r, caps), 1, r, index))
    seen: list[BSRSchedule] = []
    for s in out:
        if s not in seen:
            seen.append(s)
    return seen[:12]


def bsr_args(packed: PackedBSR, m: int = 1, caps: Capabilities | None = None,
             schedule: BSRSchedule | None = None) -> list[np.ndarray]:
    """The arrays :func:`bsr_linear`'s kernel takes after x, in order: indptr (int32), indices
    (the schedule's index dtype) and the blocks transposed to (nblocks, c, r)."""
    r, c = packed.block
    index = schedule.index if schedule is not None else _index_dtype(packed)
    weights = schedule.weights if schedule is not None else "float32"
    data = np.ascontiguousarray(packed.data.transpose(0, 2, 1), dtype=np.float32)
    indices = packed.indices.astype(index)
    if indices.shape[0] == 0:
        # Kernels declare at least one stored block; it is never read (every block row is empty).
        indices = np.zeros(1, index)
        data = np.zeros((1, c, r), np.float32)
    return [packed.indptr.astype(np.int32), indices, store_values(data, weights)]


@cached_builder
def _rowvec(m: int, n_out: int, k: int, r: int, c: int, nblocks: int, has_bias: bool,
            s: BSRSchedule, serial: bool = False):
    """rowvec and rowvec-xt kernels (see module doc); ``serial``: block rows on one thread."""
    from tvm.script import tirx as T

    rows_loop = outer_loop(serial)

    nbr = n_out // r
    nbl = max(nblocks, 1)
    tile, chains, idx = s.tile, s.chains, s.index
    stored, weights = stored_dtype(s.weights), s.weights
    transposed = s.family == "rowvec-xt"
    n_mt = ceil_div(m, tile)
    full, tail = divmod(m, tile)
    to_tiles = tile_transpose(m, k, tile)
    start_chains = init_chains(has_bias, chains, r)

    # one prefetch per 64-byte line of a block
    lines = ceil_div(r * c, 16)
    pf = s.prefetch

    @T.macro
    def fma_block(acc, u, x, xt, indices, data, b, t, m0, mt):
        col = T.meta_var(T.Cast("int32", indices[b]) * c)
        if pf > 0:
            for line in T.unroll(lines):
                T.evaluate(T.call_llvm_intrin("void", "llvm.prefetch.p0", T.address_of(
                    data[b + pf, line * 16 // r, line * 16 % r]), 0, 3, 1))
        for j in T.unroll(c):
            for mm in T.unroll(mt):
                for i in T.vectorized(r):
                    if transposed:
                        acc[u, mm, i] = acc[u, mm, i] + widen(data[b, j, i], weights) * xt[t, col + j, mm]
                    else:
                        acc[u, mm, i] = acc[u, mm, i] + widen(data[b, j, i], weights) * x[m0 + mm, col + j]

    @T.macro
    def block_row(x, xt, indptr, indices, data, bias, y, br, t, m0, mt):
        acc = T.decl_buffer((chains, mt, r), "float32", scope=ACC_SCOPE)
        start_chains(acc, bias, br * r, mt)
        if chains == 1:
            for b in range(indptr[br], indptr[br + 1]):
                fma_block(acc, 0, x, xt, indices, data, b, t, m0, mt)
        else:
            p0 = T.meta_var(indptr[br])
            count = T.meta_var(indptr[br + 1] - indptr[br])
            for q in range(count // chains):
                for u in T.unroll(chains):
                    fma_block(acc, u, x, xt, indices, data, p0 + q * chains + u, t, m0, mt)
            for b in range(p0 + count // chains * chains, indptr[br + 1]):
                fma_block(acc, 0, x, xt, indices, data, b, t, m0, mt)
            for u in T.unroll(chains - 1):
                for mm in T.unroll(mt):
                    for i in T.vectorized(r):
                        acc[0, mm, i] = acc[0, mm, i] + acc[u + 1, mm, i]
        for mm in T.unroll(mt):
            if m0 + mm < m:
                for i in T.vectorized(r):
                    y[m0 + mm, br * r + i] = acc[0, mm, i]

    @T.prim_func
    def kernel(x: T.Buffer((m, k), "float32"), indptr: T.Buffer((nbr + 1,), "int32"),
               indices: T.Buffer((nbl,), idx), data: T.Buffer((nbl, c, r), stored),
               bias: T.Buffer((n_out,), "float32"), y: T.Buffer((m, n_out), "float32")):
        if transposed:
            # xt[t, col, :] holds x[t*tile : (t+1)*tile, col], zero past row m.
            xt = T.decl_buffer((n_mt, k, tile), "float32")
            to_tiles(x, xt)
            for br in rows_loop(nbr):
                for t in range(n_mt):
                    block_row(x, xt, indptr, indices, data, bias, y, br, t, t * tile, tile)
        else:
            for br in rows_loop(nbr):
                for t in range(full):
                    block_row(x, x, indptr, indices, data, bias, y, br, t, t * tile, tile)
                if tail > 0:
                    block_row(x, x, indptr, indices, data, bias, y, br, full, full * tile, tail)

    return kernel


@cached_builder
def _rowvec_xe(m: int, n_out: int, k: int, r: int, c: int, nblocks: int, has_bias: bool,
               v: int, s: BSRSchedule):
    """rowvec with lanes packed: narrow blocks (r < v) with g = v / r x rows per vector."""
    from tvm.script import tirx as T

    nbr = n_out // r
    nbl = max(nblocks, 1)
    tile, idx, chains = s.tile, s.index, s.chains
    stored, weights = stored_dtype(s.weights), s.weights
    g = v // r
    nq = tile // g
    n_mt = ceil_div(m, tile)
    strips = ceil_div(k, 16)
    # lanes of g copies of an r-vector: every x row of a vector sees the same r weights
    spread = [lane % r for lane in range(v)]

    @T.macro
    def fma_block(acc, u, xe, indices, data, b, t):
        for j in T.unroll(c):
            for q in T.unroll(nq):
                acc[u, q, T.Ramp(0, 1, v)] = acc[u, q, T.Ramp(0, 1, v)] + T.Shuffle(
                    [widen(data[b, j, T.Ramp(0, 1, r)], weights, r)] * g, spread) * xe[
                    t, T.Cast("int32", indices[b]) * c + j, T.Ramp(q * v, 1, v)]

    @T.prim_func
    def kernel(x: T.Buffer((m, k), "float32"), indptr: T.Buffer((nbr + 1,), "int32"),
               indices: T.Buffer((nbl,), idx), data: T.Buffer((nbl, c, r), stored),
               bias: T.Buffer((n_out,), "float32"), y: T.Buffer((m, n_out), "float32")):
        # xe[t, col, q*v + l] = x[t*tile + q*g + l // r, col] (zero past row m): each x value
        # repeated over the r lanes of its row, so one aligned load is the x operand of a vector.
        xe = T.decl_buffer((n_mt, k, tile * r), "float32")
        for st in T.parallel(n_mt * strips):
            for mm in range(tile):
                for kk in range(16):
                    if (st % strips) * 16 + kk < k:
                        for i in T.vectorized(r):
                            if (st // strips) * tile + mm < m:
                                xe[st // strips, (st % strips) * 16 + kk, mm * r + i] = x[
                                    (st // strips) * tile + mm, (st % strips) * 16 + kk]
                            else:
                                xe[st // strips, (st % strips) * 16 + kk, mm * r + i] = T.float32(0)
        for br in T.parallel(nbr):
            for t in range(n_mt):
                acc = T.decl_buffer((chains, nq, v), "float32", scope=ACC_SCOPE)
                for u in T.unroll(chains):
                    for q in T.unroll(nq):
                        if has_bias:
                            if u == 0:
                                acc[u, q, T.Ramp(0, 1, v)] = T.Shuffle([bias[T.Ramp(br * r, 1, r)]] * g, spread)
                            else:
                                acc[u, q, T.Ramp(0, 1, v)] = T.Broadcast(T.float32(0), v)
                        else:
                            acc[u, q, T.Ramp(0, 1, v)] = T.Broadcast(T.float32(0), v)
                p0 = T.meta_var(indptr[br])
                count = T.meta_var(indptr[br + 1] - indptr[br])
                for qb in range(count // chains):
                    for u in T.unroll(chains):
                        fma_block(acc, u, xe, indices, data, p0 + qb * chains + u, t)
                for b in range(p0 + count // chains * chains, indptr[br + 1]):
                    fma_block(acc, 0, xe, indices, data, b, t)
                for u in T.unroll(chains - 1):
                    for q in T.unroll(nq):
                        acc[0, q, T.Ramp(0, 1, v)] = acc[0, q, T.Ramp(0, 1, v)] + acc[u + 1, q, T.Ramp(0, 1, v)]
                for q in T.unroll(nq):
                    for sub in T.unroll(g):
                        if t * tile + q * g + sub < m:
                            for i in T.vectorized(r):
                                y[t * tile + q * g + sub, br * r + i] = acc[0, q, sub * r + i]

    return kernel


@cached_builder
def _mvec(m: int, n_out: int, k: int, r: int, c: int, nblocks: int, has_bias: bool,
          caps: Capabilities, s: BSRSchedule):
    """M-vectorized block-row kernel (see module doc)."""
    from tvm.script import tirx as T

    nbr = n_out // r
    # Rows of a block handled per pass over the block row: tall blocks (16 x 1, 32 x 1) taken 8
    # rows at a time keep the accumulators (8 x tile) at two vectors of x rows: 8 weight broadcasts
    # and 2 loads of x per 16 multiply-adds instead of 16 + 1.
    rc = s.rows
    n_chunks = r // rc
    tile = s.tile
    mp = round_up(m, tile)
    n_tiles = mp // tile
    nbl = max(nblocks, 1)
    idx = s.index
    stored, weights = stored_dtype(s.weights), s.weights
    transpose = transpose_pad(m, k, mp)
    copy_out = untranspose(m, n_out, mp, has_bias, lanes(caps))

    @T.prim_func
    def kernel(x: T.Buffer((m, k), "float32"), indptr: T.Buffer((nbr + 1,), "int32"),
               indices: T.Buffer((nbl,), idx), data: T.Buffer((nbl, c, r), stored),
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
                                    acc[i, v] = acc[i, v] + widen(data[b, j, ch * rc + i], weights) * xt[
                                        T.Cast("int32", indices[b]) * c + j, t * tile + v]
                    for i in T.unroll(rc):
                        for v in T.vectorized(tile):
                            yt[br * r + ch * rc + i, t * tile + v] = acc[i, v]
        copy_out(yt, bias, y)

    return kernel


def _validate(s: BSRSchedule, r: int) -> None:
    check_weights(s.weights, f"BSR schedule {s}")
    if s.family not in FAMILIES:
        raise ValueError(f"unknown BSR schedule family {s.family!r}")
    if s.index not in ("uint16", "int32"):
        raise ValueError(f"BSR index dtype must be uint16 or int32, not {s.index!r}")
    if s.tile < 1 or s.chains < 1:
        raise ValueError(f"BSR schedule needs tile, chains >= 1: {s}")
    if s.family == "mvec" and (s.rows < 1 or r % s.rows):
        raise ValueError(f"mvec rows {s.rows} must divide the block height {r}")


def bsr_linear(m: int, packed: PackedBSR, has_bias: bool, caps: Capabilities,
               name: str = "sparse_linear_bsr", schedule: BSRSchedule | None = None):
    """Scheduled TIR PrimFunc for y = x @ W.T (+ b) with W in BSR (arrays from :func:`bsr_args`
    with the same ``schedule``).

    Parameters of the PrimFunc: x (m, K) f32, indptr, indices, data (nblocks, c, r), [bias (N,)],
    y (m, N) f32.
    """
    n_out, k = packed.shape
    r, c = packed.block
    nblocks = int(packed.indices.shape[0])
    s = schedule if schedule is not None else _default(m, packed, caps)
    _validate(s, r)
    if s.index == "uint16" and k // c > 65536:
        raise ValueError(f"{k // c} block columns do not fit uint16 indices")
    if s.family == "rowvec-xe":
        v = lanes(caps)
        if r >= v or v % r or s.tile % (v // r):
            raise ValueError(f"rowvec-xe needs r < {v} dividing it and a tile that is a multiple of {v} / r")
        func = _rowvec_xe(m, n_out, k, r, c, nblocks, has_bias, v, s)
    elif s.family == "mvec":
        func = _mvec(m, n_out, k, r, c, nblocks, has_bias, caps, s)
    else:
        if s.family == "rowvec":
            s = dataclasses.replace(s, tile=min(s.tile, m))
        serial = runs_serial(m, nblocks * r * c, caps)
        func = _rowvec(m, n_out, k, r, c, nblocks, has_bias, s, serial)
    func = func if has_bias else drop_param(func, "bias")
    return finish(func, name, with_detail(s.describe(), f"r{r}c{c}"))
