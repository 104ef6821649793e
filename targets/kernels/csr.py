"""Compressed-sparse-row (CSR) linear kernels: y = x @ W.T + b for unstructured sparsity.

Three schedule families (:class:`CSRSchedule` ``family``), each with its own layout of the
nonzeros (:func:`csr_args` re-lays the packed CSR out for the kernel):

* ``sell`` (M = 1): output rows in slices of 16, the nonzeros of a slice stored step by step (the
  j-th nonzero of each of its 16 rows side by side, short rows padded with zeros). One step is a
  contiguous vector of 16 weights times 16 x values fetched with one ``vgatherdps``, added into a
  vector of the 16 rows' sums: no horizontal sum and no ragged row ends.
* ``perm`` (M = 1, no gathers): output rows in slices of 16 as in ``sell``, K cut into windows of
  ``window`` (16, 32 or 64) columns. Per (slice, window) the window of x is loaded once into one
  to four registers, and each step takes the j-th nonzero of the 16 rows inside that window: 16
  weights and 16 one-byte offsets into the window, x fetched from the registers with a permute
  (``vpermps`` / ``vpermi2ps``, one per cycle) instead of a gather from memory. Rows with fewer
  nonzeros in the window are padded (weight 0). Where gathers are slow (AMD Zen 4: 1.3 G
  elements/s) this moves the kernel from gather-bound to stream-bound.
* ``spmv`` (M = 1): one row at a time, its nonzeros consumed 16 at a time (x gathered by column
  index) into ``unroll`` vector accumulators, the ragged end as one masked vector, the vector
  summed once per row. For rows of very unequal length, where slices would be mostly padding.
* ``spmm`` (M > 1): x is transposed (16 x 16 blocks in registers) per tile of up to 64 rows so
  every nonzero multiplies a contiguous register tile of x rows, ``unroll`` nonzeros at a time
  into separate accumulators. The nonzeros are regrouped into blocks of K columns (see
  :func:`_spmm_plan`) so the transposed-x panel a block reads stays in L1; chunks of output rows
  run in parallel, keep their accumulators in a scratch across K blocks, and write y through a
  16 x 16 register transpose.

Column indices are uint16 when K allows (``index``), which shrinks the weight stream from 8 to 6
bytes per nonzero; ``perm`` stores one byte per slot (the offset in its window).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import numpy as np
from sparsecc.sparsity import PackedCSR
from sparsecc.targets.base import Capabilities

from ._common import (
    ACC_SCOPE,
    cached_builder,
    ceil_div,
    check_weights,
    drop_param,
    finish,
    outer_loop,
    pow2_at_least,
    round_up,
    runs_serial,
    store_values,
    stored_dtype,
    weights_marker,
    widen,
)

#: L1 bytes the SpMM's transposed-x panel of one K block may take (see :func:`_spmm_plan`)
_PANEL_BYTES = 24 * 1024
#: nonzeros a row should have per K block, on average, for the block to pay for itself
_NNZ_PER_BLOCK_ROW = 32
#: transposed-x bytes above which the SpMM prefetches each K block's panel (768 x 3072 at
#: M = 128 has 786 KB and gains; 3072 x 768 has 196-393 KB and loses)
_PANEL_PREFETCH_BYTES = 512 * 1024
#: output rows per slice of the ``sell`` layout (one zmm of f32 sums)
_SLICE = 16
#: lanes of one gathered vector of x (``vgatherdps`` on zmm)
_GATHER = 16
#: column windows of the ``perm`` layout: one, two or four zmm of x
_PERM_WINDOWS = (16, 32, 64)
#: ``perm`` slots per nonzero above which the gather families are tried first (rows of very
#: unequal length, where every slice pads to its longest row)
_PERM_MAX_PADDING = 2.5


@dataclass(frozen=True)
class CSRSchedule:
    """The tunable knobs of a CSR kernel (see the module docstring for the families).

    ``tile``: spmm x rows per register tile. ``kblock``: spmm K columns per block (0: all of K).
    ``unroll``: nonzeros (spmm) or gathered vectors (sell, spmv) per step, each into its own
    accumulator, so that many multiply-add chains run side by side. ``chunk``: spmm output rows
    per parallel chunk (0: see :func:`_default_chunk`).
    ``index``: width of the stored column indices, ``"uint16"`` (K <= 65536) or ``"int32"``.
    ``prefetch_out`` (spmm): when a chunk starts, ask for write ownership of the y lines its
    transposed store will write at the end. Those stores go to ``tile`` rows of y, one or two
    lines each, a row length apart, a pattern no hardware prefetcher follows; left to miss they
    took a quarter of the kernel at 90 % sparse (3072 x 768, M = 128: 1.12x faster with it, 1.03x
    at 50 %). ``prefetch_panel`` (spmm): while a K block runs, prefetch the next block's panel
    of transposed x, spread over the block's rows. Pays when all of transposed x does not stay in
    L2 next to the weight stream (4096 x 4096, M = 128, 50 %: 1.13x; 768 x 3072: 1.13x), costs
    load slots when it does (3072 x 768, 90 %: 0.88x).
    ``pairs`` (spmm): output rows go in pairs, and a column both rows of a pair keep is stored
    once with both weights: its row of transposed x is loaded once for the two rows' multiply-adds
    (see :func:`_spmm_pair_layout`). The loop is bound by vector loads, about one per cycle
    here, and x rows are most of them, so sharing a row saves nearly half the loads of the pair's
    shared columns: a quarter of the weights at 50 % random sparsity, more where pruning keeps
    the same input columns in many rows. It costs a third loop exit per pair and block.
    ``scaled`` (spmm): indices stored as (column - first column of its K block) * tile, the
    offset of the column's row in the block's transposed-x panel, when that fits the index type;
    it saves the shift on every nonzero, and keeps LLVM from computing 8 offsets in a vector
    register and extracting them one by one (``vpextrd``), which it did for tiles of 8 (M = 8,
    50 %: 1.07-1.15x; M = 128, K = 768, 70 %: 1.08-1.12x; K = 3072: no change).
    ``weights``: ``"float32"`` or ``"bfloat16"`` (the values stored as bf16 bits, widened to f32
    on load; fp32 accumulation). Indices and pointers are the same either way.
    ``window`` (perm only): input columns per window, 16 (one register of x, ``vpermps``), 32 (two,
    ``vpermi2ps``) or 64 (four: two permutes and a blend per step). Wider windows pad less (a
    slice's step count is its longest row's share of the window, and longer shares vary less
    relative to their mean) but cost more per step; ``index`` is ``"uint8"`` for perm.
    """

    family: str = "spmm"
    index: str = "uint16"
    tile: int = 64
    kblock: int = 0
    unroll: int = 1
    chunk: int = 0
    scaled: bool = False
    prefetch_out: bool = False
    prefetch_panel: bool = False
    pairs: bool = False
    weights: str = "float32"
    #: f32 lanes per step of ``spmv`` and ``sell`` (sell: 16, one zmm gather); see :func:`_spmv_lanes`
    lanes: int = 16
    window: int = 0

    def describe(self) -> str:
        if self.family == "spmm":
            return (f"csr-spmm tile{self.tile} kblock{self.kblock} unroll{self.unroll} chunk{self.chunk} "
                    f"{self.index}{' scaled' if self.scaled else ''}{' prefetch-y' if self.prefetch_out else ''}"
                    f"{' prefetch-panel' if self.prefetch_panel else ''}{' pairs' if self.pairs else ''}"
                    f"{weights_marker(self.weights)}")
        if self.family == "perm":
            return f"csr-perm window{self.window} unroll{self.unroll} {self.index}{weights_marker(self.weights)}"
        return f"csr-{self.family} gather{self.lanes} unroll{self.unroll} {self.index}{weights_marker(self.weights)}"


def _lanes(caps: Capabilities | None) -> int:
    """f32 lanes of one vector register (16 when the machine is unknown: AVX-512)."""
    return max(4, caps.vector_lanes_f32) if caps is not None else 16


def _spmm_plan(m: int, k: int, n_out: int, nnz: int, caps: Capabilities | None) -> tuple[int, int, bool]:
    """(tile, kblock, pairs) of the SpMM: ``tile`` x rows per register tile, ``kblock`` input
    columns per block of the CSR, and whether output rows go in pairs (:class:`CSRSchedule`).

    Every stored weight multiplies a ``tile``-wide row of transposed x, one vector load per
    multiply-add plus the weight's broadcast and its index. Vector loads, about one per cycle
    here, bound the loop, not multiply-adds. Without blocking K that row comes from a K x tile
    panel far larger than L1 (393 KB at K = 768, M = 128), and the L2 -> L1 traffic of one
    4*tile-byte row per nonzero bounds the kernel (50 % sparse: 1.5x slower than with blocks of
    96 columns). But every (block, row) pair costs a load and store of the accumulators and a
    mispredicted loop exit, which dominated at 90 % with 96-column blocks (10 nonzeros each). So
    a block is as wide as a 24 KiB (half of L1) panel allows, widened until a row has about 32
    nonzeros in it (a pair of rows: 64); blocks are made equal so none is a tiny remainder.

    Row pairs with 8-vector tiles pay where at least 20 % of the weights are kept (3072 x 768,
    M = 128: 1.16x the single rows of 8 vectors at 50 %, 1.12x the single rows of 4 at 70 %);
    sparser, pairs rarely share a column and the 4-vector tile's longer blocks win (90 %: pairs
    1.02x, 8 vectors 0.97x).
    """
    v = _lanes(caps)
    density = nnz / max(1, n_out * k)
    pairs = m >= 8 * v and density >= 0.2
    if pairs:
        tile = 8 * v
    else:
        tile = min(round_up(m, v), 4 * v) if m >= v else pow2_at_least(m, 4)
    want = max(_PANEL_BYTES // (4 * tile), int(_NNZ_PER_BLOCK_ROW / max(density * (2 if pairs else 1), 1e-6)))
    nkb = max(1, ceil_div(k, max(16, want)))
    return tile, round_up(ceil_div(k, nkb), 16), pairs


def _default_chunk(n_out: int, k: int, tile: int, threads: int) -> int:
    """Output rows per parallel chunk of the SpMM.

    A chunk sweeps every K block's panel of transposed x once. Where all of x^T stays in L2 that
    costs little, and accumulators of 16 KiB that stay in L1 beside the panel are best (3072 x
    768, M = 128: 32 rows of 128 1.05x faster than 256 at 50 %). Where x^T outgrows L2 (see
    :func:`_panel_prefetch_pays`), every sweep comes from L3 and bigger chunks read it fewer
    times: accumulators of 128 KiB (in L2, read and written once per block and row, in order,
    which the prefetcher follows), 256 rows of 128 instead of 32: 4096 x 4096, M = 128, 50 %:
    1.13x; 768 x 3072: 1.10x. At least 4 chunks per thread keep the threads evenly loaded.
    """
    return _chunk_rows(n_out, tile, threads, _chunk_budget(k, tile))


def _chunk_budget(k: int, tile: int) -> int:
    """Accumulator bytes of the default SpMM chunk (see :func:`_default_chunk`)."""
    return (128 if tile >= 16 and _panel_prefetch_pays(k, tile) else 16) * 1024


def _chunk_rows(n_out: int, tile: int, threads: int, budget: int) -> int:
    """Output rows per chunk for ``budget`` bytes of accumulators, at least 4 chunks per thread."""
    rows = (budget // (4 * tile)) // 16 * 16
    balanced = round_up(ceil_div(n_out, 4 * max(1, threads)), 16)
    return max(16, min(round_up(n_out, 16), rows, balanced))


def _panel_prefetch_pays(k: int, tile: int) -> bool:
    """Whether the whole transposed x (K x tile floats) is too big to stay in L2 beside the weight
    stream, so that each K block's panel would otherwise arrive by demand misses (see
    :class:`CSRSchedule`)."""
    return 4 * k * tile > _PANEL_PREFETCH_BYTES


def _spmv_lanes(caps: Capabilities | None) -> int:
    """Lanes of one step of the ``spmv`` schedule: 16 (one zmm, or two ymm of software-gathered x)
    where vectors hold 8 lanes or more; one register where they hold fewer (simd128: 4), so a
    step is one native vector and the masked end of a row wastes at most 3 lanes."""
    v = _lanes(caps)
    return _GATHER if v >= 8 else v


def _index_dtype(k: int) -> str:
    # 2-byte column indices halve the index stream when they fit.
    return "uint16" if k <= 65536 else "int32"


def _has_gather(caps: Capabilities | None) -> bool:
    return caps is None or ("avx512f" in caps.features and caps.vector_bits >= 512)


def _perm_window(packed: PackedCSR) -> tuple[int, float]:
    """The ``perm`` window for ``packed`` and its slots per nonzero: 32 columns, or 64 where that
    pads at least a tenth less (a 64-column step costs two permutes and a blend, about a tenth
    more than one permute: 4096 x 4096 at 70 %, 64 pads 1.33 against 1.48 and ran 1.15x faster; at
    50 %, 1.21 against 1.30, even)."""
    narrow, wide = perm_padding(packed, 32), perm_padding(packed, 64)
    return (64, wide) if wide * 1.1 < narrow else (32, narrow)


def _slice_padding(packed: PackedCSR) -> float:
    """Fraction of the ``sell`` layout's slots that would be padding."""
    return 1.0 - packed.nnz / max(1, int(_sell_steps(packed, 1).sum()) * _SLICE)


