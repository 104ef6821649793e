"""Lowering and building: a packed ``torch.export`` program -> Relax IRModule -> host library.

``lower_to_relax`` imports the exported program with TVM's Relax frontend, turning each sparsecc
sparse op, each dense ``linear``, each 2-D convolution (a direct kernel on the dense GEMM's packed weight
panels, or a direct grouped one) and each batched matmul of activations (``bmm`` / ``mm``: attention) into a
``call_tir`` of sparsecc's own scheduled kernels (the packed arrays and pre-laid-out dense weights
become Relax constants, read from the program's state dict at import time). Everything else goes
through TVM's default legalization.

``build`` swaps exp / erf / tanh for TVM's vectorizable polynomial forms, legalizes the rest,
gives every TIR function that is not one of ours a generic CPU schedule (no function is compiled
unscheduled), then runs only the dataflow-lowering and
finalization passes (running the full default pipeline would legalize again) and exports a
shared library the host runner loads. For targets where the Relax VM cannot run (``wasm-simd``,
``arm-neon``: the record's ``link_model``) it instead builds a static program from the same
scheduled module (``sparsecc.targets.static_program``).
"""

from __future__ import annotations

import math
import pathlib
import re
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from sparsecc.errors import SparseccError
from sparsecc.sparsity import PackedBSR, PackedCSR, PackedNM
from sparsecc.targets.base import Capabilities, TargetRecord


class LoweringError(SparseccError):
    """The exported program cannot be lowered (dynamic shapes, unsupported dtypes, ...)."""


@dataclass
class KernelRecord:
    """What happened to one node (or, after ``build``, one TIR function)."""

    node: str
    op: str
    format: str  # "csr" | "bsr" | "nm" | "dense" | "generic"
    kernel: str  # TIR function name
    schedule: str  # which schedule it got
    x_shape: tuple[int, ...] = ()
    weight_shape: tuple[int, ...] = ()
    nnz: int | None = None
    note: str = ""
    const_bytes: int | None = None  # bytes of the weight arrays the kernel reads (as the library stores them)


@dataclass
class LoweringResult:
    mod: Any  # tvm.IRModule
    records: list[KernelRecord] = field(default_factory=list)

    def summary(self) -> str:
        lines = []
        for r in self.records:
            extra = f" nnz={r.nnz}" if r.nnz is not None else ""
            lines.append(f"{r.node:<28} {r.format:<8} {r.kernel:<36} {r.schedule}{extra} {r.note}".rstrip())
        return "\n".join(lines)


# Ops that only move or view data: no compute worth a record.
_VIEW_OPS = {
    "view", "reshape", "_unsafe_view", "flatten", "squeeze", "unsqueeze", "permute", "transpose", "t",
    "expand", "contiguous", "clone", "alias", "detach", "getitem", "slice", "select", "to", "_to_copy",
    "lift_fresh_copy", "dropout",
}


#: appended to a kernel's schedule description when the cost table chose it
MEASURED_NOTE = " (measured best)"

#: the note of a layer whose bf16-stored values were asked for but that keeps fp32 values,
#: because the target's cost table timed its bf16 kernel slower (the lower pass reports it)
KEPT_FP32_NOTE = "bf16 values measured slower than fp32 for this shape; kept fp32"


def _kernel_name(prefix: str, node_name: str) -> str:
    return re.sub(r"\W", "_", f"{prefix}_{node_name}")


class _ProgramTensors:
    """Placeholder name -> tensor for the exported program's parameters, buffers and constants."""

    def __init__(self, ep: torch.export.ExportedProgram):
        self._by_arg: dict[str, torch.Tensor] = {}
        for spec in ep.graph_signature.input_specs:
            target = spec.target
            if target is None:
                continue
            if target in ep.state_dict:
                self._by_arg[spec.arg.name] = ep.state_dict[target]
            elif target in ep.constants:
                value = ep.constants[target]
                if isinstance(value, torch.Tensor):
                    self._by_arg[spec.arg.name] = value

    def get(self, node: Any) -> torch.Tensor | None:
        name = getattr(node, "name", None)
        return self._by_arg.get(name) if name is not None else None

    def require(self, node: Any, what: str, owner: str) -> np.ndarray:
        value = self.get(node)
        if value is None:
            raise LoweringError(
                f"{owner}: its {what} is computed in the graph, not a stored buffer; sparsecc's sparse "
                "kernels need the packed arrays at compile time (keep them as module buffers)")
        return value.detach().cpu().contiguous().numpy()


