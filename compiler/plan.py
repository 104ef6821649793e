"""Plan: the per-layer sparsity decisions, as editable and reloadable JSON.

A plan names, for every prunable layer, the pattern and sparsity it gets, or that it stays dense
and why. The planning pass writes it (uniformly for now; the search pass later chooses per layer),
the prune and pack passes read it, and the artifact stores it.
"""

from __future__ import annotations

import json
import math
import pathlib
from dataclasses import asdict, dataclass, field, fields
from typing import Any

import torch

from .errors import SparseccError
from .sparsity import parse_pattern

PLAN_SCHEMA_VERSION = 1
#: the pruning methods a plan may name: sparsecc.api.METHODS (not imported: api imports this
#: module), and the channel pruning pass's ``channels-<importance>``
PLAN_METHODS = ("magnitude", "wanda", "sparsegpt")
CHANNEL_METHODS = tuple(f"channels-{importance}" for importance in ("l1", "l2", "taylor", "fluctuation"))
#: problems listed in one error before the rest are only counted (the message stays one line)
MAX_LISTED_PROBLEMS = 8


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
    def from_json(cls, data: Any, *, source: str = "plan") -> Plan:
        """The plan ``data`` (parsed JSON) describes; every field is checked and all problems are
        reported in one PlanError (``source`` names the plan in it, e.g. "plan file p.json")."""
        if not isinstance(data, dict):
            kind = "a JSON list" if isinstance(data, list) else f"JSON {_show(data)}"
            raise PlanError(f"{source} holds {kind}, not an object with schema_version, target, method and layers; "
                            "fix the file or run `sparsecc search` again")
        problems = plan_problems(data)
        if problems:
            raise PlanError(_problems_message(source, problems))
        layers = {entry["name"]: _layer_from_json(entry) for entry in data["layers"]}
        return cls(target=data["target"], method=data["method"], layers=layers,
                   search=dict(data.get("search") or {}))

    @classmethod
    def load(cls, path: str | pathlib.Path) -> Plan:
        """Read a plan JSON file; anything wrong with it (missing, unreadable, not UTF-8, not JSON,
        a bad field) raises PlanError with a one-line message."""
        source = f"plan file {path}"
        return cls.from_json(_read_json(pathlib.Path(path), source), source=source)

    def save(self, path: str | pathlib.Path) -> None:
        pathlib.Path(path).write_text(self.dumps())


# -- reading and checking plan JSON ----------------------------------------------------------------

_LAYER_FIELDS = tuple(f.name for f in fields(LayerPlan))
_LAYER_REQUIRED = ("name", "kind", "shape", "pattern", "sparsity")
_TOP_FIELDS = ("schema_version", "target", "method", "layers", "search")
_TOP_REQUIRED = ("schema_version", "target", "method", "layers")
_OPTIONAL_NUMBERS = ("predicted_s", "dense_s", "error")


def _read_json(path: pathlib.Path, source: str) -> Any:
    """The parsed JSON of ``path``; every way a file can fail is one PlanError line."""
    try:
        if path.exists() and not path.is_file():
            raise PlanError(f"{source} is not a regular file; give a plan JSON file")
        raw = path.read_bytes()
    except FileNotFoundError:
        raise PlanError(f"{source} does not exist; give the path of a plan JSON file (sparsecc search -o "
                        "PLAN.json)") from None
    except (OSError, ValueError) as exc:  # a folder, no permission, a name too long or with a NUL byte
        why = exc.strerror if isinstance(exc, OSError) and exc.strerror else "not a file name"
        raise PlanError(f"{source} cannot be read ({why}); give a readable plan JSON file") from None
    try:
        text = raw.decode("utf-8-sig")  # a BOM, as some editors write, is not an error
    except UnicodeDecodeError as exc:
        raise PlanError(f"{source} is not UTF-8 text (byte {exc.start} is invalid); give a plan JSON file, not a "
                        "binary one") from None
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise PlanError(f"{source} is not valid JSON: {exc.msg} at line {exc.lineno} column {exc.colno}; fix the "
                        "file or run `sparsecc search` again") from None
    except ValueError:  # json reads an integer of more digits than Python converts
        raise PlanError(f"{source} holds a number with too many digits; fix the file or run `sparsecc search` "
                        "again") from None
    except RecursionError:
        raise PlanError(f"{source} is nested too deeply to read; fix the file or run `sparsecc search` again") from None


