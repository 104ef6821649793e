"""The schedule explorer, the cost table and how lowering and the cost model use them."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
import torch

tvm = pytest.importorskip("tvm")

from sparsecc.errors import SparseccError  # noqa: E402
from sparsecc.sparsity import pack_bsr, pack_csr  # noqa: E402
from sparsecc.targets import get_target  # noqa: E402
from sparsecc.targets import x86 as x86_mod  # noqa: E402
from sparsecc.targets.kernels import bsr as bsr_mod  # noqa: E402
from sparsecc.targets.tuning import (  # noqa: E402
    CostTable,
    CostTableError,
    Problem,
    explore,
    schedule_space,
    synthetic_weight,
    tune,
)

TARGET = get_target("x86")
CAPS = TARGET.capabilities()


def test_problem_key_buckets_density() -> None:
    w = synthetic_weight((32, 64), "block16x1", 0.71)
    key = Problem.of(8, pack_bsr(w, (16, 1))).key()
    assert key == "bsr/r16c1 32x64 m8 d0.30"
    assert Problem.of(1, None, (10, 20)).key() == "dense 10x20 m1 d1.00"


def test_table_round_trip_and_refusals(tmp_path) -> None:
    machine = x86_mod.machine()
    path = tmp_path / "table.json"
    table = CostTable.load(path, machine)
    assert table.entries == {}
    w = synthetic_weight((32, 64), "unstructured", 0.5)
    problem = Problem.of(4, pack_csr(w))
    space = schedule_space(4, pack_csr(w), CAPS)
    table.record(problem, [(space[0], 2e-6), (space[-1], 1e-6)])
    table.save()
    again = CostTable.load(path, machine)
    assert again.best(problem) == space[-1]  # the faster one, rebuilt as a schedule object
    assert again.seconds(problem) == 1e-6
    assert again.best(Problem.of(5, pack_csr(w))) is None
    with pytest.raises(CostTableError, match="measured on"):
        CostTable.load(path, {**machine, "mcpu": "some-other-cpu"})
    data = json.loads(path.read_text())
    data["version"] = 999
    path.write_text(json.dumps(data))
    with pytest.raises(CostTableError, match="version"):
        CostTable.load(path, machine)
    path.write_text("{ not json")
    with pytest.raises(CostTableError, match="unreadable"):
        CostTable.load(path, machine)


def test_two_tables_saving_to_one_file_keep_each_others_measurements(tmp_path) -> None:
    # two searches tuning at once: each process holds the table it loaded; a plain write of the
    # later one would drop what the other measured meanwhile
    machine = x86_mod.machine()
    path = tmp_path / "table.json"
    packed = {s: pack_csr(synthetic_weight((32, 64), "unstructured", s)) for s in (0.3, 0.5, 0.7)}
    space = {s: schedule_space(4, p, CAPS) for s, p in packed.items()}
    first, second = CostTable.load(path, machine), CostTable.load(path, machine)
    first.record(Problem.of(4, packed[0.3]), [(space[0.3][0], 3e-6)])
    first.save()
    second.record(Problem.of(4, packed[0.5]), [(space[0.5][0], 2e-6)])
    second.record(Problem.of(4, packed[0.3]), [(space[0.3][0], 4e-6)])  # measured again: the newer wins
    second.save()
    first.record(Problem.of(4, packed[0.7]), [(space[0.7][0], 1e-6)])
    first.save()  # first's stale copy of the 0.3 entry must not overwrite second's newer one
    on_disk = CostTable.load(path, machine)
    assert {k: e["seconds"] for k, e in on_disk.entries.items()} == {
        "csr 32x64 m4 d0.70": 4e-6, "csr 32x64 m4 d0.50": 2e-6, "csr 32x64 m4 d0.30": 1e-6}
    assert first.entries.keys() == on_disk.entries.keys()  # a save also brings the others' entries in


def test_explore_times_every_candidate() -> None:
    w = synthetic_weight((48, 64), "block16x1", 0.5)
    packed = pack_bsr(w, (16, 1))
    results = explore(3, w, packed, CAPS, TARGET.tvm_target(), rounds=2)
    assert [s for s, _ in results] == bsr_mod.bsr_schedules(3, packed, CAPS)
    assert all(np.isfinite(t) and t > 0 for _, t in results)


def test_explore_refuses_a_wrong_kernel() -> None:
    w = synthetic_weight((48, 64), "block16x1", 0.5)
    other = synthetic_weight((48, 64), "block16x1", 0.5, seed=5)
    # The packed weight does not match the reference weight: every candidate computes "wrong".
    with pytest.raises(SparseccError, match="wrong result"):
        explore(1, w, pack_bsr(other, (16, 1)), CAPS, TARGET.tvm_target(), rounds=1)


def test_tune_writes_the_table_and_lowering_reads_it(tmp_path, monkeypatch, mlp) -> None:
    import sparsecc

    path = tmp_path / "x86.json"
    monkeypatch.setenv("SPARSECC_COST_TABLE", str(path))
    table = tune("x86", [(64, 64)], [6], ["block16x1"], [0.5], rounds=1, log=lambda *_: None)
    assert path.is_file() and len(table.entries) == 1
    # Force a schedule that is not the heuristic's into the table: lowering must use it.
    (key, entry), = table.entries.items()
    space = bsr_mod.bsr_schedules(6, pack_bsr(synthetic_weight((64, 64), "block16x1", 0.5), (16, 1)), CAPS)
    forced = space[-1]
    assert forced != space[0]
    entry["schedule"] = dataclasses.asdict(forced)
    table.save()

    model, example, calib = mlp
    artifact = sparsecc.compile(model, example, sparsity=0.5, pattern="block16x1", method="magnitude",
                                calibration=calib, progress=False)
    fc1 = next(layer for layer in artifact.report.layers if layer.name == "fc1")
    assert forced.describe() in fc1.kernel and "(measured best)" in fc1.kernel
    with torch.no_grad():
        torch.testing.assert_close(artifact(*example), artifact.reference(*example), rtol=1e-4, atol=1e-4)


def test_cost_model_prefers_measurements(tmp_path, monkeypatch) -> None:
    path = tmp_path / "x86.json"
    monkeypatch.setenv("SPARSECC_COST_TABLE", str(path))
    w = synthetic_weight((64, 64), "unstructured", 0.7)
    packed = pack_csr(w)
    seconds, source = TARGET.cost_model().predict(8, packed)
    assert source == "roofline" and seconds > 0
    table = CostTable.load(path, x86_mod.machine())
    table.record(Problem.of(8, packed), [(schedule_space(8, packed, CAPS)[0], 3.5e-6)])
    table.save()
    assert TARGET.cost_model().predict(8, packed) == (3.5e-6, "measured")
    # The roofline orders formats sensibly: a 90 % sparse weight is predicted faster than dense.
    dense_s, _ = TARGET.cost_model().predict(128, None, (3072, 768))
    sparse_s, _ = TARGET.cost_model().predict(128, pack_csr(synthetic_weight((3072, 768), "unstructured", 0.9)))
    assert sparse_s < dense_s


def test_tune_refuses_a_bad_request(tmp_path) -> None:
    from sparsecc.cli import main

    assert main(["tune", "--shapes", "64by64", "--table", str(tmp_path / "t.json")]) == 2
    assert main(["tune", "--shapes", "64x64", "--sparsities", "1.5", "--table", str(tmp_path / "t.json")]) == 2


def test_wasm_tune_measures_in_wasmtime(tmp_path, monkeypatch) -> None:
    # The explorer times wasm kernels in wasmtime (checked against the reference first) and keeps
    # them in the wasm target's own table, keyed by this host's CPU and the engine.
    from wasm_check import require_toolchain

    require_toolchain()
    path = tmp_path / "wasm.json"
    monkeypatch.setenv("SPARSECC_WASM_COST_TABLE", str(path))
    record = get_target("wasm-simd")
    packed = pack_bsr(synthetic_weight((64, 96), "block16x1", 0.7), (16, 1))
    assert record.cost_model().predict(4, packed)[1] == "roofline"
    tune("wasm-simd", [(64, 96)], [4], ["block16x1"], [0.7], rounds=2, log=lambda _line: None)
    table = json.loads(path.read_text())
    assert table["machine"]["target"] == "wasm-simd" and table["machine"]["engine"].startswith("wasmtime")
    model = record.cost_model()
    seconds, how = model.predict(4, packed)
    assert how == "measured" and 0 < seconds < 0.1
    assert model.schedule(4, packed) in schedule_space(4, packed, record.capabilities())
    monkeypatch.delenv("SPARSECC_WASM_COST_TABLE")
    from importlib.metadata import version

    assert f"wasmtime{version('wasmtime')}" in record.cost_model().table_path.name  # one table per engine
    # the x86 table is another file: wasm measurements never answer for host kernels
    monkeypatch.setenv("SPARSECC_COST_TABLE", str(tmp_path / "x86.json"))
    assert TARGET.cost_model().predict(4, packed)[1] == "roofline"


def test_arm_kernels_are_never_timed_here() -> None:
    from sparsecc.targets.runners import kernel_preparer

    with pytest.raises(SparseccError, match="cannot time kernels"):
        kernel_preparer("arm")
    with pytest.raises(SparseccError, match="no measured cost table|cannot be measured"):
        tune("arm-neon", [(64, 96)], [4], ["block16x1"], [0.7], rounds=1)


def test_cost_model_interpolates_between_measured_densities(tmp_path, monkeypatch) -> None:
    path = tmp_path / "x86.json"
    monkeypatch.setenv("SPARSECC_COST_TABLE", str(path))
    shape = (64, 64)
    packed = {s: pack_csr(synthetic_weight(shape, "unstructured", s)) for s in (0.5, 0.6, 0.7, 0.8, 0.9)}
    space = {s: schedule_space(8, p, CAPS) for s, p in packed.items()}
    table = CostTable.load(path, x86_mod.machine())
    table.record(Problem.of(8, packed[0.5]), [(space[0.5][0], 10e-6)])
    # the 0.9 entry's fastest schedule is not the heuristic's: the nearest-density lookup must return it
    table.record(Problem.of(8, packed[0.9]), [(space[0.9][0], 3e-6), (space[0.9][-1], 2e-6)])
    table.save()
    model = TARGET.cost_model()
    assert model.predict(8, packed[0.5]) == (10e-6, "measured")
    seconds, source = model.predict(8, packed[0.7])  # density 0.30, between 0.50 and 0.10
    assert source == "interpolated" and seconds == pytest.approx(6e-6)
    seconds, source = model.predict(8, packed[0.6])
    assert source == "interpolated" and seconds == pytest.approx(8e-6)
    # never extrapolated: a density outside the measured ones, another M, another shape, bf16 storage
    assert model.predict(8, pack_csr(synthetic_weight(shape, "unstructured", 0.3)))[1] == "roofline"
    assert model.predict(16, packed[0.7])[1] == "roofline"
    assert model.predict(8, pack_csr(synthetic_weight((64, 128), "unstructured", 0.7)))[1] == "roofline"
    assert model.predict(8, packed[0.7], weights="bfloat16")[1] == "roofline"
    assert model.predict(8, pack_bsr(synthetic_weight(shape, "block16x1", 0.7), (16, 1)))[1] == "roofline"
    # schedules: the measured one where there is one, else the nearest measured density's best
    assert model.schedule(8, packed[0.8]) == space[0.9][-1]
    assert model.schedule(8, packed[0.6]) == space[0.5][0]
    assert model.schedule(8, pack_bsr(synthetic_weight(shape, "block16x1", 0.7), (16, 1))) is None
    # a measurement recorded after predictions were made brackets a density that was not before
    lighter = pack_csr(synthetic_weight(shape, "unstructured", 0.2))
    model.table.record(Problem.of(8, lighter), [(schedule_space(8, lighter, CAPS)[0], 12e-6)])
    seconds, source = model.predict(8, pack_csr(synthetic_weight(shape, "unstructured", 0.3)))
    assert source == "interpolated" and seconds == pytest.approx(10e-6 + 2e-6 * (0.7 - 0.5) / (0.8 - 0.5))


def test_tune_skips_what_the_table_has_and_shapes_a_pattern_cannot_take(tmp_path) -> None:
    from sparsecc.targets.tuning import tune_problems

    path = tmp_path / "t.json"
    lines: list[str] = []
    table = tune_problems("x86", [((24, 64), 4)], ["block16x1", "unstructured"], [0.5], table_path=path,
                          rounds=1, log=lines.append)
    assert list(table.entries) == ["csr 24x64 m4 d0.50"]
    assert any("block16x1 24x64: skipped" in line and "N % 16" in line for line in lines)
    measured = table.entries["csr 24x64 m4 d0.50"]["measured"]
    lines.clear()
    again = tune_problems("x86", [((24, 64), 4), ((24, 64), 4)], ["unstructured", "dense"], [0.5], table_path=path,
                          rounds=1, log=lines.append, skip_measured=True)
    assert sorted(again.entries) == ["csr 24x64 m4 d0.50", "dense 24x64 m4 d1.00"]
    assert again.entries["csr 24x64 m4 d0.50"]["measured"] == measured
    assert len([line for line in lines if line.startswith("dense")]) == 1  # the repeated problem once


def test_a_layers_forms_are_timed_again_side_by_side_and_rescaled(tmp_path) -> None:
    from sparsecc.targets.tuning import tune_problems

    path = tmp_path / "t.json"
    table = tune_problems("x86", [((32, 64), 4)], ["unstructured", "dense"], [0.5, 0.7], table_path=path,
                          rounds=3, log=lambda _line: None)
    assert sorted(table.entries) == ["csr 32x64 m4 d0.30", "csr 32x64 m4 d0.50", "dense 32x64 m4 d1.00"]
    # every entry was timed beside the layer's two other forms, and the file holds those times
    assert {key: entry["timed_beside"] for key, entry in table.entries.items()} == dict.fromkeys(table.entries, 2)
    on_disk = json.loads(path.read_text())["entries"]
    assert {k: e["seconds"] for k, e in on_disk.items()} == {k: e["seconds"] for k, e in table.entries.items()}


def test_rescale_scales_every_candidate_and_survives_a_save(tmp_path) -> None:
    machine = x86_mod.machine()
    path = tmp_path / "table.json"
    packed = pack_csr(synthetic_weight((32, 64), "unstructured", 0.5))
    space = schedule_space(4, packed, CAPS)[:2]
    table = CostTable.load(path, machine)
    problem = Problem.of(4, packed)
    table.record(problem, [(space[0], 4e-6), (space[1], 3e-6)])
    table.save()
    assert table.rescale(problem, 6e-6, 2) == pytest.approx(2.0)
    table.save()  # the rescaled entry is newer than the file's: it must win the merge
    entry = CostTable.load(path, machine).entries[problem.key()]
    assert entry["seconds"] == pytest.approx(6e-6) and entry["default_seconds"] == pytest.approx(8e-6)
    assert [t for _, t in entry["candidates"]] == pytest.approx([6e-6, 8e-6])
    assert entry["timed_beside"] == 2


@pytest.mark.parametrize(("again", "kept"), [
    ((15e-6, 30e-6, 80e-6), (10e-6, 20e-6, 80e-6 / 1.5)),  # the second run drifted slow: its ratios, the first level
    ((5e-6, 10e-6, 30e-6), (5e-6, 10e-6, 30e-6)),  # the first runs drifted slow: the second run's times
])
def test_side_by_side_keeps_its_ratios_at_the_lower_level(tmp_path, monkeypatch, again, kept) -> None:
    from sparsecc.targets import tuning

    table = CostTable.load(tmp_path / "t.json", x86_mod.machine())
    measured = []
    for sparsity, seconds in zip((0.3, 0.5, 0.7), (10e-6, 20e-6, 40e-6), strict=True):
        packed = pack_csr(synthetic_weight((32, 64), "unstructured", sparsity))
        table.record(Problem.of(4, packed), [(schedule_space(4, packed, CAPS)[0], seconds)])
        measured.append((Problem.of(4, packed), None))
    monkeypatch.setattr(tuning, "side_by_side", lambda calls, caps, rounds: list(again))
    tuning._confirm_side_by_side(table, measured, CAPS, 3, lambda _line: None)
    assert [table.entries[p.key()]["seconds"] for p, _ in measured] == pytest.approx(list(kept))
