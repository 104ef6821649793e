"""The ``arm-neon`` target's kernels, really built for AArch64 and run under qemu-user: every
packed format (dense, CSR, BSR 16x1 / 8x1 / 4x4, N:M 2:4) against the float64 masked-dense
product, at ordinary and awkward shapes, and a check that the kernels really use NEON."""

from __future__ import annotations

import numpy as np
import pytest

tvm = pytest.importorskip("tvm")

from arm_check import CAPS, TARGET, build_and_run, neon_ops, require_toolchain  # noqa: E402
from kernel_check import check_close, reference  # noqa: E402
from sparsecc.errors import ArtifactError, TargetError  # noqa: E402
from sparsecc.sparsity import parse_pattern  # noqa: E402
from sparsecc.targets import all_targets, arm  # noqa: E402
from sparsecc.targets import arm_toolchain as at  # noqa: E402
from sparsecc.targets.kernels import dense_args, dense_linear  # noqa: E402
from target_cases import (  # noqa: E402
    MS,
    SIMD_FORMATS,
    Case,
    bsr_case,
    candidate_cases,
    csr_case,
    dense_case,
    nm_case,
    simd_case,
)


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    require_toolchain()
    return tmp_path_factory.mktemp("arm")


def _check(folder, case: Case):
    got, path = build_and_run(case.func, case.inputs, case.m, case.n_out, folder)
    check_close(got, case.ref)
    return path


# ---- the target record ------------------------------------------------------------------------

def test_record() -> None:
    assert TARGET in all_targets()
    assert CAPS.vector_bits == 128 and CAPS.vector_lanes_f32 == 4 and CAPS.threads == 1
    assert "neon" in CAPS.features
    tgt = TARGET.tvm_target()
    assert tgt["kind"] == "llvm" and tgt["mtriple"].startswith("aarch64") and "+neon" in tgt["mattr"]
    assert tgt["mcpu"] == "cortex-a76"
    tvm.target.Target(tgt)  # TVM accepts it
    assert TARGET.runner == "arm" and not TARGET.builds_models and TARGET.cost_model is None
    assert TARGET.runs_here == at.available()
    assert TARGET.supports(TARGET.default_pattern)
    for name in TARGET.patterns:
        assert parse_pattern(name).packed_format in ("csr", "bsr", "nm"), name


def test_cpu_option(monkeypatch) -> None:
    """SPARSECC_ARM_CPU picks the tuned-for CPU: neoverse-n1 accepted, anything else refused."""
    monkeypatch.setenv("SPARSECC_ARM_CPU", "neoverse-n1")
    tgt = TARGET.tvm_target()
    assert tgt["mcpu"] == "neoverse-n1" and "+neon" in tgt["mattr"]
    tvm.target.Target(tgt)
    caps = TARGET.capabilities()
    assert caps.vector_bits == 128 and caps.l2_bytes == 1024 * 1024 and caps.l2_bytes != CAPS.l2_bytes
    monkeypatch.setenv("SPARSECC_ARM_CPU", "cortex-a53")
    with pytest.raises(TargetError, match="unknown CPU 'cortex-a53'.*neoverse-n1"):
        TARGET.tvm_target()
    monkeypatch.delenv("SPARSECC_ARM_CPU")
    assert TARGET.tvm_target()["mcpu"] == "cortex-a76" and arm.capabilities() == CAPS


def test_whole_model_compile_is_refused(tmp_path) -> None:
    import torch
    from sparsecc import cli
    from sparsecc.api import compile as compile_model

    model = torch.nn.Sequential(torch.nn.Linear(16, 8))
    with pytest.raises(TargetError, match="whole-model lowering for this target is not built yet"):
        compile_model(model, (torch.randn(2, 16),), target="arm-neon", progress=False)
    argv = ["compile", str(tmp_path / "absent.pt2"), "--target", "arm-neon", "-o", str(tmp_path / "out")]
    assert cli.main(argv) == 2
    from sparsecc.targets.runners import load_library

    with pytest.raises(ArtifactError, match="whole-model ARM builds do not exist yet"):
        load_library("arm", tmp_path / "model.exe")


def test_targets_listing_is_truthful(capsys) -> None:
    from sparsecc import cli

    assert cli.main(["targets"]) == 0
    line = next(ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("arm-neon"))
    assert "no whole-model build yet" in line and "qemu" in line
    assert ("runs here" in line) == at.available()


