"""Every TIR kernel, built for this host and compared with the masked-dense numpy reference."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

tvm = pytest.importorskip("tvm")

from kernel_check import check_close as _check  # noqa: E402
from kernel_check import reference as _reference  # noqa: E402
from kernel_check import run_kernel as _run  # noqa: E402
from sparsecc.sparsity import pack_bsr, pack_csr, pack_nm  # noqa: E402
from sparsecc.targets import get_target  # noqa: E402
from sparsecc.targets.kernels import dense_args, dense_linear, sparse_kernel  # noqa: E402

TARGET = get_target("x86")
CAPS = TARGET.capabilities()
MS = [1, 3, 8, 128]


def _case(rng: np.random.Generator, m: int, n_out: int, with_bias: bool, k: int):
    x = rng.standard_normal((m, k)).astype(np.float32)
    bias = rng.standard_normal(n_out).astype(np.float32) if with_bias else None
    return x, bias


def _unstructured_weight(rng: np.random.Generator, n_out: int, k: int) -> np.ndarray:
    w = rng.standard_normal((n_out, k)).astype(np.float32)
    w[rng.random((n_out, k)) < 0.7] = 0
    w[2] = 0  # an empty row
    w[5] = rng.standard_normal(k)  # a fully dense row
    w[6, :3] = 0
    w[6, 3:] = 0
    w[6, 0] = 1.5  # a row with a single nonzero
    return w


@pytest.mark.parametrize("m", MS)
@pytest.mark.parametrize("with_bias", [True, False])
def test_csr(m: int, with_bias: bool) -> None:
    rng = np.random.default_rng(m)
    n_out, k = 37, 53
    w = _unstructured_weight(rng, n_out, k)
    x, bias = _case(rng, m, n_out, with_bias, k)
    packed = pack_csr(w)
    func, arrays = sparse_kernel(m, packed, with_bias, CAPS, "csr_test")
    got = _run(func, [x, *arrays] + ([bias] if with_bias else []), m, n_out)
    _check(got, _reference(x, w, bias))


@pytest.mark.parametrize("m", [1, 8, 128])
def test_csr_long_rows(m: int) -> None:
    # Rows longer than a vector exercise the gathered vector loop and its scalar tail.
    rng = np.random.default_rng(7)
    n_out, k = 40, 301
    w = _unstructured_weight(rng, n_out, k)
    w[rng.random((n_out, k)) < 0.5] = 0
    x, bias = _case(rng, m, n_out, True, k)
    func, arrays = sparse_kernel(m, pack_csr(w), True, CAPS, "csr_long")
    _check(_run(func, [x, *arrays, bias], m, n_out), _reference(x, w, bias))


@pytest.mark.parametrize("m", [8, 20, 100, 128, 768])
@pytest.mark.parametrize("n_out", [96, 70], ids=["chunk16", "ragged"])
def test_csr_spmm_tiles(m: int, n_out: int) -> None:
    # The SpMM's edges: a last x-row tile that is partly or wholly padding (m = 20, 100), a last
    # chunk of output rows smaller than the others (96 = 3 x 32 takes the register-transpose
    # store, 70 = 2 x 32 + 6 the strided one), several K blocks of which one holds no nonzero,
    # row pairs from 128 x rows.
    from sparsecc.targets.kernels.csr import _spmm_plan

    rng = np.random.default_rng(m + n_out)
    # K a bit over three L1 panels of this tile, so a fairly dense weight gets four K blocks.
    _, panel, _ = _spmm_plan(m, 1 << 20, n_out, n_out << 20, CAPS)
    k = 3 * panel + 13
    w = rng.standard_normal((n_out, k)).astype(np.float32)
    w[:, k // 5:4 * k // 5] = 0
    w[rng.random((n_out, k)) < 0.2] = 0
    w[2] = 0  # an empty row
    packed = pack_csr(w)
    tile, kblock, pairs = _spmm_plan(m, k, n_out, packed.nnz, CAPS)
    assert pairs == (m >= 128), "rows go in pairs from 128 x rows at this density"
    assert -(-k // kblock) >= 3, "the weight should span several K blocks"
    assert not w[:, kblock:2 * kblock].any(), "the second K block should be empty"
    for with_bias in (True, False):
        x, bias = _case(rng, m, n_out, with_bias, k)
        func, arrays = sparse_kernel(m, packed, with_bias, CAPS, "csr_tiles")
        assert f"tile{tile} kblock{kblock}" in str(func.attrs["sparsecc.schedule"])
        got = _run(func, [x, *arrays] + ([bias] if with_bias else []), m, n_out)
        _check(got, _reference(x, w, bias))


@pytest.mark.parametrize("m", [1, 8, 128])
@pytest.mark.parametrize("fmt", ["csr", "bsr", "nm"])
def test_zero_weight_layer(m: int, fmt: str) -> None:
    rng = np.random.default_rng(3)
    n_out, k = 32, 24
    w = np.zeros((n_out, k), np.float32)
    packed = {"csr": lambda: pack_csr(w), "bsr": lambda: pack_bsr(w, (16, 1)),
              "nm": lambda: pack_nm(w, 2, 4)}[fmt]()
    x, bias = _case(rng, m, n_out, True, k)
    func, arrays = sparse_kernel(m, packed, True, CAPS, f"{fmt}_zero")
    _check(_run(func, [x, *arrays, bias], m, n_out), _reference(x, w, bias))


BLOCKS = [(16, 1), (8, 1), (4, 1), (4, 2), (8, 4), (16, 2), (4, 4)]


@pytest.mark.parametrize("m", MS)
@pytest.mark.parametrize("block", BLOCKS, ids=lambda b: f"{b[0]}x{b[1]}")
def test_bsr(m: int, block: tuple[int, int]) -> None:
    r, c = block
    rng = np.random.default_rng(m * 100 + r * 10 + c)
    n_out, k = 5 * r, 11 * c
    keep = rng.random((n_out // r, k // c)) < 0.5
    keep[1] = False  # an empty block row
    keep[2] = True  # a fully dense block row
    w = rng.standard_normal((n_out, k)).astype(np.float32)
    w *= np.repeat(np.repeat(keep, r, 0), c, 1)
    x, bias = _case(rng, m, n_out, m % 2 == 1, k)
    func, arrays = sparse_kernel(m, pack_bsr(w, block), bias is not None, CAPS, "bsr_test")
    got = _run(func, [x, *arrays] + ([bias] if bias is not None else []), m, n_out)
    _check(got, _reference(x, w, bias))


@pytest.mark.parametrize("m", [32, 45, 64, 131])
@pytest.mark.parametrize("block", [(16, 1), (16, 2), (32, 1)], ids=lambda b: f"{b[0]}x{b[1]}")
def test_bsr_tall_blocks_long_rows(m: int, block: tuple[int, int]) -> None:
    """Tall blocks with long rows of x take the M-vector schedule in row chunks (its own path)."""
    r, c = block
    rng = np.random.default_rng(m * 7 + r + c)
    n_out, k = 3 * r, 300 * c  # k >= 256; odd m leaves a padded tile of x rows
    keep = rng.random((n_out // r, k // c)) < 0.3
    keep[1] = False  # an empty block row
    w = rng.standard_normal((n_out, k)).astype(np.float32)
    w *= np.repeat(np.repeat(keep, r, 0), c, 1)
    x, bias = _case(rng, m, n_out, m % 2 == 1, k)
    func, arrays = sparse_kernel(m, pack_bsr(w, block), bias is not None, CAPS, "bsr_tall_test")
    assert "bsr-mvec" in str(func.attrs["sparsecc.schedule"]) and "rows8" in str(func.attrs["sparsecc.schedule"])
    got = _run(func, [x, *arrays] + ([bias] if bias is not None else []), m, n_out)
    _check(got, _reference(x, w, bias))


@pytest.mark.parametrize("m", MS)
@pytest.mark.parametrize("nm", [(2, 4), (4, 8)], ids=["2:4", "4:8"])
@pytest.mark.parametrize("n_out", [48, 20])
def test_nm(m: int, nm: tuple[int, int], n_out: int) -> None:
    n, group = nm
    rng = np.random.default_rng(m + n_out)
    k = 64
    w = rng.standard_normal((n_out, k)).astype(np.float32)
    groups = w.reshape(n_out, k // group, group)
    order = np.argsort(rng.random(groups.shape), axis=2)
    groups[np.take_along_axis(np.ones_like(groups, bool), order, 2) & (order >= n)] = 0
    w = groups.reshape(n_out, k)
    w[0, :group] = 0  # a group with no nonzeros (padded slots)
    w[3] = 0  # an all-zero row
    x, bias = _case(rng, m, n_out, m != 3, k)
    func, arrays = sparse_kernel(m, pack_nm(w, n, group), bias is not None, CAPS, "nm_test")
    got = _run(func, [x, *arrays] + ([bias] if bias is not None else []), m, n_out)
    _check(got, _reference(x, w, bias))


@pytest.mark.parametrize("m", MS)
@pytest.mark.parametrize("shape", [(70, 45), (64, 600), (40, 300), (130, 517)],
                         ids=["odd", "kblocks", "narrow-panels", "wide-panels-ktail"])
def test_dense(m: int, shape: tuple[int, int]) -> None:
    rng = np.random.default_rng(m)
    n_out, k = shape
    w = rng.standard_normal((n_out, k)).astype(np.float32)
    x, bias = _case(rng, m, n_out, m != 8, k)
    func = dense_linear(m, shape, bias is not None, CAPS, "dense_test")
    got = _run(func, [x, *dense_args(w, m, CAPS)] + ([bias] if bias is not None else []), m, n_out)
    _check(got, _reference(x, w, bias))


@pytest.mark.parametrize("shape", [(24, 96), (40, 300), (1000, 64)], ids=["1.5-vectors", "2.5-vectors", "head"])
def test_dense_tail_panel_padded_to_whole_vectors(shape: tuple[int, int]) -> None:
    """The last, partial panel computes whole vectors (1, 2 or 4) on its zero-padded weights and
    stores only its real outputs, for every candidate schedule."""
    from sparsecc.targets.kernels.dense import dense_schedules

    rng = np.random.default_rng(shape[0])
    n_out, k = shape
    w = rng.standard_normal((n_out, k)).astype(np.float32)
    for m in (1, 9):
        x, bias = _case(rng, m, n_out, True, k)
        for schedule in dense_schedules(m, shape, CAPS):
            func = dense_linear(m, shape, True, CAPS, "dense_tail", schedule=schedule)
            got = _run(func, [x, *dense_args(w, m, CAPS, schedule=schedule), bias], m, n_out)
            _check(got, _reference(x, w, bias))


@pytest.mark.parametrize("m", [3, 8, 45])
@pytest.mark.parametrize("shape", [(10, 70), (70, 45)], ids=["one-panel", "panel-and-tail"])
def test_dense_split_over_m(m: int, shape: tuple[int, int]) -> None:
    """Fewer panels than threads: the x tiles are split over threads too (its own loop structure)."""
    caps = dataclasses.replace(CAPS, threads=3)
    rng = np.random.default_rng(m + shape[0])
    n_out, k = shape
    w = rng.standard_normal((n_out, k)).astype(np.float32)
    x, bias = _case(rng, m, n_out, m != 8, k)
    func = dense_linear(m, shape, bias is not None, caps, "dense_split_test")
    assert m < 8 or "m-split" in str(func.attrs["sparsecc.schedule"])
    got = _run(func, [x, *dense_args(w, m, caps)] + ([bias] if bias is not None else []), m, n_out)
    _check(got, _reference(x, w, bias))


def test_schedule_attr_names_the_schedule() -> None:
    rng = np.random.default_rng(0)
    w = rng.standard_normal((32, 16)).astype(np.float32)
    func, _ = sparse_kernel(1, pack_bsr(w, (16, 1)), False, CAPS, "named")
    assert str(func.attrs["global_symbol"]) == "named"
    assert bool(func.attrs["tirx.is_scheduled"])
    assert "bsr-rowvec" in str(func.attrs["sparsecc.schedule"])


@pytest.mark.parametrize("m", [1, 128])
@pytest.mark.parametrize("fmt", ["csr", "bsr16x1", "bsr4x1", "nm", "dense"])
def test_kernels_use_vector_fma(m: int, fmt: str) -> None:
    rng = np.random.default_rng(1)
    n_out, k = 64, 64
    w = rng.standard_normal((n_out, k)).astype(np.float32)
    w[rng.random((n_out, k)) < 0.5] = 0
    if fmt == "dense":
        func = dense_linear(m, (n_out, k), True, CAPS, "vec_test")
    else:
        packed = {"csr": lambda: pack_csr(w), "bsr16x1": lambda: pack_bsr(w, (16, 1)),
                  "bsr4x1": lambda: pack_bsr(w, (4, 1)),
                  "nm": lambda: pack_nm(np.where(np.arange(k) % 4 < 2, w, 0), 2, 4)}[fmt]()
        func, _ = sparse_kernel(m, packed, True, CAPS, "vec_test")
    asm = tvm.compile(func, target=TARGET.tvm_target()).mod.inspect_source("asm")
    reg = "zmm" if CAPS.vector_bits >= 512 else "ymm"
    if fmt == "bsr4x1" and m == 1:
        reg = "xmm"  # one 4-row block column is one 4-lane vector
    if fmt == "csr" and m == 1:
        # The SpMV gathers x by column index; its multiply-adds are vector-wide all the same.
        assert "vfmadd" in asm or "vmulps" in asm
    else:
        assert "ps\t" in asm and reg in asm and "vfmadd" in asm, f"{fmt} at M={m} is not vectorized"


@pytest.mark.parametrize("m", [1, 11])
@pytest.mark.parametrize("nm", [(2, 4), (4, 8), (1, 2)], ids=["2:4", "4:8", "1:2"])
def test_nm_window_permute(m: int, nm: tuple[int, int]) -> None:
    # Several 16-wide x windows, a partial x-row tile (m = 11 is one tile of 8 and a tail of 3) and
    # groups padded with zero slots: the permute indices are relative to each window.
    n, group = nm
    rng = np.random.default_rng(m * 10 + group)
    n_out, k = 32, 96
    w = rng.standard_normal((n_out, k)).astype(np.float32)
    groups = w.reshape(n_out, k // group, group)
    order = np.argsort(rng.random(groups.shape), axis=2)
    groups[order >= n] = 0
    w = groups.reshape(n_out, k)
    w[1, 16:32] = 0
    x, bias = _case(rng, m, n_out, True, k)
    func, arrays = sparse_kernel(m, pack_nm(w, n, group), True, CAPS, "nm_window")
    if CAPS.vector_bits >= 512 and "avx512f" in CAPS.features:
        assert "nm-permute" in str(func.attrs["sparsecc.schedule"])
    _check(_run(func, [x, *arrays, bias], m, n_out), _reference(x, w, bias))
