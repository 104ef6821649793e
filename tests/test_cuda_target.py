"""The GPU targets (``cuda-sm80``, ``cuda-sm90``) end to end on a machine without a GPU: the plan
keeps layers dense where the roofline predicts no gain, 2:4 layers lower to the ``mma.sp`` kernel,
the artifact holds the host library, the CUDA source and a checked cubin, the kernel's CPU model
reproduces each sparse layer of the compiled model, and running the artifact says a GPU is needed.
"""

from __future__ import annotations

import importlib.util
import json
import os
import pathlib
import sys

import numpy as np
import pytest
import sparsecc
import torch
from sparsecc.cli import main as cli_main
from sparsecc.errors import ArtifactError, SparseccError
from sparsecc.targets import cuda_toolchain as ct
from sparsecc.targets import get_target
from sparsecc.targets.cuda import GPU_OF_ARCH, GpuCostModel, gpu_present
from sparsecc.targets.tensor_core_2_4 import pack_2_4
from sparsecc.targets.tensor_core_model import simulate_linear
from target_cases import require


class Mlp(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.up = torch.nn.Linear(512, 1024)
        self.down = torch.nn.Linear(1024, 256)
        self.head = torch.nn.Linear(256, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.relu(self.down(torch.relu(self.up(x)))))


def test_records_and_cost_model() -> None:
    for name, arch in (("cuda-sm80", "sm_80"), ("cuda-sm90", "sm_90")):
        record = get_target(name)
        assert record.patterns == ("2:4",) and record.tvm_target()["arch"] == arch
        assert record.runs_here == gpu_present()
    model = GpuCostModel(GPU_OF_ARCH["sm_80"])
    assert model.dense_reason(512, 4096, 4096) is None  # a large layer at a large batch pays
    assert "predicted" in model.dense_reason(1, 4096, 4096)  # decode: a weight stream, no gain
    assert "predicted" in model.dense_reason(512, 128, 128)  # small layer: launch and idle SMs
    assert "multiples of 32" in model.dense_reason(512, 1000, 4096)


def test_plan_keeps_layers_that_do_not_pay_dense() -> None:
    torch.manual_seed(0)
    x = torch.randn(8, 512)
    art = sparsecc.compile(Mlp().eval(), (x,), target="cuda-sm80", sparsity=0.5, pattern="2:4", method="magnitude",
                           calibration=[(x,)])
    reasons = {name: layer.reason for name, layer in art.plan.layers.items()}
    assert "predicted" in reasons["up"] and "at 8 tokens" in reasons["up"]
    assert "multiples of 32" in reasons["head"]


@pytest.mark.slow
def test_compile_artifact_and_kernel_model(tmp_path, capsys) -> None:
    require(ct.missing(), "the CUDA toolchain (nvcc, nvdisasm)")
    torch.manual_seed(0)
    model = Mlp().eval()
    x = torch.randn(256, 512)
    art = sparsecc.compile(model, (x,), target="cuda-sm80", sparsity=0.5, pattern="2:4", method="magnitude",
                           calibration=[(x,)])
    decisions = {layer.name: layer for layer in art.report.layers}
    assert decisions["up"].decision == decisions["down"].decision == "sparse"
    assert "mma.sp m16n8k32" in decisions["up"].kernel and decisions["head"].decision == "dense"
    out = art.save(tmp_path / "gpu")
    files = {p.name for p in out.iterdir()}
    assert {"model.so", "model.cu", "model.sm_80.cubin", "model.resources.json", "manifest.json"} <= files
    assert "mma.sp::ordered_metadata" in (out / "model.cu").read_text()
    resources = json.loads((out / "model.resources.json").read_text())
    sparse = {name: r for name, r in resources.items() if r["hmma_sp"]}
    assert len(sparse) == 2 and all(r["spill_stores"] == r["spill_loads"] == 0 for r in resources.values())
    # the kernel's arithmetic on each sparse layer's real pruned weight, through the CPU model
    state = {k: v.detach() for k, v in art.pruned.state_dict.items()}
    for layer in ("up", "down"):
        w = state[f"{layer}.weight"].half()
        values, metadata = pack_2_4(w)
        xs = torch.randn(24, w.shape[1]).half()
        got = simulate_linear(xs, values, metadata, state[f"{layer}.bias"])
        ref = (xs.double() @ w.double().T + state[f"{layer}.bias"].double()).numpy()
        assert np.abs(got - ref).max() <= 1e-5 * np.abs(ref).max()
    if gpu_present():
        return
    with pytest.raises(ArtifactError, match="NVIDIA GPU"):
        sparsecc.load(out)(x)
    torch.save((x,), tmp_path / "inputs.pt")
    code = cli_main(["run", str(out), "--inputs", str(tmp_path / "inputs.pt"), "--output", str(tmp_path / "y.pt")])
    assert code == 2 and "NVIDIA GPU" in capsys.readouterr().err


def test_gpu_check_without_a_gpu_builds_checks_and_measures_nothing(capsys, monkeypatch) -> None:
    """benchmarks/gpu_check.py, the user's one command on a GPU, builds and model-checks the
    kernels here and exits 2 saying that nothing was measured."""
    require(ct.missing(), "the CUDA toolchain (nvcc, nvdisasm)")
    if gpu_present():
        pytest.skip("a GPU is here: run benchmarks/gpu_check.py itself")
    script = pathlib.Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_check.py"
    spec = importlib.util.spec_from_file_location("gpu_check", script)
    gpu_check = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, "gpu_check", gpu_check)  # its dataclasses look their module up
    spec.loader.exec_module(gpu_check)
    assert gpu_check.main(["--shapes", "256x512", "--tokens", "1,64", "--arch", "sm_90"]) == 2
    out = capsys.readouterr()
    assert "HMMA.SP instructions" in out.out and "agree with the masked-dense layer" in out.out
    assert "Nothing was measured" in out.err


