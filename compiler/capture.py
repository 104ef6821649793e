"""Capture: ``torch.export`` a model into a Program, with errors a person can act on.

Also loads ``.pt2`` files, through :mod:`sparsecc.safe_pt2` so that opening one runs no code
from it, and refuses programs whose tensor shapes depend on input values (sparsecc plans, packs
and lowers for shapes that follow from the input shapes).
"""

from __future__ import annotations

import pathlib
import re
import traceback
from collections.abc import Sequence
from typing import Any

import torch

from .errors import CaptureError
from .program import Program, attribute_owner


def _as_tuple(example_inputs: Any) -> tuple[Any, ...]:
    if isinstance(example_inputs, torch.Tensor):
        return (example_inputs,)
    return tuple(example_inputs)


def _user_frame(exc: BaseException) -> str | None:
    """The innermost traceback frame outside torch and sparsecc: usually the model's own line."""
    frames = traceback.extract_tb(exc.__traceback__)
    for frame in reversed(frames):
        path = frame.filename.replace("\\", "/")
        if "/torch/" not in path and "/sparsecc/" not in path and "/compiler/" not in path:
            return f"{frame.filename}:{frame.lineno} in {frame.name}: {frame.line}"
    return None


def _short_reason(exc: BaseException, limit: int = 6) -> str:
    lines = [line for line in str(exc).strip().splitlines() if line.strip()]
    text = "\n    ".join(lines[:limit])
    if len(lines) > limit:
        text += f"\n    ... ({len(lines) - limit} more lines; set SPARSECC_DEBUG=1 for the full trace)"
    return text


def capture(model: torch.nn.Module, example_inputs: Sequence[Any] | torch.Tensor, *,
            strict: bool = False, fold_batch_norm: bool = True) -> Program:
    """Export ``model`` called on ``example_inputs`` into a Program, with every inference batch
    norm that follows a convolution folded into it (:func:`fold_batch_norms`; ``fold_batch_norm=
    False`` keeps them).

    Raises CaptureError naming the module, the failing line and torch's reason when the model
    does not export.
    """
    import os

    if isinstance(model, Program):
        return model
    if not isinstance(model, torch.nn.Module):
        raise CaptureError(f"capture needs a torch.nn.Module, got {type(model).__name__}")
    inputs = _as_tuple(example_inputs)
    model = model.eval()
    try:
        exported = torch.export.export(model, inputs, strict=strict)
    except Exception as exc:  # noqa: BLE001 - torch.export raises many unrelated types
        if os.environ.get("SPARSECC_DEBUG"):
            raise
        where = _user_frame(exc)
        message = (f"torch.export could not capture {type(model).__name__}: {type(exc).__name__}\n"
                   f"    {_short_reason(exc)}")
        if where:
            message += f"\n  at {where}"
        message += ("\n  fix: make the failing code traceable (no data-dependent Python control flow or "
                    "unsupported ops), or export the model yourself and pass the ExportedProgram")
        raise CaptureError(message) from None
    check_static_shapes(exported, f"model {type(model).__name__}")
    if fold_batch_norm:
        exported, _ = fold_batch_norms(exported, inputs)
    return Program(exported, inputs, stage="captured")


def check_static_shapes(exported: torch.export.ExportedProgram, what: str) -> None:
    """Raise CaptureError (one line) when a tensor's shape depends on the input's values
    (``x[x > 0]``, ``torch.nonzero``): torch.export captures those with unbacked symbols, which
    sparsecc's planning, printing and TVM lowering cannot size."""
    from torch.fx.experimental.symbolic_shapes import free_unbacked_symbols
    from torch.utils import _pytree as pytree

    for node in exported.graph.nodes:
        for value in pytree.tree_leaves(node.meta.get("val")):
            if isinstance(value, torch.Tensor) and free_unbacked_symbols(tuple(value.shape)):
                shape = ", ".join(str(d) for d in value.shape)
                raise CaptureError(
                    f"{what} makes a tensor whose shape depends on the input's values: {node.name} "
                    f"({_op_name(node.target)}) has shape [{shape}]{_node_source(node)}, and sparsecc compiles "
                    "only shapes that follow from the input shapes; fix: keep value-dependent selection "
                    "(x[mask], torch.nonzero, masked_select) out of the model, e.g. return "
                    "torch.where(mask, x, 0) and select after calling it")


