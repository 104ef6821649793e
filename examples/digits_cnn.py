"""Example: prune and compile the bundled digits CNN, and measure what it costs and gains.

Trains the small CNN on scikit-learn's digits (seeded, a few seconds, cached), then compiles it for
the host CPU twice with Wanda pruning calibrated on training images: 70 % unstructured and 70 %
``block16x1``. For each it prints the held-out accuracy of the dense model, of the pruned
(masked-dense) program and of the compiled model, and the latency of the compiled model against
dense PyTorch on the same batch, measured side by side. Finally it saves one artifact, loads it back
and checks the loaded copy gives the same outputs.

    python examples/digits_cnn.py [--sparsity 0.7] [--seed 0] [--out DIR]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import sparsecc
import torch
from sparsecc.timing import median_latency
from sparsecc.zoo import accuracy, train_digits_cnn

BATCH = 64
CALIBRATION_BATCHES = 8


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sparsity", type=float, default=0.7)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=None, help="where to save the block16x1 artifact")
    args = parser.parse_args(argv)

    start = time.perf_counter()
    model, data = train_digits_cnn(seed=args.seed)
    print(
        f"digits CNN ready in {time.perf_counter() - start:.1f} s "
        f"({sum(p.numel() for p in model.parameters())} parameters)"
    )
    test_x, test_y = data.test_images, data.test_labels
    dense_acc = accuracy(model, test_x, test_y, batch_size=BATCH)

    # A compiled model has a fixed input shape: compile for batches of BATCH images, and calibrate
    # on training images only (the test split is for measuring).
    example = (data.train_images[:BATCH].contiguous(),)
    calibration = [
        (data.train_images[i : i + BATCH].contiguous(),) for i in range(0, BATCH * CALIBRATION_BATCHES, BATCH)
    ]

    artifacts = {}
    for pattern in ("unstructured", "block16x1"):
        start = time.perf_counter()
        artifact = sparsecc.compile(
            model,
            example,
            target="x86",
            sparsity=args.sparsity,
            pattern=pattern,
            method="wanda",
            calibration=calibration,
            progress=False,
        )
        seconds = time.perf_counter() - start
        artifacts[pattern] = artifact
        print(f"\n=== {pattern} at {args.sparsity:.0%}, Wanda (compiled in {seconds:.1f} s) ===")
        print(artifact.report.summary())
        pruned_acc = accuracy(artifact.reference, test_x, test_y, batch_size=BATCH)
        compiled_acc = accuracy(artifact, test_x, test_y, batch_size=BATCH)
        print(
            f"held-out accuracy over {len(test_y)} images: dense {dense_acc:.2%}, "
            f"pruned {pruned_acc:.2%}, compiled {compiled_acc:.2%}"
        )

    x = example[0]
    with torch.no_grad():
        fns: dict[str, Callable[[], Any]] = {"torch dense": lambda: model(x)}
        for label, artifact in artifacts.items():
            fns[f"sparsecc {label}"] = lambda a=artifact: a(x)
        times = median_latency(fns)
    print(f"\nlatency per batch of {BATCH} (median, {torch.get_num_threads()} threads):")
    for name, seconds in times.items():
        print(f"  {name:24s} {seconds * 1e3:8.3f} ms   {times['torch dense'] / seconds:5.2f}x vs torch dense")

    # Save, load back, and check the loaded artifact computes the same thing.
    artifact = artifacts["block16x1"]
    with tempfile.TemporaryDirectory() as tmp:
        folder = artifact.save(args.out or Path(tmp) / "digits_block16x1")
        loaded = sparsecc.load(folder)
        same = torch.equal(torch.as_tensor(loaded(x)), torch.as_tensor(artifact(x)))
        where = folder if args.out else "a temporary folder"
        print(f"\nsaved to {where}; the loaded copy gives {'identical' if same else 'DIFFERENT'} outputs")
    return 0 if same else 1


if __name__ == "__main__":
    raise SystemExit(main())
