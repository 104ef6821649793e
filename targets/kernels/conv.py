"""Dense 2-D convolution kernels (NCHW, float32) for the convolutions a model keeps dense.

A convolution with ``groups == 1`` runs as :func:`conv2d_panels`: sparsecc's dense GEMM tile
(:mod:`~sparsecc.targets.kernels.dense`, the same packed weight panels of
``weight.reshape(N, C*kh*kw)``, bias fused) with its K loop walking the receptive field of a few
neighbouring outputs in the zero-padded image, so no im2col matrix is written. It returns
``(B*OH*OW, N)`` rows (NHWC) and the caller transposes them back to NCHW (a Relax
``permute_dims`` that fuses with a following ReLU / add).

Grouped and depthwise convolutions have too little arithmetic per output for a GEMM to pay
off; :func:`grouped_conv2d` computes them directly, one (image, output channel) plane per
parallel task, with the output row vectorized.
"""

from __future__ import annotations

from sparsecc.ops import conv_output_size as conv_out_size
from sparsecc.targets.base import Capabilities

from ._common import ACC_SCOPE, ceil_div, drop_param, finish, init_panel_tile, lanes
from .dense import dense_params


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


def conv2d_panels(x_shape: tuple[int, int, int, int], w_shape: tuple[int, int, int, int], stride, padding,
                  dilation, has_bias: bool, caps: Capabilities, name: str = "conv2d_panels"):
    """Scheduled TIR PrimFunc for a ``groups == 1`` convolution computed directly against the
    dense GEMM's packed weight panels, without an im2col matrix.

    Parameters: x (B, C, H, W), panels from ``dense_args(weight.reshape(N, C*kh*kw), B*OH*OW)``,
    [bias (N,)], y (B*OH*OW, N) (NHWC rows, like im2col + GEMM, so the caller's transpose to NCHW
    is the same). The register tile is ``mr`` neighbouring outputs of one output row x one panel
    of ``nr`` output channels; its K loop runs over (channel, tap row, tap column), so the x value
    it broadcasts is at an affine address in the (zero-padded) image instead of in a copied
    receptive field. im2col wrote every input value kh*kw times (0.2 ms of the digits CNN's
    32-channel 3x3 conv at batch 64, a third of the convolution). Channels are blocked so a block
    of the panel (about 128 K rows, as in the GEMM) stays in L1 while every output row of the
    images passes over it; images are split in ``threads`` chunks run in parallel.
    """
    from tvm.script import tirx as T


    b_, c_, h_, w_ = x_shape
    n_out, _, kh, kw = w_shape
    (sh, sw), (ph, pw), (dh, dw), (oh_, ow_) = conv_geometry(x_shape, w_shape, stride, padding, dilation)
    taps = kh * kw
    kdim = c_ * taps
    m = b_ * oh_ * ow_
    _, nr, kc = dense_params(m, (n_out, kdim), caps)
    kc = kc or kdim  # 0: no K blocking
    v = lanes(caps)
    # About 16 accumulator vectors, as the GEMM's tile: 4 neighbours for 4-vector panels, 8 for 2.
    mr = max(1, min(ow_, 16 // ceil_div(nr, v)))
    full_w, tail_w = divmod(ow_, mr)
    cb = max(1, min(c_, kc // taps))
    n_cb = ceil_div(c_, cb)
    full_panels, tail_n = divmod(n_out, nr)
    panels = ceil_div(n_out, nr)
    chunks = max(1, min(b_, caps.threads))
    per_chunk = ceil_div(b_, chunks)
    chunks = ceil_div(b_, per_chunk)
    hp, wp_ = h_ + 2 * ph, w_ + 2 * pw
    start_tile = init_panel_tile(has_bias, nr)

    @T.macro
    def tile(xp, wp, bias, y, b, oh, ow0, nb, blk, rows, cols):
        acc = T.decl_buffer((rows, cols), "float32", scope=ACC_SCOPE)
        start_tile(acc, bias, y, blk == 0, (b * oh_ + oh) * ow_ + ow0, nb, rows, cols)
        for c in range(blk * cb, T.min(blk * cb + cb, c_)):
            for ki in T.unroll(kh):
                for kj in T.unroll(kw):
                    for mm in T.unroll(rows):
                        for i in T.vectorized(cols):
                            acc[mm, i] = acc[mm, i] + xp[b, c, oh * sh + ki * dh, (ow0 + mm) * sw + kj * dw] * wp[
                                nb, c * taps + ki * kw + kj, i]
        for mm in T.unroll(rows):
            for i in T.vectorized(cols):
                y[(b * oh_ + oh) * ow_ + ow0 + mm, nb * nr + i] = acc[mm, i]

    @T.macro
    def panel(xp, wp, bias, y, bt, nb, cols):
        for blk in range(n_cb):
            for b in range(bt * per_chunk, T.min(bt * per_chunk + per_chunk, b_)):
                for oh in range(oh_):
                    for wt in range(full_w):
                        tile(xp, wp, bias, y, b, oh, wt * mr, nb, blk, mr, cols)
                    if tail_w > 0:
                        tile(xp, wp, bias, y, b, oh, full_w * mr, nb, blk, tail_w, cols)

    @T.macro
    def body(xp, wp, bias, y):
        for bt in T.parallel(chunks):
            for nb in range(full_panels):
                panel(xp, wp, bias, y, bt, nb, nr)
            if tail_n > 0:
                panel(xp, wp, bias, y, bt, full_panels, tail_n)

    if ph == 0 and pw == 0:
        @T.prim_func
        def kernel_fn(x: T.Buffer((b_, c_, h_, w_), "float32"), wp: T.Buffer((panels, kdim, nr), "float32"),
                      bias: T.Buffer((n_out,), "float32"), y: T.Buffer((m, n_out), "float32")):
            body(x, wp, bias, y)
    else:
        @T.prim_func
        def kernel_fn(x: T.Buffer((b_, c_, h_, w_), "float32"), wp: T.Buffer((panels, kdim, nr), "float32"),
                      bias: T.Buffer((n_out,), "float32"), y: T.Buffer((m, n_out), "float32")):
            # Zero-padded copy of x: the tile's loads need no bounds test (a select per multiply-add
            # in the K loop would cost more than this copy).
            xp = T.decl_buffer((b_, c_, hp, wp_), "float32")
            for bc in T.parallel(b_ * c_):
                for hh in range(hp):
                    for ww in T.vectorized(wp_):
                        xp[bc // c_, bc % c_, hh, ww] = T.float32(0)
                for hh in range(h_):
                    for ww in T.vectorized(w_):
                        xp[bc // c_, bc % c_, hh + ph, ww + pw] = x[bc // c_, bc % c_, hh, ww]
            body(xp, wp, bias, y)

    func = kernel_fn if has_bias else drop_param(kernel_fn, "bias")
    return finish(func, name, f"direct-conv-panels mr{mr} nr{nr} channels{cb}/block parallel(images/{chunks})")


def im2col_rows_kernel(x_shape: tuple[int, int, int, int], kernel: tuple[int, int], stride, padding, dilation,
                       caps: Capabilities, name: str = "im2col_rows"):
    """Scheduled TIR PrimFunc of the op ``sparsecc.im2col_rows``: a convolution's input windows as
    rows (the input of a sparse k x k convolution's sparse linear): x (B, C, H, W) -> (B*OH*OW, C*kh*kw), row
    ``(b*OH + oh)*OW + ow`` in the weight's (C, kh, kw) order, zeros in the padding. Parameters:
    x, rows.

    One (image, output row) per parallel task; for each window tap, the output pixels of that row
    read x at a fixed stride, so the inner loop is over pixels. Windows overlap, so the rows hold
    each x value about kh*kw/(sh*sw) times: the price of feeding a sparse GEMM, paid once per
    layer, against a product that is kh*kw times longer than a 1x1 convolution's.
    """
    from tvm.script import tirx as T

    b, c, h, w = x_shape
    kh, kw = kernel
    (sh, sw), (ph, pw), (dh, dw), (oh, ow) = conv_geometry(x_shape, (1, c, kh, kw), stride, padding, dilation)
    taps = kh * kw

    # A root block around the loops: Relax checks every one-input call_tir for a reshape pattern
    # (RewriteDataflowReshape), and that check requires a block-structured body.
    @T.prim_func(s_tir=True)
    def kernel_func(x: T.Buffer((b, c, h, w), "float32"), rows: T.Buffer((b * oh * ow, c * taps), "float32")):
        with T.sblock("root"):
            for r in T.parallel(b * oh):
                for ci in range(c):
                    for i in range(kh):
                        yy = T.meta_var((r % oh) * sh - ph + i * dh)
                        for j in range(kw):
                            for q in range(ow):
                                xx = T.meta_var(q * sw - pw + j * dw)
                                rows[r * ow + q, ci * taps + i * kw + j] = T.if_then_else(
                                    (yy >= 0) and (yy < h) and (xx >= 0) and (xx < w),
                                    x[r // oh, ci, T.max(T.min(yy, h - 1), 0), T.max(T.min(xx, w - 1), 0)],
                                    T.float32(0))

    return finish(kernel_func, name, f"im2col rows {kh}x{kw} stride{sh}x{sw}")
