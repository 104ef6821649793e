"""Host runner: load a built sparsecc library on this machine and call it from Python.

A build is a shared library written by ``Executable.export_library``; it holds the Relax VM
bytecode and the compiled kernels. Inputs may be numpy arrays or torch tensors; outputs come back
as torch tensors (the VM's tuple result is flattened to a list).
"""

from __future__ import annotations

import os
import pathlib
from typing import Any

import numpy as np
import torch
from sparsecc.errors import ArtifactError


def _to_numpy(value: Any) -> np.ndarray:
    if isinstance(value, torch.Tensor):
        return value.detach().cpu().contiguous().numpy()
    return np.ascontiguousarray(value)


#: byte alignment TVM's allocator gives every tensor; compiled kernels may use aligned vector
#: loads on their parameters, so only inputs aligned like that are handed over without a copy
_TVM_ALIGNMENT = 64


def _aligned(value: torch.Tensor) -> bool:
    return value.device.type == "cpu" and value.is_contiguous() and value.data_ptr() % _TVM_ALIGNMENT == 0


def _to_torch(value: Any) -> Any:
    import tvm

    if isinstance(value, tvm.runtime.Tensor):
        # DLPack view, then a copy: the result may be a constant of the compiled module (or alias
        # an input), which a caller must not be able to modify in place.
        return torch.from_dlpack(value).clone()
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
        # input index -> (torch view, TVM tensor) of one aligned buffer (see _to_tvm)
        self._staging: dict[int, tuple[torch.Tensor, Any]] = {}

    def run_raw(self, *inputs: Any) -> Any:
        """Call the entry function with inputs already converted; returns TVM objects."""
        return self._fn(*[self._to_tvm(i, x) for i, x in enumerate(inputs)])

    def _to_tvm(self, index: int, value: Any) -> Any:
        """Input ``index`` as a TVM tensor: zero-copy (DLPack) when it is a contiguous CPU tensor
        aligned as TVM requires, else copied into a staging tensor kept for that input. A fresh
        numpy-converted TVM tensor per call cost 30-45 us per input, and slices of a batch (which
        torch does not align to 64 bytes) always took that path."""
        import tvm

        if not isinstance(value, torch.Tensor):
            array = np.ascontiguousarray(value)
            if not array.flags.writeable:
                # torch warns on read-only arrays; TVM copies them as it always did.
                return tvm.runtime.tensor(array, self.device)
            value = torch.from_numpy(array)
        value = value.detach()
        if _aligned(value):
            return tvm.runtime.from_dlpack(value)
        staged = self._staging.get(index)
        if staged is None or staged[0].shape != value.shape or staged[0].dtype != value.dtype:
            host = tvm.runtime.empty(tuple(value.shape), str(value.dtype).replace("torch.", ""), self.device)
            staged = (torch.from_dlpack(host), host)
            self._staging[index] = staged
        staged[0].copy_(value)
        return staged[1]

    def __call__(self, *inputs: Any) -> list[torch.Tensor]:
        out = _to_torch(self.run_raw(*inputs))
        return out if isinstance(out, list) else [out]


def load(path: str | os.PathLike[str]) -> HostModule:
    """Load a library built by ``sparsecc.passes.lower.build`` for the host."""
    return HostModule(path)


def prepare_kernel(func: Any, inputs: list[np.ndarray], out_shape: tuple[int, ...],
                   tvm_target: Any) -> tuple[Any, Any]:
    """Build one kernel (a scheduled PrimFunc whose last parameter is its output) for this host,
    with ``inputs`` bound once; returns (call, read): ``call()`` runs it, ``read()`` returns a copy
    of the output. The schedule explorer times ``call`` (:func:`sparsecc.targets.tuning.explore`)."""
    import tvm

    dev = tvm.cpu()
    kernel = tvm.compile(func, target=tvm_target)[str(func.attrs["global_symbol"])]
    args = [tvm.runtime.tensor(np.ascontiguousarray(a), dev) for a in inputs]
    y = tvm.runtime.tensor(np.zeros(out_shape, np.float32), dev)

    def call() -> None:
        kernel(*args, y)

    return call, y.numpy

