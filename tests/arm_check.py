"""Helpers for tests that build kernels for the ``arm-neon`` target and run them under qemu-user:
the toolchain gate (skip on a user's machine, fail in CI), build-and-run, and the NEON check."""

from __future__ import annotations

import pathlib
import re

import numpy as np
from sparsecc.targets import arm_toolchain as at
from sparsecc.targets import get_target
from target_cases import require

TARGET = get_target("arm-neon")
CAPS = TARGET.capabilities()


def require_toolchain() -> None:
    require(at.missing(), "the arm-neon toolchain")


def build_and_run(func, inputs: list[np.ndarray], m: int, n_out: int, folder: pathlib.Path,
                  target: dict | None = None) -> tuple[np.ndarray, pathlib.Path]:
    """Build ``func`` into an AArch64 executable under ``folder``, run it under qemu on ``inputs``
    with a NaN-filled (m, n_out) output (an element the kernel never writes shows up), and return
    the output and the executable's path."""
    from sparsecc.targets.runners.arm import load_kernel

    name = str(func.attrs["global_symbol"])
    path = at.build_kernel(func, folder / name, target=target)
    (y,) = load_kernel(path)(*inputs, np.full((m, n_out), np.nan, np.float32))
    return y, path


def neon_ops(path: pathlib.Path) -> dict[str, int]:
    """Counts of the 4 x f32 vector arithmetic instructions (``fmla`` / ``fmul`` / ``fadd`` on
    ``v<n>.4s``) in the assembly TVM generated for the kernel built at ``path`` (the kernel's
    own functions only: the harness and libc are not in it)."""
    counts: dict[str, int] = {}
    for op in re.findall(r"^\s*(fmla|fmul|fadd)\s+v\d+\.4s", at.assembly(path), re.MULTILINE):
        counts[op] = counts.get(op, 0) + 1
    return counts
