"""End to end: a hand-packed torch program -> torch.export -> Relax -> host library -> run."""

from __future__ import annotations

import pytest
import torch

tvm = pytest.importorskip("tvm")

import sparsecc.ops  # noqa: E402,F401 - registers torch.ops.sparsecc
from sparsecc.passes.lower import build, compile_relax, lower_to_relax  # noqa: E402
from sparsecc.sparsity import parse_pattern  # noqa: E402
from sparsecc.targets import get_target  # noqa: E402
from sparsecc.targets.runners.host import load  # noqa: E402

TARGET = get_target("x86")


def _packed(pattern: str, n_out: int, k: int, sparsity: float, seed: int):
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(n_out, k, generator=gen)
    p = parse_pattern(pattern)
    w = w * p.mask(w.abs(), sparsity)
    return w, p.pack(w.numpy())


class SparseMLP(torch.nn.Module):
    """linear(CSR) -> relu -> linear(block 16x1) -> relu -> linear(2:4) -> dense linear."""

    def __init__(self, k: int = 48, hidden: int = 64, out: int = 10):
        super().__init__()
        self.w1, p1 = _packed("unstructured", hidden, k, 0.7, 1)
        self.w2, p2 = _packed("block16x1", hidden, hidden, 0.5, 2)
        self.w3, p3 = _packed("2:4", hidden, hidden, 0.5, 3)
        for prefix, packed in (("l1", p1), ("l2", p2), ("l3", p3)):
            for name, array in packed.arrays().items():
                self.register_buffer(f"{prefix}_{name}", torch.from_numpy(array.copy()))
        self.b1 = torch.nn.Parameter(torch.randn(hidden))
        self.b3 = torch.nn.Parameter(torch.randn(hidden))
        self.head = torch.nn.Linear(hidden, out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        ops = torch.ops.sparsecc
        h = torch.relu(ops.sparse_linear_csr(x, self.l1_indptr, self.l1_indices, self.l1_data, self.b1))
        h = torch.relu(ops.sparse_linear_bsr(h, self.l2_indptr, self.l2_indices, self.l2_data, None))
        h = ops.sparse_linear_nm(h, self.l3_values, self.l3_positions, 4, self.b3)
        return self.head(h)

    def dense_reference(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(x @ self.w1.T + self.b1)
        h = torch.relu(h @ self.w2.T)
        return self.head(h @ self.w3.T + self.b3)


class SequenceModel(torch.nn.Module):
    """3-D input (B, T, K): dense linear, layer norm, sparse linear on the flattened tokens, gelu."""

    def __init__(self, k: int = 32, hidden: int = 48):
        super().__init__()
        self.proj = torch.nn.Linear(k, hidden)
        self.norm = torch.nn.LayerNorm(hidden)
        self.w, packed = _packed("unstructured", hidden, hidden, 0.9, 4)
        for name, array in packed.arrays().items():
            self.register_buffer(name, torch.from_numpy(array.copy()))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, _ = x.shape
        h = self.norm(self.proj(x)).reshape(b * t, -1)
        h = torch.ops.sparsecc.sparse_linear_csr(h, self.indptr, self.indices, self.data, None)
        return torch.nn.functional.gelu(h).reshape(b, t, -1)


def _check(got: torch.Tensor, ref: torch.Tensor) -> None:
    scale = max(1.0, float(ref.abs().max()))
    torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-4 * scale)


@pytest.mark.parametrize("m", [1, 5, 128])
def test_sparse_mlp_end_to_end(tmp_path, m: int) -> None:
    torch.manual_seed(0)
    model = SparseMLP().eval()
    x = torch.randn(m, 48)
    with torch.no_grad():
        ref = model(x)
        _check(ref, model.dense_reference(x))
    ep = torch.export.export(model, (x,))
    result = lower_to_relax(ep, TARGET)
    formats = {r.node: r.format for r in result.records}
    assert sorted(f for f in formats.values() if f != "generic") == ["bsr", "csr", "dense", "nm"]
    assert any(r.format == "generic" and "relu" in r.op for r in result.records)
    records: list = []
    lib = build(result.mod, TARGET, tmp_path / "mlp.so", records)
    assert all(r.schedule.startswith("generic") for r in records)
    out = load(lib)(x)
    assert len(out) == 1
    _check(out[0], ref)


def test_sequence_model_end_to_end(tmp_path) -> None:
    torch.manual_seed(0)
    model = SequenceModel().eval()
    x = torch.randn(2, 7, 32)
    with torch.no_grad():
        ref = model(x)
    ep = torch.export.export(model, (x,))
    result = lower_to_relax(ep, TARGET)
    dense = [r for r in result.records if r.format == "dense"]
    assert dense and dense[0].x_shape == (2, 7, 32)
    records: list = []
    out = load(build(result.mod, TARGET, tmp_path / "seq.so", records))(x)
    assert records, "layer norm / gelu should have been given generic schedules"
    _check(out[0], ref)


def test_sparse_kernels_use_vector_registers() -> None:
    model = SparseMLP().eval()
    ep = torch.export.export(model, (torch.randn(1, 48),))
    ex = compile_relax(lower_to_relax(ep, TARGET).mod, TARGET)
    # The Relax executable's own module holds VM bytecode; the kernels are in an imported module.
    asm = "\n".join(m.inspect_source("asm") for m in [ex.mod, *ex.mod.imports])
    width = "zmm" if TARGET.capabilities().vector_bits >= 512 else "ymm"
    assert width in asm
    assert "vfmadd" in asm
    for kernel in ("sparse_csr_", "sparse_bsr_", "sparse_nm_"):
        start = asm.find(f"{kernel}")
        assert start >= 0, f"{kernel} missing from the library"


def test_dynamic_shape_is_rejected() -> None:
    from sparsecc.passes.lower import LoweringError

    model = SparseMLP().eval()
    batch = torch.export.Dim("batch", min=2, max=64)
    ep = torch.export.export(model, (torch.randn(4, 48),), dynamic_shapes=({0: batch},))
    with pytest.raises(LoweringError, match="not static"):
        lower_to_relax(ep, TARGET)


def test_generic_schedule_is_applied_to_unknown_ops(tmp_path) -> None:
    class Attention(torch.nn.Module):
        def forward(self, q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
            return torch.softmax(q @ k.transpose(-1, -2), dim=-1) @ k

    q, k = torch.randn(2, 16, 32), torch.randn(2, 16, 32)
    ep = torch.export.export(Attention(), (q, k))
    result = lower_to_relax(ep, TARGET)
    records: list = []
    out = load(build(result.mod, TARGET, tmp_path / "att.so", records))(q, k)
    assert records and all("generic" in r.schedule for r in records)
    _check(out[0], Attention()(q, k))


def test_host_runner_inputs_and_outputs(tmp_path) -> None:
    """Inputs reach the library zero-copy or through a staging buffer depending on alignment and
    layout; every path gives the same result, and results are the caller's own tensors."""

    model = torch.nn.Sequential(torch.nn.Linear(24, 16), torch.nn.ReLU()).eval()
    x = torch.randn(8, 24)
    module = load(build(lower_to_relax(torch.export.export(model, (x,)), TARGET).mod, TARGET,
                        tmp_path / "runner.so"))
    with torch.no_grad():
        ref = model(x)
    batch = torch.randn(9 * 24 + 1)[1:].reshape(9, 24)[:8]  # contiguous, 4 bytes past an alignment
    batch.copy_(x)
    read_only = x.numpy().copy()
    read_only.flags.writeable = False
    for value in (x, batch, x.t().contiguous().t(), x.numpy(), read_only, x.t().t()[:, :]):
        torch.testing.assert_close(module(value)[0], ref, rtol=1e-5, atol=1e-5)
    first = module(batch)[0]
    keep = first.clone()
    module(torch.zeros(8, 24))  # reuses the staging buffer and the VM's output storage
    first.add_(1.0)  # the result is a copy: changing it touches nothing inside the module
    torch.testing.assert_close(first - 1.0, keep)
    torch.testing.assert_close(module(batch)[0], ref, rtol=1e-5, atol=1e-5)
