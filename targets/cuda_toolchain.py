"""Building CUDA kernels to cubin and reading what the GPU would run, on a machine without a GPU.

The GPU targets are built and inspected here and run only where a GPU is: ``nvcc`` compiles CUDA
source to a cubin for one architecture (``sm_80``, ``sm_90``) with ``-Xptxas -v``, whose report
gives each kernel's registers and spills, and ``nvdisasm`` (the PyPI package
``nvidia-cuda-nvdisasm``, or a CUDA toolkit's) lists the cubin's SASS, where a sparse tensor-core
kernel shows ``HMMA.SP``.

Tools looked up: ``nvcc`` on PATH or under ``$CUDA_HOME`` / ``/usr/local/cuda``; ``nvdisasm``
beside it or in the ``nvidia`` Python package (``nvidia/cu*/bin``).
"""

from __future__ import annotations

import os
import pathlib
import re
import subprocess
from dataclasses import dataclass

from sparsecc.errors import TargetError

from .kernel_runtime import which

ARCHS = ("sm_80", "sm_90")


class CudaToolchainMissing(TargetError):
    """nvcc or nvdisasm is not installed."""


@dataclass(frozen=True)
class KernelResources:
    """What ``ptxas -v`` reported for one kernel of a cubin."""

    name: str
    registers: int
    spill_stores: int
    spill_loads: int


@dataclass(frozen=True)
class Cubin:
    path: pathlib.Path
    arch: str
    kernels: tuple[KernelResources, ...]
    ptxas_log: str


def _nvcc() -> str | None:
    found = which("nvcc")
    if found:
        return found
    for root in (os.environ.get("CUDA_HOME"), "/usr/local/cuda"):
        if root and (pathlib.Path(root) / "bin" / "nvcc").is_file():
            return str(pathlib.Path(root) / "bin" / "nvcc")
    return None


def _nvdisasm() -> str | None:
    found = which("nvdisasm")
    if found:
        return found
    nvcc = _nvcc()
    if nvcc and (pathlib.Path(nvcc).parent / "nvdisasm").is_file():
        return str(pathlib.Path(nvcc).parent / "nvdisasm")
    try:
        import nvidia  # the namespace package of NVIDIA's PyPI wheels
    except ImportError:
        return None
    for base in nvidia.__path__:
        for candidate in sorted(pathlib.Path(base).glob("cu*/bin/nvdisasm")):
            return str(candidate)
    return None


def missing() -> list[str]:
    """The tools this machine lacks, named as a user installs them."""
    out = []
    if _nvcc() is None:
        out.append("nvcc (the CUDA toolkit)")
    if _nvdisasm() is None:
        out.append("nvdisasm (pip install nvidia-cuda-nvdisasm)")
    return out


def compile_cubin(source: str, arch: str, folder: str | os.PathLike[str], name: str = "kernels") -> Cubin:
    """Compile CUDA ``source`` to ``folder/<name>.<arch>.cubin`` with nvcc and parse ptxas' report."""
    if arch not in ARCHS:
        raise TargetError(f"CUDA architecture {arch!r}: choose one of {', '.join(ARCHS)}")
    nvcc = _nvcc()
    if nvcc is None:
        raise CudaToolchainMissing("nvcc is not installed (the CUDA toolkit); it compiles the GPU targets' kernels")
    folder = pathlib.Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    src = folder / f"{name}.cu"
    src.write_text(source)
    out = folder / f"{name}.{arch}.cubin"
    done = subprocess.run([nvcc, f"-arch={arch}", "--cubin", "-O3", "-Xptxas", "-v", "-o", str(out), str(src)],
                          capture_output=True, text=True)
    if done.returncode != 0:
        raise TargetError(f"nvcc failed for {arch} on {src}:\n{done.stderr.strip()}")
    return Cubin(out, arch, _resources(done.stderr), done.stderr)


def cuda_source(funcs: dict[str, object], arch: str) -> str:
    """The CUDA source TVM generates for scheduled TIR kernels (``{name: PrimFunc}``) for ``arch``;
    TVM keeps the source and leaves compiling it to :func:`compile_cubin`."""
    if arch not in ARCHS:
        raise TargetError(f"CUDA architecture {arch!r}: choose one of {', '.join(ARCHS)}")
    import tvm

    built = tvm.compile(tvm.IRModule(funcs), target={"kind": "cuda", "arch": arch})
    return built.mod.imports[0].inspect_source("cuda")


def _resources(log: str) -> tuple[KernelResources, ...]:
    """Per-kernel registers and spills from ``ptxas -v``'s report (its lines come in order: the
    kernel's name, its spills, its registers)."""
    kernels = []
    name, stores, loads = None, 0, 0
    for line in log.splitlines():
        if m := re.search(r"Compiling entry function '([^']+)'", line):
            name, stores, loads = m.group(1), 0, 0
        elif m := re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", line):
            stores, loads = int(m.group(1)), int(m.group(2))
        elif (m := re.search(r"Used (\d+) registers", line)) and name is not None:
            kernels.append(KernelResources(name, int(m.group(1)), stores, loads))
            name = None
    return tuple(kernels)


def sass(cubin: Cubin | str | os.PathLike[str]) -> str:
    """The SASS listing of a cubin (``nvdisasm``)."""
    tool = _nvdisasm()
    if tool is None:
        raise CudaToolchainMissing("nvdisasm is not installed: pip install nvidia-cuda-nvdisasm")
    path = cubin.path if isinstance(cubin, Cubin) else pathlib.Path(cubin)
    done = subprocess.run([tool, str(path)], capture_output=True, text=True)
    if done.returncode != 0:
        raise TargetError(f"nvdisasm failed on {path}: {done.stderr.strip()}")
    return done.stdout


def sass_by_kernel(listing: str) -> dict[str, str]:
    """A SASS listing (:func:`sass`) split into each kernel's code section, by kernel name."""
    kernels: dict[str, list[str]] = {}
    current: list[str] | None = None
    for line in listing.splitlines():
        if m := re.match(r"\s*\.section\s+\.text\.([A-Za-z_]\w*)", line):
            current = kernels.setdefault(m.group(1), [])
        elif re.match(r"\s*\.section\s", line):
            current = None
        elif current is not None:
            current.append(line)
    return {name: "\n".join(lines) for name, lines in kernels.items()}
