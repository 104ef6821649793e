"""Channel groups: which channels of which tensors must be removed together.

Removing output channel ``c`` of a convolution is only sound if every tensor that carries that
channel loses it too: the batch norm after it, the activation, a residual ``add`` that mixes it
with another branch (and so that branch's producer), a depthwise convolution that keeps channels
apart, and finally the input columns of every layer that reads it. This module finds those
couplings on the exported graph.

Every dimension of every tensor in the graph is an *axis* (a node of a networkx graph, keyed by
``(fx node name, dim)``). Each op links the axes of its inputs and outputs that carry the same
channel index, with an offset where ``cat``, ``split`` or ``slice`` shifts it. A connected component
of axes is a *channel group*; its channels are the classes of elements that the links make equal
(with no offsets: channel ``i`` of every axis). Removing a class removes one index from every
axis in the group.

A group is *pinned* (never pruned) when any of its axes meets something whose coupling is not
known, or where removing a channel would change the function in a way no weight update can
undo: a program input or output, an op without a rule here, a reduction or a normalisation over
the channel (layer norm statistics, softmax, mean), a reshape that splits the channel into
several dims (attention heads) or merges it with others, a grouped convolution. The reason is
kept and reported.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import networkx as nx
import torch
from sparsecc.program import Program

Axis = tuple[str, int]  # (fx node name, dim)


@dataclass
class ParamAxis:
    """One dimension of a parameter, buffer or constant (FQN) that a group slices."""

    fqn: str
    dim: int


@dataclass
class Consumer:
    """A linear / convolution that reads a group's channels as input features (weight dim 1)."""

    node: str  # fx node name of the linear / conv2d
    weight: str  # weight FQN
    bias: str | None
    kind: str  # "linear" | "conv2d"


@dataclass
class ChannelGroup:
    """A set of axes that lose channels together, and the channel classes they share."""

    axes: list[Axis]
    size: int  # number of channel classes
    # class index -> [(axis, element index)] for every axis element in the class
    classes: list[list[tuple[Axis, int]]] = field(default_factory=list)
    params: dict[Axis, ParamAxis] = field(default_factory=dict)
    consumers: dict[Axis, Consumer] = field(default_factory=dict)  # keyed by the weight's dim-1 axis
    producers: list[str] = field(default_factory=list)  # layer names whose outputs the group is
    pinned: str | None = None

    @property
    def prunable(self) -> bool:
        return self.pinned is None and bool(self.consumers) and self.size > 1


def _shape(node: torch.fx.Node) -> tuple[int, ...] | None:
    value = node.meta.get("val")
    if isinstance(value, torch.Tensor):
        return tuple(int(d) for d in value.shape)
    return None


def _op_name(node: torch.fx.Node) -> str:
    name = getattr(node.target, "__name__", str(node.target))
    return name.split(".")[0]


#: ops whose output has the input's shape element by element (all dims pass through, broadcasting)
POINTWISE = {
    "add", "sub", "mul", "div", "rsub", "neg", "abs", "relu", "relu_", "hardtanh", "hardtanh_", "gelu",
    "silu", "silu_", "sigmoid", "tanh", "hardswish", "hardswish_", "hardsigmoid", "leaky_relu", "elu",
    "dropout", "clone", "contiguous", "alias", "_to_copy", "to", "type_as", "pow", "sqrt", "rsqrt", "exp",
    "clamp", "clamp_min", "clamp_max", "where", "maximum", "minimum", "detach", "lift_fresh_copy",
}
#: pooling ops: batch and channel pass through, spatial dims are not channels
POOLING = {"adaptive_avg_pool2d", "avg_pool2d", "max_pool2d", "adaptive_max_pool2d", "upsample_nearest2d",
           "upsample_bilinear2d"}
#: ops that reduce over the dims named by their second argument
REDUCTIONS = {"mean", "sum", "amax", "amin", "max", "min", "var", "std", "softmax", "_softmax", "log_softmax",
              "_log_softmax", "argmax", "norm", "logsumexp"}
#: ops without tensor results that the analysis can ignore
IGNORED = {"_assert_tensor_metadata", "_assert_scalar", "sym_size", "sym_constrain_range_for_size",
           "_assert_async"}


