"""Calibration batches from files: text through a tokenizer.json, images through Pillow, both
shaped like the program's example input; bad input gets a clear error."""

from __future__ import annotations

import pytest
import sparsecc
import torch
from sparsecc.calibration_data import image_batches, text_batches
from sparsecc.errors import CalibrationError


@pytest.fixture
def tokenizer_file(tmp_path):
    import tokenizers  # the models extra, which the README's test command installs
    from tokenizers import models, pre_tokenizers

    vocab = {"[UNK]": 0, **{w: i + 1 for i, w in enumerate("the cat sat on a mat and dog ran".split())}}
    tok = tokenizers.Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    path = tmp_path / "tokenizer.json"
    tok.save(str(path))
    return path


def test_text_windows_follow_the_example_shape(tmp_path, tokenizer_file):
    docs = tmp_path / "docs"
    docs.mkdir()
    (docs / "a.txt").write_text("the cat sat on a mat " * 20)
    (docs / "b.md").write_text("a dog ran and the cat sat " * 20)
    (docs / "skip.bin").write_bytes(b"\x00\x01")
    example = (torch.zeros(2, 8, dtype=torch.int64),)
    batches = text_batches([docs], tokenizer_file, example, count=5, seed=3)
    assert len(batches) == 5 and all(b[0].shape == (2, 8) and b[0].dtype == torch.int64 for b in batches)
    assert int(torch.cat([b[0] for b in batches]).min()) >= 1  # every word is in the vocabulary
    assert all(torch.equal(a[0], b[0]) for a, b in zip(batches, text_batches([docs], tokenizer_file, example,
                                                                               count=5, seed=3), strict=True))
    with pytest.raises(CalibrationError, match="windows of 8 need more"):
        (tmp_path / "short.txt").write_text("the cat")
        text_batches([tmp_path / "short.txt"], tokenizer_file, example)
    with pytest.raises(CalibrationError, match="integer input"):
        text_batches([docs], tokenizer_file, (torch.zeros(2, 8),))
    with pytest.raises(CalibrationError, match="does not exist"):
        text_batches([tmp_path / "missing"], tokenizer_file, example)


def test_images_are_cropped_resized_and_normalized(tmp_path):
    from PIL import Image as image
    for i, size in enumerate([(40, 20), (16, 16), (10, 30), (25, 25)]):
        image.new("RGB", size, (255, 0, 128 + i)).save(tmp_path / f"{i}.png")
    (tmp_path / "notes.txt").write_text("not an image")
    example = (torch.zeros(2, 3, 8, 8),)
    batches = image_batches([tmp_path], example, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))
    assert len(batches) == 2 and all(b[0].shape == (2, 3, 8, 8) for b in batches)
    pixels = torch.cat([b[0] for b in batches])
    torch.testing.assert_close(pixels[:, 0], torch.ones(4, 8, 8))  # red 255 -> (1 - 0.5) / 0.5
    torch.testing.assert_close(pixels[:, 1], -torch.ones(4, 8, 8))
    gray = image_batches([tmp_path], (torch.zeros(4, 1, 8, 8),), mean=(0.0,), std=(1.0,))
    assert gray[0][0].shape == (4, 1, 8, 8)
    (tmp_path / "broken.png").write_bytes(b"\x89PNG not really")
    with pytest.raises(CalibrationError, match="broken.png cannot be read"):
        image_batches([tmp_path], example)
    with pytest.raises(CalibrationError, match="fill no batch of 8"):
        image_batches([tmp_path / "0.png"], (torch.zeros(8, 3, 8, 8),))


def test_cli_compiles_with_text_calibration(tmp_path, tokenizer_file, capsys):
    from sparsecc.cli import main

    class TinyLM(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.embed = torch.nn.Embedding(16, 64)
            self.fc = torch.nn.Linear(64, 64)

        def forward(self, ids):
            return self.fc(self.embed(ids))

    exported = torch.export.export(TinyLM().eval(), (torch.zeros(1, 8, dtype=torch.int64),))
    torch.export.save(exported, tmp_path / "lm.pt2")
    (tmp_path / "text.txt").write_text("the dog ran on a mat and the cat sat " * 30)
    status = main(["compile", str(tmp_path / "lm.pt2"), "--sparsity", "0.5", "--pattern", "unstructured",
                   "--calib-text", str(tmp_path / "text.txt"), "--tokenizer", str(tokenizer_file),
                   "--calib-batches", "4", "-q", "-o", str(tmp_path / "out")])
    assert status == 0
    artifact = sparsecc.load(tmp_path / "out")
    assert [lr.name for lr in artifact.report.layers if lr.decision == "sparse"] == ["fc"]
    assert "no --calib given" not in capsys.readouterr().err
