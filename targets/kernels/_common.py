"""Helpers shared by the TIR kernel builders: attributes every shipped kernel carries and the
small integer arithmetic the schedules use to pick tile sizes."""

from __future__ import annotations

import functools

import numpy as np
from sparsecc.targets.base import Capabilities

#: function attribute holding a short description of the schedule a kernel was built with
SCHEDULE_ATTR = "sparsecc.schedule"

#: storage scope of register tiles (accumulators) declared inside loops. TVM 0.27 lowers a
#: ``"local"`` buffer on the CPU to a TVMBackendAllocWorkspace / FreeWorkspace call pair on every
#: iteration of the loop that declares it (four calls per output row in the SpMV), while a small
#: ``"global"`` one becomes a stack ``alloca`` that LLVM promotes to registers.
ACC_SCOPE = "global"

#: storage types a kernel's weight values may have: fp32, or bf16 bits (uint16) widened to fp32
#: on load; the arithmetic is fp32 either way
WEIGHT_DTYPES = ("float32", "bfloat16")

#: marker in a kernel's schedule description when its weight values are stored as bf16 (the
#: compile driver then allows bf16 rounding in its check against the fp32 program)
BF16_MARKER = " bf16-weights"
#: the same for kernels computing from fp16 weights and inputs (the GPU's tensor-core kernel)
FP16_MARKER = " fp16-weights"
#: markers of kernels whose results carry 16-bit rounding
HALF_MARKERS = (BF16_MARKER, FP16_MARKER)


def check_weights(weights: str, owner: str) -> None:
    """Raise ValueError unless ``weights`` is one of :data:`WEIGHT_DTYPES`."""
    if weights not in WEIGHT_DTYPES:
        raise ValueError(f"{owner}: weights must be float32 or bfloat16, not {weights!r}")


def weights_marker(weights: str) -> str:
    """:data:`BF16_MARKER` for bf16-stored values, else nothing."""
    return BF16_MARKER if weights == "bfloat16" else ""


def with_detail(description: str, detail: str) -> str:
    """``description`` + `` detail``, the bf16 marker kept last."""
    if description.endswith(BF16_MARKER):
        return f"{description[:-len(BF16_MARKER)]} {detail}{BF16_MARKER}"
    return f"{description} {detail}"


def stored_dtype(weights: str) -> str:
    """The TIR buffer dtype of stored weight values."""
    return "uint16" if weights == "bfloat16" else "float32"


def to_bfloat16_bits(values: np.ndarray) -> np.ndarray:
    """fp32 -> bf16 (round to nearest even) as the uint16 bit patterns kernels store."""
    bits = np.ascontiguousarray(values, dtype=np.float32).view(np.uint32).astype(np.uint64)
    rounded = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
    return rounded.astype(np.uint16)


def from_bfloat16_bits(bits: np.ndarray) -> np.ndarray:
    """The fp32 values of stored bf16 bit patterns (what the kernel computes with)."""
    return (np.asarray(bits).astype(np.uint32) << 16).view(np.float32)


def store_values(values: np.ndarray, weights: str) -> np.ndarray:
    """Weight values as a kernel stores them: f32, or bf16 bits (uint16) for ``"bfloat16"``."""
    values = np.ascontiguousarray(values, dtype=np.float32)
    return to_bfloat16_bits(values) if weights == "bfloat16" else values


def widen(value, weights: str, lanes: int = 1):
    """TIR expression: the f32 value(s) of a loaded weight (scalar, or a vector of ``lanes``).

    bf16 is the top half of an fp32, so shifting the stored bits up 16 gives the exact f32 value
    (one zero-extend and one shift per vector, no AVX-512 BF16 instructions needed).
    """
    if weights != "bfloat16":
        return value
    from tvm.script import tirx as T

    if lanes == 1:
        return T.reinterpret("float32", T.shift_left(T.Cast("uint32", value), T.uint32(16)))
    wide = T.Cast(f"uint32x{lanes}", value)
    return T.reinterpret(f"float32x{lanes}", T.shift_left(wide, T.Broadcast(T.uint32(16), lanes)))


