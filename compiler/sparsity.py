"""Sparsity patterns, masks and packed weight formats.

A *pattern* says which zeros are allowed (unstructured, r x c blocks, N:M groups); a *packed
format* says how the surviving weights are stored (CSR, BSR, N:M values + indices). Both work on a
linear layer's weight ``W`` of shape ``(N, K)`` (output features x input features), the layout
``torch.nn.functional.linear`` uses: ``y = x @ W.T + b``.

Mask selection is deterministic: scores are ranked with a stable sort and ties go to the lower
flat index, never ``abs(w) <= threshold`` (quantized checkpoints have many equal magnitudes).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np
import torch

from .errors import SparseccError


class PatternError(SparseccError):
    """A pattern name that does not parse, or a weight shape a pattern cannot tile."""


@dataclass(frozen=True)
class Pattern:
    """Base of all sparsity patterns. ``name`` is the spelling used on the CLI and in plans."""

    @property
    def name(self) -> str:  # pragma: no cover - overridden
        raise NotImplementedError

    @property
    def packed_format(self) -> str:
        raise NotImplementedError

    def check_shape(self, shape: tuple[int, int]) -> str | None:
        """Return why a weight of ``shape`` cannot use this pattern, or None when it can."""
        return None

    def check_sparsity(self, sparsity: float) -> str | None:
        """Return why ``sparsity`` is impossible for this pattern, or None when it is possible."""
        return None

    def mask(self, scores: torch.Tensor, sparsity: float) -> torch.Tensor:
        """Boolean keep-mask of ``scores``' shape that zeroes the lowest-scoring ``sparsity``."""
        raise NotImplementedError

    def satisfied_by(self, mask: torch.Tensor, sparsity: float) -> bool:
        """Whether ``mask`` obeys the pattern at ``sparsity`` (used by verifiers and tests)."""
        raise NotImplementedError

    @property
    def column_unit(self) -> int:
        """Input columns the pattern decides together (a block's width, an N:M group)."""
        return 1

    @property
    def independent_groups(self) -> bool:
        """Whether every group of :attr:`column_unit` columns has its own budget (N:M), so a
        method may decide the groups one at a time with nothing lost."""
        return False

    def mask_columns(self, scores: torch.Tensor, sparsity: float, start: int) -> torch.Tensor:
        """Keep-mask for columns ``[start, start + w)`` of a weight, ``scores`` being those columns'
        (N, w) scores; ``start`` and ``w`` are multiples of :attr:`column_unit`. The masks of
        ranges that tile all K columns together obey the pattern at ``sparsity`` exactly: each range keeps its
        share of the row's (or band's) budget, so methods that decide a range at a time
        (SparseGPT's adaptive mask selection) produce a mask the kernels accept."""
        raise NotImplementedError

    def fits_within(self, nonzero: torch.Tensor, sparsity: float) -> bool:
        """Whether the non-zeros ``nonzero`` lie inside some mask this pattern could produce at
        ``sparsity`` (a kept weight may be exactly zero, so a weight's non-zeros can be fewer than
        the mask keeps, but never outside its structure or more per unit)."""
        raise NotImplementedError

    def pack(self, weight: np.ndarray) -> Packed:
        """Pack a masked-dense weight obeying this pattern into its packed format."""
        raise NotImplementedError

    def __str__(self) -> str:
        return self.name


def _keep_count(total: int, sparsity: float) -> int:
    return total - int(round(total * sparsity))


def _keep_between(start: int, end: int, sparsity: float) -> int:
    """The kept units among units ``[start, end)`` of a row: the difference of the cumulative
    budgets, so consecutive ranges add up to exactly ``_keep_count(total, sparsity)`` (the
    cumulative budget grows by 0 or 1 per unit, so every range gets between 0 and its width)."""
    return _keep_count(end, sparsity) - _keep_count(start, sparsity)


