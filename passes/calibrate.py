"""calibrate: run real sample inputs through the program and record per-layer input statistics.

For every prunable layer it records, over all calibration rows (tokens, pixels, samples):
the squared L2 norm of each input feature (Wanda's ||X_j||), the row count, and optionally
X^T X (the Hessian proxy SparseGPT needs). Convolutions are seen through their im2col rows, so a
1x1 conv's statistics match the linear it becomes. The result is an analysis stored in the pass
context; the program itself is unchanged.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from sparsecc.errors import CalibrationError
from sparsecc.pass_manager import Pass, PassContext, PassResult, register_pass
from sparsecc.program import Layer, Program

ANALYSIS_KEY = "calibration"


@dataclass
class LayerStats:
    """Input statistics of one layer over the calibration rows."""

    sq_norms: torch.Tensor  # (K,) float64: sum over rows of x_j^2
    rows: int = 0
    hessian: torch.Tensor | None = None  # (K, K) float64: sum over rows of x x^T
    sums: torch.Tensor | None = None  # (K,) float64: sum over rows of x_j

    @property
    def feature_norms(self) -> torch.Tensor:
        """||X_j||_2 for each input feature j (Wanda's activation factor)."""
        return self.sq_norms.sqrt().float()

    @property
    def feature_means(self) -> torch.Tensor:
        """E[x_j] for each input feature j over the calibration rows."""
        if self.sums is None:
            raise ValueError("these statistics were recorded without feature sums")
        return (self.sums / max(1, self.rows)).float()


@dataclass
class CalibrationStats:
    layers: dict[str, LayerStats] = field(default_factory=dict)
    batches: int = 0


def _rows(layer: Layer, x: torch.Tensor) -> torch.Tensor:
    """The (rows, K) matrix the layer's weight multiplies."""
    if layer.kind == "linear":
        return x.reshape(-1, x.shape[-1])
    kh, kw = layer.weight_shape[2:]
    groups = layer.conv.get("groups", 1)
    if groups != 1:
        # Grouped convs: statistics per input channel position of a group's kernel window.
        x = x.reshape(x.shape[0] * groups, x.shape[1] // groups, *x.shape[2:])
    cols = F.unfold(x, (kh, kw), dilation=layer.conv["dilation"], padding=layer.conv["padding"],
                    stride=layer.conv["stride"])  # (B, C*kh*kw, L)
    return cols.transpose(1, 2).reshape(-1, cols.shape[1])


class _StatsInterpreter(torch.fx.Interpreter):
    def __init__(self, module: torch.fx.GraphModule, layers_by_node: dict[str, Layer],
                 stats: CalibrationStats, hessian: bool) -> None:
        super().__init__(module)
        self.layers_by_node = layers_by_node
        self.stats = stats
        self.hessian = hessian

    def run_node(self, n: torch.fx.Node) -> Any:
        layer = self.layers_by_node.get(n.name)
        if layer is not None:
            x = self.env[n.args[0]] if isinstance(n.args[0], torch.fx.Node) else n.args[0]
            rows = _rows(layer, x.detach()).double()
            entry = self.stats.layers.get(layer.name)
            if entry is None:
                k = rows.shape[1]
                entry = LayerStats(torch.zeros(k, dtype=torch.float64),
                                   hessian=torch.zeros(k, k, dtype=torch.float64) if self.hessian else None,
                                   sums=torch.zeros(k, dtype=torch.float64))
                self.stats.layers[layer.name] = entry
            entry.sq_norms += (rows * rows).sum(0)
            entry.sums += rows.sum(0)
            entry.rows += rows.shape[0]
            if entry.hessian is not None:
                entry.hessian += rows.T @ rows
        return super().run_node(n)


def check_inputs(program: Program, batch: tuple[Any, ...], index: int) -> None:
    """Calibration inputs must match the captured inputs in count, rank, trailing dims, dtype."""
    expected = program.example_inputs
    if len(batch) != len(expected):
        raise CalibrationError(
            f"calibration batch {index} has {len(batch)} inputs; the program takes {len(expected)}")
    for pos, (got, want) in enumerate(zip(batch, expected, strict=True)):
        if not isinstance(want, torch.Tensor):
            continue
        if not isinstance(got, torch.Tensor):
            raise CalibrationError(f"calibration batch {index}, input {pos}: expected a tensor, got "
                                   f"{type(got).__name__}")
        if got.dim() != want.dim() or tuple(got.shape[1:]) != tuple(want.shape[1:]) or got.dtype != want.dtype:
            raise CalibrationError(
                f"calibration batch {index}, input {pos} has shape {tuple(got.shape)} {got.dtype}; "
                f"the program was captured with {tuple(want.shape)} {want.dtype} "
                "(only the leading batch dimension may differ)")


@register_pass
@dataclass(frozen=True)
class Calibrate(Pass):
    """Record per-layer input statistics over calibration batches."""

    name = "calibrate"
    summary = "run calibration batches and record per-layer input norms (and X^T X with hessian=true)"
    numerics = "exact"

    batches: int = 0  # 0 = all given batches
    hessian: bool = False

    def run(self, program: Program, ctx: PassContext) -> PassResult:
        data = ctx.calibration_batches(program)
        if self.batches:
            data = data[: self.batches]
        for i, batch in enumerate(data):
            check_inputs(program, tuple(batch), i)
        layers = program.layers()
        by_node = {layer.node: layer for layer in layers}
        stats = CalibrationStats()
        module = program.exported.module()
        iterator: Any = data
        if ctx.progress:
            from tqdm.auto import tqdm

            iterator = tqdm(data, desc="calibrate", unit="batch", leave=False)
        with torch.no_grad():
            for batch in iterator:
                _StatsInterpreter(module, by_node, stats, self.hessian).run(*batch)
                stats.batches += 1
        ctx.analyses[ANALYSIS_KEY] = stats
        diagnostics = []
        if not ctx.calibration:
            diagnostics.append(self.diag(
                "warning", "no calibration data given: statistics come from the example inputs only; "
                "pass real samples (--calib CALIB.pt) for accurate pruning"))
        rows = sum(s.rows for s in stats.layers.values())
        return PassResult(program, changed=False,
                          counters={"batches": stats.batches, "layers": len(stats.layers), "rows": rows},
                          diagnostics=diagnostics)


def calibration_stats(program: Program, ctx: PassContext) -> CalibrationStats:
    """The calibration analysis, computed on demand when no calibrate pass ran before."""
    if ANALYSIS_KEY not in ctx.analyses:
        Calibrate().run(program, ctx)
    return ctx.analyses[ANALYSIS_KEY]
