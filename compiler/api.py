"""The Python entry point: ``sparsecc.compile`` runs the whole pipeline and returns an Artifact.

The pipeline is an ordinary pipeline string (see ``pass_manager``), so what ``compile`` does is
exactly what a build script gets from ``PassManager(default_pipeline(...))``.
"""

from __future__ import annotations

import pathlib
import shutil
import warnings
from collections.abc import Sequence
from typing import Any

import torch

from .artifact import Artifact
from .capture import capture, from_exported
from .errors import CalibrationError, SparseccError
from .pass_manager import (
    NumericsInstrument,
    PassContext,
    PassManager,
    SnapshotInstrument,
    TimingInstrument,
    VerifyInstrument,
    compare_outputs,
)
from .plan import Plan
from .program import Program, flatten_outputs
from .report import LayerReport, Report
from .sparsity import FORMAT_ARRAYS, check_sparsity_value
from .workdirs import MARKER, make_workdir, own

METHODS = ("magnitude", "wanda", "sparsegpt")
REFINEMENTS = ("dsnot",)
ALLOCATIONS = ("uniform", "owl", "depth", "erk", "search", "neuroal")
#: storage of the compiled weights (``compile(weights=...)``, ``--weights``): spelling -> the
#: lower pass's value
WEIGHTS = {"float32": "float32", "fp32": "float32", "bfloat16": "bfloat16", "bf16": "bfloat16"}


def weight_storage(weights: str) -> str:
    """The lower pass's spelling (``float32`` or ``bfloat16``) of a ``weights`` choice."""
    if weights not in WEIGHTS:
        raise SparseccError(f"unknown weight storage {weights!r}; choose one of: float32 (fp32), bfloat16 (bf16)")
    return WEIGHTS[weights]


def with_weight_storage(pipeline: str, weights: str) -> str:
    """``pipeline`` with every lower pass storing dense and sparse weights as ``weights``."""
    import dataclasses

    from .pass_manager import format_pipeline, parse_pipeline

    storage = weight_storage(weights)
    passes = parse_pipeline(pipeline)
    if not any(p.name == "lower" for p in passes):
        raise SparseccError(f"weights={weights!r} sets the lower pass's storage, but pipeline {pipeline!r} has no "
                            "lower pass")
    return format_pipeline(dataclasses.replace(p, dense_weights=storage, sparse_weights=storage)
                           if p.name == "lower" else p for p in passes)


RECOVERIES = ("perp", "biases", "full")


def recover_element(recover: str | None, *, steps: int = 0, measure: str = "", soup: int = 1) -> str:
    """The ``recover{...}`` pipeline element for ``compile(recover=...)`` ("" without recovery):
    ``recover`` names the parameters retrained (perp, biases, full); ``steps`` (0: the pass's
    default), ``measure`` ("": the pass's default, kl) and ``soup`` set its options."""
    if not recover:
        if steps or measure or soup != 1:
            raise SparseccError("recover_steps, recover_measure and soup set the recovery: add recover='perp' "
                                "(--recover perp)")
        return ""
    if recover not in RECOVERIES:
        raise SparseccError(f"unknown recovery {recover!r}; choose one of: {', '.join(RECOVERIES)}")
    options = [f"params={recover}"] + ([f"steps={steps}"] if steps else []) + ([f"measure={measure}"] if measure
                                                                             else [])
    options += [f"soup={soup}"] if soup != 1 else []
    return f"recover{{{','.join(options)}}}"


