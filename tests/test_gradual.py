"""Gradual pruning during training: the cubic schedule, masks in the target's pattern, and the
digits CNN pruned to 90 % while fine-tuning, compiled, within a point of dense accuracy."""

from __future__ import annotations

import pytest
import sparsecc
import torch
from sparsecc.errors import SparseccError
from sparsecc.gradual import GradualPruner, cubic_sparsity, prunable_layers
from sparsecc.sparsity import parse_pattern
from sparsecc.zoo import accuracy, train_digits_cnn
from sparsecc.zoo.digits import finetune_gradual


def test_cubic_schedule_ramps_fast_then_slow():
    values = [cubic_sparsity(t, final=0.9, start=10, end=110) for t in range(0, 130, 10)]
    assert values[0] == values[1] == 0.0 and values[-1] == values[-2] == 0.9 > values[-3]
    steps = [b - a for a, b in zip(values[1:], values[2:], strict=False)]
    assert all(s1 >= s2 for s1, s2 in zip(steps, steps[1:], strict=False))  # ever smaller steps
    assert cubic_sparsity(60, final=0.9, start=10, end=110) == pytest.approx(0.9 * (1 - 0.5**3))
    with pytest.raises(SparseccError, match="end > start"):
        cubic_sparsity(0, final=0.5, start=5, end=5)


class _Net(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = torch.nn.Linear(64, 64)
        self.b = torch.nn.Linear(64, 32)
        self.small = torch.nn.Linear(32, 10)

    def forward(self, x):
        return self.small(torch.relu(self.b(torch.relu(self.a(x)))))


@pytest.mark.parametrize("pattern, sparsity", [("unstructured", 0.8), ("block16x1", 0.75), ("2:4", 0.5)])
def test_masks_follow_the_schedule_in_the_pattern_and_survive_optimizer_steps(pattern, sparsity):
    torch.manual_seed(0)
    net = _Net()
    assert prunable_layers(net, pattern) == ["a", "b"]
    pruner = GradualPruner(net, sparsity, pattern=pattern, end_step=20, frequency=5)
    optimizer = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9)
    seen = []
    for _ in range(30):
        optimizer.zero_grad()
        net(torch.randn(8, 64)).pow(2).mean().backward()
        optimizer.step()
        pruner.step()
        seen.append(pruner.current)
        # momentum pushes pruned weights every step; they stay zero
        for name, sp in pruner.sparsities().items():
            assert sp >= pruner.current - 0.02, (name, sp, pruner.current)
    assert seen == sorted(seen) and seen[-1] == pytest.approx(sparsity)
    parsed = parse_pattern(pattern)
    for name in ("a", "b"):
        assert parsed.satisfied_by(pruner.masks[name], sparsity)
        assert parsed.fits_within(getattr(net, name).weight != 0, sparsity)
    assert (net.small.weight != 0).all()


def test_bad_requests_are_refused():
    with pytest.raises(SparseccError, match="fixes sparsity"):
        GradualPruner(_Net(), 0.7, pattern="2:4", end_step=10)
    with pytest.raises(SparseccError, match="no layer"):
        GradualPruner(torch.nn.Sequential(torch.nn.Linear(8, 8)), 0.5, end_step=10)
    with pytest.raises(SparseccError, match="'nope' is not a module"):
        GradualPruner(_Net(), 0.5, end_step=10, layers=["nope"])


@pytest.mark.slow
def test_digits_cnn_pruned_to_90_percent_while_training_stays_within_a_point():
    model, data = train_digits_cnn(seed=0)
    dense = accuracy(model, data.test_images, data.test_labels)
    pruner = finetune_gradual(model, data, 0.9)
    assert list(pruner.layers) == ["pointwise", "fc1", "fc2"]
    assert all(sp >= 0.9 for sp in pruner.sparsities().values())
    pruned = accuracy(model, data.test_images, data.test_labels)
    assert pruned >= dense - 0.01, (dense, pruned)
    # compiling with magnitude at the same sparsity keeps the trained masks, so the compiled
    # model keeps the accuracy
    example = data.test_images[:64]
    artifact = sparsecc.compile(model, (example,), sparsity=0.9, pattern="unstructured", method="magnitude",
                                progress=False)
    compiled = accuracy(artifact, data.test_images, data.test_labels)
    assert compiled >= dense - 0.01, (dense, pruned, compiled)
    assert {lr.name for lr in artifact.report.layers if lr.decision == "sparse"} == {"pointwise", "fc1", "fc2"}
