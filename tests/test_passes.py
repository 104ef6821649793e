"""Each pass on small models: golden before/after text, honest results, and numerics tiers
(exact for passes that must not change results, a budget for pruning)."""

from __future__ import annotations

import pytest
import sparsecc
import torch
from sparsecc.errors import CalibrationError, TargetError, WeightError
from sparsecc.inspect import diff_text, format_program
from sparsecc.pass_manager import PassContext, PassManager
from sparsecc.passes.calibrate import ANALYSIS_KEY
from sparsecc.sparsity import PatternError


def _run(program, pipeline, target, calib=None):
    return PassManager(pipeline).run(program, PassContext(target, calibration=calib, progress=False))


def _max_rel(a, b):
    return float((a - b).norm() / b.norm())


def test_capture_prints_stable_text(mlp, golden):
    model, example, _ = mlp
    text = format_program(sparsecc.capture(model, example))
    golden("mlp_captured.txt", text)
    assert text == format_program(sparsecc.capture(model, example))


def test_calibrate_records_norms_and_changes_nothing(mlp, x86):
    model, example, calib = mlp
    program = sparsecc.capture(model, example)
    ctx = PassContext(x86, calibration=calib, progress=False)
    result = PassManager("calibrate{hessian=true}").run(program, ctx)
    _, res = result.results[0]
    assert res.changed is False
    assert res.counters == {"batches": 4, "layers": 3, "rows": 3 * 4 * 6}
    stats = ctx.analyses[ANALYSIS_KEY].layers
    x = torch.cat([b[0].reshape(-1, 64) for b in calib]).double()
    torch.testing.assert_close(stats["fc1"].sq_norms, (x * x).sum(0))
    torch.testing.assert_close(stats["fc1"].hessian, x.T @ x)
    assert format_program(result.program) == format_program(program)


def test_calibration_inputs_of_the_wrong_shape_are_refused(mlp, x86):
    model, example, _ = mlp
    program = sparsecc.capture(model, example)
    with pytest.raises(CalibrationError, match=r"captured with \(2, 3, 64\)"):
        _run(program, "calibrate", x86, [(torch.randn(2, 3, 63),)])
    with pytest.raises(CalibrationError, match="has 2 inputs"):
        _run(program, "calibrate", x86, [(torch.randn(2, 3, 64), torch.randn(1))])


def test_plan_keeps_untileable_layers_dense_with_a_reason(mlp, x86):
    model, example, _ = mlp
    result = _run(sparsecc.capture(model, example), "plan-uniform{sparsity=0.5,pattern=block16x1}", x86)
    plan = result.program.plan
    assert [lp.name for lp in plan.sparse_layers()] == ["fc1", "fc2"]
    (head,) = plan.dense_layers()
    assert head.name == "head" and "16x1 blocks" in head.reason
    assert any(d.layer == "head" for d in result.diagnostics)


def test_plan_keeps_kxk_convs_dense_unless_asked_and_2_4_needs_k_multiple_of_4(convnet, x86):
    model, example, _ = convnet
    program = sparsecc.capture(model, example)
    plan = _run(program, "plan-uniform{sparsity=0.5,pattern=2:4}", x86).program.plan
    reason = plan.layers["conv"].reason
    assert "3x3 convolution: kept dense" in reason and "about 9 times" in reason and "convs=all" in reason
    assert plan.layers["pointwise"].pattern == "2:4" and plan.layers["fc"].pattern == "2:4"
    # convs=all: the 3x3 convolution's K is its window, 3 channels x 9 taps, not a multiple of 4 ...
    plan = _run(program, "plan-uniform{sparsity=0.5,pattern=2:4,convs=all}", x86).program.plan
    assert "K=27 is not a multiple of 4" in plan.layers["conv"].reason
    # ... but unstructured takes it, once its window holds enough inputs
    plan = _run(program, "plan-uniform{sparsity=0.5,pattern=unstructured,min_inputs=16,convs=all}",
                x86).program.plan
    assert plan.layers["conv"].pattern == "unstructured"
    with pytest.raises(ValueError, match="convs='some'"):
        _run(program, "plan-uniform{sparsity=0.5,convs=some}", x86)


