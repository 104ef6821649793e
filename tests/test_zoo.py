"""Tests of the bundled real models: the digits CNN (always) and all-MiniLM-L6-v2 (when installed)."""

from __future__ import annotations

import os

import pytest
import torch
from real_data import minilm_or_skip, mobilenet_or_skip, smollm_or_skip
from sparsecc.zoo import (
    DigitsCNN,
    accuracy,
    cosine_to_reference,
    load_digits_data,
    rank_correlation,
    train_digits_cnn,
)
from sparsecc.zoo import digits as digits_mod
from sparsecc.zoo import minilm as minilm_mod


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """One full training run with the default recipe, cached in a private folder (so the first
    call really trains rather than reading a cache left by an earlier session)."""
    old = os.environ.get("SPARSECC_CACHE")
    os.environ["SPARSECC_CACHE"] = str(tmp_path_factory.mktemp("cache"))
    try:
        yield train_digits_cnn(seed=0)
    finally:
        if old is None:
            del os.environ["SPARSECC_CACHE"]
        else:
            os.environ["SPARSECC_CACHE"] = old


def test_digits_split_is_fixed_and_stratified():
    a, b = load_digits_data(0), load_digits_data(0)
    assert torch.equal(a.train_images, b.train_images) and torch.equal(a.test_labels, b.test_labels)
    assert a.train_images.shape[1:] == (1, 8, 8) and a.train_images.dtype == torch.float32
    assert a.train_labels.dtype == torch.int64
    assert a.train_images.shape[0] + a.test_images.shape[0] == 1797
    assert a.test_images.shape[0] == 450  # 25 %
    # Stratified: every class is in the test split in about its overall share (~10 %).
    counts = torch.bincount(a.test_labels, minlength=10)
    assert counts.min() >= 40 and counts.max() <= 50
    # Standardised with the training split's statistics.
    assert abs(float(a.train_images.mean())) < 1e-4 and abs(float(a.train_images.std()) - 1) < 1e-3
    assert not torch.equal(load_digits_data(1).test_labels, a.test_labels)


def test_digits_cnn_shape_and_size():
    model = DigitsCNN()
    assert model(torch.zeros(3, 1, 8, 8)).shape == (3, 10)
    assert 540_000 <= sum(p.numel() for p in model.parameters()) <= 560_000
    # The layers the pack pass can sparsify tile 16x1 blocks: outputs % 16, inputs % 8, and have
    # at least the 64 inputs per output the planner asks for.
    for layer in (model.pointwise, model.fc1):
        out_features, in_features = layer.weight.shape[:2]
        assert out_features % 16 == 0 and in_features % 8 == 0 and in_features >= 64
    assert model.pointwise.kernel_size == (1, 1)


def test_digits_training_is_deterministic():
    data = load_digits_data(3)
    m1, _ = train_digits_cnn(seed=3, epochs=2, data=data, use_cache=False)
    m2, _ = train_digits_cnn(seed=3, epochs=2, data=data, use_cache=False)
    s1, s2 = m1.state_dict(), m2.state_dict()
    assert s1.keys() == s2.keys()
    assert all(torch.equal(s1[k], s2[k]) for k in s1)
    m3, _ = train_digits_cnn(seed=4, epochs=2, data=data, use_cache=False)
    assert not torch.equal(m3.fc1.weight, m1.fc1.weight)


def test_digits_cnn_reaches_97_percent(trained):
    model, data = trained
    assert not model.training
    acc = accuracy(model, data.test_images, data.test_labels)
    assert acc >= 0.97, f"held-out accuracy {acc:.4f} < 0.97"


def test_digits_cache_roundtrip(trained):
    model, data = trained
    path = digits_mod._cache_path(0, digits_mod.DEFAULT_EPOCHS, data)
    assert path.is_file()
    again, _ = train_digits_cnn(seed=0, data=data)  # served from the cache
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), again.state_dict().values(), strict=True))


