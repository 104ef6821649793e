"""Inspection: a stable one-node-per-line text form, stage diffs and DOT graphs.

The text form is what golden tests compare, so it avoids anything unstable: no object ids, no
memory addresses, weights shown by name, shape and (for sparse ops) pattern, sparsity and sizes.
"""

from __future__ import annotations

import difflib
from typing import Any

import torch

from .program import META_KEY, Program

_DTYPE = {
    torch.float32: "f32", torch.float16: "f16", torch.bfloat16: "bf16", torch.float64: "f64",
    torch.int64: "i64", torch.int32: "i32", torch.int16: "i16", torch.int8: "i8", torch.uint8: "u8",
    torch.bool: "bool",
}


def _dim_text(dim: Any) -> str:
    """A size as printed: its value, or its symbol when it has none (a data-dependent size)."""
    try:
        return str(int(dim))
    except Exception:  # noqa: BLE001 - an unbacked symbolic size raises torch's guard errors
        return str(dim)


def _tensor_type(value: Any) -> str:
    if isinstance(value, torch.Tensor):
        dims = ",".join(_dim_text(d) for d in value.shape)
        return f"{_DTYPE.get(value.dtype, str(value.dtype))}[{dims}]"
    if isinstance(value, (list, tuple)):
        return "(" + ", ".join(_tensor_type(v) for v in value) + ")"
    return type(value).__name__ if value is not None else "none"


def _op_name(target: Any) -> str:
    name = getattr(target, "__name__", None) or str(target)
    schema = getattr(target, "_schema", None)
    if schema is not None:
        base = schema.name.replace("::", ".")
        overload = schema.overload_name
        return base if overload in ("", "default") else f"{base}.{overload}"
    return name


def _arg(value: Any) -> str:
    if isinstance(value, torch.fx.Node):
        return f"%{value.name}"
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_arg(v) for v in value) + "]"
    if isinstance(value, float):
        return repr(round(value, 6))
    if isinstance(value, torch.dtype):
        return _DTYPE.get(value, str(value))
    return repr(value)


def _placeholder_kind(program: Program, name: str) -> str:
    sig = program.exported.graph_signature
    if name in sig.inputs_to_parameters:
        return "param"
    if name in sig.inputs_to_buffers:
        return "buffer"
    return "const"


def format_program(program: Program) -> str:
    """One line per node: inputs with their weight names, ops with args and result types."""
    targets = program.placeholder_targets()
    lines = [f"# sparsecc program, stage {program.stage}"]
    for node in program.graph.nodes:
        vtype = _tensor_type(node.meta.get("val"))
        if node.op == "placeholder":
            kind = _placeholder_kind(program, node.name) if node.name in targets else "input"
            label = f" = {targets[node.name]}" if node.name in targets else ""
            lines.append(f"{kind} %{node.name}{label} : {vtype}")
        elif node.op == "output":
            lines.append(f"return {_arg(node.args[0])}")
        else:
            args = ", ".join([_arg(a) for a in node.args] + [f"{k}={_arg(v)}" for k, v in node.kwargs.items()])
            line = f"%{node.name} = {_op_name(node.target)}({args}) : {vtype}"
            info = node.meta.get(META_KEY)
            if info is not None:
                line += f"  # sparse: {info.describe()}"
            lines.append(line)
    return "\n".join(lines) + "\n"


def diff_text(before: str, after: str, before_label: str = "before", after_label: str = "after") -> str:
    return "".join(difflib.unified_diff(before.splitlines(True), after.splitlines(True),
                                        fromfile=before_label, tofile=after_label))


def format_dot(program: Program) -> str:
    """Graphviz DOT of the data flow; sparse nodes are filled orange, weights grey."""
    targets = program.placeholder_targets()
    lines = ["digraph sparsecc {", "  rankdir=TB;", '  node [shape=box, fontname="monospace"];']
    for node in program.graph.nodes:
        style = ""
        if node.op == "placeholder":
            label = targets.get(node.name, node.name)
            style = ', style=filled, fillcolor="#dddddd"' if node.name in targets else ""
        elif node.op == "output":
            label = "output"
        else:
            label = f"{node.name}\\n{_op_name(node.target)}"
            info = node.meta.get(META_KEY)
            if info is not None:
                label += f"\\n{info.describe()}"
                style = ', style=filled, fillcolor="#ffb347"'
        lines.append(f'  "{node.name}" [label="{label}"{style}];')
        for user in node.users:
            lines.append(f'  "{node.name}" -> "{user.name}";')
    lines.append("}")
    return "\n".join(lines) + "\n"