def default_pipeline(*, sparsity: float, pattern: str | None, method: str, skip: str = "",
                     refine: str | None = None, allocation: str | None = None, weights: str = "float32",
                     convs: str = "pointwise", recover: str = "") -> str:
    """The pipeline ``compile`` runs, as a string a build script can reuse or edit. ``weights``
    (``float32`` or ``bfloat16``) is how the compiled kernels store dense weights and sparse
    values (the lower pass's ``dense_weights`` and ``sparse_weights``). ``recover`` is a
    ``recover{...}`` element (:func:`recover_element`) run between pruning and packing."""
    storage = weight_storage(weights)
    lower = "lower" if storage == "float32" else f"lower{{dense_weights={storage},sparse_weights={storage}}}"
    if method not in METHODS:
        raise SparseccError(f"unknown pruning method {method!r}; choose one of: {', '.join(METHODS)}")
    options = [f"sparsity={sparsity:g}", f"method={method}"]
    if pattern:
        options.append(f"pattern={pattern}")
    if skip:
        options.append(f"skip={skip}")
    if convs not in ("pointwise", "all"):
        raise SparseccError(f"convs {convs!r}: choose pointwise (1x1 convolutions only) or all")
    if convs != "pointwise":
        options.append(f"convs={convs}")
    if refine and refine not in REFINEMENTS:
        raise SparseccError(f"unknown mask refinement {refine!r}; choose one of: {', '.join(REFINEMENTS)}")
    if allocation and allocation not in ALLOCATIONS:
        raise SparseccError(f"unknown allocation {allocation!r}; choose one of: {', '.join(ALLOCATIONS)}")
    if pattern == "channel" and convs != "pointwise":
        raise SparseccError("convs chooses which convolutions get sparse kernels; channel pruning keeps every "
                            "layer dense: drop --convs or use an unstructured, block or N:M pattern")
    if pattern == "channel" and (refine or (allocation and allocation != "uniform")):
        raise SparseccError("refine and allocation choose weights inside layers; channel pruning removes whole "
                            "channels: drop --refine/--allocation or use an unstructured, block or N:M pattern")
    if pattern == "channel" and recover:
        raise SparseccError("recovery retrains inside the sparse masks; channel pruning keeps every layer dense: "
                            "drop --recover or use an unstructured, block or N:M pattern")
    if pattern == "channel":
        # structured: channels are removed and the smaller layers run on dense kernels
        importance = "l2" if method == "magnitude" else "taylor"
        channel_options = [f"sparsity={sparsity:g}", f"importance={importance}"] + ([f"skip={skip}"] if skip else [])
        return f"prune-channels{{{','.join(channel_options)}}},pack,{lower},build"
    allocate = f"allocate{{method={allocation}}}," if allocation and allocation != "uniform" else ""
    prune = f"prune-{method}" + (f"{{refine={refine}}}" if refine else "")
    # The pruning passes calibrate themselves, layer by layer (see sparsecc.passes.prune).
    recovery = f"{recover}," if recover else ""
    return f"plan-uniform{{{','.join(options)}}},{allocate}{prune},{recovery}pack,{lower},build"


def _as_program(model: Any, example_inputs: Sequence[Any] | torch.Tensor | None) -> Program:
    if isinstance(model, Program):
        return model
    if isinstance(model, torch.export.ExportedProgram):
        return from_exported(model, example_inputs)
    if example_inputs is None:
        raise SparseccError("compile needs example_inputs to capture an nn.Module")
    return capture(model, example_inputs)


def _normalize_calibration(calibration: Any, program: Program) -> list[tuple[Any, ...]] | None:
    """``calibration`` as a list of input tuples, each checked against ``program`` before any work:
    a batch that does not fit fails deep in a pass, one with NaN or no rows prunes a wrong model."""
    from .calibration_check import as_batches, check_calibration

    if calibration is None:
        return None
    if isinstance(calibration, torch.Tensor):
        raise CalibrationError("calibration must be a list of input tuples (one tuple per batch), "
                               "not a single tensor")
    batches = as_batches(calibration)
    check_calibration(batches, program)
    return batches


def _collect_packed_arrays(program: Program) -> dict[str, torch.Tensor]:
    """Packed arrays of every sparse layer, keyed "<layer>/<array>" (e.g. "fc1/indptr")."""
    from sparsecc.passes.pack import buffer_name

    arrays = {}
    for layer, info in program.sparsity.items():
        for key in FORMAT_ARRAYS.get(info.packed_format, ()):
            arrays[f"{layer}/{key}"] = program.tensor(buffer_name(layer, key)).detach().clone().contiguous()
    return arrays


