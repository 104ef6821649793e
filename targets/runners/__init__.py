"""Runners: how built code executes. A target record names its runner; ``load_library`` finds it.

Each runner module exposes ``load(path) -> callable`` whose call takes the model's inputs and
returns a flat list of torch tensors.
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
}


def load_library(runner: str, path: str | pathlib.Path) -> Callable[..., list[Any]]:
    try:
        module = importlib.import_module(RUNNERS[runner])
    except KeyError:
        raise TargetError(f"unknown runner {runner!r}; known runners: {', '.join(sorted(RUNNERS))}") from None
    return module.load(pathlib.Path(path))
