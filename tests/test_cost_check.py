"""Cost-model honesty: per-layer predicted against measured kernel times, rank correlation and
median error, on the targets whose kernels run here (x86 in-process, wasm-simd in wasmtime)."""

from __future__ import annotations

import math

import pytest
import sparsecc
import torch
from sparsecc.cost_check import check_cost_model, spearman
from sparsecc.errors import TargetError
from target_cases import require


def test_spearman() -> None:
    assert spearman([1, 2, 3, 4], [10, 20, 30, 40]) == pytest.approx(1.0)
    assert spearman([1, 2, 3, 4], [4, 3, 2, 1]) == pytest.approx(-1.0)
    assert spearman([1, 2, 3], [1, 3, 2]) == pytest.approx(0.5)
    assert spearman([1, 1, 2], [5, 5, 9]) == pytest.approx(1.0)  # ties share a rank
    assert math.isnan(spearman([1.0], [2.0]))


class Mlp(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.up = torch.nn.Linear(256, 768)
        self.down = torch.nn.Linear(768, 256)
        self.head = torch.nn.Linear(256, 64)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.relu(self.down(torch.relu(self.up(x)))))


@pytest.mark.parametrize("target", ["x86", "wasm-simd"])
def test_every_layer_gets_a_measured_time(target) -> None:
    if target == "wasm-simd":
        from sparsecc.targets import wasm_toolchain

        require(wasm_toolchain.missing(), "the wasm toolchain")
    torch.manual_seed(0)
    x = torch.randn(16, 256)
    art = sparsecc.compile(Mlp().eval(), (x,), target=target, sparsity=0.7, pattern="block4x1", method="magnitude",
                           calibration=[(x,)], progress=False, measure_layers=(target == "x86"))
    summary = art.report.cost_model if target == "x86" else check_cost_model(art, rounds=3)
    assert [row["layer"] for row in summary["layers"]] == ["up", "down", "head"]
    assert all(row["measured_s"] > 0 and row["predicted_s"] > 0 for row in summary["layers"])
    assert {layer.name: layer.measured_s is not None for layer in art.report.layers} == {
        "up": True, "down": True, "head": True}
    assert -1.0 <= summary["spearman"] <= 1.0 and summary["median_relative_error"] >= 0
    assert (summary["model_latency_s"] or 0) >= (0 if target != "x86" else 1e-7)
    assert "cost model vs this machine over 3 layer kernels" in art.report.summary()
    sparse = [row for row in summary["layers"] if row["decision"] == "sparse"]
    assert sparse and all(row["measured_dense_s"] > 0 for row in sparse)
    assert summary["slower_than_dense"] == [row["layer"] for row in sparse
                                            if row["measured_dense_s"] <= row["measured_s"]]
    assert "measured no faster than their dense kernel" in art.report.summary()


def test_targets_whose_kernels_cannot_be_timed_here_say_so() -> None:
    from sparsecc.targets import arm_toolchain

    require(arm_toolchain.missing(), "the AArch64 toolchain")
    torch.manual_seed(0)
    x = torch.randn(8, 256)
    art = sparsecc.compile(Mlp().eval(), (x,), target="arm-neon", sparsity=0.5, pattern="block4x1",
                           method="magnitude", calibration=[(x,)], progress=False)
    with pytest.raises(TargetError, match="cannot time kernels"):
        check_cost_model(art)


def test_once_per_problem_times_equally_shaped_layers_pruned_alike_once() -> None:
    torch.manual_seed(0)
    x = torch.randn(16, 256)
    twins = torch.nn.Sequential(torch.nn.Linear(256, 256), torch.nn.ReLU(), torch.nn.Linear(256, 256),
                                torch.nn.ReLU(), torch.nn.Linear(256, 64))  # layers "0" and "2" alike
    art = sparsecc.compile(twins.eval(), (x,), target="x86", sparsity=0.5, pattern="block4x1",
                           method="magnitude", calibration=[(x,)], progress=False)
    every = check_cost_model(art, rounds=3)
    assert every["kernels_timed"] == 3 and not any("timed_with" in row for row in every["layers"])
    shared = check_cost_model(art, rounds=3, once_per_problem=True)
    rows = {row["layer"]: row for row in shared["layers"]}
    assert shared["kernels_timed"] == 2
    assert rows["2"]["timed_with"] == "0" and "timed_with" not in rows["4"]
    assert rows["2"]["measured_s"] == rows["0"]["measured_s"]
    assert rows["2"]["measured_dense_s"] == rows["0"]["measured_dense_s"]
    assert shared["measured_sum_s"] == pytest.approx(sum(row["measured_s"] for row in shared["layers"]))
    assert "over 3 layers (2 distinct kernels timed)" in art.report.summary()
