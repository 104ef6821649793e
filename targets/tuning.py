"""Schedule explorer and measured cost table for kernels that run on this machine.

Every kernel module offers a handful of schedules for a problem (``csr_schedules``,
``bsr_schedules``, ``nm_schedules``, ``dense_schedules``; the heuristic choice first). The explorer
builds each candidate, checks its output against a float64 reference once, and times all of them
interleaved in one process (load from other processes hits them alike). The fastest one and every
candidate's time (the lower quartile of its interleaved blocks, see :func:`explore`) go into a
:class:`CostTable`, a JSON file per CPU model, vector width and thread count. Lowering asks the
table for the schedule of each kernel it builds (a problem nobody measured keeps the heuristic
choice), and :class:`CostModel` reads the same entries to predict a
layer's time, falling back to a roofline where nothing was measured.

Kernels whose weight values are stored as bf16 (``weights="bfloat16"``) are separate problems:
their keys end in `` bf16``, so fp32 and bf16 timings never mix.

TVM's meta-schedule is not used: its tuner crashed in TVM 0.27 on these machines, and a few
explored knobs per kernel family reach the hand-tuned numbers.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import fcntl
import json
import os
import pathlib
import tempfile
from dataclasses import dataclass
from typing import Any

import numpy as np
from sparsecc.errors import SparseccError
from sparsecc.sparsity import Packed, PackedBSR, PackedCSR, PackedNM, parse_pattern

from .base import Capabilities

#: bump when the meaning of a table entry changes; older tables are ignored with a message
TABLE_VERSION = 1
#: densities are bucketed to this step: schedules change with density only gradually
DENSITY_STEP = 0.05
#: storage types of weight values (as the kernels' ``weights`` schedule field spells them)
WEIGHT_DTYPES = ("float32", "bfloat16")
#: appended to the table key of a problem whose weight values are stored as bf16
BF16_KEY_SUFFIX = " bf16"


class CostTableError(SparseccError):
    """A cost table file that cannot be read or does not belong to this machine."""


def _fmt_of(packed: Packed | None) -> str:
    if packed is None:
        return "dense"
    return {PackedCSR: "csr", PackedBSR: "bsr", PackedNM: "nm"}[type(packed)]


@dataclass(frozen=True)
class Problem:
    """One kernel problem: packed format and its shape parameters, weight shape, rows of x, density."""

    fmt: str  # "csr", "bsr", "nm" or "dense"
    detail: str  # "" (csr, dense), "r16c1" (bsr), "2:4" (nm)
    shape: tuple[int, int]
    m: int
    density: float  # stored fraction of the weight, rounded to DENSITY_STEP (1.0 for dense)
    weights: str = "float32"  # storage of the weight values: "float32" or "bfloat16"

    @classmethod
    def of(cls, m: int, packed: Packed | None, shape: tuple[int, int] | None = None,
           weights: str = "float32") -> Problem:
        """The problem of a packed weight (or of a dense weight of ``shape`` when ``packed`` is None)
        whose values are stored as ``weights``."""
        if weights not in WEIGHT_DTYPES:
            raise SparseccError(f"weights {weights!r}: choose float32 or bfloat16")
        if packed is None:
            if shape is None:
                raise ValueError("a dense problem needs the weight shape")
            return cls("dense", "", tuple(shape), m, 1.0, weights)
        n, k = packed.shape
        if isinstance(packed, PackedBSR):
            detail = f"r{packed.block[0]}c{packed.block[1]}"
        elif isinstance(packed, PackedNM):
            detail = f"{packed.n}:{packed.m}"
        else:
            detail = ""
        density = round(round(packed.nnz / max(1, n * k) / DENSITY_STEP) * DENSITY_STEP, 4)
        return cls(_fmt_of(packed), detail, (int(n), int(k)), int(m), density, weights)

    def key(self) -> str:
        detail = f"/{self.detail}" if self.detail else ""
        suffix = BF16_KEY_SUFFIX if self.weights == "bfloat16" else ""
        return f"{self.fmt}{detail} {self.shape[0]}x{self.shape[1]} m{self.m} d{self.density:.2f}{suffix}"

    def family(self) -> str:
        """The key without its density: problems that differ only in how many weights they keep."""
        return _family_of(self.key())[0]


def _family_of(key: str) -> tuple[str, float]:
    """(the key with its density field blanked, the density) of a table key."""
    fields = key.split(" ")
    density = next((i for i, f in enumerate(fields) if f.startswith("d") and f[1:].replace(".", "").isdigit()), None)
    if density is None:
        return key, float("nan")
    value = float(fields[density][1:])
    fields[density] = "d*"
    return " ".join(fields), value


def schedule_space(m: int, packed: Packed | None, caps: Capabilities,
                   shape: tuple[int, int] | None = None, weights: str = "float32") -> list[Any]:
    """The format's candidate schedules for this problem, heuristic default first, all storing
    their weight values as ``weights``."""
    from .kernels import bsr, csr, dense, nm

    if packed is None:
        space = dense.dense_schedules(m, shape, caps)
    elif isinstance(packed, PackedCSR):
        space = csr.csr_schedules(m, packed, caps)
    elif isinstance(packed, PackedBSR):
        space = bsr.bsr_schedules(m, packed, caps)
    else:
        space = nm.nm_schedules(m, packed, caps)
    if weights == "float32":
        return space
    return list(dict.fromkeys(dataclasses.replace(s, weights=weights) for s in space))


def default_schedule(m: int, packed: Packed | None, caps: Capabilities, shape: tuple[int, int] | None = None,
                     weights: str = "float32") -> Any:
    """The format's heuristic schedule for this problem, storing its values as ``weights``."""
    return schedule_space(m, packed, caps, shape, weights)[0]


