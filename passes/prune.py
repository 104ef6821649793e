"""prune-magnitude / prune-wanda: mask weights in place following the plan.

Both passes score every weight, ask the layer's pattern for a keep-mask at the planned sparsity,
and multiply the weight by it. The result is the *masked-dense* program: the same graph with
zeros in the weights, numerically what every sparse kernel must reproduce.

- magnitude: score = |W|.
- Wanda (Sun et al., 2023): score = |W| * ||X_j||, with ||X_j|| the L2 norm of input feature j
  over the calibration rows, compared within each output row.

Weights holding NaN or inf are refused: a mask computed from them would be meaningless.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from sparsecc.errors import WeightError
from sparsecc.pass_manager import Pass, PassContext, PassResult, register_pass
from sparsecc.program import Layer, Program, SparsityInfo
from sparsecc.sparsity import parse_pattern

from .calibrate import calibration_stats


def check_finite(program: Program) -> None:
    """Refuse NaN/inf in any weight a plan wants to prune, naming the layer."""
    for layer in program.layers():
        weight = program.tensor(layer.weight)
        if not torch.isfinite(weight).all():
            bad = int((~torch.isfinite(weight)).sum())
            raise WeightError(
                f"layer {layer.name}: weight {layer.weight} holds {bad} NaN/inf values; fix the "
                "checkpoint (or the training run that produced it) before pruning")


class _PruneBase(Pass):
    numerics = "budget"

    def scores(self, program: Program, ctx: PassContext, layer: Layer, matrix: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def run(self, program: Program, ctx: PassContext) -> PassResult:
        if program.plan is None:
            raise WeightError("prune needs a plan: run plan-uniform (or load a plan) before pruning")
        check_finite(program)
        new = program.clone(stage="pruned")
        layers = {layer.name: layer for layer in new.layers()}
        diagnostics = []
        pruned = zeroed = total = 0
        for lp in new.plan.sparse_layers():
            layer = layers.get(lp.name)
            if layer is None:
                diagnostics.append(self.diag("warning", "planned layer not found in the program; skipped", lp.name))
                continue
            weight = new.tensor(layer.weight)
            matrix = weight.detach().reshape(weight.shape[0], -1)
            pattern = parse_pattern(lp.pattern)
            keep = pattern.mask(self.scores(new, ctx, layer, matrix), lp.sparsity)
            with torch.no_grad():
                weight.mul_(keep.reshape(weight.shape).to(weight.dtype))
            nonzero = int((matrix != 0).sum())
            new.set_sparsity(lp.name, SparsityInfo(
                pattern=pattern.name, sparsity=1.0 - nonzero / matrix.numel(), made_by=self.name))
            pruned += 1
            zeroed += matrix.numel() - nonzero
            total += matrix.numel()
        new.invalidate()
        return PassResult(new, changed=pruned > 0,
                          counters={"layers_pruned": pruned, "weights_zeroed": zeroed,
                                    "weights_in_pruned_layers": total},
                          diagnostics=diagnostics)


@register_pass
@dataclass(frozen=True)
class PruneMagnitude(_PruneBase):
    """Keep the largest-magnitude weights in each layer's pattern."""

    name = "prune-magnitude"
    summary = "mask weights by |W| in the planned pattern (masked-dense result)"

    def scores(self, program, ctx, layer, matrix):
        return matrix.abs()


@register_pass
@dataclass(frozen=True)
class PruneWanda(_PruneBase):
    """Wanda: keep weights with the largest |W| x ||X|| per output row."""

    name = "prune-wanda"
    summary = "mask weights by |W| x ||X|| from calibration (Wanda) in the planned pattern"

    def scores(self, program, ctx, layer, matrix):
        stats = calibration_stats(program, ctx).layers.get(layer.name)
        if stats is None:
            raise WeightError(f"layer {layer.name}: no calibration statistics (the layer never ran "
                              "on the calibration inputs)")
        return matrix.abs() * stats.feature_norms[None, :]


METHOD_PASSES = {"magnitude": "prune-magnitude", "wanda": "prune-wanda"}
