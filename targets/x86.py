"""The ``x86`` target: this host's x86-64 CPU (AVX2 or AVX-512), running code in-process.

Capabilities are probed lazily (first use): vector width from /proc/cpuinfo flags (falling back
to LLVM's view of the host CPU), threads from the process's CPU affinity or ``TVM_NUM_THREADS``.
"""

from __future__ import annotations

import functools
import os
from typing import Any

from .base import Capabilities, TargetRecord
from .registry import register


def _cpu_flags() -> set[str]:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def _threads() -> int:
    env = os.environ.get("TVM_NUM_THREADS")
    if env and env.isdigit() and int(env) > 0:
        return int(env)
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def _cache_bytes(level: int, default: int) -> int:
    # sysfs reports per-cache sizes such as "2048K"; index3 is the last-level cache on x86.
    path = f"/sys/devices/system/cpu/cpu0/cache/index{level}/size"
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read().strip()
    except OSError:
        return default
    scale = {"K": 1024, "M": 1024 * 1024}.get(text[-1:], 1)
    digits = text.rstrip("KM")
    return int(digits) * scale if digits.isdigit() else default


@functools.cache
def host_cpu() -> str:
    """LLVM's name for this CPU (e.g. ``rocketlake``, ``znver4``)."""
    import tvm

    return str(tvm.target.codegen.llvm_get_system_cpu())


@functools.cache
def capabilities() -> Capabilities:
    flags = _cpu_flags()
    if not flags:
        # No /proc/cpuinfo (not Linux): ask LLVM whether the host CPU name implies AVX-512.
        import tvm

        target = tvm.target.Target({"kind": "llvm", "mcpu": host_cpu()})
        flags = {str(f).lstrip("+") for f in target.attrs.get("mattr", [])}
        flags |= {"avx2"}
    if "avx512f" in flags:
        vector_bits = 512
    elif "avx2" in flags:
        vector_bits = 256
    else:
        vector_bits = 128
    keep = ("avx2", "fma", "avx512f", "avx512bw", "avx512vl", "avx512_vnni", "avx512_bf16", "amx_tile")
    return Capabilities(
        vector_bits=vector_bits,
        threads=_threads(),
        l2_bytes=_cache_bytes(2, 2 * 1024 * 1024),
        llc_bytes=_cache_bytes(3, 32 * 1024 * 1024),
        features=tuple(f for f in keep if f in flags),
    )


def cpu_ghz() -> float:
    """This host's clock in GHz, as /proc/cpuinfo reports it."""
    # The "cpu MHz" line of /proc/cpuinfo; 3 GHz when absent (a typical server core).
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("cpu MHz"):
                    return float(line.split(":", 1)[1]) / 1000
    except (OSError, ValueError):
        pass
    return 3.0


def cost_table_path():
    """Where this host's measured cost table lives (``sparsecc tune`` writes it):
    ``$SPARSECC_COST_TABLE`` when set, else a file per CPU model under the sparsecc cache."""
    import pathlib

    from .tuning import default_table_path

    override = os.environ.get("SPARSECC_COST_TABLE")
    return pathlib.Path(override) if override else default_table_path(host_cpu(), capabilities())


def machine() -> dict[str, Any]:
    """What a cost table must have been measured on to apply here."""
    caps = capabilities()
    return {"target": "x86", "mcpu": host_cpu(), "vector_bits": caps.vector_bits, "threads": caps.threads}


def cost_model():
    """Roofline of this CPU (2 FMA units of the probed vector width per core, ~10 GB/s of DRAM per
    core) refined by the measured cost table, when one exists."""
    from .tuning import CostModel, CostTable, Roofline

    caps = capabilities()
    roofline = Roofline(gflops_per_thread=caps.vector_lanes_f32 * 2 * 2 * cpu_ghz(), bandwidth_gbs=10.0 * caps.threads)
    path = cost_table_path()
    # Read on every call (a compile reads it once): `sparsecc tune` may have just rewritten it.
    table = CostTable.load(path, machine()) if path.is_file() else None
    return CostModel(caps, roofline, table, table_path=path, machine=machine())


def tvm_target() -> dict[str, Any]:
    """TVM 0.27 target dict (JSON-style; ``llvm -mcpu=`` strings are rejected)."""
    return {"kind": "llvm", "mcpu": host_cpu(), "num-cores": capabilities().threads}


X86 = register(TargetRecord(
    name="x86",
    summary="this host's x86-64 CPU (AVX2 / AVX-512), run in-process through TVM's Relax VM",
    patterns=("unstructured", "block16x1", "block8x1", "block4x1", "block2x1", "block32x1", "block16x2", "block8x2",
              "block4x4",
              "2:4", "4:8", "1:4", "2:8"),
    default_pattern="block16x1",
    # the plan search's default set: one of each family, blocks of 16 and 4 rows
    search_patterns=("unstructured", "block16x1", "block4x1", "2:4"),
    capabilities=capabilities,
    tvm_target=tvm_target,
    runner="host",
    runs_here=True,
    cost_model=cost_model,
    notes=(
        "block16x1 is fastest at batch 1 (one AVX-512 register per block column)",
        "unstructured (CSR) pays off at high sparsity with many rows of input (M >= 64)",
    ),
))
