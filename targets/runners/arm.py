"""ARM runner: run a kernel executable built by :mod:`sparsecc.targets.arm_toolchain` under
qemu-user, numpy arrays in (on stdin) and outputs back (from stdout).

Each call starts one qemu process (a few tenths of a second): this runner checks what kernels
compute on AArch64 + NEON; it does not time them (qemu translates instructions, so its timings
say nothing about ARM speed).

Whole-model artifacts are not built for ARM yet, so :func:`load` refuses them with a clear error;
kernels are loaded with :func:`load_kernel`.
"""

from __future__ import annotations

import os
import pathlib
import struct
import subprocess
from typing import Any

import numpy as np
from sparsecc.errors import ArtifactError, TargetError

from ..kernel_runtime import dlpack_code


class ArmKernel:
    """A built kernel executable: ``kernel(*arrays)`` runs it under qemu on numpy arrays.

    ``arrays`` are every argument of the PrimFunc in order, outputs included (their contents are
    passed in too: a NaN-filled output shows elements the kernel never writes); returns the last
    ``n_outputs`` arguments as they are after the call.
    """

    def __init__(self, path: str | os.PathLike[str], n_outputs: int = 1, qemu: str | None = None,
                 timeout_s: float = 120.0):
        path = pathlib.Path(path)
        if not path.is_file():
            raise ArtifactError(f"ARM executable {path} does not exist; build the kernel first")
        if qemu is None:
            from ..arm_toolchain import find_toolchain

            qemu = find_toolchain().qemu
        self.path = path
        self.qemu = qemu
        self.n_outputs = n_outputs
        self.timeout_s = timeout_s

    def _stdin(self, arrays: list[np.ndarray]) -> bytes:
        parts = [struct.pack("<ii", len(arrays), self.n_outputs)]
        for i, a in enumerate(arrays):
            code, bits = dlpack_code(i, a)
            parts.append(struct.pack("<iiii", code, bits, a.ndim, 0))
            parts.append(np.asarray(a.shape, "<i8").tobytes())
            parts.append(struct.pack("<q", a.nbytes))
            parts.append(a.tobytes())
        return b"".join(parts)

    def __call__(self, *arrays: np.ndarray) -> list[np.ndarray]:
        if not 0 < self.n_outputs <= len(arrays):
            raise TargetError(f"{self.path.name}: {len(arrays)} arguments for {self.n_outputs} outputs")
        arrays = [np.ascontiguousarray(a) for a in arrays]
        try:
            done = subprocess.run([self.qemu, str(self.path)], input=self._stdin(arrays), capture_output=True,
                                  timeout=self.timeout_s)
        except subprocess.TimeoutExpired:
            raise TargetError(f"ARM kernel {self.path.name} ran past {self.timeout_s:.0f} s under qemu") from None
        message = done.stderr.decode("utf-8", "replace").strip()
        if done.returncode != 0:
            what = "failed" if done.returncode == 3 else f"exited with status {done.returncode}"
            raise TargetError(f"ARM kernel {self.path.stem} {what}: {message or 'no message'}")
        outs, offset = [], 0
        raw = done.stdout
        for a in arrays[len(arrays) - self.n_outputs:]:
            chunk = raw[offset:offset + a.nbytes]
            if len(chunk) != a.nbytes:
                raise TargetError(f"ARM kernel {self.path.stem} wrote {len(raw)} bytes of output, fewer than expected")
            outs.append(np.frombuffer(chunk, dtype=a.dtype).reshape(a.shape).copy())
            offset += a.nbytes
        return outs


def load_kernel(path: str | os.PathLike[str], n_outputs: int = 1) -> ArmKernel:
    return ArmKernel(path, n_outputs)


def load(path: str | os.PathLike[str]) -> Any:
    """Whole-model libraries are not built for ARM yet: refuse with the reason."""
    raise ArtifactError(f"{path}: whole-model ARM builds do not exist yet (the arm-neon target builds and runs "
                        "single kernels only, under qemu); compile the model for x86 instead")
