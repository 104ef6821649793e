"""The ``sparsecc`` command line: compile, run, inspect, targets, passes, demo.

Errors sparsecc raises on bad input print as one clear message and exit with status 2; any
other exception is a bug and keeps its traceback.
"""

from __future__ import annotations

import argparse
import io
import json
import logging
import math
import os
import pathlib
import sys
import typing
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from .api import ALLOCATIONS, METHODS, RECOVERIES, REFINEMENTS, recover_element, weight_storage
from .artifact_files import check_destination
from .errors import SparseccError
from .outputs import check_dump_dir, check_output_file, write_file
from .sparsity import check_sparsity_value


@contextmanager
def quiet_torch_logs() -> Iterator[None]:
    """Keep torch's own warnings and logged tracebacks (export, deserialization) out of the
    terminal: sparsecc reports what went wrong itself, in one line."""
    logger = logging.getLogger("torch")
    level, propagate = logger.level, logger.propagate
    if not os.environ.get("SPARSECC_DEBUG"):
        logger.setLevel(logging.CRITICAL)
        logger.propagate = False
    try:
        yield
    finally:
        logger.setLevel(level)
        logger.propagate = propagate


def _load_tensors(path: str, what: str) -> Any:
    import torch

    p = pathlib.Path(path)
    if not p.is_file():
        raise SparseccError(f"{what} file {p} does not exist" + (" (it is a folder)" if p.is_dir() else ""))
    try:
        return torch.load(p, weights_only=True)
    except Exception as exc:  # noqa: BLE001 - torch.load raises many types
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:160]
        raise SparseccError(f"could not read {what} file {p}: it is not a torch.save file of tensors ({first}); "
                            "write it with torch.save(tensor or tuple of tensors, path)") from None


def _as_input_tuple(value: Any, what: str) -> tuple[Any, ...]:
    import torch

    if isinstance(value, torch.Tensor):
        return (value,)
    if isinstance(value, (list, tuple)) and all(isinstance(v, torch.Tensor) for v in value):
        return tuple(value)
    raise SparseccError(f"{what} must hold a tensor or a tuple of tensors")


def _floats(text: str) -> list[float]:
    try:
        return [float(v) for v in text.split(",")]
    except ValueError:
        raise SparseccError(f"{text!r} is not a comma-separated list of numbers") from None


def _calibration(args: argparse.Namespace, program: Any) -> list[tuple[Any, ...]] | None:
    """The calibration batches the --calib* options name (None, with a warning, without any)."""
    if args.calib:
        raw = _load_tensors(args.calib, "calibration")
        if not isinstance(raw, (list, tuple)) or not raw:
            raise SparseccError(f"calibration file {args.calib} must hold a non-empty list of input tuples")
        return [_as_input_tuple(b, f"calibration batch {i}") for i, b in enumerate(raw)]
    if args.calib_text:
        from .calibration_data import text_batches

        if not args.tokenizer:
            raise SparseccError("--calib-text needs --tokenizer TOKENIZER.json (the model's Hugging Face tokenizer)")
        return text_batches(args.calib_text, args.tokenizer, program.example_inputs, count=args.calib_batches or 32)
    if args.calib_images:
        from .calibration_data import image_batches

        return image_batches(args.calib_images, program.example_inputs, mean=_floats(args.image_mean),
                             std=_floats(args.image_std), count=args.calib_batches or None)
    print("warning: no --calib given; calibrating on the model's example inputs only", file=sys.stderr)
    return None


def _add_calibration_options(p: argparse.ArgumentParser) -> None:
    calib = p.add_mutually_exclusive_group()
    calib.add_argument("--calib", default=None, help="CALIB.pt: torch.save'd list of input tuples")
    calib.add_argument("--calib-text", nargs="+", default=None, metavar="PATH",
                       help="text files or folders (.txt/.rst/.md) for a language model; needs --tokenizer")
    calib.add_argument("--calib-images", nargs="+", default=None, metavar="PATH",
                       help="image files or folders for an image model (resized to the example input)")
    p.add_argument("--tokenizer", default=None, help="tokenizer.json for --calib-text")
    p.add_argument("--calib-batches", type=int, default=0,
                   help="batches to draw (text: default 32; images: default all)")
    p.add_argument("--image-mean", default="0.485,0.456,0.406", help="per-channel mean for --calib-images")
    p.add_argument("--image-std", default="0.229,0.224,0.225", help="per-channel std for --calib-images")


