"""The sparse tensor-core kernel (``mma.sp`` m16n8k32), checked without a GPU.

Numerics: the CPU model (``targets/tensor_core_model.py``) runs the kernel's own copies, swizzle and
fragment addressing and decodes every ``mma.sp`` from its registers as the PTX ISA defines them;
it must reproduce the masked-dense layer. Build: TVM's CUDA source compiles with nvcc for sm_80 and
sm_90 without spills, and the SASS holds the expected number of ``HMMA.SP`` and ``LDGSTS``
(cp.async) instructions and no local-memory traffic.
"""

from __future__ import annotations

import re

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from sparsecc.targets import cuda_toolchain as ct
from sparsecc.targets.kernels import tensor_core as tc
from sparsecc.targets.tensor_core_2_4 import pack_2_4
from sparsecc.targets.tensor_core_model import mma_sp, simulate_linear
from target_cases import require


def two_four(n: int, k: int, dtype: torch.dtype, seed: int = 0) -> torch.Tensor:
    """A random (n, k) weight keeping the 2 largest of every 4 inputs, some groups emptier."""
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=gen)
    groups = w.abs().reshape(n, k // 4, 4)
    keep = groups.argsort(-1, descending=True)[..., :2]
    mask = torch.zeros_like(groups, dtype=torch.bool).scatter_(-1, keep, True)
    mask &= torch.rand(n, k // 4, 4, generator=gen) > 0.1  # under-full groups use the fill rule
    return (w * mask.reshape(n, k)).to(dtype)


def check_against_dense(tokens: int, n: int, k: int, dtype: torch.dtype, schedule, bias: bool) -> None:
    w = two_four(n, k, dtype, seed=tokens + n + k)
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(tokens, k, generator=gen).to(dtype)
    b = torch.randn(n, generator=gen) if bias else None
    values, metadata = pack_2_4(w)
    y = simulate_linear(x, values, metadata, b, schedule)
    ref = (x.double() @ w.double().T + (b.double() if bias else 0)).numpy()
    # fp32 accumulation of exact 16-bit products: the error is fp32 rounding over K terms
    bound = 4e-7 * np.sqrt(k) * (x.double().abs() @ w.double().abs().T).numpy() + 1e-6
    assert np.all(np.abs(y - ref) <= bound), np.abs(y - ref).max()


@pytest.mark.parametrize(("tokens", "n", "k", "dtype", "schedule", "bias"), [
    (1, 64, 64, torch.float16, None, True),  # decode: one token in an 8-token tile
    (5, 96, 128, torch.float16, tc.TensorCoreSchedule(32, 8, 8, 32, 1), False),  # one stage, K steps of 32
    (37, 128, 192, torch.bfloat16, tc.TensorCoreSchedule(64, 32, 16, 64, 3), True),  # 3 stages, ragged tokens
    (70, 64, 256, torch.float16, None, True),  # two token blocks, the last one partial
    (64, 256, 128, torch.bfloat16, tc.TensorCoreSchedule(128, 64, 32, 32, 2), False),  # 4 x 2 warps
])
def test_model_matches_masked_dense(tokens, n, k, dtype, schedule, bias) -> None:
    check_against_dense(tokens, n, k, dtype, schedule, bias)


def test_every_candidate_schedule_computes_the_layer() -> None:
    tokens, n, k = 12, 128, 128
    candidates = tc.tensor_core_schedules(tokens, n, k)
    assert candidates[0] == tc.tensor_core_schedule(tokens, n, k) and len(candidates) >= 3
    for schedule in candidates:
        check_against_dense(tokens, n, k, torch.float16, schedule, True)


def test_mma_sp_reads_the_selected_lanes_metadata() -> None:
    """Selector 1 takes its metadata from lanes 2-3 of each quad: the same registers with the
    metadata moved to lanes 0-1 and selector 0 give the same D, and a wrong selector does not."""
    w = two_four(32, 32, torch.float16, seed=3)
    x = torch.randn(8, 32, generator=torch.Generator().manual_seed(4)).half()
    values, metadata = pack_2_4(w)
    y = simulate_linear(x, values, metadata)
    ref = (x.double() @ w.double().T).numpy()
    assert np.allclose(y, ref, rtol=1e-5, atol=1e-5)
    # registers of the second 16-row half (selector 1) built by hand from the kernel's addressing
    lane = np.arange(32)
    v_words = values.contiguous().view(torch.int16).numpy().view(np.uint32)
    x_words = x.contiguous().view(torch.int16).numpy().view(np.uint32)
    meta = metadata.contiguous().numpy().view(np.uint16).view(np.uint32).reshape(-1)
    a = np.stack([v_words[tc.a_fragment(lane, 16, 0, r)] for r in range(4)], axis=1)
    b = np.stack([x_words[tc.b_fragment(lane, 0, 0, r)] for r in range(4)], axis=1)
    e = meta[tc.metadata_word(lane, 0, 0)[1]]
    c = np.zeros((32, 4), np.float32)
    d = mma_sp(a, b, c, e, 1)
    rows, toks = tc.c_fragment(lane, 16, 0, np.arange(4)[:, None])
    assert np.allclose(d.T, ref[toks, rows], rtol=1e-5, atol=1e-5)
    moved = e.reshape(8, 4)[:, [2, 3, 0, 1]].reshape(-1)
    assert np.array_equal(mma_sp(a, b, c, moved, 0), d)
    assert not np.allclose(mma_sp(a, b, c, e, 0), d)


def test_mma_sp_refuses_invalid_metadata() -> None:
    zeros = np.zeros((32, 4), np.uint32)
    with pytest.raises(ValueError, match="twice"):
        mma_sp(zeros, zeros, np.zeros((32, 4), np.float32), np.zeros(32, np.uint32), 0)
    with pytest.raises(ValueError, match="selector"):
        mma_sp(zeros, zeros, np.zeros((32, 4), np.float32), np.full(32, 0x4E4E4E4E, np.uint32), 2)


@pytest.mark.parametrize("words", [8, 16, 32])
def test_swizzle_is_a_permutation_and_fragment_loads_are_bank_conflict_free(words: int) -> None:
    rows = 64
    for row in range(rows):
        assert sorted(tc.swizzle(row, w, words) for w in range(words)) == list(range(words))
    lane = np.arange(32)
    schedule = tc.TensorCoreSchedule(64, 64, 32, 64 if words in (16, 32) else 32)
    if words == schedule.a_words:  # A fragment: rows g, g + 8 of a 16-row half
        for step in range(schedule.k_steps):
            for reg in range(4):
                row, word = tc.a_fragment(lane, 16, step, reg)
                banks = (row * words + tc.swizzle(row, word, words)) % 32
                assert len(set(banks.tolist())) == 32
    if words == schedule.x_words:  # B fragment: token g
        for step in range(schedule.k_steps):
            for reg in range(4):
                tok, word = tc.b_fragment(lane, 8, step, reg)
                banks = (tok * words + tc.swizzle(tok, word, words)) % 32
                assert len(set(banks.tolist())) == 32


def test_refusals_name_the_problem() -> None:
    with pytest.raises(ValueError, match="multiples of 32"):
        tc.tensor_core_schedule(8, 100, 64)
    with pytest.raises(ValueError, match="does not tile"):
        tc.tensor_core_linear(8, 96, 64, False, "k", tc.TensorCoreSchedule(64, 8, 8, 64))
    with pytest.raises(ValueError, match="float16 or bfloat16"):
        tc.tensor_core_linear(8, 64, 64, False, "k", dtype="float32")
    with pytest.raises(ValueError, match="multiple of 32"):
        tc.TensorCoreSchedule(48, 8, 8, 64)


@pytest.mark.parametrize("arch", ct.ARCHS)
@pytest.mark.parametrize(("tokens", "dtype", "schedule"), [
    (1, "float16", None),
    (128, "bfloat16", None),
    (40, "float16", tc.TensorCoreSchedule(128, 64, 32, 32, 3)),
])
def test_cuda_build_sass_and_resources(tmp_path, arch: str, tokens: int, dtype: str, schedule) -> None:
    require(ct.missing(), "the CUDA toolchain (nvcc, nvdisasm)")
    n, k = 768, 768
    func = tc.tensor_core_linear(tokens, n, k, True, "sparse_linear", schedule, dtype)
    sched = schedule or tc.tensor_core_schedule(tokens, n, k)
    source = ct.cuda_source({"sparse_linear": func}, arch)
    assert "mma.sp::ordered_metadata.sync.aligned.m16n8k32.row.col.f32" in source
    cubin = ct.compile_cubin(source, arch, tmp_path)
    (kernel,) = cubin.kernels
    assert kernel.spill_stores == 0 and kernel.spill_loads == 0 and 0 < kernel.registers <= 255
    code = ct.sass_by_kernel(ct.sass(cubin))[kernel.name]
    # one pipeline step issues 2 x (warp tokens / 8) per 32 inputs; nvcc may unroll the K loop
    per_step = 2 * (sched.warp_tokens // 8) * sched.k_steps
    count = len(re.findall(r"HMMA\.SP\.16832\.F32", code))
    assert count % per_step == 0 and per_step <= count <= per_step * (k // sched.block_k)
    assert "LDGSTS" in code  # cp.async global -> shared
    assert not re.search(r"\b(LDL|STL)\b", code)  # no local memory: fragments stay in registers


@settings(max_examples=12, deadline=None)
@given(tokens=st.integers(1, 40), rows=st.sampled_from([32, 64, 96, 128]), k=st.sampled_from([32, 64, 96, 128]),
       dtype=st.sampled_from([torch.float16, torch.bfloat16]), pick=st.integers(0, 31), bias=st.booleans())
def test_model_matches_masked_dense_for_random_problems(tokens, rows, k, dtype, pick, bias) -> None:
    """Any shape on the packing's grid, any candidate schedule that tiles it."""
    candidates = [s for s in tc.tensor_core_schedules(tokens, rows, k) if rows % s.block_rows == 0]
    candidates += [tc.TensorCoreSchedule(32, 8, 8, 32, stages) for stages in (1, 2, 3)]
    check_against_dense(tokens, rows, k, dtype, candidates[pick % len(candidates)], bias)


def test_metadata_words_hold_what_each_lane_hands_mma_sp() -> None:
    """The packed metadata, read as the kernel reads it (32-bit word (step, 32 b + lane) to lane
    ``lane`` = 4 g + t of the warp on rows 32 b ...), holds in its low half the nibbles of row
    32 b + 16 (t // 2) + g for inputs 32 step + 16 (t % 2) ... + 15, and in its high half those of
    the row 8 below: selector t // 2 picks the 16-row half, t % 2 the 16 inputs. This pins the
    layout to the PTX ISA's metadata description independently of the CPU model."""
    n, k = 64, 96
    gen = torch.Generator().manual_seed(7)
    keep = torch.rand(n, k // 4, 4, generator=gen).argsort(-1)[..., :2].sort(-1).values  # exactly 2 of 4
    mask = torch.zeros(n, k // 4, 4, dtype=torch.bool).scatter_(-1, keep, True)
    w = (torch.randn(n, k // 4, 4, generator=gen).abs() + 0.5) * mask
    _, metadata = pack_2_4(w.reshape(n, k).half())
    nibble = (keep[..., 0] | (keep[..., 1] << 2)).numpy()  # (row, group): lower position first
    words = metadata.contiguous().numpy().view(np.uint16).view(np.uint32).reshape(k // 32, n)
    for step in range(k // 32):
        for col in range(n):
            step_, col_ = tc.metadata_word(col % 32, col - col % 32, step)
            assert (step_, col_) == (step, col)
            g, t = (col % 32) // 4, col % 4
            row = col - col % 32 + 16 * (t // 2) + g
            groups = range(8 * step + 4 * (t % 2), 8 * step + 4 * (t % 2) + 4)
            want = sum(int(nibble[row, q]) << (4 * i) for i, q in enumerate(groups))
            want |= sum(int(nibble[row + 8, q]) << (4 * i) for i, q in enumerate(groups)) << 16
            assert int(words[step, col]) == want, (step, col)


def test_schedules_fit_static_shared_memory() -> None:
    assert all(s.shared_bytes() <= tc.SHARED_LIMIT for t in (1, 8, 64, 512)
               for s in tc.tensor_core_schedules(t, 4096, 4096))
    with pytest.raises(ValueError, match="shared memory"):
        tc.TensorCoreSchedule(128, 64, 32, 64, 3)
