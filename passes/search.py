"""search: choose per layer dense or a pattern and sparsity, for the fastest model the accuracy
budget allows on the target, or the most accurate one the speed budget allows.

Candidates. Every layer a planning pass may make sparse (the rules of ``plan-uniform``: ops
without a sparse kernel, a language model's output head, ``skip`` matches and layers with fewer
than ``min_inputs`` inputs stay dense) offers dense plus each searched pattern at each sparsity of
the ladder (an N:M pattern at its own ratio) that the layer's shape takes.

Cost. The target's cost model predicts each candidate's kernel time at the layer's real shape and
M (rows per call, from the exported program's shapes): the measured table where the target has
one (``sparsecc tune``: x86 natively, wasm-simd in wasmtime), its roofline elsewhere (arm-neon,
the GPUs). Packed sizes and layouts enter through the packed weight the prediction is made on (a
synthetic one of the layer's shape: the packed structure of these patterns depends only on the
shape and the sparsity). A sparse candidate not predicted at least ``min_gain`` times faster than
the layer's dense kernel is dropped, so no plan holds a sparse kernel predicted slower than dense,
nor one whose gain is within what the real weight's nonzero layout and timing noise can undo.

Error. Cheap proxy first: the layer's output energy the candidate's one-shot Wanda mask removes,
``sum(pruned (|W_ij| ||X_j||)^2) / sum((|W_ij| ||X_j||)^2)`` from the calibration statistics (the
diagonal of the layer's reconstruction error over the calibration rows). It ranks one layer's
candidates but says nothing of how much the model minds a layer (an early convolution of a
MobileNet against a late projection), so with ``sensitivity`` (default) each layer's proxies are
scaled by one measurement: the model's error with only that layer pruned, at its median-proxy
candidate, in ``measure``'s units. Layers then add up as the model's error does to first order,
the way OWL and NeuroAL weigh layers by what each can lose. The solver
(:mod:`sparsecc.search`) then picks the plan for the budget exactly on these numbers, and traces
the time/error front. Refined for the finalists: the chosen plan and its neighbours on the front
are applied to the model as one-shot masks and the model's outputs on calibration batches are
compared with the dense ones (``measure``: KL divergence of the softmax for logits, relative L2
otherwise); the finalist meeting the budget with the least measured error becomes the plan. For
``max_error``, whose budget is in the measured units, the front is bisected instead for the
fastest plan whose measured error is within it.

Budgets, exactly one: ``latency`` F (the searched layers' predicted time at most F x their dense
time), ``sparsity`` S (at least S of the searched layers' weights removed), ``max_error`` E (the
measured error of the model at most E, in ``measure``'s units).
"""

from __future__ import annotations

import dataclasses
import functools
import sys
from dataclasses import dataclass
from typing import Any

from sparsecc.errors import SparseccError, TargetError
from sparsecc.pass_manager import Pass, PassContext, PassResult, register_pass
from sparsecc.plan import LayerPlan, Plan
from sparsecc.program import Layer, Program
from sparsecc.search import Candidate, SearchError, lagrangian_front, solve, totals
from sparsecc.sparsity import NM, parse_pattern

from .allocate import OneShotAlignment
from .calibrate import calibration_stats
from .plan_uniform import CONV_CHOICES, kept_dense_reason, layer_rows, too_few_inputs, vocabulary_heads

#: sparsities every non-N:M pattern is tried at, unless ``sparsities`` says otherwise
DEFAULT_LADDER = "0.5;0.6;0.7;0.8;0.9"


#: with search_batches=0, the finalists are compared on at least this many output positions (a
#: language model's token positions, a classifier's images): 4 x 128 tokens of SmolLM2, but all
#: 32 crops of MobileNetV2, where four single-image batches ranked its finalists only loosely
#: (held-out KL 0.53 for the plan picked on 4 crops, 0.36 on 32, at the same predicted speed)
FINALIST_POSITIONS = 512
#: with sensitivity_batches=0, each layer's sensitivity is measured on at least this many positions
SENSITIVITY_POSITIONS = 8


