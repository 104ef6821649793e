"""sparsecc's custom torch ops: sparse linear layers holding packed weights, and the im2col rows
a k x k convolution's sparse linear multiplies.

The pack pass rewrites pruned ``linear`` and ``conv2d`` nodes into these ops (a k x k, strided or
padded convolution as ``im2col_rows`` followed by a sparse linear). Each op is
opaque to ``torch.export`` (so it survives decompositions and reaches the TVM importer as one
node), has a CPU reference kernel (so the packed program still runs in PyTorch and can be checked
against the masked-dense one) and a fake kernel (so export can trace shapes).

Every sparse linear op takes a 2-D activation ``x`` of shape (M, K) and returns (M, N). Names are
globally unique because TVM's importer looks converters up by the bare op name.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

NAMESPACE = "sparsecc"


def conv_output_size(size: int, kernel: int, stride: int, padding: int, dilation: int) -> int:
    """Output length of one spatial axis of a convolution."""
    return (size + 2 * padding - dilation * (kernel - 1) - 1) // stride + 1


@torch.library.custom_op(f"{NAMESPACE}::im2col_rows", mutates_args=())
def im2col_rows(x: torch.Tensor, kernel: list[int], stride: list[int], padding: list[int],
                dilation: list[int]) -> torch.Tensor:
    """A convolution's input windows as rows: x (B, C, H, W) -> (B*OH*OW, C*kh*kw). Row
    ``(b*OH + oh)*OW + ow`` holds the window of output pixel (oh, ow) of image b in the weight's
    (C, kh, kw) order, so ``rows @ weight.reshape(N, -1).T`` is the convolution, pixels NHWC;
    positions in the padding are zeros."""
    cols = F.unfold(x, tuple(kernel), dilation=tuple(dilation), padding=tuple(padding), stride=tuple(stride))
    return cols.transpose(1, 2).reshape(-1, cols.shape[1]).contiguous()


@im2col_rows.register_fake
def _(x, kernel, stride, padding, dilation):
    oh, ow = (conv_output_size(x.shape[2 + i], kernel[i], stride[i], padding[i], dilation[i]) for i in range(2))
    return x.new_empty((x.shape[0] * oh * ow, x.shape[1] * kernel[0] * kernel[1]))


@torch.library.custom_op(f"{NAMESPACE}::sparse_linear_csr", mutates_args=())
def sparse_linear_csr(
    x: torch.Tensor, indptr: torch.Tensor, indices: torch.Tensor, data: torch.Tensor,
    bias: torch.Tensor | None,
) -> torch.Tensor:
    """y = x @ W.T + bias with W (N, K) in CSR: indptr (N+1,), indices (nnz,), data (nnz,)."""
    n_out = indptr.shape[0] - 1
    counts = indptr[1:] - indptr[:-1]
    rows = torch.repeat_interleave(torch.arange(n_out), counts.to(torch.int64))
    # Gather the used input columns and scatter-add products into the output rows.
    products = x[:, indices.to(torch.int64)] * data  # (M, nnz)
    y = torch.zeros(x.shape[0], n_out, dtype=x.dtype)
    y.index_add_(1, rows, products)
    if bias is not None:
        y = y + bias
    return y


@sparse_linear_csr.register_fake
def _(x, indptr, indices, data, bias):
    return x.new_empty((x.shape[0], indptr.shape[0] - 1))


@torch.library.custom_op(f"{NAMESPACE}::sparse_linear_bsr", mutates_args=())
def sparse_linear_bsr(
    x: torch.Tensor, indptr: torch.Tensor, indices: torch.Tensor, data: torch.Tensor,
    bias: torch.Tensor | None,
) -> torch.Tensor:
    """y = x @ W.T + bias with W in BSR: block rows indptr (N/r+1,), block columns indices
    (nblocks,), blocks data (nblocks, r, c)."""
    n_blocks, r, c = data.shape
    n_brows = indptr.shape[0] - 1
    counts = indptr[1:] - indptr[:-1]
    brows = torch.repeat_interleave(torch.arange(n_brows), counts.to(torch.int64))
    m = x.shape[0]
    # x columns of each block: (M, nblocks, c); block products: (M, nblocks, r).
    cols = indices.to(torch.int64)[:, None] * c + torch.arange(c)[None, :]
    xb = x[:, cols]
    prod = torch.einsum("mbc,brc->mbr", xb, data)
    y = torch.zeros(m, n_brows, r, dtype=x.dtype)
    y.index_add_(1, brows, prod)
    y = y.reshape(m, n_brows * r)
    if bias is not None:
        y = y + bias
    return y


@sparse_linear_bsr.register_fake
def _(x, indptr, indices, data, bias):
    return x.new_empty((x.shape[0], (indptr.shape[0] - 1) * data.shape[1]))


@torch.library.custom_op(f"{NAMESPACE}::sparse_linear_nm", mutates_args=())
def sparse_linear_nm(
    x: torch.Tensor, values: torch.Tensor, positions: torch.Tensor, m: int,
    bias: torch.Tensor | None,
) -> torch.Tensor:
    """y = x @ W.T + bias with W in N:M compressed form: values and uint8 positions (N, K/m*n);
    slot ``j`` of a row sits at input column ``(j // n) * m + positions[j]``."""
    k = x.shape[1]
    n_keep = values.shape[1] // (k // m)
    group = torch.arange(values.shape[1]) // n_keep
    cols = group[None, :] * m + positions.to(torch.int64)  # (N, slots)
    xg = x[:, cols]  # (M, N, slots)
    y = (xg * values[None]).sum(-1)
    if bias is not None:
        y = y + bias
    return y


@sparse_linear_nm.register_fake
def _(x, values, positions, m, bias):
    return x.new_empty((x.shape[0], values.shape[0]))