def cmd_search(args: argparse.Namespace) -> int:
    import warnings

    from sparsecc.targets import get_target

    from .api import search_plan
    from .capture import load_program

    get_target(args.target)
    _check_search_budget(args)
    output = check_output_file(args.output, "-o", inputs=_input_paths(args))
    _check_plan_destination(output)
    program = load_program(args.model)
    calibration = _calibration(args, program)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        plan = search_plan(program, target=args.target, latency=args.latency or 0.0, sparsity=args.sparsity or 0.0,
                           max_error=args.max_error or 0.0, calibration=calibration, patterns=args.patterns or "",
                           sparsities=args.sparsities or "", measure=args.measure, method=args.method,
                           tune=args.tune, progress=not args.quiet)
    write_file(output, plan.dumps())
    print(format_plan(plan), end="")
    print(f"plan written to {args.output}; compile it with: sparsecc compile {args.model} --target {args.target} "
          f"--plan {args.output}")
    return 0


def _check_search_budget(args: argparse.Namespace) -> None:
    budget = next(v for v in (args.latency, args.sparsity, args.max_error) if v is not None)
    if not (math.isfinite(budget) and budget > 0):
        raise SparseccError(f"the search budget {budget} is not a positive number; e.g. --latency 0.6, --sparsity 0.6 "
                            "or --max-error 0.05")
    if args.sparsities is not None:
        ladder = [v.strip() for v in args.sparsities.split(";")]
        values = _floats(",".join(ladder)) if all(ladder) else []
        if not values or any(not 0 < v < 1 for v in values):
            raise SparseccError(f"--sparsities {args.sparsities!r}: give ';'-separated sparsities in (0, 1), e.g. "
                                "'0.5;0.7;0.9'")


def _input_paths(args: argparse.Namespace) -> list[str]:
    """Every file a compile or search reads, so that no output lands on one of them."""
    paths = [args.model]
    for name in ("calib", "tokenizer", "plan"):
        if getattr(args, name, None):
            paths.append(getattr(args, name))
    for name in ("calib_text", "calib_images"):
        paths.extend(getattr(args, name, None) or [])
    return paths


def _check_plan_destination(output: pathlib.Path) -> None:
    """A plan replaces only an earlier plan: any other existing file may be the user's work."""
    if not output.exists():
        return
    try:
        data = json.loads(output.read_bytes().decode("utf-8"))
        is_plan = isinstance(data, dict) and "schema_version" in data and "layers" in data
    except (OSError, ValueError, RecursionError):  # unreadable, not UTF-8, not JSON, oversized integers
        is_plan = False
    if not is_plan:
        raise SparseccError(f"-o {output} exists and is not a sparsecc plan; refusing to overwrite it: choose another "
                            "path or remove it yourself")


def format_plan(plan: Any) -> str:
    """A searched plan as a table: per layer the decision, predicted times and error, then totals."""
    lines = [f"{'layer':40s} {'shape':>11s} {'decision':18s} {'predicted':>10s} {'dense':>10s} {'error':>8s}  note"]
    lines.append("-" * len(lines[0]))
    def us(seconds: float | None) -> str:
        return "-" if seconds is None else f"{seconds * 1e6:.1f}us"

    for lp in plan.layers.values():
        decision = f"{lp.pattern} {lp.sparsity:.0%}" if lp.is_sparse else "dense"
        error = "-" if lp.error is None else f"{lp.error:.4f}"
        lines.append(f"{lp.name[:40]:40s} {'x'.join(map(str, lp.shape)):>11s} {decision:18s} {us(lp.predicted_s):>10s} "
                     f"{us(lp.dense_s):>10s} {error:>8s}  {lp.reason}".rstrip())
    search = plan.search
    if search:
        lines.append("")
        lines.append(f"budget {search['budget']}: predicted {search['predicted_speedup']:.2f}x the dense kernels of "
                     f"the searched layers, {1 - search['kept_fraction']:.0%} of their weights removed, "
                     f"{search['measure']} {search['measured_error']:.4g} on "
                     + (f"{search['batches']['finalists']} calibration batches" if "batches" in search
                        else "calibration data") + " (one-shot masks)")
    return "\n".join(lines) + "\n"


def cmd_compare(args: argparse.Namespace) -> int:
    from .plan import Plan
    from .plan_compare import format_html, format_text

    output = check_output_file(args.output, "-o", inputs=args.plans) if args.output else None
    plans: dict[str, Plan] = {}
    for path in args.plans:
        plan = Plan.load(path)
        label = plan.target if plan.target not in plans else f"{plan.target} ({path})"
        plans[label] = plan
    text = format_html(plans) if args.format == "html" else format_text(plans)
    if output is not None:
        write_file(output, text)
        print(f"comparison written to {output}")
    else:
        print(text, end="")
    return 0


