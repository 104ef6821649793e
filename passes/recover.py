"""recover: win back accuracy after pruning with the masks kept bit for bit (PERP, model soups).

PERP (Zimmer et al., 2023) retrains only a small, expressive set of parameters after pruning:
biases, normalization scales and offsets, and low-rank adapters merged through the mask. Here the
adapter of a pruned layer with weight ``W`` and keep-mask ``M`` is ``W + (B A) * M`` (MaskLoRA:
``B`` starts at zero, so training starts from the pruned model), and the merge writes
``(W + B A) * M`` into the weight: the packed sparsity is exactly the pruned one.
``params=full`` trains every kept weight instead (gradients masked), the comparison PERP draws.

The teacher is the dense program the pipeline started from: distillation without labels on the
calibration batches (``measure``: KL divergence of the softmaxes for logits, ``cosine`` or
``l2`` for embeddings and features), split into a training part and a held-out part that only
scores. The best held-out state is kept and training stops early when it stops improving.

Sparse Model Soups (Zimmer, Spiegel, Pokutta, 2024): ``soup=K`` recovers K ingredients from the
same pruned model with different seeds (data orders and adapter initializations) and averages
them, uniformly or greedily by the held-out metric. They share the mask by construction, so the
average keeps it.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Any

import torch
from sparsecc.errors import SparseccError, VerificationError
from sparsecc.pass_manager import Pass, PassContext, PassResult, register_pass
from sparsecc.program import Program, attribute_owner, flatten_outputs

PARAMS = ("perp", "biases", "full")
MEASURES = ("kl", "cosine", "l2")
SOUP_MODES = ("uniform", "greedy")


class RecoveryError(SparseccError):
    """Recovery options that cannot work for this program or these calibration batches."""


def distance(out: torch.Tensor, ref: torch.Tensor, measure: str) -> torch.Tensor:
    """How far ``out`` is from the teacher's ``ref`` (a differentiable scalar, 0 when equal)."""
    out, ref = out.float(), ref.float()
    if measure == "kl":
        p = torch.log_softmax(ref, dim=-1)
        return (p.exp() * (p - torch.log_softmax(out, dim=-1))).sum(-1).mean()
    if measure == "cosine":
        return (1 - torch.nn.functional.cosine_similarity(out, ref, dim=-1)).mean()
    return ((out - ref).pow(2).sum() / ref.pow(2).sum().clamp_min(1e-30))


class MaskedLowRank(torch.nn.Module):
    """A parametrization ``W -> W + (B A) * M`` of a pruned weight (any rank, seen as N x K)."""

    def __init__(self, mask: torch.Tensor, rank: int, generator: torch.Generator) -> None:
        super().__init__()
        n, k = mask.shape[0], mask[0].numel()
        self.register_buffer("mask", mask.to(torch.float32))
        self.a = torch.nn.Parameter(torch.randn(rank, k, generator=generator) / math.sqrt(k))
        self.b = torch.nn.Parameter(torch.zeros(n, rank))

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        return weight + (self.b @ self.a).reshape(weight.shape) * self.mask


@dataclass
class _Ingredient:
    """One recovery's outcome: the trained tensors by FQN, merged, and its held-out metric."""

    tensors: dict[str, torch.Tensor]
    heldout: float
    steps: int
    history: list[tuple[int, float]] = field(default_factory=list)