def default_schedule(m: int, packed: PackedCSR, caps: Capabilities | None) -> CSRSchedule:
    """The heuristic choice (first of :func:`csr_schedules`)."""
    return csr_schedules(m, packed, caps)[0]


def csr_schedules(m: int, packed: PackedCSR, caps: Capabilities | None) -> list[CSRSchedule]:
    """Candidate schedules worth measuring for ``packed`` at M = ``m``, the heuristic default first.

    Defaults, from side-by-side runs at 1 thread (3072 x 768 unless said otherwise):

    * M = 1 with AVX-512: ``perm`` with 2 accumulators, windows of 32 columns, or 64 where that
      cuts the padding by more than a tenth (about 70 % sparse and beyond; see
      :func:`_perm_window`). On AMD Zen 4, 3072 x 768: 2.3-4x faster than ``sell`` (50 %: 103
      against 411 us; 70 %: 63 against 254; 90 %: 31 against 85), because sell's gathers run at
      1.3 G elements/s there; 768 x 3072 and 4096 x 4096 alike. Rows so unequal that slices pad
      more than 2.5 slots per nonzero (a dense row among sparse ones) take ``sell`` / ``spmv``
      first. ``sell``: 50 % sparse 1.6x the per-row gather of 16 scalar inserts with int32
      indices (1.9x at 768 x 768, Intel); 2 accumulators 2x 1 at 90 %, 4 slower than 2 at 50 %.
    * M < 16 (tile of 4 or 8 x rows, one ymm per nonzero): 8 nonzeros into 8 accumulators per
      step; with one accumulator the loop waits on the multiply-add latency (M = 8, 70 %: 1.9x
      faster than 1, 1.07x than 4).
    * M >= 16: 4 zmm per nonzero already give 4 independent chains (2 accumulator sets measured
      within noise); row pairs of 8 zmm (tiles of 128 rows) where rows are dense enough, see
      :func:`_spmm_plan`; y-line prefetch on, panel prefetch where x^T outgrows L2
      (:class:`CSRSchedule`). The other tiles, K blocks, pairing and prefetch choices are
      candidates.
    """
    n_out, k = packed.shape
    index = _index_dtype(k)
    if m == 1:
        if not _has_gather(caps):
            out = [CSRSchedule("spmv", index, unroll=u, lanes=_spmv_lanes(caps)) for u in (2, 1)]
        else:
            window, padding = _perm_window(packed)
            other = 64 if window == 32 else 32
            perm = [CSRSchedule("perm", "uint8", unroll=u, window=w) for w, u in ((window, 2), (other, 2), (window, 4))]
            sell = [CSRSchedule("sell", index, unroll=u) for u in (2, 1, 4)]
            spmv = [CSRSchedule("spmv", index, unroll=u, lanes=_spmv_lanes(caps)) for u in (2, 1)]
            # Slices pay for their padding; rows of equal length (per-row pruning) have none.
            first, second = (sell, spmv) if _slice_padding(packed) <= 0.1 else (spmv, sell)
            gathers = first + second + [CSRSchedule("sell", "int32", unroll=2)]
            out = perm + gathers if padding <= _PERM_MAX_PADDING else gathers + perm
    else:
        tile, kblock, pairs = _spmm_plan(m, k, n_out, packed.nnz, caps)
        small = tile < 16
        # Scaled indices wherever they fit (see CSRSchedule); y lines prefetched for full tiles.
        base = _scaled_if_fits(CSRSchedule("spmm", index, tile=tile, kblock=kblock, unroll=8 if small else 1,
                                           prefetch_out=not small, pairs=pairs,
                                           prefetch_panel=not small and _panel_prefetch_pays(k, tile)), k)
        variants = [dataclasses.replace(base, scaled=False), dataclasses.replace(base, index="int32")]
        if not small:
            threads = caps.threads if caps is not None else 1
            # the other chunk size: 16 KiB of accumulators where 128 KiB is the default, and back
            other = _chunk_rows(n_out, tile, threads, 16 * 1024 if _chunk_budget(k, tile) > 16 * 1024 else 128 * 1024)
            variants += [dataclasses.replace(base, prefetch_panel=not base.prefetch_panel),
                         dataclasses.replace(base, prefetch_out=False),
                         dataclasses.replace(base, chunk=other)]
        if base.pairs:
            variants += [dataclasses.replace(base, pairs=False)]
        else:
            variants += [dataclasses.replace(base, unroll=u) for u in ((4, 2) if small else (2,))]
        variants += [dataclasses.replace(base, kblock=max(16, round_up(kblock // 2, 16)))]
        if not small:
            variants += [dataclasses.replace(base, kblock=min(round_up(k, 16), 2 * kblock)),
                         dataclasses.replace(base, tile=tile // 2, unroll=2, pairs=False)]
            if tile == 8 * _lanes(caps):
                # single rows of 4 vectors with longer blocks (the default below 20 % density)
                variants += [dataclasses.replace(base, tile=tile // 2, kblock=min(round_up(k, 16), 2 * kblock),
                                                 pairs=False)]
            elif m > tile:
                # row pairs of 8 vectors, half the K block (same panel bytes; the default at 20 %
                # density or more)
                variants += [dataclasses.replace(base, tile=2 * tile, kblock=max(16, round_up(kblock // 2, 16)),
                                                 pairs=True)]
        out = [base, variants[0]] + [_scaled_if_fits(v, k) for v in variants[1:]]
    return list(dict.fromkeys(out))


def _scale_fits(k: int, s: CSRSchedule) -> bool:
    """Whether (column - block start) * tile, the ``scaled`` index, fits the index type."""
    span = min(k, s.kblock) if s.kblock else k
    return (span - 1) * s.tile < (1 << 16 if s.index == "uint16" else 1 << 31)


def _scaled_if_fits(s: CSRSchedule, k: int) -> CSRSchedule:
    return dataclasses.replace(s, scaled=_scale_fits(k, dataclasses.replace(s, scaled=True)))


def _check_schedule(m: int, k: int, s: CSRSchedule, caps: Capabilities | None) -> None:
    check_weights(s.weights, f"CSR schedule {s}")
    if s.family == "perm":
        if m != 1:
            raise ValueError(f"perm is an M = 1 schedule, got M = {m}")
        if not _has_gather(caps):
            raise ValueError("perm needs AVX-512 permutes (vpermps / vpermi2ps on zmm)")
        if s.window not in _PERM_WINDOWS or s.index != "uint8":
            raise ValueError(f"perm windows are {_PERM_WINDOWS} columns with uint8 offsets, got {s}")
    elif s.index not in ("uint16", "int32") or (s.index == "uint16" and k > 65536):
        raise ValueError(f"index width {s.index!r} cannot hold K = {k}")
    elif s.window:
        raise ValueError(f"only the perm family has windows, got {s}")
    if s.family in ("sell", "spmv"):
        if m != 1:
            raise ValueError(f"{s.family} is an M = 1 schedule, got M = {m}")
        if s.family == "sell" and not _has_gather(caps):
            raise ValueError("sell needs AVX-512 gathers")
        if s.family == "sell" and s.lanes != _GATHER:
            raise ValueError(f"sell steps are {_GATHER} lanes (one zmm gather), not {s.lanes}")
        if s.lanes not in (4, 8, 16):
            raise ValueError(f"{s.family} steps of {s.lanes} lanes: choose 4, 8 or 16")
    elif s.family not in ("spmm", "perm"):
        raise ValueError(f"unknown CSR schedule family {s.family!r}")
    if s.scaled and (s.family != "spmm" or not _scale_fits(k, s)):
        raise ValueError(f"scaled indices: {s.index} cannot hold column * {s.tile} for K = {k} (spmm only)")
    if s.unroll < 1 or s.tile < 1 or s.kblock < 0 or s.chunk < 0:
        raise ValueError(f"bad CSR schedule {s}")
    if s.pairs and (s.family != "spmm" or s.unroll != 1 or s.chunk % 2):
        raise ValueError(f"row pairs need the spmm family, unroll 1 and an even chunk, got {s}")


def _gather(x_ptr, idx):
    """16 f32 from ``x_ptr`` at the int32x16 offsets ``idx`` with one ``vgatherdps`` (TVM lowers a
    vector load at non-affine indices to 16 scalar loads and inserts instead)."""
    from tvm.script import tirx as T

    return T.call_llvm_pure_intrin("float32x16", "llvm.x86.avx512.mask.gather.dps.512",
                                   T.Broadcast(T.float32(0), 16), x_ptr, idx,
                                   T.Broadcast(T.bool(True), 16), T.int32(4))


def _spmm_layout(packed: PackedCSR, s: CSRSchedule) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """indptr/indices/data regrouped by K block: block ``b``'s rows come one after another, so row
    ``n`` of block ``b`` is ``[indptr[b * N + n], indptr[b * N + n + 1])``."""
    n_out, k = packed.shape
    kblock = s.kblock or round_up(k, 16)
    nkb = ceil_div(k, kblock)
    indices = packed.indices.astype(np.int64)
    rows = np.repeat(np.arange(n_out, dtype=np.int64), np.diff(packed.indptr))
    key = (indices // kblock) * n_out + rows
    # Stable: within a (block, row) the columns stay sorted.
    order = np.argsort(key, kind="stable")
    counts = np.bincount(key, minlength=nkb * n_out)
    indptr = np.concatenate([[0], np.cumsum(counts)]).astype(np.int32)
    return indptr, indices[order], packed.data[order].astype(np.float32)


def _pair_partners(packed: PackedCSR) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """For every nonzero of ``packed`` (in CSR order): its row, its column, whether the other row
    of its pair (rows ``2g`` and ``2g + 1``) keeps the same column, and where that weight is."""
    n_out, k = packed.shape
    cols = packed.indices.astype(np.int64)
    rows = np.repeat(np.arange(n_out, dtype=np.int64), np.diff(packed.indptr))
    keys = rows * k + cols
    partner = (rows ^ 1) * k + cols
    # keys are sorted (CSR rows in order, columns sorted within a row)
    at = np.clip(np.searchsorted(keys, partner), 0, max(len(keys) - 1, 0))
    has_partner = (rows ^ 1) < n_out
    if len(keys):
        has_partner &= keys[at] == partner
    return rows, cols, has_partner, at


def _pair_slots(packed: PackedCSR) -> int:
    """Index slots of the pair layout: one per shared column and one per column a single row of
    its pair keeps, rounded up to a sixteenth of the weight count (the unused ones zero). The
    kernel's signature then depends on the weight count and this bucket, not on the exact number
    of shared columns, so the layers of one shape (pruned to one per-row count) share one or two
    kernels. With exact counts every layer of SmolLM2 compiled its own, over 15 minutes per
    model."""
    rows, _, has_partner, _ = _pair_partners(packed)
    entries = packed.nnz - int((has_partner & (rows % 2 == 1)).sum())
    return min(round_up(entries, max(16, packed.nnz // 16)), max(packed.nnz, entries))


def _spmm_pair_layout(packed: PackedCSR, s: CSRSchedule) -> tuple[np.ndarray, ...]:
    """The nonzeros of output rows ``2g`` and ``2g + 1`` (a pair; an odd last row pairs with an
    empty one) regrouped by K block and split in three segments: columns both rows keep, columns
    only the first keeps, columns only the second keeps. Pair ``g`` of block ``b`` (``i = b * P +
    g``, P pairs) has its segments at ``ptr[3 * i + 0..3]``. A shared column is one index and two
    weights, a single one an index and one weight, so ``data`` is longer than ``indices`` by the
    shared entries; ``shared_before[i]`` counts those of earlier (block, pair)s, which puts the
    weights of entry ``p`` at ``shared_before[i] - ptr[3 i] + 2 p + h`` (shared, row ``h``) and
    ``shared_before[i] + ptr[3 i + 1] - ptr[3 i] + p`` (single). Returns (ptr, shared_before,
    indices, data).
    """
    n_out, k = packed.shape
    kblock = s.kblock or round_up(k, 16)
    nkb = ceil_div(k, kblock)
    n_pairs = ceil_div(n_out, 2)
    rows, cols, has_partner, at = _pair_partners(packed)
    vals = packed.data.astype(np.float32)
    first = rows % 2 == 0
    # one entry per shared column (kept by the first row), one per column only one row keeps
    entry = ~has_partner | first
    segment = np.where(has_partner, 0, np.where(first, 1, 2))[entry]
    e_cols, e_first, e_vals = cols[entry], vals[entry], np.where(has_partner, vals[at], 0)[entry]
    bg = (e_cols // kblock) * n_pairs + rows[entry] // 2
    # Stable: within a segment the columns stay sorted.
    order = np.argsort(bg * 3 + segment, kind="stable")
    e_cols, e_first, e_vals, segment, bg = e_cols[order], e_first[order], e_vals[order], segment[order], bg[order]
    counts = np.bincount(bg * 3 + segment, minlength=nkb * n_pairs * 3)
    ptr = np.concatenate([[0], np.cumsum(counts)]).astype(np.int32)
    shared_counts = counts.reshape(-1, 3)[:, 0]
    shared_before = (np.cumsum(shared_counts) - shared_counts).astype(np.int32)
    # values in entry order, a shared entry's two side by side
    width = np.where(segment == 0, 2, 1)
    start = np.cumsum(width) - width
    data = np.zeros(int(width.sum()), np.float32)
    data[start] = e_first
    data[start[segment == 0] + 1] = e_vals[segment == 0]
    return ptr, shared_before, e_cols, data


def _sell_steps(packed: PackedCSR, unroll: int) -> np.ndarray:
    """Steps of every 16-row slice: its longest row, rounded up to a multiple of ``unroll``."""
    n_out = packed.shape[0]
    counts = np.zeros(ceil_div(n_out, _SLICE) * _SLICE, np.int64)
    counts[:n_out] = np.diff(packed.indptr)
    return -(-counts.reshape(-1, _SLICE).max(axis=1) // unroll) * unroll


def _perm_cells(packed: PackedCSR, window: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """For the ``perm`` layout: each nonzero's (slice, window) cell, its position among its row's
    nonzeros in that window, and the steps of every cell (its rows' largest count), row-major
    over (slice, window)."""
    n_out, k = packed.shape
    nwin = ceil_div(k, window)
    rows = np.repeat(np.arange(n_out, dtype=np.int64), np.diff(packed.indptr))
    win = packed.indices.astype(np.int64) // window
    row_win = rows * nwin + win  # sorted: rows in order, columns sorted within a row
    if np.any(np.diff(row_win) < 0):
        raise ValueError("the perm layout needs the columns of every CSR row sorted (pack_csr sorts them)")
    counts = np.bincount(row_win, minlength=n_out * nwin)
    first = np.concatenate([[0], np.cumsum(counts)])[:-1]
    j = np.arange(packed.nnz, dtype=np.int64) - first[row_win]
    padded = np.zeros(ceil_div(n_out, _SLICE) * _SLICE * nwin, np.int64)
    padded[:n_out * nwin] = counts
    steps = padded.reshape(-1, _SLICE, nwin).max(axis=1).reshape(-1)
    return (rows // _SLICE) * nwin + win, j, steps


def perm_padding(packed: PackedCSR, window: int) -> float:
    """Stored slots of the ``perm`` layout per nonzero (1.0: no padding)."""
    return int(_perm_cells(packed, window)[2].sum()) * _SLICE / max(1, packed.nnz)


def _stored(packed: PackedCSR, s: CSRSchedule) -> int:
    """Length of the indices / data arrays :func:`csr_args` gives for schedule ``s``."""
    if s.family == "sell":
        total = int(_sell_steps(packed, s.unroll).sum()) * _SLICE
    elif s.family == "perm":
        total = int(_perm_cells(packed, s.window)[2].sum()) * _SLICE
    elif s.family == "spmv":
        total = packed.nnz + _GATHER
    elif s.pairs:
        total = _pair_slots(packed)
    else:
        total = packed.nnz
    return max(total, 1)


def _sell_layout(packed: PackedCSR, s: CSRSchedule) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Slice pointers (in steps) and the step-major nonzeros of every 16-row slice; each slice's
    step count is padded to a multiple of ``unroll`` (padding: weight 0 at column 0)."""
    n_out = packed.shape[0]
    steps = _sell_steps(packed, s.unroll)
    sptr = np.concatenate([[0], np.cumsum(steps)]).astype(np.int32)
    total = int(sptr[-1]) * _SLICE
    indices = np.zeros(total, np.int64)
    data = np.zeros(total, np.float32)
    rows = np.repeat(np.arange(n_out, dtype=np.int64), np.diff(packed.indptr))
    j = np.arange(packed.nnz, dtype=np.int64) - packed.indptr[rows].astype(np.int64)  # position in row
    pos = (sptr[rows // _SLICE].astype(np.int64) + j) * _SLICE + rows % _SLICE
    indices[pos] = packed.indices
    data[pos] = packed.data
    return sptr, indices, data


def _perm_layout(packed: PackedCSR, s: CSRSchedule) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Cell pointers (in steps, one cell per (slice, window), slice-major) and the step-major
    nonzeros of every cell: slot ``(ptr[cell] + j) * 16 + row % 16`` holds the j-th nonzero of
    that row in that window, as its offset in the window (padding: weight 0 at offset 0)."""
    cell, j, steps = _perm_cells(packed, s.window)
    ptr = np.concatenate([[0], np.cumsum(steps)]).astype(np.int32)
    total = int(ptr[-1]) * _SLICE
    offsets = np.zeros(total, np.int64)
    data = np.zeros(total, np.float32)
    rows = np.repeat(np.arange(packed.shape[0], dtype=np.int64), np.diff(packed.indptr))
    pos = (ptr[cell].astype(np.int64) + j) * _SLICE + rows % _SLICE
    offsets[pos] = packed.indices.astype(np.int64) % s.window
    data[pos] = packed.data
    return ptr, offsets, data


def _spmv_layout(packed: PackedCSR, s: CSRSchedule) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The CSR as is, with one gathered vector of padding after the last row, so the masked
    vector at a row's end never reads past the arrays."""
    pad = np.zeros(_GATHER, np.int64)
    indices = np.concatenate([packed.indices.astype(np.int64), pad])
    data = np.concatenate([packed.data.astype(np.float32), pad.astype(np.float32)])
    return packed.indptr.astype(np.int32), indices, data


def csr_args(packed: PackedCSR, m: int, caps: Capabilities | None = None,
             schedule: CSRSchedule | None = None) -> list[np.ndarray]:
    """The arrays :func:`csr_linear`'s kernel takes after x, in order (pointers, indices, data),
    laid out for ``schedule`` (None: :func:`default_schedule`; ``caps`` and ``schedule`` must be
    those :func:`csr_linear` got)."""
    s = schedule or default_schedule(m, packed, caps)
    _check_schedule(m, packed.shape[1], s, caps)
    layout = {"spmm": _spmm_pair_layout if s.pairs else _spmm_layout, "sell": _sell_layout,
              "spmv": _spmv_layout, "perm": _perm_layout}[s.family]
    *ptrs, indices, data = layout(packed, s)
    if len(data) == 0:
        # Kernels declare at least one stored element; it is never read (every row is empty).
        indices, data = np.zeros(1, np.int64), np.zeros(1, np.float32)
    if s.scaled:
        indices = indices % (s.kblock or round_up(packed.shape[1], 16)) * s.tile
    if s.pairs:
        indices = np.concatenate([indices, np.zeros(_stored(packed, s) - len(indices), indices.dtype)])
    return [*ptrs, indices.astype(s.index), store_values(data, s.weights)]


def _slice_store(n_out: int, has_bias: bool, unroll: int):
    """TIR macro shared by the slice kernels (``sell``, ``perm``): add up a slice's ``unroll``
    accumulators and write its 16 outputs (plus bias), a ragged last slice element by element."""
    from tvm.script import tirx as T

    w = _SLICE
    full = n_out // w

    @T.macro
    def store(acc, bias, y, sl):
        for u in T.unroll(1, unroll):
            acc[0, T.Ramp(0, 1, w)] = acc[0, T.Ramp(0, 1, w)] + acc[u, T.Ramp(0, 1, w)]
        if sl < full:
            if has_bias:
                y[0, T.Ramp(sl * w, 1, w)] = acc[0, T.Ramp(0, 1, w)] + bias[T.Ramp(sl * w, 1, w)]
            else:
                y[0, T.Ramp(sl * w, 1, w)] = acc[0, T.Ramp(0, 1, w)]
        else:
            for r in range(n_out - full * w):
                if has_bias:
                    y[0, sl * w + r] = acc[0, r] + bias[sl * w + r]
                else:
                    y[0, sl * w + r] = acc[0, r]

    return store


@cached_builder
def _sell(n_out: int, k: int, total: int, has_bias: bool, unroll: int, idx_dtype: str, weights: str = "float32",
          serial: bool = False):
    from tvm.script import tirx as T

    slices_loop = outer_loop(serial)

    n_sl = ceil_div(n_out, _SLICE)
    w = _SLICE
    stored = stored_dtype(weights)
    store_slice = _slice_store(n_out, has_bias, unroll)

    @T.prim_func
    def kernel(x: T.Buffer((1, k), "float32"), sptr: T.Buffer((n_sl + 1,), "int32"),
               indices: T.Buffer((total,), idx_dtype), data: T.Buffer((total,), stored),
               bias: T.Buffer((n_out,), "float32"), y: T.Buffer((1, n_out), "float32")):
        for sl in slices_loop(n_sl):
            acc = T.decl_buffer((unroll, w), "float32", scope=ACC_SCOPE)
            for u in T.unroll(unroll):
                acc[u, T.Ramp(0, 1, w)] = T.Broadcast(T.float32(0), w)
            j0 = T.meta_var(sptr[sl])
            for q in range((sptr[sl + 1] - sptr[sl]) // unroll):
                for u in T.unroll(unroll):
                    at = T.meta_var((j0 + q * unroll + u) * w)
                    acc[u, T.Ramp(0, 1, w)] = acc[u, T.Ramp(0, 1, w)] + widen(
                        data[T.Ramp(at, 1, w)], weights, w) * _gather(
                        T.address_of(x[0, 0]), T.Cast("int32x16", indices[T.Ramp(at, 1, w)]))
            store_slice(acc, bias, y, sl)

    return kernel


def _permute(xw, idx, window: int):
    """16 f32 of the window ``xw`` (``window`` floats in registers) at the int32x16 offsets ``idx``:
    ``vpermps`` (16), ``vpermi2ps`` (32; it reads the offsets' low 5 bits), or two of those and a
    blend on bit 5 (64)."""
    from tvm.script import tirx as T

    def part(h):
        return xw[T.Ramp(16 * h, 1, 16)]

    if window == 16:
        return T.call_llvm_pure_intrin("float32x16", "llvm.x86.avx512.permvar.sf.512", part(0), idx)
    low = T.call_llvm_pure_intrin("float32x16", "llvm.x86.avx512.vpermi2var.ps.512", part(0), idx, part(1))
    if window == 32:
        return low
    high = T.call_llvm_pure_intrin("float32x16", "llvm.x86.avx512.vpermi2var.ps.512", part(2), idx, part(3))
    return T.Select(idx < T.Broadcast(T.int32(32), 16), low, high)


@cached_builder
def _perm(n_out: int, k: int, total: int, has_bias: bool, unroll: int, window: int, weights: str = "float32",
          serial: bool = False):
    from tvm.script import tirx as T

    slices_loop = outer_loop(serial)

    n_sl = ceil_div(n_out, _SLICE)
    store_slice = _slice_store(n_out, has_bias, unroll)
    nwin = ceil_div(k, window)
    whole = k // window  # windows that lie inside x; the last may be ragged
    w = _SLICE
    stored = stored_dtype(weights)

    @T.prim_func
    def kernel(x: T.Buffer((1, k), "float32"), ptr: T.Buffer((n_sl * nwin + 1,), "int32"),
               offsets: T.Buffer((total,), "uint8"), data: T.Buffer((total,), stored),
               bias: T.Buffer((n_out,), "float32"), y: T.Buffer((1, n_out), "float32")):
        for sl in slices_loop(n_sl):
            acc = T.decl_buffer((unroll, w), "float32", scope=ACC_SCOPE)
            for u in T.unroll(unroll):
                acc[u, T.Ramp(0, 1, w)] = T.Broadcast(T.float32(0), w)
            for wi in range(nwin):
                xw = T.decl_buffer((window,), "float32", scope=ACC_SCOPE)
                if wi < whole:
                    for h in T.unroll(window // 16):
                        xw[T.Ramp(16 * h, 1, 16)] = x[0, T.Ramp(wi * window + 16 * h, 1, 16)]
                else:
                    # the ragged last window: zeros past K (never multiplied by a kept weight)
                    for c in range(window):
                        xw[c] = T.if_then_else(wi * window + c < k, x[0, T.min(wi * window + c, k - 1)],
                                               T.float32(0))
                cell = T.meta_var(sl * nwin + wi)
                p0 = T.meta_var(ptr[cell])
                cnt = T.meta_var(ptr[cell + 1] - ptr[cell])
                for q in range(cnt // unroll):
                    for u in T.unroll(unroll):
                        at = T.meta_var((p0 + q * unroll + u) * w)
                        acc[u, T.Ramp(0, 1, w)] = acc[u, T.Ramp(0, 1, w)] + widen(
                            data[T.Ramp(at, 1, w)], weights, w) * _permute(
                            xw, T.Cast("int32x16", offsets[T.Ramp(at, 1, w)]), window)
                for q in range(cnt // unroll * unroll, cnt):
                    at = T.meta_var((p0 + q) * w)
                    acc[0, T.Ramp(0, 1, w)] = acc[0, T.Ramp(0, 1, w)] + widen(
                        data[T.Ramp(at, 1, w)], weights, w) * _permute(
                        xw, T.Cast("int32x16", offsets[T.Ramp(at, 1, w)]), window)
            store_slice(acc, bias, y, sl)

    return kernel


@cached_builder
def _spmv(n_out: int, k: int, total: int, has_bias: bool, unroll: int, idx_dtype: str, hw_gather: bool,
          v: int = _GATHER, weights: str = "float32", serial: bool = False):
    from tvm.script import tirx as T

    rows_loop = outer_loop(serial)

    stored = stored_dtype(weights)
    step = v * unroll

    @T.prim_func
    def kernel(x: T.Buffer((1, k), "float32"), indptr: T.Buffer((n_out + 1,), "int32"),
               indices: T.Buffer((total,), idx_dtype), data: T.Buffer((total,), stored),
               bias: T.Buffer((n_out,), "float32"), y: T.Buffer((1, n_out), "float32")):
        for n in rows_loop(n_out):
            acc = T.decl_buffer((unroll, v), "float32", scope=ACC_SCOPE)
            tot = T.decl_buffer((1,), "float32", scope=ACC_SCOPE)
            for u in T.unroll(unroll):
                acc[u, T.Ramp(0, 1, v)] = T.Broadcast(T.float32(0), v)
            p0 = T.meta_var(indptr[n])
            count = T.meta_var(indptr[n + 1] - indptr[n])
            for q in range(count // step):
                for u in T.unroll(unroll):
                    at = T.meta_var(p0 + q * step + u * v)
                    if hw_gather:
                        acc[u, T.Ramp(0, 1, v)] = acc[u, T.Ramp(0, 1, v)] + widen(
                            data[T.Ramp(at, 1, v)], weights, v) * _gather(
                            T.address_of(x[0, 0]), T.Cast("int32x16", indices[T.Ramp(at, 1, v)]))
                    else:
                        for lane in T.vectorized(v):
                            acc[u, lane] = acc[u, lane] + widen(data[at + lane], weights) * x[
                                0, T.Cast("int32", indices[at + lane])]
            # The rest of the row, under unroll full vectors: whole vectors, the last one with the
            # weights past the row's end zeroed (the arrays have a vector of padding at the end).
            for q in range(count // step * unroll, (count + v - 1) // v):
                at = T.meta_var(p0 + q * v)
                if hw_gather:
                    acc[0, T.Ramp(0, 1, v)] = acc[0, T.Ramp(0, 1, v)] + T.Select(
                        T.Ramp(q * v, 1, v) < T.Broadcast(count, v), widen(data[T.Ramp(at, 1, v)], weights, v),
                        T.Broadcast(T.float32(0), v)) * _gather(
                        T.address_of(x[0, 0]), T.Cast("int32x16", indices[T.Ramp(at, 1, v)]))
                else:
                    for lane in T.vectorized(v):
                        acc[0, lane] = acc[0, lane] + T.Select(
                            q * v + lane < count, widen(data[at + lane], weights), T.float32(0)) * x[
                            0, T.Cast("int32", indices[at + lane])]
            for u in T.unroll(1, unroll):
                acc[0, T.Ramp(0, 1, v)] = acc[0, T.Ramp(0, 1, v)] + acc[u, T.Ramp(0, 1, v)]
            if has_bias:
                tot[0] = bias[n]
            else:
                tot[0] = T.float32(0)
            for lane in T.unroll(v):
                tot[0] = tot[0] + acc[0, lane]
            y[0, n] = tot[0]

    return kernel


def _shuffle_lanes(bit: int, upper: bool, b: int = 16) -> list[int]:
    """Lanes of the two-source shuffle (lanes 0..b-1 from the lower row of a pair, b..2b-1 from
    the upper) that swaps row-index bit ``bit`` with column-index bit ``bit`` of a b x b block:
    log2(b) such stages (bits 0..3 for 16 x 16, 0..1 for 4 x 4) transpose it."""
    s = 1 << bit
    if upper:
        return [b + c if c & s else c ^ s for c in range(b)]
    return [b + (c ^ s) if c & s else c for c in range(b)]


def _transpose_block(caps: Capabilities | None) -> int:
    """Side of the square blocks the SpMM transposes x and y in, in registers: 16 x 16 where a
    vector holds 8 lanes or more (one or two AVX registers per row), 4 x 4 with 4-lane vectors
    (simd128: one register per row, so every shuffle is one native two-source shuffle)."""
    return 16 if _lanes(caps) >= 8 else 4


@cached_builder
def _spmm(m: int, n_out: int, k: int, nnz: int, has_bias: bool, tile: int, kblock: int, idx_dtype: str,
          chunk: int | None = None, unroll: int = 1, scaled: bool = False, prefetch_out: bool = False,
          prefetch_panel: bool = False, pairs: bool = False, n_values: int = 0, b: int = 16,
          weights: str = "float32"):
    from tvm.script import tirx as T

    if b not in (4, 16):
        raise ValueError(f"SpMM transpose blocks are 4 x 4 or 16 x 16, not {b} x {b}")
    h = b // 2  # rows of each half of a transposed block
    top_bit = b.bit_length() - 2  # the stage across the halves
    nz = max(nnz, 1)
    stored = stored_dtype(weights)
    n_mt = ceil_div(m, tile)
    nkb = ceil_div(k, kblock)
    if chunk is None:
        chunk = _default_chunk(n_out, k, tile, 1)
    n_chunks = ceil_div(n_out, chunk)
    full, tail = divmod(n_out, chunk)
    strips = ceil_div(k, b)
    n_bands = ceil_div(tile, b)
    # Panel prefetch: the next K block's panel lines, spread evenly over this block's rows (pairs).
    panel_lines = kblock * tile // 16
    lines_per_row = ceil_div(panel_lines, chunk // 2 if pairs else chunk)
    n_pairs = ceil_div(n_out, 2)
    ptr_len = nkb * n_pairs * 3 + 1 if pairs else nkb * n_out + 1
    # pairs: one weight per nonzero, fewer indices than weights (see _spmm_pair_layout)
    nv = max(n_values, 1) if pairs else nz

    # Row pairs of stage ``bit`` < top_bit lie within one half of the block, stage top_bit pairs
    # row i of the lower half with row i of the upper. Halves are separate (h x b) buffers: TVM gives a buffer
    # of 1 KiB or more heap workspace instead of a stack slot, and LLVM only keeps stack slots in
    # registers.
    @T.macro
    def _stage_within(src, dst, bit):
        for i in T.unroll(b // 4):
            lo = T.meta_var((i // (1 << bit)) * (2 << bit) + i % (1 << bit))
            first = T.meta_var(src[lo, T.Ramp(0, 1, b)])
            second = T.meta_var(src[lo + (1 << bit), T.Ramp(0, 1, b)])
            dst[lo, T.Ramp(0, 1, b)] = T.Shuffle([first, second], _shuffle_lanes(bit, False, b))
            dst[lo + (1 << bit), T.Ramp(0, 1, b)] = T.Shuffle([first, second], _shuffle_lanes(bit, True, b))

    @T.macro
    def _stage_across(src_lo, src_hi, dst_lo, dst_hi):
        for i in T.unroll(h):
            first = T.meta_var(src_lo[i, T.Ramp(0, 1, b)])
            second = T.meta_var(src_hi[i, T.Ramp(0, 1, b)])
            dst_lo[i, T.Ramp(0, 1, b)] = T.Shuffle([first, second], _shuffle_lanes(top_bit, False, b))
            dst_hi[i, T.Ramp(0, 1, b)] = T.Shuffle([first, second], _shuffle_lanes(top_bit, True, b))

    @T.macro
    def _transpose(lo0, hi0, lo1, hi1):
        # rows of (lo0; hi0) -> columns, result back in (lo0; hi0): b = 16 takes bits 0-2 within
        # the halves and bit 3 across them, b = 4 bit 0 within and bit 1 across
        _stage_within(lo0, lo1, 0)
        _stage_within(hi0, hi1, 0)
        if b == 16:
            _stage_within(lo1, lo0, 1)
            _stage_within(hi1, hi0, 1)
            _stage_within(lo0, lo1, 2)
            _stage_within(hi0, hi1, 2)
        _stage_across(lo1, hi1, lo0, hi0)

    @T.macro
    def _store_row(src, bias, y, row, col, j):
        if row < m:
            if has_bias:
                y[row, T.Ramp(col, 1, b)] = src[j, T.Ramp(0, 1, b)] + bias[T.Ramp(col, 1, b)]
            else:
                y[row, T.Ramp(col, 1, b)] = src[j, T.Ramp(0, 1, b)]

    @T.macro
    def _store_one(yt, bias, y, row, col0, r, mm):
        if has_bias:
            y[row, col0 + r] = yt[r, mm] + bias[col0 + r]
        else:
            y[row, col0 + r] = yt[r, mm]

    def xrow(mt, kb, index):
        # flat offset of column ``index``'s row in x tile ``mt``'s transposed panel; scaled
        # indices are already offsets, from the K block's first column
        if scaled:
            return (mt * k + kb * kblock) * tile + T.Cast("int32", index)
        return mt * (k * tile) + T.Cast("int32", index) * tile

    @T.macro
    def _prefetch_next_panel(xtf, mt, kb, r):
        if prefetch_panel:
            for i in T.unroll(lines_per_row):
                if (kb + 1 < nkb) and (r * lines_per_row + i < panel_lines) and (
                        (kb + 1) * kblock * tile + (r * lines_per_row + i) * 16 < k * tile):
                    T.evaluate(T.call_llvm_intrin("void", "llvm.prefetch.p0", T.address_of(
                        xtf[(mt * k + (kb + 1) * kblock) * tile + (r * lines_per_row + i) * 16]), 0, 3, 1))

    @T.macro
    def do_chunk(x, xt, indptr, shared_before, indices, data, bias, y, c, rows):
        xtf = T.decl_buffer((n_mt * k * tile,), "float32", data=xt.data)
        yt = T.decl_buffer((rows + rows % 2 if pairs else rows, tile), "float32", scope=ACC_SCOPE)
        for mt in range(n_mt):
            if prefetch_out:
                # write ownership of the y lines the transposed store below fills (16 floats each)
                for mm in range(T.min(tile, m - mt * tile)):
                    for line in range(ceil_div(rows, 16)):
                        T.evaluate(T.call_llvm_intrin("void", "llvm.prefetch.p0", T.address_of(
                            y[mt * tile + mm, c * chunk + line * 16]), 1, 3, 1))
            if pairs:
                for kb in range(nkb):
                    for r in range(ceil_div(rows, 2)):
                        _prefetch_next_panel(xtf, mt, kb, r)
                        # one accumulator buffer per row: LLVM keeps buffers under 1 KiB in registers
                        acc_a = T.decl_buffer((tile,), "float32", scope=ACC_SCOPE)
                        acc_b = T.decl_buffer((tile,), "float32", scope=ACC_SCOPE)
                        if kb == 0:
                            for v in T.vectorized(tile):
                                acc_a[v] = T.float32(0)
                                acc_b[v] = T.float32(0)
                        else:
                            for v in T.vectorized(tile):
                                acc_a[v] = yt[2 * r, v]
                                acc_b[v] = yt[2 * r + 1, v]
                        pair = T.meta_var(kb * n_pairs + c * (chunk // 2) + r)
                        seg = T.meta_var(3 * pair)
                        shared_base = T.meta_var(shared_before[pair] - indptr[seg])
                        single_base = T.meta_var(shared_before[pair] + indptr[seg + 1] - indptr[seg])
                        for p in range(indptr[seg], indptr[seg + 1]):
                            # a column both rows keep: one x row, two multiply-adds
                            for v in T.vectorized(tile):
                                acc_a[v] = acc_a[v] + widen(data[shared_base + 2 * p], weights) * xtf[
                                    xrow(mt, kb, indices[p]) + v]
                                acc_b[v] = acc_b[v] + widen(data[shared_base + 2 * p + 1], weights) * xtf[
                                    xrow(mt, kb, indices[p]) + v]
                        for p in range(indptr[seg + 1], indptr[seg + 2]):
                            for v in T.vectorized(tile):
                                acc_a[v] = acc_a[v] + widen(data[single_base + p], weights) * xtf[
                                    xrow(mt, kb, indices[p]) + v]
                        for p in range(indptr[seg + 2], indptr[seg + 3]):
                            for v in T.vectorized(tile):
                                acc_b[v] = acc_b[v] + widen(data[single_base + p], weights) * xtf[
                                    xrow(mt, kb, indices[p]) + v]
                        for v in T.vectorized(tile):
                            yt[2 * r, v] = acc_a[v]
                            yt[2 * r + 1, v] = acc_b[v]
            else:
                for kb in range(nkb):
                    for r in range(rows):
                        _prefetch_next_panel(xtf, mt, kb, r)
                        acc = T.decl_buffer((unroll, tile), "float32", scope=ACC_SCOPE)
                        # The first K block starts from zero (no separate clearing pass over yt).
                        if kb == 0:
                            for v in T.vectorized(tile):
                                acc[0, v] = T.float32(0)
                        else:
                            for v in T.vectorized(tile):
                                acc[0, v] = yt[r, v]
                        for u in T.unroll(1, unroll):
                            for v in T.vectorized(tile):
                                acc[u, v] = T.float32(0)
                        row = T.meta_var(kb * n_out + c * chunk + r)
                        p0 = T.meta_var(indptr[row])
                        cnt = T.meta_var(indptr[row + 1] - indptr[row])
                        for q in range(cnt // unroll):
                            for u in T.unroll(unroll):
                                for v in T.vectorized(tile):
                                    acc[u, v] = acc[u, v] + widen(data[p0 + q * unroll + u], weights) * xtf[
                                        xrow(mt, kb, indices[p0 + q * unroll + u]) + v]
                        for p in range(p0 + cnt // unroll * unroll, indptr[row + 1]):
                            for v in T.vectorized(tile):
                                acc[0, v] = acc[0, v] + widen(data[p], weights) * xtf[xrow(mt, kb, indices[p]) + v]
                        for u in T.unroll(1, unroll):
                            for v in T.vectorized(tile):
                                acc[0, v] = acc[0, v] + acc[u, v]
                        for v in T.vectorized(tile):
                            yt[r, v] = acc[0, v]
            if rows % b == 0 and tile % b == 0:
                # yt holds y^T: transpose it b x b in registers (64 two-source shuffles per 16 x 16 block)
                # so every y row gets b-wide stores; reading yt with stride ``tile`` instead cost
                # one insert per element, about half the kernel's time at 90 % sparsity.
                for rb in range(rows // b):
                    for mb in range(tile // b):
                        if mt * tile + mb * b < m:
                            lo0 = T.decl_buffer((h, b), "float32", scope=ACC_SCOPE)
                            hi0 = T.decl_buffer((h, b), "float32", scope=ACC_SCOPE)
                            lo1 = T.decl_buffer((h, b), "float32", scope=ACC_SCOPE)
                            hi1 = T.decl_buffer((h, b), "float32", scope=ACC_SCOPE)
                            for i in T.unroll(h):
                                lo0[i, T.Ramp(0, 1, b)] = yt[rb * b + i, T.Ramp(mb * b, 1, b)]
                                hi0[i, T.Ramp(0, 1, b)] = yt[rb * b + h + i, T.Ramp(mb * b, 1, b)]
                            _transpose(lo0, hi0, lo1, hi1)
                            for j in T.unroll(h):
                                _store_row(lo0, bias, y, mt * tile + mb * b + j, c * chunk + rb * b, j)
                                _store_row(hi0, bias, y, mt * tile + mb * b + h + j, c * chunk + rb * b, j)
            else:
                # Narrow tiles (few x rows) or a ragged last chunk: read yt strided, b rows at a
                # time (one vector of all ``rows`` took LLVM minutes to compile at 512).
                for mm in range(T.min(tile, m - mt * tile)):
                    for rb in range(rows // b):
                        for r in T.vectorized(b):
                            _store_one(yt, bias, y, mt * tile + mm, c * chunk, rb * b + r, mm)
                    for r in range(rows % b):
                        _store_one(yt, bias, y, mt * tile + mm, c * chunk, rows // b * b + r, mm)

    @T.prim_func
    def kernel(x: T.Buffer((m, k), "float32"), indptr: T.Buffer((ptr_len,), "int32"),
               shared_before: T.Buffer((nkb * n_pairs if pairs else 1,), "int32"),
               indices: T.Buffer((nz,), idx_dtype), data: T.Buffer((nv,), stored),
               bias: T.Buffer((n_out,), "float32"), y: T.Buffer((m, n_out), "float32")):
        # x transposed per tile of rows: xt[t, col, :] is a contiguous vector of x[t*tile : (t+1)*tile, col].
        # One band of 16 x rows per parallel task, walked along K: the band's 16 row streams are
        # read in order, which the prefetcher follows (strips of 16 columns across all the tile's
        # rows read each x row one line at a time, 12 KB apart at K = 3072: the transpose took
        # 1.04x longer over the whole kernel, 768 x 3072, M = 128, 50 %).
        xt = T.decl_buffer((n_mt, k, tile), "float32")
        for s in T.parallel(n_mt * n_bands):
            t = T.meta_var(s // n_bands)
            mb = T.meta_var(s % n_bands)
            for st in range(strips):
                if (mb * b + b <= tile) and (t * tile + mb * b + b <= m) and (st * b + b <= k):
                    # A whole b x b block: transposed in registers (the scalar copy below took
                    # about 6 % of the kernel at 3072 x 768, 90 % sparse).
                    lo0 = T.decl_buffer((h, b), "float32", scope=ACC_SCOPE)
                    hi0 = T.decl_buffer((h, b), "float32", scope=ACC_SCOPE)
                    lo1 = T.decl_buffer((h, b), "float32", scope=ACC_SCOPE)
                    hi1 = T.decl_buffer((h, b), "float32", scope=ACC_SCOPE)
                    for i in T.unroll(h):
                        lo0[i, T.Ramp(0, 1, b)] = x[t * tile + mb * b + i, T.Ramp(st * b, 1, b)]
                        hi0[i, T.Ramp(0, 1, b)] = x[t * tile + mb * b + h + i, T.Ramp(st * b, 1, b)]
                    _transpose(lo0, hi0, lo1, hi1)
                    for j in T.unroll(h):
                        xt[t, st * b + j, T.Ramp(mb * b, 1, b)] = lo0[j, T.Ramp(0, 1, b)]
                        xt[t, st * b + h + j, T.Ramp(mb * b, 1, b)] = hi0[j, T.Ramp(0, 1, b)]
                else:
                    # ragged: past the last x row (zeros), past K, or a tile narrower than b
                    for mm in range(T.min(b, tile - mb * b)):
                        for kk in range(T.min(b, k - st * b)):
                            if t * tile + mb * b + mm < m:
                                xt[t, st * b + kk, mb * b + mm] = x[t * tile + mb * b + mm, st * b + kk]
                            else:
                                xt[t, st * b + kk, mb * b + mm] = T.float32(0)
        for c in T.parallel(n_chunks):
            if c < full:
                do_chunk(x, xt, indptr, shared_before, indices, data, bias, y, c, chunk)
            else:
                do_chunk(x, xt, indptr, shared_before, indices, data, bias, y, c, max(tail, 1))

    return kernel


def csr_linear(m: int, packed: PackedCSR, has_bias: bool, caps: Capabilities,
               name: str = "sparse_linear_csr", schedule: CSRSchedule | None = None):
    """Scheduled TIR PrimFunc for y = x @ W.T (+ b) with W in CSR (arrays from :func:`csr_args`
    with the same ``schedule``; None: :func:`default_schedule`).

    Parameters of the PrimFunc: x (m, K) f32, pointers, indices, data, [bias (N,)], y (m, N) f32.
    """
    n_out, k = packed.shape
    s = schedule or default_schedule(m, packed, caps)
    _check_schedule(m, k, s, caps)
    total = _stored(packed, s)
    # M = 1 kernels small enough to lose more to waking threads than they gain keep to one
    serial = s.family != "spmm" and runs_serial(1, total, caps)
    if s.family == "sell":
        func = _sell(n_out, k, total, has_bias, s.unroll, s.index, s.weights, serial)
    elif s.family == "perm":
        func = _perm(n_out, k, total, has_bias, s.unroll, s.window, s.weights, serial)
    elif s.family == "spmv":
        func = _spmv(n_out, k, total, has_bias, s.unroll, s.index, _has_gather(caps) and s.lanes == _GATHER,
                     s.lanes, s.weights, serial)
    else:
        kblock = s.kblock or round_up(k, 16)
        chunk = s.chunk or _default_chunk(n_out, k, s.tile, caps.threads if caps is not None else 1)
        func = _spmm(m, n_out, k, total, has_bias, s.tile, kblock, s.index, chunk=chunk, unroll=s.unroll,
                     scaled=s.scaled, prefetch_out=s.prefetch_out, prefetch_panel=s.prefetch_panel, pairs=s.pairs,
                     n_values=packed.nnz if s.pairs else 0, b=_transpose_block(caps), weights=s.weights)
        if not s.pairs:
            func = drop_param(func, "shared_before")
    func = func if has_bias else drop_param(func, "bias")
    return finish(func, name, s.describe())