def _static_shape(expr: Any, owner: str) -> tuple[int, ...]:
    shape = expr.ty.shape
    try:
        return tuple(int(d) for d in shape)
    except (TypeError, ValueError):
        raise LoweringError(
            f"{owner}: input shape {shape} is not static; sparsecc compiles for the exported example "
            "shapes (export without dynamic_shapes, or compile once per input size)") from None


def lower_to_relax(ep: torch.export.ExportedProgram, target: TargetRecord,
                   dense_weights: str = "float32", sparse_weights: str = "float32") -> LoweringResult:
    """Import ``ep`` into Relax with sparsecc's kernels for sparse and dense linear layers
    (``dense_weights="bfloat16"``: the dense linears' weights stored as bf16, fp32 arithmetic;
    ``sparse_weights="bfloat16"``: the sparse kernels' packed values stored as bf16, indices
    unchanged, fp32 arithmetic).

    A layer asked to store bf16 values keeps fp32 ones when the target's cost table measured its
    bf16 kernel slower than its fp32 one (both problems measured; its record's note then says
    :data:`KEPT_FP32_NOTE`). Where either is unmeasured the roofline predicts bf16 no slower (it
    streams fewer bytes), so bf16 is kept.
    """
    import dataclasses
    import importlib

    if target.model_lowering is not None:
        return importlib.import_module(target.model_lowering).lower_to_relax(ep, target, dense_weights, sparse_weights)

    import tvm_ffi
    from sparsecc.targets.kernels import SCHEDULE_ATTR, dense_args, dense_linear, sparse_kernel
    from sparsecc.targets.kernels.batch_matmul import batch_matmul
    from sparsecc.targets.kernels.conv import conv2d_panels, conv_geometry, grouped_conv2d, im2col_rows_kernel
    from sparsecc.targets.kernels.dense import DenseSchedule, dense_params
    from sparsecc.targets.tuning import default_schedule
    from tvm import relax
    from tvm.relax.frontend.torch import from_exported_program

    target.require_model_build()
    caps: Capabilities = target.capabilities()
    # Decompose to core ATen ourselves, but keep ``linear`` whole so dense layers reach our
    # converter with their weight (TVM's own decomposition turns it into permute + addmm).
    table = torch.export.default_decompositions()
    table.pop(torch.ops.aten.linear.default, None)
    ep = ep.run_decompositions(table)
    tensors = _ProgramTensors(ep)
    records: list[KernelRecord] = []
    # The target's measured cost table picks the schedule of every kernel it has timed; the
    # kernels' own heuristics choose the rest.
    cost_model = target.cost_model() if target.cost_model is not None else None

    def measured_schedule(m: int, packed: Any, shape: tuple[int, int] | None = None,
                          weights: str = "float32") -> Any:
        return cost_model.schedule(m, packed, shape, weights) if cost_model is not None else None

    def value_storage(m: int, packed: Any, shape: tuple[int, int] | None, wanted: str) -> tuple[str, str]:
        """(storage, note): ``wanted`` unless the cost model predicts the bf16 kernel slower than the
        fp32 one from the same kind of evidence (both measured, or both roofline)."""
        if wanted == "float32" or cost_model is None:
            return wanted, ""
        bf16_s, bf16_how = cost_model.predict(m, packed, shape, "bfloat16")
        fp32_s, fp32_how = cost_model.predict(m, packed, shape, "float32")
        if bf16_how == fp32_how and bf16_s > fp32_s:
            return "float32", f"{KEPT_FP32_NOTE} ({bf16_how}: {bf16_s * 1e6:.1f} us against {fp32_s * 1e6:.1f} us)"
        return wanted, ""

    def schedule_for(m: int, packed: Any, shape: tuple[int, int] | None, weights: str) -> tuple[Any, bool]:
        """(schedule or None for the kernel's heuristic, whether the cost table chose it)."""
        measured = measured_schedule(m, packed, shape, weights)
        if measured is not None or weights == "float32":
            return measured, measured is not None
        if packed is None:
            return dataclasses.replace(DenseSchedule(*dense_params(m, shape, caps)), weights=weights), False
        return default_schedule(m, packed, caps, weights=weights), False

    def bias_arg(node: Any, bias_node: Any, n_out: int) -> Any:
        if bias_node is None:
            return None
        value = tensors.get(bias_node)
        if value is not None:
            return relax.const(value.detach().cpu().float().contiguous().numpy().reshape(n_out), "float32")
        return importer_env[0].env[bias_node]

    importer_env: list[Any] = []

    # Kernels are built for one concrete problem (shapes, nonzero counts), so the layers of a
    # transformer (every layer's q projection has the same shape and, at a uniform sparsity, the
    # same nonzero count) get structurally identical kernels: each is compiled once and shared.
    # MiniLM's 36 linears need 3 kernels per format instead of 36, which is most of its build time.
    shared: dict[int, list[tuple[Any, Any]]] = {}

    def add_kernel(importer: Any, node: Any, func: Any, prefix: str) -> Any:
        key = tvm_ffi.structural_hash(func)
        for known, gv in shared.get(key, []):
            if tvm_ffi.structural_equal(known, func):
                return gv
        name = _kernel_name(prefix, node.name)
        gv = importer.block_builder.add_func(func.with_attr("global_symbol", name), name)
        shared.setdefault(key, []).append((func, gv))
        return gv

    def emit_kernel(importer: Any, node: Any, func: Any, x: Any, arrays: list[np.ndarray], bias: Any,
                    m: int, n_out: int, prefix: str) -> tuple[Any, str, str]:
        gv = add_kernel(importer, node, func, prefix)
        args = [x] + [relax.const(a) for a in arrays] + ([bias] if bias is not None else [])
        out = importer.block_builder.emit(relax.call_tir(gv, args, out_ty=relax.TensorType([m, n_out], "float32")))
        return out, gv.name_hint, str(func.attrs[SCHEDULE_ATTR])

    def emit_call(importer: Any, node: Any, func: Any, args: list[Any], out_shape: tuple[int, ...],
                  prefix: str) -> tuple[Any, str, str]:
        gv = add_kernel(importer, node, func, prefix)
        out = importer.block_builder.emit(relax.call_tir(gv, args, out_ty=relax.TensorType(list(out_shape), "float32")))
        return out, gv.name_hint, str(func.attrs[SCHEDULE_ATTR])

    def check_x(x: Any, owner: str) -> tuple[int, ...]:
        shape = _static_shape(x, owner)
        if str(x.ty.dtype) != "float32":
            raise LoweringError(f"{owner}: input dtype {x.ty.dtype} is not float32; sparsecc kernels are f32")
        return shape

    def sparse_converter(fmt: str):
        def convert(node: Any, importer: Any) -> Any:
            if not importer_env:
                importer_env.append(importer)
            owner = f"node {node.name} ({node.target})"
            x = importer.env[node.args[0]]
            m, k = check_x(x, owner)
            if fmt == "nm":
                values = tensors.require(node.args[1], "values", owner).astype(np.float32)
                positions = tensors.require(node.args[2], "positions", owner).astype(np.uint8)
                group = int(node.args[3])
                keep = values.shape[1] // (k // group)
                packed = PackedNM((values.shape[0], k), keep, group, values, positions)
                bias_node = node.args[4] if len(node.args) > 4 else None
            else:
                indptr = tensors.require(node.args[1], "indptr", owner).astype(np.int32)
                indices = tensors.require(node.args[2], "indices", owner).astype(np.int32)
                data = tensors.require(node.args[3], "data", owner).astype(np.float32)
                bias_node = node.args[4] if len(node.args) > 4 else None
                if fmt == "csr":
                    packed = PackedCSR((indptr.shape[0] - 1, k), indptr, indices, data)
                else:
                    r, c = int(data.shape[1]), int(data.shape[2])
                    packed = PackedBSR(((indptr.shape[0] - 1) * r, k), (r, c), indptr, indices, data)
            n_out = packed.shape[0]
            bias = bias_arg(node, bias_node, n_out)
            weights, note = value_storage(m, packed, None, sparse_weights)
            chosen, measured = schedule_for(m, packed, None, weights)
            func, arrays = sparse_kernel(m, packed, bias is not None, caps, "kernel", schedule=chosen)
            out, kname, schedule = emit_kernel(importer, node, func, x, arrays, bias, m, n_out,
                                               f"sparse_{fmt}")
            schedule += MEASURED_NOTE if measured else ""
            records.append(KernelRecord(node.name, str(node.target), fmt, kname, schedule, (m, k),
                                        packed.shape, packed.nnz, note=note,
                                        const_bytes=sum(a.nbytes for a in arrays)))
            return out

        return convert

    def dense_converter(node: Any, importer: Any) -> Any:
        if not importer_env:
            importer_env.append(importer)
        owner = f"node {node.name} (linear)"
        args = importer.retrieve_args(node)
        x, weight_expr = args[0], args[1]
        bias_node = node.args[2] if len(node.args) > 2 else None
        weight_t = tensors.get(node.args[1])
        shape = check_x(x, owner)
        if weight_t is None or weight_t.dtype != torch.float32 or len(shape) < 1:
            # A weight computed in the graph: TVM's linear, scheduled generically at build time.
            bias = args[2] if len(args) > 2 else None
            records.append(KernelRecord(node.name, "linear", "generic", "(legalized linear)",
                                        "generic", shape, tuple(weight_expr.ty.shape),
                                        note="weight is not a stored parameter"))
            return importer.block_builder.emit(relax.op.linear(x, weight_expr, bias, "float32"))
        weight = weight_t.detach().cpu().contiguous().numpy()
        n_out, k = weight.shape
        m = math.prod(shape[:-1])
        bb = importer.block_builder
        x2 = x if len(shape) == 2 else bb.emit(relax.op.reshape(x, (m, k)))
        bias = bias_arg(node, bias_node, n_out)
        weights, note = value_storage(m, None, (n_out, k), dense_weights)
        chosen, measured = schedule_for(m, None, (n_out, k), weights)
        func = dense_linear(m, (n_out, k), bias is not None, caps, "kernel", schedule=chosen)
        arrays = dense_args(weight, m, caps, schedule=chosen)
        out, kname, schedule = emit_kernel(importer, node, func, x2, arrays, bias, m, n_out, "dense")
        schedule += MEASURED_NOTE if measured else ""
        if len(shape) != 2:
            out = bb.emit(relax.op.reshape(out, (*shape[:-1], n_out)))
        records.append(KernelRecord(node.name, "linear", "dense", kname, schedule, shape, (n_out, k),
                                    int(np.count_nonzero(weight)), note=note,
                                    const_bytes=sum(a.nbytes for a in arrays)))
        return out

    def conv_converter(node: Any, importer: Any) -> Any:
        if not importer_env:
            importer_env.append(importer)
        owner = f"node {node.name} (convolution)"
        x = importer.env[node.args[0]]
        weight_t = tensors.get(node.args[1])
        stride, padding, dilation, transposed, _, groups = node.args[3:9]
        if (transposed or weight_t is None or weight_t.dtype != torch.float32 or weight_t.dim() != 4
                or len(x.ty.shape) != 4 or str(x.ty.dtype) != "float32"):
            # Transposed, 1-D/3-D or computed-weight convolutions: TVM's converter, scheduled
            # generically at build time.
            records.append(KernelRecord(node.name, "convolution", "generic", "(legalized conv)", "generic",
                                        note="not a 2-D float32 convolution with a stored weight"))
            return importer._convolution(node)
        shape = check_x(x, owner)
        weight = weight_t.detach().cpu().contiguous().numpy()
        n_out = weight.shape[0]
        bias = bias_arg(node, node.args[2], n_out)
        _, _, _, (oh, ow) = conv_geometry(shape, weight.shape, stride, padding, dilation)
        batch = shape[0]
        bb = importer.block_builder
        if int(groups) != 1:
            func = grouped_conv2d(shape, weight.shape, int(groups), stride, padding, dilation, bias is not None,
                                  caps, "kernel")
            args = [x, relax.const(weight)] + ([bias] if bias is not None else [])
            out, kname, schedule = emit_call(importer, node, func, args, (batch, n_out, oh, ow), "conv_grouped")
            records.append(KernelRecord(node.name, "convolution", "dense", kname, schedule, shape, weight.shape,
                                        int(np.count_nonzero(weight)), note=f"groups={groups}"))
            return out
        m, k = batch * oh * ow, int(np.prod(weight.shape[1:]))
        func = conv2d_panels(shape, weight.shape, stride, padding, dilation, bias is not None, caps, "kernel")
        y, kname, schedule = emit_kernel(importer, node, func, x, dense_args(weight.reshape(n_out, k), m, caps),
                                         bias, m, n_out, "conv")
        # (B*OH*OW, N) rows are NHWC; the transpose to NCHW fuses with what follows (bias is in the kernel).
        y = bb.emit(relax.op.reshape(y, (batch, oh, ow, n_out)))
        out = bb.emit(relax.op.permute_dims(y, [0, 3, 1, 2]))
        records.append(KernelRecord(node.name, "convolution", "dense", kname,
                                    f"{schedule}; NHWC->NCHW permute (fused, generic)",
                                    shape, weight.shape, int(np.count_nonzero(weight))))
        return out

    def im2col_converter(node: Any, importer: Any) -> Any:
        if not importer_env:
            importer_env.append(importer)
        x = importer.env[node.args[0]]
        shape = check_x(x, f"node {node.name} (im2col rows of a sparse convolution)")
        kernel, stride, padding, dilation = (tuple(int(v) for v in a) for a in node.args[1:5])
        func = im2col_rows_kernel(shape, kernel, stride, padding, dilation, caps, "kernel")
        out_shape = tuple(int(d) for d in node.meta["val"].shape)
        out, kname, schedule = emit_call(importer, node, func, [x], out_shape, "im2col")
        records.append(KernelRecord(node.name, "im2col", "dense", kname, schedule, shape,
                                    note="input windows of a sparse convolution, as rows"))
        return out

    def bmm_converter(node: Any, importer: Any) -> Any:
        if not importer_env:
            importer_env.append(importer)
        op = node.target.__name__.split(".")[0]
        owner = f"node {node.name} ({op})"
        a, b = importer.retrieve_args(node)[:2]
        a_shape, b_shape = check_x(a, owner), check_x(b, owner)
        squeeze = len(a_shape) == 2
        if squeeze:
            a = importer.block_builder.emit(relax.op.expand_dims(a, 0))
            b = importer.block_builder.emit(relax.op.expand_dims(b, 0))
            a_shape, b_shape = (1, *a_shape), (1, *b_shape)
        batch, m, k = a_shape
        n = b_shape[2]
        func = batch_matmul(batch, m, k, n, caps, "kernel")
        out, kname, schedule = emit_call(importer, node, func, [a, b], (batch, m, n), "bmm")
        if squeeze:
            out = importer.block_builder.emit(relax.op.squeeze(out, [0]))
        records.append(KernelRecord(node.name, op, "dense", kname, schedule, a_shape, b_shape))
        return out

    def gelu_converter(node: Any, importer: Any) -> Any:
        approximate = node.kwargs.get("approximate", node.args[1] if len(node.args) > 1 else "none")
        if approximate != "none":
            return importer._gelu(node)  # tanh form: TVM's converter
        # Spelled out with erf so that build's FastMathTransform turns it into TVM's vectorizable
        # polynomial fast_erf (max abs error 4e-7); R.nn.gelu legalizes to a scalar libm erff call
        # per element, which made gelu 30 % of MiniLM's time.
        x = importer.env[node.args[0]]
        bb = importer.block_builder
        half = relax.const(0.5, "float32")
        erf = bb.emit(relax.op.erf(bb.emit(relax.op.multiply(x, relax.const(math.sqrt(0.5), "float32")))))
        return bb.emit(relax.op.multiply(x, bb.emit(relax.op.add(half, bb.emit(relax.op.multiply(erf, half))))))

    convert_map = {
        "gelu.default": gelu_converter,
        "convolution.default": conv_converter,
        "bmm.default": bmm_converter,
        "mm.default": bmm_converter,
        "im2col_rows.default": im2col_converter,
        "sparse_linear_csr.default": sparse_converter("csr"),
        "sparse_linear_bsr.default": sparse_converter("bsr"),
        "sparse_linear_nm.default": sparse_converter("nm"),
        "linear.default": dense_converter,
    }
    try:
        mod = from_exported_program(ep, custom_convert_map=convert_map, run_ep_decomposition=False)
    except AssertionError as exc:
        raise LoweringError(f"TVM's importer rejected the program: {exc}") from exc

    for node in ep.graph.nodes:
        if node.op != "call_function":
            continue
        op = getattr(node.target, "__name__", str(node.target))
        base = op.split(".")[0]
        if op in convert_map or base in _VIEW_OPS:
            continue
        records.append(KernelRecord(node.name, op, "generic", "(legalized)", "generic CPU schedule at build"))
    return LoweringResult(mod, records)


