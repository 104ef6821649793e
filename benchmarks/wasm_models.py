"""Whole models on WebAssembly: sparsecc's wasm-simd builds against onnxruntime-web, side by side.

For each model (all-MiniLM-L6-v2, batch 1 x 128 tokens; MobileNetV2, one 224 x 224 photo crop)
this compiles sparsecc's ``wasm-simd`` build dense and at each ``PATTERN@SPARSITY`` config
(pruned with real calibration data), exports the dense model to ONNX, and times in **one Node
process**, interleaved round by round:

* onnxruntime-web, dense (npm ``onnxruntime-web``, wasm backend with SIMD, 1 thread): the bar,
* sparsecc's dense wasm build, through its ``model.js`` loader,
* sparsecc's sparse wasm builds, through ``model.js``.

The same sparsecc builds are also timed in wasmtime (the runner ``sparsecc.load(OUT)(...)`` uses,
interleaved in Python). Every build's output is checked against its masked-dense program (and
onnxruntime-web's against the dense torch model) before anything is timed; the table also gives
each sparse build's output closeness to the dense model (cosine).

onnxruntime-web is installed on first use with ``npm install`` into
``$SPARSECC_CACHE/node`` (default ``~/.cache/sparsecc/node``), from the npm registry.

Run ``python benchmarks/wasm_models.py --help``; ``--artifacts DIR`` keeps the builds for reuse.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import _harness  # noqa: E402

ORT_WEB_VERSION = "1.31.1"
DEFAULT_CONFIGS = {"minilm": "block16x1@0.5,block16x1@0.7", "mobilenet": "block4x1@0.5,block4x1@0.7"}
NODE_SCRIPT = Path(__file__).with_name("wasm_node_timing.js")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", default="minilm,mobilenet", help="comma-separated subset of minilm, mobilenet")
    p.add_argument("--configs", default=None,
                   help="comma-separated PATTERN@SPARSITY builds for every model (default per model: "
                        + "; ".join(f"{k}: {v}" for k, v in DEFAULT_CONFIGS.items()) + ")")
    p.add_argument("--method", default="wanda", choices=["wanda", "sparsegpt", "magnitude"])
    p.add_argument("--rounds", type=int, default=9, help="interleaved rounds")
    p.add_argument("--artifacts", help="keep built artifacts here and reuse them in later runs")
    p.add_argument("--out", help="write the measurements to this JSON file")
    return p.parse_args(argv)


def _mobilenet() -> Any:
    from models import Workload
    from sparsecc.zoo import mobilenet

    model = mobilenet.load_mobilenet_v2().eval()
    crops = mobilenet.augmented_crops(9, seed=0)
    calibration = [(crops[i:i + 1],) for i in range(1, 9)]
    return Workload("mobilenet", model, (crops[:1],), calibration, "8 augmented crops of the bundled photos", skip="")


def _workload(name: str) -> Any:
    import models

    if name == "minilm":
        return models._minilm()
    if name == "mobilenet":
        return _mobilenet()
    raise SystemExit(f"unknown model {name!r}; choose minilm or mobilenet")


def ort_web_dir() -> Path:
    """The node_modules folder holding onnxruntime-web, installed there with npm when missing."""
    root = Path(os.environ.get("SPARSECC_CACHE") or Path.home() / ".cache" / "sparsecc") / "node"
    modules = root / "node_modules"
    if not (modules / "onnxruntime-web" / "package.json").is_file():
        npm = shutil.which("npm")
        if npm is None:
            raise SystemExit("npm is not installed (Debian: nodejs npm); it installs onnxruntime-web")
        root.mkdir(parents=True, exist_ok=True)
        print(f"installing onnxruntime-web {ORT_WEB_VERSION} into {root} ...", file=sys.stderr)
        subprocess.run([npm, "install", "--prefix", str(root), "--no-audit", "--no-fund",
                        f"onnxruntime-web@{ORT_WEB_VERSION}"], check=True)
    return modules


def _build(work: Any, pattern: str | None, sparsity: float, method: str, store: Path) -> tuple[Any, float]:
    """Compile (or reuse a kept build of) one wasm-simd configuration; (artifact, seconds or -1)."""
    import sparsecc

    label = "dense" if sparsity == 0 else f"{pattern.replace(':', 'of')}-{int(round(sparsity * 100))}-{method}"
    folder = store / f"{work.name}-wasm-{label}"
    if folder.is_dir():
        try:
            return sparsecc.load(folder), -1.0
        except sparsecc.SparseccError as exc:
            print(f"  rebuilding {folder.name}: {exc}", file=sys.stderr)
            shutil.rmtree(folder)
    start = time.perf_counter()
    artifact = sparsecc.compile(work.model, work.inputs, target="wasm-simd", sparsity=sparsity, pattern=pattern,
                                method=method, calibration=work.calibration, skip=work.skip, progress=False)
    seconds = time.perf_counter() - start
    artifact.save(folder)
    return sparsecc.load(folder), seconds


def _write_inputs(inputs: tuple[Any, ...], folder: Path) -> list[dict[str, Any]]:
    specs = []
    for i, t in enumerate(inputs):
        array = t.detach().contiguous().numpy()
        path = folder / f"input{i}.bin"
        array.tofile(path)
        specs.append({"file": str(path), "dtype": str(array.dtype), "shape": list(array.shape)})
    return specs


def _first(out: Any) -> Any:
    import torch

    while isinstance(out, (tuple, list)):
        out = out[0]
    if isinstance(out, dict):
        out = next(iter(out.values()))
    return torch.as_tensor(out).detach().float()


def run_model(name: str, args: argparse.Namespace, modules: Path, store: Path, scratch: Path) -> list[dict[str, Any]]:
    import torch
    from sparsecc.baselines import onnx_model
    from sparsecc.timing import interleave

    work = _workload(name)
    with torch.no_grad():
        dense_out = _first(work.model(*work.inputs))
    import models  # the PATTERN@SPARSITY parser the x86 model benchmark uses

    configs = [(None, 0.0)] + models._configs(args.configs or DEFAULT_CONFIGS[name])
    builds = []
    for pattern, sparsity in configs:
        artifact, seconds = _build(work, pattern, sparsity, args.method, store)
        with torch.no_grad():
            got, reference = _first(artifact(*work.inputs)), _first(artifact.reference(*work.inputs))
        error = float((got - reference).abs().max() / max(1e-6, float(reference.abs().max())))
        if error > 1e-3:
            raise SystemExit(f"{name} {pattern}@{sparsity}: wasm build differs from its masked-dense program "
                             f"(relative max error {error:.2g})")
        cosine = float(torch.nn.functional.cosine_similarity(got.flatten(), dense_out.flatten(), dim=0))
        label = "dense" if sparsity == 0 else f"{pattern}@{sparsity:g}"
        builds.append({"label": label, "artifact": artifact, "build_s": seconds, "cos_vs_dense": cosine,
                       "rel_err_vs_masked": error})
        print(f"  {name} {label}: built ({'kept' if seconds < 0 else f'{seconds:.0f} s'}), relative error vs "
              f"masked-dense {error:.1e}, cosine vs dense {cosine:.4f}", file=sys.stderr)

    folder = scratch / name
    folder.mkdir(parents=True, exist_ok=True)
    onnx_path = folder / "model.onnx"
    onnx_path.write_bytes(onnx_model(work.model, work.inputs).SerializeToString())
    inputs = _write_inputs(work.inputs, folder)
    entries = [{"name": "ort-web", "kind": "ort", "path": str(onnx_path), "inputs": inputs,
                "output": str(folder / "ort-web.out")}]
    for b in builds:
        entries.append({"name": b["label"], "kind": "sparsecc", "path": str(b["artifact"].path / "model.js"),
                        "inputs": inputs, "output": str(folder / f"{b['label']}.out")})
    job = folder / "job.json"
    job.write_text(json.dumps({"ort_dir": str(modules), "rounds": args.rounds, "block_ms": 300, "entries": entries}))
    load_before = _harness.load()
    done = subprocess.run(["node", str(NODE_SCRIPT), str(job)], capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"node timing failed:\n{done.stderr}")
    node = json.loads(done.stdout.strip().splitlines()[-1])
    ort_out = torch.from_numpy(np.fromfile(folder / "ort-web.out", dtype=np.float32)).reshape(dense_out.shape)
    ort_err = float((ort_out - dense_out).abs().max() / max(1e-6, float(dense_out.abs().max())))
    if ort_err > 1e-3:
        raise SystemExit(f"{name}: onnxruntime-web's output differs from torch's (relative {ort_err:.2g})")
    for b in builds:
        js_out = np.fromfile(folder / f"{b['label']}.out", dtype=np.float32)
        ref = _first(b["artifact"](*work.inputs)).flatten().numpy()
        if not np.allclose(js_out, ref, rtol=1e-5, atol=1e-5):
            raise SystemExit(f"{name} {b['label']}: model.js in Node and the wasmtime runner disagree")
    # wasmtime: the same modules through the Python runner, interleaved
    calls = {b["label"]: (lambda a=b["artifact"]: a(*work.inputs)) for b in builds}
    wasmtime = interleave(calls, rounds=args.rounds, block_seconds=0.3)
    load_after = _harness.load()

    ort_ms = node["ort-web"]["median_ms"]
    dense_ms = node["dense"]["median_ms"]
    rows = []
    for b in builds:
        ms = node[b["label"]]["median_ms"]
        rows.append({"model": name, "config": b["label"], "node_ms": ms, "ort_web_ms": ort_ms,
                     "vs_ort_web": ort_ms / ms, "vs_own_dense": dense_ms / ms,
                     "wasmtime_ms": wasmtime[b["label"]]["median"] * 1e3,
                     "wasm_bytes": (b["artifact"].path / "model.wasm").stat().st_size,
                     "onnx_bytes": onnx_path.stat().st_size, "cos_vs_dense": b["cos_vs_dense"],
                     "rel_err_vs_masked": b["rel_err_vs_masked"], "build_s": b["build_s"],
                     "load_before": load_before, "load_after": load_after})
    return rows


def print_table(rows: list[dict[str, Any]]) -> None:
    head = (f"{'model':>9} {'config':>18} | {'ort-web':>8} {'sparsecc':>9} ms (Node) | {'xORTweb':>7} {'xDense':>6} | "
            f"{'wasmtime':>8} ms | {'.wasm MB':>8} {'.onnx MB':>8} | {'cos vs dense':>12}")
    print(head)
    print("-" * len(head))
    for r in rows:
        print(f"{r['model']:>9} {r['config']:>18} | {r['ort_web_ms']:8.2f} {r['node_ms']:9.2f}           | "
              f"{r['vs_ort_web']:7.2f} {r['vs_own_dense']:6.2f} | {r['wasmtime_ms']:8.2f}    | "
              f"{r['wasm_bytes'] / 1e6:8.2f} {r['onnx_bytes'] / 1e6:8.2f} | {r['cos_vs_dense']:12.4f}")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    _harness.pin_threads(1)
    modules = ort_web_dir()
    node_version = subprocess.run(["node", "--version"], capture_output=True, text=True).stdout.strip()
    print(f"command: {_harness.command_line()}")
    print(f"node {node_version}, onnxruntime-web {ORT_WEB_VERSION} (wasm, SIMD, 1 thread); sparsecc wasm-simd "
          f"builds via model.js in the same Node process; wasmtime via the Python runner")
    store = Path(args.artifacts) if args.artifacts else Path(tempfile.mkdtemp(prefix="sparsecc-wasm-bench-"))
    store.mkdir(parents=True, exist_ok=True)
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="sparsecc-wasm-node-") as scratch:
        for name in args.models.split(","):
            rows += run_model(name.strip(), args, modules, store, Path(scratch))
    print()
    print_table(rows)
    print(f"\nload average {rows[0]['load_before'][0]:.2f} -> {rows[-1]['load_after'][0]:.2f}; xORTweb = "
          "onnxruntime-web dense time / sparsecc time, xDense = sparsecc dense wasm / this build, same Node run")
    if args.out:
        with open(args.out, "w", encoding="utf-8") as f:
            json.dump({"command": _harness.command_line(), "rows": rows}, f, indent=1, default=str)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
