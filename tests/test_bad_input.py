"""Bad input is refused with one line, never silently turned into a wrong model: non-finite or
empty calibration batches, batches that do not fit the exported program, plan files with bad
fields or that do not fit the model, and channels-last weights (which must compile, not crash)."""

from __future__ import annotations

import copy
import json
import pathlib
import tempfile

import pytest
import sparsecc
import torch
from conftest import TinyMLP, seeded
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sparsecc.cli import main as cli_main
from sparsecc.errors import CalibrationError, TargetError
from sparsecc.pass_manager import PassContext, PassManager
from sparsecc.plan import Plan, PlanError
from sparsecc.sparsity import parse_pattern
from sparsecc.targets import get_target


class Flatten(torch.nn.Module):
    """Flattens (batch, 1, 8, 8) images before two linears: a static export bakes the batch into the reshape."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1 = torch.nn.Linear(64, 64)
        self.fc2 = torch.nn.Linear(64, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(torch.relu(self.fc1(x.reshape(x.shape[0], -1))))


class TwoInputs(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = torch.nn.Linear(16, 8)

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return self.fc(x) + self.fc(y)


def _images(*batches: int) -> list[tuple[torch.Tensor]]:
    gen = torch.Generator().manual_seed(3)
    return [(torch.randn(b, 1, 8, 8, generator=gen),) for b in batches]


def _static_flatten() -> tuple[torch.export.ExportedProgram, tuple[torch.Tensor]]:
    example = _images(9)[0]
    return torch.export.export(seeded(Flatten()), example), example


def _compile_refused(model, example, calibration, match: str, **options) -> str:
    with pytest.raises(CalibrationError, match=match) as info:
        sparsecc.compile(model, example, target="x86", calibration=calibration, progress=False, **options)
    assert "\n" not in str(info.value)
    return str(info.value)


# -- 1. non-finite calibration data ------------------------------------------------------------------


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_non_finite_calibration_is_refused_before_pruning(mlp, bad):
    model, example, calib = mlp
    calib = [(t.clone(),) for (t,) in calib]
    calib[3][0][1, 2, 7] = bad
    what = "NaN" if bad != bad else "inf"
    for method in ("wanda", "sparsegpt"):
        _compile_refused(model, example, calib, rf"calibration batch 3, input 0 holds {what} at 1 of 384 values "
                         r"\(first at index \[1, 2, 7\]\); clean or drop that sample", method=method)
    with pytest.raises(CalibrationError, match="calibration batch 3, input 0 holds"):
        sparsecc.search_plan(model, example, target="x86", calibration=calib, latency=0.5, progress=False)


# -- 2. a batch without rows -------------------------------------------------------------------------


def test_calibration_batch_with_zero_rows_is_refused(mlp):
    model, example, calib = mlp
    empty = calib + [(torch.randn(0, 3, 64),)]
    _compile_refused(model, example, empty, r"calibration batch 4, input 0 has shape \(0, 3, 64\): dim 0 is 0.*"
                     "drop the empty batch")


# -- 3. batches that do not fit the exported program --------------------------------------------------


def test_batch_size_baked_into_a_static_export_is_refused():
    exported, example = _static_flatten()
    message = _compile_refused(exported, example, _images(4, 4), r"calibration batch 0, input 0 has shape "
                               r"\(4, 1, 8, 8\) but the program was exported with dim 0 fixed at 9", method="sparsegpt")
    assert "torch.export.Dim" in message and "give batches of shape (9, 1, 8, 8)" in message
    # the rank, dtype and number of inputs are checked too
    _compile_refused(exported, example, [(torch.randn(9, 64),)], r"\(9, 64\) \(2-D\); the program takes 4-D")
    _compile_refused(exported, example, [(torch.randn(9, 1, 8, 8).double(),)], r"is torch.float64; the program "
                     r"takes torch.float32")
    _compile_refused(exported, example, [(example[0], example[0])], "has 2 inputs; the program takes 1")


def test_dynamic_dims_respect_the_export_ranges_and_ties():
    batch = torch.export.Dim("batch", min=2, max=16)
    x = torch.randn(4, 16)
    exported = torch.export.export(seeded(TwoInputs()), (x, x), dynamic_shapes=({0: batch}, {0: batch}))
    _compile_refused(exported, (x, x), [(torch.randn(32, 16), torch.randn(32, 16))],
                     r"dim 0 is 32, outside the range \[2, 16\]")
    _compile_refused(exported, (x, x), [(torch.randn(5, 16), torch.randn(6, 16))],
                     "input 1 dim 0 is 6 but input 0 dim 0 is 5, and the export ties them")


def test_dynamic_batch_export_compiles_with_calibration_batches_of_other_sizes():
    example = _images(9)[0]
    batch = torch.export.Dim("batch")
    exported = torch.export.export(seeded(Flatten()), example, dynamic_shapes=({0: batch},))
    artifact = sparsecc.compile(exported, example, target="x86", method="sparsegpt", sparsity=0.5,
                                pattern="unstructured", calibration=_images(64, 5, 3), progress=False)
    assert artifact.report.compiled_vs_reference["rel"] < 1e-4
    assert {layer.decision for layer in artifact.report.layers} == {"sparse"}
    weight = artifact.pruned.state_dict["fc1.weight"]
    assert float((weight == 0).float().mean()) == pytest.approx(0.5, abs=0.01)


class ConvBatchNorm(torch.nn.Module):
    """A conv whose batch norm capture folds into it, then a linear over the flattened pixels."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = torch.nn.Conv2d(1, 16, 1)
        self.bn = torch.nn.BatchNorm2d(16)
        self.fc = torch.nn.Linear(16 * 8 * 8, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.relu(self.bn(self.conv(x))).reshape(x.shape[0], -1))


