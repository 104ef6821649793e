"""Patterns, masks and packed formats: properties (hypothesis) and the ops' reference kernels."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from sparsecc import ops  # noqa: F401 - registers the ops
from sparsecc.errors import SparseccError
from sparsecc.sparsity import (
    NM,
    Block,
    PatternError,
    Unstructured,
    check_sparsity_value,
    parse_pattern,
    plan_violation,
)

SPARSITIES = st.sampled_from([0.0, 0.25, 0.5, 0.7, 0.9])


def _weights(n: int, k: int, seed: int, ties: bool) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=gen)
    if ties:  # a coarse grid makes many equal magnitudes, like 4-bit checkpoints
        w = torch.round(w * 2) / 2
    return w


@settings(max_examples=60, deadline=None)
@given(n=st.integers(1, 24), k=st.integers(1, 40), sparsity=SPARSITIES, seed=st.integers(0, 2**16),
       ties=st.booleans())
def test_unstructured_mask_obeys_pattern_and_packs(n, k, sparsity, seed, ties):
    w = _weights(n, k, seed, ties)
    pattern = Unstructured()
    mask = pattern.mask(w.abs(), sparsity)
    assert pattern.satisfied_by(mask, sparsity)
    masked = (w * mask).numpy()
    packed = pattern.pack(masked)
    assert np.array_equal(packed.to_dense(), masked)
    assert packed.indptr[-1] == packed.nnz == int((masked != 0).sum())


@settings(max_examples=60, deadline=None)
@given(brows=st.integers(1, 4), bcols=st.integers(1, 8), rc=st.sampled_from([(16, 1), (8, 1), (4, 1), (4, 2), (8, 4)]),
       sparsity=SPARSITIES, seed=st.integers(0, 2**16), ties=st.booleans())
def test_block_mask_obeys_pattern_and_packs(brows, bcols, rc, sparsity, seed, ties):
    r, c = rc
    w = _weights(brows * r, bcols * c, seed, ties)
    pattern = Block(r, c)
    mask = pattern.mask(w.abs(), sparsity)
    assert pattern.satisfied_by(mask, sparsity)
    masked = (w * mask).numpy()
    packed = pattern.pack(masked)
    assert np.array_equal(packed.to_dense(), masked)
    assert packed.data.shape[1:] == (r, c)


@settings(max_examples=60, deadline=None)
@given(n=st.integers(1, 16), groups=st.integers(1, 10), nm=st.sampled_from([(2, 4), (4, 8), (1, 4), (2, 8)]),
       seed=st.integers(0, 2**16), ties=st.booleans(), extra_zeros=st.booleans())
def test_nm_mask_obeys_pattern_and_packs(n, groups, nm, seed, ties, extra_zeros):
    keep, m = nm
    w = _weights(n, groups * m, seed, ties)
    if extra_zeros:  # groups with fewer than n non-zeros must pack with padded slots
        w[:, ::3] = 0
    pattern = NM(keep, m)
    mask = pattern.mask(w.abs(), pattern.sparsity)
    assert pattern.satisfied_by(mask, pattern.sparsity)
    masked = (w * mask).numpy()
    packed = pattern.pack(masked)
    assert np.array_equal(packed.to_dense(), masked)
    # Each group's positions are distinct, so every slot addresses its own column.
    pos = packed.positions.reshape(n, groups, keep)
    assert (np.diff(np.sort(pos, axis=2), axis=2) > 0).all()


def test_ties_are_broken_by_index_deterministically():
    w = torch.ones(2, 8)
    mask = Unstructured().mask(w, 0.5)
    assert mask.tolist() == [[True] * 4 + [False] * 4] * 2
    mask = NM(2, 4).mask(w, 0.5)
    assert mask[0].tolist() == [True, True, False, False] * 2


def test_parse_pattern_spellings_and_errors():
    assert parse_pattern("unstructured") == Unstructured()
    assert parse_pattern("block16x1") == Block(16, 1)
    assert parse_pattern("2:4") == NM(2, 4)
    for bad in ("blocky", "4:2", "0:4", "block0x1", "dense"):
        with pytest.raises(PatternError, match="pattern"):
            parse_pattern(bad)


def test_nm_fixes_its_sparsity_and_shapes():
    assert NM(2, 4).check_sparsity(0.5) is None
    assert "fixes sparsity" in NM(2, 4).check_sparsity(0.7)
    assert "multiple of 4" in NM(2, 4).check_shape((8, 30))
    assert "16x1 blocks" in Block(16, 1).check_shape((10, 32))


@pytest.mark.parametrize("value", [-0.1, 1.0, 1.5, float("nan"), "0.5"])
def test_sparsity_outside_range_is_refused(value):
    with pytest.raises(SparseccError, match=r"outside \[0, 1\)"):
        check_sparsity_value(value)


@pytest.mark.parametrize("pattern", ["unstructured", "block8x1", "block4x2", "2:4", "4:8"])
@pytest.mark.parametrize("m", [1, 3, 8])
def test_reference_kernels_match_masked_dense(pattern, m):
    p = parse_pattern(pattern)
    w = _weights(32, 24, 3, ties=False)
    sparsity = p.sparsity if isinstance(p, NM) else 0.6
    masked = w * p.mask(w.abs(), sparsity)
    masked[5] = 0  # an all-zero row
    x = torch.randn(m, 24)
    bias = torch.randn(32)
    packed = p.pack(masked.numpy())
    arrays = [torch.from_numpy(a) for a in packed.arrays().values()]
    if p.packed_format == "nm":
        y = torch.ops.sparsecc.sparse_linear_nm(x, *arrays, p.m, bias)
    else:
        y = getattr(torch.ops.sparsecc, f"sparse_linear_{p.packed_format}")(x, *arrays, bias)
    torch.testing.assert_close(y, torch.nn.functional.linear(x, masked, bias), rtol=1e-5, atol=1e-5)


def test_ops_pass_torch_opcheck():
    w = _weights(16, 8, 0, False)
    packed = Unstructured().pack((w * Unstructured().mask(w.abs(), 0.5)).numpy())
    args = (torch.randn(3, 8), *[torch.from_numpy(a) for a in packed.arrays().values()], torch.randn(16))
    torch.library.opcheck(torch.ops.sparsecc.sparse_linear_csr.default, args)


@settings(max_examples=40, deadline=None)
@given(st.sampled_from(["unstructured", "block16x1", "block4x2", "2:4", "1:4"]),
       st.integers(min_value=0, max_value=2**31 - 1))
def test_kept_weights_that_are_zero_still_fit_the_plan(name: str, seed: int) -> None:
    # Weights on a coarse grid (like SmolLM2's 4-bit ones) have exact zeros among the kept
    # weights; the per-band rounding of block patterns then kept more than a whole-tensor count
    # allowed, which the old upper-bound check wrongly refused.
    pattern = parse_pattern(name)
    sparsity = pattern.sparsity if isinstance(pattern, NM) else 0.7
    gen = torch.Generator().manual_seed(seed)
    scores = torch.rand(32, 576, generator=gen)
    mask = pattern.mask(scores, sparsity)
    weight = torch.where(mask, torch.randn(32, 576, generator=gen), torch.zeros(()))
    weight[torch.rand(32, 576, generator=gen) < 0.3] = 0  # kept weights that are exactly zero
    assert plan_violation(pattern, weight != 0, sparsity) is None
    # One non-zero outside the mask, in a row/band/group that is already full, breaks the plan.
    full = mask.clone()
    outside = (~mask).nonzero()[0]
    full[outside[0], outside[1]] = True
    assert plan_violation(pattern, full, sparsity) is not None


@settings(max_examples=60, deadline=None)
@given(n=st.integers(1, 16), k=st.integers(1, 40), seed=st.integers(0, 2**16), ties=st.booleans(),
       width=st.integers(1, 12), data=st.data())
def test_per_row_sparsities_keep_each_rows_count_in_every_tiling(n, k, seed, ties, width, data):
    """One sparsity per row (a row-wise allocation): the mask keeps each row's own count, keeps
    that row's highest scores, and column ranges decided one at a time add up to the same counts."""
    w = _weights(n, k, seed, ties)
    rows = torch.tensor(data.draw(st.lists(st.sampled_from([0.0, 0.2, 0.5, 0.75, 0.9]), min_size=n, max_size=n)),
                        dtype=torch.float64)
    pattern = Unstructured()
    keep = k - torch.round(rows * k).long()
    mask = pattern.mask(w.abs(), rows)
    assert torch.equal(mask.sum(1), keep)
    assert pattern.satisfied_by(mask, rows) and plan_violation(pattern, mask, rows) is None
    for r in range(n):  # the kept weights of a row are its largest
        kept, dropped = w[r].abs()[mask[r]], w[r].abs()[~mask[r]]
        if len(kept) and len(dropped):
            assert float(kept.min()) >= float(dropped.max())
    tiled = torch.cat([pattern.mask_columns(w.abs()[:, s:s + width], rows, s) for s in range(0, k, width)], 1)
    assert torch.equal(tiled.sum(1), keep)
    # one row over its count breaks the plan, and says so
    if bool((keep < k).any()):
        r = int(torch.nonzero(keep < k)[0])
        over = mask.clone()
        over[r] = True
        assert "per row" in plan_violation(pattern, over, rows)


def test_per_row_sparsities_are_refused_where_rows_cannot_differ():
    rows = torch.full((8,), 0.5, dtype=torch.float64)
    with pytest.raises(PatternError, match="unstructured patterns only"):
        Block(4, 1).mask(torch.rand(8, 8), rows)
    with pytest.raises(PatternError, match="unstructured patterns only"):
        NM(2, 4).mask(torch.rand(8, 8), rows)
    with pytest.raises(PatternError, match="per-row ranking"):
        Unstructured(per_row=False).mask(torch.rand(8, 8), rows)
    with pytest.raises(PatternError, match="8 rows"):
        Unstructured().mask(torch.rand(8, 8), rows[:5])
