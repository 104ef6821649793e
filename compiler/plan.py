"""Plan: the per-layer sparsity decisions, as editable and reloadable JSON.

A plan names, for every prunable layer, the pattern and sparsity it gets, or that it stays dense
and why. The planning pass writes it (uniformly for now; the search pass later chooses per layer),
the prune and pack passes read it, and the artifact stores it.
"""

from __future__ import annotations

import json
import pathlib
from dataclasses import asdict, dataclass, field
from typing import Any

from .errors import SparseccError

PLAN_SCHEMA_VERSION = 1


class PlanError(SparseccError):
    """A plan file that does not parse or does not fit the program."""


@dataclass
class LayerPlan:
    """The decision for one layer. ``pattern`` None means the layer stays dense."""

    name: str
    kind: str
    shape: list[int]
    pattern: str | None
    sparsity: float
    reason: str = ""

    @property
    def is_sparse(self) -> bool:
        return self.pattern is not None


@dataclass
class Plan:
    target: str
    method: str
    layers: dict[str, LayerPlan] = field(default_factory=dict)
    schema_version: int = PLAN_SCHEMA_VERSION

    def sparse_layers(self) -> list[LayerPlan]:
        return [lp for lp in self.layers.values() if lp.is_sparse]

    def dense_layers(self) -> list[LayerPlan]:
        return [lp for lp in self.layers.values() if not lp.is_sparse]

    def to_json(self) -> dict[str, Any]:
        return {
            "schema_version": self.schema_version,
            "target": self.target,
            "method": self.method,
            "layers": [asdict(lp) for lp in self.layers.values()],
        }

    def dumps(self) -> str:
        return json.dumps(self.to_json(), indent=2) + "\n"

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Plan:
        version = data.get("schema_version")
        if version != PLAN_SCHEMA_VERSION:
            raise PlanError(
                f"plan schema version {version!r} is not supported (this sparsecc reads version "
                f"{PLAN_SCHEMA_VERSION}); regenerate the plan with this version")
        try:
            layers = {entry["name"]: LayerPlan(**entry) for entry in data["layers"]}
            return cls(target=data["target"], method=data["method"], layers=layers)
        except (KeyError, TypeError) as exc:
            raise PlanError(f"plan is missing or has a malformed field: {exc}") from None

    @classmethod
    def load(cls, path: str | pathlib.Path) -> Plan:
        try:
            return cls.from_json(json.loads(pathlib.Path(path).read_text()))
        except json.JSONDecodeError as exc:
            raise PlanError(f"plan file {path} is not valid JSON: {exc}") from None

    def save(self, path: str | pathlib.Path) -> None:
        pathlib.Path(path).write_text(self.dumps())
