"""Locating files inside the offline model packages without importing them (their ``__init__``
modules import tools sparsecc does not need)."""

from __future__ import annotations

import importlib.util
from pathlib import Path


def package_file(package: str, relative: str, what: str, install: str, error: type[Exception]) -> Path:
    """``relative`` inside the installed ``package``, or ``error`` naming ``install``."""
    spec = importlib.util.find_spec(package)
    if spec is None or spec.origin is None:
        raise error(f"{what} is not installed; run: {install}")
    path = Path(spec.origin).resolve().parent / relative
    if not path.exists():
        raise error(f"{path} is missing from the {package} package; reinstall it: {install}")
    return path