def test_folding_batch_norms_keeps_a_dynamic_batch_dynamic():
    """Folding exports the model again: the batch the user exported dynamic stays dynamic, so
    calibration batches of other sizes are still accepted."""
    example = _images(9)[0]
    model = seeded(ConvBatchNorm())
    model.bn.running_var.uniform_(0.5, 2.0)
    exported = torch.export.export(model, example, dynamic_shapes=({0: torch.export.Dim("batch")},))
    program = sparsecc.from_exported(exported, example)
    assert not any(n.target == torch.ops.aten.batch_norm.default for n in program.graph.nodes)
    artifact = sparsecc.compile(program, target="x86", method="sparsegpt", sparsity=0.5, pattern="unstructured",
                                calibration=_images(4, 7), progress=False)
    assert artifact.report.compiled_vs_reference["rel"] < 1e-4


# -- 4. plan files, field by field ------------------------------------------------------------------


def _good_plan() -> dict:
    layers = [("fc1", [64, 64], "unstructured", 0.5), ("fc2", [32, 64], "2:4", 0.5), ("head", [10, 32], None, 0.0)]
    return {"schema_version": 1, "target": "x86", "method": "wanda",
            "layers": [{"name": n, "kind": "linear", "shape": s, "pattern": p, "sparsity": v, "reason": ""}
                       for n, s, p, v in layers]}


def _load(tmp_path: pathlib.Path, data, name: str = "p.json") -> Plan:
    path = tmp_path / name
    path.write_text(json.dumps(data))
    return Plan.load(path)


