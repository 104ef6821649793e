"""Pass protocol, pass registry, pipeline strings and instruments.

A pass is a frozen dataclass: its fields are its typed options, ``name`` is its CLI spelling and
``summary`` a one-line description. ``run(program, ctx)`` returns a ``PassResult`` that says
honestly whether it changed anything, with counters and diagnostics. Pipelines are strings such
as ``calibrate{batches=8},plan-uniform{sparsity=0.7,pattern=block16x1},prune-wanda,pack`` so the
CLI and build scripts share one spelling. Instruments hook before and after every pass (timing,
numbered dumps, verification, numerics) and stay outside the passes themselves.
"""

from __future__ import annotations

import dataclasses
import pathlib
import time
import typing
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar

from .errors import PipelineError, VerificationError
from .registry import LazyRegistry

if TYPE_CHECKING:  # pragma: no cover
    from sparsecc.targets import TargetRecord

    from .program import Program


# ------------------------------------------------------------------------------------------------
# Results and diagnostics
# ------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Diagnostic:
    """Something a pass wants the user to see, attached to a layer when there is one."""

    severity: str  # "info" | "warning" | "error"
    message: str
    layer: str | None = None
    pass_name: str | None = None

    def __str__(self) -> str:
        where = f"{self.layer}: " if self.layer else ""
        origin = f"[{self.pass_name}] " if self.pass_name else ""
        return f"{self.severity}: {origin}{where}{self.message}"

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass
class PassResult:
    """What a pass did: the (possibly new) program, whether it changed, counters, diagnostics."""

    program: Program
    changed: bool
    counters: dict[str, int | float] = field(default_factory=dict)
    diagnostics: list[Diagnostic] = field(default_factory=list)


@dataclass
class PassContext:
    """What passes share within one pipeline run: the target, sample data and cached analyses."""

    target: TargetRecord
    calibration: list[tuple[Any, ...]] | None = None
    seed: int = 0
    progress: bool = True
    workdir: pathlib.Path | None = None
    analyses: dict[str, Any] = field(default_factory=dict)
    #: the program the pipeline started from (set by PassManager.run): the dense teacher recovery
    #: distills from
    dense: Program | None = None

    def calibration_batches(self, program: Program) -> list[tuple[Any, ...]]:
        """Calibration inputs, or the program's example inputs when none were given."""
        return list(self.calibration) if self.calibration else [tuple(program.example_inputs)]


# ------------------------------------------------------------------------------------------------
# Passes and their registry
# ------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Pass:
    """Base class. Subclasses are frozen dataclasses whose fields are the pass's options."""

    name: ClassVar[str] = ""
    summary: ClassVar[str] = ""
    #: how the numerics instrument checks this pass: "exact" (must not change results),
    #: "budget" (pruning: change reported), "none" (output does not run in torch)
    numerics: ClassVar[str] = "exact"

    def run(self, program: Program, ctx: PassContext) -> PassResult:  # pragma: no cover
        raise NotImplementedError

    def spelling(self) -> str:
        """This pass and its non-default options as a pipeline element."""
        opts = []
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if value != f.default:
                opts.append(f"{f.name}={_format_option(value)}")
        return f"{self.name}{{{','.join(opts)}}}" if opts else self.name

    def diag(self, severity: str, message: str, layer: str | None = None) -> Diagnostic:
        return Diagnostic(severity, message, layer, self.name)


# Modules that define passes, imported on first use so that `import sparsecc` stays light.
_PASSES: LazyRegistry[type[Pass]] = LazyRegistry("pass", (
    "sparsecc.passes.calibrate",
    "sparsecc.passes.plan_uniform",
    "sparsecc.passes.allocate",
    "sparsecc.passes.search",
    "sparsecc.passes.prune",
    "sparsecc.passes.recover",
    "sparsecc.passes.channels",
    "sparsecc.passes.pack",
    "sparsecc.passes.lower_pass",
), PipelineError, "sparsecc passes")


def register_pass(cls: type[Pass]) -> type[Pass]:
    """Class decorator adding a pass to the registry under ``cls.name``."""
    return _PASSES.register(cls.name, cls)


def get_pass(name: str) -> type[Pass]:
    return _PASSES.get(name)


def all_passes() -> list[type[Pass]]:
    return _PASSES.all()


# ------------------------------------------------------------------------------------------------
# Pipeline strings
# ------------------------------------------------------------------------------------------------


