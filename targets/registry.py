"""Registry of targets by name. Target modules register themselves on import; add a new
target's module to the list below."""

from __future__ import annotations

from sparsecc.errors import TargetError
from sparsecc.registry import LazyRegistry

from .base import TargetRecord

#: every target's module, imported the first time the registry is read
TARGET_MODULES = (
    "sparsecc.targets.x86",
    "sparsecc.targets.wasm",
    "sparsecc.targets.arm",
    "sparsecc.targets.cuda",
)

_TARGETS: LazyRegistry[TargetRecord] = LazyRegistry("target", TARGET_MODULES, TargetError, "sparsecc targets")


def register(record: TargetRecord) -> TargetRecord:
    return _TARGETS.register(record.name, record)


def get_target(name: str) -> TargetRecord:
    return _TARGETS.get(name)


def all_targets() -> list[TargetRecord]:
    return _TARGETS.all()
