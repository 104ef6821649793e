"""Layer-by-layer calibration: run all calibration batches through the program one graph node at a
time, and let a pruning method change each layer's weight just before that layer runs.

Methods that reconstruct a layer from its inputs (SparseGPT, Wanda as published) should see the
inputs the *pruned* model gives the layer, not the dense model's: the error of the layers before
it is then part of what the layer is fitted to. :class:`LayerwiseRunner` does that for any
exported graph, without knowing its blocks: it walks the nodes in order, evaluating each node for
every batch before the next node, so when a prunable layer is reached the inputs of every batch
are at hand, already computed through the pruned layers before it. The hook gets the layer's
input statistics (:class:`~sparsecc.passes.calibrate.LayerStats`, with ``X^T X`` when asked) and
may change the weight in place; the layer then runs with the new weight and its outputs feed
the layers after it.

Memory stays bounded: a value is dropped as soon as its last user has run, and when the values
alive at once (the activations of every batch at the current point of the graph) exceed
``memory_budget`` bytes, the oldest are written to a temporary folder and read back one batch at
a time when used. A model whose activations for all calibration samples do not fit in memory
still prunes; it only reads them from disk. Values that do not depend on the inputs (weights,
constants, tables derived from them) are kept once, not once per batch.
"""

from __future__ import annotations

import itertools
import operator
import pathlib
import tempfile
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from sparsecc.program import Layer, Program

from .calibrate import LayerStats, _rows, check_inputs

#: the hook: called with a layer and its input statistics just before the layer runs
LayerHook = Callable[[Layer, LayerStats], None]


@dataclass
class _Shared:
    """A value that does not depend on the batch (a weight, a constant, a table built from them)."""

    value: Any


def _nbytes(value: Any) -> int:
    if isinstance(value, torch.Tensor):
        return value.numel() * value.element_size()
    if isinstance(value, list | tuple):
        return sum(_nbytes(v) for v in value)
    return 0


class _ValueStore:
    """Per-batch values of graph nodes, spilled to disk (oldest first) above ``budget`` bytes."""

    def __init__(self, budget: int | None) -> None:
        self.budget = budget
        self.shared: dict[str, _Shared] = {}
        self.memory: OrderedDict[tuple[str, int], Any] = OrderedDict()
        self.on_disk: dict[tuple[str, int], pathlib.Path] = {}
        self.bytes = 0
        self.spilled_bytes = 0
        self.peak_bytes = 0
        self._dir: tempfile.TemporaryDirectory | None = None
        self._count = itertools.count()

    def put(self, node: str, batch: int, value: Any) -> None:
        self.memory[(node, batch)] = value
        self.bytes += _nbytes(value)
        self.peak_bytes = max(self.peak_bytes, self.bytes)
        if self.budget is not None:
            self._spill()

    def get(self, node: str, batch: int) -> Any:
        if node in self.shared:
            return self.shared[node].value
        key = (node, batch)
        if key in self.memory:
            return self.memory[key]
        return torch.load(self.on_disk[key], weights_only=False)

    def drop(self, node: str, batches: int) -> None:
        self.shared.pop(node, None)
        for b in range(batches):
            value = self.memory.pop((node, b), None)
            if value is not None:
                self.bytes -= _nbytes(value)
            path = self.on_disk.pop((node, b), None)
            if path is not None:
                path.unlink(missing_ok=True)

    def _spill(self) -> None:
        while self.bytes > self.budget and self.memory:
            key, value = self.memory.popitem(last=False)
            if self._dir is None:
                self._dir = tempfile.TemporaryDirectory(prefix="sparsecc-layerwise-")
            path = pathlib.Path(self._dir.name) / f"{next(self._count)}.pt"
            torch.save(value, path)
            self.on_disk[key] = path
            size = _nbytes(value)
            self.bytes -= size
            self.spilled_bytes += size

    def close(self) -> None:
        if self._dir is not None:
            self._dir.cleanup()
            self._dir = None


@dataclass
class LayerwiseResult:
    """What a layer-by-layer run did: per-batch program outputs and its memory use."""

    outputs: list[list[torch.Tensor]]  # per batch, the program's flat user outputs
    layers_seen: int
    peak_bytes: int  # the most bytes of per-batch values held in memory at once
    spilled_bytes: int  # bytes written to disk because the budget was exceeded


