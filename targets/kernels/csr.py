"""Compressed-sparse-row (CSR) linear kernels: y = x @ W.T + b for unstructured sparsity.

* M = 1 (SpMV): rows run in parallel; the nonzeros of a row are consumed a vector at a time (the
  x values are gathered by column index) into a vector accumulator, so a row has ``lanes``
  independent multiply-add chains instead of one scalar chain; the ragged end of the row is a
  scalar loop and the vector is summed once per row.
* M > 1 (SpMM): the M-vectorized block-row schedule with 1 x 1 blocks (x transposed to (K, M) so
  every nonzero multiplies a contiguous register tile of x rows); see ``bsr.blockrow_mvec``.
"""

from __future__ import annotations

import numpy as np
from sparsecc.sparsity import PackedCSR
from sparsecc.targets.base import Capabilities

from ._common import ACC_SCOPE, drop_param, finish, lanes
from .bsr import blockrow_mvec


def csr_args(packed: PackedCSR, m: int) -> list[np.ndarray]:
    """The arrays :func:`csr_linear`'s kernel takes after x, in order (indptr, indices, data);
    for M > 1 the data is viewed as (nnz, 1, 1) blocks."""
    indptr = packed.indptr.astype(np.int32)
    indices = packed.indices.astype(np.int32)
    data = packed.data.astype(np.float32)
    if packed.nnz == 0:
        # Kernels declare at least one stored element; it is never read (every row is empty).
        indices = np.zeros(1, np.int32)
        data = np.zeros(1, np.float32)
    if m > 1:
        data = data.reshape(-1, 1, 1)
    return [indptr, indices, data]


def _spmv(n_out: int, k: int, nnz: int, has_bias: bool, v: int):
    from tvm.script import tirx as T

    nz = max(nnz, 1)

    @T.prim_func
    def kernel(x: T.Buffer((1, k), "float32"), indptr: T.Buffer((n_out + 1,), "int32"),
               indices: T.Buffer((nz,), "int32"), data: T.Buffer((nz,), "float32"),
               bias: T.Buffer((n_out,), "float32"), y: T.Buffer((1, n_out), "float32")):
        for n in T.parallel(n_out):
            acc = T.decl_buffer((v,), "float32", scope=ACC_SCOPE)
            tot = T.decl_buffer((1,), "float32", scope=ACC_SCOPE)
            for lane in T.vectorized(v):
                acc[lane] = T.float32(0)
            p0 = T.meta_var(indptr[n])
            count = T.meta_var(indptr[n + 1] - indptr[n])
            for q in range(count // v):
                for lane in T.vectorized(v):
                    acc[lane] = acc[lane] + data[p0 + q * v + lane] * x[0, indices[p0 + q * v + lane]]
            if has_bias:
                tot[0] = bias[n]
            else:
                tot[0] = T.float32(0)
            for p in range(p0 + count // v * v, indptr[n + 1]):
                tot[0] = tot[0] + data[p] * x[0, indices[p]]
            for lane in T.unroll(v):
                tot[0] = tot[0] + acc[lane]
            y[0, n] = tot[0]

    return kernel


def csr_linear(m: int, packed: PackedCSR, has_bias: bool, caps: Capabilities,
               name: str = "sparse_linear_csr"):
    """Scheduled TIR PrimFunc for y = x @ W.T (+ b) with W in CSR (arrays from :func:`csr_args`).

    Parameters of the PrimFunc: x (m, K) f32, indptr (N+1,), indices (nnz,), data, [bias (N,)],
    y (m, N) f32.
    """
    n_out, k = packed.shape
    if m == 1:
        v = lanes(caps)
        func = _spmv(n_out, k, packed.nnz, has_bias, v)
        func = func if has_bias else drop_param(func, "bias")
        return finish(func, name, f"csr-spmv gather{v}")
    return blockrow_mvec(m, n_out, k, 1, 1, packed.nnz, has_bias, caps, name)