@pytest.mark.parametrize(("field", "value", "expected"), [
    ("sparsity", 1.0, r"layers\[0\].sparsity is 1.0, must be a number in \[0, 1\)"),
    ("sparsity", True, r"layers\[0\].sparsity is true"),
    ("sparsity", -0.5, r"layers\[0\].sparsity is -0.5"),
    ("sparsity", 1.5, r"layers\[0\].sparsity is 1.5"),
    ("sparsity", None, r"layers\[0\].sparsity is null"),
    ("sparsity", "0.5", r"layers\[0\].sparsity is \"0.5\""),
    ("pattern", "foo", r"layers\[0\].pattern \"foo\" is not a pattern"),
    ("shape", [64, 0], r"layers\[0\].shape is \[64, 0\], must be a list of positive integers"),
    ("name", "fc2", r"layers\[1\].name \"fc2\" repeats layers\[0\]'s"),
    ("kind", 3, r"layers\[0\].kind is 3"),
    ("error", -1, r"layers\[0\].error is -1"),
    ("sparsty", 0.5, r"layers\[0\] has unknown field\(s\) \"sparsty\""),
])
def test_plan_fields_are_validated(tmp_path, field, value, expected):
    data = _good_plan()
    data["layers"][0][field] = value
    with pytest.raises(PlanError, match=rf"^plan file .*p.json has 1 problem: {expected}.*; fix the file") as info:
        _load(tmp_path, data)
    assert "\n" not in str(info.value)


def test_all_plan_problems_are_reported_in_one_line(tmp_path):
    data = _good_plan()
    data["layers"][0]["sparsity"] = 1.0
    data["layers"][1]["pattern"] = "foo"
    data["method"] = "prune-harder"
    with pytest.raises(PlanError) as info:
        _load(tmp_path, data)
    message = str(info.value)
    assert message.startswith(f"plan file {tmp_path / 'p.json'} has 3 problems: ") and "\n" not in message
    assert message.count("; ") == 3  # three problems, then the fix
    assert "layers[0].sparsity is 1.0" in message and "layers[1].pattern \"foo\"" in message
    assert "method is \"prune-harder\", must be one of magnitude, wanda, sparsegpt" in message


def test_unreadable_plan_files_are_one_line_errors(tmp_path):
    cases = {"missing.json": (None, "does not exist"), "binary.json": (b"\x80\x81PK\xff", "is not UTF-8"),
             "broken.json": (b'{"layers": [', "is not valid JSON"), "list.json": (b"[1, 2]", "holds a JSON list"),
             "deep.json": (b"[" * 100_000, "nested too deeply"), "digits.json": (b"1" * 5000, "too many digits")}
    for name, (raw, expected) in cases.items():
        if raw is not None:
            (tmp_path / name).write_bytes(raw)
        with pytest.raises(PlanError, match=expected) as info:
            Plan.load(tmp_path / name)
        assert "\n" not in str(info.value)
    with pytest.raises(PlanError, match="cannot be read|not a regular file"):
        Plan.load(tmp_path)


def test_plan_that_does_not_fit_the_program_is_refused_in_one_line(tmp_path):
    data = _good_plan()
    data["layers"][0]["name"] = "nope"
    data["layers"][1]["shape"] = [32, 32]
    data["layers"][2]["kind"] = "conv2d"
    path = tmp_path / "p.json"
    path.write_text(json.dumps(data))
    program = sparsecc.capture(seeded(TinyMLP()), (torch.randn(2, 3, 64),))
    with pytest.raises(PlanError) as info:
        PassManager(f"plan-file{{path={path}}}").run(program, PassContext(get_target("x86"), progress=False))
    message = str(info.value)
    assert "\n" not in message and "names layers this model does not have: nope" in message
    assert "layer fc2 is [32, 32] in the plan but [32, 64] in this model" in message
    assert "layer head is a conv2d in the plan but a linear in this model" in message
    data = _good_plan()
    path.write_text(json.dumps(data))
    with pytest.raises(TargetError, match="fc1 \\(unstructured\\).*no kernel"):
        PassManager(f"plan-file{{path={path}}}").run(program, PassContext(get_target("cuda-sm80"), progress=False))


_JSON = st.recursive(st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=6),
                     lambda inner: st.lists(inner, max_size=3)
                     | st.dictionaries(st.text(max_size=5), inner, max_size=3), max_leaves=6)