def schedule_from_dict(fmt: str, fields: dict[str, Any]) -> Any:
    """Rebuild a schedule stored in a table entry."""
    from .kernels import bsr, csr, dense, nm

    cls = {"csr": csr.CSRSchedule, "bsr": bsr.BSRSchedule, "nm": nm.NMSchedule, "dense": dense.DenseSchedule}[fmt]
    return cls(**fields)


def _describe(schedule: Any) -> str:
    return str(schedule.describe())


def default_table_path(mcpu: str, caps: Capabilities) -> pathlib.Path:
    """``$SPARSECC_CACHE`` (default ``~/.cache/sparsecc``) ``/cost-table-<cpu>-<bits>b-t<threads>.json``."""
    root = pathlib.Path(os.environ.get("SPARSECC_CACHE") or pathlib.Path.home() / ".cache" / "sparsecc")
    return root / f"cost-table-{mcpu}-{caps.vector_bits}b-t{caps.threads}.json"


class CostTable:
    """Measured kernel times per problem, with the fastest schedule; a JSON file.

    The file names the CPU, vector width and thread count it was measured with; loading a table
    measured elsewhere is refused (its times would mislead the cost model).
    """

    def __init__(self, path: str | os.PathLike[str], machine: dict[str, Any]):
        self.path = pathlib.Path(path)
        self.machine = dict(machine)
        self.entries: dict[str, dict[str, Any]] = {}
        # family -> [(density, key), ...] by density, and the (entries, size) it was built from:
        # a search asks for thousands of unmeasured densities, each a lookup here, not a key scan
        self._families: dict[str, list[tuple[float, str]]] = {}
        self._families_of: tuple[int, int] | None = None
        self._recorded: set[str] = set()  # keys measured here since the last save (they win)

    @classmethod
    def load(cls, path: str | os.PathLike[str], machine: dict[str, Any]) -> CostTable:
        """The table at ``path`` (empty when the file does not exist yet)."""
        table = cls(path, machine)
        table.entries = table._read_file()
        return table

    def _read_file(self) -> dict[str, dict[str, Any]]:
        """The entries the file holds now ({} when there is no file yet)."""
        if not self.path.is_file():
            return {}
        try:
            data = json.loads(self.path.read_text(encoding="utf-8"))
        except (OSError, ValueError, RecursionError) as exc:  # unreadable, not JSON, oversized integers
            raise CostTableError(f"cost table {self.path} is unreadable ({exc}); delete it and run "
                                 "`sparsecc tune` again") from None
        if data.get("version") != TABLE_VERSION:
            raise CostTableError(f"cost table {self.path} has version {data.get('version')}, this sparsecc "
                                 f"writes {TABLE_VERSION}; delete it and run `sparsecc tune` again")
        if data.get("machine") != self.machine:
            raise CostTableError(f"cost table {self.path} was measured on {data.get('machine')}, not on this "
                                 f"machine ({self.machine}); use --table to pick another file")
        return dict(data.get("entries", {}))

    def save(self) -> pathlib.Path:
        """Write atomically (a crash never leaves a half-written table), merged under a file lock
        with what the file holds now: two processes tuning into one table (two searches at once)
        both keep their measurements, and this table's own new ones win where both measured a
        problem (what it measured before its last save does not). Afterwards this table holds the
        merged entries too."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path.with_name(f".{self.path.name}.lock"), "a+") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                on_disk = self._read_file()
            except CostTableError:
                on_disk = {}  # a damaged or foreign file was unusable anyway: these measurements replace it
            merged = {**self.entries, **on_disk}
            merged.update((key, self.entries[key]) for key in self._recorded)
            payload = {"version": TABLE_VERSION, "machine": self.machine, "entries": merged}
            fd, tmp = tempfile.mkstemp(prefix=f".{self.path.name}.", dir=self.path.parent)
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                json.dump(payload, f, indent=1, sort_keys=True)
                f.write("\n")
            os.replace(tmp, self.path)
        self.entries = merged
        self._recorded.clear()
        return self.path

    def record(self, problem: Problem, results: list[tuple[Any, float]]) -> dict[str, Any]:
        """Store explorer results ``[(schedule, seconds), ...]`` (any order) for ``problem``."""
        ranked = sorted(results, key=lambda item: item[1])
        best, seconds = ranked[0]
        entry = {
            "fmt": problem.fmt,
            "schedule": dataclasses.asdict(best),
            "seconds": seconds,
            "candidates": [[_describe(s), t] for s, t in ranked],
            "default_seconds": results[0][1],
            "measured": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        }
        self.entries[problem.key()] = entry
        self._recorded.add(problem.key())
        return entry

    def rescale(self, problem: Problem, seconds: float, timed_beside: int) -> float:
        """Set ``problem``'s best time to ``seconds``, measured again beside ``timed_beside`` other
        kernels, and scale its other candidates' times alike; returns the factor applied."""
        entry = self.entries[problem.key()]
        factor = seconds / entry["seconds"]
        entry["seconds"] = seconds
        entry["default_seconds"] *= factor
        entry["candidates"] = [[name, t * factor] for name, t in entry["candidates"]]
        entry["timed_beside"] = timed_beside
        self._recorded.add(problem.key())
        return factor

    def best(self, problem: Problem) -> Any | None:
        """The fastest measured schedule for ``problem``, or None when it was never measured."""
        entry = self.entries.get(problem.key())
        if entry is None:
            return None
        schedule = schedule_from_dict(entry["fmt"], entry["schedule"])
        # an entry's schedule stores its values as its problem says (keys keep fp32 and bf16 apart)
        return dataclasses.replace(schedule, weights=problem.weights)

    def seconds(self, problem: Problem) -> float | None:
        entry = self.entries.get(problem.key())
        return None if entry is None else float(entry["seconds"])

    def _measured_densities(self, problem: Problem) -> list[tuple[float, str]]:
        """(density, key) of every measured entry of ``problem``'s family, by density."""
        # entries only grow (record) or are replaced whole (load), so identity and size tell staleness
        built_from = (id(self.entries), len(self.entries))
        if self._families_of != built_from:
            families: dict[str, list[tuple[float, str]]] = {}
            for key in self.entries:
                family, density = _family_of(key)
                families.setdefault(family, []).append((density, key))
            self._families = {family: sorted(points) for family, points in families.items()}
            self._families_of = built_from
        return self._families.get(problem.family(), [])

    def interpolated_seconds(self, problem: Problem) -> float | None:
        """Time of an unmeasured density of a measured family, linear in density between the
        nearest measured densities below and above it (a kernel's work is affine in its stored
        weights); None unless measurements bracket it (no extrapolation)."""
        exact = self.seconds(problem)
        if exact is not None:
            return exact
        points = self._measured_densities(problem)
        below = [(d, k) for d, k in points if d < problem.density]
        above = [(d, k) for d, k in points if d > problem.density]
        if not below or not above:
            return None
        (d0, k0), (d1, k1) = below[-1], above[0]
        t0, t1 = float(self.entries[k0]["seconds"]), float(self.entries[k1]["seconds"])
        return t0 + (t1 - t0) * (problem.density - d0) / (d1 - d0)

    def nearest_best(self, problem: Problem) -> Any | None:
        """The fastest schedule measured for ``problem``, or for the nearest measured density of its
        family (the best schedule changes with density only gradually); None when none was."""
        exact = self.best(problem)
        if exact is not None:
            return exact
        points = self._measured_densities(problem)
        if not points:
            return None
        _, key = min(points, key=lambda point: abs(point[0] - problem.density))
        entry = self.entries[key]
        return dataclasses.replace(schedule_from_dict(entry["fmt"], entry["schedule"]), weights=problem.weights)