def _problems_message(source: str, problems: list[str]) -> str:
    listed = problems[:MAX_LISTED_PROBLEMS]
    more = len(problems) - len(listed)
    text = "; ".join(listed) + (f"; and {more} more" if more else "")
    noun = "problem" if len(problems) == 1 else "problems"
    return f"{source} has {len(problems)} {noun}: {text}; fix the file or run `sparsecc search` again"


def _show(value: Any) -> str:
    """A JSON value as a short one-line text for an error message."""
    try:
        text = json.dumps(value)  # escapes newlines and non-ASCII, so the message stays one printable line
    except (TypeError, ValueError, RecursionError):
        text = type(value).__name__
    return text if len(text) <= 40 else text[:37] + "..."


def _is_real(value: Any) -> bool:
    """A JSON number (an int or float, not a bool)."""
    return isinstance(value, int | float) and not isinstance(value, bool)


def _is_finite_non_negative(value: Any) -> bool:
    # an int is finite however large (math.isfinite would overflow converting it)
    return _is_real(value) and value >= 0 and (not isinstance(value, float) or math.isfinite(value))


def plan_problems(data: Any) -> list[str]:
    """Everything wrong with plan JSON ``data``, one short phrase each (empty when it is a valid plan)."""
    if not isinstance(data, dict):
        kind = "a JSON list" if isinstance(data, list) else f"a JSON {type(data).__name__}"
        return [f"it holds {kind}, not an object with schema_version, target, method and layers"]
    version = data.get("schema_version")
    if type(version) is not int or version != PLAN_SCHEMA_VERSION:
        # another version lays out its fields differently: checking them would only add noise
        shown = f"is {_show(version)}" if "schema_version" in data else "is missing"
        return [f"schema_version {shown}, this sparsecc reads version {PLAN_SCHEMA_VERSION}"]
    problems = _unknown_and_missing("", data, _TOP_FIELDS, _TOP_REQUIRED)
    problems += _top_field_problems(data)
    layers = data.get("layers")
    if "layers" in data and not isinstance(layers, list):
        problems.append(f"layers is {_show(layers)}, must be a list of layer objects")
    elif isinstance(layers, list):
        problems += _layers_problems(layers)
    return problems


def _unknown_and_missing(prefix: str, data: dict[str, Any], known: tuple[str, ...],
                         required: tuple[str, ...]) -> list[str]:
    problems = [f"{prefix}{key} is missing" for key in required if key not in data]
    unknown = [str(key) for key in data if key not in known]
    if unknown:
        where = prefix.rstrip(".") or "the plan"
        problems.append(f"{where} has unknown field(s) {', '.join(_show(k) for k in unknown[:3])} "
                        f"(known: {', '.join(known)})")
    return problems


def _top_field_problems(data: dict[str, Any]) -> list[str]:
    problems = []
    target, method = data.get("target"), data.get("method")
    if "target" in data and not (isinstance(target, str) and target):
        problems.append(f"target is {_show(target)}, must be a target name such as \"x86\"")
    if "method" in data and method not in PLAN_METHODS + CHANNEL_METHODS:
        problems.append(f"method is {_show(method)}, must be one of {', '.join(PLAN_METHODS)}")
    search = data.get("search")
    if search is not None and not isinstance(search, dict):
        problems.append(f"search is {_show(search)}, must be an object (or absent)")
    return problems


def _layers_problems(layers: list[Any]) -> list[str]:
    problems: list[str] = []
    first_index: dict[str, int] = {}
    for i, entry in enumerate(layers):
        where = f"layers[{i}]"
        if not isinstance(entry, dict):
            problems.append(f"{where} is {_show(entry)}, must be an object with name, kind, shape, pattern and "
                            "sparsity")
            continue
        problems += _unknown_and_missing(f"{where}.", entry, _LAYER_FIELDS, _LAYER_REQUIRED)
        problems += _layer_problems(where, entry)
        name = entry.get("name")
        if isinstance(name, str) and name in first_index:
            problems.append(f"{where}.name {_show(name)} repeats layers[{first_index[name]}]'s; names must be "
                            "unique")
        elif isinstance(name, str):
            first_index[name] = i
    return problems


