"""prune-magnitude / prune-wanda / prune-sparsegpt: prune weights in place following the plan.

Every pass scores the weights, asks the layer's pattern for a keep-mask at the planned sparsity,
and zeroes the rest. The result is the *masked-dense* program: the same graph with zeros in the
weights, numerically what every sparse kernel must reproduce.

- magnitude: score = |W|.
- Wanda (Sun et al., 2023): score = |W| * ||X_j||, with ||X_j|| the L2 norm of input feature j
  over the calibration rows, compared within each output row.
- SparseGPT (Frantar & Alistarh, 2023): masks chosen from the calibration Hessian and the kept
  weights updated to reconstruct the layer's output (:mod:`sparsecc.passes.sparsegpt`).

The calibration-based methods run layer by layer by default (``sequential=true``,
:mod:`sparsecc.passes.layerwise`): each layer is pruned from the inputs the already-pruned layers
before it produce, as both papers do, with memory bounded by ``memory_mb``. With
``sequential=false`` they use the dense model's statistics from the ``calibrate`` pass instead.

Weights holding NaN or inf are refused: a mask computed from them would be meaningless.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from sparsecc.errors import WeightError
from sparsecc.pass_manager import Pass, PassContext, PassResult, register_pass
from sparsecc.program import Layer, Program, SparsityInfo
from sparsecc.sparsity import Pattern, parse_pattern

from .calibrate import LayerStats, calibration_stats
from .dsnot import dsnot_refine, dsnot_supported
from .layerwise import LayerwiseRunner
from .sparsegpt import sparsegpt_prune


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

    #: what the method needs from calibration: None, "norms" (||X_j||) or "hessian" (X^T X)
    statistics: str | None = None
    refine: str = ""

    def needs(self) -> str | None:
        """The calibration statistics this pass reads (a DSnoT refinement needs norms and means)."""
        return self.statistics or ("norms" if self.refine else None)

    def choose(self, layer: Layer, matrix: torch.Tensor, pattern: Pattern, sparsity: float,
               stats: LayerStats | None) -> tuple[torch.Tensor, torch.Tensor, float | None]:
        """(keep-mask, pruned (N, K) matrix, and, when the method measures it, the layer's output
        error on the calibration inputs relative to its dense output)."""
        raise NotImplementedError

    def reweight(self, matrix: torch.Tensor, keep: torch.Tensor, pattern: Pattern, sparsity: float,
                 stats: LayerStats | None) -> tuple[torch.Tensor, float | None]:
        """The pruned matrix for a given keep-mask (after a refinement changed the mask)."""
        return matrix * keep, None

    def run(self, program: Program, ctx: PassContext) -> PassResult:
        if program.plan is None:
            raise WeightError("prune needs a plan: run plan-uniform (or load a plan) before pruning")
        if self.refine not in ("", "dsnot"):
            raise WeightError(f"unknown mask refinement {self.refine!r}; the choices are: dsnot")
        check_finite(program)
        new = program.clone(stage="pruned")
        layers = {layer.name: layer for layer in new.layers()}
        diagnostics = []
        planned = {}
        for lp in new.plan.sparse_layers():
            if lp.name in layers:
                planned[layers[lp.name].node] = lp
            else:
                diagnostics.append(self.diag("warning", "planned layer not found in the program; skipped", lp.name))
        totals = {"layers_pruned": 0, "weights_zeroed": 0, "weights_in_pruned_layers": 0}
        if self.refine:
            totals["refine_swaps"] = 0
        errors: list[float] = []

        def prune(layer: Layer, stats: LayerStats | None) -> None:
            lp = planned.get(layer.node)
            if lp is None:
                return
            if self.needs() is not None and stats is None:
                raise WeightError(f"layer {layer.name}: no calibration statistics (the layer never ran "
                                  "on the calibration inputs)")
            weight = new.tensor(layer.weight)
            matrix = weight.detach().reshape(weight.shape[0], -1)
            pattern = parse_pattern(lp.pattern)
            sparsity = lp.mask_sparsity()  # one number, or one per row from a row-wise allocation
            keep, pruned, error = self.choose(layer, matrix, pattern, sparsity, stats)
            if self.refine == "dsnot":
                if dsnot_supported(pattern):
                    keep, swaps = dsnot_refine(matrix, keep, stats.feature_means, stats.feature_norms, pattern)
                    totals["refine_swaps"] += swaps
                    if swaps:
                        pruned, error = self.reweight(matrix, keep, pattern, sparsity, stats)
                else:
                    diagnostics.append(self.diag(
                        "info", f"DSnoT refines unstructured and N:M masks; this {pattern.name} mask is kept "
                        "as pruned", layer.name))
            with torch.no_grad():
                weight.copy_(pruned.reshape(weight.shape).to(weight.dtype))
            # counted on the pruned values: ``matrix`` is a copy, not a view, when the weight is
            # stored channels-last
            nonzero = int((pruned != 0).sum())
            new.set_sparsity(lp.name, SparsityInfo(
                pattern=pattern.name, sparsity=1.0 - nonzero / matrix.numel(), made_by=self.name))
            totals["layers_pruned"] += 1
            totals["weights_zeroed"] += matrix.numel() - nonzero
            totals["weights_in_pruned_layers"] += matrix.numel()
            if error is not None:
                errors.append(error)

        counters: dict[str, int | float] = {}
        if self.needs() is not None and not ctx.calibration:
            diagnostics.append(self.diag(
                "warning", "no calibration data given: statistics come from the example inputs only; "
                "pass real samples (--calib CALIB.pt) for accurate pruning"))
        if self.needs() is None:
            for layer in layers.values():
                prune(layer, None)
        elif getattr(self, "sequential", False):
            runner = LayerwiseRunner(new, ctx.calibration_batches(new), hessian=self.needs() == "hessian",
                                     memory_budget=int(self.memory_mb * 2**20) if self.memory_mb else None,
                                     progress=ctx.progress)
            result = runner.run(prune, [layers[lp.name] for lp in planned.values()], to_end=False)
            counters["calibration_peak_mb"] = round(result.peak_bytes / 2**20, 1)
            counters["calibration_spilled_mb"] = round(result.spilled_bytes / 2**20, 1)
        else:
            if self.needs() == "hessian":
                from .calibrate import ANALYSIS_KEY

                if ANALYSIS_KEY not in ctx.analyses or any(
                        s.hessian is None for s in ctx.analyses[ANALYSIS_KEY].layers.values()):
                    ctx.analyses.pop(ANALYSIS_KEY, None)
                    ctx.analyses[ANALYSIS_KEY] = _hessian_stats(new, ctx)
            stats = calibration_stats(new, ctx)
            for layer in layers.values():
                prune(layer, stats.layers.get(layer.name) if layer.node in planned else None)
        new.invalidate()
        counters = {**totals, **counters}
        if errors:
            counters["mean_relative_output_error"] = round(sum(errors) / len(errors), 6)
            counters["max_relative_output_error"] = round(max(errors), 6)
        return PassResult(new, changed=totals["layers_pruned"] > 0, counters=counters, diagnostics=diagnostics)


def _hessian_stats(program: Program, ctx: PassContext):
    from .calibrate import ANALYSIS_KEY, Calibrate

    scratch = PassContext(ctx.target, ctx.calibration, ctx.seed, ctx.progress, ctx.workdir)
    Calibrate(hessian=True).run(program, scratch)
    return scratch.analyses[ANALYSIS_KEY]


@register_pass
@dataclass(frozen=True)
class PruneMagnitude(_PruneBase):
    """Keep the largest-magnitude weights in each layer's pattern."""

    name = "prune-magnitude"
    summary = "mask weights by |W| in the planned pattern (masked-dense result)"

    refine: str = ""  # "dsnot": refine the mask with DSnoT (needs calibration data)
    sequential: bool = True  # with refine: calibrate layer by layer
    memory_mb: float = 0.0

    def choose(self, layer, matrix, pattern, sparsity, stats):
        keep = pattern.mask(matrix.abs(), sparsity)
        return keep, matrix * keep, None