def synthetic_weight(shape: tuple[int, int], pattern: str, sparsity: float, seed: int = 0) -> np.ndarray:
    """A random weight pruned to ``pattern`` at ``sparsity`` by magnitude (what the explorer times)."""
    import torch

    rng = np.random.default_rng(seed)
    w = rng.standard_normal(shape).astype(np.float32)
    if sparsity <= 0:
        return w
    mask = parse_pattern(pattern).mask(torch.from_numpy(np.abs(w)), sparsity).numpy()
    return np.where(mask, w, np.float32(0))


def explore(m: int, weight: np.ndarray, packed: Packed | None, caps: Capabilities, tvm_target: Any,
            rounds: int = 15, candidates: list[Any] | None = None, weights: str = "float32",
            runner: str = "host") -> list[tuple[Any, float]]:
    """Build and time every candidate schedule of one problem, side by side.

    ``weight`` is the masked-dense weight (the reference); ``packed`` its packed form, or None for
    the dense kernel; ``weights`` the storage of the values of the default candidates. Candidates
    may mix fp32 and bf16 storage (then they are timed side by side); a bf16 candidate is checked
    against the bf16-rounded weight, which is what it computes with. Returns ``[(schedule,
    seconds), ...]`` in candidate order, the seconds being the lower quartile of ``rounds``
    interleaved blocks of about 3 ms: this machine drifts between a fast and a slow state (up to
    1.5x) for tens of milliseconds to seconds at a time, so a median over a short window can land
    in the slow state while a low quantile stays on the kernel's quiet speed (noise only adds
    time); ``rounds`` blocks keep one lucky block from setting it. A candidate whose output
    disagrees with the reference raises (a wrong kernel must never win). ``runner`` names where
    the kernels run and are timed (``"host"``: in this process; ``"wasm"``: in wasmtime), see
    :func:`sparsecc.targets.runners.kernel_preparer`.
    """
    schedules = candidates if candidates is not None else schedule_space(m, packed, caps, tuple(weight.shape),
                                                                         weights)
    calls = _checked_calls(m, weight, packed, caps, tvm_target, schedules, runner)
    return list(zip(schedules, side_by_side(calls, caps, rounds), strict=True))


