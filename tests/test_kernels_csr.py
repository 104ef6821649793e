"""The CSR kernels' schedule space: every family, index width and candidate of ``csr_schedules``
against the float64 masked-dense reference, on odd shapes and awkward rows."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

tvm = pytest.importorskip("tvm")

from kernel_check import awkward_rows  # noqa: E402
from kernel_check import check_close as _check  # noqa: E402
from kernel_check import run_kernel as _run  # noqa: E402
from sparsecc.sparsity import pack_csr  # noqa: E402
from sparsecc.targets import get_target  # noqa: E402
from sparsecc.targets.kernels import sparse_kernel  # noqa: E402
from sparsecc.targets.kernels.csr import (  # noqa: E402
    CSRSchedule,
    _spmm_pair_layout,
    csr_args,
    csr_linear,
    csr_schedules,
)

TARGET = get_target("x86")
CAPS = TARGET.capabilities()
HAS_GATHER = "avx512f" in CAPS.features and CAPS.vector_bits >= 512


def _weight(rng: np.random.Generator, n_out: int, k: int, sparsity: float) -> np.ndarray:
    """Random sparsity plus the rows kernels get wrong: empty, fully dense, a single nonzero
    (first and last column), and a row one longer than a gathered vector."""
    w = rng.standard_normal((n_out, k)).astype(np.float32)
    w[rng.random((n_out, k)) < sparsity] = 0
    w = awkward_rows(w, rng)
    w[5] = 0
    w[5, rng.choice(k, min(k, 17), replace=False)] = 1.0
    return w


def _build_and_check(m: int, w: np.ndarray, schedule: CSRSchedule | None, with_bias: bool, seed: int) -> str:
    rng = np.random.default_rng(seed)
    n_out, k = w.shape
    packed = pack_csr(w)
    x = rng.standard_normal((m, k)).astype(np.float32)
    bias = rng.standard_normal(n_out).astype(np.float32) if with_bias else None
    func = csr_linear(m, packed, with_bias, CAPS, "csr_sched", schedule=schedule)
    arrays = csr_args(packed, m, CAPS, schedule=schedule)
    got = _run(func, [x, *arrays] + ([bias] if with_bias else []), m, n_out)
    ref = x.astype(np.float64) @ w.astype(np.float64).T
    _check(got, ref + bias if with_bias else ref)
    return str(func.attrs["sparsecc.schedule"])


SHAPES = [(37, 53), (70, 301), (48, 16)]


@pytest.mark.parametrize("m", [1, 3, 8, 128, 131])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"{s[0]}x{s[1]}")
def test_every_candidate(m: int, shape: tuple[int, int]) -> None:
    rng = np.random.default_rng(m * 1000 + shape[1])
    w = _weight(rng, *shape, sparsity=0.6)
    candidates = csr_schedules(m, pack_csr(w), CAPS)
    assert 2 <= len(candidates) <= 12
    assert len(set(candidates)) == len(candidates), "duplicate candidates"
    for i, schedule in enumerate(candidates):
        desc = _build_and_check(m, w, schedule, with_bias=i % 2 == 0, seed=i)
        assert desc == schedule.describe()


@pytest.mark.parametrize("m", [1, 8, 128])
def test_default_is_first_candidate(m: int) -> None:
    rng = np.random.default_rng(5)
    w = _weight(rng, 40, 301, 0.7)
    packed = pack_csr(w)
    func, arrays = sparse_kernel(m, packed, True, CAPS, "csr_default")
    assert str(func.attrs["sparsecc.schedule"]) == csr_schedules(m, packed, CAPS)[0].describe()
    x = rng.standard_normal((m, 301)).astype(np.float32)
    bias = rng.standard_normal(40).astype(np.float32)
    _check(_run(func, [x, *arrays, bias], m, 40), x.astype(np.float64) @ w.astype(np.float64).T + bias)


FAMILIES_M1 = ["sell", "spmv"] if HAS_GATHER else ["spmv"]


@pytest.mark.parametrize("index", ["uint16", "int32"])
@pytest.mark.parametrize("family", FAMILIES_M1 + ["spmm"])
@pytest.mark.parametrize("unroll", [1, 3])
def test_index_widths(index: str, family: str, unroll: int) -> None:
    m = 5 if family == "spmm" else 1
    rng = np.random.default_rng(unroll)
    w = _weight(rng, 35, 301, 0.5)
    schedule = CSRSchedule(family, index, tile=8, kblock=96 if family == "spmm" else 0, unroll=unroll)
    arrays = csr_args(pack_csr(w), m, CAPS, schedule=schedule)
    assert arrays[1].dtype == np.dtype(index)
    desc = _build_and_check(m, w, schedule, with_bias=True, seed=unroll)
    assert index in desc and f"unroll{unroll}" in desc


@pytest.mark.parametrize("index", ["uint16", "int32"])
@pytest.mark.parametrize("m", [5, 131])
def test_scaled_indices(index: str, m: int) -> None:
    # Indices stored as column * tile: x tiles after the first (m = 131: three tiles of 64 minus
    # padding) add their own panel offset; K blocks of 96 leave a ragged last block.
    rng = np.random.default_rng(m)
    w = _weight(rng, 33, 301, 0.6)
    tile = 8 if m < 16 else 64
    schedule = CSRSchedule("spmm", index, tile=tile, kblock=96, unroll=2, scaled=True)
    packed = pack_csr(w)
    indices = csr_args(packed, m, CAPS, schedule=schedule)[1]
    assert indices.dtype == np.dtype(index)
    assert sorted(indices.astype(np.int64)) == sorted(packed.indices.astype(np.int64) % 96 * tile)
    assert "scaled" in _build_and_check(m, w, schedule, with_bias=m % 2 == 1, seed=m)


@pytest.mark.parametrize("tile", [64, 128])
@pytest.mark.parametrize("prefetch_out, prefetch_panel", [(True, False), (False, True), (True, True)])
def test_prefetches_do_not_change_results(tile: int, prefetch_out: bool, prefetch_panel: bool) -> None:
    # Prefetches only touch addresses: y lines of a ragged last chunk (70 rows in chunks of 32)
    # and of a last x tile cut short (M = 131), panel lines of a ragged last K block (301 = 3 x 96
    # + 13); the result must stay that of the layer.
    rng = np.random.default_rng(tile)
    w = _weight(rng, 70, 301, 0.5)
    plain = CSRSchedule("spmm", "uint16", tile=tile, kblock=96, chunk=32, scaled=True)
    schedule = dataclasses.replace(plain, prefetch_out=prefetch_out, prefetch_panel=prefetch_panel)
    desc = _build_and_check(131, w, schedule, with_bias=True, seed=tile)
    assert ("prefetch-y" in desc) == prefetch_out and ("prefetch-panel" in desc) == prefetch_panel


@settings(max_examples=60, deadline=None)
@given(n_out=st.integers(1, 9), k=st.integers(1, 70), kblock=st.sampled_from([16, 32, 80]),
       density=st.floats(0.0, 1.0), seed=st.integers(0, 2**16))
def test_pair_layout_holds_every_weight_once(n_out: int, k: int, kblock: int, density: float, seed: int) -> None:
    # Rebuilding the weight from the three segments of every (block, pair), with the weight
    # offsets the kernel computes, gives it back exactly; a shared column is stored once.
    rng = np.random.default_rng(seed)
    w = np.where(rng.random((n_out, k)) < density, rng.standard_normal((n_out, k)), 0).astype(np.float32)
    schedule = CSRSchedule("spmm", "int32", tile=16, kblock=kblock, pairs=True)
    ptr, shared_before, indices, data = _spmm_pair_layout(pack_csr(w), schedule)
    n_pairs, nkb = -(-n_out // 2), -(-k // kblock)
    assert len(ptr) == 3 * n_pairs * nkb + 1 and ptr[-1] == len(indices) and len(data) == (w != 0).sum()
    rebuilt = np.zeros((2 * n_pairs, k), np.float32)
    seen = np.zeros(len(data), np.int64)
    for b in range(nkb):
        for g in range(n_pairs):
            i = b * n_pairs + g
            for segment in range(3):
                for p in range(ptr[3 * i + segment], ptr[3 * i + segment + 1]):
                    col = int(indices[p])
                    assert col // kblock == b
                    if segment == 0:
                        at = shared_before[i] - ptr[3 * i] + 2 * p
                        rebuilt[2 * g:2 * g + 2, col] += data[at:at + 2]
                        seen[at:at + 2] += 1
                    else:
                        at = shared_before[i] + ptr[3 * i + 1] - ptr[3 * i] + p
                        rebuilt[2 * g + segment - 1, col] += data[at]
                        seen[at] += 1
    np.testing.assert_array_equal(rebuilt[:n_out], w)
    assert (seen == 1).all()
    assert len(indices) == (w != 0).sum() - int(((w[0:n_out - 1:2] != 0) & (w[1::2] != 0)).sum())


@pytest.mark.parametrize("m, tile, chunk", [(131, 64, 32), (128, 128, 0), (5, 8, 16)])
def test_row_pairs(m: int, tile: int, chunk: int) -> None:
    # An odd row count (the last row pairs with an empty one), an empty row beside a dense one, a
    # ragged last K block and x tile; prefetches on.
    rng = np.random.default_rng(m)
    w = _weight(rng, 71, 301, 0.5)
    w[3] = 0
    w[4] = rng.standard_normal(301)
    schedule = CSRSchedule("spmm", "uint16", tile=tile, kblock=96, chunk=chunk, scaled=True, pairs=True,
                           prefetch_out=True, prefetch_panel=True)
    assert "pairs" in _build_and_check(m, w, schedule, with_bias=m % 2 == 1, seed=m)
    with pytest.raises(ValueError, match="pairs"):
        csr_linear(m, pack_csr(w), False, CAPS, schedule=dataclasses.replace(schedule, unroll=2))


def test_row_pair_kernels_shared_by_layers_of_one_shape() -> None:
    # Per-row pruning gives every layer of a shape the same weight count but different shared
    # columns; the kernel depends only on the count's bucket, so six layers need at most two
    # kernels (the entry counts may straddle a bucket edge), not six.
    import tvm_ffi

    hashes, entries = set(), set()
    for seed in range(6):
        rng = np.random.default_rng(seed)
        w = rng.standard_normal((64, 256)).astype(np.float32)
        w[np.abs(w) < np.sort(np.abs(w), axis=1)[:, 128:129]] = 0
        packed = pack_csr(w)
        schedule = csr_schedules(128, packed, CAPS)[0]
        assert schedule.pairs
        hashes.add(tvm_ffi.structural_hash(csr_linear(128, packed, True, CAPS, "k", schedule=schedule)))
        ptr, _, indices, _ = csr_args(packed, 128, CAPS, schedule=schedule)
        entries.add(int(ptr[-1]))
        assert ptr[-1] <= len(indices) <= ptr[-1] + packed.nnz // 16 and not indices[ptr[-1]:].any()
    assert len(hashes) <= 2 and len(entries) == 6


def test_wide_tile_default_where_rows_are_dense() -> None:
    # M = 128 at 50 % density: row pairs of 8-vector tiles with 24 KiB panels (48 columns); at
    # 90 %: single rows of 4-vector tiles with longer blocks; y lines prefetched in both.
    rng = np.random.default_rng(0)
    dense_rows = csr_schedules(128, pack_csr(_weight(rng, 64, 768, 0.5)), CAPS)[0]
    sparse_rows = csr_schedules(128, pack_csr(_weight(rng, 64, 768, 0.9)), CAPS)[0]
    lanes = CAPS.vector_lanes_f32
    assert (dense_rows.tile, dense_rows.kblock) == (8 * lanes, 24 * 1024 // (32 * lanes) // 16 * 16)
    assert sparse_rows.tile == 4 * lanes and sparse_rows.kblock > dense_rows.kblock
    assert dense_rows.prefetch_out and sparse_rows.prefetch_out
    assert dense_rows.pairs and not sparse_rows.pairs


def test_uint16_column_beyond_int16() -> None:
    # Columns past 32767 must not come back negative from a uint16 index.
    k = 40000
    w = np.zeros((20, k), np.float32)
    w[:, k - 3:] = 1.0
    w[3, 5] = 2.0
    w[7, 32768] = -1.0
    for m in (1, 4):
        candidates = csr_schedules(m, pack_csr(w), CAPS)
        indexed = [c for c in candidates if c.family != "perm"]  # perm stores window offsets
        assert indexed[0].index == "uint16"
        for schedule in dict.fromkeys(candidates[:2] + indexed[:1]):
            _build_and_check(m, w, schedule, with_bias=False, seed=m)


@pytest.mark.parametrize("m", [1, 8, 128])
def test_all_zero_weight(m: int) -> None:
    w = np.zeros((24, 53), np.float32)
    for schedule in csr_schedules(m, pack_csr(w), CAPS)[:3]:
        _build_and_check(m, w, schedule, with_bias=True, seed=0)


def test_sell_slices_of_unequal_rows() -> None:
    # Rows of very different length in one slice: the short ones are padded with zero weights;
    # a last slice of 3 rows takes the scalar store.
    if not HAS_GATHER:
        pytest.skip("the sell family needs AVX-512 gathers")
    rng = np.random.default_rng(11)
    w = _weight(rng, 35, 301, 0.9)
    w[20] = rng.standard_normal(301)
    for unroll in (1, 2, 4):
        _build_and_check(1, w, CSRSchedule("sell", "uint16", unroll=unroll), with_bias=True, seed=unroll)


def test_sell_steps_are_longest_row() -> None:
    if not HAS_GATHER:
        pytest.skip("the sell family needs AVX-512 gathers")
    w = np.zeros((20, 64), np.float32)
    w[0, :10] = 1.0  # slice 0: longest row 10
    w[17, :3] = 2.0  # slice 1 (rows 16..19): longest row 3
    ptr, indices, data = csr_args(pack_csr(w), 1, CAPS, schedule=CSRSchedule("sell", "uint16", unroll=2))
    assert list(ptr) == [0, 10, 14]  # 3 steps rounded up to 4 for unroll 2
    assert len(data) == 14 * 16 and np.count_nonzero(data) == 13


def test_schedule_round_trip() -> None:
    rng = np.random.default_rng(0)
    packed = pack_csr(_weight(rng, 32, 64, 0.5))
    for m in (1, 8, 128):
        for schedule in csr_schedules(m, packed, CAPS):
            d = dataclasses.asdict(schedule)
            assert all(isinstance(v, (int, str, bool)) for v in d.values())
            assert CSRSchedule(**d) == schedule
            assert hash(CSRSchedule(**d)) == hash(schedule)


def test_invalid_schedules_are_refused() -> None:
    packed = pack_csr(np.eye(8, 70000, dtype=np.float32))
    with pytest.raises(ValueError):
        csr_args(packed, 1, CAPS, schedule=CSRSchedule("spmv", "uint16"))  # K > 65536
    with pytest.raises(ValueError):
        csr_linear(4, packed, False, CAPS, schedule=CSRSchedule("sell", "int32"))  # M = 1 only
    with pytest.raises(ValueError):
        csr_linear(4, packed, False, CAPS, schedule=CSRSchedule("spmm", "int32", unroll=0))
    wide = pack_csr(np.eye(8, 2000, dtype=np.float32))
    with pytest.raises(ValueError):  # 1999 * 64 does not fit 16 bits
        csr_args(wide, 128, CAPS, schedule=CSRSchedule("spmm", "uint16", tile=64, kblock=0, scaled=True))
    # ... but 1023 * 64 (a block of 1024 columns) does
    csr_args(wide, 128, CAPS, schedule=CSRSchedule("spmm", "uint16", tile=64, kblock=1024, scaled=True))
    with pytest.raises(ValueError):
        csr_args(wide, 128, CAPS, schedule=CSRSchedule("spmm", "uint16", tile=64, kblock=1040, scaled=True))


needs_permutes = pytest.mark.skipif(not HAS_GATHER, reason="the perm family needs AVX-512 permutes")


@needs_permutes
@pytest.mark.parametrize("window", [16, 32, 64])
@pytest.mark.parametrize("unroll", [1, 2, 4])
@pytest.mark.parametrize("shape", [(35, 301), (48, 64), (17, 53)], ids=lambda s: f"{s[0]}x{s[1]}")
def test_perm_windows(window: int, unroll: int, shape: tuple[int, int]) -> None:
    # K = 301 and 53 leave a ragged last window (zeros past K); 35 and 17 rows a ragged last
    # slice; the awkward rows put nonzeros in the first and last column and a row full of them.
    rng = np.random.default_rng(window + unroll)
    w = _weight(rng, *shape, sparsity=0.6)
    schedule = CSRSchedule("perm", "uint8", unroll=unroll, window=window)
    for weights in ("float32", "bfloat16"):
        chosen = dataclasses.replace(schedule, weights=weights)
        if weights == "bfloat16":
            import torch

            w = torch.from_numpy(w).bfloat16().float().numpy()  # values bf16 holds exactly
        desc = _build_and_check(1, w, chosen, with_bias=unroll != 2, seed=window)
        assert desc == chosen.describe() and f"window{window}" in desc


@needs_permutes
def test_perm_layout_pads_each_window_to_its_longest_row() -> None:
    w = np.zeros((20, 70), np.float32)
    w[0, [1, 2, 3]] = 1.0  # slice 0, window 0: 3 steps
    w[1, [5, 40]] = 2.0  # window 0 and window 1: 1 step each
    w[2, 69] = 3.0  # window 2 (columns 64..69): 1 step
    w[17, [33, 34]] = 4.0  # slice 1, window 1: 2 steps
    schedule = CSRSchedule("perm", "uint8", unroll=2, window=32)
    ptr, offsets, data = csr_args(pack_csr(w), 1, CAPS, schedule=schedule)
    assert list(ptr) == [0, 3, 4, 5, 5, 7, 7]  # cells (slice, window) slice-major, in steps
    assert offsets.dtype == np.uint8 and len(data) == 7 * 16 and np.count_nonzero(data) == 8
    # row 1's second nonzero is step 0 of cell (0, 1), lane 1, at offset 40 - 32
    assert offsets[3 * 16 + 1] == 8 and data[3 * 16 + 1] == 2.0
    assert offsets[4 * 16 + 2] == 69 - 64 and data[4 * 16 + 2] == 3.0
    assert list(offsets[5 * 16 + 1: 7 * 16: 16]) == [1, 2] and list(data[5 * 16 + 1: 7 * 16: 16]) == [4.0, 4.0]
    _build_and_check(1, w, schedule, with_bias=True, seed=3)


@needs_permutes
def test_perm_is_the_m1_default_unless_slices_pad_too_much() -> None:
    rng = np.random.default_rng(2)
    even = _weight(rng, 64, 768, 0.5)
    first = csr_schedules(1, pack_csr(even), CAPS)[0]
    assert (first.family, first.window, first.unroll) == ("perm", 32, 2)
    sparse = rng.standard_normal((64, 768)).astype(np.float32) * (rng.random((64, 768)) > 0.9)
    assert csr_schedules(1, pack_csr(sparse.astype(np.float32)), CAPS)[0].window == 64
    # one fully dense row per slice among rows of a few nonzeros: every window pads to 32
    skewed = np.zeros((64, 768), np.float32)
    skewed[:, ::97] = 1.0
    skewed[::16] = 1.0
    candidates = csr_schedules(1, pack_csr(skewed), CAPS)
    assert candidates[0].family != "perm" and "perm" in {c.family for c in candidates}


@needs_permutes
def test_perm_kernel_permutes_instead_of_gathering() -> None:
    rng = np.random.default_rng(4)
    packed = pack_csr(_weight(rng, 64, 256, 0.5))
    # a one-register permute may come out in the integer domain (vpermd), the same operation
    two_source = ("vpermi2ps", "vpermt2ps")
    for window, instructions in ((16, ("vpermps", "vpermd")), (32, two_source), (64, two_source)):
        func = csr_linear(1, packed, True, CAPS, "perm_asm",
                          schedule=CSRSchedule("perm", "uint8", unroll=2, window=window))
        asm = tvm.compile(func, target=TARGET.tvm_target()).mod.inspect_source("asm")
        assert "vgatherdps" not in asm
        assert any(line.split()[0] in instructions and "zmm" in line
                   for line in asm.splitlines() if line.strip() and not line.strip().startswith((".", "#")))
        assert "vpmovzxbd" in asm  # one-byte offsets widened in one instruction


def test_perm_schedules_are_checked() -> None:
    packed = pack_csr(np.eye(8, 70, dtype=np.float32))
    for bad, m in ((CSRSchedule("perm", "uint8", window=32), 4), (CSRSchedule("perm", "uint8", window=48), 1),
                   (CSRSchedule("perm", "uint16", window=32), 1), (CSRSchedule("sell", "uint16", window=32), 1)):
        with pytest.raises(ValueError):
            csr_linear(m, packed, False, CAPS, schedule=bad)


def test_perm_refuses_unsorted_rows() -> None:
    import dataclasses as dc

    packed = pack_csr(np.eye(16, 64, dtype=np.float32) + np.eye(16, 64, 40, dtype=np.float32))
    shuffled = dc.replace(packed, indices=packed.indices.reshape(16, 2)[:, ::-1].reshape(-1).copy())
    with pytest.raises(ValueError, match="sorted"):
        csr_args(shuffled, 1, CAPS, schedule=CSRSchedule("perm", "uint8", window=32))


@pytest.mark.parametrize("fmt", ["csr", "bsr16x1"])
def test_small_m1_kernels_stay_on_one_thread(fmt: str) -> None:
    # Waking a second, sleeping pool thread cost about 20 us here, more than a small M = 1 kernel
    # takes alone: below SERIAL_BELOW multiply-adds the row loop is serial, above it parallel.
    from sparsecc.sparsity import pack_bsr
    from sparsecc.targets.kernels._common import SERIAL_BELOW

    two = dataclasses.replace(CAPS, threads=2)
    rng = np.random.default_rng(9)
    for n_out, k, serial in ((64, 256, True), (1024, 1024, False)):
        w = rng.standard_normal((n_out, k)).astype(np.float32)
        w *= np.repeat(rng.random((n_out // 16, k)) < 0.6, 16, axis=0)
        packed = pack_csr(w) if fmt == "csr" else pack_bsr(w, (16, 1))
        assert (packed.nnz if fmt == "csr" else w.astype(bool).sum()) < SERIAL_BELOW or not serial
        func, arrays = sparse_kernel(1, packed, True, two, "serial_check")
        assert ("T.parallel" in func.script()) is not serial
        x = rng.standard_normal((1, k)).astype(np.float32)
        bias = rng.standard_normal(n_out).astype(np.float32)
        _check(_run(func, [x, *arrays, bias], 1, n_out), x.astype(np.float64) @ w.astype(np.float64).T + bias)
        if serial:  # one thread has nothing to wake: the loop keeps its parallel form there
            one = dataclasses.replace(CAPS, threads=1)
            assert "T.parallel" in sparse_kernel(1, packed, True, one, "serial_check")[0].script()
