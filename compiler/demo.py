"""``sparsecc demo``: compile the bundled digits CNN for the host and show what it gains.

Trains the small CNN on scikit-learn's digits (seeded, a few seconds, cached), compiles it with
Wanda pruning calibrated on training images, then prints held-out accuracy of the dense model,
the masked-dense model and the compiled model, the weight bytes before and after packing, and
latency of the compiled model against dense torch, ONNX Runtime and sparsecc's own dense build, all
measured side by side in one run.
"""

from __future__ import annotations

import warnings

import torch

DEMO_BATCH = 64


def run_demo(pattern: str = "block16x1", sparsity: float = 0.7, output: str | None = None, threads: int = 1) -> int:
    """Train, compile and compare; ``threads`` sets torch's and TVM's thread counts alike (both
    runtimes spin-wait between calls, so timing them side by side with more threads than free
    cores measures their contention, not their speed)."""
    import os
    import sys

    if "tvm" in sys.modules:
        print("note: TVM was imported before the demo started; its thread pool keeps the size it has")
    os.environ["TVM_NUM_THREADS"] = str(threads)
    torch.set_num_threads(threads)
    from . import compile as compile_model
    from .baselines import onnxruntime_dense
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
    ort_dense = onnxruntime_dense(model, example, threads=threads)
    acc_ort = accuracy(lambda batch: ort_dense(batch)[0], data.test_images, data.test_labels, batch_size=DEMO_BATCH)
    with torch.no_grad():
        times = median_latency({
            "torch dense": lambda: model(x),
            "ONNX Runtime dense": lambda: ort_dense(x),
            "sparsecc dense build": lambda: dense_build(x),
            "sparsecc sparse": lambda: artifact(x),
        })
    dense_bytes, packed_bytes = artifact.report.weight_bytes
    print(f"held-out accuracy ({len(data.test_labels)} images): dense {acc_dense:.2%}, "
          f"ONNX Runtime dense {acc_ort:.2%}, pruned {acc_pruned:.2%}, compiled {acc_compiled:.2%}")
    print(f"prunable weights: {dense_bytes / 1024:.1f} KiB dense -> {packed_bytes / 1024:.1f} KiB as compiled")
    print(f"latency per batch of {DEMO_BATCH} (median of interleaved runs, {threads} thread(s) for torch and "
          f"sparsecc; load average {os.getloadavg()[0]:.2f}):")
    base, bar = times["torch dense"], times["ONNX Runtime dense"]
    for name, seconds in times.items():
        print(f"  {name:22s} {seconds * 1e3:8.3f} ms   vs torch dense {base / seconds:5.2f}x   "
              f"vs ONNX Runtime dense {bar / seconds:5.2f}x")
    print(f"  compiled sparse vs sparsecc dense build: {times['sparsecc dense build'] / times['sparsecc sparse']:.2f}x")
    if output:
        print(f"artifact written to {artifact.save(output)}")
    return 0