# --------------------------------------------------------------------------------------------
# Generic schedules for the TIR functions TVM's legalization produces
# --------------------------------------------------------------------------------------------


def _loop_extent(sch: Any, loop: Any) -> int | None:
    extent = sch.get(loop).extent
    try:
        return int(extent)
    except (TypeError, ValueError):
        return None


def _schedule_block(sch: Any, block: Any, lanes: int, parallel: bool) -> list[str]:
    """Parallel outer spatial loops and a vectorized inner spatial loop for one block."""
    done: list[str] = []
    loops = sch.get_loops(block)
    if not loops:
        return done
    iters = sch.get(block).iter_vars
    kinds = [int(iv.iter_type) for iv in iters]  # 0: spatial, 2: reduction
    if len(kinds) != len(loops):
        return done
    spatial = [lp for lp, kind in zip(loops, kinds, strict=True) if kind == 0]
    reduce = [lp for lp, kind in zip(loops, kinds, strict=True) if kind != 0]
    if reduce and loops[: len(spatial)] != spatial:
        return done  # interleaved spatial/reduction loops: leave the nest alone
    inner = None
    if spatial:
        last = spatial[-1]
        extent = _loop_extent(sch, last)
        vector_ok = extent is not None and extent >= lanes and extent % lanes == 0
        if reduce and vector_ok:
            # Vectorize the last spatial axis only when it indexes the innermost dimension of the
            # output and of some input (matmul-like: x[i, k] * w[k, j]); otherwise moving it
            # inside the reduction turns contiguous reads into strided ones.
            block_stmt = sch.get(block)
            last_var = iters[len(spatial) - 1].var
            def _innermost(region: Any) -> bool:
                idx = region.region[-1].min
                return idx.same_as(last_var) if hasattr(idx, "same_as") else False
            vector_ok = _innermost(block_stmt.writes[0]) and any(_innermost(r) for r in block_stmt.reads)
        if vector_ok:
            outer_part, inner = sch.split(last, [None, lanes])
            if reduce:
                sch.reorder(*spatial[:-1], outer_part, *reduce, inner)
                sch.decompose_reduction(block, reduce[0])
                # The init block keeps its own copy of ``inner``; vectorize that too.
            spatial = [*spatial[:-1], outer_part]
            done.append(f"vectorize{lanes}")
    if parallel and spatial:
        fused = sch.fuse(*spatial) if len(spatial) > 1 else spatial[0]
        sch.parallel(fused)
        done.append("parallel")
    if inner is not None:
        sch.vectorize(inner)
    return done


