"""The ``arm-neon`` target: AArch64 with 128-bit NEON, kernels run under qemu-user.

Kernels are TVM-built AArch64 objects linked with a small C harness into static executables
(:mod:`sparsecc.targets.arm_toolchain`) and run from Python under ``qemu-aarch64-static``
(:mod:`sparsecc.targets.runners.arm`). One thread.

The CPU the code is tuned for (LLVM ``mcpu``, and the cache sizes the kernels' blocking reads) is
``cortex-a76`` unless ``SPARSECC_ARM_CPU`` names another: ``neoverse-n1`` is also accepted. Both
are Armv8.2-A cores with two 128-bit NEON FMA pipes.

Whole models compile to a static program (:mod:`sparsecc.targets.static_program`,
:func:`sparsecc.targets.arm_toolchain.link_model`): ``model.o`` (every kernel, a generated C
driver with the static memory plan and the weights, and the small runtime, in one object whose
only global symbols are ``sparsecc_*``) with ``model.h`` declaring its entry, for linking on a
device; and ``model.elf``, a static executable ``sparsecc run`` / ``sparsecc.load`` run under
qemu. Qemu timings say nothing about ARM speed, so the cost model is a roofline of the named
core (:mod:`sparsecc.targets.arm_cost`).
"""

from __future__ import annotations

import functools
from typing import Any

from . import arm_toolchain
from .base import Capabilities, TargetRecord
from .registry import register

# Per-core L2 and the last-level cache of typical parts: Cortex-A76 as in phones and the
# Raspberry Pi 5 (512 KiB L2, 2 MiB shared L3); Neoverse-N1 as in Graviton2 / Ampere Altra (1 MiB L2,
# 32 MiB system cache). Only the kernels' blocking heuristics read them.
_CACHES = {"cortex-a76": (512 * 1024, 2 * 1024 * 1024), "neoverse-n1": (1024 * 1024, 32 * 1024 * 1024)}


@functools.cache
def _capabilities(cpu: str) -> Capabilities:
    l2, llc = _CACHES[cpu]
    return Capabilities(vector_bits=128, threads=1, l2_bytes=l2, llc_bytes=llc, features=("neon",))


def capabilities() -> Capabilities:
    """128-bit NEON (4 f32 lanes), one thread, the caches of the chosen CPU."""
    return _capabilities(arm_toolchain.cpu())


def cost_model():
    """Roofline of the chosen core (:mod:`sparsecc.targets.arm_cost`); nothing is measured here."""
    from . import arm_cost

    return arm_cost.cost_model(arm_cost.CORES[arm_toolchain.cpu()], capabilities())


def tvm_target() -> dict[str, Any]:
    """TVM 0.27 target dict for AArch64 + NEON, tuned for the chosen CPU."""
    return arm_toolchain.tvm_target(("+neon",))


ARM_NEON = register(TargetRecord(
    name="arm-neon",
    summary="AArch64 + NEON (4 f32 lanes, 1 thread; cortex-a76, or SPARSECC_ARM_CPU=neoverse-n1); "
            "models and kernels run under qemu-user",
    patterns=("unstructured", "block16x1", "block8x1", "block4x1", "block2x1", "block4x4", "2:4"),
    default_pattern="block16x1",
    # the plan search's default set: one of each family, blocks of 16 and 4 rows
    search_patterns=("unstructured", "block16x1", "block8x1", "block4x1", "2:4"),
    capabilities=capabilities,
    tvm_target=tvm_target,
    runner="arm",
    runs_here=arm_toolchain.available(),
    cost_model=cost_model,
    link_model=arm_toolchain.link_model,
    notes=(
        "whole models build to model.o + model.h (link on a device with -lm) and a static model.elf run "
        "under qemu; one thread",
        "runs only under qemu-user, whose timings say nothing about ARM speed: the cost model is a roofline "
        "of the named core (targets/arm_cost.py states its numbers)",
        "needs aarch64-linux-gnu-gcc, the AArch64 glibc and qemu-aarch64-static to build and run",
    ),
))