def cached_builder(builder):
    """Memoize a TIR builder whose arguments are all hashable (ints, strings, frozen dataclasses).

    Parsing a TVMScript kernel takes 0.1-3 s; a model's layers ask for the same kernel many times
    (SmolLM2's 30 layers x 7 linears come in 4 shapes), so each distinct kernel is parsed once.
    PrimFuncs are immutable, so sharing one between callers is safe.
    """
    return functools.lru_cache(maxsize=512)(builder)


def finish(func, name: str, schedule: str):
    """Name a kernel and mark it as hand-scheduled, so Relax's schedulers leave it alone."""
    return func.with_attrs({
        "global_symbol": name,
        "tirx.noalias": True,
        "tirx.is_scheduled": True,
        # kOpaque: Relax's FuseOps must not fuse a hand-written loop nest with its neighbours
        # (FuseTIR can only merge block-structured functions, and would drop the schedule).
        "op_pattern": 8,
        SCHEDULE_ATTR: schedule,
    })


def lanes(caps: Capabilities) -> int:
    """f32 lanes of the widest vector register the kernels may use."""
    return max(4, caps.vector_lanes_f32)


def ceil_div(a: int, b: int) -> int:
    return -(-a // b)


def round_up(a: int, b: int) -> int:
    return ceil_div(a, b) * b


def pow2_at_least(n: int, lo: int = 1) -> int:
    p = lo
    while p < n:
        p *= 2
    return p


def mvec_tile(m: int, rows_per_step: int, caps: Capabilities, registers: int = 16) -> int:
    """Width (in x rows) of the register tile of a kernel that vectorizes over M.

    The accumulator holds ``rows_per_step x tile`` floats; keeping it to about ``registers``
    vector registers leaves room for the broadcast weights and the loaded x rows (more spilled
    under LLVM in earlier experiments).
    """
    v = lanes(caps)
    if m < v:
        return pow2_at_least(m, 4)
    vectors = max(1, min(8, registers // max(1, rows_per_step)))
    return min(round_up(m, v), v * vectors)


def drop_param(func, name: str):
    """Remove an unused buffer parameter (the bias of a kernel built without one).

    The kernels are written once with every parameter; when a Python-level ``if`` removed every
    use of ``name`` from the body, the parameter is dropped so the call signature matches.
    """
    from tvm import tirx

    # TVM 0.27 PrimFuncs have no buffer_map: buffer parameters are the params themselves.
    params = [p for p in func.params if p.name != name]
    return tirx.PrimFunc(params, func.body, func.ret_type, func.attrs)


def transpose_pad(m: int, k: int, mp: int, strip: int = 16):
    """TIR macro copying x (m, k) into xt (k, mp), zero-filling rows m..mp-1 of x.

    Strips of ``strip`` input columns run in parallel; a strip of x rows and the matching rows of
    xt both stay in L1 while it is copied.
    """
    from tvm.script import tirx as T

    @T.macro
    def transpose(x, xt):
        for kt in T.parallel(ceil_div(k, strip)):
            for mm in range(mp):
                for kk in range(strip):
                    if kt * strip + kk < k:
                        if mm < m:
                            xt[kt * strip + kk, mm] = x[mm, kt * strip + kk]
                        else:
                            xt[kt * strip + kk, mm] = T.float32(0)

    return transpose


def tile_transpose(m: int, k: int, tile: int):
    """TIR macro copying x (m, k) into xt (ceil(m / tile), k, tile): ``xt[t, col, :]`` holds
    ``x[t*tile : (t+1)*tile, col]`` (zero past row m), so one input column of a tile of x rows is
    one contiguous vector. Strips of 16 columns of one tile run in parallel (a strip of x rows
    and its xt rows both stay in L1 while it is copied)."""
    from tvm.script import tirx as T

    strips = ceil_div(k, 16)
    n_mt = ceil_div(m, tile)

    @T.macro
    def transpose(x, xt):
        for st in T.parallel(n_mt * strips):
            for mm in range(tile):
                for kk in range(16):
                    if (st % strips) * 16 + kk < k:
                        if (st // strips) * tile + mm < m:
                            xt[st // strips, (st % strips) * 16 + kk, mm] = x[(st // strips) * tile + mm,
                                                                              (st % strips) * 16 + kk]
                        else:
                            xt[st // strips, (st % strips) * 16 + kk, mm] = T.float32(0)

    return transpose


def init_panel_tile(has_bias: bool, nr: int):
    """TIR macro starting a (rows x cols) register tile of a K-blocked GEMM panel: from the bias
    (or zero) on the first K block, else from the partial sums already stored in y's rows
    ``row0 .. row0 + rows``, columns ``nb * nr ..``. Shared by the dense GEMM and the direct
    convolution, whose tiles accumulate over K blocks the same way."""
    from tvm.script import tirx as T

    @T.macro
    def init(acc, bias, y, first, row0, nb, rows, cols):
        if first:
            for mm in T.unroll(rows):
                for i in T.vectorized(cols):
                    if has_bias:
                        acc[mm, i] = bias[nb * nr + i]
                    else:
                        acc[mm, i] = T.float32(0)
        else:
            for mm in T.unroll(rows):
                for i in T.vectorized(cols):
                    acc[mm, i] = y[row0 + mm, nb * nr + i]

    return init


def init_chains(has_bias: bool, chains: int, r: int):
    """TIR macro zeroing ``chains`` independent accumulator sets of (mt x r), the first one
    starting from the bias of output rows ``row0 .. row0 + r`` (row-vector BSR and N:M kernels)."""
    from tvm.script import tirx as T

    @T.macro
    def init(acc, bias, row0, mt):
        for u in T.unroll(chains):
            for mm in T.unroll(mt):
                for i in T.vectorized(r):
                    if has_bias:
                        acc[u, mm, i] = T.if_then_else(u == 0, bias[row0 + i], T.float32(0))
                    else:
                        acc[u, mm, i] = T.float32(0)

    return init


def untranspose(m: int, n_out: int, mp: int, has_bias: bool, v: int):
    """TIR macro writing y (m, n_out) (+ bias) from yt (n_out, mp).

    M-vectorized kernels accumulate output rows as contiguous vectors of M; storing those
    straight into y would be M scalar stores a whole y row apart (a TLB miss each at M = 128).
    They go to yt instead and this copies ``w`` output columns at a time: a (w x M) block of yt
    stays in L1 while every y row gets one contiguous ``w``-wide store.
    """
    from tvm.script import tirx as T

    w = v
    while n_out % w:
        w //= 2

    @T.macro
    def copy_out(yt, bias, y):
        for nb in T.parallel(n_out // w):
            for mm in range(m):
                for i in T.vectorized(w):
                    if has_bias:
                        y[mm, nb * w + i] = yt[nb * w + i, mm] + bias[nb * w + i]
                    else:
                        y[mm, nb * w + i] = yt[nb * w + i, mm]

    return copy_out


#: multiply-adds (M x stored weights) under which an M = 1 kernel runs its rows on one thread: with
#: 2 threads whose pool sleeps between kernels (as the benchmarks and a model's other runtimes
#: want), waking the second thread cost about 20 us here, more than such a kernel takes alone
#: (768 x 768 block16x1 at 90 %: 3.2 us on one thread, 23.7 us on two; 4096 x 4096 at 90 %, 1.7 M
#: multiply-adds: two threads 1.2x faster)
SERIAL_BELOW = 512 * 1024


def runs_serial(m: int, stored: int, caps: Capabilities | None) -> bool:
    """Whether a kernel of ``m`` rows of x and ``stored`` weights should not fan out to threads."""
    return caps is not None and caps.threads > 1 and m * stored < SERIAL_BELOW


def outer_loop(serial: bool):
    """The TVMScript loop kind of a kernel's outermost (row) loop: ``T.parallel``, or ``T.serial``
    for a kernel too small to pay for waking threads (:func:`runs_serial`)."""
    from tvm.script import tirx as T

    return T.serial if serial else T.parallel
