"""The ``wasm-simd`` target: WebAssembly (wasm32) with 128-bit SIMD (simd128), run under wasmtime.

Kernels are TVM-built wasm objects linked with a small runtime shim into self-contained modules
(:mod:`sparsecc.targets.wasm_toolchain`) and run from Python through wasmtime's linear memory
(:mod:`sparsecc.targets.runners.wasm`). One thread: wasm threads need shared memory and a host
that spawns workers, which a plain module has not.

Whole models compile to a static program (:mod:`sparsecc.targets.static_program`): every kernel
and a generated C driver (static memory plan, weights embedded) linked into one ``model.wasm``
that imports nothing, plus ``model.js``, a loader for Node and browsers
(:func:`sparsecc.targets.wasm_toolchain.link_model`). ``sparsecc run`` / ``sparsecc.load`` run
it in wasmtime. The cost model is the table ``sparsecc tune --target wasm-simd`` measured in
wasmtime on this host, and a roofline where nothing was measured (:func:`cost_model`).
"""

from __future__ import annotations

import functools
from typing import Any

from . import wasm_toolchain
from .base import Capabilities, TargetRecord
from .registry import register


@functools.cache
def capabilities() -> Capabilities:
    # 128-bit vectors: 4 f32 lanes. Engines run wasm on the host CPU, whose caches apply; these
    # are typical desktop sizes, used only by the kernels' blocking heuristics.
    return Capabilities(vector_bits=128, threads=1, l2_bytes=1024 * 1024, llc_bytes=16 * 1024 * 1024,
                        features=("simd128",))


def machine() -> dict[str, Any]:
    """What a wasm cost table must have been measured on to apply: this host's CPU, in wasmtime."""
    from importlib.metadata import version

    from . import x86

    return {"target": "wasm-simd", "mcpu": x86.host_cpu(), "engine": f"wasmtime {version('wasmtime')}",
            "vector_bits": 128, "threads": 1}


def cost_table_path():
    """``$SPARSECC_WASM_COST_TABLE`` when set, else a file per host CPU and wasmtime version under
    the sparsecc cache (``cost-table-wasm-<cpu>-wasmtime<version>-128b-t1.json``): another engine
    version compiles other code, so its measurements go to a table of their own."""
    import os
    import pathlib
    from importlib.metadata import version

    from . import x86
    from .tuning import default_table_path

    override = os.environ.get("SPARSECC_WASM_COST_TABLE")
    if override:
        return pathlib.Path(override)
    return default_table_path(f"wasm-{x86.host_cpu()}-wasmtime{version('wasmtime')}", capabilities())


def cost_model():
    """Kernel times of wasm code in wasmtime on this host: the table ``sparsecc tune --target
    wasm-simd`` measured, and where nothing was measured a roofline of one core running 4-lane
    vectors with a separate multiply and add (simd128 has no fused multiply-add): 4 lanes x 2
    flops per cycle, 10 GB/s."""
    from . import x86
    from .tuning import CostModel, CostTable, Roofline

    caps = capabilities()
    roofline = Roofline(gflops_per_thread=4 * 2 * x86.cpu_ghz(), bandwidth_gbs=10.0)
    path = cost_table_path()
    table = CostTable.load(path, machine()) if path.is_file() else None
    return CostModel(caps, roofline, table, table_path=path, machine=machine())


def tvm_target() -> dict[str, Any]:
    """TVM 0.27 target dict for wasm32 with simd128."""
    return wasm_toolchain.tvm_target(("+simd128",))


WASM_SIMD = register(TargetRecord(
    name="wasm-simd",
    summary="WebAssembly wasm32 + simd128 (4 f32 lanes, 1 thread); model.wasm + model.js, run under wasmtime",
    patterns=("unstructured", "block16x1", "block8x1", "block4x1", "block2x1", "block4x4", "2:4"),
    default_pattern="block16x1",
    # the plan search's default set: one of each family, blocks of 16 and 4 rows
    search_patterns=("unstructured", "block16x1", "block4x1", "2:4"),
    capabilities=capabilities,
    tvm_target=tvm_target,
    runner="wasm",
    runs_here=wasm_toolchain.available(),
    cost_model=cost_model,
    link_model=wasm_toolchain.link_model,
    notes=(
        "whole models build to one self-contained model.wasm (no imports) plus model.js for Node and "
        "browsers; one thread",
        "cost model: the table `sparsecc tune --target wasm-simd` measured in wasmtime, a roofline elsewhere",
        "needs clang, wasm-ld (lld), wasi-libc and the wasmtime Python package to build and run",
    ),
))