def cmd_compile(args: argparse.Namespace) -> int:
    import warnings

    from sparsecc.targets import get_target

    from .api import compile as compile_model
    from .capture import load_program

    # An unknown target or one without whole-model builds, or an -o that cannot take the artifact,
    # fails before the model is loaded: not after minutes of pruning.
    get_target(args.target).require_model_build()
    check_destination(pathlib.Path(args.output))
    if args.dump_dir:
        check_dump_dir(pathlib.Path(args.dump_dir), pathlib.Path(args.output))
    recover_element(args.recover, steps=args.recover_steps, measure=args.recover_measure, soup=args.soup)
    if args.plan:
        from .plan import Plan

        Plan.load(args.plan)  # a bad plan file is reported before the model is even loaded
    program = load_program(args.model)
    calibration = _calibration(args, program)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        artifact = compile_model(program, target=args.target, sparsity=args.sparsity, pattern=args.pattern,
                                 method=args.method, refine=args.refine, allocation=args.allocation,
                                 calibration=calibration, skip=args.skip or "",
                                 pipeline=args.pipeline, progress=not args.quiet, dump_dir=args.dump_dir,
                                 weights=weight_storage(args.weights), convs=args.convs, plan=args.plan,
                                 measure_layers=args.measure_layers, recover=args.recover,
                                 recover_steps=args.recover_steps, recover_measure=args.recover_measure,
                                 soup=args.soup)
    out = artifact.save(args.output)
    print(artifact.report.summary(), end="")
    print(f"artifact written to {out}")
    return 0


def cmd_run(args: argparse.Namespace) -> int:
    import torch

    from .artifact import load

    out = check_output_file(args.output, "--output", inputs=[args.inputs], inside=[args.artifact])
    artifact = load(args.artifact)
    inputs = _as_input_tuple(_load_tensors(args.inputs, "inputs"), "inputs")
    engine = {"compiled": artifact, "reference": artifact.reference, "packed": artifact.packed}[args.engine]
    output = engine(*inputs)
    buffer = io.BytesIO()
    torch.save(output, buffer)
    write_file(out, buffer.getvalue())
    print(f"{args.engine} output written to {out}")
    return 0


def _stage_text(artifact: Any, stage: str) -> str:
    headed = [(text.splitlines() or [""])[0] for _, text in artifact.stages]
    for first, (_, text) in reversed(list(zip(headed, artifact.stages, strict=True))):
        if first.endswith(f"stage {stage}"):
            return text
    known = sorted({first.rsplit(" ", 1)[-1] for first in headed if first})
    raise SparseccError(f"artifact has no stage {stage!r}; stages: {', '.join(known)}")


def cmd_inspect(args: argparse.Namespace) -> int:
    from .artifact import load
    from .inspect import diff_text, format_dot
    from .program import Program

    if args.output is not None and args.format != "html":
        raise SparseccError("inspect -o FILE writes the HTML report; add --format html (other formats print)")
    output = check_output_file(args.output, "-o", inside=[args.artifact]) if args.output else None
    artifact = load(args.artifact)
    if args.format == "html":
        from .report_html import render_html

        page = render_html(artifact)
        if output is None:
            print(page, end="")
        else:
            write_file(output, page)
            print(f"HTML report written to {output}")
        return 0
    if args.report:
        print(artifact.report.summary(), end="")
        return 0
    if args.format == "dot":
        exported = artifact.packed_program if args.stage == "packed" else artifact.pruned
        program = Program(exported, artifact.example_inputs, stage=args.stage)
        program.sparsity = _sparsity_from_report(artifact, program)
        program.attach_meta()
        print(format_dot(program), end="")
        return 0
    text = _stage_text(artifact, args.stage)
    if args.diff:
        base = "captured" if args.stage != "captured" else "packed"
        print(diff_text(_stage_text(artifact, base), text, base, args.stage), end="")
    else:
        print(text, end="")
    return 0


