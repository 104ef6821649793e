"""The GPU roofline for dense and 2:4 linears: its arithmetic, and the published lessons it must
reproduce (2:4 gains 1.3-1.6x on large GEMMs, nothing on small layers or at small batch)."""

from __future__ import annotations

import pytest
from sparsecc.targets.gpu_cost import GPUS, LAUNCH_S, gain, linear_seconds, pays


@pytest.mark.parametrize("gpu", sorted(GPUS))
def test_large_gemms_gain_what_published_kernels_reach(gpu: str) -> None:
    # cuSPARSELt / CUTLASS report about 1.3-1.6x over dense fp16 GEMM on large shapes
    for tokens, n_out, k in ((4096, 4096, 4096), (2048, 4096, 4096), (4096, 3072, 3072)):
        assert 1.3 <= gain(GPUS[gpu], tokens, n_out, k) <= 1.6
        assert pays(GPUS[gpu], tokens, n_out, k)


@pytest.mark.parametrize("gpu", sorted(GPUS))
def test_small_layers_and_small_batches_stay_dense(gpu: str) -> None:
    g = GPUS[gpu]
    for tokens in (1, 8):  # a weight stream: no gain reported at batch 1-8
        assert not pays(g, tokens, 4096, 4096)
    for channels in (64, 128, 256):  # below about 256 channels: launch and idle SMs dominate
        assert not pays(g, 128, channels, channels)
    assert gain(g, 4096, 4096, 4096) > gain(g, 512, 4096, 4096) > gain(g, 64, 4096, 4096)


def test_a_weight_stream_is_bytes_over_bandwidth() -> None:
    a100 = GPUS["a100"]
    n, k = 4096, 4096
    dense_bytes = 2 * n * k + 2 * (n + k)
    assert linear_seconds(a100, 1, n, k, sparse=False) == pytest.approx(LAUNCH_S + dense_bytes / (2.04e12 * 0.8))
    sparse_bytes = (2 * n * k / 2) * (1 + 1 / 8)  # half the values, 2 bits of position each
    # the packed weight streams at the sparse fraction of HBM, the activations at the dense one
    assert linear_seconds(a100, 1, n, k, sparse=True) == pytest.approx(
        LAUNCH_S + sparse_bytes / (2.04e12 * 0.45) + 2 * (n + k) / (2.04e12 * 0.8))