def _schedule_rows(sch: Any, blocks: list[Any], lanes: int) -> Any | None:
    """Row-wise schedule for a chain of blocks that reduce over trailing axes (softmax, layer norm,
    normalisations): every block is computed inside the last block's loop over the leading axes,
    which runs in parallel, so a row's intermediates stay in L1 and each row is one task.

    Works on a copy of ``sch``; returns it, or None when the chain does not have that shape.
    """
    trial = sch.copy()
    try:
        blocks = trial.get_child_blocks(trial.get_sblock("root"))
        last = blocks[-1]
        loops = trial.get_loops(last)
        kinds = [int(iv.iter_type) for iv in trial.get(last).iter_vars]
        if len(loops) < 2 or len(kinds) != len(loops) or any(k != 0 for k in kinds):
            return None
        if not any(int(iv.iter_type) != 0 for b in blocks[:-1] for iv in trial.get(b).iter_vars):
            return None  # no reduction in the chain: the per-block schedule is as good
        rfs = _rfactor_row_reductions(trial, blocks[:-1], lanes)
        row = trial.fuse(*loops[:-1]) if len(loops) > 2 else loops[0]
        chain = trial.get_child_blocks(trial.get_sblock("root"))
        for block in reversed(chain[:-1]):
            trial.compute_at(block, row, preserve_unit_loops=True)
        trial.parallel(row)
        for rf in rfs:
            init = trial.decompose_reduction(rf, trial.get_loops(rf)[-2])
            trial.vectorize(trial.get_loops(init)[-1])
            # TVM will not vectorize a loop inside a reduction block; 16 unrolled independent
            # accumulators are what LLVM's SLP vectorizer turns into one vector add.
            trial.unroll(trial.get_loops(rf)[-1])
        for block in blocks:
            inner = trial.get_loops(block)[-1]
            kinds = [int(iv.iter_type) for iv in trial.get(block).iter_vars]
            extent = _loop_extent(trial, inner)
            if kinds and kinds[-1] == 0 and extent is not None and extent > 1:
                if extent > lanes and extent % lanes == 0:
                    inner = trial.split(inner, [None, lanes])[1]
                trial.vectorize(inner)
    except Exception:  # noqa: BLE001 - TVM raises ScheduleError subclasses: shape not as assumed
        return None
    return trial


