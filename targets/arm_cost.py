"""The ``arm-neon`` cost model: a roofline of the named core, since ARM code runs here only under
qemu, whose timings say nothing about ARM speed.

A kernel's predicted time is the larger of its compute time (its multiply-adds at the core's NEON
peak times the format's efficiency) and the time to stream its weight and activation bytes at the
core's single-core DRAM bandwidth. The assumptions, each a published or typical figure:

* Peak: 4 f32 lanes per 128-bit NEON register, two FMA pipes (Cortex-A76 and Neoverse-N1 both
  issue two 128-bit FMAs per cycle), 2 flops per FMA, at the clock of a typical part:
  Cortex-A76 at 2.4 GHz (Raspberry Pi 5), Neoverse-N1 at 2.5 GHz (AWS Graviton2).
* Bandwidth: what one core streams from DRAM, not the chip's peak: about 10 GB/s on a Pi 5 class
  board (LPDDR4X, 17 GB/s peak), about 18 GB/s on a Graviton2 core.
* Efficiency (fraction of peak a format's kernel reaches when compute-bound), in the range
  XNNPACK's kernels report on such cores: dense GEMM 0.75; sparse kernels that vectorize the
  pixel / token axis and share each loaded x vector among the output rows of a block lose less
  the more rows a block has: blocks of 16 or 8 rows 0.5, 4 rows 0.45, 2 rows 0.38, single rows
  (unstructured CSR) 0.3; 2:4 0.3 (its two kept weights of four index x in turn).

:func:`sparse_speedup` turns the model into a whole-model sparse/dense ratio, which the tests
hold against Fast Sparse ConvNets' published 1.3-2.4x on MobileNet-class models at 70-90 %
(Snapdragon 835) as a sanity check of these numbers.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from .base import Capabilities


@dataclass(frozen=True)
class ArmCore:
    """The published numbers of one ARM core the roofline needs."""

    name: str
    ghz: float
    fma_pipes: int  # 128-bit NEON FMA pipes
    dram_gbs: float  # what one core streams from DRAM
    part: str  # the typical part these numbers describe

    @property
    def gflops(self) -> float:
        return 4 * 2 * self.fma_pipes * self.ghz


CORES = {
    "cortex-a76": ArmCore("cortex-a76", 2.4, 2, 10.0, "Raspberry Pi 5 (BCM2712)"),
    "neoverse-n1": ArmCore("neoverse-n1", 2.5, 2, 18.0, "AWS Graviton2"),
}

#: fraction of NEON peak each kernel format reaches when compute-bound (module docstring);
#: keys are a format, or a format plus its block detail (``bsr`` ``r4c1``) where that matters
EFFICIENCY = (("dense", 0.75), ("bsr", 0.45), ("bsrr16c1", 0.5), ("bsrr8c1", 0.5), ("bsrr4c1", 0.45),
              ("bsrr2c1", 0.38), ("bsrr4c4", 0.45), ("csr", 0.3), ("nm", 0.3))


def roofline(core: ArmCore):
    """The :class:`~sparsecc.targets.tuning.Roofline` of one thread of ``core``."""
    from .tuning import Roofline

    return Roofline(gflops_per_thread=core.gflops, bandwidth_gbs=core.dram_gbs, efficiency=EFFICIENCY)


def cost_model(core: ArmCore, caps: Capabilities):
    """A roofline-only cost model (no measured table: nothing ARM is timed on this machine)."""
    from .tuning import CostModel

    return CostModel(caps, roofline(core))


@dataclass(frozen=True)
class Layer:
    """One GEMM-shaped layer of a model for :func:`sparse_speedup`: ``m`` rows of activations
    (pixels or tokens), a weight of ``shape`` (out, in), and whether the plan prunes it."""

    m: int
    shape: tuple[int, int]
    prunable: bool
    #: bytes the layer moves that its GEMM view does not count (a depthwise convolution, seen as
    #: ``m`` rows of 9 taps times C channels, also reads its m x C input), streamed at DRAM speed
    extra_bytes: float = 0.0


def sparse_speedup(model, layers: Iterable[Layer], pattern: str, sparsity: float) -> float:
    """Predicted dense time over sparse time of a whole model under cost model ``model``: the
    prunable layers at ``sparsity`` in ``pattern`` (random weights, packed as the kernels would be),
    every other layer dense, as is a prunable layer whose shape the pattern cannot tile."""
    import numpy as np
    from sparsecc.sparsity import parse_pattern

    parsed = parse_pattern(pattern)
    rng = np.random.default_rng(0)
    dense = sparse = 0.0
    for layer in layers:
        unseen = layer.extra_bytes / (model.roofline.bandwidth_gbs * 1e9)
        dense_s = model.predict(layer.m, None, layer.shape)[0] + unseen
        dense += dense_s
        if not layer.prunable or parsed.check_shape(layer.shape) is not None:
            # kept dense: not pruned by the plan, or a shape the pattern cannot tile
            sparse += dense_s
            continue
        import torch

        w = torch.from_numpy(rng.standard_normal(layer.shape).astype(np.float32))
        kept = parsed.mask(w.abs(), sparsity)
        packed = parsed.pack(torch.where(kept, w, torch.zeros_like(w)).numpy())
        sparse += model.predict(layer.m, packed, layer.shape)[0] + unseen
    return dense / sparse


def model_layers(model, example) -> list[Layer]:
    """The GEMM-shaped layers of a convolutional or linear torch model, from one forward pass on
    ``example``: a convolution of groups 1 is ``out`` x ``in * kh * kw`` over its output pixels,
    prunable when it is 1 x 1 (the pointwise layers sparse inference targets); a grouped
    (depthwise) one stays dense, with its input read counted apart; a linear is prunable."""
    import torch

    layers: list[Layer] = []

    def record(module, inputs, output) -> None:
        if isinstance(module, torch.nn.Conv2d):
            taps = module.kernel_size[0] * module.kernel_size[1]
            m = int(output.shape[0] * output.shape[2] * output.shape[3])
            shape = (module.out_channels, module.in_channels // module.groups * taps)
            if module.groups == 1:
                layers.append(Layer(m, shape, module.kernel_size == (1, 1)))
            else:
                layers.append(Layer(m, shape, False, 4.0 * inputs[0].numel()))
        elif isinstance(module, torch.nn.Linear):
            rows = int(output.numel() // output.shape[-1])
            layers.append(Layer(rows, (module.out_features, module.in_features), True))

    hooks = [module.register_forward_hook(record) for module in model.modules()]
    try:
        with torch.no_grad():
            model(example)
    finally:
        for hook in hooks:
            hook.remove()
    return layers