def test_plan_refuses_impossible_requests(mlp, x86):
    model, example, _ = mlp
    program = sparsecc.capture(model, example)
    with pytest.raises(PatternError, match="fixes sparsity at 0.500"):
        _run(program, "plan-uniform{sparsity=0.7,pattern=2:4}", x86)
    with pytest.raises(TargetError, match="no kernel for pattern 'block3x3'"):
        _run(program, "plan-uniform{sparsity=0.5,pattern=block3x3}", x86)


@pytest.mark.parametrize("method", ["magnitude", "wanda"])
@pytest.mark.parametrize("pattern, sparsity", [("unstructured", 0.7), ("block16x1", 0.5), ("2:4", 0.5)])
def test_prune_then_pack_golden_and_numerics(mlp, x86, golden, method, pattern, sparsity):
    model, example, calib = mlp
    program = sparsecc.capture(model, example)
    result = _run(program, f"calibrate,plan-uniform{{sparsity={sparsity},pattern={pattern}}},prune-{method},pack",
                  x86, calib)
    stages = {res.program.stage: res.program for _, res in result.results}
    pruned, packed = stages["pruned"], stages["packed"]
    # Pruning: weights obey the plan and the input program is untouched.
    for lp in pruned.plan.sparse_layers():
        w = pruned.tensor(f"{lp.name}.weight")
        assert sparsecc.sparsity.parse_pattern(pattern).satisfied_by(w != 0, sparsity) or \
            int((w != 0).sum()) <= w.numel() - round(w.numel() * sparsity)
    assert int((program.tensor("fc1.weight") == 0).sum()) == 0
    # Packing is exact against the masked-dense program.
    y_pruned, y_packed = pruned.run(*example), packed.run(*example)
    assert _max_rel(y_packed, y_pruned) < 1e-6
    # Pruning stays within a budget of dense on this tiny random model.
    assert _max_rel(y_pruned, program.run(*example)) < 1.0
    _, pack_result = result.results[-1]
    assert pack_result.changed and pack_result.counters["layers_packed"] == len(pruned.plan.sparse_layers())
    key = pattern.replace(":", "_")
    golden(f"mlp_{method}_{key}_pack.diff", diff_text(format_program(pruned), format_program(packed)))


def test_pack_rewrites_pointwise_conv_and_keeps_3x3_dense(convnet, x86, golden):
    model, example, calib = convnet
    result = _run(sparsecc.capture(model, example),
                  "calibrate,plan-uniform{sparsity=0.5,pattern=unstructured},prune-wanda,pack", x86, calib)
    packed = result.program
    text = format_program(packed)
    golden("convnet_wanda_unstructured_packed.txt", text)
    assert "aten.conv2d" in text and text.count("sparsecc.sparse_linear_csr") == 2
    stages = {res.program.stage: res.program for _, res in result.results}
    assert _max_rel(packed.run(*example), stages["pruned"].run(*example)) < 1e-6
    assert packed.verify() == []


def test_wanda_beats_magnitude_on_layer_output_error(x86):
    # Inputs with a few loud features: Wanda keeps the weights those features multiply.
    torch.manual_seed(0)
    layer = torch.nn.Linear(64, 64).eval()
    scale = torch.ones(64)
    scale[:6] = 20.0
    calib = [(torch.randn(16, 64) * scale,) for _ in range(4)]
    program = sparsecc.capture(layer, calib[0])
    errors = {}
    for method in ("magnitude", "wanda"):
        pruned = _run(program, f"calibrate,plan-uniform{{sparsity=0.7,pattern=unstructured}},prune-{method}",
                      x86, calib).program
        errors[method] = sum(_max_rel(pruned.run(*b), program.run(*b)) for b in calib)
    assert errors["wanda"] < 0.8 * errors["magnitude"]