def _layer_reports(plan: Plan, packed: Program, lowering: Any) -> list[LayerReport]:
    kernels = lowering.kernels_by_layer() if lowering is not None and hasattr(lowering, "kernels_by_layer") else {}
    kernel_bytes = lowering.kernel_bytes_by_layer() if lowering is not None else {}
    reports = []
    for lp in plan.layers.values():
        info = packed.sparsity.get(lp.name)
        dense_bytes = 4
        for d in lp.shape:
            dense_bytes *= d
        if info is not None and info.packed_format:
            reports.append(LayerReport(lp.name, lp.kind, lp.shape, "sparse", info.pattern, info.sparsity,
                                       info.packed_format, dense_bytes, info.packed_bytes,
                                       kernel=kernels.get(lp.name), kernel_bytes=kernel_bytes.get(lp.name)))
        else:
            reason = lp.reason or "not packed (see diagnostics)"
            reports.append(LayerReport(lp.name, lp.kind, lp.shape, "dense", None, 0.0, None, dense_bytes,
                                       None, reason, kernels.get(lp.name), kernel_bytes.get(lp.name)))
        # what a search predicted for the layer, when one made the plan
        reports[-1].predicted_s, reports[-1].predicted_dense_s, reports[-1].error = lp.predicted_s, lp.dense_s, lp.error
    return reports


def compile(  # noqa: A001 - the public name users expect
    model_or_program: Any,
    example_inputs: Sequence[Any] | torch.Tensor | None = None,
    *,
    target: str = "x86",
    sparsity: float = 0.5,
    pattern: str | None = None,
    method: str = "wanda",
    refine: str | None = None,
    allocation: str | None = None,
    calibration: Sequence[Any] | None = None,
    skip: str = "",
    pipeline: str | None = None,
    progress: bool = True,
    dump_dir: str | pathlib.Path | None = None,
    weights: str = "float32",
    convs: str = "pointwise",
    plan: Plan | str | pathlib.Path | None = None,
    measure_layers: bool = False,
    recover: str | None = None,
    recover_steps: int = 0,
    recover_measure: str = "",
    soup: int = 1,
) -> Artifact:
    """Capture, calibrate, prune, pack, lower and build ``model_or_program`` for ``target``.

    ``model_or_program`` is an ``nn.Module`` (captured with ``example_inputs``), an
    ``ExportedProgram`` or a ``Program``. ``calibration`` is a list of input tuples; without it
    the example inputs are used and a warning says so. ``method`` is ``magnitude``, ``wanda`` or
    ``sparsegpt``; ``refine="dsnot"`` refines every mask with DSnoT; ``allocation`` (``owl``,
    ``depth``, ``erk``, ``search``, ``neuroal``) gives layers unequal sparsities at the same total.
    ``pipeline`` replaces the default pipeline string. ``weights="bfloat16"`` (or ``"bf16"``) stores
    the weights of dense layers and the values of sparse ones as bf16, with fp32 arithmetic: half
    the value bytes, and outputs within bf16 rounding of the fp32 program; a layer whose bf16
    kernel the cost table measured slower keeps fp32 (a warning in the report names it). With
    ``pipeline`` it overrides the storage options of the pipeline's lower pass. ``convs="all"`` also
    makes k x k, strided and padded convolutions (groups 1) sparse, as im2col rows times a sparse
    GEMM; by default only 1x1 convolutions are. ``plan`` (a :class:`Plan` or a plan JSON file,
    e.g. from :func:`search_plan` or ``sparsecc search``) fixes every layer's pattern and sparsity
    instead of ``sparsity`` / ``pattern``; it is pruned with the plan's own method.
    ``measure_layers=True`` then times every layer's kernel and the whole model on this machine and
    records them against the cost model's predictions (``report.cost_model``, see
    :mod:`sparsecc.cost_check`). ``recover`` (``perp``, ``biases`` or ``full``) retrains after
    pruning, distilled from the dense program on the calibration batches (a share held out), with
    every mask kept bit for bit (:mod:`sparsecc.passes.recover`): ``recover_steps`` optimizer steps
    at most, ``recover_measure`` (``kl`` for logits, ``cosine`` or ``l2`` for embeddings), ``soup``
    ingredients averaged (Sparse Model Soups). Returns an Artifact whose ``report`` says what
    happened per layer.
    """
    from sparsecc.targets import get_target

    check_sparsity_value(sparsity)
    record = get_target(target)
    # Fail before capture and calibration, not after minutes of pruning.
    record.require_model_build()
    program = _as_program(model_or_program, example_inputs)
    batches = _normalize_calibration(calibration, program)
    if batches is None:
        warnings.warn("no calibration data given: pruning statistics come from the example inputs "
                      "only; pass calibration=[...] (or --calib) with real samples", stacklevel=2)
    storage = weight_storage(weights)
    recovery = recover_element(recover, steps=recover_steps, measure=recover_measure, soup=soup)
    if plan is not None:
        if pattern or refine or (allocation and allocation != "uniform") or convs != "pointwise":
            raise SparseccError("a plan fixes every layer's pattern and sparsity: drop pattern, refine, allocation "
                                "and convs, or search again with the patterns you want")
        if pipeline:
            raise SparseccError("plan and pipeline both choose the planning pass; put plan-file{path=...} in your "
                                "pipeline instead")
        if isinstance(plan, Plan):
            plan_dir = make_workdir("plan")
            plan_path = plan_dir / "plan.json"
            plan.save(plan_path)
            own(plan, plan_dir)
            method = plan.method
        else:
            plan_path = pathlib.Path(plan)
            method = Plan.load(plan_path).method
        lower = "lower" if storage == "float32" else f"lower{{dense_weights={storage},sparse_weights={storage}}}"
        recovery_step = f"{recovery}," if recovery else ""
        pipeline = f"plan-file{{path={plan_path}}},prune-{method},{recovery_step}pack,{lower},build"
        storage = "float32"  # already in the pipeline
    if pipeline:
        if convs != "pointwise":
            raise SparseccError("convs sets an option of plan-uniform in the default pipeline; with your own "
                                "pipeline, write it there: plan-uniform{...,convs=all}")
        if recovery and plan is None:
            raise SparseccError("recover adds a pass to the default pipeline; with your own pipeline, write it "
                                f"there: ...,prune-{method},{recovery},pack,...")
        text = with_weight_storage(pipeline, storage) if storage != "float32" else pipeline
    else:
        text = default_pipeline(sparsity=sparsity, pattern=pattern, method=method, skip=skip,
                                refine=refine, allocation=allocation, weights=storage, convs=convs,
                                recover=recovery)
    manager = PassManager(text)
    timing, snapshots = TimingInstrument(), SnapshotInstrument(pathlib.Path(dump_dir) if dump_dir else None)
    numerics = NumericsInstrument(program.example_inputs)
    manager.instruments = [timing, snapshots, VerifyInstrument(), numerics]
    workdir = make_workdir()
    try:
        artifact = _run_compile(manager, program, record, batches, method, timing, snapshots, numerics, progress,
                                workdir)
    except BaseException:
        shutil.rmtree(workdir, ignore_errors=True)
        raise
    # the artifact runs its library from the work folder until it is saved elsewhere
    own(artifact, workdir)
    if measure_layers:
        from .cost_check import check_cost_model
        from .timing import median_latency

        if not record.runs_here:
            raise SparseccError(f"measure_layers: target {record.name!r} does not run on this machine")
        latency = median_latency({"model": lambda: artifact(*program.example_inputs)}, rounds=7)["model"]
        check_cost_model(artifact, model_latency=latency)
    return artifact


