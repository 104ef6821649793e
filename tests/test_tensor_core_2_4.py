"""2:4 packing for NVIDIA sparse tensor cores: bit for bit what torch's CUTLASS-layout converter
writes (so a packed weight can go to cuSPARSELt), a lossless round trip, and clear refusals."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from sparsecc.targets.tensor_core_2_4 import TensorCorePackError, pack_2_4, unpack_2_4
from torch.sparse._semi_structured_conversions import (
    sparse_semi_structured_from_dense_cutlass,
    sparse_semi_structured_to_dense_cutlass,
)


def _two_of_four(m: int, k: int, dtype: torch.dtype, seed: int = 0, keep: int = 2) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    kept = torch.rand(m, k // 4, 4, generator=gen).argsort(-1)[..., :keep]
    mask = torch.zeros(m, k // 4, 4, dtype=torch.bool).scatter_(-1, kept, True).reshape(m, k)
    # values away from zero: a kept value that rounds to 0 would be a pattern of its own
    values = (torch.rand(m, k, generator=gen) + 0.5) * torch.where(torch.rand(m, k, generator=gen) < 0.5, -1, 1)
    return torch.where(mask, values, 0.0).to(dtype)  # +0.0 where pruned (unpacking writes +0.0)


def _assert_same_bits(a: torch.Tensor, b: torch.Tensor) -> None:
    assert a.shape == b.shape and a.dtype == b.dtype
    assert torch.equal(a.view(torch.int16), b.view(torch.int16))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("shape", [(32, 32), (64, 128), (96, 64), (256, 768)], ids=lambda s: f"{s[0]}x{s[1]}")
def test_packing_is_torchs_cutlass_layout_bit_for_bit(dtype: torch.dtype, shape: tuple[int, int]) -> None:
    w = _two_of_four(*shape, dtype)
    values, metadata = pack_2_4(w)
    ref_values, ref_metadata = sparse_semi_structured_from_dense_cutlass(w)
    _assert_same_bits(values, ref_values)
    assert metadata.dtype == torch.int16 and torch.equal(metadata, ref_metadata)
    _assert_same_bits(unpack_2_4(values, metadata), w)
    _assert_same_bits(sparse_semi_structured_to_dense_cutlass(values, metadata), w)


def test_groups_with_fewer_than_two_nonzeros_match_torch() -> None:
    # every mask of at most 2 nonzeros (11 of the 16), in every group position of a 16-input word
    # and in every row of a 32-row block, where the reordering moves words
    masks = [g for g in range(16) if bin(g).count("1") <= 2]
    w = torch.zeros(64, 64)
    for row in range(64):
        for group in range(16):
            mask = masks[(row + group) % len(masks)]
            for slot in range(4):
                if mask >> slot & 1:
                    w[row, 4 * group + slot] = 1.0 + slot + 0.25 * (row % 7)
    w = w.half()
    values, metadata = pack_2_4(w)
    ref_values, ref_metadata = sparse_semi_structured_from_dense_cutlass(w)
    _assert_same_bits(values, ref_values)
    assert torch.equal(metadata, ref_metadata)
    _assert_same_bits(unpack_2_4(values, metadata), w)


@settings(max_examples=25, deadline=None)
@given(rows=st.integers(1, 3), words=st.integers(1, 3), keep=st.integers(0, 2), seed=st.integers(0, 2**16),
       bf16=st.booleans())
def test_round_trip_and_torch_agree_on_random_masks(rows: int, words: int, keep: int, seed: int, bf16: bool) -> None:
    dtype = torch.bfloat16 if bf16 else torch.float16
    w = _two_of_four(32 * rows, 32 * words, dtype, seed, keep)
    values, metadata = pack_2_4(w)
    _assert_same_bits(unpack_2_4(values, metadata), w)
    ref_values, ref_metadata = sparse_semi_structured_from_dense_cutlass(w)
    _assert_same_bits(values, ref_values)
    assert torch.equal(metadata, ref_metadata)


def test_refusals_name_the_problem() -> None:
    w = _two_of_four(32, 64, torch.float16)
    w[3, 8:12] = 1.0  # a group keeping 4 of 4
    with pytest.raises(TensorCorePackError, match="row 3, inputs 8..11 keep 4 of 4"):
        pack_2_4(w)
    with pytest.raises(TensorCorePackError, match="float16 or bfloat16"):
        pack_2_4(_two_of_four(32, 64, torch.float32))
    with pytest.raises(TensorCorePackError, match="multiple of 32"):
        pack_2_4(_two_of_four(16, 64, torch.float16))
    with pytest.raises(TensorCorePackError, match="multiple of 32"):
        pack_2_4(_two_of_four(32, 48, torch.float16))
    values, metadata = pack_2_4(_two_of_four(32, 64, torch.float16))
    with pytest.raises(TensorCorePackError, match="does not belong"):
        unpack_2_4(values, metadata[:, :2])
