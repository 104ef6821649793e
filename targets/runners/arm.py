"""ARM runner: run a kernel executable built by :mod:`sparsecc.targets.arm_toolchain` under
qemu-user, numpy arrays in (on stdin) and outputs back (from stdout).

Each call starts one qemu process (a few tenths of a second): this runner checks what kernels
compute on AArch64 + NEON; it does not time them (qemu translates instructions, so its timings
say nothing about ARM speed).

:func:`load` loads a whole model (:class:`ArmModel`, a static executable built by
:mod:`sparsecc.targets.static_program`); kernels are loaded with :func:`load_kernel`.
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
from . import static_io


def _executable(path: str | os.PathLike[str], remedy: str) -> pathlib.Path:
    path = pathlib.Path(path)
    if not path.is_file():
        raise ArtifactError(f"ARM executable {path} does not exist; {remedy}")
    return path


def _find_qemu() -> str:
    from ..arm_toolchain import find_toolchain

    return find_toolchain().qemu


def _run(qemu: str, path: pathlib.Path, stdin: bytes, timeout_s: float, label: str) -> bytes:
    """Run ``path`` under qemu with ``stdin``; its stdout, or a :class:`TargetError` with its
    message (exit status 3: the code failed, with TVM's message on stderr)."""
    try:
        done = subprocess.run([qemu, str(path)], input=stdin, capture_output=True, timeout=timeout_s)
    except subprocess.TimeoutExpired:
        raise TargetError(f"{label} ran past {timeout_s:.0f} s under qemu") from None
    message = done.stderr.decode("utf-8", "replace").strip()
    if done.returncode != 0:
        what = "failed" if done.returncode == 3 else f"exited with status {done.returncode}"
        raise TargetError(f"{label} {what}: {message or 'no message'}")
    return done.stdout


class ArmKernel:
    """A built kernel executable: ``kernel(*arrays)`` runs it under qemu on numpy arrays.

    ``arrays`` are every argument of the PrimFunc in order, outputs included (their contents are
    passed in too: a NaN-filled output shows elements the kernel never writes); returns the last
    ``n_outputs`` arguments as they are after the call.
    """

    def __init__(self, path: str | os.PathLike[str], n_outputs: int = 1, qemu: str | None = None,
                 timeout_s: float = 120.0):
        self.path = _executable(path, "build the kernel first")
        self.qemu = qemu or _find_qemu()
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
        raw = _run(self.qemu, self.path, self._stdin(arrays), self.timeout_s, f"ARM kernel {self.path.stem}")
        outs, offset = [], 0
        for a in arrays[len(arrays) - self.n_outputs:]:
            chunk = raw[offset:offset + a.nbytes]
            if len(chunk) != a.nbytes:
                raise TargetError(f"ARM kernel {self.path.stem} wrote {len(raw)} bytes of output, fewer than expected")
            outs.append(np.frombuffer(chunk, dtype=a.dtype).reshape(a.shape).copy())
            offset += a.nbytes
        return outs


def load_kernel(path: str | os.PathLike[str], n_outputs: int = 1) -> ArmKernel:
    return ArmKernel(path, n_outputs)


class ArmModel:
    """A whole model built by :mod:`sparsecc.targets.static_program` (``model.elf`` beside its
    ``model.json``): ``model(*inputs)`` runs it once under qemu, the inputs' bytes on stdin and the
    outputs' on stdout, and returns the outputs as torch tensors."""

    def __init__(self, path: str | os.PathLike[str], qemu: str | None = None, timeout_s: float = 600.0):
        self.path = _executable(path, "compile the model first")
        self.signature = static_io.read_signature(self.path)
        self.qemu = qemu or _find_qemu()
        self.timeout_s = timeout_s
        self._out_nbytes = static_io.output_nbytes(self.signature)

    def __call__(self, *inputs: Any) -> list[Any]:
        stdin = b"".join(static_io.input_bytes(self.signature, inputs))
        raw = _run(self.qemu, self.path, stdin, self.timeout_s, f"ARM model {self.path.name}")
        if len(raw) != sum(self._out_nbytes):
            raise TargetError(f"ARM model {self.path.name} wrote {len(raw)} bytes of output; its "
                              f"signature says {sum(self._out_nbytes)}")
        chunks, offset = [], 0
        for nbytes in self._out_nbytes:
            chunks.append(raw[offset:offset + nbytes])
            offset += nbytes
        return static_io.output_tensors(self.signature, chunks)


def load(path: str | os.PathLike[str]) -> ArmModel:
    """Load a whole model's ``model.elf`` (built for the ``arm-neon`` target)."""
    return ArmModel(path)
