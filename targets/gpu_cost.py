"""Cost model of dense and 2:4 sparse tensor-core linears on NVIDIA A100 (sm_80) and H100 (sm_90).

No GPU runs on the machines that build sparsecc, so this is a roofline of published numbers
with the overheads that decide small layers, stated here so a user can check them:

* Peaks (SXM parts, fp16/bf16 inputs, fp32 accumulation): A100 312 TFLOP/s dense and 624 with
  2:4; H100 989 and 1979. HBM: A100 2.04 TB/s, H100 3.35 TB/s. Streaming multiprocessors: 108
  and 132.
* Bytes: activations in and out, plus the weight: 2 bytes per element dense; 2:4 stores half the
  elements and 2 bits of position per kept element (the int16 metadata of
  :mod:`sparsecc.targets.tensor_core_2_4`), 0.5625 of the dense bytes.
* Tiles: a kernel works in output tiles of 64 weight rows by up to 64 tokens (fewer tokens: a
  tile as narrow as the tokens, in steps of 8, the ``mma`` N), one per thread block; a partial
  tile costs a whole one, and tiles run in waves of one per SM, each SM at 1/SMs of the peak. A
  layer with fewer tiles than SMs leaves the rest idle.
* Reached fraction of the peak: dense 0.7 of tensor-core FLOP/s and 0.8 of HBM. 2:4 reaches 0.5
  of its doubled FLOP/s (metadata decode, and the shapes published kernels favour: cuSPARSELt
  and CUTLASS report about 1.3-1.6x over dense on large GEMMs, not 2x), and streams its weight at
  0.45 of HBM (activations move at the dense 0.8, as they do in a dense kernel): the
  published measurements find no gain at batch 1-8, where a layer is a weight stream, and 0.45
  is where the halved stream stops being faster than the dense one (sparse GEMV-like paths are
  less tuned than dense ones). This one number is fitted to those reports, not derived.
* Each kernel launch costs 4 us, sparse or dense.

With these numbers the known lesson falls out rather than being a rule of its own: a layer below
about 256 input or output channels, or with a handful of tokens, is dominated by the launch and
the idle SMs, so 2:4 predicts no gain and :func:`pays` keeps it dense.
"""

from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass(frozen=True)
class Gpu:
    """The published numbers of one GPU the roofline needs."""

    name: str
    arch: str  # CUDA arch, e.g. "sm_80"
    dense_tflops: float  # fp16 tensor cores, fp32 accumulate
    sparse_tflops: float  # the same with 2:4 sparsity
    hbm_tbs: float
    sms: int


GPUS = {
    "a100": Gpu("A100 SXM", "sm_80", 312.0, 624.0, 2.04, 108),
    "h100": Gpu("H100 SXM", "sm_90", 989.0, 1979.0, 3.35, 132),
}

TILE = 64  # output tile edge (weight rows, and tokens when there are enough) of one thread block
LAUNCH_S = 4e-6
DENSE_FLOP_EFF, DENSE_BW_EFF = 0.7, 0.8
SPARSE_FLOP_EFF, SPARSE_BW_EFF = 0.5, 0.45
#: stored bytes of a 2:4 weight per dense element: half the fp16 values plus 2 bits per kept one
SPARSE_BYTES_PER_ELEMENT = 0.5 * 2 + 0.5 * 2 / 8
#: predicted gain below which a 2:4 layer is not worth its packing (it stays dense)
MIN_GAIN = 1.1


def linear_seconds(gpu: Gpu, tokens: int, n_out: int, k: int, sparse: bool) -> float:
    """Predicted seconds of y = x @ W.T for x (tokens, k) and W (n_out, k), fp16, dense or 2:4."""
    token_tile = min(TILE, 8 * math.ceil(tokens / 8))
    tiles = math.ceil(n_out / TILE) * math.ceil(tokens / token_tile)
    waves = math.ceil(tiles / gpu.sms)
    peak = (gpu.sparse_tflops * SPARSE_FLOP_EFF if sparse else gpu.dense_tflops * DENSE_FLOP_EFF) * 1e12
    # each wave takes one tile's time on one SM's share of the peak, however few SMs it fills
    compute = waves * 2.0 * TILE * token_tile * k / (peak / gpu.sms)
    weight_bytes = n_out * k * (SPARSE_BYTES_PER_ELEMENT if sparse else 2.0)
    # the weight streams at the format's reached bandwidth; activations move as a dense kernel's do
    weight_bw = gpu.hbm_tbs * 1e12 * (SPARSE_BW_EFF if sparse else DENSE_BW_EFF)
    memory = weight_bytes / weight_bw + 2.0 * tokens * (k + n_out) / (gpu.hbm_tbs * 1e12 * DENSE_BW_EFF)
    return LAUNCH_S + max(compute, memory)


def gain(gpu: Gpu, tokens: int, n_out: int, k: int) -> float:
    """Predicted dense time over 2:4 time of one linear."""
    return linear_seconds(gpu, tokens, n_out, k, False) / linear_seconds(gpu, tokens, n_out, k, True)


def pays(gpu: Gpu, tokens: int, n_out: int, k: int) -> bool:
    """Whether 2:4 is predicted to be worth it for this layer (gain of at least :data:`MIN_GAIN`)."""
    return gain(gpu, tokens, n_out, k) >= MIN_GAIN
