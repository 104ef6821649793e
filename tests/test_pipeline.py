"""Pass registry, pipeline strings and instruments."""

from __future__ import annotations

import pytest
from sparsecc.errors import PipelineError, VerificationError
from sparsecc.pass_manager import (
    NumericsInstrument,
    Pass,
    PassContext,
    PassManager,
    PassResult,
    SnapshotInstrument,
    TimingInstrument,
    all_passes,
    format_pipeline,
    parse_pipeline,
)

EXPECTED_PASSES = {"calibrate", "plan-uniform", "allocate", "prune-magnitude", "prune-wanda", "prune-sparsegpt", "pack",
                   "lower", "build"}


def test_registry_lists_every_pass_with_a_summary():
    passes = {cls.name: cls for cls in all_passes()}
    assert EXPECTED_PASSES <= set(passes)
    assert all(cls.summary for cls in passes.values())


def test_pipeline_round_trip_with_typed_options():
    passes = parse_pipeline("calibrate{batches=8,hessian=true}, plan-uniform{sparsity=0.7,pattern=2:4}, pack")
    assert [p.name for p in passes] == ["calibrate", "plan-uniform", "pack"]
    assert passes[0].batches == 8 and passes[0].hessian is True
    assert passes[1].sparsity == 0.7 and passes[1].pattern == "2:4"
    text = format_pipeline(passes)
    assert text == "calibrate{batches=8,hessian=true},plan-uniform{sparsity=0.7,pattern=2:4},pack"
    assert format_pipeline(parse_pipeline(text)) == text


@pytest.mark.parametrize("text, message", [
    ("calibrate,no-such-pass", "unknown pass 'no-such-pass'"),
    ("calibrate{bogus=1}", "has no option 'bogus'"),
    ("calibrate{batches=many}", "not a valid int"),
    ("calibrate{batches=1", "unbalanced"),
    ("calibrate{batches}", "key=value"),
])
def test_bad_pipelines_are_explained(text, message):
    with pytest.raises(PipelineError, match=message):
        parse_pipeline(text)


class _Breaks(Pass):
    name = "test-breaks-results"
    summary = "claims to keep results but changes them"
    numerics = "exact"

    def run(self, program, ctx):
        import torch

        new = program.clone()
        with torch.no_grad():
            next(iter(new.state.values())).add_(1.0)
        new.invalidate()
        return PassResult(new, changed=True)


def test_numerics_instrument_catches_a_pass_that_changes_results(mlp, x86):
    import sparsecc

    model, example, _ = mlp
    program = sparsecc.capture(model, example)
    manager = PassManager([_Breaks()], [NumericsInstrument()])
    with pytest.raises(VerificationError, match="must not change results"):
        manager.run(program, PassContext(x86, progress=False))


def test_instruments_time_and_snapshot_every_pass(mlp, x86, tmp_path):
    import sparsecc

    model, example, calib = mlp
    timing, snaps = TimingInstrument(), SnapshotInstrument(tmp_path)
    manager = PassManager("calibrate,plan-uniform{sparsity=0.5,pattern=unstructured},prune-magnitude,pack",
                          [timing, snaps])
    manager.run(sparsecc.capture(model, example), PassContext(x86, calibration=calib, progress=False))
    assert [name for name, _ in timing.times] == ["calibrate", "plan-uniform", "prune-magnitude", "pack"]
    assert all(seconds >= 0 for _, seconds in timing.times)
    dumps = sorted(p.name for p in tmp_path.iterdir())
    assert dumps[:2] == ["01-after-calibrate.txt", "01-before-calibrate.txt"]
    assert "04-after-pack.txt" in dumps
    assert "sparsecc.sparse_linear_csr" in (tmp_path / "04-after-pack.txt").read_text()
