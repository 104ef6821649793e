"""allocate: per-layer sparsities at the plan's total (OWL, depth ramp, ERK, searched)."""

from __future__ import annotations

import pytest
import sparsecc
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from sparsecc.errors import WeightError
from sparsecc.pass_manager import PassContext, PassManager
from sparsecc.passes.allocate import layer_groups, rebalance, row_sparsities
from sparsecc.plan import LayerPlan, Plan, PlanError


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
        assert len(errors) == 11 and "error_uniform_0" in errors
        note = next(d.message for d in res.diagnostics if "search chose" in d.message)
        assert f"{min(errors.values()):.4g}" in note


def test_nm_plans_are_left_alone_with_a_note(x86):
    model, calib = _blocks()
    program = sparsecc.capture(model, calib[0])
    result = _run(program, "plan-uniform{sparsity=0.5,pattern=2:4},allocate{method=depth}", x86, calib)
    res = result.results[-1][1]
    assert not res.changed and all(lp.sparsity == 0.5 for lp in res.program.plan.sparse_layers())
    assert any("2:4 fixes the sparsity" in d.message for d in res.diagnostics)


# -- row-wise ratios (neuroal) -------------------------------------------------------------------


@settings(max_examples=100, deadline=None)
@given(st.lists(st.floats(0.0, 1.0), min_size=2, max_size=64), st.floats(0.1, 0.9), st.floats(0.0, 0.3))
def test_row_sparsities_keep_the_mean_and_favour_outlier_rows(ratios, target, lam):
    ratio = torch.tensor(ratios, dtype=torch.float64)
    rows = row_sparsities(ratio, target, lam, 0.95)
    assert float(rows.mean()) == pytest.approx(target, abs=1e-6)
    assert bool((rows >= 0).all()) and bool((rows <= 0.95).all())
    # a row with more outliers never gets a higher sparsity than one with fewer
    order = torch.argsort(ratio, stable=True)
    assert bool((rows[order].diff() <= 1e-9).all())


class _LoudRows(torch.nn.Module):
    """Two linears; a few output rows of the second carry most of the output's energy, so giving
    them more weights (row-wise ratios) must align the pruned output better."""

    def __init__(self) -> None:
        super().__init__()
        self.layers = torch.nn.ModuleList([torch.nn.Linear(64, 96), torch.nn.Linear(96, 64)])
        with torch.no_grad():
            self.layers[1].weight[:4] *= 30.0

    def forward(self, x):
        return self.layers[1](torch.relu(self.layers[0](x)))


def test_neuroal_writes_row_ratios_that_pruning_follows(x86, tmp_path):
    torch.manual_seed(0)
    model = _LoudRows().eval()
    calib = [(torch.randn(32, 64),) for _ in range(6)]
    program = sparsecc.capture(model, calib[0])
    result = _run(program, "plan-uniform{sparsity=0.7,pattern=unstructured},"
                  "allocate{method=neuroal,row_strengths=0.05;0.2},prune-wanda", x86, calib)
    res = result.results[1][1]
    row_errors = {k: v for k, v in res.counters.items() if k.startswith("error_rows_")}
    assert set(row_errors) == {"error_rows_0"} | {f"error_rows_{signal}_{lam}" for signal in ("loss", "outliers")
                                                for lam in ("0.05", "0.2")}
    # here the row-wise step pays: it is chosen and strictly better than equal rows
    assert res.counters["row_lam"] > 0
    assert min(row_errors.values()) < row_errors["error_rows_0"]
    assert any("row-wise step chose" in d.message for d in res.diagnostics)
    plan = res.program.plan
    loud = plan.layers["layers.1"]
    assert loud.row_sparsity is not None and len(loud.row_sparsity) == 64
    assert sum(loud.row_sparsity) / 64 == pytest.approx(loud.sparsity, abs=1e-4)
    assert max(loud.row_sparsity[:4]) < min(loud.row_sparsity[4:])  # the loud rows keep more
    # pruning keeps exactly the planned count in every row
    weight = result.program.tensor("layers.1.weight")
    kept = (weight != 0).sum(1)
    expected = 96 - torch.round(torch.tensor(loud.row_sparsity, dtype=torch.float64) * 96).long()
    assert torch.equal(kept, expected)
    # the plan round-trips through JSON with its rows
    path = tmp_path / "plan.json"
    plan.save(path)
    again = Plan.load(path)
    assert again.layers["layers.1"].row_sparsity == loud.row_sparsity
    # and SparseGPT, which picks masks 128 columns at a time, keeps the same per-row counts
    sgpt = _run(result.results[1][1].program, "prune-sparsegpt", x86, calib).program
    assert torch.equal((sgpt.tensor("layers.1.weight") != 0).sum(1), expected)


