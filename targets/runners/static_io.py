"""Inputs and outputs of a whole model built as a static program (``wasm-simd``, ``arm-neon``):
the checks and byte conversions the wasm and ARM runners share, driven by the model's signature
(``model.json``, see :mod:`sparsecc.targets.static_program`)."""

from __future__ import annotations

import pathlib
from typing import Any

import numpy as np
import torch
from sparsecc.errors import ArtifactError, TargetError


def read_signature(path: pathlib.Path) -> dict[str, Any]:
    """The signature beside the built model file ``path`` (checked)."""
    from ..static_program import read_signature as read

    return read(path.parent)


def _torch_dtype(dtype: str) -> torch.dtype:
    found = getattr(torch, dtype, None)
    if not isinstance(found, torch.dtype):
        raise ArtifactError(f"the model's signature names dtype {dtype!r}, which torch does not have")
    return found


def input_bytes(signature: dict[str, Any], inputs: tuple[Any, ...]) -> list[bytes]:
    """Each input's raw bytes, after checking count, shape and dtype against ``signature``."""
    wanted = signature["inputs"]
    if len(inputs) != len(wanted):
        raise TargetError(f"the compiled model takes {len(wanted)} inputs, got {len(inputs)}")
    out = []
    for i, (value, want) in enumerate(zip(inputs, wanted, strict=True)):
        tensor = torch.as_tensor(value).detach().cpu()
        dtype = _torch_dtype(want["dtype"])
        if list(tensor.shape) != list(want["shape"]) or tensor.dtype != dtype:
            raise TargetError(f"input {i} has shape {tuple(tensor.shape)} {tensor.dtype}; the model was compiled "
                              f"for {tuple(want['shape'])} {dtype} (compile again with example inputs of this shape)")
        # a byte view: numpy has no bfloat16
        out.append(tensor.contiguous().view(torch.uint8).numpy().tobytes())
    return out


def output_nbytes(signature: dict[str, Any]) -> list[int]:
    return [int(np.prod(o["shape"], dtype=np.int64)) * _torch_dtype(o["dtype"]).itemsize
            for o in signature["outputs"]]


def output_tensors(signature: dict[str, Any], chunks: list[bytes]) -> list[torch.Tensor]:
    """The outputs as torch tensors from their raw bytes (one chunk per output)."""
    out = []
    for raw, want in zip(chunks, signature["outputs"], strict=True):
        tensor = torch.frombuffer(bytearray(raw), dtype=_torch_dtype(want["dtype"]))
        out.append(tensor.reshape(want["shape"]))
    return out
