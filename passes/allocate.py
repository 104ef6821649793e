"""allocate: give the planned sparse layers unequal sparsities with the same total weight count.

Uniform sparsity treats every layer alike, but layers differ in how much they can lose. This
pass rewrites the sparsities of a plan (from ``plan-uniform``, before pruning) so that the
fraction of zeroed weights over all planned layers stays what was asked, while each layer gets
its own share. Methods:

* ``owl`` (Yin et al., 2024, outlier-weighted layer-wise sparsity): a layer's outlier ratio is the
  fraction of its Wanda scores ``|W_ij| ||X_j||`` above ``outlier`` times their mean; groups with
  more outliers get up to ``lam`` less sparsity, groups with fewer up to ``lam`` more.
* ``depth``: a linear ramp over the groups in graph order, the first ``lam`` below the target and
  the last ``lam`` above (early layers feed everything after them).
* ``erk`` (Evci et al., 2020, Erdos-Renyi-Kernel): density proportional to
  ``sum(dims) / prod(dims)`` of the weight, the classic allocation for CNNs.
* ``search`` (in the spirit of NeuroAL, Cunegatti et al., 2024): the candidates uniform, ``owl``
  and ``depth`` at several strengths are each applied to the model with one-shot Wanda masks (a
  cheap stand-in for the final method), and the one whose outputs on the first ``search_batches``
  calibration batches align best with the dense model's is kept. The counters report every
  candidate's alignment, so the choice can be checked. ``measure`` says what aligning means:
  ``kl`` (default), the KL divergence of the softmax over the outputs' last dimension from the
  dense one, for models whose outputs are logits (language models, classifiers); ``l2``, the
  outputs' relative L2 error, for models whose outputs are not (embedders, regressors). On
  SmolLM2 the two disagree: row-wise candidates that cut the logits' L2 error by 18 % raised
  perplexity 7x, while the KL ranked every candidate as perplexity did.
* ``neuroal`` (NeuroAL's two steps, Cunegatti et al., 2024): the block-wise ``search`` above, then a
  row-wise step inside every unstructured layer. A per-row signal spreads the rows' sparsities
  over ``[s - lam_row, s + lam_row]`` around the layer's ``s`` (the mean stays ``s``); two signals
  are tried, each at every ``lam_row`` in ``row_strengths``:

  - ``loss``, NeuroAL's own idea: how much of the row's output the block-wise one-shot mask
    removes, ``sum(pruned scores^2) / sum(scores^2)`` with Wanda scores (a diagonal estimate of the
    output energy the neuron loses); rows that lose more keep more weights.
  - ``outliers``, OWL's idea at row level: the row's share of Wanda scores above ``outlier``
    times the layer's mean; rows with more outliers keep more weights.

  The candidate whose one-shot Wanda model aligns best with the dense outputs wins, equal rows
  included, so the step never makes the alignment worse. The plan records the rows' sparsities
  (``row_sparsity``) and every pruning method keeps that many weights per row.

Groups: layers whose names share a prefix ending in a block index (``layers.3.``) form one group
and get one sparsity, as in OWL; other layers are their own group. Per-layer sparsities are
clamped to ``[0, max_sparsity]`` and shifted together until the weight-weighted mean is the target.
N:M patterns fix their ratio and are left alone, with a diagnostic.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

import torch
from sparsecc.errors import WeightError
from sparsecc.pass_manager import Pass, PassContext, PassResult, register_pass
from sparsecc.plan import LayerPlan
from sparsecc.program import Program, attribute_owner
from sparsecc.sparsity import NM, Unstructured, parse_pattern

from .calibrate import calibration_stats

_BLOCK = re.compile(r"^(.*?\.\d+)\.")
METHODS = ("owl", "depth", "erk", "search", "neuroal")
MEASURES = ("kl", "l2")


def layer_groups(names: list[str]) -> dict[str, list[str]]:
    """Group names in order: a prefix ending in a block index (``layers.3``), else the name."""
    groups: dict[str, list[str]] = {}
    for name in names:
        match = _BLOCK.match(name)
        groups.setdefault(match.group(1) if match else name, []).append(name)
    return groups


def rebalance(raw: dict[str, float], sizes: dict[str, int], target: float, max_sparsity: float) -> dict[str, float]:
    """``raw`` shifted by one constant (then clamped) so that the size-weighted mean is ``target``."""
    total = sum(sizes.values())

    def mean(shift: float) -> float:
        return sum(min(max(raw[n] + shift, 0.0), max_sparsity) * sizes[n] for n in raw) / total

    # from every layer at 0 to every layer at max_sparsity
    lo, hi = -max(raw.values()), max_sparsity - min(raw.values())
    for _ in range(80):
        mid = (lo + hi) / 2
        if mean(mid) < target:
            lo = mid
        else:
            hi = mid
    return {n: min(max(raw[n] + hi, 0.0), max_sparsity) for n in raw}


def _spread(values: dict[str, float], target: float, lam: float, higher_is_denser: bool) -> dict[str, float]:
    """Map group values linearly onto [target - lam, target + lam]."""
    lo, hi = min(values.values()), max(values.values())
    out = {}
    for group, v in values.items():
        unit = 0.5 if hi == lo else (v - lo) / (hi - lo)
        out[group] = target + lam * (1 - 2 * unit if higher_is_denser else 2 * unit - 1)
    return out


@register_pass
@dataclass(frozen=True)
class Allocate(Pass):
    """Per-layer sparsities with the plan's total: OWL, a depth ramp, ERK, or a searched mix."""

    name = "allocate"
    summary = "give planned layers unequal sparsities at the same total (owl, depth, erk, search, neuroal)"
    numerics = "exact"

    method: str = "search"
    lam: float = 0.08  # owl / depth: the largest deviation from the target sparsity
    outlier: float = 5.0  # owl: a score is an outlier above this multiple of the layer's mean
    max_sparsity: float = 0.95
    search_batches: int = 4  # search: calibration batches the candidates are compared on
    measure: str = "kl"  # search, neuroal: "kl" (outputs are logits) or "l2" (relative L2 of the outputs)
    # search, neuroal: the lam values tried for owl and depth (on SmolLM2 at 70 % the best was the
    # largest of 0.04-0.12, so the ladder goes on to 0.2)
    strengths: str = "0.04;0.08;0.12;0.16;0.2"
    row_strengths: str = "0.02;0.05;0.1"  # neuroal: the lam_row values tried for the rows of a layer

    def run(self, program: Program, ctx: PassContext) -> PassResult:
        if self.method not in METHODS:
            raise WeightError(f"unknown allocation {self.method!r}; choose one of: {', '.join(METHODS)}")
        if program.plan is None:
            raise WeightError("allocate needs a plan: run plan-uniform before it")
        if self.measure not in MEASURES:
            raise WeightError(f"unknown alignment measure {self.measure!r}; choose one of: {', '.join(MEASURES)}")
        layers = {layer.name: layer for layer in program.layers()}
        plans = [lp for lp in program.plan.sparse_layers() if lp.name in layers]
        diagnostics = []
        fixed = [lp for lp in plans if isinstance(parse_pattern(lp.pattern), NM)]
        for lp in fixed:
            diagnostics.append(self.diag("info", f"{lp.pattern} fixes the sparsity; not reallocated", lp.name))
        free = [lp for lp in plans if lp not in fixed]
        if len(free) < 2:
            return PassResult(program, changed=False, counters={"layers_reallocated": 0}, diagnostics=diagnostics)
        sizes = {lp.name: lp.shape[0] * _prod(lp.shape[1:]) for lp in free}
        target = sum(lp.sparsity * sizes[lp.name] for lp in free) / sum(sizes.values())
        counters: dict[str, int | float] = {}
        rows: dict[str, list[float]] = {}
        if self.method in ("search", "neuroal"):
            alignment = OneShotAlignment(program, ctx, free, self.search_batches, self.measure)
            chosen, counters, note = self._search(program, ctx, free, sizes, target, alignment)
            diagnostics.append(self.diag("info", note))
            if self.method == "neuroal":
                rows, row_counters, note = self._row_search(free, chosen, alignment)
                counters.update(row_counters)
                diagnostics.append(self.diag("info", note))
        else:
            chosen = self._candidate(self.method, self.lam, program, ctx, free, sizes, target)
        plan = program.plan
        new_layers = dict(plan.layers)
        for lp in free:
            new_layers[lp.name] = LayerPlan(lp.name, lp.kind, lp.shape, lp.pattern, round(chosen[lp.name], 6),
                                            lp.reason, rows.get(lp.name))
        new_plan = type(plan)(target=plan.target, method=plan.method, layers=new_layers)
        new = Program(program.exported, program.example_inputs, stage=program.stage, plan=new_plan,
                      sparsity=program.sparsity)
        values = list(chosen.values())
        counters.update({"layers_reallocated": len(free), "min_sparsity": round(min(values), 4),
                         "max_sparsity": round(max(values), 4), "target_sparsity": round(target, 4)})
        return PassResult(new, changed=True, counters=counters, diagnostics=diagnostics)

    # -- candidate allocations ------------------------------------------------------------------

    def _candidate(self, method: str, lam: float, program: Program, ctx: PassContext, free: list[LayerPlan],
                   sizes: dict[str, int], target: float,
                   scores: dict[str, torch.Tensor] | None = None) -> dict[str, float]:
        """One allocation; ``scores`` (the layers' Wanda scores, computed here when not given) lets
        a search rank OWL's outliers once for all its strengths."""
        names = [lp.name for lp in free]
        if method == "uniform" or lam == 0:
            return {n: target for n in names}
        if method == "erk":
            return self._erk(free, sizes, target)
        groups = layer_groups(names)
        if method == "depth":
            order = {g: float(i) for i, g in enumerate(groups)}
            per_group = _spread(order, target, lam, higher_is_denser=False)
        else:  # owl
            scores = scores if scores is not None else wanda_scores(program, ctx, free)
            ratios = {}
            for group, members in groups.items():
                outliers = sum(int((scores[name] > self.outlier * scores[name].mean()).sum()) for name in members)
                ratios[group] = outliers / sum(scores[name].numel() for name in members)
            per_group = _spread(ratios, target, lam, higher_is_denser=True)
        raw = {n: per_group[g] for g, members in groups.items() for n in members}
        return rebalance(raw, sizes, target, self.max_sparsity)

    def _erk(self, free: list[LayerPlan], sizes: dict[str, int], target: float) -> dict[str, float]:
        shape_of = {lp.name: lp.shape for lp in free}
        raw_density = {n: sum(shape_of[n]) / _prod(shape_of[n]) for n in sizes}
        total = sum(sizes.values())
        floor = 1.0 - self.max_sparsity

        def density(n: str, eps: float) -> float:
            return min(1.0, max(floor, eps * raw_density[n]))

        lo, hi = 0.0, 1e9
        for _ in range(200):
            eps = (lo + hi) / 2
            if sum(density(n, eps) * sizes[n] for n in sizes) / total < 1.0 - target:
                lo = eps
            else:
                hi = eps
        return {n: 1.0 - density(n, hi) for n in sizes}

    def _search(self, program: Program, ctx: PassContext, free: list[LayerPlan], sizes: dict[str, int],
                target: float, error_of: OneShotAlignment) -> tuple[dict[str, float], dict[str, int | float], str]:
        strengths = [float(v) for v in self.strengths.split(";") if v.strip()]
        candidates = [("uniform", 0.0)] + [(m, lam) for m in ("owl", "depth") for lam in strengths]
        best, best_error, best_name, counters = None, float("inf"), "", {}
        for method, lam in candidates:
            allocation = self._candidate(method, lam, program, ctx, free, sizes, target, error_of.scores)
            error = error_of(allocation)
            counters[f"error_{method}_{lam:g}"] = round(error, 6)
            if error < best_error:
                best, best_error, best_name = allocation, error, f"{method} lam={lam:g}"
        note = (f"search chose {best_name}: {error_of.what} {best_error:.4g} on "
                f"{len(error_of.batches)} calibration batches, with one-shot Wanda masks "
                f"(uniform: {counters['error_uniform_0']:.4g})")
        return best, counters, note

    def _row_search(self, free: list[LayerPlan], allocation: dict[str, float],
                    error_of: OneShotAlignment) -> tuple[dict[str, list[float]], dict[str, int | float], str]:
        """NeuroAL's row-wise step on top of the block-wise ``allocation`` (see the module docstring)."""
        rowwise = [lp for lp in free if isinstance(parse_pattern(lp.pattern), Unstructured)]
        if not rowwise:
            return {}, {}, "row-wise step skipped: no unstructured layer (block patterns keep equal bands)"
        signals: dict[str, dict[str, torch.Tensor]] = {"loss": {}, "outliers": {}}
        for lp in rowwise:
            score = error_of.scores[lp.name]
            energy = score.double() ** 2
            kept = parse_pattern(lp.pattern).mask(score, allocation[lp.name])
            signals["loss"][lp.name] = (energy * ~kept).sum(1) / energy.sum(1).clamp_min(1e-30)
            signals["outliers"][lp.name] = (score > self.outlier * score.mean()).double().mean(dim=1)
        counters: dict[str, int | float] = {}
        best_rows: dict[str, torch.Tensor] = {}
        best_name, best_error = "equal rows", error_of(allocation)
        counters["error_rows_0"] = round(best_error, 6)
        best_lam = 0.0
        for signal, values in signals.items():
            for lam in (float(v) for v in self.row_strengths.split(";") if v.strip()):
                rows = {lp.name: row_sparsities(values[lp.name], allocation[lp.name], lam, self.max_sparsity)
                        for lp in rowwise}
                error = error_of(allocation, rows)
                counters[f"error_rows_{signal}_{lam:g}"] = round(error, 6)
                if error < best_error:
                    best_rows, best_lam, best_error = rows, lam, error
                    best_name = f"{signal} lam_row={lam:g}"
        counters["row_lam"] = best_lam
        note = (f"row-wise step chose {best_name}: {error_of.what} {best_error:.4g} "
                f"(equal rows: {counters['error_rows_0']:.4g}) over {len(rowwise)} unstructured layers")
        return {name: [round(float(v), 6) for v in t] for name, t in best_rows.items()}, counters, note


