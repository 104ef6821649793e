"""The arm-neon cost model: a roofline of the named core, checked for its arithmetic and against
Fast Sparse ConvNets' published whole-model ratios on MobileNet-class models."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from sparsecc.sparsity import pack_bsr, pack_csr
from sparsecc.targets import get_target
from sparsecc.targets.arm_cost import CORES, Layer, model_layers, sparse_speedup
from sparsecc.zoo.mobilenet import MobileNetV2


@pytest.fixture
def model(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.delenv("SPARSECC_ARM_CPU", raising=False)
    return get_target("arm-neon").cost_model()


def test_roofline_is_the_named_core(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SPARSECC_ARM_CPU", "neoverse-n1")
    n1 = get_target("arm-neon").cost_model()
    assert n1.roofline.gflops_per_thread == pytest.approx(4 * 2 * 2 * 2.5)
    assert n1.roofline.bandwidth_gbs == CORES["neoverse-n1"].dram_gbs
    monkeypatch.setenv("SPARSECC_ARM_CPU", "cortex-a76")
    a76 = get_target("arm-neon").cost_model()
    assert a76.roofline.gflops_per_thread == pytest.approx(38.4) and a76.table is None


def test_gemv_is_bandwidth_bound(model) -> None:
    # M = 1, 768 x 3072 dense: 9.4 MB of weights at 10 GB/s, far above its 4.7 MFLOP at 29 GFLOP/s
    seconds, how = model.predict(1, None, (768, 3072))
    assert how == "roofline"
    assert seconds == pytest.approx((4 * 768 * 3072 + 4 * (768 + 3072)) / 10e9)


def test_more_rows_per_block_share_more_x_loads(model) -> None:
    # compute-bound (M = 256): at equal density, blocks of more output rows predict less time
    rng = np.random.default_rng(0)
    w = rng.standard_normal((256, 512)).astype(np.float32)
    keep = rng.random((256 // 8, 512)) < 0.3
    w = w * np.repeat(keep, 8, axis=0)
    times = [model.predict(256, packed, (256, 512))[0]
             for packed in (pack_bsr(w, (8, 1)), pack_bsr(w, (4, 1)), pack_bsr(w, (2, 1)), pack_csr(w))]
    assert times == sorted(times) and times[0] < times[-1] / 1.5
    assert model.predict(256, None, (256, 512))[0] > times[-1]  # 30 % kept beats dense


def test_mobilenet_ratio_is_near_fast_sparse_convnets(model) -> None:
    # Fast Sparse ConvNets (Elsen et al.): 1.3-2.4x on MobileNet-class models at 70-90 % sparse
    # pointwise layers (Snapdragon 835). The roofline's whole-model predictions land within a
    # fifth of that band: Cortex-A76, unstructured, 70 %: 1.27x, 90 %: 2.57x.
    layers = model_layers(MobileNetV2().eval(), torch.zeros(1, 3, 224, 224))
    assert sum(layer.prunable for layer in layers) == 35  # 34 pointwise convolutions + classifier
    at70 = sparse_speedup(model, layers, "unstructured", 0.7)
    at90 = sparse_speedup(model, layers, "unstructured", 0.9)
    assert 1.3 / 1.2 <= at70 <= 2.4 * 1.2 and 1.3 / 1.2 <= at90 <= 2.4 * 1.2
    assert at70 < at90
    assert sparse_speedup(model, layers, "unstructured", 0.5) < 1.0  # half sparse does not pay


def test_layers_the_pattern_cannot_tile_stay_dense(model) -> None:
    layers = [Layer(64, (24, 96), True), Layer(64, (32, 96), True)]
    # 24 rows are not a whole number of 16-row blocks: only the second layer is sparse
    both = sparse_speedup(model, layers, "block16x1", 0.9)
    first_dense = model.predict(64, None, (24, 96))[0]
    assert 1.0 < both < (first_dense + model.predict(64, None, (32, 96))[0]) / first_dense
