"""Pruning methods: the layer-by-layer calibration engine, SparseGPT's solver and pass, and the
range-wise masks every pattern gives SparseGPT."""

from __future__ import annotations

import pytest
import sparsecc
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from sparsecc.errors import WeightError
from sparsecc.pass_manager import PassContext, PassManager
from sparsecc.passes.dsnot import dsnot_refine
from sparsecc.passes.layerwise import LayerwiseRunner
from sparsecc.passes.sparsegpt import sparsegpt_prune
from sparsecc.sparsity import parse_pattern

PATTERNS = [("unstructured", 0.5), ("unstructured", 0.7), ("2:4", 0.5), ("4:8", 0.5), ("1:4", 0.75),
            ("block16x1", 0.5), ("block4x4", 0.7), ("block8x2", 0.5)]


def _run(program, pipeline, target, calib=None):
    return PassManager(pipeline).run(program, PassContext(target, calibration=calib, progress=False))


def _correlated_layer(n: int = 64, k: int = 128, rows: int = 1024, seed: int = 0):
    """A weight and inputs whose features are correlated and unequally loud, as in real models:
    what separates the methods."""
    gen = torch.Generator().manual_seed(seed)
    weight = torch.randn(n, k, generator=gen)
    mixing = torch.randn(k, k, generator=gen) / k**0.5 + torch.eye(k)
    x = (torch.randn(rows, k, generator=gen) * (torch.rand(k, generator=gen) * 3 + 0.1)) @ mixing
    return weight, x


def _output_error(weight, pruned, x):
    ref = x @ weight.T
    return float(((x @ pruned.T - ref) ** 2).sum() / (ref**2).sum())


# -- masks chosen a range of columns at a time ---------------------------------------------------


@settings(max_examples=60, deadline=None)
@given(pattern_name=st.sampled_from([p for p, _ in PATTERNS]), sparsity=st.floats(0.05, 0.95),
       bands=st.integers(1, 3), units=st.integers(1, 40), width_units=st.integers(1, 16), seed=st.integers(0, 99))
def test_range_masks_add_up_to_the_pattern(pattern_name, sparsity, bands, units, width_units, seed):
    pattern = parse_pattern(pattern_name)
    if pattern_name[0].isdigit():
        sparsity = pattern.sparsity
    rows = bands * (pattern.rows if hasattr(pattern, "rows") else 1)
    k = units * pattern.column_unit
    scores = torch.rand(rows, k, generator=torch.Generator().manual_seed(seed))
    width = width_units * pattern.column_unit
    mask = torch.cat([pattern.mask_columns(scores[:, s:s + width], sparsity, s) for s in range(0, k, width)], 1)
    assert pattern.satisfied_by(mask, sparsity)
    # one range over all columns is the ordinary mask
    assert torch.equal(pattern.mask_columns(scores, sparsity, 0), pattern.mask(scores, sparsity))


# -- SparseGPT's solver ---------------------------------------------------------------------------


@pytest.mark.parametrize("pattern_name, sparsity", PATTERNS)
def test_sparsegpt_obeys_the_pattern_and_beats_wanda_and_magnitude(pattern_name, sparsity):
    weight, x = _correlated_layer()
    pattern = parse_pattern(pattern_name)
    result = sparsegpt_prune(weight, x.T.double() @ x.double(), pattern, sparsity, block=32)
    assert pattern.satisfied_by(result.mask, sparsity)
    assert torch.equal(result.weight != 0, result.mask & (result.weight != 0))
    magnitude = weight * pattern.mask(weight.abs(), sparsity)
    wanda = weight * pattern.mask(weight.abs() * x.norm(dim=0)[None, :], sparsity)
    errors = {name: _output_error(weight, w, x) for name, w in
              (("sparsegpt", result.weight), ("wanda", wanda), ("magnitude", magnitude))}
    assert errors["sparsegpt"] < 0.9 * errors["wanda"] and errors["wanda"] < errors["magnitude"], errors
    # the error it reports is the output error on its calibration inputs
    assert result.relative_error == pytest.approx(errors["sparsegpt"], rel=1e-3)


def test_sparsegpt_is_deterministic_and_handles_dead_inputs():
    weight, x = _correlated_layer(k=64, rows=256)
    x[:, 7] = 0.0  # a feature that never fires: its weights can go, at no cost
    hessian = x.T.double() @ x.double()
    first = sparsegpt_prune(weight, hessian, parse_pattern("unstructured"), 0.5)
    second = sparsegpt_prune(weight, hessian, parse_pattern("unstructured"), 0.5)
    assert torch.equal(first.weight, second.weight)
    assert (first.weight[:, 7] == 0).all()
    assert torch.isfinite(first.weight).all()


def test_sparsegpt_survives_fewer_rows_than_inputs():
    # 32 calibration rows for 128 inputs: H is singular; dampening keeps the factorization alive
    weight, x = _correlated_layer(k=128, rows=32)
    result = sparsegpt_prune(weight, x.T.double() @ x.double(), parse_pattern("unstructured"), 0.5)
    assert torch.isfinite(result.weight).all() and result.relative_error < 0.5


