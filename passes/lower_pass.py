"""lower / build: hand the packed program to TVM and compile it for the target.

``lower`` imports the exported program into Relax with sparse ops as ``call_tir`` of sparsecc's
scheduled TIR kernels and dense layers on scheduled dense kernels (see ``passes/lower.py``).
``build`` compiles that module into a library for the target. Neither changes what the torch
program computes; the build's numerics are checked against the packed program by the compile
driver and the tests (kernel tier).
"""

from __future__ import annotations

import pathlib
import tempfile
from dataclasses import dataclass

from sparsecc.pass_manager import Pass, PassContext, PassResult, register_pass
from sparsecc.program import Program


@register_pass
@dataclass(frozen=True)
class Lower(Pass):
    """Import into Relax; sparse ops become call_tir of the target's kernels."""

    name = "lower"
    summary = "import the packed program into TVM Relax with scheduled sparse and dense kernels"
    numerics = "none"

    def run(self, program: Program, ctx: PassContext) -> PassResult:
        from .lower import lower_to_relax

        result = lower_to_relax(program.exported, ctx.target)
        new = program.with_exported(program.exported, stage="lowered")
        new.lowered = result
        diagnostics = [self.diag(d.severity, d.message, d.layer) for d in result.diagnostics]
        return PassResult(new, changed=True, counters=result.counters(), diagnostics=diagnostics)


@register_pass
@dataclass(frozen=True)
class Build(Pass):
    """Compile the lowered module into a loadable library for the target."""

    name = "build"
    summary = "compile the lowered Relax module into a library for the target"
    numerics = "none"

    def run(self, program: Program, ctx: PassContext) -> PassResult:
        from .lower import build

        if program.lowered is None:
            raise ValueError("build needs a lowered program: run the lower pass first")
        workdir = ctx.workdir or pathlib.Path(tempfile.mkdtemp(prefix="sparsecc-build-"))
        workdir.mkdir(parents=True, exist_ok=True)
        path = build(program.lowered.module, ctx.target, workdir / "model.so")
        new = program.with_exported(program.exported, stage="built")
        new.lowered = program.lowered
        new.compiled = path
        return PassResult(new, changed=True, counters={"library_bytes": path.stat().st_size})
