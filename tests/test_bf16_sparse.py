"""bf16-stored values in the sparse kernels (CSR, BSR, N:M) with fp32 accumulation: kernel outputs
against independently computed references, the stored arrays, the option's validation, the cost
table keys, the fallback to fp32 and a whole compiled model."""

from __future__ import annotations

import dataclasses
import itertools

import numpy as np
import pytest
import torch

tvm = pytest.importorskip("tvm")

from sparsecc.errors import SparseccError  # noqa: E402
from sparsecc.sparsity import PackedCSR, pack_bsr, pack_csr, pack_nm  # noqa: E402
from sparsecc.targets import get_target  # noqa: E402
from sparsecc.targets import x86 as x86_mod  # noqa: E402
from sparsecc.targets.kernels import BF16_MARKER, sparse_kernel  # noqa: E402
from sparsecc.targets.kernels.bsr import BSRSchedule  # noqa: E402
from sparsecc.targets.kernels.csr import CSRSchedule  # noqa: E402
from sparsecc.targets.kernels.nm import NMSchedule  # noqa: E402
from sparsecc.targets.tuning import CostTable, Problem, schedule_space, synthetic_weight  # noqa: E402

TARGET = get_target("x86")
CAPS = TARGET.capabilities()
_names = itertools.count()


def bf16_rounded(w: np.ndarray) -> np.ndarray:
    """The weight as bf16 rounds it, by torch's own conversion (not sparsecc's)."""
    return torch.from_numpy(np.ascontiguousarray(w)).to(torch.bfloat16).to(torch.float32).numpy()


def run(m: int, packed, schedule, x: np.ndarray, bias: np.ndarray | None) -> tuple[np.ndarray, list[np.ndarray], str]:
    """Build the kernel for ``schedule``, run it on x; (y, its arrays, its description)."""
    name = f"bf16_sparse_{next(_names)}"
    func, arrays = sparse_kernel(m, packed, bias is not None, CAPS, name, schedule=schedule)
    lib = tvm.compile(func, target=TARGET.tvm_target())
    dev = tvm.cpu()
    y = tvm.runtime.tensor(np.zeros((m, packed.shape[0]), np.float32), dev)
    inputs = [x, *arrays] + ([bias] if bias is not None else [])
    lib[name](*[tvm.runtime.tensor(np.ascontiguousarray(a), dev) for a in inputs], y)
    return y.numpy(), arrays, str(func.attrs["sparsecc.schedule"])


def check_against_references(y: np.ndarray, w: np.ndarray, x: np.ndarray, bias: np.ndarray | None) -> None:
    b = 0.0 if bias is None else bias.astype(np.float64)
    x64 = x.astype(np.float64)
    # 1. The masked-dense product with the bf16-rounded weights, in float64: the kernel computes
    #    exactly these products in fp32, so only fp32 summation error separates them.
    exact = x64 @ bf16_rounded(w).astype(np.float64).T + b
    np.testing.assert_allclose(y, exact, rtol=1e-5, atol=1e-5 * max(1.0, np.abs(exact).max()))
    # 2. Within bf16 rounding of the fp32 layer: each weight moves by at most 2^-8 of itself (bf16
    #    keeps 8 significant bits; round to nearest).
    full = x64 @ w.astype(np.float64).T + b
    bound = 2.0 ** -8 * (np.abs(x64) @ np.abs(w.astype(np.float64)).T) + 1e-5 * max(1.0, np.abs(full).max())
    assert np.all(np.abs(y - full) <= bound)
    # 3. The weights really were rounded (values with more than 8 mantissa bits).
    assert not np.allclose(y, full, rtol=1e-7, atol=0)


def odd_rows(w: np.ndarray, block_rows: int = 1) -> np.ndarray:
    """``w`` with its first (block) row all zero and its last (block) row fully dense."""
    w = w.copy()
    rng = np.random.default_rng(7)
    w[:block_rows] = 0
    w[-block_rows:] = rng.standard_normal((block_rows, w.shape[1])).astype(np.float32) + 0.1
    return w


def schedules_by_family(m: int, packed) -> list:
    """The first bf16 candidate of every schedule family (and row pairs for CSR) for this problem."""
    seen, out = set(), []
    for s in schedule_space(m, packed, CAPS, weights="bfloat16"):
        family = (s.family, getattr(s, "pairs", False))
        if family not in seen:
            seen.add(family)
            out.append(s)
    return out


