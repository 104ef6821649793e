"""Report: what a compile did, per layer and per pass, as JSON and as text a person reads.

It answers the user's first question ("is it faster and smaller, and if a layer stayed dense,
why?"): the plan per layer with pattern, sparsity and packed size, the reason for every dense
layer, the pipeline timeline, numerics per pass and the diagnostics of every pass.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any


@dataclass
class LayerReport:
    name: str
    kind: str
    shape: list[int]
    decision: str  # "sparse" | "dense"
    pattern: str | None
    sparsity: float
    packed_format: str | None = None
    dense_bytes: int = 0
    packed_bytes: int | None = None
    reason: str = ""
    kernel: str | None = None
    # Bytes of the weight arrays the compiled kernel reads (what the library stores: 16-bit
    # indices, panel padding, bf16); None when the layer has no sparsecc kernel.
    kernel_bytes: int | None = None
    # The search's view of the layer (``sparsecc search`` / the ``search`` pass), None elsewhere:
    # predicted seconds of the chosen kernel and of the dense one, the chosen candidate's
    # reconstruction error on calibration data, and seconds measured in the built model.
    predicted_s: float | None = None
    predicted_dense_s: float | None = None
    error: float | None = None
    measured_s: float | None = None

    @property
    def stored_bytes(self) -> int:
        """What the layer's weights take in the built library (else in the packed program)."""
        if self.kernel_bytes is not None:
            return self.kernel_bytes
        return self.packed_bytes if self.packed_bytes is not None else self.dense_bytes


@dataclass
class Report:
    target: str
    pipeline: str
    method: str
    layers: list[LayerReport] = field(default_factory=list)
    passes: list[dict[str, Any]] = field(default_factory=list)  # name, seconds, changed, counters
    numerics: list[dict[str, Any]] = field(default_factory=list)  # pass, tier, rel, max_abs
    diagnostics: list[dict[str, Any]] = field(default_factory=list)
    compiled_vs_reference: dict[str, float] = field(default_factory=dict)
    library_bytes: int = 0
    # What a plan search considered (empty when the plan was uniform): "budget", "plans" (each
    # {"label", "predicted_speedup", "error", "chosen"}: the speed/accuracy trade-off the solver saw)
    search: dict[str, Any] = field(default_factory=dict)
    # Predicted against measured kernel times (``sparsecc.cost_check.check_cost_model``): per layer
    # rows, Spearman rank correlation, median relative error, sums, the whole model's latency
    cost_model: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @property
    def recovery(self) -> dict[str, Any] | None:
        """The recover pass's counters (held-out metric before and after, per soup ingredient,
        parameters trained, steps, seconds), or None when the build did not recover."""
        entry = next((e for e in self.passes if e.get("name") == "recover" and e.get("changed")), None)
        return dict(entry["counters"]) if entry else None

    def recovery_line(self) -> str | None:
        rec = self.recovery
        if not rec:
            return None
        ingredients = [v for k, v in sorted(rec.items()) if k.startswith("ingredient_")]
        soup = (f"; soup of {rec.get('soup_used')} of {len(ingredients)} ingredients "
                f"({', '.join(f'{v:.4g}' for v in ingredients)})" if ingredients else "")
        return (f"recovery: held-out {rec['heldout_before']:.4g} after pruning -> {rec['heldout_after']:.4g} after "
                f"recovery; {rec['trained_params']} parameters trained ({rec['trained_share']:.2%} of the model), "
                f"{rec['steps']} steps, {rec['seconds']:.1f} s{soup}")

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Report:
        data = dict(data)
        data["layers"] = [LayerReport(**entry) for entry in data.get("layers", [])]
        return cls(**data)

    @property
    def weight_bytes(self) -> tuple[int, int]:
        """(fp32 dense bytes of the prunable layers, the bytes their compiled kernels store)."""
        dense = sum(lr.dense_bytes for lr in self.layers)
        after = sum(lr.stored_bytes for lr in self.layers)
        return dense, after

    def summary(self) -> str:
        lines = [f"sparsecc report: target {self.target}, method {self.method}",
                 f"pipeline: {self.pipeline}", ""]
        header = f"{'layer':40s} {'kind':7s} {'shape':>11s} {'decision':8s} {'pattern':12s} " \
                 f"{'sparsity':>8s} {'bytes':>10s}  note"
        lines += [header, "-" * len(header)]
        for lr in self.layers:
            shape = "x".join(str(d) for d in lr.shape)
            size = lr.stored_bytes
            note = lr.reason if lr.decision == "dense" else (lr.kernel or lr.packed_format or "")
            lines.append(f"{lr.name[:40]:40s} {lr.kind:7s} {shape:>11s} {lr.decision:8s} "
                         f"{(lr.pattern or '-'):12s} {lr.sparsity * 100:7.1f}% {size:>10d}  {note}")
        dense, after = self.weight_bytes
        if dense:
            lines.append("")
            lines.append(f"prunable weights: {dense} B dense -> {after} B as compiled ({after / dense:.2f}x)")
        if self.recovery_line():
            lines.append(self.recovery_line())
        if self.compiled_vs_reference:
            lines.append("compiled vs masked-dense reference: relative error "
                         f"{self.compiled_vs_reference.get('rel', float('nan')):.3g}, max abs "
                         f"{self.compiled_vs_reference.get('max_abs', float('nan')):.3g}")
        if self.cost_model:
            cm = self.cost_model
            timed = cm.get("kernels_timed", len(cm["layers"]))
            over = (f"{len(cm['layers'])} layer kernels" if timed == len(cm["layers"]) else
                    f"{len(cm['layers'])} layers ({timed} distinct kernels timed)")
            lines.append(f"cost model vs this machine over {over}: Spearman "
                         f"{cm['spearman']:.2f}, median |predicted/measured - 1| {cm['median_relative_error']:.0%}, "
                         f"sums {cm['predicted_sum_s'] * 1e3:.3f} ms predicted / {cm['measured_sum_s'] * 1e3:.3f} ms "
                         "measured" + (f" (whole model {cm['model_latency_s'] * 1e3:.3f} ms)"
                                       if cm.get("model_latency_s") else ""))
            slower = cm.get("slower_than_dense") or []
            lines.append("sparse kernels measured no faster than their dense kernel: "
                         + (", ".join(slower) if slower else "none"))
        if self.passes:
            lines += ["", "passes:"]
            for entry in self.passes:
                counters = ", ".join(f"{k}={v}" for k, v in entry.get("counters", {}).items())
                lines.append(f"  {entry['name']:16s} {entry['seconds']:7.2f}s  "
                             f"{'changed' if entry['changed'] else 'unchanged':9s}  {counters}")
        if self.numerics:
            lines += ["", "numerics (output change per pass, relative):"]
            for entry in self.numerics:
                lines.append(f"  {entry['pass_name']:16s} {entry['tier']:7s} {entry['rel']:.3g}")
        if self.diagnostics:
            lines += ["", "diagnostics:"]
            for d in self.diagnostics:
                where = f"{d['layer']}: " if d.get("layer") else ""
                lines.append(f"  {d['severity']}: [{d.get('pass_name') or ''}] {where}{d['message']}")
        return "\n".join(lines) + "\n"
