"""Sparse k x k, strided, padded and dilated convolutions: im2col rows times a sparse GEMM, from
the op's reference through the packed program to the compiled kernels (``convs=all``)."""

from __future__ import annotations

import pytest
import sparsecc
import torch
import torch.nn.functional as F
from sparsecc.ops import im2col_rows

pytest.importorskip("tvm")


class WindowNet(torch.nn.Module):
    """Every convolution geometry the im2col path must get right."""

    def __init__(self) -> None:
        super().__init__()
        self.padded = torch.nn.Conv2d(16, 32, 3, padding=1)
        self.strided = torch.nn.Conv2d(32, 48, 3, stride=2, padding=1, bias=False)
        self.dilated = torch.nn.Conv2d(48, 64, (3, 5), padding=(0, 2), dilation=(2, 1))
        self.strided_1x1 = torch.nn.Conv2d(64, 64, 1, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.padded(x))
        x = torch.relu(self.strided(x))
        x = torch.relu(self.dilated(x))
        return self.strided_1x1(x)


@pytest.mark.parametrize("geometry", [((3, 3), (1, 1), (1, 1), (1, 1)), ((3, 5), (2, 1), (0, 2), (2, 1)),
                                      ((1, 1), (2, 2), (0, 0), (1, 1))])
def test_im2col_rows_times_the_weight_is_the_convolution(geometry) -> None:
    kernel, stride, padding, dilation = geometry
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2, 6, 11, 9, generator=gen)
    weight = torch.randn(5, 6, *kernel, generator=gen)
    rows = im2col_rows(x, list(kernel), list(stride), list(padding), list(dilation))
    ref = F.conv2d(x, weight, stride=stride, padding=padding, dilation=dilation)
    b, n, oh, ow = ref.shape
    assert rows.shape == (b * oh * ow, 6 * kernel[0] * kernel[1])
    got = (rows @ weight.reshape(n, -1).T).reshape(b, oh, ow, n).permute(0, 3, 1, 2)
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)
    torch.library.opcheck(torch.ops.sparsecc.im2col_rows.default,
                          (x, list(kernel), list(stride), list(padding), list(dilation)))


@pytest.mark.parametrize("pattern", ["unstructured", "block4x1"])
def test_compiled_sparse_convolutions_match_the_masked_dense_program(pattern: str) -> None:
    torch.manual_seed(0)
    model = WindowNet().eval()
    x = torch.randn(2, 16, 15, 13)
    artifact = sparsecc.compile(model, (x,), sparsity=0.6, pattern=pattern, method="magnitude", convs="all",
                                progress=False)
    decisions = {layer.name: layer for layer in artifact.report.layers}
    assert all(layer.decision == "sparse" for layer in decisions.values()), decisions
    with torch.no_grad():
        reference = artifact.reference(x)
        torch.testing.assert_close(artifact.packed(x), reference, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(artifact(x), reference, rtol=1e-4, atol=1e-4)
    # every one of them is strided, padded or wider than 1x1, so each reads its windows as rows
    calls = [node for node in artifact.packed_program.graph.nodes
             if node.op == "call_function" and "im2col_rows" in str(node.target)]
    assert len(calls) == 4


def test_default_plan_keeps_kxk_convolutions_dense() -> None:
    torch.manual_seed(0)
    x = torch.randn(1, 16, 15, 13)
    artifact = sparsecc.compile(WindowNet().eval(), (x,), sparsity=0.6, pattern="unstructured",
                                method="magnitude", progress=False)
    layers = {layer.name: layer for layer in artifact.report.layers}
    assert all(layers[name].decision == "dense" for name in ("padded", "strided", "dilated", "strided_1x1"))
    assert "convs=all" in layers["padded"].reason


def test_convs_option_is_refused_where_it_cannot_apply() -> None:
    x = torch.randn(1, 16, 15, 13)
    with pytest.raises(sparsecc.SparseccError, match="plan-uniform"):
        sparsecc.compile(WindowNet().eval(), (x,), convs="all", pipeline="plan-uniform{sparsity=0.5},prune-magnitude,"
                         "pack,lower,build", progress=False)
    with pytest.raises(sparsecc.SparseccError, match="channel pruning"):
        sparsecc.compile(WindowNet().eval(), (x,), pattern="channel", convs="all", progress=False)
    with pytest.raises(sparsecc.SparseccError, match="pointwise"):
        sparsecc.compile(WindowNet().eval(), (x,), convs="3x3", progress=False)
