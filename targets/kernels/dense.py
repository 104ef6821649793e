"""Dense linear kernel (GEMM / GEMV) for layers kept dense: y = x @ W.T + b.

The weight is re-laid out at build time into panels of ``nr`` output features, ``(N/nr, K, nr)``
(zero-padded), so the inner loop reads one contiguous vector of ``nr`` weights per input column.
A register tile of ``mr`` x rows x ``nr`` outputs accumulates over a block of ``kc`` input
columns (the panel block stays in L1/L2 while every x tile passes over it); panels run in
parallel. At M = 1 the tile is one row wide and ``nr`` is several vectors, which gives several
independent multiply-add chains while the weight streams from memory.
"""

from __future__ import annotations

import dataclasses

import numpy as np
from sparsecc.targets.base import Capabilities

from ._common import (
    ACC_SCOPE,
    cached_builder,
    ceil_div,
    check_weights,
    drop_param,
    finish,
    from_bfloat16_bits,
    init_panel_tile,
    lanes,
    store_values,
    stored_dtype,
    to_bfloat16_bits,
    weights_marker,
    widen,
)

__all__ = ["DenseSchedule", "dense_args", "dense_linear", "dense_params", "dense_schedules",
           "from_bfloat16_bits", "to_bfloat16_bits"]


@dataclasses.dataclass(frozen=True)
class DenseSchedule:
    """Knobs of the dense kernel: ``mr`` x rows per register tile, ``nr`` outputs per weight panel
    (a multiple of the vector width), ``kc`` input columns per K block (``0``: no K blocking)."""

    mr: int
    nr: int
    kc: int
    weights: str = "float32"  # or "bfloat16": weights stored as bf16, widened to f32 on load

    def describe(self) -> str:
        return f"mr{self.mr} nr{self.nr} kc{self.kc or 'all'}{weights_marker(self.weights)}"


def dense_schedules(m: int, shape: tuple[int, int], caps: Capabilities) -> list[DenseSchedule]:
    """Candidates for the schedule explorer, the heuristic default first: register tiles of 4, 6
    and 8 rows (M > 3), panels of 2 and 4 vectors, K blocks of 128 and 256 or none."""
    v = lanes(caps)
    default = DenseSchedule(*dense_params(m, shape, caps))
    out = [default]
    rows = (m,) if m < 4 else (4, 6, 8)
    blocks = (0,) if m < 4 else (128, 256, 0)
    for mr in rows:
        for nr in (2 * v, 4 * v):
            for kc in blocks:
                cand = DenseSchedule(mr, nr, kc)
                if cand not in out:
                    out.append(cand)
    return out[:12]


def dense_params(m: int, shape: tuple[int, int], caps: Capabilities) -> tuple[int, int, int]:
    """(mr, nr, kc): rows of x per register tile, outputs per panel, inputs per K block.

    Chosen from interleaved A/B timings on an AVX-512 host at 1 thread (digits CNN shapes:
    64x1024 -> 512, 1024x288 -> 64, 1024x64 -> 64, 4096x9 -> 32): panels of 4 vectors beat 2 by
    10-15 % wherever N fills them (half as many broadcasts of x per multiply-add), and a K block
    of 128 keeps the panel block (128 x nr) in L1 next to the x rows. A panel of 3 vectors was 40x
    slower (LLVM splits the non-power-of-two vector badly), so nr stays 2 or 4 vectors. Six rows
    of x only pay off when the K loop is long enough to hide the larger tile's setup.
    """
    v = lanes(caps)
    n_out, k = shape
    if m < 4:
        return m, 4 * v, 0
    if n_out >= 4 * v:
        return (6 if k >= 512 else 4), 4 * v, 128
    return 4, 2 * v, 128


def dense_args(weight: np.ndarray, m: int, caps: Capabilities,
               schedule: DenseSchedule | None = None) -> list[np.ndarray]:
    """The packed weight panels (N/nr, K, nr) the dense kernel takes after x (f32, or bf16 bits as
    uint16 when the schedule stores bf16 weights)."""
    schedule = schedule or DenseSchedule(*dense_params(m, weight.shape, caps))
    nr = schedule.nr
    n_out, k = weight.shape
    panels = ceil_div(n_out, nr)
    padded = np.zeros((panels * nr, k), np.float32)
    padded[:n_out] = weight
    out = np.ascontiguousarray(padded.reshape(panels, nr, k).transpose(0, 2, 1))
    return [store_values(out, schedule.weights)]


