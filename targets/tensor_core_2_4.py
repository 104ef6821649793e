"""2:4 weights packed for NVIDIA sparse tensor cores, in the layout CUTLASS and cuSPARSELt read.

A 2:4 weight (every group of 4 consecutive inputs of a row keeps at most 2) of fp16 or bf16 is
stored as

* ``values``: (M, K/2), the kept elements of each group in column order;
* ``metadata``: (M, K/16) int16. Each group's two kept positions are 2-bit indices, the lower
  first, packed as 4 bits (``i0 | i1 << 2``); four groups (16 inputs) fill one 16-bit word, the
  first group in the lowest bits. The words are then reordered for how ``mma.sp`` hands metadata
  to the threads of a warp (CUTLASS's ``ColumnMajorInterleaved<2>`` with its 2 x 2 swap):
  within each 32-row block, row ``r`` moves to ``(r % 8) * 4 + (r % 32) // 8``; in each 2 x 2
  tile of (row, word) the off-diagonal pair trades places; the result is stored column-major in
  pairs of words, ``offset = (word // 2) * 2M + row * 2 + word % 2``.

A group with fewer than two nonzeros still names two positions: its nonzeros, filled up from the
upper pair {2, 3} (no nonzero: 2 and 3; only position 0: 0 and 2; only position 3: 2 and 3),
with zero values. That is the choice torch's converter makes
(``torch.sparse._semi_structured_conversions.sparse_semi_structured_from_dense_cutlass``), so
the packed arrays equal its output bit for bit and can be handed to torch's
``SparseSemiStructuredTensor`` (cuSPARSELt / CUTLASS) on a GPU. Shapes: M a multiple of 32
(the reordering's row block), K a multiple of 32 (words are stored in pairs).
"""

from __future__ import annotations

import numpy as np
import torch
from sparsecc.errors import SparseccError

#: element types the sparse tensor cores take for 2:4 with 16-bit metadata words
DTYPES = (torch.float16, torch.bfloat16)
#: rows of the metadata reordering's block, and inputs per metadata word
ROW_BLOCK, WORD_INPUTS = 32, 16


class TensorCorePackError(SparseccError):
    """A weight that cannot be packed for the sparse tensor cores (shape, dtype or pattern)."""


def _check(weight: torch.Tensor) -> tuple[int, int]:
    if weight.dim() != 2:
        raise TensorCorePackError(f"a 2:4 tensor-core weight is a matrix, got shape {tuple(weight.shape)}")
    if weight.dtype not in DTYPES:
        raise TensorCorePackError(f"2:4 tensor-core packing takes float16 or bfloat16, got {weight.dtype}; "
                                  "convert the weight first (weight.half() or weight.bfloat16())")
    m, k = weight.shape
    if m % ROW_BLOCK or k % (2 * WORD_INPUTS):
        raise TensorCorePackError(
            f"weight {m}x{k}: 2:4 tensor-core packing needs rows a multiple of {ROW_BLOCK} and inputs a multiple "
            f"of {2 * WORD_INPUTS}; keep this layer dense or pad it")
    return m, k


def _word_offsets(m: int, words: int) -> np.ndarray:
    """Flat position of metadata word (row, word) in the reordered layout (module docstring)."""
    row = np.arange(m)[:, None].repeat(words, 1)
    word = np.arange(words)[None, :].repeat(m, 0)
    row = (row // ROW_BLOCK) * ROW_BLOCK + (row % 8) * 4 + (row % ROW_BLOCK) // 8
    # the off-diagonal pair of every 2 x 2 tile trades places
    up = ((row % 2 == 0) & (word % 2 == 1)).astype(np.int64)
    down = ((row % 2 == 1) & (word % 2 == 0)).astype(np.int64)
    row, word = row + up - down, word - up + down
    return (word // 2) * (2 * m) + row * 2 + word % 2


def _positions(nonzero: np.ndarray) -> np.ndarray:
    """(..., 2) kept positions per group of 4 from its nonzero flags: the nonzeros in order,
    filled up from the upper pair {2, 3}."""
    # Rank the four slots: nonzeros first (in order, ranks 0-3), then the zero slots 2, 3, 0, 1.
    fill_rank = np.array([6, 7, 4, 5])
    rank = np.where(nonzero, np.arange(4), fill_rank)
    chosen = np.argsort(rank, axis=-1, kind="stable")[..., :2]
    return np.sort(chosen, axis=-1)


def pack_2_4(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(values (M, K/2) of the weight's dtype, metadata (M, K/16) int16) of a 2:4 weight, in the
    CUTLASS / cuSPARSELt layout (module docstring). Raises :class:`TensorCorePackError` naming the
    first group that keeps more than 2 of 4, or a shape or dtype the tensor cores cannot take."""
    m, k = _check(weight)
    bits = weight.detach().cpu().contiguous().view(torch.int16).numpy().reshape(m, k // 4, 4)
    # -0.0 is a zero too: compare the values, not the bits
    nonzero = weight.detach().cpu().float().numpy().reshape(m, k // 4, 4) != 0
    over = nonzero.sum(axis=-1) > 2
    if over.any():
        row, group = (int(v[0]) for v in np.nonzero(over))
        raise TensorCorePackError(
            f"weight is not 2:4: row {row}, inputs {4 * group}..{4 * group + 3} keep {int(nonzero[row, group].sum())} "
            "of 4; prune it to 2:4 first (pattern 2:4)")
    chosen = _positions(nonzero)
    values = np.take_along_axis(bits, chosen, axis=-1).reshape(m, k // 2)
    nibbles = (chosen[..., 0] | (chosen[..., 1] << 2)).astype(np.uint16).reshape(m, k // WORD_INPUTS, 4)
    words = nibbles[..., 0] | (nibbles[..., 1] << 4) | (nibbles[..., 2] << 8) | (nibbles[..., 3] << 12)
    reordered = np.zeros(m * (k // WORD_INPUTS), np.uint16)
    reordered[_word_offsets(m, k // WORD_INPUTS).ravel()] = words.ravel()
    return (torch.from_numpy(values.copy()).view(weight.dtype),
            torch.from_numpy(reordered.view(np.int16).reshape(m, k // WORD_INPUTS)))


def unpack_2_4(values: torch.Tensor, metadata: torch.Tensor) -> torch.Tensor:
    """The dense (M, K) weight of packed ``values`` and reordered ``metadata`` (the inverse of
    :func:`pack_2_4`)."""
    m, half = values.shape
    k = 2 * half
    if metadata.shape != (m, k // WORD_INPUTS) or metadata.dtype != torch.int16:
        raise TensorCorePackError(f"metadata of shape {tuple(metadata.shape)} / {metadata.dtype} does not belong to "
                                  f"values {tuple(values.shape)}: expected ({m}, {k // WORD_INPUTS}) int16")
    _check(torch.empty(m, k, dtype=values.dtype))
    flat = metadata.contiguous().numpy().view(np.uint16).ravel()
    words = flat[_word_offsets(m, k // WORD_INPUTS)]  # (m, k/16), row-major again
    shifts = np.arange(4, dtype=np.uint16) * 4
    nibbles = (words[..., None] >> shifts) & 0xF  # (m, k/16, 4 groups)
    chosen = np.stack([nibbles & 3, nibbles >> 2], axis=-1).reshape(m, k // 4, 2).astype(np.int64)
    bits = values.contiguous().view(torch.int16).numpy().reshape(m, k // 4, 2)
    dense = np.zeros((m, k // 4, 4), np.int16)
    np.put_along_axis(dense, chosen, bits, axis=-1)
    return torch.from_numpy(dense.reshape(m, k)).view(values.dtype)
