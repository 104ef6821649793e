"""Dense 2-D convolution kernels (NCHW, float32) for the convolutions a model keeps dense.

A convolution with ``groups == 1`` runs as im2col + sparsecc's dense GEMM: :func:`im2col` copies
every receptive field into one row of a ``(B*OH*OW, C*kh*kw)`` matrix (the column order matches
``weight.reshape(N, C*kh*kw)``), :func:`~sparsecc.targets.kernels.dense.dense_linear` multiplies
it by the packed weight with the bias fused, and the caller transposes the ``(B, OH, OW, N)``
result back to NCHW (a Relax ``permute_dims`` that fuses with a following ReLU / add).

Grouped and depthwise convolutions have too little arithmetic per output for a GEMM to pay
off; :func:`grouped_conv2d` computes them directly, one (image, output channel) plane per
parallel task, with the output row vectorized.
"""

from __future__ import annotations

from sparsecc.targets.base import Capabilities

from ._common import ceil_div, drop_param, finish, lanes


def conv_out_size(size: int, kernel: int, stride: int, padding: int, dilation: int) -> int:
    return (size + 2 * padding - dilation * (kernel - 1) - 1) // stride + 1


def _pair(value) -> tuple[int, int]:
    if isinstance(value, int):
        return value, value
    values = tuple(int(v) for v in value)
    return (values[0], values[0]) if len(values) == 1 else (values[0], values[1])


def conv_geometry(x_shape: tuple[int, ...], w_shape: tuple[int, ...], stride, padding, dilation):
    """((sh, sw), (ph, pw), (dh, dw), (OH, OW)) of a convolution, checking the output is not empty."""
    _, _, h, w = x_shape
    _, _, kh, kw = w_shape
    (sh, sw), (ph, pw), (dh, dw) = _pair(stride), _pair(padding), _pair(dilation)
    oh = conv_out_size(h, kh, sh, ph, dh)
    ow = conv_out_size(w, kw, sw, pw, dw)
    if oh <= 0 or ow <= 0:
        raise ValueError(f"convolution of input {x_shape} with kernel {w_shape} has an empty output")
    return (sh, sw), (ph, pw), (dh, dw), (oh, ow)


def im2col(x_shape: tuple[int, int, int, int], kernel: tuple[int, int], stride, padding, dilation,
           name: str = "im2col"):
    """Scheduled TIR PrimFunc copying x (B, C, H, W) into cols (B*OH*OW, C*kh*kw).

    The output rows of one (image, output row) pair are one parallel task; each output row is
    written front to back (contiguous stores; the reads of one row stay within C small windows of
    x that are already in L1). Writing tap-major instead (one input row to many output rows) was
    2x slower on 64x16x8x8. Out-of-image taps (padding) are zeros.
    """
    from tvm.script import tirx as T

    b_, c_, h_, w_ = x_shape
    kh, kw = kernel
    (sh, sw), (ph, pw), (dh, dw), (oh_, ow_) = conv_geometry(x_shape, (0, c_, kh, kw), stride, padding,
                                                             dilation)
    taps = kh * kw
    kdim = c_ * taps
    rows = b_ * oh_ * ow_

    # The nest sits in a root block: Relax's RewriteDataflowReshape inspects every one-input
    # call_tir and requires a block-structured body.
    @T.prim_func(s_tir=True)
    def kernel_fn(x: T.Buffer((b_, c_, h_, w_), "float32"), cols: T.Buffer((rows, kdim), "float32")):
        with T.sblock("root"):
            for r in T.parallel(b_ * oh_):
                for ow in range(ow_):
                    for c in range(c_):
                        for i in T.unroll(kh):
                            for j in T.unroll(kw):
                                # Padding taps read a clamped (in-bounds) address and select zero.
                                cols[r * ow_ + ow, c * taps + i * kw + j] = T.if_then_else(
                                    0 <= (r % oh_) * sh - ph + i * dh and (r % oh_) * sh - ph + i * dh < h_
                                    and 0 <= ow * sw - pw + j * dw and ow * sw - pw + j * dw < w_,
                                    x[r // oh_, c, T.max(T.min((r % oh_) * sh - ph + i * dh, h_ - 1), 0),
                                      T.max(T.min(ow * sw - pw + j * dw, w_ - 1), 0)],
                                    T.float32(0))

    return finish(kernel_fn, name, f"im2col parallel(b*oh={b_ * oh_}) taps{kh}x{kw}")


def grouped_conv2d(x_shape: tuple[int, int, int, int], w_shape: tuple[int, int, int, int], groups: int,
                   stride, padding, dilation, has_bias: bool, caps: Capabilities, name: str = "grouped_conv2d"):
    """Scheduled TIR PrimFunc for a grouped (e.g. depthwise) convolution computed directly.

    Parameters: x (B, C, H, W), weight (O, C/groups, kh, kw), [bias (O,)], y (B, O, OH, OW).
    Each (image, output channel) plane is one parallel task; each output row is accumulated in a
    register vector of ``lanes`` outputs (a tail vector for the rest), taps outermost within it.
    """
    from tvm.script import tirx as T

    b_, c_, h_, w_ = x_shape
    o_, cg, kh, kw = w_shape
    if c_ != cg * groups or o_ % groups:
        raise ValueError(f"groups={groups} does not divide input channels {c_} / output channels {o_}")
    og = o_ // groups
    (sh, sw), (ph, pw), (dh, dw), (oh_, ow_) = conv_geometry(x_shape, w_shape, stride, padding, dilation)
    v = min(lanes(caps), ow_)
    full_w, tail_w = divmod(ow_, v)

    @T.macro
    def row_strip(x, w, bias, y, b, o, oh, w0, width):
        acc = T.decl_buffer((width,), "float32", scope="global")
        for i in T.vectorized(width):
            if has_bias:
                acc[i] = bias[o]
            else:
                acc[i] = T.float32(0)
        for c in range(cg):
            for ki in range(kh):
                ih = oh * sh - ph + ki * dh
                if 0 <= ih and ih < h_:
                    for kj in T.unroll(kw):
                        for i in T.vectorized(width):
                            # The column index is spelled out, not let-bound: TVM 0.27's vectorizer
                            # keeps a let-bound lane index scalar (every lane got the last value).
                            acc[i] = acc[i] + w[o, c, ki, kj] * T.if_then_else(
                                0 <= (w0 + i) * sw - pw + kj * dw and (w0 + i) * sw - pw + kj * dw < w_,
                                x[b, (o // og) * cg + c, ih, T.max(T.min((w0 + i) * sw - pw + kj * dw, w_ - 1), 0)],
                                T.float32(0))
        for i in T.vectorized(width):
            y[b, o, oh, w0 + i] = acc[i]

    @T.prim_func
    def kernel_fn(x: T.Buffer((b_, c_, h_, w_), "float32"), w: T.Buffer((o_, cg, kh, kw), "float32"),
                  bias: T.Buffer((o_,), "float32"), y: T.Buffer((b_, o_, oh_, ow_), "float32")):
        for bo in T.parallel(b_ * o_):
            for oh in range(oh_):
                for wt in range(full_w):
                    row_strip(x, w, bias, y, bo // o_, bo % o_, oh, wt * v, v)
                if tail_w > 0:
                    row_strip(x, w, bias, y, bo // o_, bo % o_, oh, full_w * v, tail_w)

    func = kernel_fn if has_bias else drop_param(kernel_fn, "bias")
    return finish(func, name, f"direct-conv groups{groups} parallel(b*o={b_ * o_}) vector{v} "
                              f"strips{ceil_div(ow_, v)}")
