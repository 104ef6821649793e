"""Lowering and building whole models for the GPU targets (``cuda-sm80``, ``cuda-sm90``).

The GPU's kernel library differs from the CPU one: each 2:4 layer (``sparsecc::sparse_linear_nm``
with 2 of 4) becomes a ``call_tir`` of the ``mma.sp`` kernel
(:func:`sparsecc.targets.kernels.tensor_core.tensor_core_linear`) on the weight packed for the
sparse tensor cores in fp16 (:func:`sparsecc.targets.tensor_core_2_4.pack_2_4`; x is cast to fp16
on the way in, the output is fp32: an activation beyond fp16's +-65504 becomes inf, so a model with
such activations should store its 2:4 layers as bf16, ``lower{sparse_weights=bfloat16}``);
everything else is imported by TVM's frontend as it is and goes through TVM's CUDA pipeline
(legalization, dlight GPU schedules) in fp32.

``build`` compiles the module for the Relax VM (``model.so``, the CUDA module embedded) and writes
the generated CUDA source beside it (``model.cu``). Where nvcc is installed it also compiles that
source to ``model.<arch>.cubin`` and refuses a build whose sparse kernels lack ``HMMA.SP`` in the
SASS or spill registers, so what would run on the GPU is checked on a machine without one.
"""

from __future__ import annotations

import json
import pathlib
from typing import Any

import numpy as np
import torch
from sparsecc.sparsity import PackedNM
from sparsecc.targets.base import TargetRecord

from .lower import KernelRecord, LoweringError, LoweringResult, _ProgramTensors, _static_shape

#: fp16's largest finite value: a weight beyond it cannot be packed for the tensor cores
_FP16_MAX = 65504.0


def lower_to_relax(ep: torch.export.ExportedProgram, target: TargetRecord, dense_weights: str = "float32",
                   sparse_weights: str = "float32") -> LoweringResult:
    """Relax module of ``ep`` with the 2:4 layers on sparsecc's tensor-core kernel, in fp16
    (``sparse_weights="bfloat16"``: bf16 weights and x). Dense layers run TVM's fp32 GPU kernels,
    so ``dense_weights="bfloat16"`` is refused rather than ignored."""
    if dense_weights != "float32":
        raise LoweringError(f"{target.name}: dense layers run TVM's fp32 GPU kernels, so bf16 dense weights are not "
                            "available; store only the 2:4 layers as bf16 with lower{sparse_weights=bfloat16}")
    dtype = "bfloat16" if sparse_weights == "bfloat16" else "float16"
    torch_dtype = torch.bfloat16 if dtype == "bfloat16" else torch.float16
    from sparsecc.targets.kernels import BF16_MARKER, FP16_MARKER, SCHEDULE_ATTR
    from sparsecc.targets.kernels.tensor_core import tensor_core_linear
    from sparsecc.targets.tensor_core_2_4 import pack_2_4
    from tvm import relax
    from tvm.relax.frontend.torch import from_exported_program

    ep = ep.run_decompositions(torch.export.default_decompositions())
    tensors = _ProgramTensors(ep)
    records: list[KernelRecord] = []
    kernels: dict[tuple[int, int, int, bool], tuple[Any, Any]] = {}

    def sparse_2_4(node: Any, importer: Any) -> Any:
        owner = f"node {node.name} ({node.target})"
        x = importer.env[node.args[0]]
        shape = _static_shape(x, owner)
        if len(shape) != 2:
            raise LoweringError(f"{owner}: expected a 2-D input, got {shape}")
        tokens, k = shape
        values = tensors.require(node.args[1], "values", owner).astype(np.float32)
        positions = tensors.require(node.args[2], "positions", owner).astype(np.uint8)
        group = int(node.args[3])
        keep = values.shape[1] // (k // group)
        if (keep, group) != (2, 4):
            raise LoweringError(f"{owner}: {target.name} runs 2:4 on its tensor cores, not {keep}:{group}; "
                                "plan this layer 2:4 or dense")
        dense = PackedNM((values.shape[0], k), keep, group, values, positions).to_dense()
        if dtype == "float16" and np.abs(dense).max(initial=0.0) > _FP16_MAX:
            raise LoweringError(f"{owner}: a weight exceeds fp16's range ({_FP16_MAX:g}); the tensor cores take "
                                "fp16 weights, so keep this layer dense")
        n_out = dense.shape[0]
        packed_values, metadata = pack_2_4(torch.from_numpy(dense).to(torch_dtype))
        bias_node = node.args[4] if len(node.args) > 4 else None
        bias = None if bias_node is None else tensors.require(bias_node, "bias", owner).astype(np.float32)
        bb = importer.block_builder
        key = (tokens, n_out, k, bias is not None)
        if key not in kernels:  # layers of one shape share one kernel
            func = tensor_core_linear(tokens, n_out, k, bias is not None, "kernel", dtype=dtype)
            name = f"sparse_2_4_{node.name}"
            kernels[key] = (func, bb.add_func(func.with_attr("global_symbol", name), name))
        func, gv = kernels[key]
        name = gv.name_hint
        x16 = bb.emit(relax.op.astype(x, dtype))
        # numpy has no bf16: the constant is built from the bits and given the 16-bit type
        args = [x16, _const_16bit(packed_values, dtype), relax.const(metadata.numpy(), "int16")]
        if bias is not None:
            args.append(relax.const(bias, "float32"))
        out = bb.emit(relax.call_tir(gv, args, out_ty=relax.TensorType([tokens, n_out], "float32")))
        records.append(KernelRecord(node.name, str(node.target), "nm", name,
                                    str(func.attrs[SCHEDULE_ATTR]) + (FP16_MARKER if dtype == "float16"
                                                                      else BF16_MARKER),
                                    (tokens, k), (n_out, k), int(np.count_nonzero(dense)),
                                    note=f"{dtype} weights and x, fp32 accumulation",
                                    const_bytes=packed_values.numel() * 2 + metadata.numel() * 2))
        return out

    convert_map = {"sparse_linear_nm.default": sparse_2_4}
    try:
        mod = from_exported_program(ep, custom_convert_map=convert_map, run_ep_decomposition=False)
    except AssertionError as exc:
        raise LoweringError(f"TVM's importer rejected the program: {exc}") from exc
    for node in ep.graph.nodes:
        op = getattr(node.target, "__name__", str(node.target))
        if node.op == "call_function" and op not in convert_map:
            records.append(KernelRecord(node.name, op, "generic", "(legalized)", "dlight GPU schedule at build"))
    return LoweringResult(mod, records)


