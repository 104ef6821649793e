"""Host runner: load a built sparsecc library on this machine and call it from Python.

A build is a shared library written by ``Executable.export_library``; it holds the Relax VM
bytecode and the compiled kernels. Inputs may be numpy arrays or torch tensors; outputs come back
as torch tensors (the VM's tuple result is flattened to a list).
"""

from __future__ import annotations

import os
import pathlib
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from sparsecc.errors import ArtifactError


def _to_numpy(value: Any) -> np.ndarray:
    if isinstance(value, torch.Tensor):
        return value.detach().cpu().contiguous().numpy()
    return np.ascontiguousarray(value)


def _to_torch(value: Any) -> Any:
    import tvm

    if isinstance(value, tvm.runtime.Tensor):
        return torch.from_numpy(value.numpy())
    if isinstance(value, list | tuple) or type(value).__name__ == "Array":
        return [_to_torch(v) for v in value]
    return value


class HostModule:
    """A loaded library: ``module(*inputs)`` runs its ``main`` on the host CPU."""

    def __init__(self, path: str | os.PathLike[str], entry: str = "main"):
        import tvm
        from tvm import relax

        path = pathlib.Path(path)
        if not path.is_file():
            raise ArtifactError(f"compiled library {path} does not exist; build the model first")
        self.path = path
        self.device = tvm.cpu()
        self._lib = tvm.runtime.load_module(str(path))
        self._vm = relax.VirtualMachine(self._lib, self.device)
        self._entry = entry
        self._fn = self._vm[entry]

    def run_raw(self, *inputs: Any) -> Any:
        """Call the entry function with inputs already converted; returns TVM objects."""
        import tvm

        args = [tvm.runtime.tensor(_to_numpy(x), self.device) for x in inputs]
        return self._fn(*args)

    def __call__(self, *inputs: Any) -> list[torch.Tensor]:
        out = _to_torch(self.run_raw(*inputs))
        return out if isinstance(out, list) else [out]


def load(path: str | os.PathLike[str]) -> HostModule:
    """Load a library built by ``sparsecc.passes.lower.build`` for the host."""
    return HostModule(path)


def inputs_from(values: Sequence[Any]) -> list[np.ndarray]:
    """Convert inputs (torch tensors or arrays) to contiguous numpy arrays."""
    return [_to_numpy(v) for v in values]
