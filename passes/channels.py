"""prune-channels: structured pruning that physically removes channels and shrinks the program.

The channel groups come from :mod:`sparsecc.passes.channel_graph` (what must go together, and
what is pinned and why). In every prunable group the same fraction ``sparsity`` of its channels
is removed, the least important first, where importance is:

* ``l1`` / ``l2``: the norm of the group's weights for that channel (the producing rows and the
  reading columns of every linear and convolution in the group);
* ``taylor`` (Molchanov et al., 2019): the first-order change of the loss when the channel is
  replaced by its calibration mean at every layer that reads it, ``(sum (x_c - mean_c) dL/dx_c)^2``
  averaged over calibration batches; the loss is the cross entropy of the first output against
  the dense model's own predictions (pseudo-labels), so no labels are needed;
* ``fluctuation`` (as in FLAP, An et al., 2024): ``var(x_c) * ||W[:, c]||^2`` summed over the
  layers that read the channel, the expected squared output change after mean compensation.

Then every layer that reads a removed channel makes up for it from the calibration data: a linear
or 1x1 convolution re-solves its remaining input weights and bias by least squares
(``reconstruct=true``) so its output on the calibration inputs stays as close as possible to the
dense one; other convolutions add the removed channels' mean contribution to their bias. The
slices are then cut from every parameter in the group, shape arguments of reshapes and splits are
updated, and the module is exported again, so the result is an ordinary, smaller program that
runs and saves like the input. Layers whose channels are pinned are reported.
"""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from sparsecc.errors import CalibrationError, WeightError
from sparsecc.pass_manager import Pass, PassContext, PassResult, register_pass
from sparsecc.plan import LayerPlan, Plan
from sparsecc.program import Program, attribute_owner, flatten_outputs

from .calibrate import check_inputs
from .channel_graph import Axis, ChannelGraph, ChannelGroup, Consumer
from .prune import check_finite

IMPORTANCES = ("l1", "l2", "taylor", "fluctuation")


@dataclass
class _InputStats:
    """Per-channel statistics of the input of one channel-reading layer."""

    sums: torch.Tensor
    sq_sums: torch.Tensor
    rows: int = 0
    second_moment: torch.Tensor | None = None  # (C+1, C+1) of [x, 1], for least squares
    taylor: torch.Tensor | None = None
    batches: int = 0

    @property
    def means(self) -> torch.Tensor:
        return self.sums / max(self.rows, 1)

    @property
    def variances(self) -> torch.Tensor:
        return (self.sq_sums / max(self.rows, 1) - self.means ** 2).clamp_min(0)


def _channel_rows(x: torch.Tensor, kind: str) -> torch.Tensor:
    """(rows, C): one row per token or pixel, one column per input channel."""
    if kind == "conv2d":
        return x.movedim(1, -1).reshape(-1, x.shape[1])
    return x.reshape(-1, x.shape[-1])


def _pointwise(graph_module: torch.fx.GraphModule, consumer: Consumer) -> bool:
    if consumer.kind == "linear":
        return True
    node = next(n for n in graph_module.graph.nodes if n.name == consumer.node)
    weight = graph_module.get_parameter(consumer.weight)
    args = list(node.args) + [None] * (7 - len(node.args))
    stride, padding = args[3] or [1, 1], args[4] or [0, 0]
    return (tuple(weight.shape[2:]) == (1, 1) and all(int(s) == 1 for s in stride)
            and all(int(p) == 0 for p in padding))


class _Recorder(torch.fx.Interpreter):
    """Runs the module and records each watched layer's input. With ``probes``, each watched layer
    reads its input plus a zero tensor that requires grad, so that after ``backward`` the probe's
    gradient is the loss gradient at that layer's own input (not summed with other readers)."""

    def __init__(self, module: torch.fx.GraphModule, watch: dict[str, Consumer], seen: dict[str, torch.Tensor],
                 probes: dict[str, torch.Tensor] | None = None):
        super().__init__(module)
        self.watch = watch
        self.seen = seen
        self.probes = probes

    def run_node(self, n: torch.fx.Node) -> Any:
        if n.name not in self.watch:
            return super().run_node(n)
        args, kwargs = self.fetch_args_kwargs_from_env(n)
        self.seen[n.name] = args[0]
        if self.probes is not None:
            probe = self.probes[n.name] = torch.zeros_like(args[0], requires_grad=True)
            args = (args[0] + probe, *args[1:])
        return self.call_function(n.target, args, kwargs)


