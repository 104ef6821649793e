"""bf16 weight storage with fp32 arithmetic: the rounding, the dense kernel and the lowering option."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

tvm = pytest.importorskip("tvm")

from sparsecc.targets import get_target  # noqa: E402
from sparsecc.targets.kernels.dense import (  # noqa: E402
    DenseSchedule,
    dense_args,
    dense_linear,
    dense_params,
    from_bfloat16_bits,
    to_bfloat16_bits,
)

TARGET = get_target("x86")
CAPS = TARGET.capabilities()


@settings(max_examples=200, deadline=None)
@given(st.floats(allow_nan=False, allow_infinity=False, width=32).filter(lambda v: abs(v) < 3e38))
def test_bf16_rounding_matches_torch(value: float) -> None:
    # torch's own fp32 -> bf16 conversion rounds to nearest even: the stored bits must agree.
    ours = to_bfloat16_bits(np.array([value], np.float32))
    theirs = torch.tensor([value], dtype=torch.float32).to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16)
    assert ours[0] == theirs[0]
    back = float(from_bfloat16_bits(ours)[0])
    if abs(value) >= np.finfo(np.float32).tiny:  # normal numbers: relative error of 8 mantissa bits
        assert abs(back - value) <= abs(value) * 2.0 ** -8
    else:  # subnormals: bf16 keeps fp32's exponent range, so the error is absolute
        assert abs(back - value) <= 2.0 ** -133


@pytest.mark.parametrize("m", [1, 3, 8, 45])
@pytest.mark.parametrize("shape", [(70, 45), (64, 600)])
def test_dense_bf16_weights(m: int, shape: tuple[int, int]) -> None:
    rng = np.random.default_rng(m)
    n_out, k = shape
    w = rng.standard_normal(shape).astype(np.float32)
    x = rng.standard_normal((m, k)).astype(np.float32)
    bias = rng.standard_normal(n_out).astype(np.float32)
    schedule = dataclasses.replace(DenseSchedule(*dense_params(m, shape, CAPS)), weights="bfloat16")
    func = dense_linear(m, shape, True, CAPS, "bf16_test", schedule=schedule)
    assert "bf16-weights" in str(func.attrs["sparsecc.schedule"])
    (panels,) = dense_args(w, m, CAPS, schedule=schedule)
    assert panels.dtype == np.uint16
    lib = tvm.compile(func, target=TARGET.tvm_target())
    dev = tvm.cpu()
    y = tvm.runtime.tensor(np.zeros((m, n_out), np.float32), dev)
    lib["bf16_test"](*[tvm.runtime.tensor(a, dev) for a in (x, panels, bias)], y)
    rounded = from_bfloat16_bits(to_bfloat16_bits(w))
    exact = x.astype(np.float64) @ rounded.astype(np.float64).T + bias
    # Tight against the bf16-rounded weights (the kernel's arithmetic is fp32) ...
    np.testing.assert_allclose(y.numpy(), exact, rtol=1e-4, atol=1e-4 * np.abs(exact).max())
    # ... and within bf16 rounding of the fp32 layer.
    full = x.astype(np.float64) @ w.astype(np.float64).T + bias
    assert np.abs(y.numpy() - full).max() <= 2e-2 * np.abs(full).max()


def test_lower_option_stores_dense_weights_as_bf16(mlp) -> None:
    import sparsecc
    from sparsecc.errors import SparseccError

    model, example, calib = mlp
    pipeline = "calibrate,plan-uniform{sparsity=0},lower{dense_weights=bfloat16},build"
    artifact = sparsecc.compile(model, example, pipeline=pipeline, calibration=calib, progress=False)
    kernels = [layer.kernel for layer in artifact.report.layers if layer.kernel]
    assert kernels and all("bf16-weights" in k for k in kernels)
    assert not [d for d in artifact.report.diagnostics if d["severity"] == "error"]
    rel = artifact.report.compiled_vs_reference["rel"]
    assert 1e-6 < rel < 1e-2, f"bf16 weights moved the output by {rel:.3g}"
    with pytest.raises(SparseccError, match="float32 or bfloat16"):
        sparsecc.compile(model, example, pipeline="calibrate,plan-uniform{sparsity=0},lower{dense_weights=fp8},build",
                         calibration=calib, progress=False)
