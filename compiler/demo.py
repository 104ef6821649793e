"""``sparsecc demo``: compile the bundled digits CNN for the host and show what it gains.

Trains the small CNN on scikit-learn's digits (seeded, a few seconds, cached), compiles it with
Wanda pruning calibrated on training images, then prints held-out accuracy of the dense model,
the masked-dense model and the compiled model, the weight bytes before and after packing, and
latency of the compiled model against dense torch and against sparsecc's own dense build, all
measured side by side in one run.
"""

from __future__ import annotations

import warnings

import torch

DEMO_BATCH = 64


def run_demo(pattern: str = "block16x1", sparsity: float = 0.7, output: str | None = None) -> int:
    from . import compile as compile_model
    from .timing import median_latency
    from .zoo.digits import accuracy, train_digits_cnn

    torch.manual_seed(0)
    print("training the digits CNN (scikit-learn digits, seeded) ...")
    model, data = train_digits_cnn(seed=0)
    model.eval()
    example = (data.train_images[:DEMO_BATCH].contiguous(),)
    calibration = [(data.train_images[i:i + DEMO_BATCH].contiguous(),)
                   for i in range(0, DEMO_BATCH * 8, DEMO_BATCH)]
    print(f"compiling for x86: {pattern} at {sparsity:.0%}, Wanda, {len(calibration)} calibration batches")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        artifact = compile_model(model, example, target="x86", sparsity=sparsity, pattern=pattern,
                                 method="wanda", calibration=calibration, progress=False)
        dense_build = compile_model(model, example, target="x86", sparsity=0.0, calibration=calibration,
                                    progress=False)
    print(artifact.report.summary())

    acc_dense = accuracy(model, data.test_images, data.test_labels, batch_size=DEMO_BATCH)
    acc_pruned = accuracy(artifact.reference, data.test_images, data.test_labels, batch_size=DEMO_BATCH)
    acc_compiled = accuracy(artifact, data.test_images, data.test_labels, batch_size=DEMO_BATCH)
    x = example[0]
    with torch.no_grad():
        times = median_latency({
            "torch dense": lambda: model(x),
            "sparsecc dense build": lambda: dense_build(x),
            "sparsecc sparse": lambda: artifact(x),
        })
    dense_bytes, packed_bytes = artifact.report.weight_bytes
    print(f"held-out accuracy ({len(data.test_labels)} images): dense {acc_dense:.2%}, "
          f"pruned {acc_pruned:.2%}, compiled {acc_compiled:.2%}")
    print(f"prunable weights: {dense_bytes / 1024:.1f} KiB dense -> {packed_bytes / 1024:.1f} KiB packed")
    print(f"latency per batch of {DEMO_BATCH} (median, {torch.get_num_threads()} threads):")
    base = times["torch dense"]
    for name, seconds in times.items():
        print(f"  {name:22s} {seconds * 1e3:8.3f} ms   speedup vs torch dense {base / seconds:5.2f}x")
    print(f"  compiled sparse vs sparsecc dense build: {times['sparsecc dense build'] / times['sparsecc sparse']:.2f}x")
    if output:
        print(f"artifact written to {artifact.save(output)}")
    return 0