_EDGES = st.sampled_from([1.0, 1, True, False, -0.5, 1.5, float("nan"), float("inf"), "0.5", "foo", "", 0, [], {}])


def _corrupted(draw, valid: dict) -> dict:
    """``valid``, or (three times in four) with a few fields replaced by garbage, dropped, or joined
    by unknown ones."""
    if draw(st.integers(0, 3)) == 0:
        return valid
    keys = sorted(valid)
    for key in draw(st.sets(st.sampled_from(keys), max_size=2)):
        valid[key] = draw(_EDGES | _JSON | st.sampled_from(["4:2", "block0x1", "2:4", "unstructured"]))
    for key in draw(st.sets(st.sampled_from(keys), max_size=1)):
        del valid[key]
    return {**valid, **draw(st.dictionaries(st.text(max_size=4), _JSON, max_size=1))}


@st.composite
def _layer(draw, name: str) -> dict:
    pattern, sparsity = draw(st.sampled_from([(None, 0), ("2:4", 0.5), ("1:4", 0.75), ("unstructured", None),
                                               (" Block4X1", None), ("block2x1", None)]))
    rows = draw(st.integers(1, 4))
    valid = {"name": name, "kind": "linear", "shape": [rows, draw(st.integers(1, 8))], "pattern": pattern,
             "sparsity": sparsity if sparsity is not None else draw(st.floats(0, 1, exclude_max=True)),
             "reason": draw(st.text(max_size=4)),
             "row_sparsity": draw(st.lists(st.floats(0, 0.9), min_size=rows, max_size=rows))
             if pattern == "unstructured" and draw(st.booleans()) else None,
             "predicted_s": draw(st.none() | st.floats(0, 1)), "error": draw(st.none() | st.floats(0, 1))}
    return _corrupted(draw, valid)


@st.composite
def _plan_json(draw):
    count = draw(st.integers(0, 3))
    valid = {"schema_version": 1, "target": "x86", "method": draw(st.sampled_from(["wanda", "channels-l2"])),
             "layers": [draw(_layer(f"layer{i}")) for i in range(count)],
             "search": draw(st.none() | st.dictionaries(st.text(max_size=3), _JSON, max_size=2))}
    return draw(st.just(_corrupted(draw, valid)) | _JSON)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=_plan_json(), binary=st.none() | st.binary(max_size=12))
def test_fuzzed_plan_files_load_validly_or_raise_one_line_plan_errors(data, binary):
    with tempfile.TemporaryDirectory() as folder:
        path = pathlib.Path(folder) / "plan.json"
        path.write_bytes(binary if binary is not None else json.dumps(data).encode())
        try:
            plan = Plan.load(path)
        except PlanError as exc:
            assert "\n" not in str(exc) and str(exc).strip()
            return
    for lp in plan.layers.values():
        assert type(lp.sparsity) is float and 0.0 <= lp.sparsity < 1.0
        assert lp.pattern is None or parse_pattern(lp.pattern).name == lp.pattern
        assert lp.shape and all(type(d) is int and d > 0 for d in lp.shape)


# -- 5. channels-last weights -------------------------------------------------------------------------


