"""lower / build: hand the packed program to TVM and compile it for the target.

``lower`` imports the exported program into Relax with sparse ops as ``call_tir`` of sparsecc's
scheduled TIR kernels and dense layers on scheduled dense kernels (see ``passes/lower.py``).
``build`` compiles that module into a library for the target (a Relax VM library, or for
``wasm-simd`` / ``arm-neon`` a static program: see ``sparsecc.targets.static_program``); every
TIR function that is not one of sparsecc's kernels gets a generic schedule there, and the report
lists which. Neither changes what the torch program computes; the built library is checked
against the masked-dense program by the compile driver and the tests (kernel tier).
"""

from __future__ import annotations

import atexit
import shutil
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from sparsecc.errors import SparseccError
from sparsecc.pass_manager import Pass, PassContext, PassResult, register_pass
from sparsecc.program import Program
from sparsecc.workdirs import make_workdir


@dataclass
class Lowered:
    """What the lower and build passes produce for a program."""

    module: Any  # tvm.IRModule
    records: list[Any] = field(default_factory=list)  # passes.lower.KernelRecord
    layer_of_node: dict[str, str] = field(default_factory=dict)

    def kernels_by_layer(self) -> dict[str, str]:
        found = {}
        for record in self.records:
            layer = self.layer_of_node.get(record.node)
            if layer is not None:
                found[layer] = f"{record.kernel} [{record.schedule}]"
        return found

    def kernel_bytes_by_layer(self) -> dict[str, int]:
        """Bytes of the weight arrays each layer's kernel reads, as the built library stores them
        (index widths, padding and bf16 included), for the layers with a sparsecc kernel."""
        return {self.layer_of_node[r.node]: r.const_bytes for r in self.records
                if r.const_bytes is not None and r.node in self.layer_of_node}


@register_pass
@dataclass(frozen=True)
class Lower(Pass):
    """Import into Relax; sparse ops become call_tir of the target's kernels.

    ``dense_weights="bfloat16"`` stores the weights of the linears kept dense as bf16 (half the
    bytes a GEMV streams; every product still accumulates in fp32). ``sparse_weights="bfloat16"``
    does the same for the values of the sparse kernels (CSR, BSR, N:M; their indices stay as they
    are). The outputs then differ from the fp32 program by bf16 rounding (relative error up to
    about 0.4 % per weight). A layer whose bf16 kernel the target's cost table measured slower
    than its fp32 one keeps fp32 values, with a warning naming the layer.
    """

    name = "lower"
    summary = "import the packed program into TVM Relax with scheduled sparse and dense kernels"
    numerics = "none"
    dense_weights: str = "float32"
    sparse_weights: str = "float32"

    def run(self, program: Program, ctx: PassContext) -> PassResult:
        from .lower import KEPT_FP32_NOTE, lower_to_relax

        for option in ("dense_weights", "sparse_weights"):
            value = getattr(self, option)
            if value not in ("float32", "bfloat16"):
                raise SparseccError(f"lower{{{option}={value}}}: choose float32 or bfloat16")
        result = lower_to_relax(program.exported, ctx.target, dense_weights=self.dense_weights,
                                sparse_weights=self.sparse_weights)
        new = program.with_exported(program.exported, stage="lowered")
        layer_of_node = program.layer_nodes()
        new.lowered = Lowered(result.mod, list(result.records), layer_of_node)
        formats = Counter(r.format for r in result.records)
        generic = Counter(r.op for r in result.records if r.format == "generic")
        diagnostics = []
        for record in result.records:
            if record.note.startswith(KEPT_FP32_NOTE):
                layer = layer_of_node.get(record.node, record.node)
                diagnostics.append(self.diag("warning", record.note, layer=layer))
        if generic:
            ops = ", ".join(f"{op} x{count}" for op, count in sorted(generic.items()))
            how = sorted({r.schedule for r in result.records if r.format == "generic" and r.op in generic})
            diagnostics.append(self.diag(
                "info", f"ops without a sparsecc kernel, legalized by TVM ({'; '.join(how)}): {ops}"))
        return PassResult(new, changed=True, counters={f"kernels_{k}": v for k, v in sorted(formats.items())},
                          diagnostics=diagnostics)


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
            raise SparseccError("build needs a lowered program: run the lower pass first")
        workdir = ctx.workdir
        if workdir is None:
            # a pipeline run outside compile: the library is needed until the process ends
            workdir = make_workdir("build")
            atexit.register(shutil.rmtree, str(workdir), True)
        workdir.mkdir(parents=True, exist_ok=True)
        generic: list[Any] = []
        # A Relax VM library is one file; a static program is a folder of model files.
        out = workdir / ("model.so" if ctx.target.link_model is None else "model")
        path = build(program.lowered.module, ctx.target, out, records=generic)
        new = program.with_exported(program.exported, stage="built")
        new.lowered = Lowered(program.lowered.module, program.lowered.records + generic,
                              program.lowered.layer_of_node)
        new.compiled = path
        diagnostics = []
        if generic:
            listed = "; ".join(f"{r.kernel} ({r.schedule})" for r in generic)
            diagnostics.append(self.diag("info", f"{len(generic)} TIR functions got the generic schedule: {listed}"))
        counters = {"library_bytes": path.stat().st_size, "generic_schedules": len(generic)}
        if ctx.target.link_model is not None:
            from sparsecc.targets.static_program import read_signature

            sig = read_signature(path.parent)
            counters.update(static_kernel_calls=sig["kernels"], static_block_bytes=sig["blocks_bytes"],
                            static_constant_bytes=sig["constants_bytes"])
            diagnostics.append(self.diag(
                "info", f"static program: {sig['kernels']} kernel calls, {sig['blocks_bytes'] / 1024:.0f} KiB of "
                        f"planned activation storage, {sig['constants_bytes'] / 1024:.0f} KiB of weights; "
                        f"{', '.join(sorted(p.name for p in path.parent.iterdir()))}"))
        return PassResult(new, changed=True, counters=counters, diagnostics=diagnostics)