def _row_keep(total: int, sparsity: float | torch.Tensor) -> int | torch.Tensor:
    """Kept units of a row of ``total``: an int for one sparsity, an (N,) tensor for per-row
    sparsities (rounded like :func:`_keep_count`: half to even)."""
    if isinstance(sparsity, torch.Tensor):
        return total - torch.round(sparsity.double() * total).long()
    return _keep_count(total, sparsity)


def _scalar_sparsity(pattern: Pattern, sparsity: float | torch.Tensor) -> float:
    """``sparsity`` as one number; per-row sparsities are for unstructured per-row patterns only."""
    if isinstance(sparsity, torch.Tensor):
        raise PatternError(f"per-row sparsities apply to unstructured patterns only, not {pattern.name}; "
                           "drop the layer's row_sparsity from the plan")
    return sparsity


def _top_per_row(scores: torch.Tensor, keep: int | torch.Tensor) -> torch.Tensor:
    """Keep-mask of the ``keep`` highest scores in each row (``keep`` an int or one count per row)."""
    mask = torch.zeros_like(scores, dtype=torch.bool)
    if isinstance(keep, int):
        mask.scatter_(1, _stable_top(scores, keep, dim=1), True)
        return mask
    order = torch.sort(-scores, dim=1, stable=True).indices
    rank = torch.arange(scores.shape[1]).expand_as(scores)
    mask.scatter_(1, order, rank < keep[:, None])
    return mask


def _stable_top(scores: torch.Tensor, keep: int, dim: int = -1) -> torch.Tensor:
    """Indices of the ``keep`` largest scores along ``dim``; ties go to the lower index."""
    # Sorting the negated scores stably puts the largest first and keeps index order on ties.
    order = torch.sort(-scores, dim=dim, stable=True).indices
    return order.narrow(dim, 0, keep)


@dataclass(frozen=True)
class Unstructured(Pattern):
    """Any element may be zero. Ranking is per output row (``per_row=True``, Wanda's comparison
    group, which also balances CSR rows) or over the whole layer. Either way a mask fits the
    pattern at one sparsity when the layer keeps no more than its budget (:meth:`fits_within`):
    rows may differ, as SparseGPT's block-wide selection makes them.

    With ``per_row``, ``sparsity`` may also be an (N,) tensor: one sparsity per output row (the
    row-wise ratios of a NeuroAL-style allocation); every method that takes a sparsity accepts it.
    """

    per_row: bool = True

    @property
    def name(self) -> str:
        return "unstructured"

    @property
    def packed_format(self) -> str:
        return "csr"

    def pack(self, weight: np.ndarray) -> Packed:
        return pack_csr(weight)

    def _check_rows(self, sparsity: float | torch.Tensor, rows: int) -> None:
        if isinstance(sparsity, torch.Tensor):
            if not self.per_row:
                raise PatternError("per-row sparsities need per-row ranking (per_row=True)")
            if sparsity.shape != (rows,):
                raise PatternError(f"{tuple(sparsity.shape)} per-row sparsities for a weight with {rows} rows")

    def mask(self, scores: torch.Tensor, sparsity: float | torch.Tensor) -> torch.Tensor:
        self._check_rows(sparsity, scores.shape[0])
        if self.per_row:
            return _top_per_row(scores, _row_keep(scores.shape[1], sparsity))
        flat = scores.reshape(-1)
        mask = torch.zeros_like(flat, dtype=torch.bool)
        mask[_stable_top(flat, _keep_count(flat.numel(), sparsity))] = True
        return mask.reshape(scores.shape)

    def mask_columns(self, scores: torch.Tensor, sparsity: float | torch.Tensor, start: int) -> torch.Tensor:
        self._check_rows(sparsity, scores.shape[0])
        width = scores.shape[1]
        if self.per_row:
            keep = _row_keep(start + width, sparsity) - _row_keep(start, sparsity)
            return _top_per_row(scores, keep)
        mask = torch.zeros_like(scores, dtype=torch.bool)
        rows = scores.shape[0]
        keep = _keep_between(rows * start, rows * (start + width), sparsity)
        mask.reshape(-1)[_stable_top(scores.reshape(-1), keep)] = True
        return mask

    def satisfied_by(self, mask: torch.Tensor, sparsity: float | torch.Tensor) -> bool:
        self._check_rows(sparsity, mask.shape[0])
        # at one sparsity the layer's exact budget satisfies it, however the rows share it
        if not isinstance(sparsity, torch.Tensor) and int(mask.sum()) == _keep_count(mask.numel(), sparsity):
            return True
        return self.per_row and bool((mask.sum(1) == _row_keep(mask.shape[1], sparsity)).all())

    def fits_within(self, nonzero: torch.Tensor, sparsity: float | torch.Tensor) -> bool:
        """Per-row sparsities bind every row. At one sparsity the CSR kernels take rows of any
        length, so a mask ranked over more than a row (SparseGPT's paper selection, one threshold
        per block of columns) fits when the layer keeps no more than its budget; a per-row mask
        fits too, though its rounding per row may keep a few more than the layer's rounding."""
        self._check_rows(sparsity, nonzero.shape[0])
        if not isinstance(sparsity, torch.Tensor) and int(nonzero.sum()) <= _keep_count(nonzero.numel(), sparsity):
            return True
        return self.per_row and bool((nonzero.sum(1) <= _row_keep(nonzero.shape[1], sparsity)).all())


