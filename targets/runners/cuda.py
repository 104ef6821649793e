"""CUDA runner: a GPU target's ``model.so`` run by the Relax VM on the first CUDA GPU.

Inputs are copied to the GPU, outputs come back as CPU torch tensors. On a machine without a CUDA
GPU, loading refuses with the reason instead of failing inside the CUDA driver.
"""

from __future__ import annotations

import pathlib
from collections.abc import Callable
from typing import Any

import torch
from sparsecc.errors import ArtifactError, TargetError


def _flatten(value: Any) -> list[torch.Tensor]:
    import tvm

    if isinstance(value, tvm.runtime.Tensor):
        return [torch.from_dlpack(value).cpu().clone()]
    return [t for v in value for t in _flatten(v)]


def load(path: pathlib.Path) -> Callable[..., list[torch.Tensor]]:
    """``call(*inputs) -> [outputs]`` running ``path``'s ``main`` on CUDA device 0."""
    from sparsecc.targets.cuda import gpu_present, prepare_cuda_jit

    if not gpu_present():
        raise TargetError(f"{path} is built for an NVIDIA GPU and this machine has none that torch can see "
                          "(compute capability 8.0 or newer is needed); run it on a machine with one")
    if not path.is_file():
        raise ArtifactError(f"compiled library {path} does not exist; build the model first")
    prepare_cuda_jit()
    import tvm
    from tvm import relax

    device = tvm.cuda(0)
    vm = relax.VirtualMachine(tvm.runtime.load_module(str(path)), device)
    main = vm["main"]

    def call(*inputs: torch.Tensor) -> list[torch.Tensor]:
        on_gpu = [tvm.runtime.from_dlpack(torch.as_tensor(x).contiguous().cuda()) for x in inputs]
        out = main(*on_gpu)
        device.sync()
        return _flatten(out)

    return call