def _checked_calls(m: int, weight: np.ndarray, packed: Packed | None, caps: Capabilities, tvm_target: Any,
                   schedules: list[Any], runner: str) -> list[Any]:
    """One ready-to-time call per schedule (built, inputs in place), each checked once against the
    float64 reference (see :func:`explore`)."""
    from .kernels import dense_args, dense_linear, sparse_kernel
    from .kernels._common import from_bfloat16_bits, to_bfloat16_bits
    from .kernels.dense import DenseSchedule
    from .runners import kernel_preparer

    shape = tuple(weight.shape)
    rng = np.random.default_rng(1)
    x = rng.standard_normal((m, shape[1])).astype(np.float32)
    bias = rng.standard_normal(shape[0]).astype(np.float32)
    rounded = from_bfloat16_bits(to_bfloat16_bits(weight))
    references = {"float32": x.astype(np.float64) @ weight.astype(np.float64).T + bias,
                  "bfloat16": x.astype(np.float64) @ rounded.astype(np.float64).T + bias}
    scale = max(1.0, float(np.abs(references["float32"]).max()))
    prepare = kernel_preparer(runner)
    calls = []
    for schedule in schedules:
        # a dense schedule among sparse ones times the layer's dense kernel beside them
        if packed is None or isinstance(schedule, DenseSchedule):
            func = dense_linear(m, shape, True, caps, "explore", schedule=schedule)
            arrays = dense_args(weight, m, caps, schedule=schedule)
        else:
            func, arrays = sparse_kernel(m, packed, True, caps, "explore", schedule=schedule)
        call, read = prepare(func, [x, *arrays, bias], (m, shape[0]), tvm_target)
        call()
        error = float(np.abs(read() - references[schedule.weights]).max())
        if not error <= 1e-3 * scale:
            raise SparseccError(f"schedule {_describe(schedule)} computes a wrong result for {shape} at M={m} "
                                f"(max error {error:.3g}); this is a kernel bug")
        calls.append(call)
    return calls


