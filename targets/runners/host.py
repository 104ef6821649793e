"""Host runner: load a built sparsecc library on this machine and call it from Python.

A build is a shared library written by ``Executable.export_library``; it holds the Relax VM
bytecode and the compiled kernels. Inputs may be numpy arrays or torch tensors; outputs come back
as torch tensors (the VM's tuple result is flattened to a list).
"""

from __future__ import annotations

import os
import pathlib
import statistics
import time
from collections.abc import Callable, Sequence
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


def time_function(fn: Callable[[], Any], *, repeat: int = 50, warmup: int = 5,
                  min_seconds: float = 0.0) -> dict[str, float]:
    """Time ``fn()``: median, minimum and spread of ``repeat`` calls (seconds) after ``warmup``.

    With ``min_seconds`` the loop keeps sampling until that much time has been spent, which keeps
    short functions from being judged on a handful of noisy samples.
    """
    for _ in range(warmup):
        fn()
    samples: list[float] = []
    start = time.perf_counter()
    while len(samples) < repeat or time.perf_counter() - start < min_seconds:
        t0 = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - t0)
    samples.sort()
    return {
        "median": statistics.median(samples),
        "min": samples[0],
        "p90": samples[int(0.9 * (len(samples) - 1))],
        "samples": float(len(samples)),
    }


def time_interleaved(fns: dict[str, Callable[[], Any]], *, rounds: int = 20, per_round: int = 10,
                     warmup: int = 3) -> dict[str, float]:
    """Median seconds per call of several functions timed in round-robin blocks, so that load
    from other processes hits them alike (the machine is shared and noisy)."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    samples: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            for _ in range(per_round):
                fn()
            samples[name].append((time.perf_counter() - t0) / per_round)
    return {name: statistics.median(values) for name, values in samples.items()}


def inputs_from(values: Sequence[Any]) -> list[np.ndarray]:
    """Convert inputs (torch tensors or arrays) to contiguous numpy arrays."""
    return [_to_numpy(v) for v in values]