def _sparsity_from_report(artifact: Any, program: Any) -> dict[str, Any]:
    """Rebuild per-layer sparsity facts of a saved program from the artifact's report."""
    from sparsecc.passes.pack import buffer_name

    from .program import SparsityInfo
    from .sparsity import FORMAT_ARRAYS

    facts = {}
    for lr in artifact.report.layers:
        if lr.decision != "sparse":
            continue
        if program.stage == "packed":
            buffers = tuple(buffer_name(lr.name, key) for key in FORMAT_ARRAYS[lr.packed_format])
            facts[lr.name] = SparsityInfo(lr.pattern, lr.sparsity, "pack", lr.packed_format, lr.packed_bytes,
                                          lr.dense_bytes, None, buffers)
        else:
            facts[lr.name] = SparsityInfo(lr.pattern, lr.sparsity, artifact.report.method)
    return facts


def cmd_targets(args: argparse.Namespace) -> int:
    from sparsecc.targets import all_targets

    for record in all_targets():
        here = "runs here" if record.runs_here else "build only"
        if not record.builds_models:
            here += "; kernels only, no whole-model build yet"
        print(f"{record.name:12s} {record.summary} [patterns: {', '.join(record.patterns)}; "
              f"default {record.default_pattern}; {here}]")
    return 0


def cmd_passes(args: argparse.Namespace) -> int:
    import dataclasses

    from .pass_manager import all_passes

    for cls in all_passes():
        options = ", ".join(f"{f.name}={f.default!r}" for f in dataclasses.fields(cls))
        print(f"{cls.name:16s} {cls.summary}" + (f"  {{{options}}}" if options else ""))
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from .demo import run_demo

    if args.threads < 1:
        raise SparseccError(f"--threads {args.threads}: give at least 1")
    if args.output:
        check_destination(pathlib.Path(args.output))
    return run_demo(pattern=args.pattern, sparsity=args.sparsity, output=args.output, threads=args.threads)