def side_by_side(calls: list[Any], caps: Capabilities, rounds: int = 15) -> list[float]:
    """Seconds of each ready kernel call, timed interleaved: the lower quartile of ``rounds``
    blocks of about 3 ms each (see :func:`explore`), single-threaded kernels held on one CPU."""
    from sparsecc.timing import interleave, one_cpu

    with one_cpu() if caps.threads == 1 else contextlib.nullcontext():
        times = interleave({str(i): call for i, call in enumerate(calls)}, rounds=rounds)
    return [times[str(i)]["q1"] for i in range(len(calls))]


@dataclass(frozen=True)
class Roofline:
    """A device's peak numbers for predictions where nothing was measured.

    ``efficiency`` is the fraction of peak FLOP/s each kernel format reaches when compute bound
    (sparse formats lose some to index arithmetic and gathers); the time is the larger of the
    compute time and the time to stream the kernel's weight bytes at ``bandwidth_gbs``.
    """

    gflops_per_thread: float
    bandwidth_gbs: float
    efficiency: tuple[tuple[str, float], ...] = (("dense", 0.6), ("bsr", 0.45), ("nm", 0.3), ("csr", 0.2))

    def seconds(self, fmt: str, flops: float, weight_bytes: float, threads: int, detail: str = "") -> float:
        """Predicted seconds; ``detail`` (a block shape such as ``r4c1``) picks a format-plus-detail
        efficiency (key ``bsrr4c1``) where the table has one, else the format's."""
        table = dict(self.efficiency)
        eff = table.get(fmt + detail, table.get(fmt, 0.2))
        return max(flops / (self.gflops_per_thread * threads * eff * 1e9), weight_bytes / (self.bandwidth_gbs * 1e9))


class CostModel:
    """Per-kernel time predictions and schedule choices for one target: measured entries of the
    cost table where they exist, the roofline elsewhere."""

    def __init__(self, caps: Capabilities, roofline: Roofline, table: CostTable | None = None,
                 table_path: pathlib.Path | None = None, machine: dict[str, Any] | None = None):
        self.caps = caps
        self.roofline = roofline
        self.table = table
        # Where the target keeps its measured table and what it must have been measured on
        # (``sparsecc tune`` writes there); None for a target that cannot be measured here.
        self.table_path = table_path
        self.machine = machine

    def schedule(self, m: int, packed: Packed | None, shape: tuple[int, int] | None = None,
                 weights: str = "float32") -> Any | None:
        """The measured-fastest schedule for this kernel with its values stored as ``weights``, or
        None (use the kernel's heuristic)."""
        if self.table is None:
            return None
        return self.table.nearest_best(Problem.of(m, packed, shape, weights))

    def predict(self, m: int, packed: Packed | None, shape: tuple[int, int] | None = None,
                weights: str = "float32") -> tuple[float, str]:
        """(seconds, how) for one call of the kernel with its weight values stored as ``weights``:
        ``"measured"`` (the table has this problem), ``"interpolated"`` (between two measured
        densities of the same kernel, shape and M) or ``"roofline"`` (which streams 2 bytes per
        value for bf16, 4 for fp32)."""
        problem = Problem.of(m, packed, shape, weights)
        if self.table is not None:
            seconds = self.table.seconds(problem)
            if seconds is not None:
                return seconds, "measured"
            seconds = self.table.interpolated_seconds(problem)
            if seconds is not None:
                return seconds, "interpolated"
        n, k = problem.shape
        value_bytes = 2 if weights == "bfloat16" else 4
        if packed is None:
            stored, weight_bytes = n * k, value_bytes * n * k
        else:
            from sparsecc.sparsity import packed_nbytes

            stored, weight_bytes = packed.nnz, packed_nbytes(packed)
            values = packed.values if isinstance(packed, PackedNM) else packed.data
            weight_bytes -= (4 - value_bytes) * int(values.size)
        flops = 2.0 * m * stored
        activation_bytes = 4.0 * m * (n + k)
        return self.roofline.seconds(problem.fmt, flops, weight_bytes + activation_bytes, self.caps.threads,
                                     problem.detail), "roofline"


