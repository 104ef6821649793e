"""recover: PERP retraining and Sparse Model Soups keep every mask bit for bit, reduce the
held-out error of a pruned model, compile, and refuse options that cannot work in one line."""

from __future__ import annotations

import warnings

import pytest
import sparsecc
import torch
from sparsecc.cli import main as cli_main
from sparsecc.pass_manager import PassContext, PassManager
from sparsecc.passes.recover import RecoveryError, average_tensors
from sparsecc.targets import get_target


@pytest.fixture(scope="module")
def pruned_setup():
    from conftest import TinyMLP, seeded

    model = seeded(TinyMLP())
    gen = torch.Generator().manual_seed(1)
    example = (torch.randn(2, 3, 64, generator=gen),)
    calib = [(torch.randn(2, 3, 64, generator=gen),) for _ in range(12)]
    return sparsecc.capture(model, example), calib


def _run(program, calib, recover: str):
    pipeline = f"plan-uniform{{sparsity=0.7,pattern=unstructured}},prune-magnitude,{recover}"
    result = PassManager(pipeline).run(program, PassContext(get_target("x86"), calibration=calib, progress=False))
    pruned, recovered = result.results[-2][1].program, result.results[-1][1]
    return pruned, recovered


def _masks(program):
    return {layer.weight: program.tensor(layer.weight) != 0 for layer in program.layers()}


@pytest.mark.parametrize("recover", ["recover{steps=60}", "recover{params=full,steps=60}",
                                     "recover{params=biases,steps=60}", "recover{steps=20,soup=3}",
                                     "recover{steps=20,soup=2,soup_mode=uniform}"])
def test_masks_are_kept_bit_for_bit_and_the_held_out_error_drops(pruned_setup, recover):
    program, calib = pruned_setup
    pruned, result = _run(program, calib, recover)
    before, after = _masks(pruned), _masks(result.program)
    assert before.keys() == after.keys()
    for fqn in before:
        assert torch.equal(before[fqn], after[fqn]), fqn
    counters = result.counters
    assert counters["heldout_after"] < counters["heldout_before"]
    assert result.program.stage == "recovered"


def test_perp_measurably_reduces_the_held_out_error(pruned_setup):
    program, calib = pruned_setup
    _, result = _run(program, calib, "recover{steps=150}")
    assert result.counters["heldout_after"] < 0.85 * result.counters["heldout_before"]
    # what trained: 1-D parameters and rank-16 adapters of the two pruned layers, a share of the model
    assert 0 < result.counters["trained_share"] < 1


def test_a_soup_of_identical_ingredients_is_the_ingredient():
    gen = torch.Generator().manual_seed(0)
    ingredient = {"w": torch.randn(5, 7, generator=gen) * (torch.rand(5, 7, generator=gen) > 0.5), "b": torch.randn(5)}
    soup = average_tensors([ingredient, ingredient, ingredient])
    assert all(torch.equal(soup[k], ingredient[k]) for k in ingredient)


def test_recovered_model_compiles_and_matches_its_masked_dense_program(pruned_setup):
    from conftest import TinyMLP, seeded

    _, calib = pruned_setup
    model = seeded(TinyMLP())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        artifact = sparsecc.compile(model, calib[0], target="x86", sparsity=0.7, pattern="unstructured",
                                    method="magnitude", calibration=calib, recover="perp", recover_steps=30,
                                    progress=False)
    assert ",recover{steps=30},pack," in artifact.pipeline
    x = torch.randn(2, 3, 64)
    assert float((artifact(x) - artifact.reference(x)).norm() / artifact.reference(x).norm()) < 1e-4
    recovery = artifact.report.recovery
    assert recovery["heldout_after"] <= recovery["heldout_before"]
    assert "recovery: held-out" in artifact.report.summary()
    from sparsecc.report_html import render_html

    assert 'id="recovery-table"' in render_html(artifact)


def test_recover_needs_the_dense_teacher(pruned_setup):
    program, calib = pruned_setup
    pruned, _ = _run(program, calib, "recover{steps=1}")
    with pytest.raises(RecoveryError, match="dense program as its teacher"):
        PassManager("recover").run(pruned, PassContext(get_target("x86"), calibration=calib, progress=False))


@pytest.mark.parametrize("recover, message", [
    ("recover{steps=-1}", "steps=-1"),
    ("recover{rank=65}", "rank=65 is larger than layer"),
    ("recover{heldout=1.5}", "heldout=1.5"),
    ("recover{measure=hinge,lr=0}", "measure='hinge'.*lr=0"),
])
def test_bad_options_are_one_line_errors(pruned_setup, recover, message):
    program, calib = pruned_setup
    with pytest.raises(RecoveryError, match=message) as info:
        _run(program, calib, recover)
    assert "\n" not in str(info.value)


def test_no_held_out_data_left_is_refused(pruned_setup):
    program, calib = pruned_setup
    with pytest.raises(RecoveryError, match="leave none for training"):
        _run(program, calib[:1], "recover")


def test_cli_recover_options(tmp_path, capsys, pruned_setup):
    program, calib = pruned_setup
    torch.export.save(program.exported, tmp_path / "m.pt2")
    torch.save(calib, tmp_path / "calib.pt")
    code = cli_main(["compile", str(tmp_path / "m.pt2"), "--soup", "2", "-o", str(tmp_path / "o"), "-q"])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and "add recover='perp'" in err
    code = cli_main(["compile", str(tmp_path / "m.pt2"), "--calib", str(tmp_path / "calib.pt"), "--recover", "perp",
                     "--recover-steps", "10", "--sparsity", "0.5", "-o", str(tmp_path / "o"), "-q"])
    assert code == 0
    assert "recover" in capsys.readouterr().out