class ConvNet(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1 = torch.nn.Conv2d(8, 32, 3, padding=1)
        self.conv2 = torch.nn.Conv2d(32, 32, 3, padding=1, bias=False)
        self.bn = torch.nn.BatchNorm2d(32)
        self.fc = torch.nn.Linear(32 * 4 * 4, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.bn(self.conv2(torch.relu(self.conv1(x)))))
        return self.fc(h.flatten(1))


def test_channels_last_conv_weights_compile_and_match_the_masked_dense_program():
    model = seeded(ConvNet()).to(memory_format=torch.channels_last)
    example = (torch.randn(2, 8, 4, 4),)
    exported = torch.export.export(model, example)
    assert not exported.state_dict["conv2.weight"].is_contiguous()  # the case under test
    artifact = sparsecc.compile(exported, example, target="x86", convs="all", pattern="unstructured", sparsity=0.5,
                                method="magnitude", calibration=[example], progress=False)
    assert {layer.name for layer in artifact.report.layers if layer.decision == "sparse"} == {"conv1", "conv2", "fc"}
    # the zeros are counted on the pruned weights (a channels-last weight flattens to a copy)
    counters = next(p["counters"] for p in artifact.report.passes if p["name"].startswith("prune"))
    assert abs(counters["weights_zeroed"] / counters["weights_in_pruned_layers"] - 0.5) < 0.01
    x = torch.randn(2, 8, 4, 4)
    got, want = artifact(x), artifact.reference(x)
    assert float((got - want).norm() / want.norm()) < 1e-4


# -- the command line: exit status 2 and one stderr line -----------------------------------------------


@pytest.fixture(scope="module")
def saved_models(tmp_path_factory) -> pathlib.Path:
    folder = tmp_path_factory.mktemp("bad-input")
    exported, _ = _static_flatten()
    torch.export.save(exported, folder / "static.pt2")
    torch.save(_images(9, 9), folder / "good.pt")
    return folder


def _cli_refuses(capsys, folder: pathlib.Path, *options: str, match: str) -> None:
    argv = ["compile", str(folder / "static.pt2"), "--target", "x86", *options, "-o", str(folder / "out"), "-q"]
    assert cli_main(argv) == 2
    captured = capsys.readouterr()
    lines = captured.err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("sparsecc: error: "), captured.err
    assert match in lines[0] and "Traceback" not in captured.err + captured.out


def test_cli_refuses_bad_calibration_files(saved_models, capsys):
    nan = _images(9, 9)
    nan[1][0][0, 0, 3, 3] = float("nan")
    torch.save(nan, saved_models / "nan.pt")
    _cli_refuses(capsys, saved_models, "--calib", str(saved_models / "nan.pt"),
                 match="calibration batch 1, input 0 holds NaN at 1 of 576 values")
    torch.save([(torch.randn(0, 1, 8, 8),)], saved_models / "empty.pt")
    _cli_refuses(capsys, saved_models, "--calib", str(saved_models / "empty.pt"),
                 match="the batch holds no samples; drop the empty batch")
    torch.save(_images(64), saved_models / "batch64.pt")
    _cli_refuses(capsys, saved_models, "--method", "sparsegpt", "--calib", str(saved_models / "batch64.pt"),
                 match="give batches of shape (9, 1, 8, 8)")


def test_cli_refuses_bad_plan_files(saved_models, capsys):
    plan = {"schema_version": 1, "target": "x86", "method": "wanda", "layers": [
        {"name": "fc1", "kind": "linear", "shape": [64, 64], "pattern": "unstructured", "sparsity": 1.0},
        {"name": "fc2", "kind": "linear", "shape": [10, 64], "pattern": None, "sparsity": 0.0}]}
    cases = {"full": (plan, "layers[0].sparsity is 1.0"),
             "bool": (copy.deepcopy(plan), "layers[0].sparsity is true"),
             "list": ([plan], "holds a JSON list"),
             "unknown": (copy.deepcopy(plan), "does not have: fc3")}
    cases["bool"][0]["layers"][0]["sparsity"] = True
    cases["unknown"][0]["layers"][0].update(name="fc3", sparsity=0.5)
    for name, (data, match) in cases.items():
        path = saved_models / f"{name}.json"
        path.write_text(json.dumps(data))
        _cli_refuses(capsys, saved_models, "--plan", str(path), "--calib", str(saved_models / "good.pt"), match=match)
    (saved_models / "binary.json").write_bytes(b"\x89PNG\r\n\x1a\n\x00")
    _cli_refuses(capsys, saved_models, "--plan", str(saved_models / "binary.json"), "--calib",
                 str(saved_models / "good.pt"), match="is not UTF-8 text")