def tune(target_name: str, shapes: list[tuple[int, int]], ms: list[int], patterns: list[str],
         sparsities: list[float], table_path: str | os.PathLike[str] | None = None, rounds: int = 15,
         log: Any = print, weights: tuple[str, ...] = ("float32",), skip_measured: bool = False) -> CostTable:
    """Explore every (shape, M, pattern, sparsity) problem on this machine and store the results.

    ``patterns`` may include ``"dense"`` (the dense kernel; sparsities do not apply). An N:M
    pattern has one sparsity, 1 - N/M; a pattern a shape cannot take is skipped with a line in the
    log. ``weights`` lists the value storages to measure (``"float32"``, ``"bfloat16"``); with
    both, the fp32 and bf16 candidates of a problem are timed side by side in one interleaved run
    and recorded as two entries (the bf16 key ends in `` bf16``). ``skip_measured`` leaves problems
    the table already has alone. The table is saved after every problem, so an interrupted run
    keeps what it measured.
    """
    return tune_problems(target_name, [(tuple(shape), m) for shape in shapes for m in ms], patterns, sparsities,
                         table_path=table_path, rounds=rounds, log=log, weights=weights, skip_measured=skip_measured)


def tune_problems(target_name: str, problems: list[tuple[tuple[int, int], int]], patterns: list[str],
                  sparsities: list[float], table_path: str | os.PathLike[str] | None = None, rounds: int = 15,
                  log: Any = print, weights: tuple[str, ...] = ("float32",),
                  skip_measured: bool = False, max_candidates: int = 0) -> CostTable:
    """:func:`tune` over a list of ``(shape, M)`` problems (a model's layers: ``search{tune=true}``);
    ``max_candidates`` > 0 explores only that many of each kernel's schedules (the heuristic's
    first), trading the best schedule for time."""
    weights = tuple(dict.fromkeys(weights))
    bad = [w for w in weights if w not in WEIGHT_DTYPES]
    if bad or not weights:
        raise SparseccError(f"weights {', '.join(bad) or '(none)'}: choose float32 and/or bfloat16")
    from sparsecc.sparsity import NM

    from .registry import get_target

    record = get_target(target_name)
    if record.cost_model is None:
        raise SparseccError(f"target {target_name!r} has no cost model to tune yet")
    if not record.runs_here:
        raise SparseccError(f"target {target_name!r} cannot be measured on this machine; its cost model is a "
                            "roofline only")
    model = record.cost_model()
    if model.table_path is None or model.machine is None:
        raise SparseccError(f"target {target_name!r} keeps no measured cost table")
    caps = record.capabilities()
    if table_path is None and model.table is not None:
        table = model.table  # the target's own table, already read by its cost model
    else:
        table = CostTable.load(pathlib.Path(table_path) if table_path else model.table_path, model.machine)
    tvm_target = record.tvm_target()
    for shape, m in dict.fromkeys((tuple(shape), int(m)) for shape, m in problems):
        # this problem's new entries, each with its best schedule's call, still built and ready to
        # time again beside the others
        measured: list[tuple[Problem, Any]] = []
        for pattern in patterns:
            if pattern == "dense":
                cells = [(None, 0.0)]
            else:
                parsed = parse_pattern(pattern)
                why = parsed.check_shape(shape)
                if why is not None:
                    log(f"{pattern} {shape[0]}x{shape[1]}: skipped ({why})")
                    continue
                cells = [(parsed, 1 - parsed.n / parsed.m)] if isinstance(parsed, NM) else \
                    [(parsed, s) for s in sparsities]
            for parsed, sparsity in cells:
                weight = synthetic_weight(shape, pattern if parsed else "unstructured", sparsity)
                packed = parsed.pack(weight) if parsed is not None else None
                todo = [w for w in weights
                        if not (skip_measured and table.seconds(Problem.of(m, packed, shape, w)) is not None)]
                if not todo:
                    continue
                candidates = [s for w in todo
                              for s in schedule_space(m, packed, caps, shape, w)[:max_candidates or None]]
                calls = _checked_calls(m, weight, packed, caps, tvm_target, candidates, record.runner)
                times = side_by_side(calls, caps, rounds)
                for w in todo:
                    problem = Problem.of(m, packed, shape, w)
                    mine = [i for i, s in enumerate(candidates) if s.weights == w]
                    entry = table.record(problem, [(candidates[i], times[i]) for i in mine])
                    measured.append((problem, calls[min(mine, key=lambda i: times[i])]))
                    gain = entry["default_seconds"] / entry["seconds"]
                    best = entry["candidates"][0][0]
                    log(f"{problem.key():39s} best {best}  {entry['seconds'] * 1e6:9.1f} us  "
                        f"({gain:.2f}x the heuristic's, {len(entry['candidates'])} candidates)")
                table.save()
        if len(measured) > 1:
            _confirm_side_by_side(table, measured, caps, rounds, log)
            table.save()
    return table


