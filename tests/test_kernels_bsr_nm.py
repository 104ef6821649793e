"""BSR and N:M kernels: every block shape and N:M pattern the x86 target offers, every schedule
candidate the explorer may sweep, built for this host and compared with the float64 masked-dense
reference."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

tvm = pytest.importorskip("tvm")

from kernel_check import check_close as _check  # noqa: E402
from kernel_check import reference as _reference  # noqa: E402
from kernel_check import run_kernel as _run  # noqa: E402
from sparsecc.sparsity import pack_bsr, pack_nm, parse_pattern  # noqa: E402
from sparsecc.targets import get_target  # noqa: E402
from sparsecc.targets.kernels import sparse_kernel  # noqa: E402
from sparsecc.targets.kernels.bsr import BSRSchedule, bsr_args, bsr_linear, bsr_schedules  # noqa: E402
from sparsecc.targets.kernels.nm import NMSchedule, nm_args, nm_linear, nm_schedules  # noqa: E402

TARGET = get_target("x86")
CAPS = TARGET.capabilities()
MS = [1, 3, 8, 128]
BLOCKS = [(r, c) for r in (4, 8, 16, 32) for c in (1, 2, 4)]
NM_PATTERNS = [(1, 4), (2, 8), (2, 4), (4, 8)]


def _inputs(rng: np.random.Generator, m: int, n_out: int, k: int, with_bias: bool):
    x = rng.standard_normal((m, k)).astype(np.float32)
    bias = rng.standard_normal(n_out).astype(np.float32) if with_bias else None
    return x, bias


def _bsr_weight(rng: np.random.Generator, block: tuple[int, int], block_rows: int, block_cols: int) -> np.ndarray:
    """Block rows with an odd number of blocks each, an empty block row and a fully dense one."""
    r, c = block
    keep = np.zeros((block_rows, block_cols), bool)
    for i in range(block_rows):
        count = rng.integers(0, block_cols // 2) * 2 + 1  # odd, so chains of 2 and 4 leave a tail
        keep[i, rng.choice(block_cols, count, replace=False)] = True
    keep[1] = False  # an empty block row
    keep[2] = True  # a fully dense block row (odd width)
    w = rng.standard_normal((block_rows * r, block_cols * c)).astype(np.float32)
    return w * np.repeat(np.repeat(keep, r, 0), c, 1)


def _nm_weight(rng: np.random.Generator, n_out: int, k: int, n: int, group: int) -> np.ndarray:
    w = rng.standard_normal((n_out, k)).astype(np.float32)
    groups = w.reshape(n_out, k // group, group)
    order = np.argsort(rng.random(groups.shape), axis=2)
    groups[order >= n] = 0
    w = groups.reshape(n_out, k)
    w[0, :group] = 0  # a group with no nonzero (all its slots are padding)
    w[3] = 0  # an all-zero row
    return w


@pytest.mark.parametrize("m", MS)
@pytest.mark.parametrize("block", BLOCKS, ids=lambda b: f"{b[0]}x{b[1]}")
def test_bsr_blocks(m: int, block: tuple[int, int]) -> None:
    r, c = block
    rng = np.random.default_rng(m * 100 + r * 10 + c)
    w = _bsr_weight(rng, block, 5, 13)
    n_out, k = w.shape
    packed = pack_bsr(w, block)
    assert (np.diff(packed.indptr) % 2 == 1).sum() >= 3, "most block rows should hold an odd count"
    x, bias = _inputs(rng, m, n_out, k, m % 2 == 1)
    func, arrays = sparse_kernel(m, packed, bias is not None, CAPS, "bsr_blocks")
    schedule = str(func.attrs["sparsecc.schedule"])
    assert f"r{r}c{c}" in schedule
    assert arrays[1].dtype == np.uint16, "block-column indices that fit 16 bits are stored as uint16"
    if m > 1 and "mvec" not in schedule:
        # several x rows share a register tile (no tile of one row at M > 1)
        assert "tile1 " not in schedule
    got = _run(func, [x, *arrays] + ([bias] if bias is not None else []), m, n_out)
    _check(got, _reference(x, w, bias))


@pytest.mark.parametrize("m", [1, 8, 128])
@pytest.mark.parametrize("block", [(16, 1), (4, 4), (32, 2)], ids=lambda b: f"{b[0]}x{b[1]}")
def test_bsr_zero_weight(m: int, block: tuple[int, int]) -> None:
    r, c = block
    rng = np.random.default_rng(m + r)
    n_out, k = 2 * r, 6 * c
    w = np.zeros((n_out, k), np.float32)
    x, bias = _inputs(rng, m, n_out, k, True)
    for schedule in bsr_schedules(m, pack_bsr(w, block), CAPS):
        packed = pack_bsr(w, block)
        func = bsr_linear(m, packed, True, CAPS, "bsr_zero", schedule=schedule)
        got = _run(func, [x, *bsr_args(packed, m, CAPS, schedule=schedule), bias], m, n_out)
        _check(got, _reference(x, w, bias))


@pytest.mark.parametrize("m", MS)
@pytest.mark.parametrize("block", [(16, 1), (8, 2), (32, 1), (4, 4)], ids=lambda b: f"{b[0]}x{b[1]}")
def test_bsr_every_candidate(m: int, block: tuple[int, int]) -> None:
    rng = np.random.default_rng(m * 7 + block[0])
    w = _bsr_weight(rng, block, 4, 37)
    n_out, k = w.shape
    packed = pack_bsr(w, block)
    x, bias = _inputs(rng, m, n_out, k, True)
    candidates = bsr_schedules(m, packed, CAPS)
    assert 2 <= len(candidates) <= 12 and len(set(candidates)) == len(candidates)
    ref = _reference(x, w, bias)
    for schedule in candidates:
        func = bsr_linear(m, packed, True, CAPS, "bsr_cand", schedule=schedule)
        assert schedule.describe() in str(func.attrs["sparsecc.schedule"])
        arrays = bsr_args(packed, m, CAPS, schedule=schedule)
        assert arrays[1].dtype == np.dtype(schedule.index)
        _check(_run(func, [x, *arrays, bias], m, n_out), ref)
    # the dispatcher hands an explicit schedule through
    func, arrays = sparse_kernel(m, packed, True, CAPS, "bsr_cand", schedule=candidates[-1])
    assert candidates[-1].describe() in str(func.attrs["sparsecc.schedule"])
    _check(_run(func, [x, *arrays, bias], m, n_out), ref)


@pytest.mark.parametrize("m", [1, 3, 128])
def test_bsr_prefetch_and_int32(m: int) -> None:
    """Prefetching (on by default only for weights larger than L2) and int32 indices."""
    rng = np.random.default_rng(m)
    w = _bsr_weight(rng, (16, 1), 4, 41)
    n_out, k = w.shape
    packed = pack_bsr(w, (16, 1))
    x, bias = _inputs(rng, m, n_out, k, False)
    family = "rowvec" if m == 1 else "rowvec-xt"
    for schedule in (BSRSchedule(family, min(m, 8), 3, 0, "uint16", 5), BSRSchedule(family, 2, 1, 0, "int32", 2)):
        func = bsr_linear(m, packed, False, CAPS, "bsr_pf", schedule=schedule)
        assert "prefetch" in str(func.attrs["sparsecc.schedule"])
        got = _run(func, [x, *bsr_args(packed, m, CAPS, schedule=schedule)], m, n_out)
        _check(got, _reference(x, w, None))


def test_bsr_default_prefetches_large_weights() -> None:
    from sparsecc.sparsity import PackedBSR

    n_out, k = 4096, 4096
    nblocks = n_out // 16 * (k // 2)  # 50 %: 32 MiB of blocks
    packed = PackedBSR((n_out, k), (16, 1), np.arange(0, nblocks + 1, k // 2, dtype=np.int32),
                       np.zeros(nblocks, np.int32), np.zeros((nblocks, 16, 1), np.float32))
    assert bsr_schedules(1, packed, CAPS)[0].prefetch > 0
    small = pack_bsr(np.ones((32, 32), np.float32), (16, 1))
    assert bsr_schedules(1, small, CAPS)[0].prefetch == 0


def test_bsr_schedule_rejects_bad_knobs() -> None:
    packed = pack_bsr(np.ones((32, 8), np.float32), (16, 1))
    with pytest.raises(ValueError):
        bsr_linear(8, packed, False, CAPS, schedule=BSRSchedule("mvec", 16, 1, 5, "uint16"))
    with pytest.raises(ValueError):
        bsr_linear(8, packed, False, CAPS, schedule=BSRSchedule("rowvec", 8, 1, 0, "int8"))
    with pytest.raises(ValueError):
        bsr_linear(8, packed, False, CAPS, schedule=BSRSchedule("colvec", 8, 1, 0, "int32"))
    with pytest.raises(ValueError):  # 16-row blocks fill a vector already: nothing to pack
        bsr_linear(8, packed, False, CAPS, schedule=BSRSchedule("rowvec-xe", 8, 1, 0, "int32"))
    narrow = pack_bsr(np.ones((8, 8), np.float32), (4, 2))
    with pytest.raises(ValueError):  # a tile of x rows that does not fill whole vectors
        bsr_linear(8, narrow, False, CAPS, schedule=BSRSchedule("rowvec-xe", CAPS.vector_lanes_f32 // 4 + 1, 1, 0,
                                                                 "int32"))


@pytest.mark.parametrize("m", MS)
@pytest.mark.parametrize("nm", NM_PATTERNS, ids=lambda p: f"{p[0]}:{p[1]}")
@pytest.mark.parametrize("n_out", [48, 20])
def test_nm_patterns(m: int, nm: tuple[int, int], n_out: int) -> None:
    n, group = nm
    rng = np.random.default_rng(m + n_out + 10 * group + n)
    k = 96
    w = _nm_weight(rng, n_out, k, n, group)
    packed = pack_nm(w, n, group)
    assert not packed.values[0, :n].any(), "the first group of row 0 should be all padding"
    x, bias = _inputs(rng, m, n_out, k, m != 3)
    func, arrays = sparse_kernel(m, packed, bias is not None, CAPS, "nm_patterns")
    assert f"{n}:{group}" in str(func.attrs["sparsecc.schedule"])
    got = _run(func, [x, *arrays] + ([bias] if bias is not None else []), m, n_out)
    _check(got, _reference(x, w, bias))


@pytest.mark.parametrize("m", MS)
@pytest.mark.parametrize("nm", [(2, 4), (1, 4), (2, 8)], ids=lambda p: f"{p[0]}:{p[1]}")
def test_nm_every_candidate(m: int, nm: tuple[int, int]) -> None:
    n, group = nm
    rng = np.random.default_rng(m * 3 + group)
    n_out, k = 32, 200  # K a multiple of 8 but not of 16: the permute schedule is not offered
    if m != 3:
        k = 208  # a multiple of 16: it is, and the mvec K blocks end in a partial one
    w = _nm_weight(rng, n_out, k, n, group)
    packed = pack_nm(w, n, group)
    x, bias = _inputs(rng, m, n_out, k, True)
    candidates = nm_schedules(m, packed, CAPS)
    assert 2 <= len(candidates) <= 12 and len(set(candidates)) == len(candidates)
    ref = _reference(x, w, bias)
    for schedule in candidates:
        func = nm_linear(m, packed, True, CAPS, "nm_cand", schedule=schedule)
        assert schedule.describe() in str(func.attrs["sparsecc.schedule"])
        _check(_run(func, [x, *nm_args(packed, m, CAPS, schedule=schedule), bias], m, n_out), ref)
    func, arrays = sparse_kernel(m, packed, True, CAPS, "nm_cand", schedule=candidates[-1])
    _check(_run(func, [x, *arrays, bias], m, n_out), ref)


@pytest.mark.parametrize("m", [1, 3, 8])
@pytest.mark.parametrize("nm", [(2, 4), (1, 4), (4, 8)], ids=lambda p: f"{p[0]}:{p[1]}")
def test_nm_permute_prefetch(m: int, nm: tuple[int, int]) -> None:
    """Prefetching windows ahead (on by default only for weights larger than L2) runs past the last
    window of a row group into the next one and past the end of the arrays: harmless."""
    if not ("avx512f" in CAPS.features and CAPS.vector_bits == 512):
        pytest.skip("the permute schedule needs AVX-512")
    n, group = nm
    rng = np.random.default_rng(m + group)
    n_out, k = 48, 80
    w = _nm_weight(rng, n_out, k, n, group)
    packed = pack_nm(w, n, group)
    x, bias = _inputs(rng, m, n_out, k, True)
    for schedule in (NMSchedule("permute", m, 4 if m == 1 else 1, 0, 1, 3), NMSchedule("permute", 2, 1, 0, 1, 1)):
        func = nm_linear(m, packed, True, CAPS, "nm_pf", schedule=schedule)
        assert "prefetch" in str(func.attrs["sparsecc.schedule"])
        _check(_run(func, [x, *nm_args(packed, m, CAPS, schedule=schedule), bias], m, n_out), _reference(x, w, bias))


def test_nm_default_prefetches_large_weights() -> None:
    from sparsecc.sparsity import PackedNM

    n_out, k = 4096, 4096
    big = PackedNM((n_out, k), 2, 4, np.zeros((n_out, k // 2), np.float32), np.zeros((n_out, k // 2), np.uint8))
    if "avx512f" in CAPS.features and CAPS.vector_bits == 512:
        assert nm_schedules(1, big, CAPS)[0].prefetch > 0
    small = pack_nm(np.zeros((32, 64), np.float32), 2, 4)
    assert nm_schedules(1, small, CAPS)[0].prefetch == 0


def test_nm_mvec_partial_k_block() -> None:
    # a K block that does not divide K: the last block holds fewer groups
    rng = np.random.default_rng(5)
    n_out, k, m = 40, 100, 37
    w = _nm_weight(rng, n_out, k, 2, 4)
    packed = pack_nm(w, 2, 4)
    x, bias = _inputs(rng, m, n_out, k, True)
    schedule = NMSchedule("mvec", 16, 1, 24, 2)
    func = nm_linear(m, packed, True, CAPS, "nm_kb", schedule=schedule)
    _check(_run(func, [x, *nm_args(packed, m, CAPS, schedule=schedule), bias], m, n_out), _reference(x, w, bias))


def test_nm_schedule_rejects_bad_knobs() -> None:
    packed = pack_nm(np.zeros((20, 24), np.float32), 2, 4)
    with pytest.raises(ValueError):
        nm_linear(1, packed, False, CAPS, schedule=NMSchedule("permute", 1, 1, 0, 1))  # N = 20: no 16-row groups
    with pytest.raises(ValueError):
        nm_linear(32, packed, False, CAPS, schedule=NMSchedule("mvec", 16, 1, 6, 1))  # kblock not whole groups
    with pytest.raises(ValueError):
        nm_linear(32, packed, False, CAPS, schedule=NMSchedule("mvec", 16, 1, 8, 3))  # 3 rows do not divide 20


def test_schedules_round_trip_through_asdict() -> None:
    rng = np.random.default_rng(0)
    bsr_packed = pack_bsr(_bsr_weight(rng, (16, 2), 4, 9), (16, 2))
    nm_packed = pack_nm(_nm_weight(rng, 32, 64, 2, 4), 2, 4)
    for m in MS:
        for s in bsr_schedules(m, bsr_packed, CAPS):
            d = dataclasses.asdict(s)
            assert all(isinstance(v, (int, str, bool)) for v in d.values())
            assert BSRSchedule(**d) == s and BSRSchedule(**d).describe() == s.describe()
        for s in nm_schedules(m, nm_packed, CAPS):
            d = dataclasses.asdict(s)
            assert all(isinstance(v, (int, str, bool)) for v in d.values())
            assert NMSchedule(**d) == s and NMSchedule(**d).describe() == s.describe()


def test_target_patterns_are_runnable() -> None:
    """Every pattern the x86 target advertises packs to a format with a kernel here."""
    for name in TARGET.patterns:
        pattern = parse_pattern(name)
        assert pattern.packed_format in ("csr", "bsr", "nm"), name
    assert TARGET.default_pattern == "block16x1"
