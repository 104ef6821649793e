"""Runners: how built code executes. A target record names its runner; ``load_library`` finds it.

Each runner module exposes ``load(path) -> callable`` whose call takes the model's inputs and
returns a flat list of torch tensors. A runner whose timings mean something on this machine also
exposes ``prepare_kernel(func, inputs, out_shape, tvm_target) -> (call, read)``, which the
schedule explorer times; the ARM runner has none (qemu timings say nothing about ARM speed).
"""

from __future__ import annotations

import importlib
import pathlib
from collections.abc import Callable
from typing import Any

from sparsecc.errors import TargetError

# runner name -> module providing load(path)
RUNNERS = {
    "host": "sparsecc.targets.runners.host",
    "wasm": "sparsecc.targets.runners.wasm",
    "arm": "sparsecc.targets.runners.arm",
    "cuda": "sparsecc.targets.runners.cuda",
}


def _runner_module(runner: str) -> Any:
    try:
        return importlib.import_module(RUNNERS[runner])
    except KeyError:
        raise TargetError(f"unknown runner {runner!r}; known runners: {', '.join(sorted(RUNNERS))}") from None


def load_library(runner: str, path: str | pathlib.Path) -> Callable[..., list[Any]]:
    return _runner_module(runner).load(pathlib.Path(path))


def kernel_preparer(runner: str) -> Callable[..., tuple[Callable[[], None], Callable[[], Any]]]:
    """The runner's ``prepare_kernel`` (see the module docstring), or a TargetError saying that
    kernels cannot be timed through it."""
    prepare = getattr(_runner_module(runner), "prepare_kernel", None)
    if prepare is None:
        raise TargetError(f"runner {runner!r} cannot time kernels on this machine")
    return prepare