def _format_option(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


def _convert_option(pass_cls: type[Pass], fld: dataclasses.Field, text: str) -> Any:
    hints = typing.get_type_hints(pass_cls)
    kind = hints.get(fld.name, str)
    origin = typing.get_origin(kind)
    args = [a for a in typing.get_args(kind) if a is not type(None)]
    if origin is typing.Union or (origin is not None and type(None) in typing.get_args(kind)):
        if text.lower() in ("none", ""):
            return None
        kind = args[0] if args else str
    try:
        if kind is bool:
            if text.lower() in ("true", "1", "yes", "on"):
                return True
            if text.lower() in ("false", "0", "no", "off"):
                return False
            raise ValueError(text)
        if kind is int:
            return int(text)
        if kind is float:
            return float(text)
        return text
    except ValueError:
        raise PipelineError(
            f"option {fld.name}={text!r} of pass {pass_cls.name!r} is not a valid {getattr(kind, '__name__', kind)}"
        ) from None


def _split_top_level(text: str) -> list[str]:
    parts, depth, current = [], 0, []
    for ch in text:
        if ch == "{":
            depth += 1
        elif ch == "}":
            depth -= 1
            if depth < 0:
                raise PipelineError(f"unbalanced '}}' in pipeline {text!r}")
        if ch == "," and depth == 0:
            parts.append("".join(current))
            current = []
        else:
            current.append(ch)
    if depth:
        raise PipelineError(f"unbalanced '{{' in pipeline {text!r}")
    parts.append("".join(current))
    return [p.strip() for p in parts if p.strip()]


def parse_pipeline(text: str) -> list[Pass]:
    """Parse ``name{opt=value,...},name,...`` into pass instances."""
    passes: list[Pass] = []
    for element in _split_top_level(text):
        name, _, rest = element.partition("{")
        name = name.strip()
        cls = get_pass(name)
        options: dict[str, Any] = {}
        if rest:
            if not rest.endswith("}"):
                raise PipelineError(f"pipeline element {element!r} must end with '}}'")
            fields = {f.name: f for f in dataclasses.fields(cls)}
            for item in _split_top_level(rest[:-1]):
                key, eq, value = item.partition("=")
                key = key.strip()
                if not eq:
                    raise PipelineError(f"option {item!r} of pass {name!r} needs the form key=value")
                if key not in fields:
                    raise PipelineError(
                        f"pass {name!r} has no option {key!r}; its options: {', '.join(fields) or 'none'}")
                options[key] = _convert_option(cls, fields[key], value.strip())
        passes.append(cls(**options))
    return passes


def format_pipeline(passes: Iterable[Pass]) -> str:
    return ",".join(p.spelling() for p in passes)


# ------------------------------------------------------------------------------------------------
# Instruments
# ------------------------------------------------------------------------------------------------


class Instrument:
    """Hooks run around every pass; override what you need."""

    def before_pass(self, pass_: Pass, program: Program, ctx: PassContext, index: int) -> None:
        pass

    def after_pass(self, pass_: Pass, result: PassResult, ctx: PassContext, index: int) -> None:
        pass


class TimingInstrument(Instrument):
    """Wall time per pass, in seconds, in pipeline order."""

    def __init__(self) -> None:
        self.times: list[tuple[str, float]] = []
        self._start = 0.0

    def before_pass(self, pass_, program, ctx, index):
        self._start = time.perf_counter()

    def after_pass(self, pass_, result, ctx, index):
        self.times.append((pass_.name, time.perf_counter() - self._start))


class SnapshotInstrument(Instrument):
    """Keeps the printed program before the first pass and after every pass (and writes numbered
    dumps ``NN-before-<pass>.txt`` / ``NN-after-<pass>.txt`` when given a folder)."""

    def __init__(self, folder: pathlib.Path | None = None) -> None:
        self.folder = folder
        self.snapshots: list[tuple[str, str]] = []  # (label, text)

    def _write(self, label: str, text: str) -> None:
        if self.folder is not None:
            from .outputs import write_file

            self.folder.mkdir(parents=True, exist_ok=True)
            # replaced, not written in place: a hard link under a dump's name keeps its other file
            write_file(self.folder / f"{label}.txt", text)

    def before_pass(self, pass_, program, ctx, index):
        from .inspect import format_program

        if index == 0:
            self.snapshots.append(("00-input", format_program(program)))
        if self.folder is not None:
            self._write(f"{index + 1:02d}-before-{pass_.name}", format_program(program))

    def after_pass(self, pass_, result, ctx, index):
        from .inspect import format_program

        text = format_program(result.program)
        label = f"{index + 1:02d}-{pass_.name}"
        self.snapshots.append((label, text))
        if self.folder is not None:
            self._write(f"{index + 1:02d}-after-{pass_.name}", text)


class VerifyInstrument(Instrument):
    """Runs the program verifier after every pass that changed the program."""

    def after_pass(self, pass_, result, ctx, index):
        if result.changed:
            problems = result.program.verify()
            if problems:
                raise VerificationError(
                    f"pass {pass_.name!r} left a broken program:\n  " + "\n  ".join(problems))


@dataclass
class NumericsRecord:
    pass_name: str
    tier: str
    max_abs: float
    rel: float  # ||y - y_prev|| / ||y_prev||


class NumericsInstrument(Instrument):
    """Runs the program on check inputs before and after each pass and records how far the output
    moved. Passes that must not change results fail when it moves more than ``exact_tol``.

    ``exact_tol`` is a relative L2 distance. A pass that changes no math still reorders fp32 sums
    (a packed kernel adds a row's nonzeros in another order than the dense matmul did): that moved
    SmolLM2-135M's logits (30 layers) by 2.6e-6, and the digits CNN's by about 1e-7, while a real
    bug (a dropped weight, a transposed block) moves them by 1e-3 or more.
    """

    def __init__(self, inputs: Sequence[Any] | None = None, exact_tol: float = 1e-5) -> None:
        self.inputs = inputs
        self.exact_tol = exact_tol
        self.records: list[NumericsRecord] = []
        self._before = None

    def _inputs(self, program: Program) -> Sequence[Any]:
        return self.inputs if self.inputs is not None else program.example_inputs

    def before_pass(self, pass_, program, ctx, index):
        self._before = None
        if pass_.numerics != "none" and program.runs_in_torch:
            self._before = program.run_flat(*self._inputs(program))

    def after_pass(self, pass_, result, ctx, index):
        if self._before is None or not result.program.runs_in_torch:
            return
        after = result.program.run_flat(*self._inputs(result.program))
        max_abs, rel = compare_outputs(self._before, after)
        self.records.append(NumericsRecord(pass_.name, pass_.numerics, max_abs, rel))
        if pass_.numerics == "exact" and rel > self.exact_tol:
            raise VerificationError(
                f"pass {pass_.name!r} must not change results but moved the output by {rel:.3g} "
                f"(relative, max abs {max_abs:.3g}); this is a bug in the pass")


def compare_outputs(before: list[Any], after: list[Any]) -> tuple[float, float]:
    """(max abs difference, relative L2 difference) between two flat lists of output tensors."""

    max_abs, num, den = 0.0, 0.0, 0.0
    for a, b in zip(before, after, strict=True):
        a = a.detach().double()
        b = b.detach().double()
        max_abs = max(max_abs, float((a - b).abs().max()) if a.numel() else 0.0)
        num += float(((a - b) ** 2).sum())
        den += float((a**2).sum())
    return max_abs, (num**0.5) / max(den**0.5, 1e-30)


# ------------------------------------------------------------------------------------------------
# The manager
# ------------------------------------------------------------------------------------------------


@dataclass
class PipelineResult:
    program: Program
    results: list[tuple[str, PassResult]]

    @property
    def diagnostics(self) -> list[Diagnostic]:
        return [d for _, r in self.results for d in r.diagnostics]


class PassManager:
    """Runs passes in order with instruments around each."""

    def __init__(self, passes: Sequence[Pass] | str, instruments: Sequence[Instrument] = ()) -> None:
        self.passes = parse_pipeline(passes) if isinstance(passes, str) else list(passes)
        self.instruments = list(instruments)

    @property
    def pipeline(self) -> str:
        return format_pipeline(self.passes)

    def run(self, program: Program, ctx: PassContext) -> PipelineResult:
        results: list[tuple[str, PassResult]] = []
        if ctx.dense is None:
            ctx.dense = program
        for index, pass_ in enumerate(self.passes):
            for inst in self.instruments:
                inst.before_pass(pass_, program, ctx, index)
            result = pass_.run(program, ctx)
            for inst in self.instruments:
                inst.after_pass(pass_, result, ctx, index)
            results.append((pass_.name, result))
            program = result.program
        return PipelineResult(program, results)