def _const_16bit(values: torch.Tensor, dtype: str) -> Any:
    """A Relax constant of a float16 / bfloat16 tensor (numpy has no bfloat16: ml_dtypes', which
    TVM reads, stands in for it)."""
    import ml_dtypes
    from tvm import relax

    bits = values.detach().cpu().contiguous().view(torch.int16).numpy()
    return relax.const(bits.view(np.float16 if dtype == "float16" else ml_dtypes.bfloat16))


def _modules(module: Any) -> list[Any]:
    """``module`` and every module it imports, depth first."""
    found = [module]
    for imported in module.imports:
        found.extend(_modules(imported))
    return found


def build(mod: Any, target: TargetRecord, out_path: pathlib.Path, records: list[KernelRecord] | None = None
          ) -> pathlib.Path:  # noqa: ARG001 - every op's record was written by lower_to_relax
    """``model.so`` for the Relax VM on the GPU, with ``model.cu`` beside it and, where nvcc is
    installed, ``model.<arch>.cubin`` and ``model.resources.json`` (ptxas registers and spills,
    ``HMMA.SP`` count per kernel), checked."""
    import tvm
    from sparsecc.targets import cuda_toolchain as ct
    from sparsecc.targets.kernels._common import SCHEDULE_ATTR

    tvm_target = tvm.target.Target(target.tvm_target())
    sparse_kernels = [gv.name_hint for gv, f in mod.functions.items()
                      if isinstance(f, tvm.tirx.PrimFunc) and f.attrs is not None and SCHEDULE_ATTR in f.attrs]
    ex = tvm.compile(mod, target=tvm_target)
    out_path = pathlib.Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    ex.export_library(str(out_path))
    source = "\n".join(m.inspect_source("cuda") for m in _modules(ex.mod) if m.kind == "cuda")
    (out_path.parent / "model.cu").write_text(source)
    arch = tvm_target.attrs["arch"]
    if not ct.missing() and source:
        cubin = ct.compile_cubin(source, str(arch), out_path.parent, name="model")
        by_kernel = ct.sass_by_kernel(ct.sass(cubin))
        report = {k.name: {"registers": k.registers, "spill_stores": k.spill_stores, "spill_loads": k.spill_loads,
                           "hmma_sp": by_kernel.get(k.name, "").count("HMMA.SP")} for k in cubin.kernels}
        (out_path.parent / "model.resources.json").write_text(json.dumps(report, indent=1, sort_keys=True))
        for name in sparse_kernels:
            entry = report.get(f"{name}_kernel") or report.get(name)
            if entry is None or entry["hmma_sp"] == 0 or entry["spill_stores"] or entry["spill_loads"]:
                raise LoweringError(f"sparse kernel {name}: expected HMMA.SP and no spills in its {arch} SASS, "
                                    f"got {entry}; this is a kernel bug, please report it")
    return out_path
