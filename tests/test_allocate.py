"""allocate: per-layer sparsities at the plan's total (OWL, depth ramp, ERK, searched)."""

from __future__ import annotations

import pytest
import sparsecc
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from sparsecc.pass_manager import PassContext, PassManager
from sparsecc.passes.allocate import layer_groups, rebalance


def _run(program, pipeline, target, calib=None):
    return PassManager(pipeline).run(program, PassContext(target, calibration=calib, progress=False))


@settings(max_examples=100, deadline=None)
@given(st.lists(st.tuples(st.floats(-0.5, 1.5), st.integers(1, 10_000)), min_size=2, max_size=12),
       st.floats(0.05, 0.9))
def test_rebalance_hits_the_target_within_the_bounds(items, target):
    raw = {str(i): v for i, (v, _) in enumerate(items)}
    sizes = {str(i): n for i, (_, n) in enumerate(items)}
    out = rebalance(raw, sizes, target, 0.95)
    assert all(0.0 <= v <= 0.95 for v in out.values())
    mean = sum(out[n] * sizes[n] for n in out) / sum(sizes.values())
    assert mean == pytest.approx(target, abs=1e-6)
    # one shift for all: the order of the raw values is kept
    names = sorted(raw, key=raw.get)
    assert [out[n] for n in names] == sorted(out[n] for n in names)


def test_layers_group_by_block_index():
    names = ["layers.0.q", "layers.0.k", "layers.1.q", "head", "enc.layer.10.ffn"]
    assert layer_groups(names) == {"layers.0": ["layers.0.q", "layers.0.k"], "layers.1": ["layers.1.q"],
                                   "head": ["head"], "enc.layer.10": ["enc.layer.10.ffn"]}


class _Blocks(torch.nn.Module):
    """Three blocks of two linears; block 1's input has a few very loud features (outliers)."""

    def __init__(self) -> None:
        super().__init__()
        self.layers = torch.nn.ModuleList(
            torch.nn.ModuleDict({"up": torch.nn.Linear(64, 128), "down": torch.nn.Linear(128, 64)}) for _ in range(3))
        loud = torch.ones(64)
        loud[:3] = 40.0
        self.register_buffer("loud", loud)

    def forward(self, x):
        for i, block in enumerate(self.layers):
            h = x * self.loud if i == 1 else x
            x = x + block["down"](torch.relu(block["up"](h)))
        return x


def _blocks():
    torch.manual_seed(0)
    model = _Blocks().eval()
    calib = [(torch.randn(32, 64),) for _ in range(6)]
    return model, calib


def _sizes_and_sparsities(plan):
    return {lp.name: (lp.shape[0] * lp.shape[1], lp.sparsity) for lp in plan.sparse_layers()}


@pytest.mark.parametrize("method", ["owl", "depth", "erk", "search"])
def test_allocations_keep_the_total_and_differ_from_uniform(x86, method):
    model, calib = _blocks()
    program = sparsecc.capture(model, calib[0])
    result = _run(program, f"plan-uniform{{sparsity=0.7,pattern=unstructured}},allocate{{method={method}}},prune-wanda",
                  x86, calib)
    allocated = result.results[1][1].program.plan
    facts = _sizes_and_sparsities(allocated)
    total = sum(n for n, _ in facts.values())
    assert sum(n * s for n, s in facts.values()) / total == pytest.approx(0.7, abs=1e-4)
    # the pruned model really has that many zeros
    pruned = result.program
    zeros = sum(int((pruned.tensor(f"{name}.weight") == 0).sum()) for name in facts)
    assert zeros / total == pytest.approx(0.7, abs=0.01)
    spread = {s for _, s in facts.values()}
    if method == "owl":
        # the block with outlier inputs is kept denser, both of its layers alike
        assert facts["layers.1.up"][1] < facts["layers.0.up"][1]
        assert facts["layers.1.up"][1] == facts["layers.1.down"][1]
    if method == "depth":
        assert facts["layers.0.up"][1] < facts["layers.1.up"][1] < facts["layers.2.up"][1]
    if method == "erk":
        assert len(spread) == 1  # equal shapes: ERK is uniform here
    if method == "search":
        res = result.results[1][1]
        errors = {k: v for k, v in res.counters.items() if k.startswith("error_")}
        assert len(errors) == 7 and "error_uniform_0" in errors
        note = next(d.message for d in res.diagnostics if "search chose" in d.message)
        assert f"{min(errors.values()):.4g}" in note


def test_nm_plans_are_left_alone_with_a_note(x86):
    model, calib = _blocks()
    program = sparsecc.capture(model, calib[0])
    result = _run(program, "plan-uniform{sparsity=0.5,pattern=2:4},allocate{method=depth}", x86, calib)
    res = result.results[-1][1]
    assert not res.changed and all(lp.sparsity == 0.5 for lp in res.program.plan.sparse_layers())
    assert any("2:4 fixes the sparsity" in d.message for d in res.diagnostics)