def _run_compile(manager: PassManager, program: Program, record: Any, batches: list[tuple[Any, ...]] | None,
                 method: str, timing: TimingInstrument, snapshots: SnapshotInstrument,
                 numerics: NumericsInstrument, progress: bool, workdir: pathlib.Path) -> Artifact:
    """Run the pipeline in ``workdir`` and assemble the Artifact, checked against the masked-dense
    program where the target runs here."""
    from sparsecc.targets.kernels import HALF_MARKERS

    ctx = PassContext(record, calibration=batches, progress=progress, workdir=workdir)
    result = manager.run(program, ctx)

    stages = {res.program.stage: res.program for _, res in result.results}
    final = result.program
    if final.compiled is None:
        raise SparseccError(f"pipeline {manager.pipeline!r} did not end with a build; "
                            "add lower,build to produce an artifact")
    # the masked-dense program the kernels must reproduce: after recovery when it ran
    pruned = stages.get("recovered") or stages.get("pruned") or stages.get("planned") or program
    packed = stages.get("packed") or pruned
    plan = final.plan or Plan(target=record.name, method=method)
    report = Report(target=record.name, pipeline=manager.pipeline, method=method,
                    layers=_layer_reports(plan, packed, final.lowered), search=dict(plan.search))
    for (name, res), (_, seconds) in zip(result.results, timing.times, strict=True):
        report.passes.append({"name": name, "seconds": round(seconds, 4), "changed": res.changed,
                              "counters": res.counters})
    report.numerics = [vars(r) for r in numerics.records]
    report.diagnostics = [d.to_json() for d in result.diagnostics]
    report.library_bytes = final.compiled.stat().st_size
    # A static program (wasm-simd, arm-neon) is a folder, and a GPU build writes its CUDA source and
    # cubin beside the library: those files travel with it.
    model_files = (sorted(p for p in final.compiled.parent.iterdir() if p != final.compiled and p.name != MARKER)
                   if record.link_model is not None or record.model_lowering is not None else [])
    artifact = Artifact(
        target=record.name, library=final.compiled, pruned=pruned.exported, packed_program=packed.exported,
        plan=plan, report=report, example_inputs=program.example_inputs,
        stages=[(label, txt) for label, txt in snapshots.snapshots], packed_arrays=_collect_packed_arrays(packed),
        pipeline=manager.pipeline, model_files=model_files)
    if record.runs_here:
        compiled = flatten_outputs(artifact(*program.example_inputs))
        reference = pruned.run_flat(*program.example_inputs)
        max_abs, rel = compare_outputs(reference, compiled)
        report.compiled_vs_reference = {"rel": rel, "max_abs": max_abs}
        # bf16-stored weights round every weight by up to 2^-8 relative (fp16 kernels round weights and
        # inputs by 2^-11); fp32 kernels only reorder sums.
        half = any(marker.strip() in layer.kernel for marker in HALF_MARKERS
                   for layer in report.layers if layer.kernel)
        if rel > (1e-2 if half else 1e-4):
            report.diagnostics.append({
                "severity": "error", "pass_name": "build", "layer": None,
                "message": f"compiled output differs from the masked-dense program by {rel:.3g} (relative); "
                           "this is a kernel bug, please report it with the artifact"})
    return artifact