def test_row_ratios_that_do_not_fit_are_refused(tmp_path):
    good = LayerPlan("fc", "linear", [4, 8], "unstructured", 0.5, "", [0.5, 0.25, 0.75, 0.5])
    good.check()
    with pytest.raises(PlanError, match="4 output rows"):
        LayerPlan("fc", "linear", [4, 8], "unstructured", 0.5, "", [0.5, 0.5]).check()
    with pytest.raises(PlanError, match="only for the unstructured pattern"):
        LayerPlan("fc", "linear", [4, 8], "2:4", 0.5, "", [0.5] * 4).check()
    with pytest.raises(PlanError, match=r"in \[0, 1\)"):
        LayerPlan("fc", "linear", [4, 8], "unstructured", 0.5, "", [0.5, 1.0, 0.0, 0.5]).check()
    plan = Plan("x86", "wanda", {"fc": LayerPlan("fc", "linear", [4, 8], "unstructured", 0.5, "", [0.5, 0.5])})
    path = tmp_path / "bad.json"
    plan.save(path)
    with pytest.raises(PlanError, match="4 output rows"):
        Plan.load(path)
    # a plan without rows reads and writes as before: no row_sparsity key at all
    assert "row_sparsity" not in Plan("x86", "wanda", {"fc": LayerPlan("fc", "linear", [4, 8], "unstructured",
                                                                         0.5)}).dumps()


def test_row_ratios_compile_to_csr_kernels_that_match_masked_dense(tmp_path):
    """End to end: rows of unequal length reach the CSR kernels, the compiled program matches the
    masked-dense one, and the saved artifact's plan keeps the rows."""
    torch.manual_seed(0)
    model = _LoudRows().eval()
    calib = [(torch.randn(8, 64),) for _ in range(6)]
    artifact = sparsecc.compile(model, calib[0], target="x86", calibration=calib, sparsity=0.7,
                                pattern="unstructured", method="wanda", allocation="neuroal", progress=False)
    rows = artifact.plan.layers["layers.1"].row_sparsity
    assert rows is not None and len(set(rows)) > 1
    x = torch.randn(8, 64)
    assert float((artifact(x) - artifact.reference(x)).norm() / artifact.reference(x).norm()) < 1e-4
    kept = (artifact.pruned.state_dict["layers.1.weight"] != 0).sum(1)
    expected = 96 - torch.round(torch.tensor(rows, dtype=torch.float64) * 96).long()
    assert torch.equal(kept, expected) and len(set(kept.tolist())) > 1
    again = sparsecc.load(artifact.save(tmp_path / "art"))
    assert again.plan.layers["layers.1"].row_sparsity == rows


def test_alignment_measures_are_named_and_checked(x86):
    model, calib = _blocks()
    program = sparsecc.capture(model, calib[0])
    for measure, words in (("kl", "KL divergence from dense"), ("l2", "output error relative to dense")):
        result = _run(program, f"plan-uniform{{sparsity=0.7,pattern=unstructured}},allocate{{method=search,"
                      f"measure={measure}}}", x86, calib)
        res = result.results[1][1]
        note = next(d.message for d in res.diagnostics if "search chose" in d.message)
        assert words in note
        errors = [v for k, v in res.counters.items() if k.startswith("error_")]
        assert all(v >= 0 for v in errors) and len(set(errors)) > 1
    with pytest.raises(WeightError, match="unknown alignment measure 'cosine'"):
        _run(program, "plan-uniform{sparsity=0.7,pattern=unstructured},allocate{method=search,measure=cosine}",
             x86, calib)
