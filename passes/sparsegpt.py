"""SparseGPT (Frantar & Alistarh, 2023): prune one layer and update its kept weights so that the
layer's output on the calibration inputs changes as little as possible.

For a layer ``y = W x`` and calibration inputs with ``H = X^T X`` (K x K), removing weight
``W[r, j]`` and compensating with the not-yet-processed weights of row ``r`` is the optimal brain
surgeon step: the columns are processed left to right, and after column ``j`` is decided every
row's error ``(w - q) / [H^-1]_jj`` is spread over the columns right of ``j`` along row ``j`` of
the upper Cholesky factor of ``H^-1``. The factor is computed once (the inverse Hessians of the
shrinking column sets are its trailing blocks), so one layer costs O(K^3 + N K^2).

Details that matter:

* Dampening: ``H + damp * mean(diag(H)) * I`` keeps the Cholesky factorization stable; input
  features that never fire (zero diagonal) get weight zero and a unit diagonal.
* Adaptive mask selection: the mask of a range of ``block`` columns is chosen when the range is
  reached, from the weights as updated so far, by the score ``w^2 / [chol(H^-1)]_jj^2``; N:M
  groups are chosen group by group. :meth:`~sparsecc.sparsity.Pattern.mask_columns` makes the
  ranges' masks add up to exactly the pattern the kernels expect (per row, block band, group), so
  the same code serves unstructured, block r x c and N:M patterns.
* Unstructured selection (``selection``): ``"block"`` is the paper's: one threshold over all N
  rows of the range, so each range (and the layer) keeps exactly its share but rows keep
  different counts; ``"row"`` gives every row the same count in every range (balanced CSR rows,
  Wanda's comparison group). ``"block"`` reconstructs each layer better (lower
  ``tr(dW H dW^T)``), but on SmolLM2 at 70 % it did not lower perplexity (one calibration seed,
  benchmarks/sparsegpt_selection.py: 126.7 against 112.0 on ``howto/``, the split that chose
  the default), so ``"row"`` stays the default. Per-row sparsities from a row-wise allocation fix
  each row's count, so they always select by row; N:M and block patterns have their own.
* Lazy blocked updates: inside a range the updates are rank-1 on the range only; the rest of the
  matrix gets one matrix product per range.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from sparsecc.errors import WeightError
from sparsecc.sparsity import Pattern, Unstructured

#: how an unstructured mask is chosen in each range of columns (see the module docstring)
SELECTIONS = ("block", "row")


@dataclass(frozen=True)
class SparseGPTResult:
    """The pruned weight, its keep-mask and the layer's output error on the calibration inputs
    relative to the dense output, ``tr(dW H dW^T) / tr(W H W^T)``."""

    weight: torch.Tensor
    mask: torch.Tensor
    relative_error: float


def _inverse_cholesky(hessian: torch.Tensor, damp: float) -> torch.Tensor:
    """Upper Cholesky factor of ``(H + damp * mean(diag H) * I)^-1``, dampening more when the
    matrix is numerically indefinite (calibration with fewer rows than features)."""
    k = hessian.shape[0]
    mean_diag = float(hessian.diagonal().mean())
    scale = damp
    for _ in range(6):
        damped = hessian + scale * mean_diag * torch.eye(k, dtype=hessian.dtype)
        lower, info = torch.linalg.cholesky_ex(damped)
        if int(info) == 0:
            inverse = torch.cholesky_inverse(lower)
            upper, info = torch.linalg.cholesky_ex(inverse, upper=True)
            if int(info) == 0:
                return upper
        scale *= 10
    raise WeightError(f"the calibration Hessian is not positive definite even with dampening {scale:g}; "
                      "give more calibration samples than the layer has inputs")


def selection_pattern(pattern: Pattern, sparsity: float | torch.Tensor, selection: str) -> Pattern:
    """The pattern whose :meth:`~sparsecc.sparsity.Pattern.mask_columns` chooses each range's mask:
    with ``"block"``, an unstructured pattern at one sparsity ranks the whole N x range slice
    together (layer-wide budget, exact per range); everything else keeps its own selection."""
    if selection not in SELECTIONS:
        raise WeightError(f"unknown SparseGPT mask selection {selection!r}; the choices are: {', '.join(SELECTIONS)}")
    if selection == "block" and isinstance(pattern, Unstructured) and not isinstance(sparsity, torch.Tensor):
        return Unstructured(per_row=False)
    return pattern


def sparsegpt_prune(weight: torch.Tensor, hessian: torch.Tensor, pattern: Pattern, sparsity: float, *,
                    block: int = 128, damp: float = 0.01, mask: torch.Tensor | None = None,
                    selection: str = "row") -> SparseGPTResult:
    """Prune ``weight`` (N, K) to ``pattern`` at ``sparsity`` with SparseGPT, given the sum of
    ``x x^T`` over the calibration rows (``hessian``, K x K). See the module docstring. With
    ``mask`` given, that keep-mask is used as is and only the kept weights are reconstructed."""
    n_out, k = weight.shape
    if hessian.shape != (k, k):
        raise WeightError(f"Hessian of shape {tuple(hessian.shape)} does not match a weight with {k} inputs")
    chooser = selection_pattern(pattern, sparsity, selection)
    unit = pattern.column_unit
    block = max(unit, block // unit * unit)
    dense = weight.detach().double()
    w = dense.clone()
    h = hessian.double().clone()
    dead = h.diagonal() == 0
    h[dead, dead] = 1.0
    w[:, dead] = 0.0
    hinv = _inverse_cholesky(h, damp)
    fixed = mask
    mask = torch.zeros(n_out, k, dtype=torch.bool)
    # decide whole ranges at once, except N:M groups, which are decided one group at a time
    decide = unit if pattern.independent_groups else block
    for start in range(0, k, block):
        end = min(start + block, k)
        w1 = w[:, start:end].clone()
        q1 = torch.zeros_like(w1)
        err1 = torch.zeros_like(w1)
        hinv1 = hinv[start:end, start:end]
        diag1 = hinv1.diagonal()
        mask1 = torch.zeros_like(w1, dtype=torch.bool) if fixed is None else fixed[:, start:end].clone()
        for i in range(end - start):
            if fixed is None and i % decide == 0:
                stop = min(i + decide, end - start)
                scores = (w1[:, i:stop] ** 2) / (diag1[i:stop] ** 2)[None, :]
                mask1[:, i:stop] = chooser.mask_columns(scores.float(), sparsity, start + i)
            col = w1[:, i]
            q = col * mask1[:, i]
            q1[:, i] = q
            e = (col - q) / hinv1[i, i]
            w1[:, i:] -= e[:, None] * hinv1[i, i:][None, :]
            err1[:, i] = e
        w[:, start:end] = q1
        mask[:, start:end] = mask1
        w[:, end:] -= err1 @ hinv[start:end, end:]
    w[~mask] = 0.0
    delta = w - dense
    h64 = hessian.double()
    denominator = float(((dense @ h64) * dense).sum())
    numerator = float(((delta @ h64) * delta).sum())
    relative = numerator / denominator if denominator > 0 else 0.0
    return SparseGPTResult(w.to(weight.dtype), mask, relative)