class OneShotAlignment:
    """Scores an allocation (per-layer sparsities, optionally per-row ones) by how far a one-shot
    Wanda model's outputs are from the dense model's on the first ``search_batches`` calibration
    batches (``measure``: KL divergence of the softmaxes, or relative L2): lower is better.
    ``evaluate`` scores any set of layer plans (the search's finalists)."""

    def __init__(self, program: Program, ctx: PassContext, free: list[LayerPlan], search_batches: int,
                 measure: str = "kl"):
        self.measure = measure
        self.what = "KL divergence from dense" if measure == "kl" else "output error relative to dense"
        self.batches = ctx.calibration_batches(program)[: max(1, search_batches)]
        self.free = free
        self.program = program
        self.ctx = ctx
        self.scratch = program.clone()
        self.layers = {layer.name: layer for layer in self.scratch.layers()}
        self.scores: dict[str, torch.Tensor] = {}
        self.dense: dict[str, torch.Tensor] = {}
        self.masked: set[str] = set()  # layers whose weight in the scratch module is masked now
        self._load(free)
        with torch.no_grad():
            self.reference = [self.scratch.run_flat(*b) for b in self.batches]

    def _load(self, plans: list[LayerPlan]) -> None:
        """Wanda scores and dense weights of the layers not seen yet."""
        new = [lp for lp in plans if lp.name not in self.dense]
        if not new:
            return
        self.scores.update(wanda_scores(self.program, self.ctx, new))
        for lp in new:
            weight = self.scratch.tensor(self.layers[lp.name].weight).detach()
            self.dense[lp.name] = weight.reshape(weight.shape[0], -1).clone()

    def __call__(self, allocation: dict[str, float], rows: dict[str, torch.Tensor] | None = None) -> float:
        rows = rows or {}
        return self._score({lp.name: (lp.pattern, rows.get(lp.name, allocation[lp.name])) for lp in self.free})

    def evaluate(self, plans: list[LayerPlan], batches: int = 0) -> float:
        """The score of masking each sparse plan's layer with its pattern and sparsity (the rest
        dense), on the first ``batches`` of the search batches (0: all)."""
        sparse = [lp for lp in plans if lp.is_sparse]
        self._load(sparse)
        return self._score({lp.name: (lp.pattern, lp.sparsity) for lp in sparse}, batches)

    def _weight(self, module: torch.nn.Module, name: str) -> torch.Tensor:
        owner, attr = attribute_owner(module, self.layers[name].weight)
        return getattr(owner, attr)

    def _score(self, masks: dict[str, tuple[str, Any]], batches: int = 0) -> float:
        # The masks go into the runnable module's own weights, and only for the layers masked now
        # or at the last call: rebuilding the module from the program each call, or rewriting
        # every weight, cost more than the forward passes on a language model's hundreds of layers
        # (one sensitivity measurement per layer).
        module = self.scratch.module()
        with torch.no_grad():
            for name in self.masked | set(masks):
                dense = self.dense[name]
                weight = self._weight(module, name)
                if name in masks:
                    pattern, sparsity = masks[name]
                    dense = dense * parse_pattern(pattern).mask(self.scores[name], sparsity)
                weight.copy_(dense.reshape(weight.shape))
        self.masked = set(masks)
        total = 0.0
        used = list(zip(self.batches, self.reference, strict=True))[: batches or None]
        with torch.no_grad():
            for batch, ref in used:
                out = self.scratch.run_flat(*batch)
                total += sum(self._distance(o, r) for o, r in zip(out, ref, strict=True))
        return total / len(used)

    def _distance(self, out: torch.Tensor, ref: torch.Tensor) -> float:
        if self.measure == "l2":
            return float((out - ref).norm() / ref.norm().clamp_min(1e-30))
        # mean over every position of KL(softmax(ref) || softmax(out)) along the last dimension
        p = torch.log_softmax(ref.double(), dim=-1)
        q = torch.log_softmax(out.double(), dim=-1)
        return float((p.exp() * (p - q)).sum(-1).mean())


