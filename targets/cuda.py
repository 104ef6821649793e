"""The ``cuda-sm80`` and ``cuda-sm90`` targets: NVIDIA A100 / H100 with 2:4 sparse tensor cores.

The machines that build sparsecc have no GPU, so these targets are built and inspected here and
run where a GPU is:

* sparse layers are 2:4, packed for the sparse tensor cores
  (:mod:`sparsecc.targets.tensor_core_2_4`) and computed by sparsecc's ``mma.sp`` kernel
  (:mod:`sparsecc.targets.kernels.tensor_core`) in fp16, fp32 accumulation; its arithmetic is
  checked on the CPU by :mod:`sparsecc.targets.tensor_core_model`;
* every other op goes through TVM's CUDA pipeline (legalization and dlight's GPU schedules, fp32);
* the model builds to ``model.so`` (host code with the CUDA module embedded, for the Relax VM).
  TVM 0.27 embeds the CUDA *source*, compiled on the GPU machine when the module loads (NVRTC,
  or nvcc: :func:`prepare_cuda_jit`). Beside it the build writes ``model.cu`` (that source) and
  ``model.<arch>.cubin``, the same source compiled here by nvcc, whose ptxas report and SASS
  (``HMMA.SP``) the build checks (:mod:`sparsecc.passes.lower_cuda`): what the GPU machine's
  compiler makes of the same source is not checked here;
* the cost model is a roofline of the GPU's published numbers (:mod:`sparsecc.targets.gpu_cost`),
  and a layer it predicts no faster as 2:4 stays dense with that reason in the plan.

``sparsecc run`` / ``sparsecc.load`` run the artifact only where torch sees a CUDA GPU; elsewhere
they say that a GPU is needed. ``benchmarks/gpu_check.py`` checks and times the kernels on one.
"""

from __future__ import annotations

import functools
from typing import Any

from . import gpu_cost
from .base import Capabilities, TargetRecord
from .registry import register

#: the GPU each architecture's cost model describes
GPU_OF_ARCH = {"sm_80": gpu_cost.GPUS["a100"], "sm_90": gpu_cost.GPUS["h100"]}


@functools.cache
def gpu_present() -> bool:
    """Whether torch sees a CUDA GPU of compute capability 8.0 or newer."""
    import torch

    return bool(torch.cuda.is_available()) and torch.cuda.get_device_capability(0)[0] >= 8


def prepare_cuda_jit() -> None:
    """Make sure TVM can compile CUDA source when a GPU module loads: TVM 0.27 ships the generated
    source in ``model.so`` and compiles it at load time, with NVRTC (the ``cuda-bindings`` package)
    by default. Where that package is missing and nvcc is installed, nvcc is used instead. The
    kernels use ``mma.sp::ordered_metadata``, which needs CUDA 12.5 or newer either way."""
    import importlib.util
    import os
    import shutil

    from sparsecc.errors import TargetError

    if os.environ.get("TVM_CUDA_COMPILE_MODE"):
        return
    try:
        nvrtc = importlib.util.find_spec("cuda.bindings") is not None
    except ModuleNotFoundError:  # no "cuda" namespace package at all
        nvrtc = False
    if nvrtc:
        return
    if shutil.which("nvcc"):
        os.environ["TVM_CUDA_COMPILE_MODE"] = "nvcc"
        return
    raise TargetError("TVM compiles the model's CUDA source when it loads, with NVRTC (pip install cuda-bindings, "
                      "or pip install -e '.[gpu]') or nvcc (TVM_CUDA_COMPILE_MODE=nvcc); this machine has neither. "
                      "Either needs CUDA 12.5 or newer (the kernels use mma.sp::ordered_metadata)")


@functools.cache
def capabilities() -> Capabilities:
    # The host side is one thread; vector_bits is the 16-byte load the kernels copy with. Caches:
    # A100's 40 MiB L2 as the last level (only blocking heuristics read these).
    return Capabilities(vector_bits=128, threads=1, l2_bytes=40 * 1024 * 1024, llc_bytes=40 * 1024 * 1024,
                        features=("mma.sp",))


class GpuCostModel:
    """The roofline of :mod:`sparsecc.targets.gpu_cost` for one GPU, with the plan's question:
    does 2:4 pay for this layer at this many tokens?"""

    def __init__(self, gpu: gpu_cost.Gpu):
        self.gpu = gpu

    def dense_reason(self, tokens: int, n_out: int, k: int) -> str | None:
        """Why a (n_out, k) linear over ``tokens`` rows stays dense on this GPU, or None."""
        if n_out % 32 or k % 32:
            return (f"{n_out}x{k}: the 2:4 tensor-core packing needs output channels and inputs that are "
                    "multiples of 32; kept dense")
        gain = gpu_cost.gain(self.gpu, tokens, n_out, k)
        if gain < gpu_cost.MIN_GAIN:
            return (f"2:4 predicted {gain:.2f}x on {self.gpu.name} at {tokens} tokens (below "
                    f"{gpu_cost.MIN_GAIN}x: at this size the kernel launch, idle SMs and metadata cost what "
                    "the halved weight saves); kept dense")
        return None

    # the search and the cost check ask this of a cost model; nothing is measured here
    def predict(self, m: int, packed: Any, shape: tuple[int, int] | None = None,
                weights: str = "float16") -> tuple[float, str]:
        n_out, k = packed.shape if packed is not None else shape
        seconds = gpu_cost.linear_seconds(self.gpu, m, n_out, k, packed is not None)
        return seconds, f"{self.gpu.name} roofline"


def _record(arch: str) -> TargetRecord:
    gpu = GPU_OF_ARCH[arch]

    def tvm_target() -> dict[str, Any]:
        return {"kind": "cuda", "arch": arch, "host": {"kind": "llvm"}}

    return TargetRecord(
        name=f"cuda-{arch.replace('_', '')}",
        summary=f"NVIDIA {gpu.name.split()[0]} ({arch}): 2:4 layers on sparse tensor cores (mma.sp, fp16 in, "
                "fp32 accumulate); built and inspected here, runs where a GPU is",
        patterns=("2:4",),
        default_pattern="2:4",
        capabilities=capabilities,
        tvm_target=tvm_target,
        runner="cuda",
        runs_here=gpu_present(),
        cost_model=lambda: GpuCostModel(gpu),
        model_lowering="sparsecc.passes.lower_cuda",
        needs=("an NVIDIA GPU of compute capability 8.0 or newer with its driver (torch sees none here), and "
               "CUDA 12.5 or newer to compile the shipped kernels at load (NVRTC from pip install cuda-bindings, "
               "or nvcc); copy the artifact folder to such a machine and run it there, or check it with "
               "`python benchmarks/gpu_check.py --artifact DIR`"),
        notes=(
            "model.so (host code with the CUDA module embedded, Relax VM) plus model.cu and a cubin built "
            "by nvcc whose SASS is checked for HMMA.SP",
            f"cost model: roofline of {gpu.name} ({gpu.dense_tflops:g} / {gpu.sparse_tflops:g} TFLOP/s dense / "
            f"2:4, {gpu.hbm_tbs:g} TB/s); layers it predicts below {gpu_cost.MIN_GAIN}x stay dense",
            "needs nvcc (CUDA 12 or newer) to build the cubin; nvdisasm (pip install nvidia-cuda-nvdisasm) "
            "to inspect it",
        ),
    )


CUDA_SM80 = register(_record("sm_80"))
CUDA_SM90 = register(_record("sm_90"))