def _int_list(text: str, flag: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        values = []
    if not values or min(values) < 1:
        raise SparseccError(f"{flag} {text!r}: give comma-separated positive integers, e.g. 1,8,128")
    return values


def cmd_tune(args: argparse.Namespace) -> int:
    # The kernels' thread count is fixed when TVM's pool starts: set it before anything imports TVM.
    if args.threads:
        os.environ["TVM_NUM_THREADS"] = str(args.threads)
    from sparsecc.targets.tuning import tune

    try:
        shapes = [tuple(int(v) for v in s.lower().split("x")) for s in args.shapes.split(",")]
    except ValueError:
        raise SparseccError(f"--shapes {args.shapes!r}: give NxK pairs such as 768x768,3072x768") from None
    if any(len(s) != 2 or min(s) < 1 for s in shapes):
        raise SparseccError(f"--shapes {args.shapes!r}: give NxK pairs such as 768x768,3072x768")
    sparsities = _floats(args.sparsities)
    for value in sparsities:
        check_sparsity_value(value)
    if args.rounds < 1 or args.threads < 0:
        raise SparseccError("--rounds must be at least 1 and --threads at least 0 (0: all cores)")
    rows = _int_list(args.m, "--m")
    weights = tuple(weight_storage(w.strip()) for w in args.weights.split(",") if w.strip())
    table = tune(args.target, shapes, rows, args.patterns.split(","), sparsities,
                 table_path=args.table, rounds=args.rounds, weights=weights)
    print(f"cost table: {table.path} ({len(table.entries)} problems)")
    return 0


class _Parser(argparse.ArgumentParser):
    """argparse with sparsecc's error form: one line and status 2, no usage block."""

    def error(self, message: str) -> typing.NoReturn:
        print(f"sparsecc: error: {_one_line(message)}; see `{self.prog} --help`", file=sys.stderr)
        raise SystemExit(2)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="sparsecc", description="hardware-aware sparsity compiler for PyTorch")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("compile", help="compile a torch.export .pt2 model for a target")
    p.add_argument("model", help="MODEL.pt2 written by torch.export.save")
    p.add_argument("--target", default="x86")
    p.add_argument("--sparsity", type=float, default=0.5, help="fraction of weights set to zero, in [0, 1)")
    p.add_argument("--pattern", default=None,
                   help="unstructured | blockRxC (e.g. block16x1) | N:M (e.g. 2:4) | channel (structured: remove "
                        "whole channels; --sparsity is then the fraction of prunable channels removed)")
    p.add_argument("--method", default="wanda", choices=list(METHODS),
                   help="magnitude: |W|; wanda: |W| x ||X||; sparsegpt: Hessian-based, updates kept weights")
    p.add_argument("--refine", default=None, choices=list(REFINEMENTS),
                   help="refine every mask without training: dsnot (prune-and-grow toward zero expected error)")
    p.add_argument("--allocation", default="uniform", choices=list(ALLOCATIONS),
                   help="per-layer sparsities at the same total: owl, depth, erk, search (the best of them "
                        "on calibration data), or neuroal (search, then per-row ratios inside each layer)")
    _add_calibration_options(p)
    p.add_argument("--plan", default=None, help="PLAN.json from `sparsecc search` (or edited): every layer's pattern "
                                                 "and sparsity, instead of --sparsity / --pattern")
    p.add_argument("--measure-layers", action="store_true",
                   help="after the build, time every layer's kernel and the model here and report them against the "
                        "cost model's predictions (x86, wasm-simd)")
    p.add_argument("--recover", default=None, choices=list(RECOVERIES),
                   help="retrain after pruning, distilled from the dense model on the calibration data (a quarter "
                        "held out), masks kept: perp (biases, norms, low-rank adapters merged through the mask), "
                        "biases (biases and norms only) or full (every kept weight)")
    p.add_argument("--recover-steps", type=int, default=0, help="optimizer steps at most (default 200)")
    p.add_argument("--recover-measure", default="", choices=["", "kl", "cosine", "l2"],
                   help="distillation distance: kl (logits, the default), cosine or l2 (embeddings, features)")
    p.add_argument("--soup", type=int, default=1,
                   help="recover this many ingredients with different seeds and average them (Sparse Model Soups)")
    p.add_argument("--skip", default=None, help="layers to keep dense: fnmatch globs separated by ';'")
    p.add_argument("--convs", default="pointwise", choices=["pointwise", "all"],
                   help="which convolutions become sparse: pointwise (1x1 only, the default) or all (k x k, strided "
                        "and padded ones too, as im2col rows times a sparse GEMM)")
    p.add_argument("--pipeline", default=None, help="a full pipeline string replacing the default")
    p.add_argument("--weights", default="fp32", choices=["fp32", "bf16"],
                   help="storage of dense weights and sparse values in the compiled kernels: fp32, or bf16 "
                        "(half the bytes, fp32 arithmetic, outputs within bf16 rounding; layers the cost table "
                        "measured slower with bf16 keep fp32)")
    p.add_argument("--dump-dir", default=None, help="write numbered before/after dumps of every pass here")
    p.add_argument("-o", "--output", required=True, help="artifact folder (new, empty or an earlier artifact)")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=cmd_compile)

    p = sub.add_parser("search", help="choose per layer dense or a pattern and sparsity for a target, under one "
                                      "budget; write the plan as JSON without compiling")
    p.add_argument("model", help="MODEL.pt2 written by torch.export.save")
    p.add_argument("--target", default="x86")
    budget = p.add_mutually_exclusive_group(required=True)
    budget.add_argument("--latency", type=float, help="searched layers' predicted time at most this fraction of dense")
    budget.add_argument("--sparsity", type=float, help="at least this fraction of the searched layers' weights removed")
    budget.add_argument("--max-error", type=float, help="model error on calibration data at most this (--measure)")
    p.add_argument("--patterns", default=None, help="patterns to try, ';'-separated (default: the target's search set)")
    p.add_argument("--sparsities", default=None, help="sparsity ladder, ';'-separated (default 0.5;0.6;0.7;0.8;0.9)")
    p.add_argument("--measure", default="kl", choices=["kl", "l2"],
                   help="model error: kl (softmax KL divergence from dense, for logits) or l2 (relative L2)")
    p.add_argument("--method", default="wanda", choices=list(METHODS), help="the pruning method the plan is for")
    p.add_argument("--tune", action="store_true",
                   help="first time this model's layer kernels on this machine (x86, wasm-simd) into the target's "
                        "cost table, so the search plans from measured times (slow the first time, cached after)")
    _add_calibration_options(p)
    p.add_argument("-o", "--output", required=True, help="PLAN.json to write")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=cmd_search)

    p = sub.add_parser("compare", help="plans of one model for several targets side by side, with why each differing "
                                       "layer differs")
    p.add_argument("plans", nargs="+", help="PLAN.json files from `sparsecc search` (two or more)")
    p.add_argument("--format", default="text", choices=["text", "html"])
    p.add_argument("-o", "--output", default=None, help="write to this file instead of stdout")
    p.set_defaults(func=cmd_compare)

    p = sub.add_parser("run", help="run an artifact on saved inputs")
    p.add_argument("artifact")
    p.add_argument("--inputs", required=True, help="IN.pt: torch.save'd tensor or tuple of tensors")
    p.add_argument("--output", required=True, help="where to torch.save the output")
    p.add_argument("--engine", default="compiled", choices=["compiled", "reference", "packed"],
                   help="compiled code, the masked-dense program, or the packed program in torch")
    p.set_defaults(func=cmd_run)

    p = sub.add_parser("inspect",
                       help="print an artifact's program at a stage, a diff, DOT, or its report (text or HTML)")
    p.add_argument("artifact")
    p.add_argument("--stage", default="packed", choices=["captured", "pruned", "recovered", "packed"])
    p.add_argument("--diff", action="store_true", help="unified diff from the captured program to --stage")
    p.add_argument("--format", default="text", choices=["text", "dot", "html"],
                   help="html: the whole report as one self-contained page (graphs, masks, timeline)")
    p.add_argument("-o", "--output", default=None, help="with --format html: write the page here instead of stdout")
    p.add_argument("--report", action="store_true", help="print the compile report")
    p.set_defaults(func=cmd_inspect)

    p = sub.add_parser("targets", help="list targets")
    p.set_defaults(func=cmd_targets)
    p = sub.add_parser("passes", help="list passes and their options")
    p.set_defaults(func=cmd_passes)

    p = sub.add_parser("tune", help="measure kernel schedules on this machine and store the fastest in the "
                       "target's cost table (read by compile)")
    p.add_argument("--target", default="x86",
                   help="x86 (kernels timed in-process) or wasm-simd (timed in wasmtime, own table); arm-neon "
                        "cannot be timed here (its cost model is a roofline)")
    p.add_argument("--shapes", required=True, help="weight shapes NxK, e.g. 768x768,3072x768")
    p.add_argument("--m", default="1,128", help="rows of x (batch x tokens), e.g. 1,8,128")
    p.add_argument("--patterns", default="unstructured,block16x1,2:4,dense",
                   help="pattern names (and 'dense' for the dense kernel)")
    p.add_argument("--sparsities", default="0.5,0.7,0.9", help="for non-N:M patterns")
    p.add_argument("--rounds", type=int, default=7, help="interleaved timing rounds per problem")
    p.add_argument("--threads", type=int, default=0, help="kernel threads (default: TVM_NUM_THREADS or all cores)")
    p.add_argument("--table", default=None, help="cost table file (default: this host's, under ~/.cache/sparsecc)")
    p.add_argument("--weights", default="fp32",
                   help="value storages to measure: fp32, bf16 or fp32,bf16 (both timed side by side; bf16 "
                        "entries are keyed separately)")
    p.set_defaults(func=cmd_tune)

    p = sub.add_parser("demo", help="compile the bundled digits CNN for the host; print speed and accuracy")
    p.add_argument("--pattern", default="block16x1")
    p.add_argument("--sparsity", type=float, default=0.7)
    p.add_argument("--threads", type=int, default=1, help="threads for torch and the compiled code alike")
    p.add_argument("-o", "--output", default=None, help="also save the artifact here")
    p.set_defaults(func=cmd_demo)
    return parser


