"""Program: a thin facade over ``torch.export.ExportedProgram`` plus sparsity facts.

The exported program is the IR: it prints, executes and imports into TVM. Weights are reached
through the graph signature. Each prunable layer (a ``linear`` or ``conv2d`` whose weight is a
parameter) is found from the graph and named after its parameter (``fc1.weight`` -> ``fc1``).
Sparsity facts live in one typed record per layer (``SparsityInfo``), mirrored into
``node.meta["sparsecc"]`` of the node that computes the layer, so they survive re-exports.
"""

from __future__ import annotations

import copy
import io
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch.export import ExportedProgram

from .plan import Plan

META_KEY = "sparsecc"

_LINEAR = torch.ops.aten.linear.default
_CONV2D = torch.ops.aten.conv2d.default


@dataclass(frozen=True)
class SparsityInfo:
    """Sparsity facts of one layer: the pattern its weight obeys and how it is stored."""

    pattern: str
    sparsity: float  # measured fraction of zero weights
    made_by: str  # the pass that produced the current state
    packed_format: str | None = None  # "csr" | "bsr" | "nm" once packed
    packed_bytes: int | None = None
    dense_bytes: int | None = None
    nnz: int | None = None
    buffers: tuple[str, ...] = ()  # names of the packed buffers in the program

    def describe(self) -> str:
        text = f"{self.pattern} {self.sparsity * 100:.1f}%"
        if self.packed_format:
            text += f" {self.packed_format} nnz={self.nnz} packed={self.packed_bytes}B dense={self.dense_bytes}B"
        return text


@dataclass(frozen=True)
class Layer:
    """A prunable layer found in the graph."""

    name: str  # module path, e.g. "encoder.layer.0.attention.self.query"
    kind: str  # "linear" | "conv2d"
    node: str  # fx node name computing it
    weight: str  # parameter FQN
    bias: str | None
    weight_shape: tuple[int, ...]
    conv: dict[str, Any] = field(default_factory=dict)  # stride/padding/dilation/groups for conv2d

    @property
    def matrix_shape(self) -> tuple[int, int]:
        """Weight as the (N, K) matrix a sparse kernel sees."""
        n = self.weight_shape[0]
        k = 1
        for d in self.weight_shape[1:]:
            k *= d
        return (n, k)

    @property
    def is_pointwise_conv(self) -> bool:
        return (self.kind == "conv2d" and tuple(self.weight_shape[2:]) == (1, 1)
                and self.conv.get("groups", 1) == 1 and tuple(self.conv.get("stride", (1, 1))) == (1, 1)
                and tuple(self.conv.get("padding", (0, 0))) == (0, 0))


def flatten_outputs(out: Any) -> list[torch.Tensor]:
    if isinstance(out, torch.Tensor):
        return [out]
    if isinstance(out, (list, tuple)):
        return [t for o in out for t in flatten_outputs(o)]
    if isinstance(out, dict):
        return [t for v in out.values() for t in flatten_outputs(v)]
    return []


def attribute_owner(module: torch.nn.Module, dotted: str) -> tuple[torch.nn.Module, str]:
    """(the submodule holding ``dotted``, its last name): where a parameter or buffer named by its
    fully qualified name lives, so it can be read, replaced or re-registered."""
    path, _, name = dotted.rpartition(".")
    return (module.get_submodule(path) if path else module), name


def _pair(value: Any, default: int) -> tuple[int, int]:
    if value is None:
        return (default, default)
    if isinstance(value, int):
        return (value, value)
    seq = list(value)
    return (int(seq[0]), int(seq[-1])) if seq else (default, default)