class ChannelGraph:
    """The axis graph of a program and the channel groups in it."""

    def __init__(self, program: Program) -> None:
        self.program = program
        self.graph = nx.Graph()
        self.pins: dict[Axis, str] = {}
        self.param_axes: dict[Axis, ParamAxis] = {}
        self.consumers: dict[Axis, Consumer] = {}
        self.producers: dict[Axis, str] = {}
        self.shapes: dict[str, tuple[int, ...]] = {}
        self.offset_edges = 0
        targets = program.placeholder_targets()
        user_inputs = set(program.exported.graph_signature.user_inputs)
        self._fqn = targets
        self.placeholder_fqns = targets  # placeholder name -> parameter / buffer / constant FQN
        for node in program.graph.nodes:
            shape = _shape(node)
            if shape is not None:
                self.shapes[node.name] = shape
                for d, size in enumerate(shape):
                    self.graph.add_node((node.name, d), size=size)
        for node in program.graph.nodes:
            shape = self.shapes.get(node.name)
            if node.op == "placeholder":
                if node.name in targets and shape is not None:
                    for d in range(len(shape)):
                        self.param_axes[(node.name, d)] = ParamAxis(targets[node.name], d)
                elif node.name in user_inputs or node.name not in targets:
                    self._pin_all(node, "a program input keeps its shape")
            elif node.op == "output":
                for arg in node.all_input_nodes:
                    self._pin_all(arg, "a program output keeps its shape")
            elif node.op == "call_function":
                self._visit(node)
        self.groups = self._groups()

    # -- linking ------------------------------------------------------------------------------

    def _axis(self, node: torch.fx.Node, dim: int) -> Axis | None:
        shape = self.shapes.get(node.name)
        if shape is None or not -len(shape) <= dim < len(shape):
            return None
        return (node.name, dim % len(shape))

    def link(self, a: torch.fx.Node, da: int, b: torch.fx.Node, db: int, off_a: int = 0, off_b: int = 0,
             length: int | None = None) -> None:
        """Element ``off_a + i`` of axis (a, da) is element ``off_b + i`` of axis (b, db)."""
        axis_a, axis_b = self._axis(a, da), self._axis(b, db)
        if axis_a is None or axis_b is None:
            return
        size_a = self.shapes[a.name][axis_a[1]]
        size_b = self.shapes[b.name][axis_b[1]]
        if length is None:
            if size_a != size_b:
                self.pin(axis_a, f"{a.name} and {b.name} disagree on the size of a shared axis")
                self.pin(axis_b, f"{a.name} and {b.name} disagree on the size of a shared axis")
                return
            length = size_a
        if size_a == 1 and size_b == 1:
            return
        if off_a or off_b or length != size_a or length != size_b:
            self.offset_edges += 1
        self.graph.add_edge(axis_a, axis_b)
        self.graph.edges[axis_a, axis_b].setdefault("maps", []).append(
            {axis_a: off_a, axis_b: off_b, "length": length})

    def link_blocks(self, coarse: torch.fx.Node, dc: int, fine: torch.fx.Node, df: int, block: int) -> None:
        """Element ``i`` of axis (coarse, dc) is elements ``i*block .. i*block+block-1`` of (fine, df):
        a head and the channels of its head dim, a channel and its flattened pixels."""
        axis_c, axis_f = self._axis(coarse, dc), self._axis(fine, df)
        if axis_c is None or axis_f is None:
            return
        if self.shapes[coarse.name][axis_c[1]] * block != self.shapes[fine.name][axis_f[1]]:
            self.pin(axis_c, f"{coarse.name} and {fine.name} disagree on the size of a shared axis")
            self.pin(axis_f, f"{coarse.name} and {fine.name} disagree on the size of a shared axis")
            return
        self.offset_edges += 1
        self.graph.add_edge(axis_c, axis_f)
        self.graph.edges[axis_c, axis_f].setdefault("maps", []).append(
            {"coarse": axis_c, "fine": axis_f, "block": block})

    def pin(self, axis: Axis | None, reason: str) -> None:
        if axis is not None:
            self.pins.setdefault(axis, reason)

    def _pin_all(self, node: torch.fx.Node, reason: str) -> None:
        for d in range(len(self.shapes.get(node.name, ()))):
            self.pin((node.name, d), reason)

    def _same_dims(self, a: torch.fx.Node, b: torch.fx.Node, skip: set[int] = frozenset()) -> None:
        """Link dims of equal rank one to one, except those in ``skip`` (right-aligned broadcast)."""
        sa, sb = self.shapes.get(a.name), self.shapes.get(b.name)
        if sa is None or sb is None:
            return
        for i in range(1, min(len(sa), len(sb)) + 1):
            da, db = len(sa) - i, len(sb) - i
            if db in skip or sa[da] != sb[db] or sa[da] == 1:
                continue
            self.link(a, da, b, db)

    # -- op rules -----------------------------------------------------------------------------

    def _visit(self, node: torch.fx.Node) -> None:
        op = _op_name(node)
        if op in IGNORED or node.name not in self.shapes and op not in ("split", "split_with_sizes", "getitem"):
            if op not in IGNORED and op != "getitem":
                self._unknown(node, op)
            return
        rule: Callable[[torch.fx.Node], None] | None = getattr(self, f"_rule_{op}", None)
        if rule is not None:
            rule(node)
        elif op in POINTWISE:
            for arg in node.all_input_nodes:
                self._same_dims(arg, node)
        elif op in POOLING:
            x = node.args[0]
            self.link(x, 0, node, 0)
            self.link(x, 1, node, 1)
        elif op in REDUCTIONS:
            self._reduction(node, op)
        else:
            self._unknown(node, op)

    def _unknown(self, node: torch.fx.Node, op: str) -> None:
        reason = f"op {op} ({node.name}) has no channel rule here, so its channels stay as they are"
        self._pin_all(node, reason)
        for arg in node.all_input_nodes:
            self._pin_all(arg, reason)

    def _reduction(self, node: torch.fx.Node, op: str) -> None:
        x = node.args[0]
        rank = len(self.shapes.get(x.name, ()))
        dims = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim")
        if dims is None or op in ("norm",) and not isinstance(dims, (list, tuple, int)):
            dims = list(range(rank))
        dims = [dims] if isinstance(dims, int) else list(dims)
        reduced = {d % rank for d in dims}
        for d in reduced:
            self.pin((x.name, d), f"{op} ({node.name}) combines the values along this axis")
        keepdim = (node.args[2] if len(node.args) > 2 else node.kwargs.get("keepdim", False)) or op in (
            "softmax", "_softmax", "log_softmax", "_log_softmax")
        out = 0
        for d in range(rank):
            if d in reduced and not keepdim:
                continue
            if d not in reduced:
                self.link(x, d, node, out)
            out += 1

    def _layer(self, node: torch.fx.Node, x: torch.fx.Node, weight: torch.fx.Node, bias, in_dim: int,
               out_dim: int, kind: str) -> None:
        self.link(node, out_dim, weight, 0)
        if isinstance(bias, torch.fx.Node):
            self.link(node, out_dim, bias, 0)
        if weight.name in self._fqn:
            fqn = self._fqn[weight.name]
            bias_fqn = self._fqn.get(bias.name) if isinstance(bias, torch.fx.Node) else None
            self.consumers[(weight.name, 1)] = Consumer(node.name, fqn, bias_fqn, kind)
            self.producers[(weight.name, 0)] = fqn[: -len(".weight")] if fqn.endswith(".weight") else fqn
        self.link(x, in_dim, weight, 1)

    def _rule_linear(self, node: torch.fx.Node) -> None:
        x, weight = node.args[0], node.args[1]
        bias = node.args[2] if len(node.args) > 2 else None
        self._layer(node, x, weight, bias, -1, -1, "linear")
        rank = len(self.shapes[node.name])
        for d in range(rank - 1):
            self.link(x, d, node, d)

    def _rule_conv2d(self, node: torch.fx.Node) -> None:
        x, weight = node.args[0], node.args[1]
        bias = node.args[2] if len(node.args) > 2 else None
        groups = int(node.args[6]) if len(node.args) > 6 else int(node.kwargs.get("groups", 1))
        channels_in, channels_out = self.shapes[x.name][1], self.shapes[node.name][1]
        self.link(x, 0, node, 0)
        if groups == 1:
            self._layer(node, x, weight, bias, 1, 1, "conv2d")
        elif groups == channels_in == channels_out:
            # depthwise: channel c of the output is computed from channel c of the input alone
            self.link(node, 1, weight, 0)
            if isinstance(bias, torch.fx.Node):
                self.link(node, 1, bias, 0)
            self.link(x, 1, node, 1)
        else:
            reason = f"grouped convolution {node.name} (groups={groups}) ties channels together in groups"
            self.pin((x.name, 1), reason)
            self.pin((node.name, 1), reason)
            self._pin_all(weight, reason)

    def _rule_batch_norm(self, node: torch.fx.Node) -> None:
        x = node.args[0]
        self._same_dims(x, node)
        for param in node.args[1:5]:
            if isinstance(param, torch.fx.Node):
                self.link(node, 1, param, 0)

    def _rule_layer_norm(self, node: torch.fx.Node) -> None:
        x, normalized = node.args[0], node.args[1]
        rank = len(self.shapes[x.name])
        self._same_dims(x, node)
        reason = f"layer norm {node.name} normalises over this axis: every channel changes the statistics"
        for d in range(rank - len(normalized), rank):
            self.pin((x.name, d), reason)
        for param in node.args[2:4]:
            if isinstance(param, torch.fx.Node):
                self.link(node, -1, param, 0)

    def _rule_group_norm(self, node: torch.fx.Node) -> None:
        self._same_dims(node.args[0], node)
        self.pin((node.args[0].name, 1), f"group norm {node.name} normalises over groups of channels")

    def _rule_embedding(self, node: torch.fx.Node) -> None:
        weight = node.args[0]
        self.link(node, -1, weight, 1)

    def _rule_flatten(self, node: torch.fx.Node) -> None:
        x = node.args[0]
        shape = self.shapes[x.name]
        rank = len(shape)
        start = (node.args[1] if len(node.args) > 1 else 0) % max(rank, 1)
        end = (node.args[2] if len(node.args) > 2 else -1) % max(rank, 1)
        for d in range(start):
            self.link(x, d, node, d)
        for d in range(end + 1, rank):
            self.link(x, d, node, d - (end - start))
        self._merge(x, list(range(start, end + 1)), node, start, "flatten")

    def _merge(self, x: torch.fx.Node, dims: list[int], out: torch.fx.Node, out_dim: int, op: str) -> None:
        """Input ``dims`` become output dim ``out_dim``: a link when only one of them is not 1."""
        shape = self.shapes[x.name]
        wide = [d for d in dims if shape[d] != 1]
        if len(wide) == 1:
            self.link(x, wide[0], out, out_dim)
        elif len(wide) > 1:
            self._blocks(x, wide, out, out_dim, f"{op} {out.name}")

    def _blocks(self, many: torch.fx.Node, dims: list[int], one: torch.fx.Node, one_dim: int, where: str) -> None:
        """``dims`` of ``many`` and ``one_dim`` of ``one`` hold the same elements in row-major order
        (a split into heads, or a merge): the outermost dim moves in blocks of the inner ones, which
        themselves stay whole (pinned), as removing one element of an inner dim would cut a strided
        set of channels."""
        shape = self.shapes[many.name]
        block = 1
        for d in dims[1:]:
            block *= shape[d]
        self.link_blocks(many, dims[0], one, one_dim, block)
        for d in dims[1:]:
            self.pin((many.name, d), f"{where} nests this axis inside another (e.g. the head dim); it stays whole")

    def _rule_view(self, node: torch.fx.Node) -> None:
        x = node.args[0]
        a, b = self.shapes[x.name], self.shapes[node.name]
        i = j = 0
        while i < len(a) or j < len(b):
            gi, gj = [i], [j]
            pa = a[i] if i < len(a) else 1
            pb = b[j] if j < len(b) else 1
            while pa != pb:
                if pa < pb and gi[-1] + 1 < len(a):
                    gi.append(gi[-1] + 1)
                    pa *= a[gi[-1]]
                elif gj[-1] + 1 < len(b):
                    gj.append(gj[-1] + 1)
                    pb *= b[gj[-1]]
                else:
                    break
            wide_a = [d for d in gi if d < len(a) and a[d] != 1]
            wide_b = [d for d in gj if d < len(b) and b[d] != 1]
            if len(wide_a) == 1 and len(wide_b) == 1:
                self.link(x, wide_a[0], node, wide_b[0])
            elif len(wide_a) == 1 and len(wide_b) > 1:
                self._blocks(node, wide_b, x, wide_a[0], f"reshape {node.name}")
            elif len(wide_b) == 1 and len(wide_a) > 1:
                self._blocks(x, wide_a, node, wide_b[0], f"reshape {node.name}")
            else:
                reason = f"reshape {node.name} splits or merges this axis (e.g. into attention heads)"
                for d in wide_a:
                    self.pin((x.name, d), reason)
                for d in wide_b:
                    self.pin((node.name, d), reason)
            i, j = gi[-1] + 1, gj[-1] + 1

    _rule_reshape = _rule_view
    _rule__unsafe_view = _rule_view

    def _rule_matmul(self, node: torch.fx.Node) -> None:
        a, b = node.args[0], node.args[1]
        sa, sb, so = self.shapes[a.name], self.shapes[b.name], self.shapes[node.name]
        if len(sa) < 2 or len(sb) < 2:
            self._unknown(node, "matmul")
            return
        # batch dims broadcast from the right; (.., T, K) @ (.., K, S) -> (.., T, S)
        for tensor, shape in ((a, sa), (b, sb)):
            for i in range(3, len(shape) + 1):
                if shape[-i] != 1 and shape[-i] == so[-i]:
                    self.link(tensor, len(shape) - i, node, len(so) - i)
        self.link(a, -2, node, -2)
        self.link(b, -1, node, -1)
        self.link(a, -1, b, -2)  # the contraction: an element removed from both changes nothing else

    _rule_bmm = _rule_matmul

    def _rule_repeat_interleave(self, node: torch.fx.Node) -> None:
        x = node.args[0]
        repeats = node.args[1] if len(node.args) > 1 else node.kwargs.get("repeats")
        dim = node.args[2] if len(node.args) > 2 else node.kwargs.get("dim")
        if not isinstance(repeats, int) or dim is None:
            self._unknown(node, "repeat_interleave")
            return
        rank = len(self.shapes[x.name])
        dim %= rank
        self._same_dims(x, node, skip={dim})
        # grouped-query attention: key/value head j serves query heads j*r .. j*r+r-1
        self.link_blocks(x, dim, node, dim, repeats)

    def _rule_permute(self, node: torch.fx.Node) -> None:
        for out, src in enumerate(node.args[1]):
            self.link(node.args[0], src, node, out)

    def _rule_transpose(self, node: torch.fx.Node) -> None:
        x = node.args[0]
        rank = len(self.shapes[x.name])
        d0, d1 = node.args[1] % rank, node.args[2] % rank
        for d in range(rank):
            self.link(x, d1 if d == d0 else d0 if d == d1 else d, node, d)

    def _rule_t(self, node: torch.fx.Node) -> None:
        x = node.args[0]
        if len(self.shapes[x.name]) == 2:
            self.link(x, 0, node, 1)
            self.link(x, 1, node, 0)

    def _rule_unsqueeze(self, node: torch.fx.Node) -> None:
        self._same_dims(node.args[0], node)

    def _rule_squeeze(self, node: torch.fx.Node) -> None:
        x = node.args[0]
        wide_in = [d for d, s in enumerate(self.shapes[x.name]) if s != 1]
        wide_out = [d for d, s in enumerate(self.shapes[node.name]) if s != 1]
        for a, b in zip(wide_in, wide_out, strict=False):
            self.link(x, a, node, b)

    def _rule_expand(self, node: torch.fx.Node) -> None:
        self._same_dims(node.args[0], node)

    def _rule_cat(self, node: torch.fx.Node) -> None:
        tensors = node.args[0]
        rank = len(self.shapes[node.name])
        dim = (node.args[1] if len(node.args) > 1 else node.kwargs.get("dim", 0)) % rank
        offset = 0
        for t in tensors:
            shape = self.shapes.get(t.name)
            if shape is None or len(shape) != rank:
                continue  # torch.cat skips empty 1-d tensors
            self._same_dims(t, node, skip={dim})
            self.link(t, dim, node, dim, 0, offset, shape[dim])
            offset += shape[dim]

    def _rule_slice(self, node: torch.fx.Node) -> None:
        x = node.args[0]
        rank = len(self.shapes[x.name])
        dim = (node.args[1] if len(node.args) > 1 else 0) % rank
        start = node.args[2] if len(node.args) > 2 and node.args[2] is not None else 0
        step = node.args[4] if len(node.args) > 4 else 1
        self._same_dims(x, node, skip={dim})
        size = self.shapes[x.name][dim]
        start = max(0, min(size, start + size if start < 0 else start))
        if step != 1:
            self.pin((x.name, dim), f"strided slice {node.name}")
            return
        self.link(x, dim, node, dim, start, 0, self.shapes[node.name][dim])

    def _rule_split(self, node: torch.fx.Node) -> None:
        x = node.args[0]
        size = self.shapes[x.name]
        dim = (node.args[2] if len(node.args) > 2 else node.kwargs.get("dim", 0)) % len(size)
        chunk = node.args[1]
        sizes = list(chunk) if isinstance(chunk, (list, tuple)) else [
            min(chunk, size[dim] - s) for s in range(0, size[dim], chunk)]
        offsets = [sum(sizes[:i]) for i in range(len(sizes))]
        for user in node.users:
            if _op_name(user) != "getitem" or user.name not in self.shapes:
                self._unknown(node, "split")
                continue
            k = user.args[1]
            self._same_dims(x, user, skip={dim})
            self.link(x, dim, user, dim, offsets[k], 0, sizes[k])

    _rule_split_with_sizes = _rule_split

    def _rule_getitem(self, node: torch.fx.Node) -> None:
        if _op_name(node.args[0]) not in ("split", "split_with_sizes"):
            self._unknown(node, "getitem")

    # -- groups -------------------------------------------------------------------------------

    def _groups(self) -> list[ChannelGroup]:
        groups: list[ChannelGroup] = []
        for component in nx.connected_components(self.graph):
            axes = sorted(component, key=lambda a: (a[0], a[1]))
            params = {a: self.param_axes[a] for a in axes if a in self.param_axes}
            consumers = {a: self.consumers[a] for a in axes if a in self.consumers}
            producers = [self.producers[a] for a in axes if a in self.producers]
            if not params or not (consumers or producers):
                continue
            group = ChannelGroup(axes=axes, size=0, params=params, consumers=consumers, producers=producers)
            pins = [self.pins[a] for a in axes if a in self.pins]
            if pins:
                group.pinned = pins[0]
            else:
                self._classes(group)
            groups.append(group)
        return groups

    def _classes(self, group: ChannelGroup) -> None:
        """The channel classes of an unpinned group (union-find over axis elements)."""
        sizes = {a: self.graph.nodes[a]["size"] for a in group.axes}
        parent: dict[tuple[Axis, int], tuple[Axis, int]] = {}

        def find(e):
            root = e
            while parent.get(root, root) != root:
                root = parent[root]
            while parent.get(e, e) != root:
                parent[e], e = root, parent[e]
            return root

        for u, v, data in self.graph.subgraph(group.axes).edges(data=True):
            for m in data["maps"]:
                if "block" in m:
                    coarse, fine, block = m["coarse"], m["fine"], m["block"]
                    for i in range(sizes[coarse]):
                        root = find((coarse, i))
                        for j in range(i * block, (i + 1) * block):
                            other = find((fine, j))
                            if other != root:
                                parent[other] = root
                    continue
                for i in range(m["length"]):
                    ru, rv = find((u, m[u] + i)), find((v, m[v] + i))
                    if ru != rv:
                        parent[ru] = rv
        members: dict[tuple[Axis, int], list[tuple[Axis, int]]] = {}
        for axis in group.axes:
            for i in range(sizes[axis]):
                members.setdefault(find((axis, i)), []).append((axis, i))
        group.classes = sorted(members.values(), key=lambda c: (c[0][0], c[0][1]))
        group.size = len(group.classes)

    def describe(self) -> str:
        """One line per group that has layers: what produces it, who reads it, its size or why it is
        pinned (the text form tests and users compare)."""
        lines = []
        for group in self.groups:
            readers = sorted(c.weight.removesuffix(".weight") for c in group.consumers.values())
            state = f"pinned: {group.pinned}" if group.pinned else f"{group.size} channels"
            lines.append(f"[{', '.join(sorted(group.producers)) or '(no producer)'}] -> [{', '.join(readers)}]: "
                         f"{state}")
        return "\n".join(sorted(lines)) + "\n"
