"""WebAssembly kernel benchmark: sparsecc's sparse kernels for the ``wasm-simd`` target against
sparsecc's dense kernel for the same target, all run in wasmtime (wasm32 + simd128, 1 thread).

For each (M, pattern) every kernel is built to its own ``.wasm``, loaded into wasmtime with its
arguments copied into linear memory once, checked against the float64 masked-dense product, and
then timed with :func:`sparsecc.targets.runners.wasm.interleaved_median` (round-robin samples of
every kernel of the group, median per kernel), so each ratio compares numbers taken side by side.
Call overhead from Python into wasmtime (a few microseconds) is inside every sample.

    python benchmarks/wasm_kernels.py --shape 3072x768 --m 1,8 --patterns unstructured,block16x1 \\
        --sparsity 0.7
"""

from __future__ import annotations

import argparse
import os
import tempfile

import numpy as np


def _mask(rng: np.random.Generator, shape: tuple[int, int], pattern: str, sparsity: float) -> np.ndarray:
    n, k = shape
    if pattern == "unstructured":
        return rng.random(shape) >= sparsity
    if pattern.startswith("block"):
        r, c = (int(v) for v in pattern[len("block"):].split("x"))
        return (rng.random((n // r, k // c)) >= sparsity).repeat(r, 0).repeat(c, 1)
    raise SystemExit(f"pattern {pattern!r}: use unstructured or blockRxC")


def main(argv: list[str] | None = None) -> int:
    from sparsecc.sparsity import pack_bsr, pack_csr
    from sparsecc.targets import get_target
    from sparsecc.targets import wasm_toolchain as wt
    from sparsecc.targets.kernels import dense_args, dense_linear, sparse_kernel
    from sparsecc.targets.runners.wasm import interleaved_median, load_kernel

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shape", default="3072x768", help="N x K of the weight")
    ap.add_argument("--m", default="1,8", help="rows of x, comma-separated")
    ap.add_argument("--patterns", default="unstructured,block16x1")
    ap.add_argument("--sparsity", type=float, default=0.7)
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--number", type=int, default=10, help="calls per sample")
    args = ap.parse_args(argv)

    target = get_target("wasm-simd")
    caps = target.capabilities()
    n, k = (int(v) for v in args.shape.lower().split("x"))
    rng = np.random.default_rng(0)
    dense_w = rng.standard_normal((n, k)).astype(np.float32)
    patterns = args.patterns.split(",")
    folder = tempfile.mkdtemp(prefix="sparsecc-wasm-bench-")
    print(f"wasm-simd kernels in wasmtime, W {n}x{k}, sparsity {args.sparsity:.0%}, "
          f"median of {args.rounds} interleaved rounds x {args.number} calls; load {os.getloadavg()[0]:.2f}")
    print(f"{'M':>4} {'kernel':<14} {'schedule':<62} {'us':>9} {'dense/this':>10}")
    for m in (int(v) for v in args.m.split(",")):
        x = rng.standard_normal((m, k)).astype(np.float32)
        kernels, rows = [], []

        def add(label: str, func, arrays, w, x=x, m=m, kernels=kernels, rows=rows):
            path = wt.build_kernel(func, os.path.join(folder, f"{func.attrs['global_symbol']}.wasm"))
            kernel = load_kernel(path, wt.kernel_export(func))
            (y,) = kernel(x, *arrays, np.full((m, n), np.nan, np.float32))
            ref = x.astype(np.float64) @ w.astype(np.float64).T
            np.testing.assert_allclose(y, ref, rtol=1e-4, atol=1e-4 * max(1.0, float(np.abs(ref).max())))
            kernels.append(kernel)
            rows.append((label, str(func.attrs["sparsecc.schedule"])))

        add("dense", dense_linear(m, (n, k), False, caps, f"dense_m{m}"), dense_args(dense_w, m, caps), dense_w)
        for pattern in patterns:
            w = dense_w * _mask(rng, (n, k), pattern, args.sparsity)
            packed = pack_csr(w) if pattern == "unstructured" else pack_bsr(
                w, tuple(int(v) for v in pattern[len("block"):].split("x")))
            func, arrays = sparse_kernel(m, packed, False, caps, f"{pattern}_m{m}")
            add(pattern, func, arrays, w)
        times = interleaved_median(kernels, rounds=args.rounds, number=args.number)
        for (label, schedule), t in zip(rows, times, strict=True):
            print(f"{m:>4} {label:<14} {schedule:<62} {t * 1e6:>9.1f} {times[0] / t:>10.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