@register_pass
@dataclass(frozen=True)
class PruneChannels(Pass):
    """Remove the least important fraction of channels of every prunable channel group."""

    name = "prune-channels"
    summary = "remove whole channels (structured pruning), compensate the readers, shrink the program"
    numerics = "budget"

    sparsity: float = 0.3
    importance: str = "taylor"
    reconstruct: bool = True
    damp: float = 0.01  # least squares: ridge as a fraction of the mean diagonal
    scope: str = "global"  # "group": the same fraction of every group; "global": least important overall
    max_group_sparsity: float = 0.8  # global: the largest fraction of one group that may go
    round_to: int = 1  # keep a multiple of this many channels per group (SIMD width), when possible
    skip: str = ""  # fnmatch globs (';'-separated) of layers whose output channels stay

    def run(self, program: Program, ctx: PassContext) -> PassResult:
        if self.importance not in IMPORTANCES:
            raise WeightError(f"unknown channel importance {self.importance!r}; choose one of: "
                              f"{', '.join(IMPORTANCES)}")
        if not 0.0 <= self.sparsity < 1.0:
            raise WeightError(f"channel sparsity must be in [0, 1), got {self.sparsity}: it is the fraction of "
                              "each group's channels removed")
        check_finite(program)
        channel_graph = ChannelGraph(program)
        module = program.exported.module()
        groups = channel_graph.groups
        diagnostics = []
        skips = [s.strip() for s in self.skip.split(";") if s.strip()]
        prunable: list[ChannelGroup] = []
        for group in groups:
            if not group.producers:
                continue
            if group.pinned is not None:
                diagnostics.append(self.diag("info", f"output channels kept: {group.pinned}",
                                             ", ".join(group.producers)))
            elif any(fnmatch.fnmatchcase(p, s) for p in group.producers for s in skips):
                diagnostics.append(self.diag("info", "matches a skip pattern; output channels kept",
                                             ", ".join(group.producers)))
            elif group.prunable:
                prunable.append(group)
        consumers = {c.node: c for g in prunable for c in g.consumers.values()}
        stats = self._input_stats(module, consumers, program, ctx)
        removed: dict[Axis, list[int]] = {}
        channels_removed = channels_total = 0
        drops = self._choose(prunable, module, stats)
        for group, drop in zip(prunable, drops, strict=True):
            channels_total += group.size
            channels_removed += len(drop)
            for cls in drop:
                for axis, index in group.classes[cls]:
                    removed.setdefault(axis, []).append(index)
        before = sum(t.numel() for t in program.state.values())
        expected = self._expected_removal(channel_graph, removed, program)
        if removed:
            self._compensate(module, consumers, channel_graph, removed, stats)
            self._cut(module, channel_graph, removed)
            self._rewrite_shapes(module, channel_graph, removed)
        exported = self._export(module, program)
        new = Program(exported, program.example_inputs, stage="pruned",
                      plan=self._plan(program, exported, ctx, diagnostics))
        after = sum(t.numel() for t in new.state.values())
        added_biases = before - expected - after  # a reader without a bias gets one for compensation
        counters = {"groups": len([g for g in groups if g.producers]), "groups_pruned": len(prunable),
                    "groups_pinned": len([g for g in groups if g.producers and g.pinned]),
                    "channels_total": channels_total, "channels_removed": channels_removed,
                    "parameters_before": before, "parameters_after": after,
                    "parameters_removed_expected": expected, "bias_parameters_added": -added_biases}
        return PassResult(new, changed=bool(removed), counters=counters, diagnostics=diagnostics)

    def _plan(self, program: Program, exported: torch.export.ExportedProgram, ctx: PassContext,
              diagnostics: list) -> Plan:
        """Every layer dense (its smaller weight runs on the dense kernel), with what was removed."""
        before = {layer.name: layer for layer in program.layers()}
        kept = {d.layer: d.message for d in diagnostics}
        plan = Plan(target=ctx.target.name, method=f"channels-{self.importance}")
        for layer in Program(exported, program.example_inputs).layers():
            old = before.get(layer.name)
            if old is not None and old.weight_shape != layer.weight_shape:
                reason = (f"channel-pruned: {old.weight_shape[0]}->{layer.weight_shape[0]} outputs, "
                          f"{old.matrix_shape[1]}->{layer.matrix_shape[1]} inputs; runs on the dense kernel")
            else:
                pinned = next((m for names, m in kept.items() if names and layer.name in names.split(", ")), None)
                reason = pinned or "channels unchanged; runs on the dense kernel"
            plan.layers[layer.name] = LayerPlan(layer.name, layer.kind, list(layer.matrix_shape), None, 0.0, reason)
        return plan

    # -- calibration -------------------------------------------------------------------------

    def _input_stats(self, module: torch.fx.GraphModule, consumers: dict[str, Consumer], program: Program,
                     ctx: PassContext) -> dict[str, _InputStats]:
        batches = ctx.calibration_batches(program)
        for i, batch in enumerate(batches):
            check_inputs(program, batch, i)
        stats: dict[str, _InputStats] = {}
        least_squares = {name for name, c in consumers.items() if self.reconstruct and _pointwise(module, c)}
        with torch.no_grad():
            for batch in batches:
                seen: dict[str, torch.Tensor] = {}
                _Recorder(module, consumers, seen).run(*batch)
                for name, x in seen.items():
                    rows = _channel_rows(x, consumers[name].kind).double()
                    entry = stats.get(name)
                    if entry is None:
                        c = rows.shape[1]
                        entry = stats[name] = _InputStats(torch.zeros(c, dtype=torch.float64),
                                                          torch.zeros(c, dtype=torch.float64))
                        if name in least_squares:
                            entry.second_moment = torch.zeros(c + 1, c + 1, dtype=torch.float64)
                    entry.sums += rows.sum(0)
                    entry.sq_sums += (rows * rows).sum(0)
                    entry.rows += rows.shape[0]
                    if entry.second_moment is not None:
                        augmented = torch.cat([rows, torch.ones(rows.shape[0], 1, dtype=rows.dtype)], 1)
                        entry.second_moment += augmented.T @ augmented
        if self.importance == "taylor" and consumers:
            self._taylor(module, consumers, batches, stats)
        return stats

    def _taylor(self, module: torch.fx.GraphModule, consumers: dict[str, Consumer], batches: list,
                stats: dict[str, _InputStats]) -> None:
        for batch in batches:
            seen: dict[str, torch.Tensor] = {}
            probes: dict[str, torch.Tensor] = {}
            with torch.enable_grad():
                outputs = flatten_outputs(_Recorder(module, consumers, seen, probes).run(*batch))
                logits = outputs[0].float()
                logits = logits.reshape(-1, logits.shape[-1]) if logits.dim() > 1 else logits[None]
                # pseudo-labels: the dense model's own predictions stand in for labels
                loss = F.cross_entropy(logits, logits.detach().argmax(-1))
                loss.backward()
            for name, x in seen.items():
                grad = probes[name].grad
                if grad is None:
                    raise CalibrationError(f"the loss does not depend on the input of {name}; "
                                           "use importance=fluctuation or l2")
                entry = stats[name]
                rows = _channel_rows(x.detach(), consumers[name].kind).double()
                grads = _channel_rows(grad, consumers[name].kind).double()
                score = ((rows - entry.means) * grads).sum(0) ** 2
                entry.taylor = score if entry.taylor is None else entry.taylor + score
                entry.batches += 1

    def _choose(self, prunable: list[ChannelGroup], module: torch.fx.GraphModule,
                stats: dict[str, _InputStats]) -> list[list[int]]:
        """The channel classes each group loses: the same fraction of every group, or (global) the
        least important channels of the whole model, each group keeping at least
        ``1 - max_group_sparsity`` of its channels."""
        scores = [self._importance(group, module, stats) for group in prunable]
        if self.scope == "group":
            drops = []
            for group, score in zip(prunable, scores, strict=True):
                keep = group.size - int(round(self.sparsity * group.size))
                if self.round_to > 1 and group.size >= self.round_to:
                    keep = max(self.round_to, int(round(keep / self.round_to)) * self.round_to)
                keep = max(1, min(group.size, keep))
                drops.append(sorted(int(i) for i in torch.argsort(score, stable=True)[: group.size - keep]))
            return drops
        budget = int(round(self.sparsity * sum(group.size for group in prunable)))
        ranked = sorted((float(value), g, cls) for g, score in enumerate(scores) for cls, value in enumerate(score))
        caps = [min(group.size - 1, int(self.max_group_sparsity * group.size)) for group in prunable]
        drops = [[] for _ in prunable]
        for _, g, cls in ranked:
            if budget == 0:
                break
            if len(drops[g]) < caps[g]:
                drops[g].append(cls)
                budget -= 1
        return [sorted(d) for d in drops]

    # -- importance ----------------------------------------------------------------------------

    def _importance(self, group: ChannelGroup, module: torch.fx.GraphModule,
                    stats: dict[str, _InputStats]) -> torch.Tensor:
        scores = torch.zeros(group.size, dtype=torch.float64)
        for cls, members in enumerate(group.classes):
            total = 0.0
            for axis, index in members:
                if self.importance in ("l1", "l2") and axis in group.params:
                    param = group.params[axis]
                    tensor = _get(module, param.fqn)
                    if tensor.dim() < 2:
                        continue  # norms and biases are not weights a channel's importance rests on
                    piece = tensor.detach().select(param.dim, index).double()
                    total += float(piece.abs().sum() if self.importance == "l1" else piece.pow(2).sum())
                elif axis in group.consumers:
                    consumer = group.consumers[axis]
                    entry = stats[consumer.node]
                    if self.importance == "taylor":
                        total += float(entry.taylor[index]) / max(entry.batches, 1)
                    elif self.importance == "fluctuation":
                        # the share of this reader's output fluctuation that the channel carries
                        weight = _get(module, consumer.weight).detach().double()
                        energy = entry.variances * weight.transpose(0, 1).reshape(weight.shape[1], -1).pow(2).sum(1)
                        total += float(energy[index] / energy.sum().clamp_min(1e-30))
            scores[cls] = total
        return scores

    # -- rewriting -----------------------------------------------------------------------------

    @staticmethod
    def _expected_removal(channel_graph: ChannelGraph, removed: dict[Axis, list[int]], program: Program) -> int:
        by_fqn: dict[str, list[tuple[int, int]]] = {}
        for axis, indices in removed.items():
            if axis in channel_graph.param_axes:
                param = channel_graph.param_axes[axis]
                by_fqn.setdefault(param.fqn, []).append((param.dim, len(set(indices))))
        total = 0
        for fqn, cuts in by_fqn.items():
            shape = list(program.tensor(fqn).shape)
            before = 1
            for d in shape:
                before *= d
            for dim, count in cuts:
                shape[dim] -= count
            after = 1
            for d in shape:
                after *= d
            total += before - after
        return total

    def _compensate(self, module: torch.fx.GraphModule, consumers: dict[str, Consumer], channel_graph: ChannelGraph,
                    removed: dict[Axis, list[int]], stats: dict[str, _InputStats]) -> None:
        """Each reader of removed channels: least-squares refit (pointwise) or mean into the bias."""
        weight_axes = {c.node: axis for axis, c in channel_graph.consumers.items()}
        for name, consumer in consumers.items():
            drop = sorted(set(removed.get(weight_axes[name], [])))
            if not drop:
                continue
            weight = _get(module, consumer.weight).detach().double()
            n, c = weight.shape[0], weight.shape[1]
            entry = stats[name]
            keep = [i for i in range(c) if i not in set(drop)]
            bias = (_get(module, consumer.bias).detach().double() if consumer.bias
                    else torch.zeros(n, dtype=torch.float64))
            if entry.second_moment is not None:
                # minimise E||W x + b - (W_K' x_K + b')||^2 over the calibration rows, with [x, 1]
                full = torch.cat([weight.reshape(n, c), bias[:, None]], 1)
                cols = keep + [c]
                moment = entry.second_moment
                system = moment[cols][:, cols]
                ridge = self.damp * system.diagonal().mean()
                system = system + ridge * torch.eye(len(cols), dtype=system.dtype)
                rhs = full @ moment[:, cols]
                solved = torch.linalg.solve(system, rhs.T).T
                new_weight = weight.clone().reshape(n, c)
                new_weight[:, keep] = solved[:, :-1]
                new_weight = new_weight.reshape(weight.shape)
                new_bias = solved[:, -1]
            else:
                spatial = weight[:, drop].reshape(n, len(drop), -1).sum(-1)
                new_bias = bias + spatial @ entry.means[drop]
                new_weight = weight
            _set(module, consumer.weight, new_weight.to(_get(module, consumer.weight).dtype))
            dtype = _get(module, consumer.weight).dtype
            if consumer.bias:
                _set(module, consumer.bias, new_bias.to(dtype))
            else:
                self._add_bias(module, consumer, new_bias.to(dtype))

    @staticmethod
    def _add_bias(module: torch.fx.GraphModule, consumer: Consumer, bias: torch.Tensor) -> None:
        fqn = consumer.weight[: -len("weight")] + "bias" if consumer.weight.endswith("weight") else (
            consumer.weight + "_bias")
        target, attr = attribute_owner(module, fqn)
        if hasattr(target, attr):
            raise WeightError(f"cannot add a compensation bias {fqn}: the name is taken")
        target.register_parameter(attr, torch.nn.Parameter(bias, requires_grad=False))
        consumer.bias = fqn
        node = next(n for n in module.graph.nodes if n.name == consumer.node)
        with module.graph.inserting_before(node):
            getter = module.graph.get_attr(fqn)
        args = list(node.args)
        if len(args) < 3:
            args.append(getter)
        else:
            args[2] = getter
        node.args = tuple(args)
        module.recompile()

    @staticmethod
    def _cut(module: torch.fx.GraphModule, channel_graph: ChannelGraph, removed: dict[Axis, list[int]]) -> None:
        cuts: dict[str, list[tuple[int, list[int]]]] = {}
        for axis, indices in removed.items():
            if axis in channel_graph.param_axes:
                param = channel_graph.param_axes[axis]
                cuts.setdefault(param.fqn, []).append((param.dim, sorted(set(indices))))
        known = {param.fqn for param in channel_graph.param_axes.values()}
        for consumer in channel_graph.consumers.values():
            # a bias added for compensation follows its layer's output channels
            if consumer.bias and consumer.bias not in known:
                cuts[consumer.bias] = [cut for cut in cuts.get(consumer.weight, []) if cut[0] == 0]
        for fqn, dims in cuts.items():
            tensor = _get(module, fqn).detach()
            for dim, drop in dims:
                keep = torch.tensor([i for i in range(tensor.shape[dim]) if i not in set(drop)], dtype=torch.long)
                tensor = tensor.index_select(dim, keep)
            _set(module, fqn, tensor.contiguous())

    @staticmethod
    def _rewrite_shapes(module: torch.fx.GraphModule, channel_graph: ChannelGraph,
                        removed: dict[Axis, list[int]]) -> None:
        """Shape arguments that name a channel count (reshape sizes, split sizes, slice bounds)."""
        # the module reads parameters and buffers through get_attr nodes named unlike the
        # exported program's placeholders: map them back by their FQN
        placeholder = {fqn: name for name, fqn in channel_graph.placeholder_fqns.items()}

        def name_of(arg: torch.fx.Node) -> str:
            return placeholder.get(arg.target, arg.name) if arg.op == "get_attr" else arg.name

        for node in module.graph.nodes:
            if node.op != "call_function":
                continue
            op = getattr(node.target, "__name__", "").split(".")[0]
            if op in ("view", "reshape", "_unsafe_view", "expand"):
                sizes = list(node.args[1])
                for d, size in enumerate(sizes):
                    cut = len(set(removed.get((node.name, d), [])))
                    if cut and isinstance(size, int) and size > 0:
                        sizes[d] = size - cut
                node.args = (node.args[0], sizes, *node.args[2:])
            elif op == "conv2d" and len(node.args) > 6 and int(node.args[6]) > 1:
                # a depthwise convolution has one group per channel: fewer channels, fewer groups
                cut = len(set(removed.get((node.name, 1), [])))
                if cut:
                    node.args = (*node.args[:6], int(node.args[6]) - cut, *node.args[7:])
            elif op in ("split", "split_with_sizes"):
                x = node.args[0]
                if name_of(x) not in channel_graph.shapes:
                    continue
                dim = (node.args[2] if len(node.args) > 2 else node.kwargs.get("dim", 0))
                rank = len(channel_graph.shapes[name_of(x)])
                dim %= rank
                drop = set(removed.get((name_of(x), dim), []))
                if not drop:
                    continue
                chunk = node.args[1]
                total = channel_graph.shapes[name_of(x)][dim]
                old = list(chunk) if isinstance(chunk, (list, tuple)) else [
                    min(chunk, total - s) for s in range(0, total, chunk)]
                new, start = [], 0
                for size in old:
                    new.append(sum(1 for i in range(start, start + size) if i not in drop))
                    start += size
                node.target = torch.ops.aten.split_with_sizes.default
                node.args = (x, new, dim)
            elif op == "slice":
                x = node.args[0]
                if name_of(x) not in channel_graph.shapes:
                    continue
                rank = len(channel_graph.shapes[name_of(x)])
                dim = node.args[1] % rank
                drop = set(removed.get((name_of(x), dim), []))
                if not drop:
                    continue
                size = channel_graph.shapes[name_of(x)][dim]
                start = node.args[2] if node.args[2] is not None else 0
                start = max(0, min(size, start + size if start < 0 else start))
                length = channel_graph.shapes[node.name][dim]
                new_start = sum(1 for i in range(start) if i not in drop)
                new_length = sum(1 for i in range(start, start + length) if i not in drop)
                node.args = (x, dim, new_start, new_start + new_length, *node.args[4:])
        module.recompile()

    @staticmethod
    def _export(module: torch.fx.GraphModule, program: Program) -> torch.export.ExportedProgram:
        try:
            return torch.export.export(module, tuple(program.example_inputs), strict=False)
        except Exception as exc:  # noqa: BLE001 - torch.export raises many unrelated types
            raise WeightError(
                f"the channel-pruned program no longer exports ({type(exc).__name__}: {str(exc)[:400]}); "
                "an op's channel rule is wrong for this model: report it, and meanwhile keep those layers "
                "with skip=...") from exc


def _get(module: torch.nn.Module, fqn: str) -> torch.Tensor:
    owner, attr = attribute_owner(module, fqn)
    return getattr(owner, attr)


def _set(module: torch.nn.Module, fqn: str, value: torch.Tensor) -> None:
    target, attr = attribute_owner(module, fqn)
    old = getattr(target, attr)
    if isinstance(old, torch.nn.Parameter):
        setattr(target, attr, torch.nn.Parameter(value, requires_grad=old.requires_grad))
    elif attr in getattr(target, "_buffers", {}):
        target._buffers[attr] = value
    else:
        setattr(target, attr, value)