def wanda_scores(program: Program, ctx: PassContext, free: list[LayerPlan]) -> dict[str, torch.Tensor]:
    """Each planned layer's Wanda scores ``|W_ij| ||X_j||`` (N, K) from the dense calibration
    statistics: what OWL counts outliers in and what the one-shot candidate masks rank."""
    stats = calibration_stats(program, ctx)
    layers = {layer.name: layer for layer in program.layers()}
    scores = {}
    for lp in free:
        weight = program.tensor(layers[lp.name].weight).detach()
        scores[lp.name] = weight.reshape(weight.shape[0], -1).abs() * stats.layers[lp.name].feature_norms[None, :]
    return scores


def row_sparsities(signal: torch.Tensor, sparsity: float, lam: float, max_sparsity: float) -> torch.Tensor:
    """Per-row sparsities with mean ``sparsity``: rows spread linearly over ``[sparsity - lam,
    sparsity + lam]`` by ``signal`` (the highest signal gets the least sparsity), then shifted
    together (and clamped to ``[0, max_sparsity]``) until their mean is ``sparsity`` again."""
    lo, hi = float(signal.min()), float(signal.max())
    unit = torch.full_like(signal, 0.5) if hi == lo else (signal - lo) / (hi - lo)
    raw = sparsity + lam * (1 - 2 * unit)
    low, high = -float(raw.max()), max_sparsity - float(raw.min())
    for _ in range(80):
        mid = (low + high) / 2
        if float((raw + mid).clamp(0.0, max_sparsity).mean()) < sparsity:
            low = mid
        else:
            high = mid
    return (raw + high).clamp(0.0, max_sparsity)


def _prod(values) -> int:
    out = 1
    for v in values:
        out *= int(v)
    return out
