"""Real English prose and code for language-model calibration and perplexity: the Python 3.11
documentation sources that Debian installs offline (``apt-get install python3.11-doc``).

Calibration and evaluation text are kept apart by folder: the library reference (``library/``)
calibrates, the tutorial (``tutorial/``) and the how-to guides (``howto/``) evaluate.
Calibration segments start at seeded random places of seeded random files; evaluation windows
are fixed (evenly spaced over the folder's text), so every method is scored on the same tokens.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

DOCS = Path("/usr/share/doc/python3.11/html/_sources")
INSTALL_COMMAND = "apt-get install -y python3.11-doc"


class DocsMissingError(RuntimeError):
    """The Python documentation sources are not installed."""


def docs_folder(name: str) -> Path:
    """``DOCS / name``, or :class:`DocsMissingError` naming the install command."""
    folder = DOCS / name
    if not folder.is_dir():
        raise DocsMissingError(f"{folder} is missing: the Python documentation text is not installed; "
                               f"run: {INSTALL_COMMAND}")
    return folder


def _files(folder: str) -> list[Path]:
    return sorted(docs_folder(folder).rglob("*.rst.txt"))


def calibration_segments(tokenizer: Any, count: int, length: int, *, seed: int = 0,
                         folder: str = "library") -> list[torch.Tensor]:
    """``count`` (1, length) token windows, each from a seeded random file of ``folder`` (with at
    least ``length`` tokens) at a seeded random offset. Only the chosen files are tokenized."""
    rng = random.Random(seed)
    files = _files(folder)
    order = rng.sample(files, len(files))
    segments = []
    for path in order:
        ids = tokenizer(path.read_text(encoding="utf-8", errors="replace")).input_ids
        if len(ids) <= length:
            continue
        start = rng.randrange(0, len(ids) - length)
        segments.append(torch.tensor([ids[start:start + length]]))
        if len(segments) == count:
            return segments
    raise DocsMissingError(f"{folder}/ has only {len(segments)} files longer than {length} tokens; "
                           f"{count} were asked for")


def evaluation_windows(tokenizer: Any, count: int, length: int, *, folder: str = "tutorial") -> list[torch.Tensor]:
    """``count`` non-overlapping (1, length) windows spread evenly over all of ``folder``'s text
    (its files joined in name order)."""
    ids: list[int] = []
    for path in _files(folder):
        ids += tokenizer(path.read_text(encoding="utf-8", errors="replace") + "\n\n").input_ids
    available = len(ids) // length
    if available < count:
        raise DocsMissingError(f"{folder}/ holds {available} windows of {length} tokens; {count} were asked for")
    step = available / count
    return [torch.tensor([ids[int(i * step) * length:(int(i * step) + 1) * length]]) for i in range(count)]


@torch.no_grad()
def perplexity(logits_of: Callable[[torch.Tensor], torch.Tensor], windows: Sequence[torch.Tensor]) -> float:
    """exp of the mean next-token negative log-likelihood over all ``windows``; ``logits_of`` maps
    (1, T) ids to (1, T, vocab) logits."""
    total, tokens = 0.0, 0
    for ids in windows:
        logits = logits_of(ids)
        total += float(F.cross_entropy(logits[0, :-1].float(), ids[0, 1:], reduction="sum"))
        tokens += ids.shape[1] - 1
    return math.exp(total / tokens)
