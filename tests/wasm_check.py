"""Helpers for tests that build kernels for the ``wasm-simd`` target and run them under wasmtime:
the toolchain gate (skip on a user's machine, fail in CI), build-and-run, and the SIMD check."""

from __future__ import annotations

import pathlib
import re
import shutil

import numpy as np
from sparsecc.targets import get_target
from sparsecc.targets import wasm_toolchain as wt
from target_cases import require

TARGET = get_target("wasm-simd")
CAPS = TARGET.capabilities()


def require_toolchain() -> None:
    require(wt.missing(), "the wasm toolchain")


def require_wasm2wat() -> None:
    require([] if shutil.which("wasm2wat") else ["wasm2wat (Debian: wabt)"], "wabt")


def build_and_run(func, inputs: list[np.ndarray], m: int, n_out: int, folder: pathlib.Path,
                  target: dict | None = None) -> tuple[np.ndarray, pathlib.Path]:
    """Build ``func`` into a .wasm under ``folder``, run it in wasmtime on ``inputs`` with a
    NaN-filled (m, n_out) output (an element the kernel never writes shows up), and return the
    output and the module's path."""
    from sparsecc.targets.runners.wasm import load_kernel

    name = str(func.attrs["global_symbol"])
    path = wt.build_kernel(func, folder / f"{name}.wasm", target=target)
    kernel = load_kernel(path, wt.kernel_export(func))
    (y,) = kernel(*inputs, np.full((m, n_out), np.nan, np.float32))
    return y, path


def simd_ops(path: pathlib.Path, kernel_name: str) -> dict[str, int]:
    """Counts of f32x4 instructions in the functions TVM generated for ``kernel_name``.

    The check reads the module's text form from ``wasm2wat`` (Debian ``wabt``) rather than
    scanning the binary for the SIMD prefix byte 0xfd: in the binary 0xfd also occurs inside
    LEB128 immediates, constants and data, and SIMD opcodes after the prefix are themselves
    LEB128-encoded, so a byte scan can both miss and invent instructions. The text form names
    every instruction exactly, and the module's name section (kept: only debug sections are
    stripped) lets the count be limited to the kernel's own functions (``<name>_compute_``,
    parallel lambdas), not the shim or libc.
    """
    text = wt.wat(path)
    counts: dict[str, int] = {}
    current = None
    for line in text.splitlines():
        head = re.match(r"\s*\(func \$([^\s()]+)", line)
        if head:
            current = head.group(1)
            continue
        if current is None or not (current.startswith(kernel_name) or "tvm_parallel_lambda" in current):
            continue
        op = re.match(r"\s*(f32x4\.[a-z_0-9]+)", line)
        if op:
            counts[op.group(1)] = counts.get(op.group(1), 0) + 1
    return counts