class Program:
    """An exported program at some stage of the pipeline, plus what sparsecc knows about it."""

    def __init__(
        self,
        exported: ExportedProgram,
        example_inputs: Sequence[Any],
        *,
        stage: str = "captured",
        plan: Plan | None = None,
        sparsity: dict[str, SparsityInfo] | None = None,
    ) -> None:
        self.exported = exported
        self.example_inputs = tuple(example_inputs)
        self.stage = stage
        self.plan = plan
        self.sparsity: dict[str, SparsityInfo] = dict(sparsity or {})
        # Products of the lower and build passes (set by them; not torch objects).
        self.lowered: Any = None
        self.compiled: Any = None
        self._module: torch.nn.Module | None = None
        self._nodes: dict[str, torch.fx.Node] = {}
        self.attach_meta()

    # -- graph access --------------------------------------------------------------------------

    @property
    def graph(self) -> torch.fx.Graph:
        return self.exported.graph

    @property
    def state(self) -> dict[str, torch.Tensor]:
        return self.exported.state_dict

    def node(self, name: str) -> torch.fx.Node | None:
        """The graph's node called ``name`` (a map built once and rebuilt when the graph changed
        under it: asking per layer stays linear in the graph)."""
        found = self._nodes.get(name)
        if found is None or found.graph is not self.graph or getattr(found, "_erased", False):
            self._nodes = {n.name: n for n in self.graph.nodes}
            found = self._nodes.get(name)
        return found

    def placeholder_targets(self) -> dict[str, str]:
        """Placeholder node name -> parameter/buffer/constant FQN."""
        sig = self.exported.graph_signature
        mapping: dict[str, str] = {}
        mapping.update(sig.inputs_to_parameters)
        mapping.update(sig.inputs_to_buffers)
        mapping.update(getattr(sig, "inputs_to_lifted_tensor_constants", {}) or {})
        return mapping

    def tensor(self, fqn: str) -> torch.Tensor:
        if fqn in self.exported.state_dict:
            return self.exported.state_dict[fqn]
        return self.exported.constants[fqn]

    def layers(self) -> list[Layer]:
        """Every ``linear`` / ``conv2d`` whose weight is a parameter, in graph order."""
        targets = self.placeholder_targets()
        found: list[Layer] = []
        for node in self.graph.nodes:
            if node.op != "call_function" or node.target not in (_LINEAR, _CONV2D):
                continue
            weight_node = node.args[1]
            if not isinstance(weight_node, torch.fx.Node) or weight_node.name not in targets:
                continue
            weight = targets[weight_node.name]
            bias_arg = node.args[2] if len(node.args) > 2 else node.kwargs.get("bias")
            bias = targets.get(bias_arg.name) if isinstance(bias_arg, torch.fx.Node) else None
            name = weight[: -len(".weight")] if weight.endswith(".weight") else weight
            conv: dict[str, Any] = {}
            kind = "linear"
            if node.target is _CONV2D:
                kind = "conv2d"
                args = list(node.args) + [None] * (7 - len(node.args))
                conv = {
                    "stride": _pair(args[3] if args[3] is not None else node.kwargs.get("stride"), 1),
                    "padding": _pair(args[4] if args[4] is not None else node.kwargs.get("padding"), 0),
                    "dilation": _pair(args[5] if args[5] is not None else node.kwargs.get("dilation"), 1),
                    "groups": int(args[6] if args[6] is not None else node.kwargs.get("groups", 1)),
                }
            found.append(Layer(name, kind, node.name, weight, bias,
                               tuple(self.tensor(weight).shape), conv))
        return found

    def layer(self, name: str) -> Layer:
        for layer in self.layers():
            if layer.name == name:
                return layer
        raise KeyError(name)

    # -- sparsity metadata ---------------------------------------------------------------------

    def set_sparsity(self, layer: str, info: SparsityInfo) -> None:
        self.sparsity[layer] = info
        self.attach_meta()

    def layer_nodes(self) -> dict[str, str]:
        """fx node name -> layer name, for dense layers and for sparse ops on packed buffers."""
        found = {layer.node: layer.name for layer in self.layers()}
        targets = self.placeholder_targets()
        buffer_owner = {buf: name for name, info in self.sparsity.items() for buf in info.buffers}
        for node in self.graph.nodes:
            if node.op != "call_function":
                continue
            for arg in node.args:
                if isinstance(arg, torch.fx.Node) and targets.get(arg.name) in buffer_owner:
                    found[node.name] = buffer_owner[targets[arg.name]]
                    break
        return found

    def attach_meta(self) -> None:
        """Mirror ``self.sparsity`` into ``node.meta["sparsecc"]`` of each layer's node."""
        owners = self.layer_nodes()
        for node in self.graph.nodes:
            node.meta.pop(META_KEY, None)
            layer = owners.get(node.name)
            if layer is not None and layer in self.sparsity:
                node.meta[META_KEY] = self.sparsity[layer]

    # -- execution -----------------------------------------------------------------------------

    @property
    def runs_in_torch(self) -> bool:
        return True

    def module(self) -> torch.nn.Module:
        if self._module is None:
            self._module = self.exported.module()
        return self._module

    def invalidate(self) -> None:
        """Forget the cached runnable module after weights or the graph changed."""
        self._module = None

    @torch.no_grad()
    def run(self, *inputs: Any) -> Any:
        return self.module()(*inputs)

    def run_flat(self, *inputs: Any) -> list[torch.Tensor]:
        return flatten_outputs(self.run(*inputs))

    # -- copies and checks ---------------------------------------------------------------------

    def clone(self, *, stage: str | None = None) -> Program:
        """A deep copy (graph and weights) that passes may change freely."""
        buffer = io.BytesIO()
        torch.export.save(self.exported, buffer)
        buffer.seek(0)
        exported = torch.export.load(buffer)
        other = Program(exported, self.example_inputs, stage=stage or self.stage,
                        plan=copy.deepcopy(self.plan), sparsity=self.sparsity)
        return other

    def with_exported(self, exported: ExportedProgram, *, stage: str) -> Program:
        """Same facts, new exported program (after a graph rewrite)."""
        return Program(exported, self.example_inputs, stage=stage, plan=self.plan, sparsity=self.sparsity)

    def verify(self) -> list[str]:
        """Invariants every pass must keep; returns the problems found (empty when sound)."""
        from .sparsity import parse_pattern, plan_violation

        problems: list[str] = []
        try:
            self.graph.lint()
        except Exception as exc:  # noqa: BLE001 - lint raises plain exceptions
            problems.append(f"graph does not lint: {exc}")
        layers = {layer.name: layer for layer in self.layers()}
        for name, info in self.sparsity.items():
            if info.packed_format is None:
                if name not in layers:
                    problems.append(f"layer {name} has sparsity facts but is not in the graph")
                    continue
                weight = self.tensor(layers[name].weight).detach()
                matrix = weight.reshape(weight.shape[0], -1)
                pattern = parse_pattern(info.pattern)
                planned = self.plan.layers[name].mask_sparsity() if self.plan and name in self.plan.layers else None
                violation = plan_violation(pattern, matrix != 0, planned) if planned is not None else None
                if violation is not None:
                    problems.append(f"layer {name}: {violation}")
            else:
                missing = [b for b in info.buffers if b not in self.state and b not in self.exported.constants]
                if missing:
                    problems.append(f"layer {name}: packed buffers missing from the program: {missing}")
                if name in layers:
                    problems.append(f"layer {name} is packed but its dense {layers[name].kind} is still there")
        return problems

    def summary_counts(self) -> dict[str, int]:
        counts = {"nodes": 0, "sparse_layers": 0, "dense_layers": len(self.layers())}
        for node in self.graph.nodes:
            counts["nodes"] += 1
            if META_KEY in node.meta and node.meta[META_KEY].packed_format:
                counts["sparse_layers"] += 1
        return counts

    def __repr__(self) -> str:
        return f"Program(stage={self.stage!r}, layers={len(self.layers())}, sparse={len(self.sparsity)})"