@pytest.mark.parametrize("m", [1, 3, 8, 128])
@pytest.mark.parametrize("shape", [(48, 45), (64, 160)])
def test_csr_bf16_matches_rounded_masked_dense(m: int, shape: tuple[int, int]) -> None:
    rng = np.random.default_rng(m + shape[1])
    w = odd_rows(synthetic_weight(shape, "unstructured", 0.6, seed=m))
    packed = pack_csr(w)
    x = rng.standard_normal((m, shape[1])).astype(np.float32)
    bias = rng.standard_normal(shape[0]).astype(np.float32)
    schedules = schedules_by_family(m, packed)
    if m == 1:
        assert {s.family for s in schedules} >= {"sell", "spmv"}
    if m == 128:
        assert any(s.pairs for s in schedules)  # the shared-column layout has two weights per index
    for schedule in schedules:
        y, arrays, description = run(m, packed, schedule, x, bias if m != 3 else None)
        check_against_references(y, w, x, bias if m != 3 else None)
        assert description.endswith(BF16_MARKER) and schedule.weights == "bfloat16"
        # values are bf16 bits; pointers and indices are exactly the fp32 kernel's
        fp32_arrays = sparse_kernel(m, packed, True, CAPS, "f", dataclasses.replace(schedule, weights="float32"))[1]
        assert arrays[-1].dtype == np.uint16 and fp32_arrays[-1].dtype == np.float32
        assert arrays[-1].shape == fp32_arrays[-1].shape
        for ours, theirs in zip(arrays[:-1], fp32_arrays[:-1], strict=True):
            np.testing.assert_array_equal(ours, theirs)


@pytest.mark.parametrize("m", [1, 3, 8, 40])
@pytest.mark.parametrize(("block", "shape"), [((16, 1), (64, 45)), ((4, 4), (32, 68)), ((8, 2), (48, 70))])
def test_bsr_bf16_matches_rounded_masked_dense(m: int, block: tuple[int, int], shape: tuple[int, int]) -> None:
    rng = np.random.default_rng(m)
    w = odd_rows(synthetic_weight(shape, f"block{block[0]}x{block[1]}", 0.5, seed=m), block[0])
    packed = pack_bsr(w, block)
    x = rng.standard_normal((m, shape[1])).astype(np.float32)
    bias = rng.standard_normal(shape[0]).astype(np.float32)
    for schedule in schedules_by_family(m, packed):
        y, arrays, description = run(m, packed, schedule, x, bias)
        check_against_references(y, w, x, bias)
        assert description.endswith(BF16_MARKER)
        assert arrays[2].dtype == np.uint16 and arrays[1].dtype == np.dtype(schedule.index)


@pytest.mark.parametrize("m", [1, 3, 8, 40])
@pytest.mark.parametrize(("nm", "shape"), [((2, 4), (32, 64)), ((1, 4), (48, 36)), ((2, 4), (40, 36))])
def test_nm_bf16_matches_rounded_masked_dense(m: int, nm: tuple[int, int], shape: tuple[int, int]) -> None:
    rng = np.random.default_rng(m)
    w = synthetic_weight(shape, f"{nm[0]}:{nm[1]}", 1 - nm[0] / nm[1], seed=m)
    w[0] = 0  # an all-zero row
    packed = pack_nm(w, *nm)
    x = rng.standard_normal((m, shape[1])).astype(np.float32)
    bias = rng.standard_normal(shape[0]).astype(np.float32)
    for schedule in schedules_by_family(m, packed):
        y, arrays, description = run(m, packed, schedule, x, bias)
        check_against_references(y, w, x, bias)
        assert description.endswith(BF16_MARKER)
        assert arrays[0].dtype == np.uint16 and arrays[1].dtype == np.uint8


def test_fp32_is_still_the_default_and_carries_no_marker() -> None:
    w = synthetic_weight((32, 64), "unstructured", 0.5)
    packed = pack_csr(w)
    func, arrays = sparse_kernel(1, packed, False, CAPS, "plain")
    assert BF16_MARKER.strip() not in str(func.attrs["sparsecc.schedule"])
    assert arrays[-1].dtype == np.float32
    for cls in (CSRSchedule, BSRSchedule, NMSchedule):
        assert cls().weights == "float32"
        assert BF16_MARKER.strip() in dataclasses.replace(cls(), weights="bfloat16").describe()