@register_pass
@dataclass(frozen=True)
class Recover(Pass):
    """Retrain a small parameter set against the dense program, masks kept bit for bit."""

    name = "recover"
    summary = "PERP retraining (biases, norms, mask-preserving low-rank adapters) distilled from the dense program"
    numerics = "budget"

    params: str = "perp"  # perp: 1-D parameters + adapters; biases: 1-D parameters only; full: every kept weight
    rank: int = 16  # adapter rank (perp)
    steps: int = 200  # optimizer steps at most, per soup ingredient
    lr: float = 1e-3  # Adam learning rate (full: a tenth of it for the weights)
    batch: int = 1  # calibration batches per step
    measure: str = "kl"  # kl (logits) | cosine | l2 (embeddings, features)
    heldout: float = 0.25  # share of the calibration batches kept for scoring (at least one)
    eval_every: int = 10  # steps between held-out scores
    patience: int = 5  # held-out scores without improvement before stopping
    seed: int = 0
    soup: int = 1  # ingredients (Sparse Model Soups: different seeds, averaged)
    soup_mode: str = "greedy"  # uniform | greedy (add an ingredient only if the held-out metric improves)

    def run(self, program: Program, ctx: PassContext) -> PassResult:
        self._check_options()
        masks = _pruned_masks(program)
        if not masks:
            return PassResult(program.clone(stage="recovered"), changed=False,
                              diagnostics=[self.diag("info", "no pruned layer: nothing to recover")])
        self._check_rank(program, masks)
        train, held = self._split(ctx.calibration_batches(program))
        teacher = ctx.dense
        if teacher is None or teacher is program:
            raise RecoveryError("recover needs the dense program as its teacher: run it in the pipeline after "
                                "pruning (prune-...,recover), or set PassContext.dense to the dense program")
        started = time.perf_counter()
        targets = _Targets(teacher, self.measure)
        before = _heldout_metric(program.module(), held, targets, self.measure)
        ingredients = [self._ingredient(program, masks, train, held, targets, self.seed + i, ctx.progress)
                       for i in range(self.soup)]
        soup, used = self._average(program, ingredients, held, targets)
        new = program.clone(stage="recovered")
        with torch.no_grad():
            for fqn, value in soup.tensors.items():
                new.tensor(fqn).copy_(value.to(new.tensor(fqn).dtype))
        new.invalidate()
        _check_masks_kept(program, new, masks)
        counters = self._counters(program, soup, before, ingredients, used, time.perf_counter() - started)
        note = (f"held-out {self.measure} {before:.4g} after pruning -> {soup.heldout:.4g} after recovery "
                f"({counters['trained_params']} parameters trained, {counters['trained_share']:.2%} of the model"
                + (f"; soup of {used} of {self.soup} ingredients" if self.soup > 1 else "") + ")")
        return PassResult(new, changed=True, counters=counters, diagnostics=[self.diag("info", note)])

    # -- options and data ---------------------------------------------------------------------

    def _check_options(self) -> None:
        problems = []
        if self.params not in PARAMS:
            problems.append(f"params={self.params!r} (choose {', '.join(PARAMS)})")
        if self.measure not in MEASURES:
            problems.append(f"measure={self.measure!r} (choose {', '.join(MEASURES)})")
        if self.soup_mode not in SOUP_MODES:
            problems.append(f"soup_mode={self.soup_mode!r} (choose {', '.join(SOUP_MODES)})")
        for name in ("rank", "steps", "batch", "eval_every", "soup"):
            if getattr(self, name) < 1:
                problems.append(f"{name}={getattr(self, name)} (must be at least 1)")
        if self.patience < 0:
            problems.append(f"patience={self.patience} (must be at least 0)")
        if not (self.lr > 0 and math.isfinite(self.lr)):
            problems.append(f"lr={self.lr} (must be a positive number)")
        if not 0 < self.heldout < 1:
            problems.append(f"heldout={self.heldout} (a share in (0, 1))")
        if problems:
            raise RecoveryError(f"recover: bad options: {'; '.join(problems)}")

    def _check_rank(self, program: Program, masks: dict[str, torch.Tensor]) -> None:
        if self.params != "perp":
            return
        for fqn, mask in masks.items():
            if self.rank > min(mask.shape[0], mask[0].numel()):
                raise RecoveryError(f"recover: rank={self.rank} is larger than layer {fqn} "
                                    f"({mask.shape[0]} x {mask[0].numel()}); choose rank <= "
                                    f"{min(mask.shape[0], mask[0].numel())}")

    def _split(self, batches: list[tuple[Any, ...]]) -> tuple[list[tuple[Any, ...]], list[tuple[Any, ...]]]:
        """Training and held-out batches: the last ``heldout`` share scores, the rest trains."""
        held = max(1, round(len(batches) * self.heldout))
        if len(batches) - held < 1:
            raise RecoveryError(f"recover: {len(batches)} calibration batch(es) leave none for training after "
                                f"{held} held out; give at least 2 batches (--calib-batches, more files)")
        return batches[:-held], batches[-held:]

    # -- one ingredient -----------------------------------------------------------------------

    def _ingredient(self, program: Program, masks: dict[str, torch.Tensor], train: list, held: list,
                    targets: _Targets, seed: int, progress: bool) -> _Ingredient:
        generator = torch.Generator().manual_seed(seed)
        module = program.clone().module()
        trained = _Trainable(module, masks, self.params, self.rank, generator)
        optimizer = torch.optim.Adam(trained.groups(self.lr))
        best = _Ingredient(trained.merged(), _heldout_metric(module, held, targets, self.measure), 0)
        best.history.append((0, best.heldout))
        order, waited, step = [], 0, 0
        bar = _progress(self.steps, seed, progress)
        for step in range(1, self.steps + 1):
            if not order:
                order = torch.randperm(len(train), generator=generator).tolist()
            chosen = [order.pop() for _ in range(min(self.batch, len(order)))]
            loss = sum(_loss(module, train[i], targets, self.measure) for i in chosen) / len(chosen)
            optimizer.zero_grad()
            loss.backward()
            trained.mask_gradients()
            optimizer.step()
            if step % self.eval_every and step != self.steps:
                continue
            metric = _heldout_metric(module, held, targets, self.measure)
            best.history.append((step, metric))
            if metric < best.heldout:
                best = _Ingredient(trained.merged(), metric, step, best.history)
                waited = 0
            else:
                waited += 1
            if bar is not None:
                bar.update(step - bar.n)
                bar.set_postfix_str(f"held-out {self.measure} {metric:.4g} (best {best.heldout:.4g})")
            if waited > self.patience:
                break
        if bar is not None:
            bar.close()
        best.steps = step
        return best

    # -- soups --------------------------------------------------------------------------------

    def _average(self, program: Program, ingredients: list[_Ingredient], held: list,
                 targets: _Targets) -> tuple[_Ingredient, int]:
        """The soup of the ingredients and how many it holds (one ingredient: itself)."""
        if len(ingredients) == 1:
            return ingredients[0], 1
        scratch = program.clone()
        module = scratch.module()
        ranked = sorted(ingredients, key=lambda ing: ing.heldout)
        if self.soup_mode == "uniform":
            chosen = ranked
        else:
            chosen = [ranked[0]]
            for candidate in ranked[1:]:
                if _soup_metric(module, chosen + [candidate], held, targets, self.measure) < \
                        _soup_metric(module, chosen, held, targets, self.measure):
                    chosen.append(candidate)
        tensors = average_tensors([ing.tensors for ing in chosen])
        metric = _soup_metric(module, chosen, held, targets, self.measure)
        return _Ingredient(tensors, metric, max(ing.steps for ing in chosen)), len(chosen)

    def _counters(self, program: Program, soup: _Ingredient, before: float, ingredients: list[_Ingredient],
                  used: int, seconds: float) -> dict[str, Any]:
        total = sum(t.numel() for t in program.state.values())
        trained = _trained_count(program, self.params, self.rank)
        counters: dict[str, Any] = {
            "heldout_before": round(before, 6), "heldout_after": round(soup.heldout, 6),
            "trained_params": trained, "trained_share": round(trained / max(total, 1), 6),
            "steps": soup.steps, "seconds": round(seconds, 2)}
        if self.soup > 1:
            counters["soup_used"] = used
            for i, ing in enumerate(ingredients):
                counters[f"ingredient_{i}_heldout"] = round(ing.heldout, 6)
        return counters