def test_sparsegpt_refuses_a_hessian_of_the_wrong_size():
    with pytest.raises(WeightError, match="does not match a weight with 8 inputs"):
        sparsegpt_prune(torch.ones(4, 8), torch.eye(6), parse_pattern("unstructured"), 0.5)


# -- layer-by-layer calibration ---------------------------------------------------------------------


@pytest.mark.parametrize("budget", [None, 1024])
def test_layerwise_runner_reproduces_the_program_and_bounds_memory(mlp, convnet, budget):
    for model, example, calib in (mlp, convnet):
        program = sparsecc.capture(model, example)
        seen: list[tuple[str, int]] = []
        result = LayerwiseRunner(program, calib, hessian=True, memory_budget=budget).run(
            lambda layer, stats, seen=seen: seen.append((layer.name, stats.rows)))
        assert [name for name, _ in seen] == [layer.name for layer in program.layers()]
        for batch, outputs in zip(calib, result.outputs, strict=True):
            torch.testing.assert_close(outputs[0], program.run(*batch), rtol=0, atol=0)
        if budget is not None:
            assert result.spilled_bytes > 0 and result.peak_bytes <= budget + 64 * 1024
        else:
            assert result.spilled_bytes == 0


def test_layerwise_hook_sees_pruned_inputs(mlp):
    # fc2's statistics must come from fc1's output after fc1 was changed by the hook
    model, example, calib = mlp
    program = sparsecc.capture(model, example).clone()
    norms = {}

    def hook(layer, stats):
        norms[layer.name] = stats.sq_norms.clone()
        if layer.name == "fc1":
            with torch.no_grad():
                program.tensor("fc1.weight").zero_()
                program.tensor("fc1.bias").zero_()

    LayerwiseRunner(program, calib).run(hook)
    assert float(norms["fc2"].abs().max()) == 0.0 and float(norms["fc1"].abs().max()) > 0


# -- the passes ---------------------------------------------------------------------------------


def _deep_mlp():
    torch.manual_seed(0)
    layers = []
    for _ in range(3):
        layers += [torch.nn.Linear(96, 96), torch.nn.GELU()]
    model = torch.nn.Sequential(*layers, torch.nn.Linear(96, 96)).eval()
    mixing = torch.randn(96, 96) / 10 + torch.eye(96)
    scale = torch.rand(96) * 4 + 0.2
    data = [((torch.randn(64, 96) * scale) @ mixing,) for _ in range(10)]
    return model, data[:8], data[8:]


@pytest.mark.parametrize("pattern, sparsity", [("unstructured", 0.6), ("2:4", 0.5), ("block16x1", 0.5)])
def test_sparsegpt_pass_beats_wanda_and_magnitude_end_to_end(x86, pattern, sparsity):
    model, calib, held_out = _deep_mlp()
    program = sparsecc.capture(model, calib[0])
    errors, results = {}, {}
    for method in ("magnitude", "wanda", "sparsegpt"):
        result = _run(program, f"plan-uniform{{sparsity={sparsity},pattern={pattern},min_inputs=16}},prune-{method}",
                      x86, calib)
        pruned = result.program
        assert pruned.verify() == []
        errors[method] = sum(float((pruned.run(*b) - program.run(*b)).norm() / program.run(*b).norm())
                             for b in held_out)
        results[method] = result.results[-1][1]
    assert errors["sparsegpt"] < 0.9 * errors["wanda"] and errors["wanda"] < errors["magnitude"], errors
    counters = results["sparsegpt"].counters
    assert counters["layers_pruned"] == 4 and 0 < counters["mean_relative_output_error"] < 1
    assert counters["calibration_spilled_mb"] == 0


def test_sequential_and_one_shot_calibration_both_prune(x86):
    model, calib, _ = _deep_mlp()
    program = sparsecc.capture(model, calib[0])
    masks = {}
    for sequential in ("true", "false"):
        pruned = _run(program, f"plan-uniform{{sparsity=0.5,min_inputs=16}},prune-wanda{{sequential={sequential}}}",
                      x86, calib).program
        masks[sequential] = [pruned.tensor(f"{i}.weight") != 0 for i in (0, 2, 4, 6)]
    # the first layer sees the same inputs either way; later ones see pruned inputs when sequential
    assert torch.equal(masks["true"][0], masks["false"][0])
    assert any(not torch.equal(a, b) for a, b in zip(masks["true"][1:], masks["false"][1:], strict=True))