def test_nan_weights_are_refused_naming_the_layer(mlp, x86):
    model, example, calib = mlp
    with torch.no_grad():
        model.fc2.weight[3, 4] = float("nan")
    program = sparsecc.capture(model, example)
    with pytest.raises(WeightError, match=r"layer fc2: .*1 NaN/inf"):
        _run(program, "calibrate,plan-uniform{sparsity=0.5,pattern=unstructured},prune-wanda", x86, calib)


def test_unexportable_model_gets_a_short_clear_error():
    class DataDependent(torch.nn.Module):
        def forward(self, x):
            if x.sum() > 0:  # data-dependent control flow cannot be exported
                return x * 2
            return x

    with pytest.raises(sparsecc.errors.CaptureError) as info:
        sparsecc.capture(DataDependent(), (torch.randn(3),))
    message = str(info.value)
    assert "DataDependent" in message and "fix:" in message
    assert len(message.splitlines()) < 15


def test_verifier_rejects_broken_programs_with_a_message(mlp, x86):
    model, example, calib = mlp
    result = _run(sparsecc.capture(model, example),
                  "calibrate,plan-uniform{sparsity=0.5,pattern=2:4},prune-wanda", x86, calib)
    pruned = result.program
    assert pruned.verify() == []
    with torch.no_grad():
        pruned.tensor("fc1.weight").fill_(1.0)  # every weight non-zero again: breaks 2:4
    problems = pruned.verify()
    assert len(problems) == 1 and problems[0].startswith("layer fc1: weight has 4096 non-zeros that do not fit 2:4")


def test_verify_instrument_stops_a_pipeline_at_the_breaking_pass(mlp, x86):
    from sparsecc.errors import VerificationError
    from sparsecc.pass_manager import Pass, PassResult, VerifyInstrument

    class Densify(Pass):
        name = "test-densify"
        summary = "undoes pruning behind the plan's back"

        def run(self, program, ctx):
            new = program.clone()
            with torch.no_grad():
                new.tensor("fc2.weight").add_(1.0)
            return PassResult(new, changed=True)

    model, example, calib = mlp
    program = _run(sparsecc.capture(model, example),
                   "calibrate,plan-uniform{sparsity=0.5,pattern=unstructured},prune-wanda", x86, calib).program
    manager = PassManager([Densify()], [VerifyInstrument()])
    with pytest.raises(VerificationError, match="pass 'test-densify' left a broken program:\n  layer fc2"):
        manager.run(program, PassContext(x86, progress=False))


def test_2_4_on_k_not_a_multiple_of_4_keeps_that_layer_dense(x86):
    model = torch.nn.Sequential(torch.nn.Linear(66, 64), torch.nn.ReLU(), torch.nn.Linear(64, 64)).eval()
    x = torch.randn(3, 66)
    result = _run(sparsecc.capture(model, (x,)), "calibrate,plan-uniform{sparsity=0.5,pattern=2:4},prune-wanda,pack",
                  x86, [(x,)])
    plan = result.program.plan
    assert plan.layers["0"].pattern is None and "K=66 is not a multiple of 4" in plan.layers["0"].reason
    assert plan.layers["2"].pattern == "2:4"
    assert any(d.layer == "0" and "multiple of 4" in d.message for d in result.diagnostics)
    text = format_program(result.program)
    assert "aten.linear" in text and "sparsecc.sparse_linear_nm" in text


def test_plan_keeps_a_vocabulary_head_dense_with_a_reason(x86):
    class TinyLM(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.embed = torch.nn.Embedding(512, 64)
            self.mix = torch.nn.Linear(64, 64)
            self.lm_head = torch.nn.Linear(64, 512, bias=False)

        def forward(self, ids):
            return self.lm_head(torch.relu(self.mix(self.embed(ids)))).reshape(-1, 512)

    program = sparsecc.capture(TinyLM().eval(), (torch.randint(0, 512, (1, 8)),))
    plan = _run(program, "plan-uniform{sparsity=0.5}", x86).program.plan
    assert [lp.name for lp in plan.sparse_layers()] == ["mix"]
    (head,) = plan.dense_layers()
    assert head.name == "lm_head" and "vocabulary projection" in head.reason
