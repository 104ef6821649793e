"""sparsecc's own TIR kernels (TVM ships no sparse operators): one module per packed format plus a
dense GEMM/GEMV. Every builder returns an already scheduled ``tvm.tirx.PrimFunc`` for one
concrete problem (shapes and the sparsity structure's sizes baked in) and a matching ``*_args``
function giving the constant arrays the kernel takes after x, in the layout it wants.

TVM is imported inside the builders, so importing this package stays cheap.
"""

from __future__ import annotations

import numpy as np
from sparsecc.sparsity import Packed, PackedBSR, PackedCSR, PackedNM
from sparsecc.targets.base import Capabilities

from ._common import BF16_MARKER, FP16_MARKER, HALF_MARKERS, SCHEDULE_ATTR, WEIGHT_DTYPES
from .bsr import bsr_args, bsr_linear
from .csr import csr_args, csr_linear
from .dense import dense_args, dense_linear
from .nm import nm_args, nm_linear


def sparse_kernel(m: int, packed: Packed, has_bias: bool, caps: Capabilities,
                  name: str, schedule: object | None = None) -> tuple[object, list[np.ndarray]]:
    """The scheduled kernel for ``packed`` at M = ``m`` and the constant arrays it takes after x
    (then the bias, if any, then the output).

    ``schedule`` is one of the format's candidates (see :func:`schedule_space`); None takes the
    format's own heuristic choice.
    """
    extra = {} if schedule is None else {"schedule": schedule}
    if isinstance(packed, PackedCSR):
        return csr_linear(m, packed, has_bias, caps, name, **extra), csr_args(packed, m, caps, **extra)
    if isinstance(packed, PackedBSR):
        return bsr_linear(m, packed, has_bias, caps, name, **extra), bsr_args(packed, m, caps, **extra)
    if isinstance(packed, PackedNM):
        return nm_linear(m, packed, has_bias, caps, name, **extra), nm_args(packed, m, caps, **extra)
    raise TypeError(f"no kernel for packed weight of type {type(packed).__name__}")


__all__ = [
    "BF16_MARKER", "FP16_MARKER", "HALF_MARKERS", "SCHEDULE_ATTR", "WEIGHT_DTYPES", "bsr_args", "bsr_linear",
    "csr_args", "csr_linear", "dense_args", "dense_linear", "nm_args", "nm_linear", "sparse_kernel",
]