def test_missing_toolchain_skips_locally_and_fails_in_ci(monkeypatch) -> None:
    monkeypatch.setattr(at, "missing", lambda: ["qemu-aarch64-static (Debian: qemu-user-static)"])
    monkeypatch.setenv("CI", "false")
    with pytest.raises(pytest.skip.Exception, match="qemu-aarch64-static"):
        require_toolchain()
    monkeypatch.setenv("CI", "true")
    with pytest.raises(pytest.fail.Exception, match="CI=true"):
        require_toolchain()
    with pytest.raises(at.ToolchainMissing, match="qemu-user-static"):
        at.find_toolchain()


# ---- every format, built for AArch64 and run under qemu -------------------------------------

@pytest.mark.parametrize("m", MS)
@pytest.mark.parametrize("shape", [(37, 53), (48, 130)], ids=lambda s: f"{s[0]}x{s[1]}")
def test_dense(folder, m: int, shape: tuple[int, int]) -> None:
    _check(folder, dense_case(m, shape, CAPS))


@pytest.mark.parametrize("m", MS + [131])
@pytest.mark.parametrize("shape", [(37, 53), (48, 130)], ids=lambda s: f"{s[0]}x{s[1]}")
def test_csr(folder, m: int, shape: tuple[int, int]) -> None:
    case = csr_case(m, shape, CAPS)
    _check(folder, case)
    assert case.schedule.startswith("csr-spmv" if m == 1 else "csr-spmm")


@pytest.mark.parametrize("m", MS)
@pytest.mark.parametrize("block", [(16, 1), (8, 1), (4, 1), (4, 4)], ids=lambda b: f"{b[0]}x{b[1]}")
def test_bsr(folder, m: int, block: tuple[int, int]) -> None:
    _check(folder, bsr_case(m, block, CAPS))


@pytest.mark.parametrize("m", MS)
@pytest.mark.parametrize("n_out", [48, 20])
def test_nm_2_4(folder, m: int, n_out: int) -> None:
    _check(folder, nm_case(m, n_out, CAPS))


def test_kernel_errors_come_back(folder) -> None:
    """TVM's argument checks run inside the executable; their message reaches Python."""
    from sparsecc.targets.runners.arm import load_kernel

    func = dense_linear(2, (8, 16), False, CAPS, "dense_check")
    kernel = load_kernel(at.build_kernel(func, folder / "dense_check"))
    x = np.zeros((3, 16), np.float32)  # wrong M
    with pytest.raises(TargetError, match=r"dense_check failed: ValueError: Invalid x.shape\[0\]"):
        kernel(x, *dense_args(np.zeros((8, 16), np.float32), 2, CAPS), np.zeros((2, 8), np.float32))


# ---- NEON is really used ----------------------------------------------------------------------

@pytest.mark.parametrize("fmt", SIMD_FORMATS)
@pytest.mark.parametrize("m", [1, 8])
def test_kernels_use_neon(folder, fmt: str, m: int) -> None:
    ops = neon_ops(_check(folder, simd_case(fmt, m, CAPS)))
    assert ops.get("fmla", 0) >= 1, ops


def test_neon_check_sees_a_scalar_build(folder) -> None:
    """The same kernel built without NEON has no vector fmla: the check can fail."""
    func = dense_linear(1, (32, 64), False, CAPS, "scalar_dense")
    w = np.random.default_rng(0).standard_normal((32, 64)).astype(np.float32)
    x = np.random.default_rng(1).standard_normal((1, 64)).astype(np.float32)
    got, path = build_and_run(func, [x, *dense_args(w, 1, CAPS)], 1, 32, folder, target=at.tvm_target(("-neon",)))
    check_close(got, reference(x, w, None))
    assert neon_ops(path) == {}
    _, neon = build_and_run(func, [x, *dense_args(w, 1, CAPS)], 1, 32, folder / "neon")
    assert neon_ops(neon).get("fmla", 0) >= 1


# ---- every candidate schedule (slow: about 40 builds and qemu runs) ---------------------------

@pytest.mark.slow
@pytest.mark.parametrize("m", [1, 8])
def test_every_candidate(folder, m: int) -> None:
    for case in candidate_cases(m, CAPS):
        _check(folder, case)