def _one_line(text: str) -> str:
    return " ".join(line.strip() for line in str(text).splitlines() if line.strip())


def main(argv: list[str] | None = None) -> int:
    """Run one command. Bad input, a broken artifact and the machine's refusals (a read-only or
    full disk) end with one ``sparsecc: error:`` line and exit status 2, Ctrl-C with one line and
    130; anything else is a bug and keeps its traceback (all of them with SPARSECC_DEBUG=1)."""
    args = build_parser().parse_args(argv)
    try:
        with quiet_torch_logs(), warnings.catch_warnings():
            # torch's own deprecation notices say nothing the user can act on
            warnings.simplefilter("ignore", FutureWarning)
            return args.func(args)
    except KeyboardInterrupt:
        if os.environ.get("SPARSECC_DEBUG"):
            raise
        print("sparsecc: error: interrupted; an artifact being saved was left as it was", file=sys.stderr)
        return 130
    except SparseccError as exc:
        if os.environ.get("SPARSECC_DEBUG"):
            raise
        print(f"sparsecc: error: {_one_line(exc)}", file=sys.stderr)
        return 2
    except OSError as exc:
        if os.environ.get("SPARSECC_DEBUG"):
            raise
        where = f": {exc.filename}" if exc.filename else ""
        print(f"sparsecc: error: {exc.strerror or exc}{where}; check the path and free space", file=sys.stderr)
        return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