@dataclass(frozen=True)
class Block(Pattern):
    """Blocks of ``rows`` output features x ``cols`` input features are kept or zeroed whole.

    Blocks are ranked within each band of ``rows`` output rows, so every band keeps the same number
    of blocks (balanced work for row-parallel kernels).
    """

    rows: int
    cols: int

    @property
    def name(self) -> str:
        return f"block{self.rows}x{self.cols}"

    @property
    def packed_format(self) -> str:
        return "bsr"

    def pack(self, weight: np.ndarray) -> Packed:
        return pack_bsr(weight, (self.rows, self.cols))

    def check_shape(self, shape: tuple[int, int]) -> str | None:
        n, k = shape
        if n % self.rows or k % self.cols:
            needs = [f"N % {self.rows} == 0"] + ([f"K % {self.cols} == 0"] if self.cols > 1 else [])
            return (f"weight {n}x{k} is not a whole number of {self.rows}x{self.cols} blocks "
                    f"(needs {' and '.join(needs)})")
        return None

    def block_scores(self, scores: torch.Tensor) -> torch.Tensor:
        n, k = scores.shape
        return scores.reshape(n // self.rows, self.rows, k // self.cols, self.cols).sum(dim=(1, 3))

    def mask(self, scores: torch.Tensor, sparsity: float) -> torch.Tensor:
        sparsity = _scalar_sparsity(self, sparsity)
        n, k = scores.shape
        block = self.block_scores(scores)
        keep = _keep_count(block.shape[1], sparsity)
        block_mask = torch.zeros_like(block, dtype=torch.bool)
        block_mask.scatter_(1, _stable_top(block, keep, dim=1), True)
        return block_mask.repeat_interleave(self.rows, 0).repeat_interleave(self.cols, 1)

    @property
    def column_unit(self) -> int:
        return self.cols

    def mask_columns(self, scores: torch.Tensor, sparsity: float, start: int) -> torch.Tensor:
        sparsity = _scalar_sparsity(self, sparsity)
        block = self.block_scores(scores)
        first = start // self.cols
        keep = _keep_between(first, first + block.shape[1], sparsity)
        block_mask = torch.zeros_like(block, dtype=torch.bool)
        block_mask.scatter_(1, _stable_top(block, keep, dim=1), True)
        return block_mask.repeat_interleave(self.rows, 0).repeat_interleave(self.cols, 1)

    def satisfied_by(self, mask: torch.Tensor, sparsity: float) -> bool:
        sparsity = _scalar_sparsity(self, sparsity)
        n, k = mask.shape
        blocks = mask.reshape(n // self.rows, self.rows, k // self.cols, self.cols)
        uniform = (blocks.all(dim=(1, 3)) | ~blocks.any(dim=(1, 3))).all()
        keep = _keep_count(k // self.cols, sparsity)
        return bool(uniform) and bool((blocks.all(dim=(1, 3)).sum(1) == keep).all())

    def fits_within(self, nonzero: torch.Tensor, sparsity: float) -> bool:
        sparsity = _scalar_sparsity(self, sparsity)
        n, k = nonzero.shape
        touched = nonzero.reshape(n // self.rows, self.rows, k // self.cols, self.cols).any(dim=(1, 3))
        return bool((touched.sum(1) <= _keep_count(k // self.cols, sparsity)).all())


@dataclass(frozen=True)
class NM(Pattern):
    """At most ``n`` non-zeros in every group of ``m`` consecutive input features of a row."""

    n: int
    m: int

    @property
    def name(self) -> str:
        return f"{self.n}:{self.m}"

    @property
    def packed_format(self) -> str:
        return "nm"

    def pack(self, weight: np.ndarray) -> Packed:
        return pack_nm(weight, self.n, self.m)

    @property
    def sparsity(self) -> float:
        return 1.0 - self.n / self.m

    def check_shape(self, shape: tuple[int, int]) -> str | None:
        if shape[1] % self.m:
            return f"input features K={shape[1]} is not a multiple of {self.m}, which {self.name} needs"
        return None

    def check_sparsity(self, sparsity: float) -> str | None:
        if abs(sparsity - self.sparsity) > 1e-6:
            return (f"pattern {self.name} fixes sparsity at {self.sparsity:.3f}; "
                    f"requested {sparsity:.3f} (pass --sparsity {self.sparsity:g} or another pattern)")
        return None

    def mask(self, scores: torch.Tensor, sparsity: float) -> torch.Tensor:
        sparsity = _scalar_sparsity(self, sparsity)
        n_out, k = scores.shape
        groups = scores.reshape(n_out, k // self.m, self.m)
        mask = torch.zeros_like(groups, dtype=torch.bool)
        mask.scatter_(2, _stable_top(groups, self.n, dim=2), True)
        return mask.reshape(n_out, k)

    @property
    def column_unit(self) -> int:
        return self.m

    @property
    def independent_groups(self) -> bool:
        return True

    def mask_columns(self, scores: torch.Tensor, sparsity: float, start: int) -> torch.Tensor:
        return self.mask(scores, sparsity)

    def satisfied_by(self, mask: torch.Tensor, sparsity: float) -> bool:
        sparsity = _scalar_sparsity(self, sparsity)
        n_out, k = mask.shape
        return bool((mask.reshape(n_out, k // self.m, self.m).sum(2) <= self.n).all())

    def fits_within(self, nonzero: torch.Tensor, sparsity: float) -> bool:
        return self.satisfied_by(nonzero, sparsity)


_BLOCK_RE = re.compile(r"^block(\d+)x(\d+)$")
_NM_RE = re.compile(r"^(\d+):(\d+)$")


def parse_pattern(name: str) -> Pattern:
    """Parse ``unstructured``, ``blockRxC`` or ``N:M``."""
    text = name.strip().lower()
    if text == "unstructured":
        return Unstructured()
    if m := _BLOCK_RE.match(text):
        rows, cols = int(m.group(1)), int(m.group(2))
        if rows < 1 or cols < 1:
            raise PatternError(f"block pattern {name!r} needs positive sizes")
        return Block(rows, cols)
    if m := _NM_RE.match(text):
        n, mm = int(m.group(1)), int(m.group(2))
        if not 0 < n < mm:
            raise PatternError(f"N:M pattern {name!r} needs 0 < N < M")
        return NM(n, mm)
    raise PatternError(
        f"unknown sparsity pattern {name!r}; use 'unstructured', 'block<R>x<C>' (e.g. block16x1) "
        "or 'N:M' (e.g. 2:4)")


def plan_violation(pattern: Pattern, nonzero_mask: torch.Tensor, sparsity: float | torch.Tensor) -> str | None:
    """Why a weight's non-zero mask breaks ``pattern`` at ``sparsity``, or None when it obeys it.

    A kept weight may itself be exactly zero (SmolLM2's weights sit on a 4-bit grid, so many
    are), so when the non-zeros do not match the pattern exactly they must still fit inside it:
    no more per row, block band or group than the pattern keeps, and nothing outside its units.
    """
    if pattern.satisfied_by(nonzero_mask, sparsity) or pattern.fits_within(nonzero_mask, sparsity):
        return None
    shown = f"{float(sparsity.mean()):.3f} (per row)" if isinstance(sparsity, torch.Tensor) else f"{sparsity:.3f}"
    return (f"weight has {int(nonzero_mask.sum())} non-zeros that do not fit {pattern.name} at {shown} "
            "(more per row, block band or group than the pattern keeps)")


def check_sparsity_value(sparsity: float) -> None:
    if not (isinstance(sparsity, int | float) and 0.0 <= float(sparsity) < 1.0):
        raise SparseccError(
            f"sparsity {sparsity!r} is outside [0, 1): it is the fraction of weights set to zero, "
            "e.g. 0.7 for 70 %")


# --------------------------------------------------------------------------------------------
# Packed formats. Arrays are numpy so that kernels, artifacts and tests share one definition.
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class PackedCSR:
    """Compressed sparse rows of W (N, K): row ``n`` holds ``data[indptr[n]:indptr[n+1]]`` at
    input columns ``indices[...]``, sorted by column."""

    shape: tuple[int, int]
    indptr: np.ndarray  # (N + 1,) int32
    indices: np.ndarray  # (nnz,) int32
    data: np.ndarray  # (nnz,) float32

    format = "csr"

    @property
    def nnz(self) -> int:
        return int(self.data.shape[0])

    def arrays(self) -> dict[str, np.ndarray]:
        return {"indptr": self.indptr, "indices": self.indices, "data": self.data}

    def to_dense(self) -> np.ndarray:
        n, k = self.shape
        dense = np.zeros((n, k), dtype=self.data.dtype)
        rows = np.repeat(np.arange(n), np.diff(self.indptr))
        dense[rows, self.indices] = self.data
        return dense


@dataclass(frozen=True)
class PackedBSR:
    """Block sparse rows: W (N, K) cut into (r, c) blocks; block row ``i`` holds blocks
    ``data[indptr[i]:indptr[i+1]]`` (each (r, c)) at block columns ``indices[...]``."""

    shape: tuple[int, int]
    block: tuple[int, int]
    indptr: np.ndarray  # (N / r + 1,) int32
    indices: np.ndarray  # (nblocks,) int32, block-column index
    data: np.ndarray  # (nblocks, r, c) float32

    format = "bsr"

    @property
    def nnz(self) -> int:
        return int(self.data.size)

    def arrays(self) -> dict[str, np.ndarray]:
        return {"indptr": self.indptr, "indices": self.indices, "data": self.data}

    def to_dense(self) -> np.ndarray:
        n, k = self.shape
        r, c = self.block
        dense = np.zeros((n // r, r, k // c, c), dtype=self.data.dtype)
        brows = np.repeat(np.arange(n // r), np.diff(self.indptr))
        dense[brows, :, self.indices, :] = self.data
        return dense.reshape(n, k)


@dataclass(frozen=True)
class PackedNM:
    """N:M compressed: for each row and group of ``m`` inputs, ``n`` value slots and their
    positions inside the group (0..m-1). Groups with fewer than ``n`` non-zeros pad with zero
    values at distinct unused positions, so every slot is valid to read."""

    shape: tuple[int, int]
    n: int
    m: int
    values: np.ndarray  # (N, K / m * n) float32
    positions: np.ndarray  # (N, K / m * n) uint8, position within the group

    format = "nm"

    @property
    def nnz(self) -> int:
        return int(self.values.size)

    def arrays(self) -> dict[str, np.ndarray]:
        return {"values": self.values, "positions": self.positions}

    def column_indices(self) -> np.ndarray:
        """Absolute input column of every slot, int32 (N, K / m * n)."""
        groups = np.arange(self.values.shape[1]) // self.n
        return (groups[None, :] * self.m + self.positions.astype(np.int32)).astype(np.int32)

    def to_dense(self) -> np.ndarray:
        n_out, k = self.shape
        dense = np.zeros((n_out, k), dtype=self.values.dtype)
        rows = np.repeat(np.arange(n_out), self.values.shape[1]).reshape(n_out, -1)
        dense[rows, self.column_indices()] = self.values
        return dense


Packed = PackedCSR | PackedBSR | PackedNM

#: packed format -> names of its arrays, in the order the sparse ops and kernels take them
FORMAT_ARRAYS: dict[str, tuple[str, ...]] = {
    "csr": ("indptr", "indices", "data"),
    "bsr": ("indptr", "indices", "data"),
    "nm": ("values", "positions"),
}


def pack_csr(weight: np.ndarray) -> PackedCSR:
    w = np.ascontiguousarray(weight, dtype=np.float32)
    rows, cols = np.nonzero(w)  # row-major order: sorted by row then column
    indptr = np.zeros(w.shape[0] + 1, dtype=np.int32)
    np.cumsum(np.bincount(rows, minlength=w.shape[0]), out=indptr[1:])
    return PackedCSR(tuple(w.shape), indptr, cols.astype(np.int32), w[rows, cols].astype(np.float32))


def pack_bsr(weight: np.ndarray, block: tuple[int, int]) -> PackedBSR:
    w = np.ascontiguousarray(weight, dtype=np.float32)
    n, k = w.shape
    r, c = block
    if n % r or k % c:
        raise PatternError(f"cannot pack {n}x{k} into {r}x{c} blocks")
    blocks = w.reshape(n // r, r, k // c, c).transpose(0, 2, 1, 3)  # (brow, bcol, r, c)
    present = np.any(blocks != 0, axis=(2, 3))
    brows, bcols = np.nonzero(present)
    indptr = np.zeros(n // r + 1, dtype=np.int32)
    np.cumsum(np.bincount(brows, minlength=n // r), out=indptr[1:])
    data = np.ascontiguousarray(blocks[brows, bcols], dtype=np.float32).reshape(-1, r, c)
    return PackedBSR((n, k), (r, c), indptr, bcols.astype(np.int32), data)


def pack_nm(weight: np.ndarray, n: int, m: int) -> PackedNM:
    w = np.ascontiguousarray(weight, dtype=np.float32)
    rows, k = w.shape
    if k % m:
        raise PatternError(f"cannot pack K={k} into groups of {m}")
    groups = w.reshape(rows, k // m, m)
    nonzero = groups != 0
    if (nonzero.sum(axis=2) > n).any():
        raise PatternError(f"weight has a group with more than {n} non-zeros of {m}: not {n}:{m}")
    # Stable sort puts non-zero positions first (in position order), then zero positions: taking
    # the first n gives every kept value a slot and pads with distinct zero-valued positions.
    order = np.argsort(~nonzero, axis=2, kind="stable")[:, :, :n]
    order = np.sort(order, axis=2)
    values = np.take_along_axis(groups, order, axis=2).reshape(rows, -1)
    return PackedNM((rows, k), n, m, np.ascontiguousarray(values, dtype=np.float32),
                    np.ascontiguousarray(order.reshape(rows, -1), dtype=np.uint8))


def pack(weight: np.ndarray, pattern: Pattern) -> Packed:
    """Pack a masked-dense weight into the pattern's format."""
    return pattern.pack(weight)


def packed_nbytes(packed: Packed) -> int:
    return int(sum(a.nbytes for a in packed.arrays().values()))