# -- helpers ------------------------------------------------------------------------------------


def _pruned_masks(program: Program) -> dict[str, torch.Tensor]:
    """Weight FQN -> keep-mask of every layer a pruning pass made sparse."""
    masks = {}
    for layer in program.layers():
        info = program.sparsity.get(layer.name)
        if info is not None and info.packed_format is None:
            masks[layer.weight] = program.tensor(layer.weight).detach() != 0
    return masks


def _check_masks_kept(before: Program, after: Program, masks: dict[str, torch.Tensor]) -> None:
    for fqn, mask in masks.items():
        kept = after.tensor(fqn).detach() != 0
        if not torch.equal(kept, mask):
            changed = int((kept != mask).sum())
            raise VerificationError(f"recover changed the sparsity mask of {fqn} at {changed} positions; this is "
                                    "a bug in the pass")


def average_tensors(sets: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """The element-wise mean of tensors with the same keys (masked weights stay masked), taken as
    the first plus the mean difference from it: identical ingredients average to the ingredient
    exactly."""
    first = sets[0]
    return {key: first[key] + torch.stack([s[key] - first[key] for s in sets]).mean(0) for key in first}


def _trained_count(program: Program, params: str, rank: int) -> int:
    one_d = sum(t.numel() for fqn, t in program.state.items() if _is_vector_parameter(program, fqn))
    masks = _pruned_masks(program)
    if params == "biases":
        return one_d
    if params == "full":
        return one_d + sum(int(m.sum()) for m in masks.values())
    return one_d + sum(rank * (m.shape[0] + m[0].numel()) for m in masks.values())


def _is_vector_parameter(program: Program, fqn: str) -> bool:
    return fqn in program.exported.graph_signature.parameters and program.tensor(fqn).dim() == 1


class _Trainable:
    """The parameters one recovery trains in a runnable module, and their merged values."""

    def __init__(self, module: torch.nn.Module, masks: dict[str, torch.Tensor], params: str, rank: int,
                 generator: torch.Generator) -> None:
        from torch.nn.utils import parametrize

        self.module, self.masks, self.params = module, masks, params
        for p in module.parameters():
            p.requires_grad_(False)
        self.vectors = {fqn: p for fqn, p in module.named_parameters() if p.dim() == 1}
        self.weights: dict[str, torch.nn.Parameter] = {}
        self.adapters: dict[str, MaskedLowRank] = {}
        for fqn in masks:
            owner, name = attribute_owner(module, fqn)
            if params == "perp":
                adapter = MaskedLowRank(masks[fqn], rank, generator)
                parametrize.register_parametrization(owner, name, adapter)
                self.adapters[fqn] = adapter
            elif params == "full":
                self.weights[fqn] = getattr(owner, name)
        for p in [*self.vectors.values(), *self.weights.values()]:
            p.requires_grad_(True)

    def groups(self, lr: float) -> list[dict[str, Any]]:
        groups = [{"params": list(self.vectors.values()), "lr": lr}]
        if self.adapters:
            groups.append({"params": [p for a in self.adapters.values() for p in (a.a, a.b)], "lr": lr})
        if self.weights:
            groups.append({"params": list(self.weights.values()), "lr": lr / 10})
        return groups

    def mask_gradients(self) -> None:
        for fqn, weight in self.weights.items():
            if weight.grad is not None:
                weight.grad.mul_(self.masks[fqn].reshape(weight.shape))

    @torch.no_grad()
    def merged(self) -> dict[str, torch.Tensor]:
        """Every trained tensor by FQN, adapters merged through the mask (copies)."""
        found = {fqn: p.detach().clone() for fqn, p in self.vectors.items()}
        for fqn in [*self.adapters, *self.weights]:
            owner, name = attribute_owner(self.module, fqn)
            # an adapter's weight reads through the parametrization: W + (B A) * M
            found[fqn] = _keep_mask(getattr(owner, name).detach(), self.masks[fqn])
        return found


def _keep_mask(value: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``value`` zeroed off the mask; a kept weight that trained to exactly zero is nudged to the
    smallest normal number, so the mask is the pruned one bit for bit."""
    out = value * mask.reshape(value.shape)
    tiny = torch.finfo(out.dtype).tiny
    return torch.where(mask.reshape(value.shape) & (out == 0), torch.full_like(out, tiny), out).clone()


class _Targets:
    """The dense teacher's outputs per batch, computed once and kept."""

    def __init__(self, teacher: Program, measure: str) -> None:
        self.teacher, self.measure = teacher, measure
        self.cache: dict[int, list[torch.Tensor]] = {}

    def __call__(self, batch: tuple[Any, ...]) -> list[torch.Tensor]:
        key = id(batch)
        if key not in self.cache:
            self.cache[key] = [t.detach() for t in self.teacher.run_flat(*batch) if t.is_floating_point()]
        return self.cache[key]


def _loss(module: torch.nn.Module, batch: tuple[Any, ...], targets: _Targets, measure: str) -> torch.Tensor:
    outs = [t for t in flatten_outputs(module(*batch)) if t.is_floating_point()]
    refs = targets(batch)
    return sum(distance(o, r, measure) for o, r in zip(outs, refs, strict=True)) / max(len(refs), 1)


@torch.no_grad()
def _heldout_metric(module: torch.nn.Module, held: list, targets: _Targets, measure: str) -> float:
    return float(sum(float(_loss(module, batch, targets, measure)) for batch in held) / len(held))


def _soup_metric(module: torch.nn.Module, chosen: list[_Ingredient], held: list, targets: _Targets,
                 measure: str) -> float:
    """The held-out metric of the average of ``chosen``, written into ``module``."""
    averaged = average_tensors([ing.tensors for ing in chosen])
    with torch.no_grad():
        for fqn, value in averaged.items():
            owner, name = attribute_owner(module, fqn)
            getattr(owner, name).copy_(value)
    return _heldout_metric(module, held, targets, measure)


def _progress(steps: int, seed: int, enabled: bool) -> Any:
    if not enabled:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=steps, desc=f"recover (seed {seed})", unit="step", leave=False)
