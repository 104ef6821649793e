"""prune-channels: channel groups on the exported graph, structured removal, compensation."""

from __future__ import annotations

import io

import pytest
import sparsecc
import torch
from conftest import seeded
from real_data import mobilenet_or_skip
from sparsecc.errors import SparseccError, WeightError
from sparsecc.pass_manager import PassContext
from sparsecc.passes.channel_graph import ChannelGraph
from sparsecc.passes.channels import PruneChannels


class _Coupled(torch.nn.Module):
    """Every coupling kind the analysis knows: a residual add, batch norm, a depthwise conv, a
    concat and a split along channels, pooling and flatten into a linear, and two pinned ones (a
    layer norm over channels and a sum over heads)."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = torch.nn.Conv2d(3, 16, 3, padding=1)
        self.expand = torch.nn.Conv2d(16, 32, 1, bias=False)
        self.bn = torch.nn.BatchNorm2d(32)
        self.depthwise = torch.nn.Conv2d(32, 32, 3, padding=1, groups=32)
        self.project = torch.nn.Conv2d(32, 16, 1)
        self.left = torch.nn.Conv2d(16, 8, 1)
        self.right = torch.nn.Conv2d(16, 12, 1)
        self.merge = torch.nn.Conv2d(20, 24, 1)
        self.split_a = torch.nn.Conv2d(10, 6, 1)
        self.split_b = torch.nn.Conv2d(14, 6, 1)
        self.head = torch.nn.Linear(12, 32)
        self.norm = torch.nn.LayerNorm(32)
        self.heads = torch.nn.Linear(32, 32)
        self.out = torch.nn.Linear(32, 5)

    def forward(self, x):
        x = torch.relu(self.stem(x))
        h = torch.relu(self.bn(self.expand(x)))
        x = x + self.project(torch.relu(self.depthwise(h)))
        m = torch.relu(self.merge(torch.cat([self.left(x), self.right(x)], 1)))
        a, b = torch.split(m, [10, 14], 1)
        y = torch.cat([self.split_a(a), self.split_b(b)], 1)
        y = torch.flatten(torch.nn.functional.adaptive_avg_pool2d(y, 1), 1)
        z = self.norm(self.head(y))
        z = self.heads(z).reshape(-1, 4, 8).sum(1).repeat(1, 4)
        return self.out(z)


def _coupled():
    model = seeded(_Coupled()).eval()
    with torch.no_grad():
        model.bn.running_mean.uniform_(-0.5, 0.5)
        model.bn.running_var.uniform_(0.5, 2.0)
    example = (torch.randn(4, 3, 8, 8),)
    calibration = [(torch.randn(4, 3, 8, 8),) for _ in range(3)]
    return model, example, calibration


def test_channel_groups_of_every_coupling_kind(golden):
    model, example, _ = _coupled()
    graph = ChannelGraph(sparsecc.capture(model, example))
    golden("channels_coupled_groups.txt", graph.describe())
    text = graph.describe()
    # the residual add ties stem and project together; the split's two halves are one group with
    # merge, read by split_a and split_b
    assert "[project, stem] -> [expand, left, right]: 16 channels" in text
    assert "[merge] -> [split_a, split_b]: 24 channels" in text
    assert "[head] -> [heads]: pinned: layer norm" in text
    assert "[heads] -> []: pinned: sum" in text  # the sum over heads


def _run(pass_, program, calibration, x86):
    return pass_.run(program, PassContext(x86, calibration=calibration, progress=False))


def test_every_coupling_kind_prunes_runs_and_exports(x86):
    model, example, calibration = _coupled()
    program = sparsecc.capture(model, example)
    result = _run(PruneChannels(sparsity=0.25, scope="group"), program, calibration, x86)
    counters = result.counters
    assert counters["groups_pruned"] == 5 and counters["groups_pinned"] == 3  # head, heads, out
    assert counters["parameters_before"] - counters["parameters_after"] + counters["bias_parameters_added"] == \
        counters["parameters_removed_expected"] > 0
    pruned = result.program
    # 25 % of each group: stem/project 16 -> 12, expand/depthwise 32 -> 24, cat 20 -> 15, merge 24 -> 18
    shapes = {layer.name: tuple(layer.weight_shape) for layer in pruned.layers()}
    assert shapes["stem"][0] == 12 and shapes["project"][0] == 12 and shapes["expand"] == (24, 12, 1, 1)
    assert shapes["depthwise"] == (24, 1, 3, 3) and shapes["merge"][:2] == (18, 15)
    assert shapes["left"][0] + shapes["right"][0] == 15 and shapes["split_a"][1] + shapes["split_b"][1] == 18
    assert shapes["heads"] == (32, 32)  # pinned
    # it runs, close to dense with compensation, and saves and loads as an ordinary program
    x = calibration[0][0]
    dense, out = program.run(x), pruned.run(x)
    assert out.shape == dense.shape
    assert float((out - dense).norm() / dense.norm()) < 0.5
    buffer = io.BytesIO()
    torch.export.save(pruned.exported, buffer)
    buffer.seek(0)
    assert torch.allclose(torch.export.load(buffer).module()(x), out, atol=1e-5)


class _DeadChannels(torch.nn.Module):
    """conv -> relu -> conv -> linear where some channels carry nothing (zero weights, zero bias)
    and others carry a constant (zero weights, positive bias)."""

    def __init__(self, dead: list[int], constant: list[int]) -> None:
        super().__init__()
        self.a = torch.nn.Conv2d(4, 16, 3, padding=1)
        self.b = torch.nn.Conv2d(16, 24, 1)
        self.c = torch.nn.Linear(24, 3)
        with torch.no_grad():
            for ch in dead + constant:
                self.a.weight[ch] = 0.0
                self.a.bias[ch] = 0.0 if ch in dead else 0.7
            self.b.weight[dead] = 0.0  # b's dead outputs: zero rows, bias zero
            self.b.bias[dead] = 0.0

    def forward(self, x):
        return self.c(torch.relu(self.b(torch.relu(self.a(x)))).mean((2, 3)))


@pytest.mark.parametrize("importance", ["l1", "l2", "taylor", "fluctuation"])
def test_removing_zero_importance_channels_preserves_the_function(importance, x86):
    torch.manual_seed(0)
    dead = [1, 5, 9, 13]
    model = _DeadChannels(dead, []).eval()
    example = (torch.randn(4, 4, 6, 6),)
    calibration = [(torch.randn(4, 4, 6, 6),) for _ in range(2)]
    program = sparsecc.capture(model, example)
    result = _run(PruneChannels(sparsity=0.25, importance=importance, scope="group", reconstruct=False, skip="b"),
                  program, calibration, x86)
    shapes = {layer.name: tuple(layer.weight_shape) for layer in result.program.layers()}
    assert shapes["a"][0] == 12 and shapes["b"][1] == 12  # exactly the dead channels of a went
    x = torch.randn(4, 4, 6, 6)
    torch.testing.assert_close(result.program.run(x), program.run(x), atol=1e-5, rtol=1e-5)


def test_constant_channels_are_folded_into_the_readers_bias(x86):
    torch.manual_seed(0)
    model = _DeadChannels([], [0, 2, 4, 6]).eval()
    example = (torch.randn(4, 4, 6, 6),)
    calibration = [(torch.randn(4, 4, 6, 6),) for _ in range(2)]
    program = sparsecc.capture(model, example)
    x = torch.randn(4, 4, 6, 6)
    for reconstruct, tolerance in ((False, 1e-5), (True, 1e-3)):
        result = _run(PruneChannels(sparsity=0.25, importance="fluctuation", scope="group", reconstruct=reconstruct,
                                    skip="b"), program, calibration, x86)
        assert result.program.layer("a").weight_shape[0] == 12
        torch.testing.assert_close(result.program.run(x), program.run(x), atol=tolerance, rtol=tolerance)
    # the constant channels really matter: zeroing them instead changes the output
    with torch.no_grad():
        dense = program.run(x).clone()
        model.a.bias[[0, 2, 4, 6]] = 0.0
        assert not torch.allclose(model(x), dense, atol=1e-3)


def test_least_squares_beats_mean_compensation(x86):
    model, example, calibration = _coupled()
    program = sparsecc.capture(model, example)
    x = torch.randn(4, 3, 8, 8)
    dense = program.run(x)
    errors = {}
    for reconstruct in (False, True):
        pruned = _run(PruneChannels(sparsity=0.25, importance="l2", scope="group", reconstruct=reconstruct),
                      program, calibration, x86).program
        errors[reconstruct] = float((pruned.run(x) - dense).norm() / dense.norm())
    assert errors[True] < errors[False]


def test_global_scope_spends_the_same_budget_unevenly(x86):
    model, example, calibration = _coupled()
    program = sparsecc.capture(model, example)
    result = _run(PruneChannels(sparsity=0.25, importance="taylor"), program, calibration, x86)
    assert result.counters["channels_removed"] == round(0.25 * result.counters["channels_total"])


class _Attention(torch.nn.Module):
    """A pre-norm block with grouped-query attention (4 query heads over 2 key/value heads, head
    dim 8, a rotary-style slice-and-cat on the head dim) and a gated MLP."""

    def __init__(self) -> None:
        super().__init__()
        self.norm = torch.nn.LayerNorm(32)
        self.q = torch.nn.Linear(32, 32)
        self.k = torch.nn.Linear(32, 16)
        self.v = torch.nn.Linear(32, 16)
        self.o = torch.nn.Linear(32, 32)
        self.gate = torch.nn.Linear(32, 48)
        self.up = torch.nn.Linear(32, 48)
        self.down = torch.nn.Linear(48, 32)

    @staticmethod
    def _rotate(t):
        half = t.shape[-1] // 2
        return torch.cat([-t[..., half:], t[..., :half]], -1)

    def forward(self, x):
        b, n, _ = x.shape
        h = self.norm(x)
        q = self.q(h).view(b, n, 4, 8).transpose(1, 2)
        k = self.k(h).view(b, n, 2, 8).transpose(1, 2)
        v = self.v(h).view(b, n, 2, 8).transpose(1, 2)
        q, k = q + 0.5 * self._rotate(q), k + 0.5 * self._rotate(k)
        k, v = k.repeat_interleave(2, dim=1), v.repeat_interleave(2, dim=1)
        attention = torch.softmax(q @ k.transpose(-1, -2) / 8 ** 0.5, -1) @ v
        x = x + self.o(attention.transpose(1, 2).reshape(b, n, 32))
        h = self.norm(x)
        return x + self.down(torch.nn.functional.silu(self.gate(h)) * self.up(h))


def test_attention_heads_and_query_groups_are_pruned_whole(x86):
    model = seeded(_Attention()).eval()
    example = (torch.randn(2, 6, 32),)
    calibration = [(torch.randn(2, 6, 32),) for _ in range(4)]
    program = sparsecc.capture(model, example)
    text = ChannelGraph(program).describe()
    # one class per key/value head: its two query heads, its key and value rows, o's columns
    assert "[k, q, v] -> [o]: 2 channels" in text
    assert "[gate, up] -> [down]: 48 channels" in text
    result = _run(PruneChannels(sparsity=0.5, scope="group", importance="l2"), program, calibration, x86)
    shapes = {layer.name: tuple(layer.weight_shape) for layer in result.program.layers()}
    assert shapes["q"] == (16, 32) and shapes["k"] == (8, 32) and shapes["v"] == (8, 32)
    assert shapes["o"] == (32, 16) and shapes["gate"] == (24, 32) and shapes["down"] == (32, 24)
    x = torch.randn(2, 6, 32)
    dense, pruned = program.run(x), result.program.run(x)
    assert pruned.shape == dense.shape and float((pruned - dense).norm() / dense.norm()) < 0.5


def test_bad_options_are_refused(x86):
    model, example, calibration = _coupled()
    program = sparsecc.capture(model, example)
    with pytest.raises(WeightError, match="importance"):
        _run(PruneChannels(importance="random"), program, calibration, x86)
    with pytest.raises(WeightError, match=r"\[0, 1\)"):
        _run(PruneChannels(sparsity=1.0), program, calibration, x86)
    with pytest.raises(SparseccError, match="channel pruning removes whole channels"):
        sparsecc.compile(model, example, pattern="channel", refine="dsnot", calibration=calibration)


def test_compile_with_the_channel_pattern_builds_a_smaller_model():
    model, example, calibration = _coupled()
    artifact = sparsecc.compile(model, example, pattern="channel", sparsity=0.4, calibration=calibration,
                                progress=False)
    assert artifact.pipeline == "prune-channels{sparsity=0.4},pack,lower,build"
    assert artifact.report.compiled_vs_reference["rel"] < 1e-4
    reasons = {layer.name: layer.reason for layer in artifact.report.layers}
    assert reasons["heads"].startswith("output channels kept: sum")
    assert any(r.startswith("channel-pruned") for r in reasons.values())


@pytest.mark.slow
def test_mobilenet_v2_keeps_its_predictions_with_30_percent_fewer_channels(x86):
    mobilenet = mobilenet_or_skip()
    model = mobilenet.load_mobilenet_v2()
    crops = mobilenet.augmented_crops(64, seed=0)
    calibration = [(crops[i:i + 16],) for i in range(0, 64, 16)]
    evaluation = mobilenet.augmented_crops(64, seed=1000)
    program = sparsecc.capture(model, (evaluation[:16],))
    result = _run(PruneChannels(sparsity=0.3), program, calibration, x86)
    counters = result.counters
    assert counters["groups_pinned"] == 1 and counters["groups_pruned"] == 25  # pinned: the logits
    assert counters["channels_removed"] == round(0.3 * counters["channels_total"])
    assert counters["parameters_after"] < 0.8 * counters["parameters_before"]
    def logits(prog):
        return torch.cat([prog.run(evaluation[i:i + 16]) for i in range(0, len(evaluation), 16)])

    with torch.no_grad():
        scores = mobilenet.agreement(logits(result.program), logits(program))
    # measured here: top-1 0.78, top-5 1.0, KL 0.14 (64 calibration crops; 128 give 0.81 top-1)
    assert scores["top1"] >= 0.7 and scores["top5"] >= 0.9


def test_cli_channel_pattern_writes_a_smaller_artifact(tmp_path, capsys):
    from sparsecc.cli import main

    model, example, calibration = _coupled()
    model_path, calib_path, in_path = tmp_path / "model.pt2", tmp_path / "calib.pt", tmp_path / "in.pt"
    torch.export.save(torch.export.export(model, example), model_path)
    torch.save(calibration, calib_path)
    torch.save(example, in_path)
    out = tmp_path / "out"
    assert main(["compile", str(model_path), "--pattern", "channel", "--sparsity", "0.3", "--method", "magnitude",
                 "--calib", str(calib_path), "-o", str(out), "-q"]) == 0
    capsys.readouterr()
    assert main(["inspect", str(out), "--report"]) == 0
    report = capsys.readouterr().out
    assert "channel-pruned:" in report and "output channels kept: layer norm" in report
    for engine in ("compiled", "reference"):
        assert main(["run", str(out), "--inputs", str(in_path), "--output", str(tmp_path / f"{engine}.pt"),
                     "--engine", engine]) == 0
    compiled, reference = torch.load(tmp_path / "compiled.pt"), torch.load(tmp_path / "reference.pt")
    assert float((compiled - reference).norm() / reference.norm()) < 1e-4
    assert reference.shape == model(*example).shape
    assert main(["compile", str(model_path), "--pattern", "channel", "--allocation", "owl", "-o",
                 str(tmp_path / "x")]) == 2
    assert "channel pruning removes whole channels" in capsys.readouterr().err
