"""The ``wasm-simd`` target's kernels, really built to WebAssembly and run under wasmtime: every
packed format (dense, CSR, BSR 16x1 / 8x1 / 4x4, N:M 2:4) against the float64 masked-dense
product, at ordinary and awkward shapes, and a check that the modules really use SIMD."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

tvm = pytest.importorskip("tvm")

from kernel_check import check_close, reference  # noqa: E402
from sparsecc.errors import ArtifactError, TargetError  # noqa: E402
from sparsecc.sparsity import pack_csr, parse_pattern  # noqa: E402
from sparsecc.targets import all_targets, get_target  # noqa: E402
from sparsecc.targets import wasm_toolchain as wt  # noqa: E402
from sparsecc.targets.kernels import dense_args, dense_linear  # noqa: E402
from sparsecc.targets.kernels.csr import _transpose_block, csr_args, csr_schedules  # noqa: E402
from sparsecc.targets.kernels.dense import dense_params, dense_schedules  # noqa: E402
from target_cases import (  # noqa: E402
    MS,
    SIMD_FORMATS,
    Case,
    bsr_case,
    candidate_cases,
    csr_case,
    dense_case,
    nm_case,
    require,
    simd_case,
)
from wasm_check import CAPS, TARGET, build_and_run, require_toolchain, require_wasm2wat, simd_ops  # noqa: E402


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    require_toolchain()
    return tmp_path_factory.mktemp("wasm")


def _check(folder, case: Case):
    got, path = build_and_run(case.func, case.inputs, case.m, case.n_out, folder)
    check_close(got, case.ref)
    return path


# ---- the target record ------------------------------------------------------------------------

def test_record() -> None:
    assert TARGET in all_targets()
    caps = TARGET.capabilities()
    assert caps.vector_bits == 128 and caps.vector_lanes_f32 == 4 and caps.threads == 1
    tgt = TARGET.tvm_target()
    assert tgt["kind"] == "llvm" and tgt["mtriple"].startswith("wasm32") and "+simd128" in tgt["mattr"]
    tvm.target.Target(tgt)  # TVM accepts it
    assert TARGET.runner == "wasm" and not TARGET.builds_models
    assert TARGET.supports(TARGET.default_pattern)
    for name in TARGET.patterns:
        assert parse_pattern(name).packed_format in ("csr", "bsr", "nm"), name


def test_schedules_pick_four_lanes() -> None:
    """Vector widths come from the capabilities: 4 lanes here, the x86 choices unchanged."""
    x86 = get_target("x86").capabilities()
    w = np.random.default_rng(0).standard_normal((64, 96)).astype(np.float32)
    w[np.random.default_rng(1).random(w.shape) < 0.7] = 0
    packed = pack_csr(w)
    spmv = csr_schedules(1, packed, CAPS)[0]
    assert spmv.family == "spmv" and spmv.lanes == 4 and "gather4" in spmv.describe()
    assert _transpose_block(CAPS) == 4 and _transpose_block(x86) == 16
    if "avx512f" not in x86.features:
        assert csr_schedules(1, packed, x86)[0].lanes == 16
    mr, nr, kc = dense_params(1, (64, 96), CAPS)
    assert nr % 4 == 0 and nr <= 16
    assert all(s.nr % 4 == 0 for s in dense_schedules(8, (64, 96), CAPS))


def test_whole_model_compile_is_refused(tmp_path) -> None:
    import torch
    from sparsecc import cli
    from sparsecc.api import compile as compile_model

    model = torch.nn.Sequential(torch.nn.Linear(16, 8))
    with pytest.raises(TargetError, match="whole-model lowering for this target is not built yet"):
        compile_model(model, (torch.randn(2, 16),), target="wasm-simd", progress=False)
    # the command line says the same and exits with its error code, before reading the model
    argv = ["compile", str(tmp_path / "absent.pt2"), "--target", "wasm-simd", "-o", str(tmp_path / "out")]
    assert cli.main(argv) == 2
    from sparsecc.passes.lower import compile_relax

    with pytest.raises(TargetError, match="not built yet"):
        compile_relax(None, TARGET)
    from sparsecc.targets.runners import load_library

    with pytest.raises(ArtifactError, match="whole-model WebAssembly builds do not exist yet"):
        load_library("wasm", tmp_path / "model.wasm")


def test_targets_listing_is_truthful(capsys) -> None:
    from sparsecc import cli

    assert cli.main(["targets"]) == 0
    line = next(ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("wasm-simd"))
    assert "no whole-model build yet" in line
    assert ("runs here" in line) == wt.available()


def test_missing_toolchain_skips_locally_and_fails_in_ci(monkeypatch) -> None:
    monkeypatch.setenv("CI", "false")
    with pytest.raises(pytest.skip.Exception, match="clang"):
        require(["clang (Debian: clang)"], "the wasm toolchain")
    monkeypatch.setenv("CI", "true")
    with pytest.raises(pytest.fail.Exception, match="CI=true"):
        require(["clang (Debian: clang)"], "the wasm toolchain")
    require([], "the wasm toolchain")  # nothing missing: neither


def test_missing_toolchain_error_names_the_tools(monkeypatch) -> None:
    monkeypatch.setattr(wt, "missing", lambda: ["wasm-ld (Debian: lld)"])
    with pytest.raises(wt.ToolchainMissing, match="wasm-ld"):
        wt.find_toolchain()


# ---- every format, built and run in wasmtime --------------------------------------------------

@pytest.mark.parametrize("m", MS)
@pytest.mark.parametrize("shape", [(37, 53), (48, 130)], ids=lambda s: f"{s[0]}x{s[1]}")
def test_dense(folder, m: int, shape: tuple[int, int]) -> None:
    _check(folder, dense_case(m, shape, CAPS))


@pytest.mark.parametrize("m", MS + [131])
@pytest.mark.parametrize("shape", [(37, 53), (48, 130)], ids=lambda s: f"{s[0]}x{s[1]}")
def test_csr(folder, m: int, shape: tuple[int, int]) -> None:
    case = csr_case(m, shape, CAPS)
    _check(folder, case)
    assert case.schedule.startswith("csr-spmv gather4" if m == 1 else "csr-spmm")


@pytest.mark.parametrize("m", MS)
@pytest.mark.parametrize("block", [(16, 1), (8, 1), (4, 1), (4, 4)], ids=lambda b: f"{b[0]}x{b[1]}")
def test_bsr(folder, m: int, block: tuple[int, int]) -> None:
    _check(folder, bsr_case(m, block, CAPS))


@pytest.mark.parametrize("m", MS)
@pytest.mark.parametrize("n_out", [48, 20])
def test_nm_2_4(folder, m: int, n_out: int) -> None:
    _check(folder, nm_case(m, n_out, CAPS))


def test_kernel_errors_come_back(folder) -> None:
    """TVM's argument checks run inside the module; their message reaches Python."""
    from sparsecc.targets.runners.wasm import load_kernel

    func = dense_linear(2, (8, 16), False, CAPS, "dense_check")
    path = wt.build_kernel(func, folder / "dense_check.wasm")
    kernel = load_kernel(path, wt.kernel_export(func))
    x = np.zeros((3, 16), np.float32)  # wrong M
    with pytest.raises(TargetError, match="dense_check"):
        kernel(x, *dense_args(np.zeros((8, 16), np.float32), 2, CAPS), np.zeros((2, 8), np.float32))


