"""pack: rewrite pruned linear and convolution layers into sparsecc sparse ops.

Each planned-sparse layer's weight is packed into its pattern's format (CSR, BSR, N:M values +
positions); the ``linear`` / ``conv2d`` node becomes a ``sparsecc.sparse_linear_*`` call on
2-D activations (reshapes and permutes are inserted around it; a k x k, strided or padded
convolution reads its windows as rows through ``sparsecc.im2col_rows``), the packed arrays become buffers
and the dense weight leaves the program. The packed program still runs in PyTorch through the ops'
reference kernels, so its output is checked against the masked-dense program.

The rewrite happens on the unlifted module and the result is exported again, so the packed
program is an ordinary ExportedProgram (saveable, importable into TVM).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np
import torch
from sparsecc import ops
from sparsecc.pass_manager import Pass, PassContext, PassResult, register_pass
from sparsecc.program import Layer, Program, SparsityInfo, attribute_owner
from sparsecc.sparsity import Packed, PackedBSR, PackedNM, packed_nbytes, parse_pattern, plan_violation

aten = torch.ops.aten


def buffer_name(layer_name: str, array: str) -> str:
    """Name of the buffer holding packed array ``array`` (e.g. "indptr") of a layer."""
    return "sparsecc_" + re.sub(r"[^0-9A-Za-z_]", "_", layer_name) + "_" + array


def _sparse_call(graph: torch.fx.Graph, x2d: torch.fx.Node, packed: Packed, getters: dict[str, torch.fx.Node],
                 bias: torch.fx.Node | None) -> torch.fx.Node:
    if isinstance(packed, PackedNM):
        return graph.call_function(torch.ops.sparsecc.sparse_linear_nm.default,
                                   (x2d, getters["values"], getters["positions"], packed.m, bias))
    op = (torch.ops.sparsecc.sparse_linear_bsr.default if isinstance(packed, PackedBSR)
          else torch.ops.sparsecc.sparse_linear_csr.default)
    return graph.call_function(op, (x2d, getters["indptr"], getters["indices"], getters["data"], bias))


def _rewrite(gm: torch.fx.GraphModule, node: torch.fx.Node, layer: Layer, packed: Packed,
             layer_name: str) -> list[str]:
    """Replace ``node`` (linear or conv of groups 1) with the sparse op; returns the new buffer names."""
    graph = gm.graph
    x = node.args[0]
    x_shape = tuple(x.meta["val"].shape) if "val" in x.meta else None
    out_shape = tuple(node.meta["val"].shape)
    n_out = layer.matrix_shape[0]
    bias_node = node.args[2] if len(node.args) > 2 and isinstance(node.args[2], torch.fx.Node) else None
    names = []
    with graph.inserting_before(node):
        getters = {}
        for key, array in packed.arrays().items():
            name = buffer_name(layer_name, key)
            gm.register_buffer(name, torch.from_numpy(np.ascontiguousarray(array)).clone())
            getters[key] = graph.get_attr(name)
            names.append(name)
        if layer.kind == "linear":
            k = layer.matrix_shape[1]
            x2d = x if x_shape is not None and len(x_shape) == 2 else graph.call_function(
                aten.reshape.default, (x, [-1, k]))
            y2d = _sparse_call(graph, x2d, packed, getters, bias_node)
            y = y2d if len(out_shape) == 2 else graph.call_function(aten.reshape.default, (y2d, list(out_shape)))
        else:  # conv: NCHW -> (N*OH*OW, C*kh*kw) rows -> sparse -> NCHW
            b, _, h, w = out_shape
            if layer.is_pointwise_conv:
                # a 1x1 window is the pixel's channels: a permute, no copy of windows
                nhwc = graph.call_function(aten.permute.default, (x, [0, 2, 3, 1]))
                x2d = graph.call_function(aten.reshape.default, (nhwc, [-1, layer.matrix_shape[1]]))
            else:
                conv = layer.conv
                x2d = graph.call_function(torch.ops.sparsecc.im2col_rows.default, (
                    x, list(layer.weight_shape[2:]), list(conv["stride"]), list(conv["padding"]),
                    list(conv["dilation"])))
            y2d = _sparse_call(graph, x2d, packed, getters, bias_node)
            y4 = graph.call_function(aten.reshape.default, (y2d, [b, h, w, n_out]))
            y = graph.call_function(aten.permute.default, (y4, [0, 3, 1, 2]))
    node.replace_all_uses_with(y)
    graph.erase_node(node)
    return names


@register_pass
@dataclass(frozen=True)
class Pack(Pass):
    """Rewrite pruned layers into sparse ops holding packed weights."""

    name = "pack"
    summary = "rewrite pruned linear/conv layers into sparsecc sparse ops with packed weights"
    numerics = "exact"

    def run(self, program: Program, ctx: PassContext) -> PassResult:
        if program.plan is None or not program.plan.sparse_layers():
            return PassResult(program, changed=False, counters={"layers_packed": 0})
        gm = program.exported.module()
        by_weight = {layer.weight: layer for layer in program.layers()}
        planned = {lp.name: lp for lp in program.plan.sparse_layers()}
        # Nodes of the unlifted module reach weights through get_attr nodes named by FQN.
        diagnostics = []
        sparsity = dict(program.sparsity)
        packed_count = dense_bytes = packed_bytes_total = 0
        for node in list(gm.graph.nodes):
            if node.op != "call_function" or node.target not in (aten.linear.default, aten.conv2d.default):
                continue
            weight_arg = node.args[1]
            if not isinstance(weight_arg, torch.fx.Node) or weight_arg.op != "get_attr":
                continue
            layer = by_weight.get(weight_arg.target)
            if layer is None or layer.name not in planned:
                continue
            lp = planned[layer.name]
            pattern = parse_pattern(lp.pattern)
            owner, leaf = attribute_owner(gm, layer.weight)
            weight = getattr(owner, leaf).detach()
            matrix = weight.reshape(weight.shape[0], -1).float().numpy()
            if plan_violation(pattern, torch.from_numpy(matrix != 0), lp.mask_sparsity()) is not None:
                diagnostics.append(self.diag(
                    "warning", f"weight is not pruned to {lp.pattern} at {lp.sparsity:g}; kept dense "
                    "(run a prune pass before pack)", layer.name))
                continue
            packed = pattern.pack(matrix)
            names = _rewrite(gm, node, layer, packed, layer.name)
            if not weight_arg.users:
                gm.graph.erase_node(weight_arg)
                delattr(owner, leaf)
            nbytes = packed_nbytes(packed)
            sparsity[layer.name] = SparsityInfo(
                pattern=pattern.name, sparsity=1.0 - float((matrix != 0).sum()) / matrix.size,
                made_by=self.name, packed_format=packed.format, packed_bytes=nbytes,
                dense_bytes=matrix.size * 4, nnz=int((matrix != 0).sum()), buffers=tuple(names))
            packed_count += 1
            dense_bytes += matrix.size * 4
            packed_bytes_total += nbytes
        if not packed_count:
            return PassResult(program, changed=False, counters={"layers_packed": 0}, diagnostics=diagnostics)
        gm.graph.lint()
        gm.recompile()
        exported = torch.export.export(gm, program.example_inputs, strict=False)
        new = Program(exported, program.example_inputs, stage="packed", plan=program.plan, sparsity=sparsity)
        return PassResult(new, changed=True,
                          counters={"layers_packed": packed_count, "dense_bytes": dense_bytes,
                                    "packed_bytes": packed_bytes_total},
                          diagnostics=diagnostics)


__all__ = ["Pack", "buffer_name", "ops"]