def _op_name(target: Any) -> str:
    return str(getattr(target, "_name", None) or getattr(target, "__name__", None) or target)


def _node_source(node: torch.fx.Node) -> str:
    """The ' at model.py:12 (code)' suffix naming the innermost frame of the node's stack trace."""
    frames = re.findall(r'File "([^"]+)", line (\d+), in [^\n]*\n\s*([^\n]*)', node.meta.get("stack_trace") or "")
    if not frames:
        return ""
    file, line, code = frames[-1]
    return f" at {file}:{line} ({code.strip()[:80]})"


def _set_tensor(module: torch.nn.Module, target: str, value: torch.Tensor) -> None:
    owner, name = attribute_owner(module, target)
    if hasattr(owner, name):
        delattr(owner, name)
    owner.register_parameter(name, torch.nn.Parameter(value, requires_grad=False))


def fold_batch_norms(exported: torch.export.ExportedProgram,
                     example_inputs: Sequence[Any]) -> tuple[torch.export.ExportedProgram, int]:
    """Fold every inference batch norm that alone consumes a convolution's output into that
    convolution's weight and bias: ``gamma * (conv(x, W) + b - mean) / sqrt(var + eps) + beta`` is
    ``conv(x, W')`` + ``b'`` with each output channel's row of W scaled. The model computes the
    same function (to float rounding) with one op per pair fewer, and pruning then ranks the
    weights that really multiply the input. Returns the re-exported program (the same one when
    nothing folds) and how many batch norms were folded."""
    aten = torch.ops.aten
    module = exported.module()
    graph = module.graph
    attr_uses: dict[str, int] = {}
    for node in graph.nodes:
        if node.op == "get_attr":
            attr_uses[node.target] = attr_uses.get(node.target, 0) + 1

    def tensor(node: Any) -> torch.Tensor:
        owner, name = attribute_owner(module, node.target)
        return getattr(owner, name)

    folded = 0
    bn_owners: set[str] = set()
    for bn in list(graph.nodes):
        if bn.op != "call_function" or bn.target is not aten.batch_norm.default:
            continue
        x, gamma, beta, mean, var, training = bn.args[:6]
        eps = float(bn.args[7])
        conv = x
        if training or not isinstance(conv, torch.fx.Node) or conv.target is not aten.conv2d.default \
                or len(conv.users) != 1:
            continue
        w_node = conv.args[1]
        b_node = conv.args[2] if len(conv.args) > 2 else None
        params = [w_node, b_node, gamma, beta, mean, var]
        if any(p is not None and (not isinstance(p, torch.fx.Node) or p.op != "get_attr") for p in params) \
                or mean is None or var is None or attr_uses.get(w_node.target) != 1 or len(w_node.users) != 1 \
                or (b_node is not None and (attr_uses.get(b_node.target) != 1 or len(b_node.users) != 1)):
            continue
        with torch.no_grad():
            weight = tensor(w_node).detach().double()
            scale = (tensor(gamma).double() if gamma is not None else 1.0) / torch.sqrt(tensor(var).double() + eps)
            bias = tensor(b_node).double() if b_node is not None else torch.zeros_like(scale)
            shift = tensor(beta).double() if beta is not None else 0.0
            new_weight = (weight * scale.reshape(-1, *([1] * (weight.dim() - 1)))).to(tensor(w_node).dtype)
            new_bias = ((bias - tensor(mean).double()) * scale + shift).to(tensor(w_node).dtype)
        _set_tensor(module, w_node.target, new_weight)
        if b_node is None:
            stem = w_node.target[: -len(".weight")] if w_node.target.endswith(".weight") else w_node.target
            bias_target = f"{stem}.bias"
            owner, name = attribute_owner(module, bias_target)
            if hasattr(owner, name) and getattr(owner, name) is not None:
                continue
            _set_tensor(module, bias_target, new_bias)
            with graph.inserting_before(conv):
                b_node = graph.get_attr(bias_target)
            conv.args = (conv.args[0], conv.args[1], b_node, *conv.args[3:])
        else:
            _set_tensor(module, b_node.target, new_bias)
        bn.replace_all_uses_with(conv)
        graph.erase_node(bn)
        for p in (gamma, beta, mean, var):
            if p is not None and not p.users:
                bn_owners.add(p.target.rpartition(".")[0])
                graph.erase_node(p)
        folded += 1
    if not folded:
        return exported, 0
    # the folded batch norms' tensors nothing reads any more (running stats, num_batches_tracked)
    for node in list(graph.nodes):
        if node.op == "get_attr" and not node.users and node.target.rpartition(".")[0] in bn_owners:
            graph.erase_node(node)
    used = {node.target for node in graph.nodes if node.op == "get_attr"}
    for path in bn_owners:
        owner = module.get_submodule(path) if path else module
        for name, _ in [*owner.named_parameters(recurse=False), *owner.named_buffers(recurse=False)]:
            if (f"{path}.{name}" if path else name) not in used:
                delattr(owner, name)
    graph.lint()
    module.recompile()
    dynamic = _dynamic_shapes(exported, example_inputs)
    return torch.export.export(module, tuple(example_inputs), dynamic_shapes=dynamic, strict=False), folded