def search_plan(
    model_or_program: Any,
    example_inputs: Sequence[Any] | torch.Tensor | None = None,
    *,
    target: str = "x86",
    latency: float = 0.0,
    sparsity: float = 0.0,
    max_error: float = 0.0,
    calibration: Sequence[Any] | None = None,
    patterns: str = "",
    sparsities: str = "",
    measure: str = "kl",
    method: str = "wanda",
    search_batches: int = 0,
    tune: bool = False,
    tune_candidates: int = 4,
    progress: bool = True,
) -> Plan:
    """Search a per-layer plan for ``target`` under one budget, without compiling (see
    :mod:`sparsecc.passes.search`): ``latency`` (the searched layers' predicted time at most this
    fraction of dense), ``sparsity`` (at least this fraction of their weights removed) or
    ``max_error`` (the model's ``measure`` on the first ``search_batches`` calibration batches at
    most this; those batches also measure the finalists; 0: as many as hold 512 output positions,
    e.g. 4 batches of 128 tokens or 32 single images). Each layer's sensitivity is measured on the
    first of them that hold 8 output positions (1 batch of tokens, 8 single images). ``patterns``:
    ';'-separated patterns to try (default: the target's search set); ``sparsities``: the ladder.
    ``tune``: first measure the model's layer kernels on this machine into the target's cost
    table (targets that run here), so the search plans from measured times, not the roofline;
    ``tune_candidates`` schedules of each kernel are explored (0: all, as ``sparsecc tune``).
    The plan is what :func:`compile` takes as ``plan=``; ``plan.save(path)`` writes its JSON."""
    from sparsecc.passes.search import DEFAULT_LADDER
    from sparsecc.targets import get_target

    record = get_target(target)
    program = _as_program(model_or_program, example_inputs)
    batches = _normalize_calibration(calibration, program)
    if batches is None:
        warnings.warn("no calibration data given: the search measures errors on the example inputs only; pass "
                      "calibration=[...] (or --calib) with real samples", stacklevel=2)
    if method not in METHODS:
        raise SparseccError(f"unknown pruning method {method!r}; choose one of: {', '.join(METHODS)}")
    options = [f"{name}={value:g}" for name, value in (("latency", latency), ("sparsity", sparsity),
                                                      ("max_error", max_error)) if value]
    options += [f"method={method}", f"measure={measure}", f"sparsities={sparsities or DEFAULT_LADDER}",
                f"search_batches={search_batches}"]
    if patterns:
        options.append(f"patterns={patterns}")
    if tune:
        options += ["tune=true", f"tune_candidates={tune_candidates}"]
    manager = PassManager(f"search{{{','.join(options)}}}")
    result = manager.run(program, PassContext(record, calibration=batches, progress=progress))
    plan = result.program.plan
    if plan is None:
        raise SparseccError("the search produced no plan")
    return plan