def test_digits_unwritable_cache_is_not_an_error(tmp_path, monkeypatch):
    blocker = tmp_path / "not_a_dir"
    blocker.write_text("x")
    # A cache "directory" below a regular file cannot be created, even by root.
    monkeypatch.setenv("SPARSECC_CACHE", str(blocker / "cache"))
    model, _ = train_digits_cnn(seed=0, epochs=1)
    assert isinstance(model, DigitsCNN)


def test_digits_damaged_cache_is_retrained(tmp_path, monkeypatch):
    monkeypatch.setenv("SPARSECC_CACHE", str(tmp_path))
    data = load_digits_data(0)
    digits_mod._cache_path(0, 1, data).write_bytes(b"not a checkpoint")
    model, _ = train_digits_cnn(seed=0, epochs=1, data=data)
    fresh, _ = train_digits_cnn(seed=0, epochs=1, data=data, use_cache=False)
    assert torch.equal(model.fc2.weight, fresh.fc2.weight)


def test_accuracy_pads_to_a_fixed_batch(trained):
    model, data = trained
    seen = []

    def fixed_batch(x: torch.Tensor) -> tuple[torch.Tensor]:
        # Like a compiled artifact: accepts only one batch size, returns a tuple.
        assert x.shape[0] == 64
        seen.append(x.shape[0])
        return (model(x),)

    n = 450  # 7 full batches and a last one of 2
    expected = accuracy(model, data.test_images[:n], data.test_labels[:n], batch_size=n)
    assert accuracy(fixed_batch, data.test_images[:n], data.test_labels[:n], batch_size=64) == expected
    assert len(seen) == 8
    with pytest.raises(ValueError):
        accuracy(model, data.test_images[:3], data.test_labels[:2])


def test_digits_cnn_exports_identically(trained):
    model, data = trained
    x = data.test_images[:64]
    program = torch.export.export(model, (x,))
    with torch.no_grad():
        assert torch.equal(program.module()(x), model(x))
    convs = [n for n in program.graph.nodes if n.op == "call_function" and "conv2d" in str(n.target)]
    linears = [n for n in program.graph.nodes if n.op == "call_function" and "linear" in str(n.target)]
    assert len(convs) == 3 and len(linears) == 2


def test_similarity_helpers():
    a = torch.nn.functional.normalize(torch.randn(6, 8, generator=torch.Generator().manual_seed(0)), dim=-1)
    assert cosine_to_reference(a, a) == pytest.approx(1.0, abs=1e-6)
    assert cosine_to_reference(a, -a) == pytest.approx(-1.0, abs=1e-6)
    x = torch.tensor([0.1, 0.5, 0.3, 0.9])
    assert rank_correlation(x, x * 2 + 1) == pytest.approx(1.0)
    assert rank_correlation(x, -x) == pytest.approx(-1.0)
    with pytest.raises(ValueError):
        cosine_to_reference(a, a[:3])


@pytest.mark.slow
@pytest.mark.models
def test_minilm_loads_encodes_and_exports():
    minilm_or_skip()
    embedder, tokenizer = minilm_mod.load_minilm_embedder()
    assert 22_000_000 < sum(p.numel() for p in embedder.parameters()) < 23_000_000
    sentences = minilm_mod.SENTENCES
    assert len(sentences) >= 16
    # The default length fits every bundled sentence, so nothing is truncated.
    assert max(minilm_mod.token_counts(tokenizer, sentences)) <= minilm_mod.DEFAULT_LENGTH
    calibration = minilm_mod.CALIBRATION_SENTENCES
    assert len(calibration) == len(sentences) and not set(calibration) & set(sentences)
    assert max(minilm_mod.token_counts(tokenizer, calibration)) <= minilm_mod.DEFAULT_LENGTH
    ids, mask = minilm_mod.encode(tokenizer, sentences)
    assert ids.shape == mask.shape == (len(sentences), minilm_mod.DEFAULT_LENGTH)
    assert ids.dtype == mask.dtype == torch.int64
    assert tokenizer.padding is None or tokenizer.padding.get("length") == 128  # caller's copy untouched

    with torch.no_grad():
        emb = embedder(ids, mask)
        # Padding is masked out: a longer fixed length gives the same embeddings.
        longer = embedder(*minilm_mod.encode(tokenizer, sentences, length=48))
    assert emb.shape == (len(sentences), 384)
    assert torch.allclose(emb.norm(dim=-1), torch.ones(len(sentences)), atol=1e-5)
    assert cosine_to_reference(emb, longer) > 0.99999

    # The weights are real: paraphrases score far above unrelated sentences.
    sims = minilm_mod.pair_similarities(emb)
    paraphrase = sims[[0, 1, 2, 5, 6, 11]]
    unrelated = sims[[8, 10]]
    assert paraphrase.min() > 0.45 and unrelated.max() < 0.2

    # Truncation keeps [CLS] ... [SEP].
    short_ids, short_mask = minilm_mod.encode(tokenizer, sentences[:2], length=6)
    assert short_ids[:, 0].eq(101).all() and short_ids[:, -1].eq(102).all() and short_mask.all()

    program = torch.export.export(embedder, (ids, mask), strict=False)
    with torch.no_grad():
        exported = program.module()(ids, mask)
    assert torch.equal(exported, emb)