def _rfactor_row_reductions(sch: Any, blocks: list[Any], lanes: int) -> list[Any]:
    """Split each single-axis row reduction (sum, max) over its innermost loop into ``lanes``
    partial results (rfactor) that can be accumulated with whole-vector operations; a serial float
    chain runs at one add per 4 cycles and LLVM may not reassociate it itself. Returns the rfactor
    blocks (the combining blocks keep their handles)."""
    rfs = []
    for block in blocks:
        kinds = [int(iv.iter_type) for iv in sch.get(block).iter_vars]
        if not kinds or kinds[-1] == 0 or kinds.count(2) != 1:
            continue
        inner = sch.get_loops(block)[-1]
        extent = _loop_extent(sch, inner)
        if extent is None or extent < 2 * lanes or extent % lanes:
            continue
        trial = sch.copy()
        try:
            lane = trial.split(trial.get_loops(block)[-1], [None, lanes])[1]
            trial.rfactor(lane, factor_axis=0)
        except Exception:  # noqa: BLE001 - a reducer rfactor does not recognise: stays serial
            continue
        lane = sch.split(inner, [None, lanes])[1]
        rfs.append(sch.rfactor(lane, factor_axis=0))
    return rfs


def generic_schedule(func: Any, caps: Capabilities) -> tuple[Any, str]:
    """Give an unscheduled TIR function a CPU schedule: inline elementwise producers; a chain
    of row reductions and their consumer (softmax, layer norm) gets the row schedule of
    :func:`_schedule_rows` (rows in parallel, rfactor'd reductions, vectorized elementwise parts);
    otherwise each remaining block runs its outer spatial loops in parallel and vectorizes the
    inner one."""
    from tvm import s_tir

    lanes = max(4, caps.vector_lanes_f32)
    sch = s_tir.Schedule(func)
    steps: list[str] = []
    try:
        blocks = sch.get_child_blocks(sch.get_sblock("root"))
    except Exception:  # noqa: BLE001 - a function without a root block: plain loop nest
        return func.with_attr("tirx.is_scheduled", True), "none (no blocks)"
    for block in blocks[:-1]:
        try:
            sch.compute_inline(block)
            steps.append("inline")
        except Exception:  # noqa: BLE001 - TVM raises ScheduleError subclasses; not inlinable is fine
            pass
    remaining = sch.get_child_blocks(sch.get_sblock("root"))
    if len(remaining) > 1:
        fused = _schedule_rows(sch, remaining, lanes)
        if fused is not None:
            sched = fused.mod["main"].with_attr("tirx.is_scheduled", True)
            return sched, "generic: " + ", ".join(dict.fromkeys([*steps, "rows fused+parallel", "vectorize"]))
    for i, block in enumerate(remaining):
        try:
            steps += _schedule_block(sch, block, lanes, parallel=True)
        except Exception as exc:  # noqa: BLE001
            steps.append(f"block{i}: kept serial ({type(exc).__name__})")
    sched = sch.mod["main"].with_attr("tirx.is_scheduled", True)
    return sched, "generic: " + (", ".join(dict.fromkeys(steps)) or "serial")


