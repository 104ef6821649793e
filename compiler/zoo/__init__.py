"""Real models and data for sparsecc's demos, tests and benchmarks.

``digits`` is a small CNN trained in seconds on scikit-learn's bundled digits (always available);
``minilm`` is the pretrained all-MiniLM-L6-v2 sentence encoder from an optional offline package.
Importing this package does not import transformers: MiniLM loads only when asked for.
"""

from .digits import (
    DigitsCNN,
    DigitsData,
    accuracy,
    load_digits_data,
    train_digits_cnn,
)
from .minilm import (
    CALIBRATION_SENTENCES,
    SENTENCE_PAIRS,
    SENTENCES,
    MiniLMEmbedder,
    cosine_to_reference,
    encode,
    load_minilm,
    load_minilm_embedder,
    minilm_available,
    pair_similarities,
    rank_correlation,
)

__all__ = [
    "CALIBRATION_SENTENCES",
    "DigitsCNN",
    "DigitsData",
    "MiniLMEmbedder",
    "SENTENCES",
    "SENTENCE_PAIRS",
    "accuracy",
    "cosine_to_reference",
    "encode",
    "load_digits_data",
    "load_minilm",
    "load_minilm_embedder",
    "minilm_available",
    "pair_similarities",
    "rank_correlation",
    "train_digits_cnn",
]