# A paragraph of English prose about Python, the kind of text SmolLM2 was trained on; the dense
# model's perplexity on it is about 10. A wrong head order in the query/key weights (the GGUF
# rotary layout) or a wrong norm gives hundreds or more.
PYTHON_PROSE = (
    "Python is an easy to learn, powerful programming language. It has efficient high-level data "
    "structures and a simple but effective approach to object-oriented programming. Python's elegant "
    "syntax and dynamic typing, together with its interpreted nature, make it an ideal language for "
    "scripting and rapid application development in many areas on most platforms."
)


@pytest.mark.slow
@pytest.mark.models
def test_smollm_is_the_real_model_and_exports_identically():
    smollm_mod = smollm_or_skip()
    model = smollm_mod.load_smollm(max_seq=128)
    assert sum(p.numel() for p in model.parameters()) == 134_515_008
    tokenizer = smollm_mod.load_tokenizer()
    ids = torch.tensor([tokenizer(PYTHON_PROSE).input_ids])
    with torch.no_grad():
        logits = model(ids)
    nll = torch.nn.functional.cross_entropy(logits[0, :-1], ids[0, 1:])
    perplexity = float(nll.exp())
    assert 2 < perplexity < 30, f"perplexity {perplexity:.1f} on plain Python prose: the weights are misread"
    example = smollm_mod.example_ids(32)
    exported = torch.export.export(model, (example,), strict=False)
    with torch.no_grad():
        assert torch.equal(exported.module()(example), model(example))


@pytest.mark.models
def test_mobilenet_v2_is_the_real_pretrained_model():
    mobilenet = mobilenet_or_skip()
    model = mobilenet.load_mobilenet_v2()
    assert sum(p.numel() for p in model.parameters()) == 3_504_872  # torchvision's count
    photos = mobilenet.photos()
    mean = torch.tensor(mobilenet.IMAGENET_MEAN)[:, None, None]
    std = torch.tensor(mobilenet.IMAGENET_STD)[:, None, None]
    whole = torch.stack([(torch.nn.functional.interpolate(p[None], size=(224, 224), mode="bilinear")[0] - mean) / std
                         for p in photos])
    with torch.no_grad():
        logits = model(whole)
    # scikit-learn's first photo is a Chinese temple: ImageNet class 698 is "palace"
    assert int(logits[0].argmax()) == 698 and float(logits[0].softmax(-1).max()) > 0.3
    crops = mobilenet.augmented_crops(6, seed=1)
    assert crops.shape == (6, 3, 224, 224) and torch.equal(crops, mobilenet.augmented_crops(6, seed=1))
    with torch.no_grad():
        dense = model(crops)
    same = mobilenet.agreement(dense, dense)
    assert same["top1"] == same["top5"] == 1.0 and abs(same["kl"]) < 1e-6
    noisy = mobilenet.agreement(dense + 3 * torch.randn_like(dense), dense)
    assert noisy["kl"] > 0.01 and noisy["top5"] >= noisy["top1"]
