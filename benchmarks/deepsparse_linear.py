"""DeepSparse on single sparse linear layers, beside ONNX Runtime dense in the same run.

DeepSparse 1.8.0 (the last release that installs) needs onnx<1.15 and numpy<2, which conflict
with sparsecc's own dependencies, so this script runs in a separate virtual environment and
imports nothing from sparsecc (only the ONNX model builder of ``linear.py``):

    python -m venv /opt/ds-venv
    /opt/ds-venv/bin/pip install deepsparse==1.8.0 "onnx<1.15" "numpy<2" onnxruntime
    /opt/ds-venv/bin/python benchmarks/deepsparse_linear.py --threads 1

For each weight shape (N, K), rows of x M and sparsity it builds one ONNX model, y = x @ W.T + b
with W magnitude-pruned (unstructured, random normal values, as ``linear.py`` draws them), and
times DeepSparse's engine on the pruned model and ONNX Runtime on the dense one, interleaved in
round-robin blocks. The ratio ``DeepSparse / ORT dense`` is the number to put beside
``linear.py``'s ``xORT`` column for the same cell: both divide by ONNX Runtime's dense time measured
in their own run.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from linear import onnx_linear_model  # noqa: E402  (numpy and onnx only; no sparsecc import)

SHAPES = [(768, 768), (3072, 768), (768, 3072), (4096, 4096)]


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--shapes", help="comma-separated NxK, default: the four transformer shapes")
    p.add_argument("--m", default="128", help="comma-separated rows of x")
    p.add_argument("--sparsities", default="0.5,0.7,0.9")
    p.add_argument("--rounds", type=int, default=15)
    return p.parse_args()


def _interleave(fns: dict, rounds: int, block_seconds: float = 0.02) -> dict[str, float]:
    per_block = {}
    for name, fn in fns.items():
        for _ in range(3):
            fn()
        start = time.perf_counter()
        fn()
        per_block[name] = max(1, round(block_seconds / max(time.perf_counter() - start, 1e-7)))
    samples: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            start = time.perf_counter()
            for _ in range(per_block[name]):
                fn()
            samples[name].append((time.perf_counter() - start) / per_block[name])
    return {name: statistics.median(v) for name, v in samples.items()}


def main() -> int:
    args = parse_args()
    import numpy as np
    import onnx
    import onnxruntime as ort
    from deepsparse import Engine

    shapes = ([tuple(int(v) for v in s.split("x")) for s in args.shapes.split(",")] if args.shapes else SHAPES)
    ms = [int(v) for v in args.m.split(",")]
    sparsities = [float(v) for v in args.sparsities.split(",")]
    print(f"threads {args.threads}; onnxruntime {ort.__version__}; load average {os.getloadavg()[0]:.2f}")
    print(f"{'N x K':>11} {'M':>4} {'sp':>4} | {'DeepSparse us':>13} {'ORT dense us':>12} | {'DS xORT':>7} "
          f"{'DS GFLOP/s':>10}")
    rng = np.random.default_rng(0)
    with tempfile.TemporaryDirectory() as tmp:
        for n_out, k in shapes:
            for m in ms:
                x = rng.standard_normal((m, k)).astype(np.float32)
                dense = rng.standard_normal((n_out, k)).astype(np.float32)
                bias = rng.standard_normal(n_out).astype(np.float32)
                opts = ort.SessionOptions()
                opts.intra_op_num_threads = args.threads
                opts.inter_op_num_threads = 1
                dense_sess = ort.InferenceSession(onnx_linear_model(dense, bias, m).SerializeToString(), opts,
                                                  providers=["CPUExecutionProvider"])
                for sparsity in sparsities:
                    w = rng.standard_normal((n_out, k)).astype(np.float32)
                    cut = np.sort(np.abs(w), axis=None)[int(round(w.size * sparsity)) - 1]
                    w[np.abs(w) <= cut] = 0
                    path = os.path.join(tmp, f"sparse_{n_out}_{k}_{m}_{sparsity}.onnx")
                    onnx.save(onnx_linear_model(w, bias, m), path)
                    engine = Engine(path, batch_size=m, num_cores=args.threads)
                    got = engine([x])[0]
                    ref = x.astype(np.float64) @ w.astype(np.float64).T + bias
                    err = float(np.abs(got - ref).max())
                    if err > 1e-3 * max(1.0, float(np.abs(ref).max())):
                        raise SystemExit(f"DeepSparse output is off by {err:.3g} at {n_out}x{k} M={m}")
                    times = _interleave({"ds": lambda engine=engine, x=x: engine([x]),
                                         "ort": lambda sess=dense_sess, x=x: sess.run(None, {"x": x})}, args.rounds)
                    nnz = int(np.count_nonzero(w))
                    print(f"{n_out:>5}x{k:<5} {m:>4} {int(sparsity * 100):>3}% | {times['ds'] * 1e6:13.1f} "
                          f"{times['ort'] * 1e6:12.1f} | {times['ort'] / times['ds']:7.2f} "
                          f"{2 * m * nnz / times['ds'] / 1e9:10.1f}", flush=True)
    print(f"load average after {os.getloadavg()[0]:.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
