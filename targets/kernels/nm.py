"""N:M (2:4, 4:8, 1:4, 2:8, ...) linear kernels: each row keeps ``n`` values per group of ``m`` inputs.

The format is an ELL-like layout with a fixed number of slots per row, so no row pointers are
needed and every row has the same work (balanced parallel rows). Three schedule families
(:class:`NMSchedule`):

* *gather* (few rows of x): ``R`` consecutive output rows are interleaved slot by slot (values and
  positions stored (N/R, slots, R)), so one slot of R rows is one contiguous vector of weights;
  the x values are gathered by (group * m + position).
* *permute* (the same with AVX-512 and 16-row groups): TVM scalarizes a vector load at non-affine
  indices (16 scalar loads and inserts per slot), so instead one contiguous window of 16 x values
  (16 / m groups) is loaded once and each slot picks its lanes from that register with one
  ``vpermps``. The stored positions are then relative to the window (0..15, still 8-bit). At M = 1
  the slots of a window are dealt to ``chains`` accumulators, so consecutive multiply-adds do not
  wait on each other (4-cycle FMA latency).
* *mvec* (many rows of x): x is transposed into tiles (M / tile, K, tile) and every stored value
  multiplies a register tile of x rows (tile / 16 vectors). K is cut into blocks of ``kblock``
  inputs so the piece of the x tile one block reads stays in L1; ``rows`` output rows are handled
  per pass (independent accumulator chains), and a chunk of output rows keeps its accumulators in
  an L1 scratch across K blocks before they are written to y transposed.
"""

from __future__ import annotations

import dataclasses

import numpy as np
from sparsecc.sparsity import PackedNM
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
    pow2_at_least,
    round_up,
    store_values,
    stored_dtype,
    tile_transpose,
    untranspose,
    weights_marker,
    widen,
    with_detail,
)

FAMILIES = ("gather", "permute", "mvec")

#: lanes of the x window the permute schedule selects from (one zmm of f32)
_WINDOW = 16
#: L1 bytes the mvec's x panel of one K block may take (half of a 48 KiB L1)
_PANEL_BYTES = 24 * 1024
#: output rows per chunk of the mvec (their tile-wide accumulators stay in L1 across K blocks)
_CHUNK_BYTES = 16 * 1024


@dataclasses.dataclass(frozen=True)
class NMSchedule:
    """Tunable knobs of an N:M kernel.

    family: "gather", "permute" or "mvec" (module doc). tile: x rows per register tile. chains:
    independent accumulators per tile row (permute, gather). kblock: input columns per K block
    (mvec; a multiple of the group). rows: output rows per pass (mvec). prefetch: how many 16-input
    windows ahead the permute schedule prefetches values and positions (0: none). weights:
    "float32" or "bfloat16" (values stored as bf16 bits, widened to f32 on load; fp32
    accumulation).
    """

    family: str = "permute"
    tile: int = 1
    chains: int = 1
    kblock: int = 0
    rows: int = 1
    prefetch: int = 0
    weights: str = "float32"

    def describe(self) -> str:
        bf16 = weights_marker(self.weights)
        if self.family == "mvec":
            return f"nm-mvec tile{self.tile} kblock{self.kblock} rows{self.rows}{bf16}"
        pf = f" prefetch{self.prefetch}" if self.prefetch else ""
        return f"nm-{self.family} tile{self.tile} chains{self.chains}{pf}{bf16}"


def _rows_per_vector(n_out: int, v: int) -> int:
    r = v
    while n_out % r:
        r //= 2
    return r


def _permute_ok(n_out: int, k: int, group: int, caps: Capabilities) -> bool:
    return ("avx512f" in caps.features and lanes(caps) == _WINDOW and n_out % _WINDOW == 0
            and k % _WINDOW == 0 and _WINDOW % group == 0)