class LayerwiseRunner:
    """Run ``batches`` through ``program`` node by node, calling ``hook`` before every layer in
    ``layers`` (default: all of the program's layers) runs. See the module docstring."""

    def __init__(self, program: Program, batches: Sequence[Sequence[Any]], *, hessian: bool = False,
                 memory_budget: int | None = None, progress: bool = False) -> None:
        if not batches:
            raise ValueError("layer-by-layer calibration needs at least one batch")
        for i, batch in enumerate(batches):
            check_inputs(program, tuple(batch), i)
        self.program = program
        self.batches = [tuple(b) for b in batches]
        self.hessian = hessian
        self.memory_budget = memory_budget
        self.progress = progress

    def _stats(self, store: _ValueStore, layer: Layer, arg: torch.fx.Node) -> LayerStats:
        k = layer.matrix_shape[1]
        stats = LayerStats(torch.zeros(k, dtype=torch.float64),
                           hessian=torch.zeros(k, k, dtype=torch.float64) if self.hessian else None,
                           sums=torch.zeros(k, dtype=torch.float64))
        for b in range(len(self.batches)):
            rows = _rows(layer, store.get(arg.name, b).detach()).float()
            stats.sq_norms += (rows * rows).sum(0, dtype=torch.float64)
            stats.sums += rows.sum(0, dtype=torch.float64)
            stats.rows += rows.shape[0]
            if stats.hessian is not None:
                # fp32 products per batch, summed in fp64 across batches
                stats.hessian += (rows.T @ rows).double()
        return stats

    @torch.no_grad()
    def run(self, hook: LayerHook, layers: Sequence[Layer] | None = None, *,
            to_end: bool = True) -> LayerwiseResult:
        """Run the program, calling ``hook`` before each of ``layers``. With ``to_end=False`` the
        run stops once the last of them has run (a pruning pass needs nothing after it, and an
        LM's logits for every calibration token would be the largest value of the whole run);
        ``outputs`` is then empty."""
        program = self.program
        graph = program.exported.graph
        by_node = {layer.node: layer for layer in (program.layers() if layers is None else layers)}
        targets = program.placeholder_targets()
        nodes = list(graph.nodes)
        last_use: dict[str, int] = {}
        for i, node in enumerate(nodes):
            for arg in node.all_input_nodes:
                last_use[arg.name] = i
        flat_inputs = [torch.utils._pytree.tree_flatten((batch, {}))[0] for batch in self.batches]
        store = _ValueStore(self.memory_budget)
        stats_cache: dict[tuple[str, str], LayerStats] = {}
        n_batches = len(self.batches)
        user_input = 0
        outputs: list[list[torch.Tensor]] = [[] for _ in range(n_batches)]
        seen = 0
        iterator: Any = enumerate(nodes)
        if self.progress:
            from tqdm.auto import tqdm

            iterator = tqdm(iterator, total=len(nodes), desc="layer-by-layer", unit="node", leave=False)
        try:
            for i, node in iterator:
                if node.op == "placeholder":
                    if node.name in targets:
                        store.shared[node.name] = _Shared(program.tensor(targets[node.name]))
                    else:
                        for b in range(n_batches):
                            store.put(node.name, b, flat_inputs[b][user_input])
                        user_input += 1
                elif node.op == "get_attr":
                    store.shared[node.name] = _Shared(operator.attrgetter(node.target)(program.exported.graph_module))
                elif node.op == "call_function":
                    layer = by_node.get(node.name)
                    if layer is not None:
                        arg = node.args[0]
                        # layers reading one input with one im2col geometry share the statistics
                        key = (arg.name, repr((layer.kind, layer.weight_shape[1:], layer.conv)))
                        if key not in stats_cache:
                            stats_cache[key] = self._stats(store, layer, arg)
                        hook(layer, stats_cache[key])
                        seen += 1
                    self._evaluate(store, node, n_batches)
                    if not to_end and seen == len(by_node):
                        outputs = []
                        break
                elif node.op == "output":
                    n_user = len(program.exported.graph_signature.user_outputs)
                    results = node.args[0]
                    for b in range(n_batches):
                        flat = torch.fx.node.map_aggregate(
                            results, lambda a, b=b: store.get(a.name, b) if isinstance(a, torch.fx.Node) else a)
                        values = flat if isinstance(flat, list | tuple) else [flat]
                        outputs[b] = [v for v in values[len(values) - n_user:] if isinstance(v, torch.Tensor)]
                for arg in node.all_input_nodes:
                    if last_use.get(arg.name) == i:
                        store.drop(arg.name, n_batches)
                        stats_cache = {k: v for k, v in stats_cache.items() if k[0] != arg.name}
        finally:
            store.close()
        return LayerwiseResult(outputs, seen, store.peak_bytes, store.spilled_bytes)

    @staticmethod
    def _evaluate(store: _ValueStore, node: torch.fx.Node, n_batches: int) -> None:
        inputs = node.all_input_nodes
        if all(a.name in store.shared for a in inputs):
            args, kwargs = torch.fx.node.map_arg((node.args, node.kwargs), lambda a: store.get(a.name, 0))
            store.shared[node.name] = _Shared(node.target(*args, **kwargs))
            return
        for b in range(n_batches):
            args, kwargs = torch.fx.node.map_arg((node.args, node.kwargs), lambda a, b=b: store.get(a.name, b))
            store.put(node.name, b, node.target(*args, **kwargs))
