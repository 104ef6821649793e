"""Calibration batches checked against the program before any work is done.

A batch that does not fit the exported program fails deep inside a pass (a reshape the export
baked a batch size into, a Hessian that is not positive definite), and a batch that holds NaN or
no rows at all does not fail: it prunes a wrong model. So every batch is checked up front, each
refusal one line naming the batch, the input and the fix:

* the number of inputs, their dtype and rank;
* no 0-sized dimension (a batch without rows) and no NaN / inf in floating-point inputs;
* every dimension that differs from the example input is one the exported program declares
  dynamic (a ``torch.SymInt`` in the placeholder's ``meta["val"]``), within the range the export
  declared for it, and of the same size wherever the export ties two dimensions to one symbol.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.utils._pytree as pytree

from .errors import CalibrationError
from .program import Program


@dataclass(frozen=True)
class _InputSpec:
    """What the program takes at one flattened input position."""

    label: str  # "input 0", or "input 0 (leaf 1)" for a nested input
    example: Any
    # per dim: an int when the export fixed it, a sympy expression when dynamic; None: not known
    dims: tuple[Any, ...] | None


def as_batches(calibration: Any) -> list[tuple[Any, ...]]:
    """``calibration`` as a list of input tuples (a lone tensor in a batch is a 1-tuple)."""
    if isinstance(calibration, torch.Tensor) or not isinstance(calibration, Iterable):
        raise CalibrationError("calibration must be a list of input tuples (one tuple per batch), not a "
                               f"{type(calibration).__name__}")
    batches = []
    for i, batch in enumerate(calibration):
        if isinstance(batch, torch.Tensor):
            batch = (batch,)
        elif isinstance(batch, list | tuple):
            batch = tuple(batch)
        else:
            raise CalibrationError(f"calibration batch {i} is a {type(batch).__name__}; give a tuple of the "
                                   "model's inputs (or one tensor)")
        if not batch:
            raise CalibrationError(f"calibration batch {i} is empty; give the model's inputs or drop it")
        for pos, value in enumerate(batch):
            if isinstance(value, torch.Tensor) and value.layout != torch.strided:
                raise CalibrationError(f"calibration batch {i}, input {pos} is a {value.layout} tensor; give dense "
                                       "tensors (tensor.to_dense())")
        batches.append(batch)
    if not batches:
        raise CalibrationError("calibration data is an empty list; pass at least one batch")
    return batches


def check_calibration(batches: Sequence[tuple[Any, ...]], program: Program) -> None:
    """Refuse (CalibrationError, one line) the first batch that does not fit ``program``."""
    from .artifact import embedding_index_bounds

    specs = _input_specs(program)
    bounds = embedding_index_bounds(program.exported)
    for index, batch in enumerate(batches):
        _check_batch(index, batch, program.example_inputs, specs, program.exported.range_constraints)
        for pos, rows in bounds.items():
            ids = batch[pos]
            if isinstance(ids, torch.Tensor) and ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= rows):
                raise CalibrationError(f"calibration batch {index}, input {pos} holds ids from {int(ids.min())} to "
                                       f"{int(ids.max())}, outside the {rows}-row embedding it indexes; tokenize with "
                                       "the model's own tokenizer")


def _input_specs(program: Program) -> list[list[_InputSpec]]:
    """Per top-level example input, the spec of each of its flattened leaves."""
    vals = _placeholder_values(program)
    leaves_per_input = [pytree.tree_leaves(example) for example in program.example_inputs]
    known = len(vals) == sum(len(leaves) for leaves in leaves_per_input)
    specs, flat = [], 0
    for pos, leaves in enumerate(leaves_per_input):
        row = []
        for j, example in enumerate(leaves):
            val = vals[flat] if known else None
            flat += 1
            dims = tuple(_dim(d) for d in val.shape) if isinstance(val, torch.Tensor) else None
            row.append(_InputSpec(f"input {pos}" if len(leaves) == 1 else f"input {pos} (leaf {j})", example, dims))
        specs.append(row)
    return specs


def _placeholder_values(program: Program) -> list[Any]:
    """``meta["val"]`` of the user-input placeholders, in call order."""
    user = program.exported.graph_signature.user_inputs
    nodes = {n.name: n for n in program.graph.nodes if n.op == "placeholder"}
    return [nodes[name].meta.get("val") if name in nodes else None for name in user]


def _dim(size: Any) -> Any:
    return size.node.expr if isinstance(size, torch.SymInt) else int(size)


def _shape(t: torch.Tensor) -> str:
    return str(tuple(t.shape))


def _check_batch(index: int, batch: tuple[Any, ...], example: tuple[Any, ...], specs: list[list[_InputSpec]],
                 ranges: dict[Any, Any]) -> None:
    if len(batch) != len(example):
        raise CalibrationError(f"calibration batch {index} has {len(batch)} inputs; the program takes "
                               f"{len(example)}: give one tuple of {len(example)} per batch")
    bound: dict[Any, tuple[int, str]] = {}  # symbol -> (size, where it was first seen)
    for pos, (got, want) in enumerate(zip(batch, example, strict=True)):
        leaves, got_spec = pytree.tree_flatten(got)
        if got_spec != pytree.tree_structure(want):
            raise CalibrationError(f"calibration batch {index}, input {pos} is nested differently from the "
                                   "example input; give it the example's structure")
        for leaf, spec in zip(leaves, specs[pos], strict=True):
            where = f"calibration batch {index}, {spec.label}"
            if isinstance(spec.example, torch.Tensor):
                _check_tensor(where, leaf, spec, ranges, bound)


def _check_tensor(where: str, got: Any, spec: _InputSpec, ranges: dict[Any, Any],
                  bound: dict[Any, tuple[int, str]]) -> None:
    want = spec.example
    if not isinstance(got, torch.Tensor):
        raise CalibrationError(f"{where} is a {type(got).__name__}; the program takes a tensor of shape "
                               f"{_shape(want)} {want.dtype}")
    if got.dtype != want.dtype:
        raise CalibrationError(f"{where} is {got.dtype}; the program takes {want.dtype}: convert it "
                               f"(.to({want.dtype}))")
    if got.dim() != want.dim():
        raise CalibrationError(f"{where} has shape {_shape(got)} ({got.dim()}-D); the program takes "
                               f"{want.dim()}-D inputs like {_shape(want)}")
    empty = [d for d, size in enumerate(got.shape) if size == 0 and want.shape[d] != 0]
    if empty:
        raise CalibrationError(f"{where} has shape {_shape(got)}: dim {empty[0]} is 0, the batch holds no "
                               "samples; drop the empty batch")
    _check_dims(where, got, spec, ranges, bound)
    _check_finite(where, got)


def _check_dims(where: str, got: torch.Tensor, spec: _InputSpec, ranges: dict[Any, Any],
                bound: dict[Any, tuple[int, str]]) -> None:
    want = spec.example
    if spec.dims is None:
        # the program's placeholders are not known: the old rule, only the leading dim may differ
        if tuple(got.shape[1:]) != tuple(want.shape[1:]):
            raise CalibrationError(f"{where} has shape {_shape(got)}; the program was captured with "
                                   f"{_shape(want)} (only the leading batch dimension may differ)")
        return
    fitting = tuple(s if isinstance(d, int) else g for d, s, g in zip(spec.dims, want.shape, got.shape, strict=True))
    for d, (dim, size) in enumerate(zip(spec.dims, got.shape, strict=True)):
        if isinstance(dim, int):
            if size != dim:
                which = "a dynamic batch dimension" if d == 0 else f"dim {d} dynamic"
                raise CalibrationError(
                    f"{where} has shape {_shape(got)} but the program was exported with dim {d} fixed at {dim}; "
                    f"export with {which} (torch.export.Dim) or give batches of shape {fitting}")
            continue
        _check_symbol(where, f"{spec.label} dim {d}", got, d, dim, ranges, bound)


def _check_symbol(where: str, here: str, got: torch.Tensor, d: int, expr: Any, ranges: dict[Any, Any],
                  bound: dict[Any, tuple[int, str]]) -> None:
    """A dynamic dim: inside the range the export declared, and equal wherever the export ties it."""
    size = int(got.shape[d])
    if not getattr(expr, "is_Symbol", False):
        return  # a derived dim (e.g. 2*s0): its symbol is bound elsewhere; not solved for here
    limits = ranges.get(expr)
    if limits is not None:
        low, high = limits.lower, limits.upper
        if bool(size < low) or bool(size > high):
            span = f"[{low}, {high}]" if bool(high.is_finite) else f"[{low}, inf)"
            raise CalibrationError(f"{where} has shape {_shape(got)}: dim {d} is {size}, outside the range {span} "
                                   "the export declared for it; give sizes in that range or export with a wider "
                                   "torch.export.Dim")
    if expr in bound and bound[expr][0] != size:
        first_size, first = bound[expr]
        raise CalibrationError(f"{where} has shape {_shape(got)}: {here} is {size} but {first} is {first_size}, "
                               "and the export ties them to one size; give them equal sizes")
    bound.setdefault(expr, (size, here))


def _check_finite(where: str, got: torch.Tensor) -> None:
    if not (got.is_floating_point() or got.is_complex()):
        return
    finite = torch.isfinite(got)
    if bool(finite.all()):
        return
    nan, inf = int(torch.isnan(got).sum()), int(torch.isinf(got).sum())
    found = " and ".join(f"{what} at {count}" for what, count in (("NaN", nan), ("inf", inf)) if count)
    first = tuple(int(i) for i in (~finite).nonzero()[0])
    raise CalibrationError(f"{where} holds {found} of {got.numel()} values (first at index {list(first)}); "
                           "clean or drop that sample")
