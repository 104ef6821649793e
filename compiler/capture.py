"""Capture: ``torch.export`` a model into a Program, with errors a person can act on.

Also loads and saves ``.pt2`` files. Private torch.export details (the custom-op registration
warning on load) are handled here and nowhere else.
"""

from __future__ import annotations

import logging
import pathlib
import traceback
from collections.abc import Sequence
from typing import Any

import torch

from .errors import CaptureError
from .program import Program


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
            strict: bool = False) -> Program:
    """Export ``model`` called on ``example_inputs`` into a Program.

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
    return Program(exported, inputs, stage="captured")


def from_exported(exported: torch.export.ExportedProgram,
                  example_inputs: Sequence[Any] | None = None) -> Program:
    """Wrap an existing ExportedProgram. Example inputs default to those stored in it."""
    if example_inputs is None:
        stored = getattr(exported, "example_inputs", None)
        if stored is None or not stored[0]:
            raise CaptureError(
                "the exported program stores no example inputs; pass example_inputs explicitly")
        example_inputs = stored[0]
    return Program(exported, _as_tuple(example_inputs), stage="captured")


class _RecordWarnings(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


def load_exported(path: str | pathlib.Path) -> torch.export.ExportedProgram:
    """``torch.export.load`` with a plain message when the file is missing, damaged, or uses a
    custom op that is not registered in this process."""
    from . import ops  # noqa: F401 - registers sparsecc's ops so packed programs load

    path = pathlib.Path(path)
    if not path.is_file():
        raise CaptureError(f"model file {path} does not exist (expected a torch.export.save .pt2 file)")
    handler = _RecordWarnings()
    logger = logging.getLogger("torch")
    logger.addHandler(handler)
    try:
        return torch.export.load(str(path))
    except Exception as exc:  # noqa: BLE001
        hint = next((m for m in handler.messages if "custom op" in m.lower()), None)
        reason = hint or _short_reason(exc, limit=3)
        raise CaptureError(
            f"could not load {path} as a torch.export program: {reason}\n"
            "  fix: pass a file written by torch.export.save; if it uses custom ops, import the "
            "module that registers them first") from None
    finally:
        logger.removeHandler(handler)


def load_program(path: str | pathlib.Path, example_inputs: Sequence[Any] | None = None) -> Program:
    return from_exported(load_exported(path), example_inputs)
