"""The kernels for the dense ops a model keeps (convolution, batched matmul, row reductions),
compiled through the whole lowering path and compared with torch eager."""

from __future__ import annotations

import pytest
import torch

tvm = pytest.importorskip("tvm")

from sparsecc.passes.lower import build, lower_to_relax  # noqa: E402
from sparsecc.targets import get_target  # noqa: E402
from sparsecc.targets.runners.host import load  # noqa: E402

TARGET = get_target("x86")


def _check(got: torch.Tensor, ref: torch.Tensor) -> None:
    scale = max(1.0, float(ref.abs().max()))
    torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-4 * scale)


def _run(model: torch.nn.Module, inputs: tuple[torch.Tensor, ...], tmp_path, name: str):
    model = model.eval()
    with torch.no_grad():
        ref = model(*inputs)
    result = lower_to_relax(torch.export.export(model, inputs), TARGET)
    records: list = []
    out = load(build(result.mod, TARGET, tmp_path / f"{name}.so", records))(*inputs)
    refs = ref if isinstance(ref, tuple) else (ref,)
    for got, want in zip(out, refs, strict=True):
        _check(got, want)
    return result.records, records


class ConvNet(torch.nn.Module):
    def __init__(self, conv: torch.nn.Conv2d):
        super().__init__()
        self.conv = conv

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.conv(x))


@pytest.mark.parametrize(("cin", "cout", "k", "stride", "padding", "dilation", "bias", "hw"), [
    (3, 16, 3, 1, 1, 1, True, (9, 11)),
    (8, 20, 3, 2, 1, 1, False, (13, 7)),
    (5, 7, 3, 2, 0, 1, True, (10, 10)),
    (4, 9, (3, 5), 1, (2, 1), 2, True, (11, 12)),
    (16, 32, 1, 1, 0, 1, True, (5, 5)),
    (7, 70, 3, 1, 1, 1, True, (6, 13)),   # a 4-vector panel and a tail panel; a tail of the output row
    (33, 8, 3, 1, 1, 1, False, (3, 3)),   # channel blocks with a short last block (K = 297)
])
def test_conv2d_panels(tmp_path, cin, cout, k, stride, padding, dilation, bias, hw) -> None:
    torch.manual_seed(0)
    conv = torch.nn.Conv2d(cin, cout, k, stride=stride, padding=padding, dilation=dilation, bias=bias)
    records, _ = _run(ConvNet(conv), (torch.randn(2, cin, *hw),), tmp_path, "conv")
    conv_records = [r for r in records if r.op == "convolution"]
    assert len(conv_records) == 1 and conv_records[0].format == "dense"
    assert conv_records[0].schedule.startswith("direct-conv-panels")


@pytest.mark.parametrize(("channels", "groups", "out_mult", "stride", "bias"), [
    (8, 8, 1, 1, True),   # depthwise
    (8, 8, 2, 2, False),  # depthwise, channel multiplier 2
    (12, 4, 1, 1, True),  # grouped
])
def test_grouped_conv2d(tmp_path, channels, groups, out_mult, stride, bias) -> None:
    torch.manual_seed(1)
    conv = torch.nn.Conv2d(channels, channels * out_mult, 3, stride=stride, padding=1, groups=groups, bias=bias)
    records, _ = _run(ConvNet(conv), (torch.randn(3, channels, 9, 21),), tmp_path, "gconv")
    assert [r.schedule.split()[0] for r in records if r.op == "convolution"] == ["direct-conv"]


@pytest.mark.parametrize(("b", "h", "t", "d"), [(2, 3, 7, 5), (1, 2, 33, 17), (2, 4, 32, 40)])
def test_attention_batched_matmul(tmp_path, b, h, t, d) -> None:
    class Attention(torch.nn.Module):
        def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
            scores = torch.softmax(q @ k.transpose(-1, -2) / d**0.5, dim=-1)
            return scores @ v

    torch.manual_seed(2)
    q, k, v = (torch.randn(b, h, t, d) for _ in range(3))
    records, generic = _run(Attention(), (q, k, v), tmp_path, "attn")
    assert sum(r.format == "dense" and r.op == "bmm" for r in records) == 2
    assert any("rows fused+parallel" in r.schedule for r in generic), "softmax should get the row schedule"


def test_layer_norm_gelu_rows(tmp_path) -> None:
    class Block(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.norm = torch.nn.LayerNorm(96)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return torch.nn.functional.gelu(self.norm(x)) + x

    torch.manual_seed(3)
    x = torch.randn(3, 11, 96) * 3
    _, generic = _run(Block(), (x,), tmp_path, "ln")
    assert any("rows fused+parallel" in r.schedule for r in generic)
