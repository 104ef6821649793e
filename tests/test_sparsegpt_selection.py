"""SparseGPT's unstructured mask selection: ``block`` (the paper's, one threshold over all rows of
each range of columns) against ``row`` (every row keeps the same count in every range)."""

from __future__ import annotations

import hashlib

import numpy as np
import pytest
import sparsecc
import torch
from sparsecc.errors import WeightError
from sparsecc.pass_manager import PassContext, PassManager
from sparsecc.passes.sparsegpt import sparsegpt_prune
from sparsecc.sparsity import _keep_between, pack_csr, parse_pattern, plan_violation

UNSTRUCTURED = parse_pattern("unstructured")


def _layer(n: int = 48, k: int = 320, rows: int = 600, seed: int = 0):
    """A weight whose rows differ in scale (so some outputs matter more) and correlated, unequally
    loud inputs; returns the weight and ``X^T X``."""
    gen = torch.Generator().manual_seed(seed)
    weight = torch.randn(n, k, generator=gen) * (torch.rand(n, 1, generator=gen) * 3 + 0.1)
    mixing = torch.randn(k, k, generator=gen) / k**0.5 + torch.eye(k)
    x = (torch.randn(rows, k, generator=gen) * (torch.rand(k, generator=gen) * 3 + 0.1)) @ mixing
    return weight, x.T.double() @ x.double()


@pytest.mark.parametrize("sparsity", [0.5, 0.7, 0.33])
def test_block_selection_keeps_each_ranges_share_with_rows_free(sparsity):
    weight, hessian = _layer()
    n, k = weight.shape
    mask = sparsegpt_prune(weight, hessian, UNSTRUCTURED, sparsity, block=128, selection="block").mask
    for start in range(0, k, 128):  # the last range is 64 columns wide
        end = min(start + 128, k)
        assert int(mask[:, start:end].sum()) == _keep_between(n * start, n * end, sparsity)
    assert int(mask.sum()) == n * k - round(n * k * sparsity)
    assert len(set(mask.sum(1).tolist())) > 1  # rows keep different counts


@pytest.mark.parametrize("sparsity", [0.5, 0.7])
def test_block_selection_reconstructs_better_than_row_selection(sparsity):
    weight, hessian = _layer()
    errors = {}
    for selection in ("block", "row"):
        result = sparsegpt_prune(weight, hessian, UNSTRUCTURED, sparsity, selection=selection)
        delta = result.weight.double() - weight.double()
        errors[selection] = float(((delta @ hessian) * delta).sum())  # tr(dW H dW^T)
    assert errors["block"] < 0.8 * errors["row"], errors


# sha256 of the keep-mask's bytes that the code before the selection option gave for _layer()
ROW_MASKS_BEFORE = {0.5: "91e18fb5cbaf575c", 0.7: "52720c017e9669c8"}


@pytest.mark.parametrize("sparsity", [0.5, 0.7])
def test_row_selection_is_unchanged(sparsity):
    weight, hessian = _layer()
    mask = sparsegpt_prune(weight, hessian, UNSTRUCTURED, sparsity, selection="row").mask
    assert hashlib.sha256(mask.numpy().tobytes()).hexdigest()[:16] == ROW_MASKS_BEFORE[sparsity]
    assert len(set(mask.sum(1).tolist())) == 1  # the same count in every row


def test_block_selection_passes_verification_and_packs_to_csr():
    weight, hessian = _layer()
    result = sparsegpt_prune(weight, hessian, UNSTRUCTURED, 0.7, selection="block")
    nonzero = result.weight != 0
    assert len(set(nonzero.sum(1).tolist())) > 1  # rows differ ...
    assert UNSTRUCTURED.satisfied_by(result.mask, 0.7)  # ... and that is allowed
    assert plan_violation(UNSTRUCTURED, nonzero, 0.7) is None
    assert plan_violation(UNSTRUCTURED, torch.ones_like(nonzero), 0.7) is not None
    packed = pack_csr(result.weight.numpy())
    assert np.array_equal(packed.to_dense(), result.weight.numpy())
    assert len(set(np.diff(packed.indptr).tolist())) > 1


def test_per_row_sparsities_still_bind_every_row():
    rows = torch.tensor([0.25, 0.75])
    mask = torch.tensor([[True] * 2 + [False] * 6, [True] * 4 + [False] * 4])  # 6 kept of 8 allowed
    assert plan_violation(UNSTRUCTURED, mask, rows) is not None


def test_selection_leaves_structured_patterns_alone():
    weight, hessian = _layer(k=256)
    for name, sparsity in (("2:4", 0.5), ("block4x4", 0.5)):
        pattern = parse_pattern(name)
        block = sparsegpt_prune(weight, hessian, pattern, sparsity, selection="block")
        row = sparsegpt_prune(weight, hessian, pattern, sparsity, selection="row")
        assert torch.equal(block.mask, row.mask) and pattern.satisfied_by(block.mask, sparsity)


def test_unknown_selection_is_refused():
    weight, hessian = _layer(n=4, k=16)
    with pytest.raises(WeightError, match="selection"):
        sparsegpt_prune(weight, hessian, UNSTRUCTURED, 0.5, selection="column")


def test_pass_option_prunes_verifies_and_packs(x86):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(96, 96), torch.nn.GELU(), torch.nn.Linear(96, 96)).eval()
    calib = [(torch.randn(64, 96) * (torch.rand(96) * 4 + 0.2),) for _ in range(4)]
    program = sparsecc.capture(model, calib[0])
    counts = {}
    for selection in ("block", "row"):
        pipeline = (f"plan-uniform{{sparsity=0.7,pattern=unstructured,min_inputs=16}},"
                    f"prune-sparsegpt{{selection={selection}}},pack")
        result = PassManager(pipeline).run(program, PassContext(x86, calibration=calib, progress=False))
        pruned, packed = result.results[1][1].program, result.program
        assert pruned.verify() == [] and packed.verify() == []
        assert result.results[-1][1].counters["layers_packed"] == 2
        counts[selection] = {int(c) for c in (pruned.tensor("0.weight") != 0).sum(1)}
        assert torch.allclose(packed.run(*calib[0]), pruned.run(*calib[0]), atol=1e-4)
    assert len(counts["block"]) > 1 and len(counts["row"]) == 1