def _layer_problems(where: str, entry: dict[str, Any]) -> list[str]:
    problems = []
    for key in ("name", "kind"):
        if key in entry and not (isinstance(entry[key], str) and entry[key]):
            problems.append(f"{where}.{key} is {_show(entry[key])}, must be a non-empty string")
    if "reason" in entry and not isinstance(entry["reason"], str):
        problems.append(f"{where}.reason is {_show(entry['reason'])}, must be a string")
    shape = entry.get("shape")
    shape_ok = isinstance(shape, list) and bool(shape) and all(type(d) is int and d > 0 for d in shape)
    if "shape" in entry and not shape_ok:
        problems.append(f"{where}.shape is {_show(shape)}, must be a list of positive integers")
    pattern, pattern_problem = _pattern_of(entry.get("pattern"))
    if "pattern" in entry and pattern_problem:
        problems.append(f"{where}.pattern {pattern_problem}")
    problems += _sparsity_problems(where, entry, pattern)
    problems += _row_problems(where, entry, pattern, shape if shape_ok else None)
    for key in _OPTIONAL_NUMBERS:
        value = entry.get(key)
        if value is not None and not _is_finite_non_negative(value):
            problems.append(f"{where}.{key} is {_show(value)}, must be null or a finite number >= 0")
    return problems


def _pattern_of(value: Any) -> tuple[Any, str | None]:
    """(the parsed pattern or None when dense, why ``value`` is not a pattern or None)."""
    if value is None:
        return None, None
    bad = f"{_show(value)} is not a pattern (null for dense, unstructured, blockRxC, N:M, ...)"
    if not isinstance(value, str):
        return None, bad
    try:
        return parse_pattern(value), None
    except (SparseccError, ValueError):  # ValueError: digits too many to convert
        return None, bad


def _sparsity_problems(where: str, entry: dict[str, Any], pattern: Any) -> list[str]:
    if "sparsity" not in entry:
        return []
    value = entry["sparsity"]
    if not (_is_real(value) and 0 <= value < 1):
        return [f"{where}.sparsity is {_show(value)}, must be a number in [0, 1)"]
    why = pattern.check_sparsity(float(value)) if pattern is not None else None
    return [f"{where}.sparsity: {why}"] if why else []


def _row_problems(where: str, entry: dict[str, Any], pattern: Any, shape: list[int] | None) -> list[str]:
    rows = entry.get("row_sparsity")
    if rows is None:
        return []
    if not isinstance(rows, list):
        return [f"{where}.row_sparsity is {_show(rows)}, must be null or a list of numbers in [0, 1)"]
    problems = []
    named = "a dense layer (pattern null)" if entry.get("pattern") is None else (pattern.name if pattern else None)
    if named is not None and named != "unstructured":
        problems.append(f"{where}.row_sparsity is only for the unstructured pattern, not {named}; remove it")
    if shape is not None and len(rows) != shape[0]:
        problems.append(f"{where}.row_sparsity has {len(rows)} entries for {shape[0]} output rows; give one per row "
                        "or remove it")
    bad = next((j for j, v in enumerate(rows) if not (_is_real(v) and 0 <= v < 1)), None)
    if bad is not None:
        problems.append(f"{where}.row_sparsity[{bad}] is {_show(rows[bad])}, every entry must be in [0, 1)")
    return problems


def _layer_from_json(entry: dict[str, Any]) -> LayerPlan:
    """A checked layer entry as a LayerPlan, its pattern in canonical spelling (`` Block16X1`` ->
    ``block16x1``) so the passes can compare names."""
    values = dict(entry)
    if values["pattern"] is not None:
        values["pattern"] = parse_pattern(values["pattern"]).name
    values["shape"] = list(values["shape"])
    values["sparsity"] = float(values["sparsity"])
    return LayerPlan(**values)
