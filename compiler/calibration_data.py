"""Calibration batches read from files: text for language models, images for CNNs.

The batches come out shaped like the program's example input (same batch size, same sequence
length or image size), because an exported program is specialized to that shape.

* Text: files (or folders of ``.txt`` / ``.rst`` / ``.md`` files) tokenized with a Hugging Face
  ``tokenizer.json`` (the ``tokenizers`` package), then ``count`` windows of the example's length
  taken at seeded random places of the joined token stream.
* Images: image files (PNG, JPEG, ... via Pillow) or folders of them, converted to RGB or
  grayscale to match the example's channels, center-cropped and resized to its size, scaled to
  [0, 1] and normalized by ``mean`` / ``std``, grouped into batches of the example's size.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from pathlib import Path

import torch

from .errors import CalibrationError

TEXT_SUFFIXES = (".txt", ".rst", ".md")
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff")


def _expand(paths: Sequence[str | Path], suffixes: tuple[str, ...], kind: str) -> list[Path]:
    files: list[Path] = []
    for raw in paths:
        path = Path(raw)
        if path.is_dir():
            files += sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in suffixes)
        elif path.is_file():
            files.append(path)
        else:
            raise CalibrationError(f"calibration {kind} {path} does not exist")
    if not files:
        raise CalibrationError(f"no calibration {kind} files found in {', '.join(map(str, paths))} "
                               f"(looked for {', '.join(suffixes)})")
    return files


def _example_tensor(example_inputs: Sequence[object], kind: str) -> torch.Tensor:
    tensors = [t for t in example_inputs if isinstance(t, torch.Tensor)]
    if len(tensors) != 1:
        raise CalibrationError(f"{kind} calibration needs a model with one tensor input; this one takes "
                               f"{len(tensors)} (save a list of input tuples with torch.save and pass --calib)")
    return tensors[0]


def text_batches(paths: Sequence[str | Path], tokenizer_file: str | Path, example_inputs: Sequence[object], *,
                 count: int = 32, seed: int = 0) -> list[tuple[torch.Tensor]]:
    """``count`` token-id batches shaped like the example input (B, T), from the text files."""
    example = _example_tensor(example_inputs, "text")
    if example.dim() != 2 or example.dtype not in (torch.int64, torch.int32):
        raise CalibrationError(f"text calibration needs a (batch, tokens) integer input; the model takes "
                               f"{tuple(example.shape)} {example.dtype}")
    try:
        from tokenizers import Tokenizer
    except ImportError as exc:
        raise CalibrationError("text calibration needs the tokenizers package: pip install tokenizers") from exc
    if not Path(tokenizer_file).is_file():
        raise CalibrationError(f"tokenizer {tokenizer_file} is not a regular file; give the model's tokenizer.json")
    try:
        tokenizer = Tokenizer.from_file(str(tokenizer_file))
    except Exception as exc:  # noqa: BLE001 - the library raises plain exceptions for bad files
        raise CalibrationError(f"{tokenizer_file} is not a tokenizer.json the tokenizers package reads: "
                               f"{exc}") from None
    batch, length = example.shape
    ids: list[int] = []
    for path in _expand(paths, TEXT_SUFFIXES, "text"):
        ids += tokenizer.encode(path.read_text(encoding="utf-8", errors="replace")).ids
    if len(ids) <= length:
        raise CalibrationError(f"the calibration text holds {len(ids)} tokens; windows of {length} need more")
    rng = random.Random(seed)
    out = []
    for _ in range(count):
        starts = [rng.randrange(0, len(ids) - length) for _ in range(batch)]
        out.append((torch.tensor([ids[s:s + length] for s in starts], dtype=example.dtype),))
    return out


def image_batches(paths: Sequence[str | Path], example_inputs: Sequence[object], *,
                  mean: Sequence[float] = (0.485, 0.456, 0.406), std: Sequence[float] = (0.229, 0.224, 0.225),
                  count: int | None = None, seed: int = 0) -> list[tuple[torch.Tensor]]:
    """Image batches shaped like the example input (B, C, H, W), from the image files (all of
    them, in a seeded order, or the first ``count`` batches)."""
    example = _example_tensor(example_inputs, "image")
    if example.dim() != 4 or example.shape[1] not in (1, 3) or not example.dtype.is_floating_point:
        raise CalibrationError(f"image calibration needs a (batch, 1 or 3 channels, height, width) float input; "
                               f"the model takes {tuple(example.shape)} {example.dtype}")
    try:
        from PIL import Image
    except ImportError as exc:
        raise CalibrationError("image calibration needs Pillow: pip install pillow") from exc
    batch, channels, height, width = example.shape
    if len(mean) != channels or len(std) != channels:
        raise CalibrationError(f"mean and std need {channels} values (one per channel), got {len(mean)} and {len(std)}")
    files = _expand(paths, IMAGE_SUFFIXES, "image")
    random.Random(seed).shuffle(files)
    shift = torch.tensor(mean, dtype=torch.float32)[:, None, None]
    scale = torch.tensor(std, dtype=torch.float32)[:, None, None]
    images = []
    for path in files:
        try:
            with Image.open(path) as img:
                img = img.convert("RGB" if channels == 3 else "L")
                # center crop to the target's aspect ratio, then resize
                w, h = img.size
                crop_w, crop_h = min(w, round(h * width / height)), min(h, round(w * height / width))
                left, top = (w - crop_w) // 2, (h - crop_h) // 2
                img = img.crop((left, top, left + crop_w, top + crop_h)).resize((width, height), Image.BILINEAR)
                data = torch.frombuffer(bytearray(img.tobytes()), dtype=torch.uint8)
        except (OSError, ValueError, Image.DecompressionBombError) as exc:
            raise CalibrationError(f"calibration image {path} cannot be read ({type(exc).__name__}: "
                                   f"{str(exc).splitlines()[0][:160] if str(exc) else 'no detail'}); remove it or "
                                   "give another image") from None
        pixels = data.reshape(height, width, channels).permute(2, 0, 1).float() / 255.0
        images.append(((pixels - shift) / scale).to(example.dtype))
    if len(images) < batch:
        raise CalibrationError(f"{len(images)} calibration images fill no batch of {batch}; give at least {batch}")
    batches = [(torch.stack(images[i:i + batch]),) for i in range(0, len(images) - batch + 1, batch)]
    return batches[:count] if count else batches