@register_pass
@dataclass(frozen=True)
class PruneWanda(_PruneBase):
    """Wanda: keep weights with the largest |W| x ||X|| per output row."""

    name = "prune-wanda"
    summary = "mask weights by |W| x ||X|| from calibration (Wanda) in the planned pattern, layer by layer"
    statistics = "norms"

    refine: str = ""  # "dsnot": refine the mask with DSnoT
    sequential: bool = True
    memory_mb: float = 0.0  # 0: no limit; else spill calibration activations to disk above it

    def choose(self, layer, matrix, pattern, sparsity, stats):
        keep = pattern.mask(matrix.abs() * stats.feature_norms[None, :], sparsity)
        return keep, matrix * keep, None


@register_pass
@dataclass(frozen=True)
class PruneSparseGPT(_PruneBase):
    """SparseGPT: masks from the calibration Hessian, kept weights updated to reconstruct the
    layer's output (lazy blocked OBS updates, dampened Hessian)."""

    name = "prune-sparsegpt"
    summary = "prune with SparseGPT (Hessian-based masks, kept weights updated), layer by layer"
    statistics = "hessian"

    refine: str = ""  # "dsnot": refine SparseGPT's mask with DSnoT, then reconstruct on it
    sequential: bool = True
    memory_mb: float = 0.0
    block: int = 128  # columns whose mask is chosen together; updates are lazy across blocks
    damp: float = 0.01  # fraction of the mean Hessian diagonal added to it
    # unstructured masks: "row" gives every row the same count (balanced CSR rows), "block" ranks
    # all rows of each block together (the paper's); "row" read lower perplexity on howto/ at 70 %
    # (see sparsecc.passes.sparsegpt)
    selection: str = "row"

    def choose(self, layer, matrix, pattern, sparsity, stats):
        result = sparsegpt_prune(matrix, stats.hessian, pattern, sparsity, block=self.block, damp=self.damp,
                                 selection=self.selection)
        return result.mask, result.weight, result.relative_error

    def reweight(self, matrix, keep, pattern, sparsity, stats):
        # the refined mask's kept weights reconstructed from the dense ones, as SparseGPT does
        result = sparsegpt_prune(matrix, stats.hessian, pattern, sparsity, block=self.block, damp=self.damp,
                                 mask=keep)
        return result.weight, result.relative_error


METHOD_PASSES = {"magnitude": "prune-magnitude", "wanda": "prune-wanda", "sparsegpt": "prune-sparsegpt"}
