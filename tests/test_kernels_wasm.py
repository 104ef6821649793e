"""The ``wasm-simd`` target's kernels, really built to WebAssembly and run under wasmtime: every
packed format (dense, CSR, BSR 16x1 / 8x1 / 4x4, N:M 2:4) against the float64 masked-dense
product, at ordinary and awkward shapes, and a check that the modules really use SIMD."""

from __future__ import annotations

import dataclasses
import functools

import numpy as np
import pytest

tvm = pytest.importorskip("tvm")

from kernel_check import check_close, reference  # noqa: E402
from sparsecc.errors import TargetError  # noqa: E402
from sparsecc.sparsity import pack_csr  # noqa: E402
from sparsecc.targets import get_target  # noqa: E402
from sparsecc.targets import wasm_toolchain as wt  # noqa: E402
from sparsecc.targets.kernels import dense_args, dense_linear  # noqa: E402
from sparsecc.targets.kernels.csr import _transpose_block, csr_args, csr_schedules  # noqa: E402
from sparsecc.targets.kernels.dense import dense_params, dense_schedules  # noqa: E402
from target_cases import (  # noqa: E402
    SIMD_FORMATS,
    FormatTests,
    check_case,
    check_missing_model_refused,
    check_record,
    folder_fixture,
    listing_line,
    require,
    simd_case,
)
from wasm_check import CAPS, TARGET, build_and_run, require_toolchain, require_wasm2wat, simd_ops  # noqa: E402

folder = folder_fixture(require_toolchain, "wasm")
_check = functools.partial(check_case, build_and_run)


# ---- the target record ------------------------------------------------------------------------

def test_record() -> None:
    check_record(TARGET, "wasm32", "+simd128", "wasm")



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


def test_missing_model_is_refused(tmp_path) -> None:
    check_missing_model_refused(TARGET, tmp_path, "wasm module .*model.bin does not exist")


def test_targets_listing_is_truthful(capsys) -> None:
    listing_line(TARGET, capsys)


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

class TestFormats(FormatTests):
    """Every packed format, built to WebAssembly and run in wasmtime."""

    caps = CAPS
    build_and_run = staticmethod(build_and_run)


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


def test_schedule_dataclass_keeps_lanes() -> None:
    from sparsecc.targets.kernels.csr import CSRSchedule

    s = CSRSchedule("spmv", "uint16", unroll=2, lanes=4)
    assert CSRSchedule(**dataclasses.asdict(s)) == s
    with pytest.raises(ValueError, match="lanes"):
        csr_args(pack_csr(np.eye(8, dtype=np.float32)), 1, CAPS, schedule=dataclasses.replace(s, lanes=5))