def output_positions(outputs: list[Any]) -> int:
    """How many output distributions one batch's outputs hold: every position along each
    output's last dimension (KL and the relative error compare along it)."""
    return sum(max(1, o.numel() // max(1, o.shape[-1])) if o.dim() else 1 for o in outputs)


def batches_for(positions: int, per_batch: int, available: int) -> int:
    """The fewest batches of ``per_batch`` positions holding ``positions``, at most ``available``."""
    return max(1, min(available, -(-positions // max(1, per_batch))))


#: sensitivity measurements already made in this process: (model and calibration fingerprint,
#: layer, pattern, sparsity, batches) -> the model's error (searching one model at several
#: budgets measures each layer once)
_SENSITIVITY: dict[tuple[Any, ...], float] = {}


def _fingerprint(program: Program, batches: list[tuple[Any, ...]], measure: str, method: str) -> str:
    """A digest of everything a sensitivity measurement depends on: every weight of the program,
    the calibration batches it runs, and how the error is measured."""
    import hashlib

    import torch

    digest = hashlib.blake2b(f"{measure};{method}".encode(), digest_size=20)
    for name, tensor in sorted(program.exported.state_dict.items()):
        digest.update(name.encode())
        digest.update(tensor.detach().contiguous().cpu().view(torch.uint8).numpy().tobytes())
    for batch in batches:
        for value in batch:
            if isinstance(value, torch.Tensor):
                digest.update(value.detach().contiguous().cpu().view(torch.uint8).numpy().tobytes())
            else:
                digest.update(repr(value).encode())
    return digest.hexdigest()


class _RememberedEvaluate:
    """``alignment.evaluate`` for one layer plan, answered from :data:`_SENSITIVITY` when this
    model and calibration data measured it before."""

    def __init__(self, alignment: OneShotAlignment, fingerprint: str) -> None:
        self.alignment, self.fingerprint = alignment, fingerprint

    def evaluate(self, plans: list[LayerPlan], batches: int = 0) -> float:
        key = (self.fingerprint, tuple((p.name, p.pattern, float(p.sparsity)) for p in plans), batches)
        if key not in _SENSITIVITY:
            if len(_SENSITIVITY) > 100_000:
                _SENSITIVITY.clear()
            _SENSITIVITY[key] = self.alignment.evaluate(plans, batches)
        return _SENSITIVITY[key]


def _stderr_log(line: str) -> None:
    print(f"  tune: {line}", file=sys.stderr, flush=True)


def _split(text: str) -> list[str]:
    return [part.strip() for part in text.replace(",", ";").split(";") if part.strip()]


@functools.lru_cache(maxsize=4096)
def _synthetic_packed(shape: tuple[int, int], pattern: str, sparsity: float) -> Any:
    """A packed weight of ``shape`` pruned to ``pattern`` at ``sparsity`` (what a prediction reads:
    nonzeros, blocks, bytes)."""
    from sparsecc.targets.tuning import synthetic_weight

    return parse_pattern(pattern).pack(synthetic_weight(shape, pattern, sparsity))


@register_pass
@dataclass(frozen=True)
class Search(Pass):
    """Per-layer pattern and sparsity from predicted cost and measured error, under one budget."""

    name = "search"
    summary = "choose per layer dense or a pattern and sparsity from the target's cost model and calibration error"
    numerics = "exact"

    latency: float = 0.0  # searched layers' predicted time at most this fraction of dense
    sparsity: float = 0.0  # at least this fraction of the searched layers' weights removed
    max_error: float = 0.0  # model error on calibration batches at most this (measure's units)
    patterns: str = ""  # ';'-separated patterns to try; empty: the target's search patterns
    sparsities: str = DEFAULT_LADDER
    method: str = "wanda"  # the pruning method the plan is for (recorded in the plan)
    measure: str = "kl"  # model error: "kl" (logits) or "l2" (relative, any outputs)
    finalists: int = 6
    # calibration batches the finalists (and max_error's bisection) are measured on; 0: the fewest
    # leading batches whose outputs hold FINALIST_POSITIONS compared positions (all if fewer)
    search_batches: int = 0
    sensitivity: bool = True  # scale each layer's proxy errors by its measured effect on the model
    # measurements per layer: 1 (its median-proxy candidate: one scale for all its candidates) or
    # 2 (also its highest-proxy one: piecewise linear, so a layer whose damage grows faster than
    # its proxy at high sparsity is not underrated there)
    sensitivity_points: int = 2
    # calibration batches each sensitivity measurement runs (at most search_batches'); 0: the fewest
    # holding SENSITIVITY_POSITIONS compared positions. One measurement per layer and point adds up
    # to hundreds of forward passes on a language model, where one batch already holds a sequence
    sensitivity_batches: int = 0
    skip: str = ""
    min_inputs: int = 64
    convs: str = "pointwise"
    # measure the searched layers' kernels on this machine first (x86, wasm-simd), at these
    # sparsities of the ladder (empty: every other step and the last; the cost model interpolates
    # between measured densities), keeping what the target's cost table already has
    tune: bool = False
    tune_sparsities: str = ""
    tune_candidates: int = 4  # schedules explored per kernel (the heuristic's first); 0: all, as `sparsecc tune`
    # a sparse candidate must be predicted this many times faster than the layer's dense kernel: a
    # synthetic weight's time is not the real one's to the last percent, nor is one timing run
    min_gain: float = 1.1

    def _budget(self) -> tuple[str, float]:
        given = [(name, value) for name, value in (("latency", self.latency), ("sparsity", self.sparsity),
                                                   ("max_error", self.max_error)) if value]
        if len(given) != 1:
            raise SparseccError("search needs exactly one budget: latency=F (fraction of the dense time), "
                                "sparsity=S (fraction of weights removed) or max_error=E")
        name, value = given[0]
        if name in ("latency", "sparsity") and not 0.0 < value < 1.0:
            raise SparseccError(f"search {name}={value:g}: give a fraction between 0 and 1")
        if value < 0:
            raise SparseccError(f"search {name}={value:g} must be positive")
        return given[0]

    def _patterns(self, ctx: PassContext) -> list[str]:
        names = _split(self.patterns) or list(ctx.target.search_patterns or ctx.target.patterns)
        for name in names:
            if not ctx.target.supports(parse_pattern(name).name):
                raise TargetError(f"target {ctx.target.name!r} has no kernel for pattern {name!r}; "
                                  f"it supports: {', '.join(ctx.target.patterns)}")
        return names

    def run(self, program: Program, ctx: PassContext) -> PassResult:
        budget, value = self._budget()
        if self.min_gain < 1.0:
            raise SparseccError(f"search min_gain={self.min_gain:g}: a sparse kernel must be predicted at least as "
                                "fast as dense (min_gain >= 1)")
        if self.measure not in ("kl", "l2"):
            raise SparseccError(f"search measure={self.measure!r}: choose kl or l2")
        if self.sensitivity_points not in (1, 2):
            raise SparseccError(f"search sensitivity_points={self.sensitivity_points}: choose 1 or 2")
        if self.convs not in CONV_CHOICES:
            raise SparseccError(f"search convs={self.convs!r}: choose one of {', '.join(CONV_CHOICES)}")
        if ctx.target.cost_model is None:
            raise TargetError(f"target {ctx.target.name!r} has no cost model to search with; use plan-uniform")
        cost_model = ctx.target.cost_model()
        patterns = self._patterns(ctx)
        ladder = [float(s) for s in _split(self.sparsities)]
        skips = _split(self.skip)
        heads = vocabulary_heads(program)
        stats = calibration_stats(program, ctx)
        plan = Plan(target=ctx.target.name, method=self.method)
        diagnostics = []
        searched: list[tuple[Layer, list[Candidate]]] = []
        reasons: dict[str, str] = {}  # layer -> why its cost model says no sparse form pays
        dropped = 0
        searchable = []
        for layer in program.layers():
            reason = kept_dense_reason(layer, heads, skips, self.convs)
            if reason is None and layer.matrix_shape[1] < self.min_inputs:
                reason = too_few_inputs(layer, self.min_inputs)
            if reason is not None:
                plan.layers[layer.name] = LayerPlan(layer.name, layer.kind, list(layer.matrix_shape), None, 0.0, reason)
                diagnostics.append(self.diag("info", reason, layer.name))
            else:
                searchable.append(layer)
        tuned = 0
        if self.tune and searchable:
            kept = [layer for layer in program.layers() if layer not in searchable
                    and (layer.kind == "linear" or layer.is_pointwise_conv)]
            tuned = self._tune(program, searchable, kept, ctx, patterns, ladder)
            cost_model = ctx.target.cost_model()  # read again: it now holds the new measurements
        for layer in searchable:
            candidates, slower, not_paying = self._candidates(program, layer, stats.layers[layer.name], cost_model,
                                                              patterns, ladder)
            dropped += slower
            if not_paying is not None:
                reasons[layer.name] = not_paying
            searched.append((layer, candidates))
        if not searched:
            raise SearchError("no layer of this model can be made sparse on this target; nothing to search")
        finalist_batches, sensitivity_batches = self._batch_counts(program, ctx)
        alignment = OneShotAlignment(program, ctx, [], finalist_batches, self.measure)
        if self.sensitivity:
            fingerprint = _fingerprint(program, alignment.batches, self.measure, self.method)
            measure = _RememberedEvaluate(alignment, fingerprint)
            searched = [(layer, self._calibrated(measure, layer, cands, self.sensitivity_points,
                                                 sensitivity_batches))
                        for layer, cands in searched]
        choices = [cands for _, cands in searched]
        dense_s = sum(c[0].seconds for c in choices)
        weights = sum(c[0].kept for c in choices)
        front = lagrangian_front(choices)
        if budget == "latency":
            best = solve(choices, "error", "seconds", value * dense_s, tie_break="seconds")
            meets = lambda picks: totals(choices, picks)["seconds"] <= value * dense_s * (1 + 1e-12)  # noqa: E731
        elif budget == "sparsity":
            best = solve(choices, "error", "kept", (1 - value) * weights, tie_break="seconds")
            meets = lambda picks: totals(choices, picks)["kept"] <= (1 - value) * weights  # noqa: E731
        else:
            best, meets = None, None  # judged on the measured error, along the front
        if budget == "max_error":
            finalists, measured = self._fastest_within(alignment, searched, front, value)
            pick = len(finalists) - 1
        else:
            finalists = self._finalists(front, best, meets)
            measured = [self._measure(alignment, searched, picks) for picks in finalists]
            pick = min(range(len(finalists)), key=lambda i: (measured[i], totals(choices, finalists[i])["seconds"]))
        chosen = finalists[pick]
        for (layer, cands), index in zip(searched, chosen, strict=True):
            cand, dense = cands[index], cands[0]
            lp = LayerPlan(layer.name, layer.kind, list(layer.matrix_shape), cand.pattern, cand.sparsity,
                           predicted_s=cand.seconds, dense_s=dense.seconds, error=round(cand.error, 8))
            if cand.pattern is None:
                lp.reason = reasons.get(layer.name) or self._dense_reason(cands)
                diagnostics.append(self.diag("info", lp.reason, layer.name))
            plan.layers[layer.name] = lp
        # keep the model's layer order
        order = [layer.name for layer in program.layers()]
        plan.layers = {name: plan.layers[name] for name in order if name in plan.layers}
        chosen_totals = totals(choices, chosen)
        plan.search = {
            "budget": {budget: value}, "measure": alignment.what, "patterns": patterns, "sparsities": ladder,
            "batches": {"finalists": len(alignment.batches), "sensitivity": sensitivity_batches},
            "predicted_dense_s": dense_s, "predicted_s": chosen_totals["seconds"],
            "predicted_speedup": dense_s / chosen_totals["seconds"], "proxy_error": chosen_totals["error"],
            "measured_error": measured[pick], "kept_fraction": chosen_totals["kept"] / weights,
            "plans": self._front_points(choices, front, finalists, measured, chosen, dense_s),
        }
        new = Program(program.exported, program.example_inputs, stage="planned", plan=plan, sparsity=program.sparsity)
        sparse = [lp for lp in plan.layers.values() if lp.is_sparse]
        return PassResult(new, changed=True, diagnostics=diagnostics, counters={
            "searched_layers": len(searched), "sparse_layers": len(sparse),
            "candidates": sum(len(c) for c in choices), "dropped_not_faster": dropped,
            "finalists": len(finalists), "predicted_speedup": round(dense_s / chosen_totals["seconds"], 4),
            "measured_error": round(measured[pick], 6), "kernels_measured": tuned})

    def _batch_counts(self, program: Program, ctx: PassContext) -> tuple[int, int]:
        """Calibration batches for the finalists and for each sensitivity measurement: as given,
        or (0) as many as hold FINALIST_POSITIONS and SENSITIVITY_POSITIONS output positions,
        counted on the first batch."""
        import torch

        batches = ctx.calibration_batches(program)
        per_batch = 1
        if not (self.search_batches and self.sensitivity_batches):
            with torch.no_grad():
                per_batch = output_positions(program.run_flat(*batches[0]))
        finalists = min(len(batches), self.search_batches or batches_for(FINALIST_POSITIONS, per_batch, len(batches)))
        sensitivity = self.sensitivity_batches or batches_for(SENSITIVITY_POSITIONS, per_batch, len(batches))
        return finalists, min(sensitivity, finalists)

    def _tune_points(self, ladder: list[float]) -> list[float]:
        if self.tune_sparsities:
            return [float(v) for v in _split(self.tune_sparsities)]
        ordered = sorted(set(ladder))
        return sorted(set(ordered[::2] + ordered[-1:]))

    def _tune(self, program: Program, layers: list[Layer], kept: list[Layer], ctx: PassContext,
              patterns: list[str], ladder: list[float]) -> int:
        """Measure the kernels the search will weigh (each distinct layer shape and M, dense and
        every pattern at the tune points) on this machine into the target's cost table, and the
        dense kernels of the ``kept`` layers (so the whole model's predicted time is measured too),
        skipping what the table already holds; returns how many problems the table gained."""
        from sparsecc.targets.tuning import tune_problems

        model = ctx.target.cost_model()
        if not ctx.target.runs_here or model.table_path is None:
            raise TargetError(f"search tune=true: target {ctx.target.name!r}'s kernels cannot be timed on this "
                              "machine (its cost model is a roofline); search without tune")
        problems = list(dict.fromkeys((tuple(layer.matrix_shape), layer_rows(program, layer)) for layer in layers))
        before = len(model.table.entries) if model.table is not None else 0
        log = _stderr_log if ctx.progress else (lambda line: None)
        table = tune_problems(ctx.target.name, problems, [*patterns, "dense"], self._tune_points(ladder),
                              log=log, skip_measured=True, max_candidates=self.tune_candidates)
        dense_only = [(tuple(layer.matrix_shape), layer_rows(program, layer)) for layer in kept]
        if dense_only:
            table = tune_problems(ctx.target.name, dense_only, ["dense"], [], log=log, skip_measured=True,
                                  max_candidates=self.tune_candidates)
        return len(table.entries) - before

    def _candidates(self, program: Program, layer: Layer, layer_stats: Any, cost_model: Any, patterns: list[str],
                    ladder: list[float]) -> tuple[list[Candidate], int, str | None]:
        """Dense first, then every (pattern, sparsity) the layer takes that is predicted faster; and
        the cost model's reason when it says no sparse form of this layer pays."""
        shape = tuple(layer.matrix_shape)
        rows = layer_rows(program, layer)
        weight = program.tensor(layer.weight).detach().reshape(shape[0], -1).double()
        energy = (weight * weight) * (layer_stats.sq_norms[None, :] / max(1, layer_stats.rows))
        total = float(energy.sum()) or 1.0
        scores = energy.sqrt()
        dense_s, _ = cost_model.predict(rows, None, shape)
        out = [Candidate(None, 0.0, dense_s, 0.0, shape[0] * shape[1])]
        slower = 0
        # a cost model that knows a margin below which sparse does not pay (the GPU rooflines' 1.1x)
        pays_check = getattr(cost_model, "dense_reason", None)
        if pays_check is not None and (reason := pays_check(rows, *shape)) is not None:
            return out, 0, reason
        for name in patterns:
            pattern = parse_pattern(name)
            levels = [1 - pattern.n / pattern.m] if isinstance(pattern, NM) else ladder
            if pattern.check_shape(shape) is not None:
                continue
            for sparsity in levels:
                if pattern.check_sparsity(sparsity) is not None:
                    continue
                seconds, _ = cost_model.predict(rows, _synthetic_packed(shape, pattern.name, sparsity), shape)
                if seconds * self.min_gain > dense_s:
                    slower += 1
                    continue
                keep = pattern.mask(scores, sparsity)
                error = float(energy[~keep].sum()) / total
                out.append(Candidate(pattern.name, sparsity, seconds, error, int(keep.sum())))
        return out, slower, None

    @staticmethod
    def _calibrated(alignment: Any, layer: Layer, cands: list[Candidate],
                    points: int = 2, batches: int = 0) -> list[Candidate]:
        """The layer's candidates with errors in the model's units: the proxy (output energy the
        layer loses) says how a layer's candidates rank, not how much the model minds; the model's
        error with only this layer pruned, measured at its median-proxy candidate (and with
        ``points=2`` at its highest-proxy one), maps proxies to the model's units, linearly through
        zero and the measured points. Layers then add up as the model's error does (to first
        order), so the solver weighs an early convolution and a late projection on one scale."""
        sparse = sorted((c for c in cands[1:] if c.error > 0), key=lambda c: c.error)
        if not sparse:
            return cands
        references = [sparse[len(sparse) // 2]] + ([sparse[-1]] if points == 2 and len(sparse) > 1 else [])
        xs, ys = [0.0], [0.0]
        for reference in references:
            if reference.error <= xs[-1]:
                continue  # the same proxy as the last point: nothing new to learn
            measured = alignment.evaluate([LayerPlan(layer.name, layer.kind, list(layer.matrix_shape),
                                                     reference.pattern, reference.sparsity)], batches)
            # errors never fall as more is pruned: keep the map non-decreasing
            xs.append(reference.error)
            ys.append(max(measured, ys[-1], 0.0))

        def to_model(proxy: float) -> float:
            if proxy >= xs[-1]:  # beyond the last measurement: its slope from the one before
                return ys[-1] + (proxy - xs[-1]) * (ys[-1] - ys[-2]) / (xs[-1] - xs[-2])
            i = next(j for j in range(1, len(xs)) if proxy <= xs[j])
            return ys[i - 1] + (proxy - xs[i - 1]) * (ys[i] - ys[i - 1]) / (xs[i] - xs[i - 1])

        return [dataclasses.replace(c, error=to_model(c.error)) for c in cands]

    def _finalists(self, front: list[list[int]], best: list[int], meets: Any) -> list[list[int]]:
        """The solver's plan, then the front's plans meeting the budget nearest to it (the front
        runs from fastest to most accurate, so those are its last eligible ones), up to
        ``finalists`` in all."""
        eligible = [plan for plan in front if meets(plan) and plan != best]
        return [best] + eligible[::-1][: max(0, self.finalists - 1)]

    def _fastest_within(self, alignment: OneShotAlignment, searched: list[tuple[Layer, list[Candidate]]],
                        front: list[list[int]], limit: float) -> tuple[list[list[int]], list[float]]:
        """For ``max_error``: bisect the front (fastest to most accurate; the measured error falls
        along it) for the fastest plan whose measured error is within ``limit``. Returns the plans
        measured, the chosen one last, and their errors."""
        measured: dict[int, float] = {}

        def error_at(i: int) -> float:
            if i not in measured:
                measured[i] = self._measure(alignment, searched, front[i])
            return measured[i]

        lo, hi = 0, len(front) - 1
        if error_at(hi) > limit:
            raise SearchError(f"no plan on the time/error front keeps the model's {alignment.what} within {limit:g} "
                              f"(the most accurate sparse plan measures {error_at(hi):.4g}); raise max_error")
        while lo < hi:
            mid = (lo + hi) // 2
            if error_at(mid) <= limit:
                hi = mid
            else:
                lo = mid + 1
        order = [i for i in measured if i != lo] + [lo]
        return [front[i] for i in order], [measured[i] for i in order]

    def _measure(self, alignment: OneShotAlignment, searched: list[tuple[Layer, list[Candidate]]],
                 picks: list[int]) -> float:
        """The model's error on calibration batches with one-shot Wanda masks of a plan."""
        free = [LayerPlan(layer.name, layer.kind, list(layer.matrix_shape), cands[i].pattern, cands[i].sparsity)
                for (layer, cands), i in zip(searched, picks, strict=True)]
        return alignment.evaluate(free)

    def _dense_reason(self, cands: list[Candidate]) -> str:
        if len(cands) == 1:
            return (f"no pattern and sparsity tried is predicted at least {self.min_gain:g}x faster than this layer's "
                    f"dense kernel ({cands[0].seconds * 1e6:.1f} us predicted); kept dense")
        best = min(cands[1:], key=lambda c: c.seconds)
        return (f"kept dense by the search: its fastest sparse candidate ({best.label}, {best.seconds * 1e6:.1f} us vs "
                f"{cands[0].seconds * 1e6:.1f} us dense) costs more error than the budget leaves for it")

    @staticmethod
    def _front_points(choices: list[list[Candidate]], front: list[list[int]], finalists: list[list[int]],
                      measured: list[float], chosen: list[int], dense_s: float) -> list[dict[str, Any]]:
        points = []
        for plan in front + [p for p in finalists if p not in front]:
            t = totals(choices, plan)
            sparse = sum(1 for layer, i in zip(choices, plan, strict=True) if layer[i].pattern)
            point = {"label": f"{dense_s / t['seconds']:.2f}x predicted, {sparse} sparse layers",
                     "predicted_speedup": dense_s / t["seconds"], "error": t["error"], "chosen": plan == chosen}
            if plan in finalists:
                point["measured_error"] = measured[finalists.index(plan)]
            points.append(point)
        return points


@register_pass
@dataclass(frozen=True)
class PlanFile(Pass):
    """Plan from a JSON file (``sparsecc search -o plan.json``, or written by hand)."""

    name = "plan-file"
    summary = "take the per-layer plan from a JSON file (sparsecc search's output, possibly edited)"
    numerics = "exact"

    path: str = ""

    def run(self, program: Program, ctx: PassContext) -> PassResult:
        from sparsecc.plan import PlanError

        if not self.path:
            raise PlanError("plan-file needs path=PLAN.json")
        loaded = Plan.load(self.path)
        layers = {layer.name: layer for layer in program.layers()}
        _check_plan_fits(self.path, loaded, layers, ctx.target)
        diagnostics = []
        if loaded.target != ctx.target.name:
            diagnostics.append(self.diag("warning", f"plan {self.path} was made for target {loaded.target!r}; "
                                                    f"compiling it for {ctx.target.name!r}"))
        plan = Plan(target=ctx.target.name, method=loaded.method, search=loaded.search)
        for name, layer in layers.items():
            lp = loaded.layers.get(name)
            if lp is None:
                lp = LayerPlan(name, layer.kind, list(layer.matrix_shape), None, 0.0, "not in the plan; kept dense")
                diagnostics.append(self.diag("info", lp.reason, name))
            plan.layers[name] = lp
        new = Program(program.exported, program.example_inputs, stage="planned", plan=plan, sparsity=program.sparsity)
        return PassResult(new, changed=True, diagnostics=diagnostics,
                          counters={"sparse_layers": len(plan.sparse_layers()),
                                    "dense_layers": len(plan.dense_layers())})


def _check_plan_fits(path: str, loaded: Plan, layers: dict[str, Layer], target: Any) -> None:
    """Refuse, in one line listing every problem, a plan that does not fit the program it is applied
    to: layers the program lacks, another kind or shape, a pattern the layer's shape cannot take
    (PlanError), or one the target has no kernel for (TargetError)."""
    from sparsecc.plan import PlanError

    unknown = [name for name in loaded.layers if name not in layers]
    problems = [f"names layers this model does not have: {', '.join(unknown[:5])}"
                + (f" and {len(unknown) - 5} more" if len(unknown) > 5 else "")] if unknown else []
    unsupported = []
    for name, lp in loaded.layers.items():
        layer = layers.get(name)
        if layer is None:
            continue
        if lp.kind != layer.kind:
            problems.append(f"layer {name} is a {lp.kind} in the plan but a {layer.kind} in this model")
        if list(lp.shape) != list(layer.matrix_shape):
            problems.append(f"layer {name} is {lp.shape} in the plan but {list(layer.matrix_shape)} in this model")
        elif lp.is_sparse:
            pattern = parse_pattern(lp.pattern)
            if not target.supports(pattern.name):
                unsupported.append(f"{name} ({lp.pattern})")
            why = pattern.check_shape(tuple(layer.matrix_shape)) or pattern.check_sparsity(lp.sparsity)
            if why is not None:
                problems.append(f"layer {name}: {why}")
    if problems:
        raise PlanError(f"plan {path} does not fit this model: {'; '.join(problems)}; search this model again or "
                        "fix the plan")
    if unsupported:
        raise TargetError(f"plan {path}: layer(s) {', '.join(unsupported)} ask for patterns target {target.name!r} "
                          f"has no kernel for ({', '.join(target.patterns)}); search for this target")