def test_bad_weights_are_refused() -> None:
    w = synthetic_weight((32, 64), "unstructured", 0.5)
    with pytest.raises(ValueError, match="float32 or bfloat16"):
        sparse_kernel(1, pack_csr(w), False, CAPS, "k", schedule=CSRSchedule("sell", "uint16", unroll=2,
                                                                            weights="float16"))
    wb = synthetic_weight((32, 64), "block16x1", 0.5)
    with pytest.raises(ValueError, match="float32 or bfloat16"):
        sparse_kernel(1, pack_bsr(wb, (16, 1)), False, CAPS, "k", schedule=BSRSchedule(weights="bf16"))
    wn = synthetic_weight((32, 64), "2:4", 0.5)
    with pytest.raises(ValueError, match="float32 or bfloat16"):
        sparse_kernel(1, pack_nm(wn, 2, 4), False, CAPS, "k", schedule=NMSchedule("gather", weights="int8"))
    with pytest.raises(SparseccError, match="float32 or bfloat16"):
        Problem.of(1, pack_csr(w), weights="fp16")


def test_option_validation_in_the_pipeline_api_and_cli(mlp) -> None:
    import sparsecc
    from sparsecc.api import default_pipeline
    from sparsecc.cli import build_parser

    model, example, calib = mlp
    with pytest.raises(SparseccError, match="sparse_weights=fp8.*float32 or bfloat16"):
        sparsecc.compile(model, example, pipeline="calibrate,plan-uniform{sparsity=0.5},pack,"
                         "lower{sparse_weights=fp8},build", calibration=calib, progress=False)
    with pytest.raises(SparseccError, match="float32 \\(fp32\\), bfloat16 \\(bf16\\)"):
        sparsecc.compile(model, example, weights="fp8", calibration=calib, progress=False)
    with pytest.raises(SparseccError, match="no lower pass"):
        sparsecc.compile(model, example, weights="bf16", pipeline="calibrate,plan-uniform", progress=False)
    text = default_pipeline(sparsity=0.5, pattern="2:4", method="magnitude", weights="bfloat16")
    assert text.endswith("lower{dense_weights=bfloat16,sparse_weights=bfloat16},build")
    assert "lower," in default_pipeline(sparsity=0.5, pattern="2:4", method="magnitude")
    parser = build_parser()
    assert parser.parse_args(["compile", "m.pt2", "-o", "out", "--weights", "bf16"]).weights == "bf16"
    assert parser.parse_args(["compile", "m.pt2", "-o", "out"]).weights == "fp32"
    with pytest.raises(SystemExit):
        parser.parse_args(["compile", "m.pt2", "-o", "out", "--weights", "fp8"])


def test_cost_table_keeps_bf16_apart_and_the_roofline_counts_two_bytes(tmp_path, monkeypatch) -> None:
    path = tmp_path / "x86.json"
    monkeypatch.setenv("SPARSECC_COST_TABLE", str(path))
    w = synthetic_weight((256, 512), "unstructured", 0.5)
    packed = pack_csr(w)
    fp32, bf16 = Problem.of(1, packed), Problem.of(1, packed, weights="bfloat16")
    assert bf16.key() == fp32.key() + " bf16"
    model = TARGET.cost_model()
    (t32, how32), (t16, how16) = model.predict(1, packed), model.predict(1, packed, weights="bfloat16")
    assert how32 == how16 == "roofline"
    # memory bound at M = 1: the time is the bytes streamed, and bf16 saves 2 bytes per value
    saved = (t32 - t16) * model.roofline.bandwidth_gbs * 1e9
    assert saved == pytest.approx(2 * packed.nnz, rel=1e-6)
    table = CostTable.load(path, x86_mod.machine())
    space32 = schedule_space(1, packed, CAPS)
    table.record(fp32, [(space32[0], 5e-6)])
    table.save()
    model = TARGET.cost_model()
    assert model.predict(1, packed) == (5e-6, "measured")
    assert model.predict(1, packed, weights="bfloat16")[1] == "roofline"  # never the fp32 entry
    assert model.schedule(1, packed, weights="bfloat16") is None
    space16 = schedule_space(1, packed, CAPS, weights="bfloat16")
    table.record(bf16, [(space16[1], 4e-6)])
    table.save()
    model = TARGET.cost_model()
    assert model.schedule(1, packed, weights="bfloat16") == space16[1]
    assert model.schedule(1, packed) == space32[0]
    assert model.predict(1, packed, weights="bfloat16") == (4e-6, "measured")


