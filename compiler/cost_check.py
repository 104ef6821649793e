"""How honest a target's cost model is on a compiled model: every layer's predicted kernel time
against its kernel timed on this machine, and the sum over layers against the whole model.

For each layer of the artifact's plan that the kernels compute as a matrix product (linears and
the convolutions planned as GEMMs), the layer's weight as compiled (the pruned weight, packed in
its planned pattern, or dense) is given to the target's cost model (measured table or roofline,
as the search sees it) and to the kernel that ``compile`` builds for that problem, timed where
the target's kernels run (x86 in-process, wasm-simd in wasmtime). Results: per layer predicted
and measured seconds (the report's ``predicted_s`` / ``measured_s``), the Spearman rank
correlation over layers (does the model order layers right, which is what a search needs) and
the median of |predicted / measured - 1| (how far its numbers are off), and the sums. Every sparse
layer's dense kernel is timed too, and layers whose sparse kernel measures no faster than it are
listed (``slower_than_dense``): the search promises none.

A 1x1 convolution is timed as the linear of its GEMM shape (rows = batch x pixels), which is the
problem the cost model predicts; the model's own convolution kernel lays its operands out
differently, so for convolutions the comparison is of the model, not of that kernel.

``once_per_problem`` times each distinct kernel problem once (layer shape, rows per call, the
decision, its pattern and the weight's nonzero count): a model with many equally shaped layers
pruned alike (SmolLM2's 30 decoder layers) then compiles and times a handful of kernels instead of
hundreds, which matters where each timing builds a module for wasmtime. The other layers of the
problem take its times and name the layer they were timed with (``timed_with``).
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from .artifact import Artifact
from .errors import SparseccError
from .sparsity import parse_pattern


def _ranks(values: list[float]) -> np.ndarray:
    order = np.argsort(values, kind="stable")
    ranks = np.empty(len(values))
    ranks[order] = np.arange(len(values))
    # ties share their mean rank
    for value in set(values):
        where = [i for i, v in enumerate(values) if v == value]
        if len(where) > 1:
            ranks[where] = ranks[where].mean()
    return ranks


def spearman(a: list[float], b: list[float]) -> float:
    """Spearman's rank correlation of two equally long lists (nan for fewer than two values)."""
    if len(a) < 2:
        return math.nan
    ra, rb = _ranks(a), _ranks(b)
    if ra.std() == 0 or rb.std() == 0:
        return math.nan
    return float(np.corrcoef(ra, rb)[0, 1])


def check_cost_model(artifact: Artifact, rounds: int = 15, model_latency: float | None = None,
                     once_per_problem: bool = False) -> dict[str, Any]:
    """Time every planned layer's kernel on this machine, fill the report's per-layer
    ``predicted_s`` / ``measured_s`` and ``report.cost_model``, and return that summary.
    ``model_latency`` (seconds of one call of the whole compiled model, when measured) is set
    beside the sums; ``once_per_problem`` times each distinct kernel problem once (see the
    module's docstring)."""
    from sparsecc.passes.plan_uniform import layer_rows
    from sparsecc.program import Program
    from sparsecc.targets import get_target
    from sparsecc.targets.tuning import time_layer_kernel

    record = get_target(artifact.target)
    if record.cost_model is None:
        raise SparseccError(f"target {artifact.target!r} has no cost model to check")
    model = record.cost_model()
    program = Program(artifact.pruned, artifact.example_inputs)
    layers = {layer.name: layer for layer in program.layers()}
    by_name = {lr.name: lr for lr in artifact.report.layers}
    rows = []
    timed: dict[tuple[Any, ...], dict[str, Any]] = {}  # kernel problem -> the row that timed it
    for lp in artifact.plan.layers.values():
        layer = layers.get(lp.name)
        if layer is None or (layer.kind != "linear" and not layer.is_pointwise_conv):
            continue
        weight = program.tensor(layer.weight).detach().reshape(layer.matrix_shape).float().numpy()
        report = by_name.get(lp.name)
        sparse = report is not None and report.decision == "sparse"
        packed = parse_pattern(report.pattern).pack(weight) if sparse else None
        m = layer_rows(program, layer)
        predicted, how = model.predict(m, packed, tuple(layer.matrix_shape))
        problem = (tuple(layer.matrix_shape), m, report.pattern if sparse else "dense",
                   int(np.count_nonzero(weight)) if sparse else 0)
        first = timed.get(problem) if once_per_problem else None
        row = {"layer": lp.name, "m": m, "decision": "sparse" if sparse else "dense",
               "predicted_s": predicted, "source": how}
        if first is not None:
            row["measured_s"] = first["measured_s"]
            if "measured_dense_s" in first:
                row["measured_dense_s"] = first["measured_dense_s"]
            row["timed_with"] = first["layer"]
        else:
            # the promise: no sparse kernel slower than the layer's dense one, measured here side by side
            kernel_s, dense_s = (time_layer_kernel(artifact.target, m, weight, packed, rounds=rounds, with_dense=True)
                                 if sparse else (time_layer_kernel(artifact.target, m, weight, None, rounds=rounds),
                                                 None))
            row["measured_s"] = kernel_s
            if dense_s is not None:
                row["measured_dense_s"] = dense_s
            timed[problem] = row
        rows.append(row)
        if report is not None:
            report.predicted_s, report.measured_s = predicted, row["measured_s"]
    if not rows:
        raise SparseccError("the artifact has no layer whose kernel can be timed alone")
    # correlation and error over the kernels timed: a problem shared by 30 layers counts once
    distinct = [r for r in rows if "timed_with" not in r]
    predicted_each = [r["predicted_s"] for r in distinct]
    measured_each = [r["measured_s"] for r in distinct]
    summary = {
        "layers": rows,
        "spearman": spearman(predicted_each, measured_each),
        "median_relative_error": float(np.median([abs(p / m - 1) for p, m in zip(predicted_each, measured_each,
                                                                                 strict=True)])),
        "predicted_sum_s": sum(r["predicted_s"] for r in rows), "measured_sum_s": sum(r["measured_s"] for r in rows),
        "model_latency_s": model_latency,
        "kernels_timed": len(distinct),
        "slower_than_dense": [r["layer"] for r in rows if r.get("measured_dense_s", math.inf) <= r["measured_s"]],
    }
    artifact.report.cost_model = summary
    return summary
