"""Capture folds inference batch norms into the convolution before them: same function to float
rounding, one op per pair fewer, the convolution's weight names kept (plans and reports name
layers by them), and nothing folded where it would change the model."""

from __future__ import annotations

import collections

import pytest
import torch
from sparsecc.capture import capture, fold_batch_norms


class Block(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = torch.nn.Conv2d(3, 8, 3, padding=1, bias=False)
        self.stem_bn = torch.nn.BatchNorm2d(8)
        self.depthwise = torch.nn.Conv2d(8, 8, 3, padding=1, groups=8, bias=True)
        self.depthwise_bn = torch.nn.BatchNorm2d(8, affine=False)
        self.shared = torch.nn.Conv2d(8, 4, 1)  # its output also feeds the residual: not folded
        self.shared_bn = torch.nn.BatchNorm2d(4)
        self.expand = torch.nn.Conv2d(8, 4, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.relu(self.stem_bn(self.stem(x)))
        y = torch.nn.functional.relu6(self.depthwise_bn(self.depthwise(y)))
        s = self.shared(y)
        return self.shared_bn(s) + s + self.expand(y)


def _randomized(model: torch.nn.Module) -> torch.nn.Module:
    torch.manual_seed(0)
    for module in model.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            module.running_mean.uniform_(-1, 1)
            module.running_var.uniform_(0.5, 2)
            if module.affine:
                module.weight.data.uniform_(0.5, 1.5)
                module.bias.data.uniform_(-1, 1)
    return model.eval()


def _ops(program) -> collections.Counter:
    return collections.Counter(str(n.target) for n in program.graph.nodes if n.op == "call_function")


def test_conv_batch_norm_pairs_fold_and_compute_the_same() -> None:
    model = _randomized(Block())
    x = torch.randn(2, 3, 10, 10)
    program = capture(model, (x,))
    ops = _ops(program)
    assert ops["aten.batch_norm.default"] == 1  # only the one whose conv output is used twice
    assert ops["aten.conv2d.default"] == 4
    state = program.exported.state_dict
    assert {"stem.weight", "stem.bias", "depthwise.weight", "depthwise.bias"} <= set(state)
    assert not any(name.startswith(("stem_bn.", "depthwise_bn.")) for name in state)
    assert "shared_bn.running_mean" in program.exported.state_dict or "shared_bn.running_mean" in dict(
        program.exported.named_buffers())
    with torch.no_grad():
        torch.testing.assert_close(program.run(x), model(x), rtol=1e-5, atol=1e-5)
    assert [layer.name for layer in program.layers()] == ["stem", "depthwise", "shared", "expand"]
    assert program.layers()[0].bias == "stem.bias"

    kept = capture(model, (x,), fold_batch_norm=False)
    assert _ops(kept)["aten.batch_norm.default"] == 3


def test_a_program_without_batch_norms_is_returned_unchanged() -> None:
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 1), torch.nn.ReLU()).eval()
    exported = torch.export.export(model, (torch.randn(1, 3, 4, 4),))
    same, folded = fold_batch_norms(exported, (torch.randn(1, 3, 4, 4),))
    assert same is exported and folded == 0


@pytest.mark.slow
def test_mobilenet_v2_folds_every_batch_norm() -> None:
    from sparsecc.zoo import mobilenet

    model = mobilenet.load_mobilenet_v2()
    crops = mobilenet.augmented_crops(2, seed=0)
    program = capture(model, (crops[:1],))
    ops = _ops(program)
    assert ops["aten.batch_norm.default"] == 0 and ops["aten.conv2d.default"] == 52
    with torch.no_grad():
        for i in range(2):
            torch.testing.assert_close(program.run(crops[i:i + 1]), model(crops[i:i + 1]), rtol=1e-4, atol=1e-4)