def _mvec_plan(m: int, k: int, group: int, caps: Capabilities, tile: int | None = None) -> tuple[int, int]:
    """(tile, kblock) of the mvec: 4 vectors of x rows per stored value, K blocks whose x panel
    (kblock x tile floats) fills half of L1."""
    v = lanes(caps)
    if tile is None:
        tile = min(round_up(m, v), 4 * v) if m >= v else pow2_at_least(m, 4)
    kblock = max(group, _PANEL_BYTES // (4 * tile) // group * group)
    # equal blocks, none a sliver
    nkb = ceil_div(k, kblock)
    kblock = round_up(ceil_div(k, nkb), group)
    return tile, kblock


def _prefetch(packed: PackedNM, caps: Capabilities) -> int:
    """Windows ahead the permute schedule prefetches: about 4 KiB of its value stream when values
    and positions do not fit in half of L2, none otherwise (4096 x 4096 2:4, interleaved: 8.4 ms
    -> 7.5 ms at M = 1, 8.9 -> 8.2 ms at M = 8 with 8 windows ahead; 4 windows gained less)."""
    if packed.values.size * 5 <= caps.l2_bytes // 2:
        return 0
    return max(1, 4096 // (_WINDOW // packed.m * packed.n * 4 * _WINDOW))


def _default(m: int, packed: PackedNM, caps: Capabilities) -> NMSchedule:
    n_out, k = packed.shape
    v = lanes(caps)
    if m < v:
        tile = min(m, 8)
        # one x row: 4 chains cover the FMA latency; more rows give independent chains already
        chains = 4 if m == 1 else (2 if m == 2 else 1)
        if _permute_ok(n_out, k, packed.m, caps):
            return NMSchedule("permute", tile, chains, 0, 1, _prefetch(packed, caps))
        return NMSchedule("gather", tile, chains, 0, 1)
    # K blocks keep the x panel in L1: 2:4 at M = 128, interleaved, 7.9 ms against 9.8 ms with one
    # unblocked 128-row tile (the earlier M-vector schedule) at 3072 x 768, 6.6 against 8.9 ms at
    # 768 x 3072. Two rows a pass give 8 independent accumulators.
    tile, kblock = _mvec_plan(m, k, packed.m, caps)
    return NMSchedule("mvec", tile, 1, kblock, 2 if n_out % 2 == 0 else 1)


def nm_schedules(m: int, packed: PackedNM, caps: Capabilities) -> list[NMSchedule]:
    """Candidate schedules for this problem, the heuristic default first (all valid)."""
    n_out, k = packed.shape
    v = lanes(caps)
    out = [_default(m, packed, caps)]
    rowvec = ["gather"] + (["permute"] if _permute_ok(n_out, k, packed.m, caps) else [])
    if m < 2 * v:
        for family in rowvec:
            for tile in sorted({min(m, 4), min(m, 8)}):
                for chains in ((1, 2, 4) if tile < 4 else (1,)):
                    out.append(NMSchedule(family, tile, chains, 0, 1))
        if out[0].family == "permute":
            out.append(dataclasses.replace(out[0], prefetch=0 if out[0].prefetch else 8))
    elif "permute" in rowvec:
        # At M = 128 (768 x 3072, 2:4) the permute schedule with 8 or 12 x rows per tile ran
        # within 10 % of the mvec ones (40 against 34-39 GFLOP/s, interleaved): worth a measurement.
        out += [NMSchedule("permute", 8, 1, 0, 1), NMSchedule("permute", 12, 1, 0, 1)]
    if m > 1:
        # 2, 4 or 8 vectors of x rows per stored value, in L1-sized K blocks, 1 or 2 rows a pass
        # (3072 x 768 and 768 x 3072 at M = 128: all within noise of each other, 34-40 GFLOP/s,
        # against 21-28 without K blocks).
        tiles = sorted({min(round_up(m, v), t) for t in (2 * v, 4 * v, 8 * v)}) if m >= v else [pow2_at_least(m, 4)]
        for tile in tiles:
            t, kblock = _mvec_plan(m, k, packed.m, caps, tile)
            for rows in (1, 2):
                if n_out % rows == 0:
                    out.append(NMSchedule("mvec", t, 1, kblock, rows))
        out.append(dataclasses.replace(out[0], kblock=round_up(k, packed.m), rows=1) if out[0].family == "mvec"
                   else NMSchedule("mvec", tiles[0], 1, round_up(k, packed.m), 1))
    seen: list[NMSchedule] = []
    for s in out:
        if s not in seen:
            seen.append(s)
    return seen[:12]


def nm_args(packed: PackedNM, m: int, caps: Capabilities, schedule: NMSchedule | None = None) -> list[np.ndarray]:
    """The arrays :func:`nm_linear`'s kernel takes after x, in order: values (f32) and positions
    (uint8), interleaved by groups of R rows for the gather and permute schedules."""
    s = schedule if schedule is not None else _default(m, packed, caps)
    values = packed.values.astype(np.float32)
    positions = packed.positions.astype(np.uint8)
    if s.family in ("gather", "permute"):
        n_out, slots = values.shape
        r = _WINDOW if s.family == "permute" else _rows_per_vector(n_out, lanes(caps))
        if s.family == "permute":
            # slot s belongs to group s // n, which is group (s // n) % (16 / m) of its window
            group_in_window = (np.arange(slots) // packed.n) % (_WINDOW // packed.m)
            positions = (positions + (group_in_window * packed.m)[None, :]).astype(np.uint8)
        values = values.reshape(n_out // r, r, slots).transpose(0, 2, 1)
        positions = positions.reshape(n_out // r, r, slots).transpose(0, 2, 1)
    return [store_values(values, s.weights), np.ascontiguousarray(positions)]


@cached_builder
def _gather(m: int, n_out: int, k: int, keep: int, group: int, r: int, s: NMSchedule, has_bias: bool):
    from tvm.script import tirx as T

    groups = k // group
    slots = groups * keep
    tile, chains = s.tile, s.chains
    stored, weights = stored_dtype(s.weights), s.weights
    full, tail = divmod(m, tile)
    start_chains = init_chains(has_bias, chains, r)

    @T.macro
    def rows(x, values, positions, bias, y, g, m0, mt):
        acc = T.decl_buffer((chains, mt, r), "float32", scope=ACC_SCOPE)
        start_chains(acc, bias, g * r, mt)
        for gr in range(groups):
            for sl in T.unroll(keep):
                for mm in T.unroll(mt):
                    for i in T.vectorized(r):
                        acc[(gr * keep + sl) % chains, mm, i] = acc[(gr * keep + sl) % chains, mm, i] + widen(values[
                            g, gr * keep + sl, i], weights) * x[m0 + mm, gr * group + T.Cast("int32", positions[
                                g, gr * keep + sl, i])]
        for u in T.unroll(chains - 1):
            for mm in T.unroll(mt):
                for i in T.vectorized(r):
                    acc[0, mm, i] = acc[0, mm, i] + acc[u + 1, mm, i]
        for mm in T.unroll(mt):
            for i in T.vectorized(r):
                y[m0 + mm, g * r + i] = acc[0, mm, i]

    @T.prim_func
    def kernel(x: T.Buffer((m, k), "float32"), values: T.Buffer((n_out // r, slots, r), stored),
               positions: T.Buffer((n_out // r, slots, r), "uint8"),
               bias: T.Buffer((n_out,), "float32"), y: T.Buffer((m, n_out), "float32")):
        for g in T.parallel(n_out // r):
            for t in range(full):
                rows(x, values, positions, bias, y, g, t * tile, tile)
            if tail > 0:
                rows(x, values, positions, bias, y, g, full * tile, tail)

    return kernel


@cached_builder
def _permute(m: int, n_out: int, k: int, keep: int, group: int, s: NMSchedule, has_bias: bool):
    from tvm.script import tirx as T

    w = _WINDOW
    slots = k // group * keep
    per_window = w // group * keep
    tile, chains, pf = s.tile, s.chains, s.prefetch
    stored, weights = stored_dtype(s.weights), s.weights
    full, tail = divmod(m, tile)
    # 64-byte lines of a window's positions (per_window x 16 bytes)
    pos_lines = ceil_div(per_window * w, 64)

    @T.macro
    def rows(x, values, positions, bias, y, g, m0, mt):
        acc = T.decl_buffer((chains, mt, w), "float32", scope=ACC_SCOPE)
        for u in T.unroll(chains):
            for mm in T.unroll(mt):
                if has_bias:
                    if u == 0:
                        acc[u, mm, T.Ramp(0, 1, w)] = bias[T.Ramp(g * w, 1, w)]
                    else:
                        acc[u, mm, T.Ramp(0, 1, w)] = T.Broadcast(T.float32(0), w)
                else:
                    acc[u, mm, T.Ramp(0, 1, w)] = T.Broadcast(T.float32(0), w)
        for wi in range(k // w):
            if pf > 0:
                # flat addresses: past the last window of a row group they run on into the next
                for sl in T.unroll(per_window):
                    T.evaluate(T.call_llvm_intrin("void", "llvm.prefetch.p0", T.address_of(
                        values[g, (wi + pf) * per_window + sl, 0]), 0, 3, 1))
                for line in T.unroll(pos_lines):
                    T.evaluate(T.call_llvm_intrin("void", "llvm.prefetch.p0", T.address_of(
                        positions[g, (wi + pf) * per_window + line * 4, 0]), 0, 3, 1))
            for sl in T.unroll(per_window):
                for mm in T.unroll(mt):
                    acc[sl % chains, mm, T.Ramp(0, 1, w)] = acc[sl % chains, mm, T.Ramp(0, 1, w)] + widen(values[
                        g, wi * per_window + sl, T.Ramp(0, 1, w)], weights, w) * T.call_llvm_pure_intrin(
                        "float32x16", "llvm.x86.avx512.permvar.sf.512", x[m0 + mm, T.Ramp(wi * w, 1, w)],
                        T.Cast("int32x16", positions[g, wi * per_window + sl, T.Ramp(0, 1, w)]))
        for u in T.unroll(chains - 1):
            for mm in T.unroll(mt):
                acc[0, mm, T.Ramp(0, 1, w)] = acc[0, mm, T.Ramp(0, 1, w)] + acc[u + 1, mm, T.Ramp(0, 1, w)]
        for mm in T.unroll(mt):
            y[m0 + mm, T.Ramp(g * w, 1, w)] = acc[0, mm, T.Ramp(0, 1, w)]

    @T.prim_func
    def kernel(x: T.Buffer((m, k), "float32"), values: T.Buffer((n_out // w, slots, w), stored),
               positions: T.Buffer((n_out // w, slots, w), "uint8"),
               bias: T.Buffer((n_out,), "float32"), y: T.Buffer((m, n_out), "float32")):
        for g in T.parallel(n_out // w):
            for t in range(full):
                rows(x, values, positions, bias, y, g, t * tile, tile)
            if tail > 0:
                rows(x, values, positions, bias, y, g, full * tile, tail)

    return kernel


@cached_builder
def _mvec(m: int, n_out: int, k: int, keep: int, group: int, s: NMSchedule, has_bias: bool,
          caps: Capabilities):
    from tvm.script import tirx as T

    slots = k // group * keep
    tile, kblock, nr = s.tile, s.kblock, s.rows
    stored, weights = stored_dtype(s.weights), s.weights
    n_mt = ceil_div(m, tile)
    mp = n_mt * tile
    nkb = ceil_div(k, kblock)
    gpb = kblock // group  # groups per K block
    groups = k // group
    to_tiles = tile_transpose(m, k, tile)
    chunk = max(nr, min(n_out, _CHUNK_BYTES // (4 * tile)) // nr * nr)
    n_chunks = ceil_div(n_out, chunk)
    copy_out = untranspose(m, n_out, mp, has_bias, lanes(caps))

    @T.macro
    def pass_rows(xt, values, positions, yt, n0, mt, kb):
        acc = T.decl_buffer((nr, tile), "float32", scope=ACC_SCOPE)
        for q in T.unroll(nr):
            for v in T.vectorized(tile):
                acc[q, v] = yt[n0 + q, mt * tile + v]
        for gr in range(kb * gpb, T.min(kb * gpb + gpb, groups)):
            for sl in T.unroll(keep):
                for q in T.unroll(nr):
                    for v in T.vectorized(tile):
                        acc[q, v] = acc[q, v] + widen(values[n0 + q, gr * keep + sl], weights) * xt[
                            mt, gr * group + T.Cast("int32", positions[n0 + q, gr * keep + sl]), v]
        for q in T.unroll(nr):
            for v in T.vectorized(tile):
                yt[n0 + q, mt * tile + v] = acc[q, v]

    @T.prim_func
    def kernel(x: T.Buffer((m, k), "float32"), values: T.Buffer((n_out, slots), stored),
               positions: T.Buffer((n_out, slots), "uint8"),
               bias: T.Buffer((n_out,), "float32"), y: T.Buffer((m, n_out), "float32")):
        # xt[t, col, :] holds x[t*tile : (t+1)*tile, col], zero past row m.
        xt = T.decl_buffer((n_mt, k, tile), "float32")
        yt = T.decl_buffer((n_out, mp), "float32")
        to_tiles(x, xt)
        for c in T.parallel(n_chunks):
            for mt in range(n_mt):
                for n in range(T.min(chunk, n_out - c * chunk)):
                    for v in T.vectorized(tile):
                        yt[c * chunk + n, mt * tile + v] = T.float32(0)
                for kb in range(nkb):
                    for p in range(T.min(chunk, n_out - c * chunk) // nr):
                        pass_rows(xt, values, positions, yt, c * chunk + p * nr, mt, kb)
        copy_out(yt, bias, y)

    return kernel


def _validate(s: NMSchedule, m: int, n_out: int, k: int, group: int, caps: Capabilities) -> None:
    check_weights(s.weights, f"N:M schedule {s}")
    if s.family not in FAMILIES:
        raise ValueError(f"unknown N:M schedule family {s.family!r}")
    if s.tile < 1 or s.chains < 1 or s.rows < 1:
        raise ValueError(f"N:M schedule needs tile, chains, rows >= 1: {s}")
    if s.family == "permute" and not _permute_ok(n_out, k, group, caps):
        raise ValueError("the permute schedule needs AVX-512, N and K multiples of 16 and a group dividing 16")
    if s.family == "mvec" and (s.kblock < group or s.kblock % group or n_out % s.rows):
        raise ValueError(f"mvec kblock {s.kblock} must be a multiple of the group {group} and rows divide N")


def nm_linear(m: int, packed: PackedNM, has_bias: bool, caps: Capabilities,
              name: str = "sparse_linear_nm", schedule: NMSchedule | None = None):
    """Scheduled TIR PrimFunc for y = x @ W.T (+ b) with W in N:M form (arrays from
    :func:`nm_args` with the same ``schedule``). Parameters: x (m, K) f32, values, positions
    (uint8), [bias (N,)], y (m, N)."""
    n_out, k = packed.shape
    s = schedule if schedule is not None else _default(m, packed, caps)
    _validate(s, m, n_out, k, packed.m, caps)
    if s.family == "mvec":
        func = _mvec(m, n_out, k, packed.n, packed.m, s, has_bias, caps)
    else:
        s = dataclasses.replace(s, tile=min(s.tile, m))
        if s.family == "permute":
            func = _permute(m, n_out, k, packed.n, packed.m, s, has_bias)
        else:
            func = _gather(m, n_out, k, packed.n, packed.m, _rows_per_vector(n_out, lanes(caps)), s, has_bias)
    func = func if has_bias else drop_param(func, "bias")
    return finish(func, name, with_detail(s.describe(), f"{packed.n}:{packed.m}"))
