"""The whole path on the host: compile, run compiled code, save/load artifacts, the CLI, and a
real model (the digits CNN) with its held-out accuracy."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
import warnings

import pytest
import sparsecc
import torch
from sparsecc.cli import main as cli_main
from sparsecc.errors import ArtifactError


def _rel(a, b):
    return float((a - b).norm() / b.norm())


def _compile(model, example, calib, **kw):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return sparsecc.compile(model, example, target="x86", calibration=calib, progress=False, **kw)


@pytest.fixture(scope="module")
def mlp_artifact():
    from conftest import TinyMLP, seeded

    model = seeded(TinyMLP())
    gen = torch.Generator().manual_seed(1)
    example = (torch.randn(2, 3, 64, generator=gen),)
    calib = [(torch.randn(2, 3, 64, generator=gen),) for _ in range(4)]
    return model, example, _compile(model, example, calib, sparsity=0.5, pattern="block16x1")


@pytest.mark.parametrize("pattern, sparsity", [("unstructured", 0.7), ("block8x1", 0.5), ("2:4", 0.5),
                                               ("4:8", 0.5), ("unstructured", 0.0)])
def test_compiled_matches_masked_dense(mlp, pattern, sparsity):
    model, example, calib = mlp
    artifact = _compile(model, example, calib, sparsity=sparsity, pattern=pattern)
    x = torch.randn_like(example[0])
    assert _rel(artifact(x), artifact.reference(x)) < 1e-4
    assert _rel(artifact.packed(x), artifact.reference(x)) < 1e-6
    assert artifact.report.compiled_vs_reference["rel"] < 1e-4
    decisions = {lr.name: lr.decision for lr in artifact.report.layers}
    assert decisions["fc1"] == ("dense" if sparsity == 0 else "sparse")


def test_report_explains_dense_layers(mlp_artifact):
    _, _, artifact = mlp_artifact
    head = next(lr for lr in artifact.report.layers if lr.name == "head")
    assert head.decision == "dense" and "16x1 blocks" in head.reason
    text = artifact.report.summary()
    assert "head" in text and "kept dense" in text and "prune-wanda" in text


def test_artifact_round_trip(mlp_artifact, tmp_path):
    _, example, artifact = mlp_artifact
    out = artifact.save(tmp_path / "art")
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["target"] == "x86" and manifest["format_version"] == 2
    assert manifest["library"] == "model.so" and manifest["model_files"] == []
    assert {"model.so", "pruned.pt2", "packed.pt2", "plan.json", "packed_weights.safetensors"} <= set(manifest["files"])
    assert manifest["versions"]["torch"] == torch.__version__
    again = sparsecc.load(out)
    x = torch.randn_like(example[0])
    torch.testing.assert_close(again(x), artifact(x), rtol=0, atol=0)
    assert again.plan.to_json() == artifact.plan.to_json()
    # Saving again over an earlier artifact is allowed.
    artifact.save(out)
    # A version-1 manifest (before the compiled files were named in it) still loads: model.so.
    for key in ("library", "model_files"):
        del manifest[key]
    manifest["format_version"] = 1
    (out / "manifest.json").write_text(json.dumps(manifest))
    torch.testing.assert_close(sparsecc.load(out)(x), artifact(x), rtol=0, atol=0)


def test_damaged_artifacts_are_refused(mlp_artifact, tmp_path):
    _, _, artifact = mlp_artifact
    good = artifact.save(tmp_path / "good")

    def copy(name):
        dst = tmp_path / name
        shutil.copytree(good, dst)
        return dst

    truncated = copy("truncated")
    lib = truncated / "model.so"
    lib.write_bytes(lib.read_bytes()[: lib.stat().st_size // 2])
    with pytest.raises(ArtifactError, match="model.so is damaged"):
        sparsecc.load(truncated)
    missing = copy("missing")
    (missing / "packed.pt2").unlink()
    with pytest.raises(ArtifactError, match="packed.pt2 is missing"):
        sparsecc.load(missing)
    garbled = copy("garbled")
    (garbled / "manifest.json").write_text("{ not json")
    with pytest.raises(ArtifactError, match="not valid JSON"):
        sparsecc.load(garbled)
    other = copy("other-version")
    manifest = json.loads((other / "manifest.json").read_text())
    manifest["versions"]["apache-tvm"] = "0.1.0"
    (other / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ArtifactError, match="built with apache-tvm 0.1.0"):
        sparsecc.load(other)
    with pytest.raises(ArtifactError, match="manifest.json is missing"):
        sparsecc.load(tmp_path)


def test_save_never_overwrites_foreign_files(mlp_artifact, tmp_path):
    _, _, artifact = mlp_artifact
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("precious")
    with pytest.raises(ArtifactError, match="not a sparsecc artifact"):
        artifact.save(foreign)
    assert (foreign / "notes.txt").read_text() == "precious"
    mixed = artifact.save(tmp_path / "mixed")
    (mixed / "notes.txt").write_text("precious")
    with pytest.raises(ArtifactError, match="files sparsecc did not write"):
        artifact.save(mixed)
    assert (mixed / "notes.txt").read_text() == "precious"


def test_wrong_input_shape_at_run_time(mlp_artifact):
    _, _, artifact = mlp_artifact
    with pytest.raises(ArtifactError, match=r"compiled for \(2, 3, 64\)"):
        artifact(torch.randn(4, 3, 64))


def test_cli_end_to_end(mlp, tmp_path, capsys):
    model, example, calib = mlp
    model_path, calib_path, in_path = tmp_path / "model.pt2", tmp_path / "calib.pt", tmp_path / "in.pt"
    torch.export.save(torch.export.export(model, example), model_path)
    torch.save(calib, calib_path)
    torch.save(example, in_path)
    out = tmp_path / "out"
    assert cli_main(["compile", str(model_path), "--target", "x86", "--sparsity", "0.7", "--pattern",
                     "unstructured", "--method", "wanda", "--calib", str(calib_path), "-o", str(out), "-q"]) == 0
    assert "artifact written" in capsys.readouterr().out
    for engine in ("compiled", "reference"):
        assert cli_main(["run", str(out), "--inputs", str(in_path), "--output", str(tmp_path / f"{engine}.pt"),
                         "--engine", engine]) == 0
    compiled, reference = torch.load(tmp_path / "compiled.pt"), torch.load(tmp_path / "reference.pt")
    assert _rel(compiled, reference) < 1e-4
    capsys.readouterr()
    assert cli_main(["inspect", str(out), "--stage", "packed"]) == 0
    text = capsys.readouterr().out
    assert "sparsecc.sparse_linear_csr" in text
    assert re.search(r"# sparse: unstructured 70\.3% csr nnz=\d+", text)
    assert cli_main(["inspect", str(out), "--diff"]) == 0
    assert "+%sparse_linear_csr" in capsys.readouterr().out
    assert cli_main(["inspect", str(out), "--format", "dot"]) == 0
    assert "digraph" in capsys.readouterr().out
    assert cli_main(["inspect", str(out), "--report"]) == 0
    assert "sparsecc report: target x86" in capsys.readouterr().out
    # Bad input: a clear one-line error and exit status 2, the folder left as it was.
    assert cli_main(["compile", str(model_path), "--sparsity", "1.2", "-o", str(tmp_path / "x")]) == 2
    assert "outside [0, 1)" in capsys.readouterr().err
    assert cli_main(["compile", str(model_path), "--pattern", "2:4", "--sparsity", "0.5", "-o", str(in_path)]) == 2
    assert "not a folder" in capsys.readouterr().err


def test_console_script_lists_targets_and_passes():
    out = subprocess.run([sys.executable, "-m", "sparsecc.cli", "targets"], capture_output=True, text=True,
                         check=True).stdout
    names = [line.split()[0] for line in out.splitlines() if line.strip()]
    assert "x86" in names and "wasm-simd" in names and "arm-neon" in names
    out = subprocess.run([sys.executable, "-m", "sparsecc.cli", "passes"], capture_output=True, text=True,
                         check=True).stdout
    assert "prune-wanda" in out and "pack" in out


@pytest.mark.slow
@pytest.mark.parametrize("pattern", ["unstructured", "block16x1"])
def test_digits_cnn_keeps_accuracy_and_compiled_agrees(pattern):
    from sparsecc.zoo.digits import accuracy, train_digits_cnn

    model, data = train_digits_cnn(seed=0)
    batch = 64
    example = (data.train_images[:batch].contiguous(),)
    calib = [(data.train_images[i:i + batch].contiguous(),) for i in range(0, batch * 8, batch)]
    artifact = _compile(model, example, calib, sparsity=0.7, pattern=pattern, method="wanda")
    dense = accuracy(model, data.test_images, data.test_labels, batch_size=batch)
    pruned = accuracy(artifact.reference, data.test_images, data.test_labels, batch_size=batch)
    compiled = accuracy(artifact, data.test_images, data.test_labels, batch_size=batch)
    assert dense >= 0.97
    assert pruned >= dense - 0.015, f"Wanda {pattern} 70 %: {pruned:.3f} vs dense {dense:.3f}"
    assert compiled == pruned
    x = data.test_images[:batch].contiguous()
    assert _rel(artifact(x), artifact.reference(x)) < 1e-4
    assert sum(lr.decision == "sparse" for lr in artifact.report.layers) >= 2