def test_tune_measures_both_storages_side_by_side(tmp_path) -> None:
    from sparsecc.targets.tuning import tune

    table = tune("x86", [(64, 64)], [1], ["2:4"], [0.5], table_path=tmp_path / "t.json", rounds=1,
                 log=lambda *_: None, weights=("float32", "bfloat16"))
    assert sorted(table.entries) == ["nm/2:4 64x64 m1 d0.50", "nm/2:4 64x64 m1 d0.50 bf16"]
    assert all(BF16_MARKER.strip() in c for c, _ in table.entries["nm/2:4 64x64 m1 d0.50 bf16"]["candidates"])
    assert not any(BF16_MARKER.strip() in c for c, _ in table.entries["nm/2:4 64x64 m1 d0.50"]["candidates"])
    with pytest.raises(SparseccError, match="float32 and/or bfloat16"):
        tune("x86", [(64, 64)], [1], ["2:4"], [0.5], table_path=tmp_path / "t.json", weights=("fp8",))


def _kernels(artifact) -> dict[str, str]:
    return {layer.name: layer.kernel for layer in artifact.report.layers if layer.kernel}


@pytest.mark.parametrize("pattern", ["unstructured", "block16x1", "2:4"])
def test_whole_model_with_bf16_weights(mlp, pattern: str) -> None:
    import sparsecc

    model, example, calib = mlp
    artifact = sparsecc.compile(model, example, sparsity=0.5, pattern=pattern, method="magnitude",
                                calibration=calib, progress=False, weights="bfloat16")
    assert "sparse_weights=bfloat16" in artifact.pipeline
    kernels = _kernels(artifact)
    sparse = [layer.name for layer in artifact.report.layers if layer.decision == "sparse"]
    assert sparse and kernels and all(BF16_MARKER.strip() in k for k in kernels.values())
    assert not [d for d in artifact.report.diagnostics if d["severity"] == "error"]
    with torch.no_grad():
        got = artifact(*example)
        want = artifact.reference(*example)
    rel = float((got - want).norm() / want.norm())
    assert 1e-7 < rel < 1e-2, f"bf16 values moved the output by {rel:.3g}"


def test_bf16_measured_slower_keeps_fp32_with_a_warning(tmp_path, monkeypatch, mlp) -> None:
    """A layer whose bf16 kernel the cost table timed slower than its fp32 one keeps fp32 values
    (decided from the table, for whatever shape that is), the other layers store bf16."""
    import sparsecc

    model, example, calib = mlp
    plain = sparsecc.compile(model, example, sparsity=0.5, pattern="unstructured", method="magnitude",
                             calibration=calib, progress=False)
    arrays = {key: plain.packed_arrays[f"fc1/{key}"].numpy() for key in ("indptr", "indices", "data")}
    packed = PackedCSR((64, 64), arrays["indptr"], arrays["indices"], arrays["data"])
    path = tmp_path / "x86.json"
    monkeypatch.setenv("SPARSECC_COST_TABLE", str(path))
    table = CostTable.load(path, x86_mod.machine())
    m = 6  # the example's (2, 3) rows
    table.record(Problem.of(m, packed), [(schedule_space(m, packed, CAPS)[0], 2e-6)])
    table.record(Problem.of(m, packed, weights="bfloat16"),
                 [(schedule_space(m, packed, CAPS, weights="bfloat16")[0], 3e-6)])
    table.save()
    artifact = sparsecc.compile(model, example, sparsity=0.5, pattern="unstructured", method="magnitude",
                                calibration=calib, progress=False, weights="bfloat16")
    kernels = _kernels(artifact)
    assert BF16_MARKER.strip() not in kernels["fc1"] and "(measured best)" in kernels["fc1"]
    assert all(BF16_MARKER.strip() in k for name, k in kernels.items() if name != "fc1")
    warnings = [d for d in artifact.report.diagnostics if d["severity"] == "warning" and d["layer"] == "fc1"]
    assert warnings and "bf16 values measured slower than fp32 for this shape; kept fp32" in warnings[0]["message"]
    assert "kept fp32" in artifact.report.summary()
    with torch.no_grad():
        torch.testing.assert_close(artifact(*example), artifact.reference(*example), rtol=1e-2, atol=1e-2)
    # fc2 took the same heuristic schedule in both builds: its kernel stores 2 bytes less per value
    fc2_plain = next(lr for lr in plain.report.layers if lr.name == "fc2")
    fc2_bf16 = next(lr for lr in artifact.report.layers if lr.name == "fc2")
    assert fc2_bf16.kernel_bytes == fc2_plain.kernel_bytes - 2 * plain.packed_arrays["fc2/data"].numel()
