"""The CUDA toolchain the GPU targets build with, checked without a GPU: nvcc compiles to cubin for
sm_80 and sm_90, ptxas' register and spill report is read per kernel, and nvdisasm's SASS shows
the sparse tensor-core instruction a 2:4 kernel must contain."""

from __future__ import annotations

import pytest
from sparsecc.errors import TargetError
from sparsecc.targets import cuda_toolchain as ct
from target_cases import require

# Two kernels: one issuing a 2:4 sparse mma (inline PTX, m16n8k16, f16 in, f32 accumulate), one
# a plain dense loop, so the checks below can tell them apart.
SOURCE = r"""
extern "C" __global__ void sparse_tile(const unsigned* a, const unsigned* b, const unsigned* meta, float* d) {
  unsigned t = threadIdx.x;
  float c0 = 0, c1 = 0, c2 = 0, c3 = 0;
  asm volatile("mma.sp::ordered_metadata.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 "
               "{%0,%1,%2,%3}, {%4,%5}, {%6,%7}, {%0,%1,%2,%3}, %8, 0x0;\n"
               : "+f"(c0), "+f"(c1), "+f"(c2), "+f"(c3)
               : "r"(a[2 * t]), "r"(a[2 * t + 1]), "r"(b[2 * t]), "r"(b[2 * t + 1]), "r"(meta[t]));
  d[4 * t] = c0; d[4 * t + 1] = c1; d[4 * t + 2] = c2; d[4 * t + 3] = c3;
}
extern "C" __global__ void dense_axpy(const float* x, float* y, float a, int n) {
  int i = blockIdx.x * blockDim.x + threadIdx.x;
  if (i < n) y[i] += a * x[i];
}
"""


@pytest.fixture(autouse=True)
def _tools() -> None:
    require(ct.missing(), "the CUDA toolchain (nvcc, nvdisasm)")


@pytest.mark.parametrize("arch", ct.ARCHS)
def test_cubin_resources_and_sass(tmp_path, arch: str) -> None:
    cubin = ct.compile_cubin(SOURCE, arch, tmp_path)
    assert cubin.path.is_file() and cubin.path.name == f"kernels.{arch}.cubin"
    by_name = {k.name: k for k in cubin.kernels}
    assert set(by_name) == {"sparse_tile", "dense_axpy"}
    assert all(0 < k.registers <= 255 and k.spill_stores == 0 and k.spill_loads == 0 for k in cubin.kernels)
    code = ct.sass_by_kernel(ct.sass(cubin))
    assert set(code) == {"sparse_tile", "dense_axpy"}
    assert "HMMA.SP" in code["sparse_tile"] and "HMMA" not in code["dense_axpy"]


def test_errors_name_the_problem(tmp_path) -> None:
    with pytest.raises(TargetError, match="sm_75"):
        ct.compile_cubin(SOURCE, "sm_75", tmp_path)
    with pytest.raises(TargetError, match="nvcc failed"):
        ct.compile_cubin("this is not CUDA", "sm_80", tmp_path)
    with pytest.raises(TargetError, match="nvdisasm failed"):
        (tmp_path / "junk.cubin").write_bytes(b"not an ELF file")
        ct.sass(tmp_path / "junk.cubin")
