"""A CPU model of the sparse tensor-core kernel: the same tiling, copies, swizzle and fragment
loads, and ``mma.sp`` computed from its per-lane registers the way the PTX ISA defines it.

No GPU runs where sparsecc is built, so the arithmetic of
:func:`sparsecc.targets.kernels.tensor_core.tensor_core_linear` is checked here. The model runs
the kernel's program over numpy arrays: every thread block, every pipeline step, every warp with
its 32 lanes as a numpy axis. Asynchronous copies follow ``cp.async`` semantics: from issue until a
``cp.async.wait_group`` retires its commit group, a copy's destination holds garbage (NaN values,
invalid metadata), so a read the kernel's waits do not cover shows up as NaN or an error. The
addresses come from the kernel module's own index functions (``value_chunk``, ``swizzle``,
``a_fragment``, ...), so a wrong address in the kernel is a wrong result here.

What the model does *not* take from the kernel is the meaning of the registers: :func:`mma_sp`
decodes the A, B, C/D fragments and the metadata of
``mma.sp::ordered_metadata.sync.aligned.m16n8k32.row.col.f32.{f16,bf16}`` from the PTX ISA's
description (sparse ``m16n8k32`` fragments; metadata: in each quad of lanes, lanes ``2F`` and
``2F + 1`` for sparsity selector F, lane ``2F + h`` holding inputs ``16h .. 16h + 15`` of rows g
(bits 0-15) and g + 8 (bits 16-31), one 4-bit nibble per group of four inputs, two 2-bit
positions each). Products of 16-bit values are exact in fp32; the sum is taken in float64 and
rounded to fp32 once per instruction, where the hardware's order is unspecified, so results agree
with a float64 reference to fp32 rounding over K.
"""

from __future__ import annotations

import numpy as np
import torch

from .kernels import tensor_core as tc

#: the metadata nibbles the ISA calls invalid (both positions the same)
_INVALID_NIBBLES = (0b0000, 0b0101, 0b1010, 0b1111)


def _halves(words: np.ndarray, dtype: str) -> np.ndarray:
    """(..., 2) float32 values of the two 16-bit elements of 32-bit registers (low half first)."""
    words = np.asarray(words, dtype=np.uint32)
    parts = np.stack([words & 0xFFFF, words >> 16], axis=-1).astype(np.uint16)
    if dtype == "float16":
        return parts.view(np.float16).astype(np.float32)
    return (parts.astype(np.uint32) << 16).view(np.float32)


