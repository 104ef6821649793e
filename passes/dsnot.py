"""DSnoT (Zhang et al., 2024, "Dynamic Sparse No Training"): refine a pruning mask without training
by swapping weights in and out, one pair at a time, so that every output row keeps its count.

The quantity it drives to zero is the expected error of each output: for row ``i``,
``e_i = sum_j (W_ij - W'_ij) E[x_j]``, the dense output minus the pruned output, in expectation
over the calibration inputs (``E[x_j]`` from the calibration statistics). One step of a row:

* grow: revive the pruned weight whose return shrinks ``|e_i|`` the most (its contribution
  ``W_ij E[x_j]`` has the sign of ``e_i``);
* prune: among the kept weights whose removal moves the error back toward zero (contribution of
  the opposite sign), remove the one with the smallest Wanda score ``|W_ij| ||X_j||``, the weight
  the output misses least;
* the swap is kept only when ``|e_i|`` ends smaller than it started; a row stops at the first step
  that would not help, or after ``cycles`` steps.

The pattern bounds where a swap may happen: anywhere in the row for unstructured masks; within
one group of M columns for N:M (so every group still keeps N). Block patterns move whole blocks
shared by many rows, which this per-row criterion cannot judge; :func:`dsnot_supported` says so
and the passes leave those layers as pruned, with a diagnostic.
"""

from __future__ import annotations

import torch
from sparsecc.sparsity import NM, Pattern, Unstructured


def dsnot_supported(pattern: Pattern) -> bool:
    """Whether DSnoT can refine masks of ``pattern`` (per-row unstructured or N:M)."""
    return (isinstance(pattern, Unstructured) and pattern.per_row) or isinstance(pattern, NM)


def dsnot_refine(weight: torch.Tensor, mask: torch.Tensor, means: torch.Tensor, norms: torch.Tensor,
                 pattern: Pattern, *, cycles: int = 50) -> tuple[torch.Tensor, int]:
    """The refined keep-mask of ``weight`` (N, K) and the number of swaps made. ``means`` and
    ``norms`` are each input feature's mean and L2 norm over the calibration rows."""
    if not dsnot_supported(pattern):
        raise ValueError(f"DSnoT refines unstructured and N:M masks, not {pattern.name}")
    n_out, k = weight.shape
    group = pattern.m if isinstance(pattern, NM) else k
    w = weight.detach().double()
    contribution = (w * means.double()[None, :]).reshape(n_out, k // group, group)
    score = (w.abs() * norms.double()[None, :]).reshape(n_out, k // group, group)
    keep = mask.clone().reshape(n_out, k // group, group)
    error = (contribution * ~keep).sum(dim=(1, 2))  # dense minus pruned, in expectation
    rows = torch.arange(n_out)
    active = torch.ones(n_out, dtype=torch.bool)
    swaps = 0
    for _ in range(cycles):
        e = error[:, None, None]
        # grow: the pruned weight (per group) whose return leaves the smallest |e|
        gain = e.abs() - (e - contribution).abs()
        gain = torch.where(~keep & (torch.sign(contribution) == torch.sign(e)), gain, -torch.inf)
        grow = gain.argmax(dim=2, keepdim=True)
        grown = torch.isfinite(gain.gather(2, grow)).squeeze(2)
        after_grow = error[:, None] - contribution.gather(2, grow).squeeze(2)
        # prune: the kept weight of the same group with the smallest Wanda score among those that
        # move the error back toward zero
        toward = torch.sign(contribution) == -torch.sign(after_grow)[:, :, None]
        candidates = torch.where(keep & toward, score, torch.inf)
        cut = candidates.argmin(dim=2, keepdim=True)
        cuttable = torch.isfinite(candidates.gather(2, cut)).squeeze(2)
        after = after_grow + contribution.gather(2, cut).squeeze(2)
        improvement = torch.where(grown & cuttable, error.abs()[:, None] - after.abs(), -torch.inf)
        best = improvement.argmax(dim=1)
        accept = active & (improvement[rows, best] > 1e-12 * error.abs().clamp_min(1e-30))
        if not bool(accept.any()):
            break
        r, g = rows[accept], best[accept]
        keep[r, g, grow[r, g, 0]] = True
        keep[r, g, cut[r, g, 0]] = False
        error = torch.where(accept, after[rows, best], error)
        active &= accept
        swaps += int(accept.sum())
    return keep.reshape(n_out, k), swaps