def _dynamic_shapes(exported: torch.export.ExportedProgram, example_inputs: Sequence[Any]) -> tuple[Any, ...] | None:
    """The dims ``exported`` left dynamic (a dynamic batch, say), as ``dynamic_shapes`` for
    exporting the same inputs again; None when every dim is static or the inputs are not plain
    tensors (then the re-export is static, as before)."""
    placeholders = {n.name: n for n in exported.graph.nodes if n.op == "placeholder"}
    values = [placeholders[name].meta.get("val") for name in exported.graph_signature.user_inputs]
    if len(values) != len(example_inputs) or not all(isinstance(t, torch.Tensor) for t in example_inputs):
        return None
    specs = []
    for value in values:
        shape = value.shape if isinstance(value, torch.Tensor) else ()
        specs.append({i: torch.export.Dim.AUTO for i, d in enumerate(shape) if isinstance(d, torch.SymInt)} or None)
    return tuple(specs) if any(specs) else None


def from_exported(exported: torch.export.ExportedProgram,
                  example_inputs: Sequence[Any] | None = None, *, fold_batch_norm: bool = True) -> Program:
    """Wrap an existing ExportedProgram (batch norms folded as :func:`capture` does). Example
    inputs default to those stored in it."""
    if example_inputs is None:
        stored = getattr(exported, "example_inputs", None)
        if stored is None or not stored[0]:
            raise CaptureError(
                "the exported program stores no example inputs; pass example_inputs explicitly")
        example_inputs = stored[0]
    inputs = _as_tuple(example_inputs)
    check_static_shapes(exported, "the exported program")
    if fold_batch_norm:
        exported, _ = fold_batch_norms(exported, inputs)
    return Program(exported, inputs, stage="captured")


def load_exported(path: str | pathlib.Path) -> torch.export.ExportedProgram:
    """Load the ``.pt2`` file at ``path`` without running code from it (:mod:`sparsecc.safe_pt2`).

    The file is read once and the bytes that were checked are the bytes that are loaded. Raises a
    one-line CaptureError when the file is missing or unreadable, damaged, would run code when
    opened, or calls a custom op that is not registered in this process.
    """
    path = pathlib.Path(path)
    if not path.is_file():
        raise CaptureError(f"model file {path} does not exist (expected a torch.export.save .pt2 file)")
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise CaptureError(f"could not read model file {path}: {exc.strerror or exc}; fix: check the path and "
                           "its permissions") from None
    return load_exported_bytes(data, str(path))


def load_exported_bytes(data: bytes, name: str) -> torch.export.ExportedProgram:
    """:func:`load_exported` for bytes the caller has already read (and perhaps hash-checked);
    ``name`` is how messages call the file."""
    from . import ops  # noqa: F401 - registers sparsecc's ops so packed programs load
    from .safe_pt2 import load_pt2_safely

    return load_pt2_safely(data, name)


def load_program(path: str | pathlib.Path, example_inputs: Sequence[Any] | None = None) -> Program:
    return from_exported(load_exported(path), example_inputs)