def mma_sp(a: np.ndarray, b: np.ndarray, c: np.ndarray, e: np.ndarray, selector: int,
           dtype: str = "float16") -> np.ndarray:
    """D of one warp's ``mma.sp ... m16n8k32.row.col.f32`` from per-lane registers: ``a`` (32, 4)
    uint32 (stored 16 x 16 A), ``b`` (32, 4) uint32 (32 x 8 B), ``c`` (32, 4) float32, ``e`` (32,)
    uint32 metadata, ``selector`` 0 or 1. Returns D as (32, 4) float32."""
    if selector not in (0, 1):
        raise ValueError(f"sparsity selector of m16n8k32 is 0 or 1, got {selector}")
    lane = np.arange(32)
    g, t = lane // 4, lane % 4
    # A fragment: a0..a7 = registers 0-3 (two elements each); element i is row g + 8 * (i // 2 % 2),
    # stored column 2t + i % 2 + 8 * (i // 4).
    stored = np.zeros((16, 16), np.float32)
    a_vals = _halves(a, dtype)  # (32, 4, 2)
    for reg in range(4):
        for half in range(2):
            i = 2 * reg + half
            stored[g + 8 * (i // 2 % 2), 2 * t + half + 8 * (i // 4)] = a_vals[:, reg, half]
    # B fragment: element i of lane (g, t) is B[2t + i % 2 + 8 * (i // 2), g]
    dense_b = np.zeros((32, 8), np.float32)
    b_vals = _halves(b, dtype)
    for reg in range(4):
        for half in range(2):
            dense_b[2 * t + half + 8 * reg, g] = b_vals[:, reg, half]
    # metadata: for stored column s of row r, the nibble of group s // 2 lives in lane
    # 4 (r % 8) + 2 * selector + (s // 8), 16-bit half r // 8, bits 4 * (s // 2 % 4) onwards
    dense_a = np.zeros((16, 32), np.float32)
    for r in range(16):
        for group in range(8):
            word = int(e[4 * (r % 8) + 2 * selector + group // 4])
            nibble = (word >> (16 * (r // 8) + 4 * (group % 4))) & 0xF
            if nibble in _INVALID_NIBBLES:
                raise ValueError(f"mma.sp metadata: row {r}, inputs {4 * group}..{4 * group + 3} name position "
                                 f"{nibble & 3} twice (nibble {nibble:04b}), which the ISA leaves undefined")
            for slot in range(2):
                position = (nibble >> (2 * slot)) & 3
                dense_a[r, 4 * group + position] = stored[r, 2 * group + slot]
    # D fragment: element i of lane (g, t) is D[g + 8 * (i // 2), 2t + i % 2]
    product = dense_a.astype(np.float64) @ dense_b.astype(np.float64)
    d = np.empty((32, 4), np.float32)
    for i in range(4):
        rows, cols = g + 8 * (i // 2), 2 * t + i % 2
        d[:, i] = (product[rows, cols] + c[:, i]).astype(np.float32)
    return d


def _words(array: torch.Tensor | np.ndarray) -> np.ndarray:
    """The 32-bit words of a 16-bit array's memory (pairs along its last axis)."""
    if isinstance(array, torch.Tensor):
        array = array.detach().cpu().contiguous().view(torch.int16).numpy()
    return np.ascontiguousarray(array).view(np.uint16).view(np.uint32)


def simulate_linear(x: torch.Tensor, values: torch.Tensor, metadata: torch.Tensor, bias: torch.Tensor | None = None,
                    schedule: tc.TensorCoreSchedule | None = None) -> np.ndarray:
    """y (T, N) float32 as the kernel computes it, for x (T, K) and a weight packed by
    ``pack_2_4`` (values (N, K/2), metadata (N, K/16)), both fp16 or both bf16."""
    dtype = {torch.float16: "float16", torch.bfloat16: "bfloat16"}.get(x.dtype)
    if dtype is None or values.dtype != x.dtype:
        raise ValueError(f"x ({x.dtype}) and values ({values.dtype}) must both be float16 or both bfloat16")
    tokens, k = x.shape
    n_out = values.shape[0]
    sched = schedule or tc.tensor_core_schedule(tokens, n_out, k)
    x_words = _words(x)  # (T, K/2)
    v_words = _words(values)  # (N, K/4)
    meta32 = _words(metadata).reshape(-1)  # (K/32 * N,), memory order (K/32, N)
    bias_np = None if bias is None else bias.detach().cpu().float().numpy()
    y = np.zeros((tokens, n_out), np.float32)
    n_a, n_x, n_e = tc.copy_counts(sched)
    lane = np.arange(32)

    # cp.async as the hardware may run it: a copy's destination holds garbage (NaN values, invalid
    # metadata) from issue until a wait_group retires its commit group, so a read the kernel's
    # waits do not cover computes NaN or raises instead of silently seeing the data.
    poison = np.uint32(0x7E007E00 if dtype == "float16" else 0x7FC07FC0)
    groups: list[list[tuple[np.ndarray, tuple[int, int, slice], np.ndarray]]] = []

    def issue(a_s, x_s, e_s, row0, token0, k_tile, stage):
        copies = []
        for chunk in range(n_a):
            row, word = tc.value_chunk(chunk, sched)
            dst = tc.swizzle(row, word, sched.a_words)
            src = k_tile * sched.block_k // 4 + word
            copies.append((a_s, (stage, row, slice(dst, dst + tc.CHUNK_WORDS)),
                           v_words[row0 + row, src:src + tc.CHUNK_WORDS].copy()))
        for chunk in range(n_x):
            tok, word = tc.x_chunk(chunk, sched)
            dst = tc.swizzle(tok, word, sched.x_words)
            src = k_tile * sched.block_k // 2 + word
            copies.append((x_s, (stage, tok, slice(dst, dst + tc.CHUNK_WORDS)),
                           x_words[min(token0 + tok, tokens - 1), src:src + tc.CHUNK_WORDS].copy()))
        for chunk in range(n_e):
            step, col = tc.metadata_chunk(chunk, sched)
            src = (k_tile * sched.k_steps + step) * n_out + row0 + col
            copies.append((e_s, (stage, step, slice(col, col + tc.CHUNK_WORDS)),
                           meta32[src:src + tc.CHUNK_WORDS].copy()))
        for array, where, _ in copies:
            array[where] = 0 if array is e_s else poison
        groups.append(copies)  # issue and commit: the kernel commits right after its copies

    def commit_empty():
        groups.append([])

    def wait_group(pending: int):
        while len(groups) > pending:
            for array, where, data in groups.pop(0):
                array[where] = data

    k_tiles = k // sched.block_k
    n_frag = sched.warp_tokens // tc.MMA_N
    for bx in range(n_out // sched.block_rows):
        for by in range(-(-tokens // sched.block_tokens)):
            row0, token0 = bx * sched.block_rows, by * sched.block_tokens
            a_s = np.zeros((sched.stages, sched.block_rows, sched.a_words), np.uint32)
            x_s = np.zeros((sched.stages, sched.block_tokens, sched.x_words), np.uint32)
            e_s = np.zeros((sched.stages, sched.k_steps, sched.block_rows), np.uint32)
            acc = np.zeros((sched.warps_m * sched.warps_n, 2, n_frag, 32, 4), np.float32)
            groups.clear()
            for s in range(sched.stages - 1):
                if s < k_tiles:
                    issue(a_s, x_s, e_s, row0, token0, s, s)
                else:
                    commit_empty()
            for kt in range(k_tiles):
                if kt + sched.stages - 1 < k_tiles:
                    issue(a_s, x_s, e_s, row0, token0, kt + sched.stages - 1, (kt + sched.stages - 1) % sched.stages)
                else:
                    commit_empty()
                wait_group(sched.stages - 1)
                stage = kt % sched.stages
                for warp in range(sched.warps_m * sched.warps_n):
                    warp_row0 = warp % sched.warps_m * tc.WARP_ROWS
                    warp_tok0 = warp // sched.warps_m * sched.warp_tokens
                    for step in range(sched.k_steps):
                        step_, col = tc.metadata_word(lane, warp_row0, step)
                        e = e_s[stage, step_, col]
                        a = np.zeros((2, 32, 4), np.uint32)
                        for half in range(2):
                            for reg in range(4):
                                row, word = tc.a_fragment(lane, warp_row0 + 16 * half, step, reg)
                                a[half, :, reg] = a_s[stage, row, tc.swizzle(row, word, sched.a_words)]
                        for f in range(n_frag):
                            b = np.zeros((32, 4), np.uint32)
                            for reg in range(4):
                                tok, word = tc.b_fragment(lane, warp_tok0 + 8 * f, step, reg)
                                b[:, reg] = x_s[stage, tok, tc.swizzle(tok, word, sched.x_words)]
                            for half in range(2):
                                acc[warp, half, f] = mma_sp(a[half], b, acc[warp, half, f], e, half, dtype)
            for warp in range(sched.warps_m * sched.warps_n):
                warp_row0 = warp % sched.warps_m * tc.WARP_ROWS
                warp_tok0 = warp // sched.warps_m * sched.warp_tokens
                for half in range(2):
                    for f in range(n_frag):
                        for reg in range(4):
                            row, tok = tc.c_fragment(lane, row0 + warp_row0 + 16 * half,
                                                     token0 + warp_tok0 + 8 * f, reg)
                            keep = tok < tokens
                            out = acc[warp, half, f, :, reg]
                            if bias_np is not None:
                                out = out + bias_np[row]
                            y[tok[keep], row[keep]] = out[keep]
    return y
