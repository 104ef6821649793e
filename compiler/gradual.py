"""Gradual magnitude pruning during training (Zhu & Gupta, 2017), for users who can train.

One-shot pruning stops working somewhere past 70-80 % sparsity; pruning a little at a time while
the model keeps training lets the remaining weights take over the work of the removed ones. The
sparsity follows Zhu & Gupta's cubic schedule, fast at first, when there are many redundant
weights, and slow near the end:

    s(t) = s_f + (s_i - s_f) * (1 - (t - t_0) / (t_1 - t_0))^3,   t_0 <= t <= t_1

:class:`GradualPruner` plugs into the user's own training loop: call :meth:`GradualPruner.step`
after every ``optimizer.step()``. Every ``frequency`` steps it recomputes each layer's keep-mask by
magnitude *in the pattern the target runs* (unstructured, r x c blocks, N:M), and after every
step it multiplies the weights by their masks again, so an optimizer's momentum cannot bring a
pruned weight back. At the end the model's weights obey the pattern exactly, and compiling it
with ``method="magnitude"`` at the same sparsity keeps exactly these masks.

N:M patterns fix their ratio, so there is nothing to ramp: their masks apply in full from
``start_step`` on and are recomputed every ``frequency`` steps, letting weights move between the
members of a group while training continues.

Which layers: ``nn.Linear`` and pointwise ``nn.Conv2d`` (1x1, stride 1, no padding, one group)
with at least ``min_inputs`` inputs per output whose weight the pattern can tile, the layers
sparsecc's x86 plan makes sparse; or the names given in ``layers``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from .errors import SparseccError
from .sparsity import NM, check_sparsity_value, parse_pattern


def cubic_sparsity(step: int, *, final: float, start: int, end: int, initial: float = 0.0) -> float:
    """Zhu & Gupta's schedule: ``initial`` before ``start``, ``final`` from ``end`` on, and the
    cubic ramp between."""
    if end <= start:
        raise SparseccError(f"the pruning schedule needs end > start, got start={start}, end={end}")
    if step < start:
        return initial
    if step >= end:
        return final
    progress = (step - start) / (end - start)
    return final + (initial - final) * (1.0 - progress) ** 3


def _matrix(module: nn.Module) -> torch.Tensor:
    weight = module.weight
    return weight.detach().reshape(weight.shape[0], -1)


def prunable_layers(model: nn.Module, pattern: str = "unstructured", min_inputs: int = 64) -> list[str]:
    """Names of the layers :class:`GradualPruner` prunes by default (see the module docstring)."""
    parsed = parse_pattern(pattern)
    names = []
    for name, module in model.named_modules():
        if isinstance(module, nn.Conv2d):
            if (module.kernel_size != (1, 1) or module.groups != 1 or module.stride != (1, 1)
                    or module.padding not in ((0, 0), "valid")):
                continue
        elif not isinstance(module, nn.Linear):
            continue
        n, k = _matrix(module).shape
        if k >= min_inputs and parsed.check_shape((n, k)) is None:
            names.append(name)
    return names


class GradualPruner:
    """Prune ``model`` to ``sparsity`` gradually while it trains (see the module docstring).

    ``end_step`` is the optimizer step by which the final sparsity is reached; leave some
    training after it so the model recovers at the final sparsity.
    """

    def __init__(self, model: nn.Module, sparsity: float, *, end_step: int, pattern: str = "unstructured",
                 start_step: int = 0, frequency: int = 100, initial_sparsity: float = 0.0,
                 layers: Sequence[str] | None = None, min_inputs: int = 64) -> None:
        check_sparsity_value(sparsity)
        check_sparsity_value(initial_sparsity)
        self.pattern = parse_pattern(pattern)
        if isinstance(self.pattern, NM):
            if (why := self.pattern.check_sparsity(sparsity)) is not None:
                raise SparseccError(why)
        if frequency < 1:
            raise SparseccError(f"frequency must be at least 1 step, got {frequency}")
        self.model = model
        self.final = float(sparsity)
        self.initial = float(initial_sparsity)
        self.start_step, self.end_step, self.frequency = start_step, end_step, frequency
        cubic_sparsity(0, final=self.final, start=start_step, end=end_step)  # validates the window
        modules = dict(model.named_modules())
        names = list(layers) if layers is not None else prunable_layers(model, self.pattern.name, min_inputs)
        if not names:
            raise SparseccError(f"no layer of the model can take {self.pattern.name} (linear or pointwise conv "
                                f"layers with at least {min_inputs} inputs the pattern tiles); name them in layers=")
        self.layers: dict[str, nn.Module] = {}
        for name in names:
            module = modules.get(name)
            if module is None or not isinstance(getattr(module, "weight", None), torch.Tensor):
                raise SparseccError(f"layer {name!r} is not a module with a weight in this model")
            if (why := self.pattern.check_shape(tuple(_matrix(module).shape))) is not None:
                raise SparseccError(f"layer {name!r}: {why}")
            self.layers[name] = module
        self.masks: dict[str, torch.Tensor] = {
            name: torch.ones_like(_matrix(m), dtype=torch.bool) for name, m in self.layers.items()}
        self.steps = 0
        self.current = 0.0

    def target_sparsity(self, step: int | None = None) -> float:
        """The schedule's sparsity at ``step`` (default: the current step)."""
        step = self.steps if step is None else step
        if isinstance(self.pattern, NM):
            return self.final if step >= self.start_step else 0.0
        return cubic_sparsity(step, final=self.final, start=self.start_step, end=self.end_step,
                              initial=self.initial)

    @torch.no_grad()
    def step(self) -> None:
        """Advance one optimizer step: update the masks when the schedule says so, then apply
        them."""
        due = self.steps >= self.start_step and (
            (self.steps - self.start_step) % self.frequency == 0 or self.steps == self.end_step)
        if due:
            target = self.target_sparsity()
            if target > 0:
                for name, module in self.layers.items():
                    matrix = _matrix(module)
                    self.masks[name] = self.pattern.mask(matrix.abs(), target)
                self.current = target
        self.apply()
        self.steps += 1

    @torch.no_grad()
    def apply(self) -> None:
        """Zero every pruned weight (after an optimizer step, or before exporting the model)."""
        for name, module in self.layers.items():
            module.weight.mul_(self.masks[name].reshape(module.weight.shape).to(module.weight.dtype))

    def sparsities(self) -> dict[str, float]:
        """Each pruned layer's measured fraction of zero weights."""
        return {name: float((_matrix(m) == 0).float().mean()) for name, m in self.layers.items()}
