"""A lazy name -> entry registry, shared by passes and targets.

Entries register themselves when their module is imported; the registry imports the modules it
knows about the first time it is read, so ``import sparsecc`` stays light (no TVM) and a new pass
or target is one module plus one line naming it.
"""

from __future__ import annotations

import importlib
from collections.abc import Sequence
from typing import Generic, TypeVar

from .errors import SparseccError

T = TypeVar("T")


class LazyRegistry(Generic[T]):
    def __init__(self, kind: str, modules: Sequence[str], error: type[SparseccError], listing_command: str) -> None:
        self.kind = kind
        self.modules = tuple(modules)
        self.error = error
        self.listing_command = listing_command
        self._entries: dict[str, T] = {}
        self._loaded = False

    def register(self, name: str, entry: T) -> T:
        if not name:
            raise self.error(f"{self.kind} {entry!r} has no name")
        if name in self._entries and self._entries[name] is not entry:
            raise self.error(f"{self.kind} name {name!r} registered twice")
        self._entries[name] = entry
        return entry

    def _load(self) -> None:
        if not self._loaded:
            self._loaded = True
            for module in self.modules:
                importlib.import_module(module)

    def get(self, name: str) -> T:
        self._load()
        try:
            return self._entries[name]
        except KeyError:
            known = ", ".join(sorted(self._entries))
            raise self.error(f"unknown {self.kind} {name!r}; known: {known} (see `{self.listing_command}`)") from None

    def all(self) -> list[T]:
        self._load()
        return [self._entries[name] for name in sorted(self._entries)]