def schedule_module(mod: Any, target: TargetRecord) -> tuple[Any, list[KernelRecord]]:
    """Legalize ``mod`` and schedule every TIR function that is not already scheduled."""
    import tvm
    from tvm import relax, tirx

    tvm_target = tvm.target.Target(target.tvm_target())
    caps = target.capabilities()
    passes = [
        # exp / erf / tanh (softmax, gelu) as TVM's polynomial fast_* forms, which vectorize; libm
        # calls do not. Their errors (below 1e-6 relative) are far inside the 1e-4 the tests allow.
        relax.transform.FastMathTransform(),
        relax.transform.LegalizeOps(),
        relax.transform.AnnotateTIROpPattern(),
        relax.transform.FoldConstant(),
        relax.transform.FuseOps(),
        relax.transform.FuseTIR(),
        relax.transform.DeadCodeElimination(),
    ]
    with tvm_target:
        mod = tvm.transform.Sequential(passes)(mod)
    records: list[KernelRecord] = []
    for gv, func in list(mod.functions.items()):
        if not isinstance(func, tirx.PrimFunc):
            continue
        if func.attrs is not None and "tirx.is_scheduled" in func.attrs and func.attrs["tirx.is_scheduled"]:
            continue
        sched, desc = generic_schedule(func, caps)
        mod[gv] = sched
        records.append(KernelRecord(gv.name_hint, "tir", "generic", gv.name_hint, desc))
    return mod, records


