"""The ``arm-neon`` target's kernels, really built for AArch64 and run under qemu-user: every
packed format (dense, CSR, BSR 16x1 / 8x1 / 4x4, N:M 2:4) against the float64 masked-dense
product, at ordinary and awkward shapes, and a check that the kernels really use NEON."""

from __future__ import annotations

import functools

import numpy as np
import pytest

tvm = pytest.importorskip("tvm")

from arm_check import CAPS, TARGET, build_and_run, neon_ops, require_toolchain  # noqa: E402
from kernel_check import check_close, reference  # noqa: E402
from sparsecc.errors import TargetError  # noqa: E402
from sparsecc.targets import arm  # noqa: E402
from sparsecc.targets import arm_toolchain as at  # noqa: E402
from sparsecc.targets.kernels import dense_args, dense_linear  # noqa: E402
from target_cases import (  # noqa: E402
    SIMD_FORMATS,
    FormatTests,
    check_case,
    check_missing_model_refused,
    check_record,
    folder_fixture,
    listing_line,
    simd_case,
)

folder = folder_fixture(require_toolchain, "arm")
_check = functools.partial(check_case, build_and_run)


# ---- the target record ------------------------------------------------------------------------

def test_record() -> None:
    check_record(TARGET, "aarch64", "+neon", "arm")
    assert "neon" in CAPS.features and TARGET.tvm_target()["mcpu"] == "cortex-a76"
    assert TARGET.cost_model is not None and TARGET.runs_here == at.available()  # the roofline of arm_cost.py


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


def test_missing_model_is_refused(tmp_path) -> None:
    check_missing_model_refused(TARGET, tmp_path, "ARM executable .*model.bin does not exist")


def test_targets_listing_is_truthful(capsys) -> None:
    assert "qemu" in listing_line(TARGET, capsys)


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

class TestFormats(FormatTests):
    """Every packed format, built for AArch64 and run under qemu."""

    caps = CAPS
    build_and_run = staticmethod(build_and_run)


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
