"""Registry of targets by name. Target modules register themselves on import."""

from __future__ import annotations

import importlib

from sparsecc.errors import TargetError

from .base import TargetRecord

_TARGETS: dict[str, TargetRecord] = {}
# Modules that define targets; imported lazily the first time the registry is read.
_TARGET_MODULES = ("sparsecc.targets.x86",)
_loaded = False


def register(record: TargetRecord) -> TargetRecord:
    if record.name in _TARGETS:
        raise TargetError(f"target {record.name!r} registered twice")
    _TARGETS[record.name] = record
    return record


def _load() -> None:
    global _loaded
    if not _loaded:
        _loaded = True
        for module in _TARGET_MODULES:
            importlib.import_module(module)


def get_target(name: str) -> TargetRecord:
    _load()
    try:
        return _TARGETS[name]
    except KeyError:
        known = ", ".join(sorted(_TARGETS))
        raise TargetError(f"unknown target {name!r}; known targets: {known} (see `sparsecc targets`)") from None


def all_targets() -> list[TargetRecord]:
    _load()
    return [_TARGETS[k] for k in sorted(_TARGETS)]
