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

import torch

from .errors import SparseccError

PLAN_SCHEMA_VERSION = 1


class PlanError(SparseccError):
    """A plan file that does not parse or does not fit the program."""


@dataclass
class LayerPlan:
    """The decision for one layer. ``pattern`` None means the layer stays dense.

    ``row_sparsity`` (unstructured only, optional): one sparsity per output row, whose mean is
    ``sparsity``; a row-wise allocation writes it, and pruning then keeps that many weights in
    each row instead of the same number everywhere.
    """

    name: str
    kind: str
    shape: list[int]
    pattern: str | None
    sparsity: float
    reason: str = ""
    row_sparsity: list[float] | None = None
    # What a search predicted for the chosen candidate (absent in hand-written and uniform plans):
    # seconds of its kernel and of the dense one, and its output error on calibration data
    predicted_s: float | None = None
    dense_s: float | None = None
    error: float | None = None

    @property
    def is_sparse(self) -> bool:
        return self.pattern is not None

    def mask_sparsity(self) -> float | torch.Tensor:
        """What a pattern's mask takes: the per-row sparsities when the plan has them, else one."""
        if self.row_sparsity is None:
            return self.sparsity
        return torch.tensor(self.row_sparsity, dtype=torch.float64)

    def check(self) -> None:
        """Refuse a per-row list that does not fit the layer."""
        rows = self.row_sparsity
        if rows is None:
            return
        if self.pattern != "unstructured":
            raise PlanError(f"layer {self.name}: row_sparsity is only for the unstructured pattern, not "
                            f"{self.pattern}; remove it from the plan")
        if len(rows) != self.shape[0]:
            raise PlanError(f"layer {self.name}: row_sparsity has {len(rows)} entries for {self.shape[0]} output "
                            "rows; give one per row or remove it")
        if any(not (isinstance(v, int | float) and 0.0 <= v < 1.0) for v in rows):
            raise PlanError(f"layer {self.name}: every row_sparsity must be in [0, 1)")

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        # optional fields are written only when set, so plans without them read as before
        for key in ("row_sparsity", "predicted_s", "dense_s", "error"):
            if data[key] is None:
                del data[key]
        return data


@dataclass
class Plan:
    target: str
    method: str
    layers: dict[str, LayerPlan] = field(default_factory=dict)
    schema_version: int = PLAN_SCHEMA_VERSION
    # How a search chose the plan (budget, totals, the plans it weighed); empty otherwise
    search: dict[str, Any] = field(default_factory=dict)

    def sparse_layers(self) -> list[LayerPlan]:
        return [lp for lp in self.layers.values() if lp.is_sparse]

    def dense_layers(self) -> list[LayerPlan]:
        return [lp for lp in self.layers.values() if not lp.is_sparse]

    def to_json(self) -> dict[str, Any]:
        data = {
            "schema_version": self.schema_version,
            "target": self.target,
            "method": self.method,
            "layers": [lp.to_json() for lp in self.layers.values()],
        }
        if self.search:
            data["search"] = self.search
        return data

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
            for lp in layers.values():
                lp.check()
            return cls(target=data["target"], method=data["method"], layers=layers,
                       search=dict(data.get("search") or {}))
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