def dense_linear(m: int, shape: tuple[int, int], has_bias: bool, caps: Capabilities,
                 name: str = "dense_linear", schedule: DenseSchedule | None = None):
    """Scheduled TIR PrimFunc for a dense linear of weight ``shape`` (N, K).

    Parameters: x (m, K) f32, panels (N/nr, K, nr) f32 from :func:`dense_args`, [bias (N,)],
    y (m, N) f32.
    """
    schedule = schedule or DenseSchedule(*dense_params(m, tuple(shape), caps))
    func, description = _dense_kernel(m, tuple(shape), has_bias, caps, schedule)
    return finish(func, name, description)


@cached_builder
def _dense_kernel(m: int, shape: tuple[int, int], has_bias: bool, caps: Capabilities, schedule: DenseSchedule):
    from tvm.script import tirx as T

    n_out, k = shape
    mr, nr, kc = min(schedule.mr, m), schedule.nr, schedule.kc
    if nr % lanes(caps):
        raise ValueError(f"dense schedule {schedule}: nr must be a multiple of the vector width {lanes(caps)}")
    kc = min(kc, k) if kc > 0 else k
    n_kb = ceil_div(k, kc)
    check_weights(schedule.weights, f"dense schedule {schedule}")
    stored = stored_dtype(schedule.weights)
    weights = schedule.weights
    full_panels, tail_n = divmod(n_out, nr)
    panels = ceil_div(n_out, nr)
    full_m, tail_m = divmod(m, mr)
    # Fewer panels than threads (a classifier head, a narrow layer): the x tiles are split over the
    # threads as well, so the panels run as panels x m_chunks tasks instead of leaving threads idle.
    m_chunks = 1 if panels >= caps.threads else max(1, min(caps.threads, full_m))
    tiles_per_chunk = ceil_div(full_m, m_chunks)

    start_tile = init_panel_tile(has_bias, nr)

    # The last panel's outputs are padded to 1, 2 or 4 whole vectors: its zero-padded weights make
    # the extra lanes harmless, while a width of 1.5 or 3 vectors made LLVM split every
    # multiply-add (dense 24x96 at M = 3136: 751 us with 24 lanes, 179 us with 32; 40x300 at
    # M = 64: 178 us with 48 lanes, 17 us with 64).
    tail_width = lanes(caps)
    while tail_width < tail_n:
        tail_width *= 2
    tail_width = min(nr, tail_width)

    @T.macro
    def tile(x, wp, bias, y, nb, kb, m0, rows, cols, width):
        acc = T.decl_buffer((rows, width), "float32", scope=ACC_SCOPE)
        start_tile(acc, bias, y, kb == 0, m0, nb, rows, cols)
        if width > cols:
            for mm in T.unroll(rows):
                for i in T.vectorized(width - cols):
                    acc[mm, cols + i] = T.float32(0)
        for kk in range(T.min(kc, k - kb * kc)):
            for mm in T.unroll(rows):
                for i in T.vectorized(width):
                    acc[mm, i] = acc[mm, i] + x[m0 + mm, kb * kc + kk] * widen(wp[nb, kb * kc + kk, i], weights)
        for mm in T.unroll(rows):
            for i in T.vectorized(cols):
                y[m0 + mm, nb * nr + i] = acc[mm, i]

    @T.macro
    def panel(x, wp, bias, y, nb, cols, width, mc):
        for kb in range(n_kb):
            for mt in range(mc * tiles_per_chunk, T.min(mc * tiles_per_chunk + tiles_per_chunk, full_m)):
                tile(x, wp, bias, y, nb, kb, mt * mr, mr, cols, width)
            if tail_m > 0:
                if mc == m_chunks - 1:
                    tile(x, wp, bias, y, nb, kb, full_m * mr, tail_m, cols, width)

    @T.prim_func
    def kernel(x: T.Buffer((m, k), "float32"), wp: T.Buffer((panels, k, nr), stored),
               bias: T.Buffer((n_out,), "float32"), y: T.Buffer((m, n_out), "float32")):
        for task in T.parallel(full_panels * m_chunks):
            panel(x, wp, bias, y, task // m_chunks, nr, nr, task % m_chunks)
        if tail_n > 0:
            if m_chunks == 1:
                panel(x, wp, bias, y, full_panels, tail_n, tail_width, 0)
            else:
                for mc in T.parallel(m_chunks):
                    panel(x, wp, bias, y, full_panels, tail_n, tail_width, mc)

    func = kernel if has_bias else drop_param(kernel, "bias")
    split = f" m-split{m_chunks}" if m_chunks > 1 else ""
    return func, f"dense-panels {schedule.describe()}{split}"