@pytest.mark.slow
@pytest.mark.models
def test_minilm_for_a100_keeps_attention_projections_dense_and_sparsifies_the_mlp(tmp_path) -> None:
    """A real transformer through the GPU pipeline (layer norms, softmax, gelu, embeddings by TVM's
    CUDA pipeline): at 4 x 256 tokens on an A100 the 384x384 projections predict less than 1.1x
    and stay dense with that reason, the 1536-wide MLP layers become two shared mma.sp kernels in
    the cubin. (On an H100, whose 132 SMs and 3x peak need bigger layers, every layer stays dense.)"""
    require(ct.missing(), "the CUDA toolchain (nvcc, nvdisasm)")
    from real_data import minilm_or_skip

    minilm = minilm_or_skip()
    embedder, tokenizer = minilm.load_minilm_embedder()
    ids, mask = minilm.encode(tokenizer, ["2:4 sparse tensor cores halve the weight bytes"] * 4, length=256)
    art = sparsecc.compile(embedder, (ids, mask), target="cuda-sm80", sparsity=0.5, pattern="2:4",
                           method="wanda", calibration=[(ids, mask)])
    layers = {layer.name: layer for layer in art.report.layers}
    query = layers["bert.encoder.layer.0.attention.self.query"]
    assert query.decision == "dense" and "predicted" in query.reason and "at 1024 tokens" in query.reason
    sparse = [layer for layer in layers.values() if layer.decision == "sparse"]
    assert len(sparse) == 12 and all("intermediate" in n.name or "output.dense" in n.name for n in sparse)
    out = art.save(tmp_path / "minilm")
    resources = json.loads((out / "model.resources.json").read_text())
    assert sorted(r["hmma_sp"] > 0 for r in resources.values()).count(True) == 2
    assert all(r["spill_stores"] == r["spill_loads"] == 0 for r in resources.values())


def test_cuda_jit_falls_back_to_nvcc_and_says_what_is_missing(monkeypatch, tmp_path) -> None:
    from sparsecc.errors import TargetError
    from sparsecc.targets import cuda

    monkeypatch.delenv("TVM_CUDA_COMPILE_MODE", raising=False)
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)  # no cuda-bindings
    fake_nvcc = tmp_path / "nvcc"
    fake_nvcc.write_text("#!/bin/sh\n")
    fake_nvcc.chmod(0o755)
    monkeypatch.setenv("PATH", str(tmp_path))
    cuda.prepare_cuda_jit()
    assert os.environ["TVM_CUDA_COMPILE_MODE"] == "nvcc"
    monkeypatch.delenv("TVM_CUDA_COMPILE_MODE")
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    with pytest.raises(TargetError, match="cuda-bindings.*nvcc.*12.5"):
        cuda.prepare_cuda_jit()


@pytest.mark.slow
def test_bf16_two_four_layers_and_refused_bf16_dense(tmp_path) -> None:
    require(ct.missing(), "the CUDA toolchain (nvcc, nvdisasm)")
    torch.manual_seed(0)
    x = torch.randn(256, 512)
    art = sparsecc.compile(Mlp().eval(), (x,), target="cuda-sm80", calibration=[(x,)],
                           pipeline="plan-uniform{pattern=2:4},prune-magnitude,pack,lower{sparse_weights=bfloat16},build")
    up = next(layer for layer in art.report.layers if layer.name == "up")
    assert up.decision == "sparse" and "bf16-weights" in up.kernel
    source = (art.save(tmp_path / "bf16") / "model.cu").read_text()
    assert "mma.sp::ordered_metadata.sync.aligned.m16n8k32.row.col.f32.bf16.bf16.f32" in source
    with pytest.raises(SparseccError, match="fp32 GPU kernels"):
        sparsecc.compile(Mlp().eval(), (x,), target="cuda-sm80", calibration=[(x,)], sparsity=0.5, pattern="2:4",
                         method="magnitude", weights="bfloat16")
