"""The target record: what a device can run and how sparsecc builds and runs code for it.

A target is data, not a code path: capabilities, the sparsity patterns its kernels support, the
TVM target description, the kernel library and the runner. Adding a device means adding one
module that registers one record (see ``registry.py``); nothing else branches on target names.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class Capabilities:
    """Hardware facts kernels and cost models read."""

    vector_bits: int  # widest SIMD register the kernels use (256 for AVX2, 512 for AVX-512)
    threads: int  # worker threads the runtime may use
    l2_bytes: int = 2 * 1024 * 1024
    llc_bytes: int = 32 * 1024 * 1024
    features: tuple[str, ...] = ()

    @property
    def vector_lanes_f32(self) -> int:
        return self.vector_bits // 32


@dataclass(frozen=True)
class TargetRecord:
    """One device sparsecc compiles for."""

    name: str
    summary: str
    patterns: tuple[str, ...]  # pattern names its sparse kernels run ("unstructured", "block16x1", "2:4")
    default_pattern: str
    capabilities: Callable[[], Capabilities]  # probed lazily: probing may import TVM
    tvm_target: Callable[[], dict[str, Any]]
    runner: str  # name of the runner in sparsecc.targets.runners
    runs_here: bool = True  # whether built code can execute on this machine
    notes: tuple[str, ...] = field(default_factory=tuple)
    # Kernel time predictions and measured schedule choices (``sparsecc.targets.tuning.CostModel``);
    # None for a target without one. Built lazily: it may read a cost table from disk.
    cost_model: Callable[[], Any] | None = None
    # Whether whole models lower and build for this target (``sparsecc compile``); a target whose
    # kernels build and run one at a time, but whose model build is not written yet, says False.
    builds_models: bool = True
    # How a whole model is linked when the Relax VM cannot run on the target: a function
    # ``link_model(program, kernels_object, constants_file, folder) -> runnable file`` (see
    # ``sparsecc.targets.static_program``); None builds a Relax VM library (``model.so``).
    link_model: Callable[..., Any] | None = None
    # Module (dotted name) that lowers and builds whole models for a target whose kernel library is
    # not the CPU one (``lower_to_relax(ep, target)`` and ``build(mod, target, out_path, records)``);
    # None: sparsecc.passes.lower's CPU kernels.
    model_lowering: str | None = None
    # What a machine needs to run this target's artifacts, said when this one cannot.
    needs: str = ""
    # Patterns the plan search tries by default (a user may name others); empty: every pattern.
    search_patterns: tuple[str, ...] = ()

    def supports(self, pattern_name: str) -> bool:
        return pattern_name in self.patterns

    def require_model_build(self) -> None:
        """Raise a clear :class:`~sparsecc.errors.TargetError` when whole models cannot be built
        for this target (instead of building host code under its name)."""
        if not self.builds_models:
            from sparsecc.errors import TargetError

            raise TargetError(f"target {self.name!r}: whole-model lowering for this target is not built yet "
                              "(its kernels build and run one at a time); compile for x86 instead")