def prepare_module(mod: Any, target: TargetRecord, records: list[KernelRecord] | None = None) -> Any:
    """A Relax module from :func:`lower_to_relax` after TVM's library dispatch and
    :func:`schedule_module`: every TIR function scheduled, ``main`` still a dataflow graph. Both
    the Relax VM build (:func:`compile_relax`) and the static-program build start from it.

    Generic-schedule records are appended to ``records`` when given.
    """
    import tvm
    from tvm.relax.backend.cpu_generic import pipeline as cpu

    target.require_model_build()
    tvm_target = tvm.target.Target(target.tvm_target())
    with tvm_target:
        mod = tvm.transform.Sequential(cpu.library_dispatch_passes(tvm_target))(mod)
    mod, generic = schedule_module(mod, target)
    if records is not None:
        records.extend(generic)
    return mod


def compile_relax(mod: Any, target: TargetRecord, records: list[KernelRecord] | None = None) -> Any:
    """Compile a Relax module from :func:`lower_to_relax` for ``target``'s Relax VM; returns the
    ``tvm.runtime.Executable`` (its ``.mod.inspect_source("asm")`` shows the generated code).

    Generic-schedule records are appended to ``records`` when given.
    """
    import tvm
    from tvm.relax.backend.cpu_generic import pipeline as cpu

    mod = prepare_module(mod, target, records)
    tvm_target = tvm.target.Target(target.tvm_target())

    @tvm.transform.module_pass(opt_level=0)
    def lower_scheduled(m: Any, _ctx: Any) -> Any:
        # Only dataflow lowering and finalization: legalizing again would replace nothing but
        # would re-run FuseOps over the scheduled functions.
        with tvm_target:
            return tvm.transform.Sequential(
                cpu.dataflow_lower_passes(tvm_target) + cpu.finalize_passes(tvm_target))(m)

    return tvm.compile(mod, target=tvm_target, relax_pipeline=lower_scheduled)


def build(mod: Any, target: TargetRecord, out_path: pathlib.Path,
          records: list[KernelRecord] | None = None) -> pathlib.Path:
    """Compile ``mod`` for ``target`` and return the file its runner loads.

    For a Relax VM target (no ``link_model`` on the record): :func:`compile_relax`, exported as
    the shared library ``out_path``. For a target whose code runs without the Relax VM
    (WebAssembly, static AArch64): a static program (see ``sparsecc.targets.static_program``)
    built into the folder ``out_path`` (its model files and ``model.json``); the runnable file in it
    is returned.
    """
    if target.model_lowering is not None:
        import importlib

        return importlib.import_module(target.model_lowering).build(mod, target, pathlib.Path(out_path), records)
    if target.link_model is not None:
        from sparsecc.targets.static_program import build_model

        return build_model(prepare_module(mod, target, records), target, pathlib.Path(out_path))
    ex = compile_relax(mod, target, records)
    out_path = pathlib.Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    ex.export_library(str(out_path))
    return out_path