# ---- SIMD is really used ----------------------------------------------------------------------

@pytest.mark.parametrize("fmt", SIMD_FORMATS)
@pytest.mark.parametrize("m", [1, 8])
def test_modules_use_simd(folder, fmt: str, m: int) -> None:
    require_wasm2wat()
    case = simd_case(fmt, m, CAPS)
    ops = simd_ops(_check(folder, case), case.name)
    assert ops.get("f32x4.mul", 0) + ops.get("f32x4.add", 0) >= 2, ops


def test_simd_check_sees_a_scalar_build(folder) -> None:
    """The same kernel built without simd128 has no f32x4 instructions: the check can fail."""
    require_wasm2wat()
    func = dense_linear(1, (32, 64), False, CAPS, "scalar_dense")
    w = np.random.default_rng(0).standard_normal((32, 64)).astype(np.float32)
    x = np.random.default_rng(1).standard_normal((1, 64)).astype(np.float32)
    got, path = build_and_run(func, [x, *dense_args(w, 1, CAPS)], 1, 32, folder, target=wt.tvm_target(()))
    check_close(got, reference(x, w, None))
    assert simd_ops(path, "scalar_dense") == {}


# ---- every candidate schedule (slow: about 40 builds) -----------------------------------------

@pytest.mark.slow
@pytest.mark.parametrize("m", [1, 8])
def test_every_candidate(folder, m: int) -> None:
    for case in candidate_cases(m, CAPS):
        _check(folder, case)


def test_schedule_dataclass_keeps_lanes() -> None:
    from sparsecc.targets.kernels.csr import CSRSchedule

    s = CSRSchedule("spmv", "uint16", unroll=2, lanes=4)
    assert CSRSchedule(**dataclasses.asdict(s)) == s
    with pytest.raises(ValueError, match="lanes"):
        csr_args(pack_csr(np.eye(8, dtype=np.float32)), 1, CAPS, schedule=dataclasses.replace(s, lanes=5))
