"""Single linear layer benchmark: sparsecc's sparse kernels against the dense bars, side by side.

For each weight shape (N, K), number of input rows M, sparsity pattern and sparsity, this builds
sparsecc's kernel for the host (``tvm.compile`` of the PrimFunc ``sparse_kernel`` returns, called
directly with ``tvm.runtime`` tensors) and times it interleaved with, in the same process and the
same round-robin blocks:

* ONNX Runtime dense MatMul + Add (the project's dense bar; a model built with ``onnx.helper``),
* torch dense ``F.linear``,
* torch CSR (``W.to_sparse_csr()``; ``addmm`` producing y transposed, a view away from y),
* sparsecc's own dense kernel (``dense_linear``), for reference, with fp32 and with bf16-stored
  weights (fp32 arithmetic; column ``scDbf16``).

With ``--bf16-values`` every sparse kernel is also built with its values stored as bf16 (same
schedule otherwise, fp32 arithmetic) and timed in the same interleaved group: those rows say
``bf16`` in the ``val`` column, and ``xfp32`` is the fp32 sparse kernel's time over theirs.

All implementations of one (shape, M) are timed in one interleaved group, so every ratio in a row
is measured against the same ORT and torch numbers. Every output is checked against numpy once
before timing. Results: a table on stdout (ratios vs ORT dense and torch dense, effective GFLOP/s
= 2*M*nnz / t, GB/s of packed weight bytes streamed per call) and optionally a JSON file.

Run ``python benchmarks/linear.py --help``. The layer is called in a hot loop, so its weight stays
in the caches (L2 4 MiB, L3 105 MiB on the reference machine): formats win less there than in a
whole model, where weights stream from DRAM.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time
from typing import Any

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _harness  # noqa: E402

SHAPES = [(768, 768), (3072, 768), (768, 3072), (4096, 4096)]
MS = [1, 8, 128]
# (pattern name, sparsities): 2:4 is 50 % by construction
PATTERNS = [("unstructured", (0.5, 0.7, 0.9)), ("block16x1", (0.5, 0.7, 0.9)), ("2:4", (0.5,))]
QUICK_SHAPES = [(3072, 768)]
QUICK_MS = [1, 128]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--threads", type=int, choices=(1, 2), default=1,
                   help="threads for every runtime (TVM, ONNX Runtime, torch)")
    p.add_argument("--quick", action="store_true", help=f"only {QUICK_SHAPES} at M in {QUICK_MS}, fewer rounds")
    p.add_argument("--shapes", help="comma-separated NxK list, e.g. 3072x768,768x3072")
    p.add_argument("--m", help="comma-separated M values, e.g. 1,128")
    p.add_argument("--patterns", help="comma-separated pattern names (default: unstructured,block16x1,2:4); any "
                   "pattern the x86 target runs, e.g. block8x2,1:4")
    p.add_argument("--sparsities", help="comma-separated sparsities for every non-N:M pattern (default 0.5,0.7,0.9)")
    p.add_argument("--rounds", type=int, help="interleaved rounds per group (default 25, quick 9)")
    p.add_argument("--no-torch-csr", action="store_true", help="skip torch CSR (slow at M=128, 50 %%)")
    p.add_argument("--bf16-values", action="store_true",
                   help="also time every sparse kernel with bf16-stored values (rows marked bf16, beside fp32)")
    p.add_argument("--tuned", action="store_true",
                   help="build each sparse kernel with the schedule this host's cost table measured fastest "
                        "(`sparsecc tune`), as compile does; cells without a measurement keep the heuristic")
    p.add_argument("--out", help="write all measurements to this JSON file")
    return p.parse_args(argv)


def _shapes(args: argparse.Namespace) -> list[tuple[int, int]]:
    if args.shapes:
        return [tuple(int(v) for v in s.lower().split("x")) for s in args.shapes.split(",")]  # type: ignore[misc]
    return QUICK_SHAPES if args.quick else SHAPES


def _ms(args: argparse.Namespace) -> list[int]:
    if args.m:
        return [int(v) for v in args.m.split(",")]
    return QUICK_MS if args.quick else MS


def _patterns(args: argparse.Namespace) -> list[tuple[str, tuple[float, ...]]]:
    """(pattern, sparsities) cells to measure; an N:M pattern has exactly one sparsity, 1 - N/M."""
    from sparsecc.sparsity import NM, parse_pattern

    names = args.patterns.split(",") if args.patterns else [name for name, _ in PATTERNS]
    default = tuple(float(v) for v in args.sparsities.split(",")) if args.sparsities else (0.5, 0.7, 0.9)
    cells = []
    for name in names:
        pattern = parse_pattern(name)
        cells.append((name, (1 - pattern.n / pattern.m,) if isinstance(pattern, NM) else default))
    return cells


def onnx_linear_model(weight: np.ndarray, bias: np.ndarray, m: int):
    """y = x @ W.T + b as an ONNX model (MatMul + Add, x of shape (m, K)); the DeepSparse
    benchmark builds its models with this too, so both runtimes see the same graph."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    n_out, k = weight.shape
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "wt"], ["xw"]), helper.make_node("Add", ["xw", "b"], ["y"])],
        "linear",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [m, k])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [m, n_out])],
        initializer=[numpy_helper.from_array(np.ascontiguousarray(weight.T), "wt"),
                     numpy_helper.from_array(bias, "b")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    # onnx 1.23 writes IR 14 by default; onnxruntime 1.31 accepts at most 13 (IR 9 also reads in onnx 1.14).
    model.ir_version = 9
    onnx.checker.check_model(model)
    return model


def _ort_session(weight: np.ndarray, bias: np.ndarray, m: int, threads: int):
    import onnxruntime as ort

    model = onnx_linear_model(weight, bias, m)
    return ort.InferenceSession(model.SerializeToString(), _harness.ort_session_options(threads),
                                providers=["CPUExecutionProvider"])


def _ort_runner(weight: np.ndarray, bias: np.ndarray, x: np.ndarray, threads: int):
    """A zero-argument call of ORT dense with x and y bound once (no per-call allocation)."""
    import onnxruntime as ort

    sess = _ort_session(weight, bias, x.shape[0], threads)
    y = np.empty((x.shape[0], weight.shape[0]), np.float32)
    binding = sess.io_binding()
    binding.bind_ortvalue_input("x", ort.OrtValue.ortvalue_from_numpy(x))
    binding.bind_ortvalue_output("y", ort.OrtValue.ortvalue_from_numpy(y))
    options = ort.RunOptions()

    def run() -> None:
        sess.run_with_iobinding(binding, options)

    return run, lambda: y


def _masked_weight(rng: np.random.Generator, n_out: int, k: int, pattern: str, sparsity: float) -> np.ndarray:
    import torch
    from sparsecc.sparsity import parse_pattern

    w = rng.standard_normal((n_out, k)).astype(np.float32)
    mask = parse_pattern(pattern).mask(torch.from_numpy(np.abs(w)), sparsity).numpy()
    return np.where(mask, w, np.float32(0))


def _tvm_runner(func: Any, inputs: list[np.ndarray], m: int, n_out: int, target: Any):
    import tvm

    ex = tvm.compile(func, target=target)
    dev = tvm.cpu()
    args = [tvm.runtime.tensor(np.ascontiguousarray(a), dev) for a in inputs]
    y = tvm.runtime.tensor(np.zeros((m, n_out), np.float32), dev)
    f = ex[str(func.attrs["global_symbol"])]
    args.append(y)

    def run() -> None:
        f(*args)

    return run, y.numpy


def _check(name: str, got: np.ndarray, ref: np.ndarray) -> None:
    scale = max(1.0, float(np.abs(ref).max()))
    err = float(np.abs(got - ref).max())
    if not err <= 1e-4 * scale * 10:
        raise AssertionError(f"{name}: max abs error {err:.3g} against numpy (scale {scale:.3g})")


def run_group(n_out: int, k: int, m: int, args: argparse.Namespace, caps: Any, target: Any,
              rng: np.random.Generator) -> list[dict[str, Any]]:
    """Build and time everything for one (shape, M); returns one record per sparse cell."""
    import torch
    from sparsecc.sparsity import PackedNM, packed_nbytes, parse_pattern
    from sparsecc.targets import get_target
    from sparsecc.targets.kernels import dense_args, dense_linear, sparse_kernel
    from sparsecc.targets.kernels.dense import DenseSchedule, dense_params, from_bfloat16_bits, to_bfloat16_bits
    from sparsecc.targets.tuning import default_schedule

    x = rng.standard_normal((m, k)).astype(np.float32)
    dense_w = rng.standard_normal((n_out, k)).astype(np.float32)
    bias = rng.standard_normal(n_out).astype(np.float32)
    xt, bt = torch.from_numpy(x), torch.from_numpy(bias)

    fns: dict[str, Any] = {}
    outputs: dict[str, Any] = {}
    refs: dict[str, np.ndarray] = {}
    cells: list[dict[str, Any]] = []

    def dense_ref(w: np.ndarray) -> np.ndarray:
        return (x.astype(np.float64) @ w.astype(np.float64).T + bias).astype(np.float32)

    fns["ort"], outputs["ort"] = _ort_runner(dense_w, bias, x, args.threads)
    refs["ort"] = dense_ref(dense_w)
    wt = torch.from_numpy(dense_w)
    fns["torch"] = lambda: torch.nn.functional.linear(xt, wt, bt)
    outputs["torch"] = lambda: fns["torch"]().numpy()
    refs["torch"] = refs["ort"]
    func = dense_linear(m, (n_out, k), True, caps, "dense_bench")
    fns["sc_dense"], outputs["sc_dense"] = _tvm_runner(func, [x, *dense_args(dense_w, m, caps), bias], m,
                                                       n_out, target)
    refs["sc_dense"] = refs["ort"]
    # The same dense kernel with bf16-stored weights (fp32 arithmetic): checked against the layer
    # with bf16-rounded weights, since that is what it computes.
    bf16 = dataclasses.replace(DenseSchedule(*dense_params(m, (n_out, k), caps)), weights="bfloat16")
    func = dense_linear(m, (n_out, k), True, caps, "dense_bf16_bench", schedule=bf16)
    fns["sc_dense_bf16"], outputs["sc_dense_bf16"] = _tvm_runner(
        func, [x, *dense_args(dense_w, m, caps, schedule=bf16), bias], m, n_out, target)
    refs["sc_dense_bf16"] = dense_ref(from_bfloat16_bits(to_bfloat16_bits(dense_w)))

    build_s = 0.0
    cost_model = get_target("x86").cost_model() if args.tuned else None
    for pattern, sparsities in _patterns(args):
        for sp in sparsities:
            key = f"{pattern}@{int(round(sp * 100))}"
            w = _masked_weight(rng, n_out, k, pattern, sp)
            packed = parse_pattern(pattern).pack(w)
            t0 = time.perf_counter()
            # --tuned: the schedule this host's cost table measured fastest (what compile builds),
            # where `sparsecc tune` measured this problem; the heuristic elsewhere
            tuned = cost_model.schedule(m, packed, (n_out, k)) if cost_model is not None else None
            func, arrays = sparse_kernel(m, packed, True, caps, "sparse_bench", schedule=tuned)
            fns[key], outputs[key] = _tvm_runner(func, [x, *arrays, bias], m, n_out, target)
            build_s += time.perf_counter() - t0
            refs[key] = dense_ref(w)
            cell = {"shape": [n_out, k], "m": m, "pattern": pattern, "sparsity": sp, "nnz": int(packed.nnz),
                    "weight_bytes": packed_nbytes(packed), "schedule": str(func.attrs["sparsecc.schedule"]),
                    "key": key, "values": "fp32", "tuned": tuned is not None}
            if pattern == "unstructured" and not args.no_torch_csr:
                wc = torch.from_numpy(w).to_sparse_csr()
                bcol = bt[:, None]
                fns[f"tcsr:{key}"] = lambda wc=wc, bcol=bcol: torch.addmm(bcol, wc, xt.t())
                outputs[f"tcsr:{key}"] = lambda name=f"tcsr:{key}": fns[name]().t().contiguous().numpy()
                refs[f"tcsr:{key}"] = refs[key]
            cells.append(cell)
            if args.bf16_values:
                # The heuristic schedule with its values stored as bf16; checked against the
                # bf16-rounded weight, which is what it computes with.
                tuned_bf16 = (cost_model.schedule(m, packed, (n_out, k), weights="bfloat16")
                              if cost_model is not None else None)
                schedule = tuned_bf16 or default_schedule(m, packed, caps, weights="bfloat16")
                t0 = time.perf_counter()
                func, arrays = sparse_kernel(m, packed, True, caps, "sparse_bench", schedule=schedule)
                fns[f"{key}:bf16"], outputs[f"{key}:bf16"] = _tvm_runner(func, [x, *arrays, bias], m, n_out, target)
                build_s += time.perf_counter() - t0
                refs[f"{key}:bf16"] = dense_ref(from_bfloat16_bits(to_bfloat16_bits(w)))
                values = packed.values if isinstance(packed, PackedNM) else packed.data
                cells.append({**cell, "key": f"{key}:bf16", "values": "bf16", "fp32_key": key,
                              "tuned": tuned_bf16 is not None,
                              "weight_bytes": packed_nbytes(packed) - 2 * int(values.size),
                              "schedule": str(func.attrs["sparsecc.schedule"])})

    with torch.no_grad():
        for name, fn in fns.items():
            fn()
            _check(name, np.asarray(outputs[name]()), refs[name])
        rounds = args.rounds or (9 if args.quick else 25)
        load_before = _harness.load()
        t0 = time.perf_counter()
        times = _harness.interleave(fns, rounds=rounds)
        wall = time.perf_counter() - t0
        load_after = _harness.load()

    ort_s, torch_s = times["ort"]["median"], times["torch"]["median"]
    for cell in cells:
        key = cell.pop("key")
        fp32_key = cell.pop("fp32_key", key)
        t = times[key]["median"]
        cell.update({
            "sparsecc_s": t, "sparsecc_q1_s": times[key]["q1"], "sparsecc_q3_s": times[key]["q3"],
            "ort_dense_s": ort_s, "torch_dense_s": torch_s, "sparsecc_dense_s": times["sc_dense"]["median"],
            "sparsecc_dense_bf16_s": times["sc_dense_bf16"]["median"],
            "torch_csr_s": times[f"tcsr:{fp32_key}"]["median"] if f"tcsr:{fp32_key}" in times else None,
            "vs_ort": ort_s / t, "vs_torch": torch_s / t, "vs_fp32_values": times[fp32_key]["median"] / t,
            "gflops": 2 * m * cell["nnz"] / t / 1e9, "weight_gbs": cell["weight_bytes"] / t / 1e9,
            "ort_gflops": 2 * m * n_out * k / ort_s / 1e9,
            "load_before": load_before, "load_after": load_after, "group_wall_s": wall, "build_s": build_s,
        })
    return cells


def _fmt_us(s: float | None) -> str:
    return "-" if s is None else f"{s * 1e6:9.1f}"


def print_table(cells: list[dict[str, Any]]) -> None:
    head = (f"{'N x K':>11} {'M':>4} {'pattern':>12} {'sp':>4} {'val':>4} | {'sparsecc':>9} {'ORT':>9} {'torch':>9} "
            f"{'tCSR':>9} {'scDense':>9} {'scDbf16':>9} us | {'xORT':>6} {'xTorch':>6} {'tCSRxORT':>8} {'xfp32':>5} | "
            f"{'GFLOP/s':>7} {'wGB/s':>6} {'ORT GF/s':>8}")
    print(head)
    print("-" * len(head))
    for c in cells:
        tcsr = c["torch_csr_s"]
        tcsr_ratio = f"{c['ort_dense_s'] / tcsr:8.2f}" if tcsr else f"{'-':>8}"
        xfp32 = f"{c['vs_fp32_values']:5.2f}" if c["values"] == "bf16" else f"{'':>5}"
        print(f"{c['shape'][0]:>5}x{c['shape'][1]:<5} {c['m']:>4} {c['pattern']:>12} {int(c['sparsity'] * 100):>3}% "
              f"{c['values']:>4}{'*' if c.get('tuned') else ' '}| "
              f"{_fmt_us(c['sparsecc_s'])} {_fmt_us(c['ort_dense_s'])} {_fmt_us(c['torch_dense_s'])} "
              f"{_fmt_us(tcsr):>9} {_fmt_us(c['sparsecc_dense_s'])} "
              f"{_fmt_us(c['sparsecc_dense_bf16_s'])}    | {c['vs_ort']:6.2f} {c['vs_torch']:6.2f} "
              f"{tcsr_ratio} {xfp32} | {c['gflops']:7.1f} {c['weight_gbs']:6.1f} {c['ort_gflops']:8.1f}")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    # Thread pools read their size at start: fix it before torch / onnxruntime / tvm load.
    _harness.pin_threads(args.threads)
    _harness.configure_torch(args.threads)
    import onnxruntime as ort
    import torch
    import tvm
    from sparsecc.targets import get_target

    target = get_target("x86")
    caps = target.capabilities()
    tvm_target = target.tvm_target()
    print(f"command: {_harness.command_line()}")
    print(f"threads: {args.threads} (torch {torch.get_num_threads()}, TVM pool {_harness.tvm_threads()}, "
          f"ORT intra_op {args.threads}); host {tvm_target['mcpu']}, {caps.vector_bits}-bit vectors; "
          f"torch {torch.__version__}, onnxruntime {ort.__version__}, tvm {tvm.__version__}")
    peaks = _harness.machine_peaks(args.threads)
    print(f"machine bars: DRAM copy {peaks['dram_copy_gbs']:.1f} GB/s, fp32 FMA peak {peaks['fma_peak_gflops']:.0f} "
          f"GFLOP/s, ORT 2048^3 GEMM {peaks['ort_gemm_gflops']:.0f} GFLOP/s ({args.threads} thread(s))")
    start_load = _harness.load()
    print(f"load average before: {start_load[0]:.2f} {start_load[1]:.2f} {start_load[2]:.2f}", flush=True)
    rng = np.random.default_rng(0)
    cells: list[dict[str, Any]] = []
    t0 = time.perf_counter()
    for n_out, k in _shapes(args):
        for m in _ms(args):
            group = run_group(n_out, k, m, args, caps, tvm_target, rng)
            cells.extend(group)
            g = group[0]
            print(f"  {n_out}x{k} M={m}: {g['group_wall_s']:.1f} s timing, {g['build_s']:.1f} s building, "
                  f"load {g['load_before'][0]:.2f} -> {g['load_after'][0]:.2f}", file=sys.stderr, flush=True)
    end_load = _harness.load()
    print()
    print_table(cells)
    print(f"\nload average after: {end_load[0]:.2f} {end_load[1]:.2f} {end_load[2]:.2f} "
          f"(before {start_load[0]:.2f}); total {time.perf_counter() - t0:.0f} s")
    print("ratios are median ORT (or torch) dense time / median sparsecc time, same interleaved run; "
          "GFLOP/s counts 2*M*nnz; wGB/s = packed weight bytes / time; xfp32 (bf16 rows) = fp32-values "
          "sparse time / bf16-values sparse time; * after val: schedule from the measured cost table (--tuned)")
    if args.out:
        meta = {"command": _harness.command_line(), "threads": args.threads, "mcpu": tvm_target["mcpu"], "peaks": peaks,
                "load_before": start_load, "load_after": end_load}
        with open(args.out, "w", encoding="utf-8") as f:
            json.dump({"meta": meta, "cells": cells}, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