def _confirm_side_by_side(table: CostTable, measured: list[tuple[Problem, Any]], caps: Capabilities, rounds: int,
                          log: Any) -> None:
    """Time the best schedule's call of every entry just measured for one layer shape and M
    (dense and each pattern and sparsity) in one interleaved run, and rescale each entry to that
    time.

    Each entry was explored in its own short run, and this machine drifts between a fast and an
    up to 1.5x slower state for seconds at a time: the dense kernel of 384x64 at M = 196 was
    recorded 1.8x slower than it runs, and a search then pruned layers whose sparse kernels were
    no faster than dense. Timed side by side, a drift hits every form of the layer alike, so the
    sparse-to-dense ratios the search decides by are measured together (at the lower of the two
    runs' levels)."""
    times = side_by_side([call for _, call in measured], caps, rounds)
    # The side-by-side run sets the ratios between the forms; its level can be the drifted one as
    # well. Noise only adds time, so of the two levels (the forms' own runs, this run) the lower
    # one is kept: the median of the ratios this run / own runs says which.
    level = float(np.median([t / table.entries[p.key()]["seconds"] for (p, _), t in zip(measured, times,
                                                                                         strict=True)]))
    for (problem, _), seconds in zip(measured, times, strict=True):
        factor = table.rescale(problem, seconds / max(level, 1.0), len(measured) - 1)
        if abs(factor - 1) > 0.15:
            log(f"{problem.key():39s} {factor:.2f}x its own run's time, timed beside the layer's other "
                f"{len(measured) - 1} forms")


def time_layer_kernel(target_name: str, m: int, weight: np.ndarray, packed: Packed | None,
                      rounds: int = 15, with_dense: bool = False) -> Any:
    """Seconds (as :func:`explore` measures them) of the kernel ``compile`` builds for one layer
    problem on ``target_name`` (the cost table's measured-best schedule where there is one, else
    the heuristic's), timed where the target's kernels run
    (:func:`sparsecc.targets.runners.kernel_preparer`: in this process for x86, in wasmtime for
    wasm-simd); a target whose kernels cannot be timed here raises. With
    ``with_dense`` (a sparse ``packed``), ``(sparse seconds, dense seconds)``: the layer's dense
    kernel on the same masked weight, timed side by side with the sparse one (interleaved, so load
    from other processes hits both alike)."""
    from .registry import get_target
    from .runners import kernel_preparer

    record = get_target(target_name)
    kernel_preparer(record.runner)  # refuses a runner that cannot time (arm-neon, the GPUs)
    model = record.cost_model() if record.cost_model is not None else None
    caps = record.capabilities()
    shape = tuple(weight.shape)

    def chosen(kernel: Packed | None) -> Any:
        schedule = model.schedule(m, kernel, shape) if model is not None else None
        return schedule if schedule is not None else default_schedule(m, kernel, caps, shape)

    candidates = [chosen(packed)] + ([chosen(None)] if with_dense and packed is not None else [])
    results = explore(m, weight, packed, caps, record.tvm_target(), rounds=rounds, candidates=candidates,
                      runner=record.runner)
    if len(results) == 2:
        return results[0][1], results[1][1]
    return results[0][1]