def test_pruning_with_a_memory_budget_spills_and_gives_the_same_weights(x86):
    model, calib, _ = _deep_mlp()
    program = sparsecc.capture(model, calib[0])
    weights = {}
    for memory in (0, 0.02):
        result = _run(program, f"plan-uniform{{sparsity=0.5,min_inputs=16}},prune-sparsegpt{{memory_mb={memory}}}",
                      x86, calib)
        weights[memory] = [result.program.tensor(f"{i}.weight").clone() for i in (0, 2, 4, 6)]
        spilled = result.results[-1][1].counters["calibration_spilled_mb"]
        assert (spilled > 0) == (memory > 0)
    for a, b in zip(weights[0], weights[0.02], strict=True):
        assert torch.equal(a, b)


def test_sparsegpt_is_a_compile_method(mlp):
    model, example, calib = mlp
    artifact = sparsecc.compile(model, example, sparsity=0.5, pattern="unstructured", method="sparsegpt",
                                calibration=calib, progress=False)
    assert "prune-sparsegpt" in artifact.pipeline
    x = calib[0][0]
    # the compiled kernels reproduce the SparseGPT-pruned (masked-dense, updated) program
    torch.testing.assert_close(artifact(x), artifact.reference(x), rtol=1e-4, atol=1e-5)
    with torch.no_grad():
        dense = model(x)
    assert float((artifact(x) - dense).norm() / dense.norm()) < 0.5


def test_layerwise_runner_can_stop_after_the_last_hooked_layer(mlp):
    model, example, calib = mlp
    program = sparsecc.capture(model, example)
    fc1 = [layer for layer in program.layers() if layer.name == "fc1"]
    seen: list[str] = []
    full = LayerwiseRunner(program, calib).run(lambda layer, stats: seen.append(layer.name), fc1)
    short = LayerwiseRunner(program, calib).run(lambda layer, stats: seen.append(layer.name), fc1, to_end=False)
    assert seen == ["fc1", "fc1"] and len(full.outputs) == len(calib) and short.outputs == []


# -- DSnoT ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("pattern_name, sparsity", [("unstructured", 0.6), ("2:4", 0.5), ("1:4", 0.75)])
def test_dsnot_shrinks_the_expected_error_and_keeps_the_pattern(pattern_name, sparsity):
    weight, x = _correlated_layer()
    x = x + 1.0  # features with nonzero means, as after an activation
    pattern = parse_pattern(pattern_name)
    norms, means = x.norm(dim=0), x.mean(dim=0)
    mask = pattern.mask(weight.abs() * norms[None, :], sparsity)
    refined, swaps = dsnot_refine(weight, mask, means, norms, pattern)
    assert swaps > 0 and pattern.satisfied_by(refined, sparsity)
    assert torch.equal(refined.sum(1), mask.sum(1))

    def expected_error(keep):
        return ((weight * ~keep) * means[None, :]).sum(1).abs()

    before, after = expected_error(mask), expected_error(refined)
    assert (after <= before + 1e-5).all() and float(after.sum()) < 0.5 * float(before.sum())


def test_dsnot_refuses_block_masks():
    with pytest.raises(ValueError, match="not block16x1"):
        dsnot_refine(torch.ones(16, 8), torch.ones(16, 8, dtype=torch.bool), torch.ones(8), torch.ones(8),
                     parse_pattern("block16x1"))


@pytest.mark.parametrize("method", ["magnitude", "wanda"])
def test_dsnot_refinement_lowers_the_error_of_a_pruned_model(x86, method):
    model, calib, held_out = _deep_mlp()
    program = sparsecc.capture(model, calib[0])
    errors = {}
    for refine in ("", "{refine=dsnot}"):
        plan = "plan-uniform{sparsity=0.6,pattern=unstructured,min_inputs=16}"
        result = _run(program, f"{plan},prune-{method}{refine}", x86, calib)
        assert result.program.verify() == []
        errors[refine] = sum(float((result.program.run(*b) - program.run(*b)).norm() / program.run(*b).norm())
                             for b in held_out)
    assert errors["{refine=dsnot}"] < 0.97 * errors[""], errors
    assert result.results[-1][1].counters["refine_swaps"] > 0


def test_dsnot_leaves_block_masks_with_a_note(x86):
    model, calib, _ = _deep_mlp()
    program = sparsecc.capture(model, calib[0])
    result = _run(program, "plan-uniform{sparsity=0.5,pattern=block16x1,min_inputs=16},prune-wanda{refine=dsnot}",
                  x86, calib)
    res = result.results[-1][1]
    assert res.counters["refine_swaps"] == 0 and result.program.verify() == []
    assert any("DSnoT refines unstructured and N:M masks" in d.message for d in res.diagnostics)


def test_sparsegpt_with_a_given_mask_keeps_it():
    weight, x = _correlated_layer()
    pattern = parse_pattern("unstructured")
    mask = pattern.mask(weight.abs(), 0.5)
    result = sparsegpt_prune(weight, x.T.double() @ x.double(), pattern, 0.5, mask=mask)
    assert torch.equal(result.mask, mask) and torch.equal(result.weight != 0, mask & (result.weight != 0))
    # reconstruction on magnitude's mask beats magnitude's weights on it
    assert result.relative_error < 0.9 * _output_error(weight, weight * mask, x)
