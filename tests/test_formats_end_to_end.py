"""Every pattern the x86 target offers, compiled through the whole pipeline on a model with odd
shapes, agrees with the masked-dense program (the kernel tier of the numerics contract)."""

from __future__ import annotations

import pytest
import torch

tvm = pytest.importorskip("tvm")

import sparsecc  # noqa: E402
from sparsecc.sparsity import NM, parse_pattern  # noqa: E402
from sparsecc.targets import get_target  # noqa: E402

TARGET = get_target("x86")


class OddShapes(torch.nn.Module):
    """K = 100 (not a multiple of 8 or 16: N:M with groups of 8 keeps fc1 dense), K = 96 and
    N = 96, 64 (three 32-row blocks), and an output row that is all zeros."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1 = torch.nn.Linear(100, 96)
        self.fc2 = torch.nn.Linear(96, 64)
        self.head = torch.nn.Linear(64, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.relu(self.fc2(torch.relu(self.fc1(x)))))


@pytest.mark.parametrize("m", [3, 1])
@pytest.mark.parametrize("pattern", TARGET.patterns)
def test_every_pattern_compiles_and_matches_the_masked_dense_program(pattern: str, m: int) -> None:
    torch.manual_seed(0)
    model = OddShapes().eval()
    with torch.no_grad():
        model.fc1.weight[7] = 0  # an empty row in the packed weight
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(m, 100, generator=gen)
    calib = [(torch.randn(m, 100, generator=gen),) for _ in range(2)]
    parsed = parse_pattern(pattern)
    sparsity = 1 - parsed.n / parsed.m if isinstance(parsed, NM) else 0.6
    artifact = sparsecc.compile(model, (x,), sparsity=sparsity, pattern=pattern, method="wanda",
                                calibration=calib, progress=False)
    sparse = [layer for layer in artifact.report.layers if layer.decision == "sparse"]
    assert sparse, f"{pattern}: no layer was made sparse: {artifact.report.summary()}"
    with torch.no_grad():
        got, want = artifact(x), artifact.reference(x)
    scale = max(1.0, float(want.abs().max()))
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4 * scale)
    assert not [d for d in artifact.report.diagnostics if d["severity"] == "error"]


def test_report_counts_the_bytes_the_kernels_store() -> None:
    # 50 % unstructured: 4-byte values and 2-byte column indices are 0.75x of the dense bytes (an
    # int32 index would make it 1.0x); the report must count what the library stores.
    torch.manual_seed(0)
    model = OddShapes().eval()
    x = torch.randn(1, 100)
    artifact = sparsecc.compile(model, (x,), sparsity=0.5, pattern="unstructured", method="magnitude",
                                calibration=[(x,)], progress=False)
    fc2 = next(layer for layer in artifact.report.layers if layer.name == "fc2")
    assert fc2.kernel_bytes is not None and fc2.stored_bytes == fc2.kernel_bytes
    assert 0.7 * fc2.dense_bytes < fc2.kernel_bytes < 0.85 * fc2.dense_bytes, (fc2.kernel_bytes, fc2.dense_bytes)
    dense, stored = artifact.report.weight_bytes
    assert stored < dense


def test_row_pairs_at_many_input_rows() -> None:
    # M = 128 at 50 %: unstructured layers run as row pairs (a column both rows keep stored once
    # with its two weights, 5 bytes per weight instead of 6), and still match the masked-dense
    # program; the report counts the smaller bytes.
    torch.manual_seed(0)
    model = OddShapes().eval()
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(128, 100, generator=gen)
    artifact = sparsecc.compile(model, (x,), sparsity=0.5, pattern="unstructured", method="magnitude",
                                calibration=[(x,)], progress=False)
    with torch.no_grad():
        got, want = artifact(x), artifact.reference(x)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4 * max(1.0, float(want.abs().max())))
    fc2 = next(layer for layer in artifact.report.layers if layer.name == "fc2")
    assert fc2.kernel is not None and "pairs" in fc2.kernel, fc2.kernel
    assert fc2.kernel_bytes is not None and fc2.kernel_bytes < 0.75 * fc2.dense_bytes, (fc2.kernel_bytes,
                                                                                        fc2.dense_bytes)
