"""The search pass and plans: budgets respected, no sparse kernel predicted slower than dense,
plans that round-trip through JSON and compile, clear refusals of plans that do not fit, and
different plans for different targets."""

from __future__ import annotations

import json

import pytest
import sparsecc
import torch
from sparsecc.cli import main as cli_main
from sparsecc.errors import SparseccError, TargetError
from sparsecc.plan import Plan, PlanError
from sparsecc.search import SearchError
from sparsecc.sparsity import parse_pattern


class Mlp(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.up = torch.nn.Linear(256, 512)
        self.mid = torch.nn.Linear(512, 512)
        self.down = torch.nn.Linear(512, 256)
        self.head = torch.nn.Linear(256, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.relu(self.down(torch.relu(self.mid(torch.relu(self.up(x)))))))


@pytest.fixture(scope="module")
def problem():
    torch.manual_seed(0)
    model = Mlp().eval()
    gen = torch.Generator().manual_seed(1)
    batches = [(torch.randn(32, 256, generator=gen),) for _ in range(3)]
    return model, batches


def search(problem, **budget) -> Plan:
    model, batches = problem
    return sparsecc.search_plan(model, batches[0], target="x86", calibration=batches, progress=False, **budget)


def searched(plan: Plan):
    return [lp for lp in plan.layers.values() if lp.dense_s is not None]


def test_latency_budget_holds_and_no_sparse_kernel_is_predicted_slower(problem) -> None:
    plan = search(problem, latency=0.6)
    layers = searched(plan)
    assert sum(lp.predicted_s for lp in layers) <= 0.6 * sum(lp.dense_s for lp in layers) * (1 + 1e-9)
    assert plan.search["predicted_speedup"] >= 1 / 0.6 - 1e-9
    assert any(lp.is_sparse for lp in layers)
    # min_gain=1.1 by default: every sparse kernel predicted at least 1.1x faster than dense
    assert all(lp.predicted_s * 1.1 <= lp.dense_s * (1 + 1e-9) for lp in layers if lp.is_sparse)
    # a tighter budget costs at least as much error on the same candidates
    tighter = search(problem, latency=0.4)
    assert tighter.search["proxy_error"] >= plan.search["proxy_error"] - 1e-12


def test_sparsity_budget_removes_at_least_that_share(problem) -> None:
    plan = search(problem, sparsity=0.7)
    layers = searched(plan)
    total = sum(lp.shape[0] * lp.shape[1] for lp in layers)
    removed = sum(lp.shape[0] * lp.shape[1] * lp.sparsity for lp in layers if lp.is_sparse)
    assert removed >= 0.7 * total * (1 - 1e-9) and plan.search["kept_fraction"] <= 0.3 + 1e-9


def test_max_error_budget_is_met_as_measured(problem) -> None:
    loose, tight = search(problem, max_error=0.5), search(problem, max_error=0.02)
    assert loose.search["measured_error"] <= 0.5 and tight.search["measured_error"] <= 0.02
    assert loose.search["predicted_speedup"] >= tight.search["predicted_speedup"]
    chosen = [p for p in loose.search["plans"] if p["chosen"]]
    assert len(chosen) == 1 and chosen[0]["measured_error"] == loose.search["measured_error"]


def test_budget_refusals(problem) -> None:
    with pytest.raises(SparseccError, match="exactly one budget"):
        search(problem)
    with pytest.raises(SparseccError, match="exactly one budget"):
        search(problem, latency=0.5, sparsity=0.5)
    with pytest.raises(SparseccError, match="between 0 and 1"):
        search(problem, latency=1.5)
    with pytest.raises(SearchError, match="no plan meets the budget"):
        search(problem, latency=0.01)
    with pytest.raises(TargetError, match="no kernel for pattern"):
        search(problem, latency=0.5, patterns="unstructured;3:8")
    from sparsecc.api import _as_program
    from sparsecc.pass_manager import PassContext, PassManager
    from sparsecc.targets import get_target

    model, batches = problem
    with pytest.raises(SparseccError, match="min_gain >= 1"):
        PassManager("search{latency=0.5,min_gain=0.9}").run(
            _as_program(model, batches[0]), PassContext(get_target("x86"), calibration=batches, progress=False))


def test_plan_round_trips_and_compiles(problem, tmp_path) -> None:
    model, batches = problem
    plan = search(problem, latency=0.6)
    path = tmp_path / "plan.json"
    plan.save(path)
    again = Plan.load(path)
    assert again.to_json() == plan.to_json() and json.loads(path.read_text())["search"]["budget"] == {"latency": 0.6}
    art = sparsecc.compile(model, batches[0], target="x86", plan=path, calibration=batches, progress=False)
    by_name = {layer.name: layer for layer in art.report.layers}
    for lp in plan.layers.values():
        assert by_name[lp.name].decision == ("sparse" if lp.is_sparse else "dense")
        assert by_name[lp.name].predicted_s == lp.predicted_s
    assert art.report.search["predicted_speedup"] == plan.search["predicted_speedup"]
    with pytest.raises(SparseccError, match="a plan fixes"):
        sparsecc.compile(model, batches[0], target="x86", plan=path, pattern="2:4", calibration=batches)


def test_edited_plans_are_checked(problem, tmp_path) -> None:
    model, batches = problem
    plan = search(problem, latency=0.6).to_json()

    def compile_with(data) -> None:
        path = tmp_path / "edited.json"
        path.write_text(json.dumps(data))
        sparsecc.compile(model, batches[0], target="x86", plan=path, calibration=batches, progress=False)

    renamed = json.loads(json.dumps(plan))
    renamed["layers"][0]["name"] = "nope"
    with pytest.raises(PlanError, match="does not have: nope"):
        compile_with(renamed)
    reshaped = json.loads(json.dumps(plan))
    reshaped["layers"][0]["shape"] = [1, 2]
    with pytest.raises(PlanError, match="in the plan but"):
        compile_with(reshaped)
    untileable = json.loads(json.dumps(plan))
    untileable["layers"][-1].update(pattern="block16x1", sparsity=0.5)  # the head has 10 outputs
    with pytest.raises(PlanError, match="head"):
        compile_with(untileable)
    with pytest.raises(TargetError, match="no kernel"):
        sparsecc.compile(model, batches[0], target="cuda-sm80", plan=_saved(tmp_path, plan), calibration=batches,
                         progress=False)


def _saved(tmp_path, data) -> str:
    path = tmp_path / "as_searched.json"
    path.write_text(json.dumps(data))
    return str(path)


def test_targets_get_different_plans(problem) -> None:
    """The GPU roofline finds nothing in this small model worth 2:4 (launch and idle SMs), the x86
    cost model does."""
    model, batches = problem
    x86 = search(problem, sparsity=0.5)
    gpu = sparsecc.search_plan(model, batches[0], target="cuda-sm80", calibration=batches, progress=False,
                               max_error=1.0)
    assert any(lp.is_sparse for lp in x86.layers.values())
    assert not any(lp.is_sparse for lp in gpu.layers.values())
    reasons = {lp.name: lp.reason for lp in gpu.layers.values()}
    assert all("predicted 1.0" in reasons[name] for name in ("up", "mid", "down"))
    assert "multiples of 32" in reasons["head"]


@pytest.mark.slow
def test_cli_search_then_compile(problem, tmp_path, capsys) -> None:
    model, batches = problem
    program = torch.export.export(model, batches[0])
    torch.export.save(program, tmp_path / "mlp.pt2")
    torch.save(batches, tmp_path / "calib.pt")
    assert cli_main(["search", str(tmp_path / "mlp.pt2"), "--target", "x86", "--latency", "0.6", "--calib",
                     str(tmp_path / "calib.pt"), "-o", str(tmp_path / "plan.json"), "--quiet"]) == 0
    out = capsys.readouterr().out
    assert "budget {'latency': 0.6}" in out and "plan written to" in out
    assert cli_main(["compile", str(tmp_path / "mlp.pt2"), "--target", "x86", "--plan", str(tmp_path / "plan.json"),
                     "--calib", str(tmp_path / "calib.pt"), "-o", str(tmp_path / "art"), "-q"]) == 0
    saved = Plan.load(tmp_path / "art" / "plan.json")
    assert saved.search["budget"] == {"latency": 0.6}


def test_plans_for_four_targets_differ_and_the_comparison_says_why(problem, tmp_path, capsys) -> None:
    model, batches = problem
    paths = []
    # a latency budget: each target's own cost model decides where the time is saved
    for target, budget in (("x86", {"latency": 0.75}), ("arm-neon", {"latency": 0.75}),
                           ("wasm-simd", {"latency": 0.75}), ("cuda-sm80", {"max_error": 1.0})):
        plan = sparsecc.search_plan(model, batches[0], target=target, calibration=batches, progress=False, **budget)
        paths.append(tmp_path / f"{target}.json")
        plan.save(paths[-1])
    assert cli_main(["compare", *map(str, paths)]) == 0
    text = capsys.readouterr().out
    assert "layers differ (*); why:" in text and "cuda-sm80: dense: 2:4 predicted" in text
    assert "arm-neon: unstructured at" in text or "arm-neon: block" in text
    x86, arm = Plan.load(paths[0]), Plan.load(paths[1])
    assert any(x86.layers[n].sparsity != arm.layers[n].sparsity or x86.layers[n].pattern != arm.layers[n].pattern
               for n in x86.layers)
    assert cli_main(["compare", *map(str, paths), "--format", "html", "-o", str(tmp_path / "cmp.html")]) == 0
    page = (tmp_path / "cmp.html").read_text()
    assert "<table id='plans'>" in page and "http" not in page and page.count('class="differs"') >= 1


def test_sensitivity_puts_each_layers_errors_on_the_models_scale() -> None:
    """One measurement (the model with only this layer pruned at its median-proxy candidate) sets
    the scale of all the layer's proxies; dense stays 0 and the ranking within the layer holds."""
    from sparsecc.passes.search import Search
    from sparsecc.program import Layer
    from sparsecc.search import Candidate

    class Measured:
        def __init__(self) -> None:
            self.asked = []

        def evaluate(self, plans, batches=0):
            self.asked.append([(p.name, p.pattern, p.sparsity) for p in plans])
            return 0.9

    layer = Layer("fc", "linear", "linear", "fc.weight", None, (8, 8))
    cands = [Candidate(None, 0.0, 1.0, 0.0, 64), Candidate("unstructured", 0.5, 0.6, 0.1, 32),
             Candidate("unstructured", 0.7, 0.5, 0.3, 20), Candidate("unstructured", 0.9, 0.4, 0.6, 7)]
    measured = Measured()
    scaled = Search._calibrated(measured, layer, cands, points=1)
    assert measured.asked == [[("fc", "unstructured", 0.7)]]  # the median proxy, alone
    assert [c.error for c in scaled] == pytest.approx([0.0, 0.3, 0.9, 1.8])
    assert [c.seconds for c in scaled] == [c.seconds for c in cands]


def test_two_sensitivity_points_follow_damage_that_grows_faster_than_the_proxy() -> None:
    """With two points (median and highest proxy) the map is piecewise linear through zero and both
    measurements: a layer that breaks at high sparsity is rated as broken there."""
    from sparsecc.passes.search import Search
    from sparsecc.program import Layer
    from sparsecc.search import Candidate

    class Measured:
        def __init__(self, errors) -> None:
            self.errors, self.asked = dict(errors), []

        def evaluate(self, plans, batches=0):
            (plan,) = plans
            self.asked.append(plan.sparsity)
            return self.errors[plan.sparsity]

    layer = Layer("fc", "linear", "linear", "fc.weight", None, (8, 8))
    cands = [Candidate(None, 0.0, 1.0, 0.0, 64), Candidate("unstructured", 0.5, 0.6, 0.1, 32),
             Candidate("unstructured", 0.7, 0.5, 0.3, 20), Candidate("unstructured", 0.8, 0.45, 0.45, 13),
             Candidate("unstructured", 0.9, 0.4, 0.6, 7)]
    breaking = Measured({0.8: 0.9, 0.9: 6.0})
    scaled = Search._calibrated(breaking, layer, cands, points=2)
    assert breaking.asked == [0.8, 0.9]
    # 0.1 and 0.3 scale by 0.9 / 0.45 = 2; 0.9 is measured; between 0.45 and 0.6 the slope is 34
    assert [c.error for c in scaled] == pytest.approx([0.0, 0.2, 0.6, 0.9, 6.0])
    # a measurement below the one before (noise) does not make more pruning look better
    noisy = Search._calibrated(Measured({0.8: 0.9, 0.9: 0.5}), layer, cands, points=2)
    assert [c.error for c in noisy] == pytest.approx([0.0, 0.2, 0.6, 0.9, 0.9])


class Twin(torch.nn.Module):
    """Two layers of one shape: one kernel problem to measure."""

    def __init__(self) -> None:
        super().__init__()
        self.first = torch.nn.Linear(128, 128)
        self.second = torch.nn.Linear(128, 128)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.second(torch.relu(self.first(x)))


def test_tune_measures_the_layers_kernels_then_plans_from_them(tmp_path, monkeypatch) -> None:
    """``tune=true`` times each searched layer's kernels into the cost table first (once: a second
    search finds them there), and every searched layer is then predicted from measurements."""
    from sparsecc.targets import get_target
    from sparsecc.targets.tuning import Problem, synthetic_weight

    monkeypatch.setenv("SPARSECC_COST_TABLE", str(tmp_path / "x86.json"))
    torch.manual_seed(0)
    model = Twin().eval()
    batches = [(torch.randn(16, 128, generator=torch.Generator().manual_seed(i)),) for i in range(2)]

    def run(**options):
        return sparsecc.search_plan(model, batches[0], target="x86", calibration=batches, progress=False,
                                    # 0.9: any sparse candidate (at least min_gain=1.1x faster than dense) meets it,
                                    # however close to dense this machine's timings of these small kernels land
                                    latency=0.9, patterns="unstructured", sparsities="0.5;0.7;0.9", measure="l2",
                                    search_batches=1, **options)

    plan = run(tune=True)
    table = json.loads((tmp_path / "x86.json").read_text())["entries"]
    # dense, 0.5 and 0.9 (every other step of the ladder and the last) at the layers' 16 rows
    assert sorted(table) == ["csr 128x128 m16 d0.10", "csr 128x128 m16 d0.50", "dense 128x128 m16 d1.00"]
    assert all(1 <= len(entry["candidates"]) <= 4 for entry in table.values())  # tune_candidates=4
    cost_model = get_target("x86").cost_model()
    for lp in searched(plan):
        assert lp.dense_s == table["dense 128x128 m16 d1.00"]["seconds"]
        if lp.is_sparse:
            packed = parse_pattern(lp.pattern).pack(synthetic_weight(tuple(lp.shape), lp.pattern, lp.sparsity))
            assert cost_model.predict(16, packed)[1] == ("measured" if Problem.of(16, packed).density in (0.5, 0.1)
                                                         else "interpolated")
            assert lp.predicted_s < lp.dense_s
    again = run(tune=True)
    assert len(json.loads((tmp_path / "x86.json").read_text())["entries"]) == 3
    assert again.to_json()["layers"] == plan.to_json()["layers"]
    with pytest.raises(TargetError, match="cannot be timed on this machine"):
        sparsecc.search_plan(model, batches[0], target="arm-neon", calibration=batches, progress=False, tune=True,
                             latency=0.7)


def test_a_second_search_of_the_same_model_reuses_its_sensitivity_measurements(problem, monkeypatch) -> None:
    from sparsecc.passes import allocate

    calls: list[int] = []
    original = allocate.OneShotAlignment.evaluate

    def counting(self, plans, batches=0):
        calls.append(batches)
        return original(self, plans, batches)

    monkeypatch.setattr(allocate.OneShotAlignment, "evaluate", counting)
    # a model of its own: the other tests' searches of the shared fixture are remembered too
    torch.manual_seed(7)
    model = Mlp().eval()
    _, batches = problem
    own = (model, batches)
    search(own, latency=0.62)
    first = [b for b in calls if b == 1]  # sensitivity: one batch each
    assert first
    calls.clear()
    search(own, latency=0.72)
    assert calls and all(b == 0 for b in calls)  # only the finalists, on every search batch
    other = [(b[0] + 0.5,) for b in batches]  # other calibration data: measured again
    calls.clear()
    sparsecc.search_plan(model, other[0], target="x86", calibration=other, progress=False, latency=0.62)
    assert len([b for b in calls if b == 1]) == len(first)


def test_calibration_batches_are_sized_by_the_output_positions_they_hold() -> None:
    """The finalists are compared on as many batches as hold 512 output positions, and each
    sensitivity on as many as hold 8: a language model's one batch holds a sequence of token
    positions, a classifier's one image only one distribution."""
    from sparsecc.passes.search import batches_for, output_positions

    assert output_positions([torch.zeros(1, 1000)]) == 1  # one image's logits
    assert output_positions([torch.zeros(1, 128, 49152)]) == 128  # one 128-token window
    assert output_positions([torch.zeros(4, 10), torch.zeros(())]) == 5
    assert batches_for(512, 128, 16) == 4 and batches_for(512, 1, 32) == 32 and batches_for(8, 128, 16) == 1
    assert batches_for(8, 3, 16) == 3 and batches_for(512, 1000, 16) == 1

    torch.manual_seed(0)
    model = Mlp().eval()
    gen = torch.Generator().manual_seed(1)
    images = [(torch.randn(1, 256, generator=gen),) for _ in range(12)]  # one position per batch
    rows = [(torch.randn(32, 256, generator=gen),) for _ in range(3)]  # 32 positions per batch

    def batches(calibration, **options):
        plan = sparsecc.search_plan(model, calibration[0], target="x86", calibration=calibration, progress=False,
                                    latency=0.7, **options)
        return plan.search["batches"]

    assert batches(images) == {"finalists": 12, "sensitivity": 8}
    assert batches(rows) == {"finalists": 3, "sensitivity": 1}
    assert batches(images, search_batches=2) == {"finalists": 2, "sensitivity": 2}
