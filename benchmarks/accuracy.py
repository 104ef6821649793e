"""Accuracy of sparsecc's pruning methods on real pretrained models, comparable with the papers'
relative results.

Models (``--models``, comma-separated):

``smollm``: SmolLM2-135M perplexity on the Python documentation (``python3.11-doc``):
calibration on seeded 256-token segments of ``library/``, perplexity over fixed 256-token windows
of ``tutorial/`` (and of ``howto/``). Every linear inside the decoder layers is pruned; the
embedding and the LM head stay dense (sparsecc's plan rule for vocabulary heads).

``minilm``: all-MiniLM-L6-v2 sentence embeddings (32 tokens), calibrated on sentences of
``library/``: mean cosine similarity to the dense embeddings of 72 ``tutorial/`` sentences, and
the Spearman rank agreement of the pair similarities of the bundled sentence pairs.

``digits``: the digits CNN's held-out accuracy, calibrated on training images; with ``--extra
gradual`` also the same model fine-tuned for 12 epochs while :class:`sparsecc.GradualPruner`
prunes it (the row ``gradual``).

``mobilenet``: MobileNetV2 (torchvision's ImageNet weights), calibrated on seeded augmented crops
of scikit-learn's two photos: top-1 and top-5 agreement and KL divergence with the dense model
over 256 other crops. Its pointwise convolutions and classifier are pruned; the 3x3 and
depthwise convolutions stay dense (the x86 plan's rule).

Rows: dense, then each method (magnitude, Wanda, SparseGPT; ``METHOD+dsnot`` adds the DSnoT
refinement, ``METHOD/ALLOCATION`` a per-layer allocation: ``/owl``, ``/depth``, ``/search``, ``/neuroal``) per
calibration seed; columns: the
configurations (``PATTERN@SPARSITY``; N:M patterns fix their own sparsity). Each cell is the
perplexity and its ratio to dense. A second table gives each method's pruning time and the peak
growth of the process's resident memory while it ran.

``--recover ELEMENT`` adds a row ``METHOD>recover`` per pruned model: the same model after that
pipeline element (e.g. ``recover{measure=cosine}`` for MiniLM's embeddings), distilled from the
dense model on the calibration segments of the same seed (a quarter held out for early stopping);
the evaluation data above is never trained on.

The pruned programs are the masked-dense programs the compiler's kernels reproduce (checked in
the tests), so these numbers are what a compiled model computes.

    python benchmarks/accuracy.py --models smollm --methods magnitude,wanda,sparsegpt \\
        --configs unstructured@0.5,2:4,unstructured@0.7 --seeds 0,1 --threads 2
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import threading
import time
from dataclasses import dataclass
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _harness  # noqa: E402

DEFAULT_CONFIGS = "unstructured@0.5,2:4,unstructured@0.7"
DEFAULT_METHODS = "magnitude,wanda,sparsegpt"


def _rss_bytes() -> int:
    with open("/proc/self/statm", encoding="ascii") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class PeakMemory:
    """The most resident memory above the starting point while the block runs (sampled every
    20 ms: torch's allocations are invisible to tracemalloc)."""

    def __enter__(self) -> PeakMemory:
        self.start = _rss_bytes()
        self.peak = self.start
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._stop.wait(0.02):
            self.peak = max(self.peak, _rss_bytes())

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, _rss_bytes())

    @property
    def growth_mb(self) -> float:
        return (self.peak - self.start) / 2**20


@dataclass
class Config:
    pattern: str
    sparsity: float

    @classmethod
    def parse(cls, text: str) -> Config:
        from sparsecc.sparsity import NM, parse_pattern

        pattern, _, sparsity = text.partition("@")
        if pattern == "channel":
            if not sparsity:
                raise SystemExit("channel pruning needs the fraction of channels removed: channel@0.3")
            return cls("channel", float(sparsity))
        parsed = parse_pattern(pattern)
        if isinstance(parsed, NM):
            return cls(parsed.name, parsed.sparsity)
        if not sparsity:
            raise SystemExit(f"configuration {text!r} needs a sparsity: PATTERN@SPARSITY")
        return cls(parsed.name, float(sparsity))

    @property
    def label(self) -> str:
        return self.pattern if ":" in self.pattern else f"{self.pattern} {self.sparsity:.0%}"


def prune(program: Any, method: str, config: Config, calibration: list[tuple[Any, ...]], seed: int) -> tuple[Any, dict]:
    """The program pruned by ``method`` at ``config``, and what it cost."""
    from sparsecc.pass_manager import PassContext, PassManager
    from sparsecc.targets import get_target

    spec, _, allocation = method.partition("/")
    base, _, refine = spec.partition("+")
    if config.pattern == "channel":
        # structured: magnitude ranks channels by weight norm, the calibration methods by Taylor
        importance = "l2" if base == "magnitude" else "taylor"
        pipeline = f"prune-channels{{sparsity={config.sparsity:g},importance={importance}}}"
    else:
        pipeline = (f"plan-uniform{{sparsity={config.sparsity:g},pattern={config.pattern},method={base}}},"
                    + (f"allocate{{method={allocation}}}," if allocation else "")
                    + f"prune-{base}" + (f"{{refine={refine}}}" if refine else ""))
    ctx = PassContext(get_target("x86"), calibration=calibration, seed=seed, progress=False)
    start = time.perf_counter()
    with PeakMemory() as memory:
        result = PassManager(pipeline).run(program, ctx)
    counters = result.results[-1][1].counters
    notes = [d.message for _, res in result.results for d in res.diagnostics
             if "search chose" in d.message or "row-wise step" in d.message]
    extra = {"allocation_choice": "; ".join(notes)} if notes else {}
    return result.program, {"seconds": time.perf_counter() - start, "peak_mb": memory.growth_mb, **counters, **extra}


def run_smollm(args: argparse.Namespace) -> list[dict[str, Any]]:
    import sparsecc
    from sparsecc.zoo import pydocs, smollm

    model = smollm.load_smollm(max_seq=args.seq)
    tokenizer = smollm.load_tokenizer()
    evaluation = {folder: pydocs.evaluation_windows(tokenizer, count, args.seq, folder=folder)
                  for folder, count in (("tutorial", args.windows), ("howto", args.windows // 2))}
    program = sparsecc.capture(model, (evaluation["tutorial"][0],))
    print(f"smollm: calibration {args.samples} x {args.seq} tokens of {pydocs.DOCS / 'library'} per seed; "
          f"perplexity over {args.windows} windows of tutorial/ and {args.windows // 2} of howto/", flush=True)

    def score(prog: Any) -> dict[str, float]:
        return {folder: pydocs.perplexity(lambda ids: prog.run(ids), windows) for folder, windows in evaluation.items()}

    def calibration(seed: int) -> list[tuple[Any, ...]]:
        return [(seg,) for seg in pydocs.calibration_segments(tokenizer, args.samples, args.seq, seed=seed)]

    return _one_shot_rows("smollm", program, score, calibration, args)


def _sentences(folder: str, count: int, seed: int) -> list[str]:
    """``count`` prose sentences (40-200 characters, no markup) from the docs ``folder``, seeded."""
    import random
    import re

    from sparsecc.zoo import pydocs

    found = []
    for path in sorted(pydocs.docs_folder(folder).rglob("*.rst.txt")):
        text = " ".join(line.strip() for line in path.read_text(encoding="utf-8", errors="replace").splitlines()
                        if line.strip() and not line.startswith((" ", "..", ":", "=", "-", "*", "#", ">>>")))
        found += [s for s in re.split(r"(?<=[.!?])\s+", text) if 40 <= len(s) <= 200 and "`" not in s]
    return random.Random(seed).sample(found, count)


def run_minilm(args: argparse.Namespace) -> list[dict[str, Any]]:
    import sparsecc
    from sparsecc.zoo import minilm

    embedder, tokenizer = minilm.load_minilm_embedder()
    length = 32
    pairs = minilm.encode(tokenizer, minilm.SENTENCES, length=length)
    step = len(minilm.SENTENCES)  # the exported program's static batch
    prose_text = _sentences("tutorial", 3 * step, 0)
    prose = [minilm.encode(tokenizer, prose_text[i:i + step], length=length) for i in range(0, 3 * step, step)]
    program = sparsecc.capture(embedder, pairs)

    def embed(prog: Any) -> Any:
        import torch

        return torch.cat([prog.run(*batch) for batch in prose])

    with_dense = {"pairs": program.run(*pairs), "prose": embed(program)}
    print(f"minilm: calibration {args.samples} x {len(minilm.SENTENCES)} sentences of library/ per seed; "
          f"cosine to dense over {3 * step} tutorial/ sentences, rank agreement over "
          f"{len(minilm.SENTENCE_PAIRS)} pairs",
          flush=True)

    def score(prog: Any) -> dict[str, float]:
        emb = embed(prog)
        pair_emb = prog.run(*pairs)
        return {"cosine": minilm.cosine_to_reference(emb, with_dense["prose"]),
                "rank": minilm.rank_correlation(minilm.pair_similarities(pair_emb),
                                                minilm.pair_similarities(with_dense["pairs"]))}

    def calibration(seed: int) -> list[tuple[Any, ...]]:
        sentences = _sentences("library", args.samples * step, seed)
        return [minilm.encode(tokenizer, sentences[i:i + step], length=length) for i in range(0, len(sentences), step)]

    return _one_shot_rows("minilm", program, score, calibration, args)


def run_digits(args: argparse.Namespace) -> list[dict[str, Any]]:
    import copy

    import sparsecc
    from sparsecc.zoo import accuracy, train_digits_cnn
    from sparsecc.zoo.digits import finetune_gradual

    model, data = train_digits_cnn(seed=0)
    batch = 64
    program = sparsecc.capture(model, (data.test_images[:batch],))
    print(f"digits: held-out accuracy over {data.test_images.shape[0]} images; calibration "
          f"{args.samples} x {batch} training images per seed; gradual: 12 epochs of fine-tuning", flush=True)

    def score(prog: Any) -> dict[str, float]:
        return {"accuracy": accuracy(lambda x: prog.run(x), data.test_images, data.test_labels, batch_size=batch)}

    def calibration(seed: int) -> list[tuple[Any, ...]]:
        order = torch_randperm(data.train_images.shape[0], seed)
        return [(data.train_images[order[i * batch:(i + 1) * batch]],) for i in range(args.samples)]

    rows = _one_shot_rows("digits", program, score, calibration, args)
    if "gradual" in args.extra:
        for config in args.configs:
            if ":" in config.pattern:
                continue
            tuned = copy.deepcopy(model)
            start = time.perf_counter()
            finetune_gradual(tuned, data, config.sparsity, pattern=config.pattern)
            row = {"model": "digits", "method": "gradual", "seed": 0, "config": config.label,
                   "accuracy": accuracy(tuned, data.test_images, data.test_labels),
                   "seconds": time.perf_counter() - start, "peak_mb": float("nan")}
            rows.append(row)
            print(f"  gradual {config.label}: accuracy {row['accuracy']:.4f}", flush=True)
    return rows


def torch_randperm(n: int, seed: int) -> Any:
    import torch

    return torch.randperm(n, generator=torch.Generator().manual_seed(seed))


def _one_shot_rows(model: str, program: Any, score: Any, calibration: Any, args: argparse.Namespace) -> list[dict]:
    """Dense, then every method x configuration x seed (magnitude once: it reads no data)."""
    rows = [{"model": model, "method": "dense", "seed": None, "config": None, **score(program)}]
    print(f"  dense: {rows[0]}", flush=True)
    for seed in args.seeds:
        batches = calibration(seed)
        for method in args.methods:
            if method == "magnitude" and seed != args.seeds[0]:
                continue
            for config in args.configs:
                pruned, cost = prune(program, method, config, batches, seed)
                rows.append(_row(model, method, seed, config, score(pruned), cost))
                if args.recover:
                    recovered, cost = recover(program, pruned, args.recover, batches, seed)
                    rows.append(_row(model, f"{method}>recover", seed, config, score(recovered), cost))
    return rows


def _row(model: str, method: str, seed: int, config: Config, scores: dict, cost: dict) -> dict[str, Any]:
    row = {"model": model, "method": method, "seed": seed if not method.startswith("magnitude") else None,
           "config": config.label, **scores, **cost}
    shown = ", ".join(f"{k} {row[k]:.4g}" for k in METRICS[model])
    if "allocation_choice" in row:
        shown += f"; {row['allocation_choice']}"
    if "heldout_after" in row:
        shown += f"; held-out {row['heldout_before']:.4g} -> {row['heldout_after']:.4g} in {row['steps']} steps"
    print(f"  {method} seed {seed} {config.label}: {shown} ({cost['seconds']:.0f} s, +{cost['peak_mb']:.0f} MB)",
          flush=True)
    return row


def recover(dense: Any, pruned: Any, element: str, calibration: list[tuple[Any, ...]], seed: int) -> tuple[Any, dict]:
    """``pruned`` after the ``recover{...}`` pipeline element, distilled from ``dense`` on the
    calibration batches (the pass holds a share of them out; the scores here use other data)."""
    from sparsecc.pass_manager import PassContext, PassManager
    from sparsecc.targets import get_target

    ctx = PassContext(get_target("x86"), calibration=calibration, seed=seed, progress=False, dense=dense)
    start = time.perf_counter()
    with PeakMemory() as memory:
        result = PassManager(element).run(pruned, ctx)
    counters = result.results[-1][1].counters
    return result.program, {"seconds": time.perf_counter() - start, "peak_mb": memory.growth_mb, **counters}


def run_mobilenet(args: argparse.Namespace) -> list[dict[str, Any]]:
    import sparsecc
    import torch
    from sparsecc.zoo import mobilenet

    model = mobilenet.load_mobilenet_v2()
    batch = 32
    evaluation = mobilenet.augmented_crops(8 * batch, seed=1000)
    program = sparsecc.capture(model, (evaluation[:batch],))
    with torch.no_grad():
        reference = torch.cat([program.run(evaluation[i:i + batch]) for i in range(0, len(evaluation), batch)])
    print(f"mobilenet: calibration {args.samples} x {batch} augmented crops per seed; agreement with dense over "
          f"{len(evaluation)} other crops of scikit-learn's photos", flush=True)

    def score(prog: Any) -> dict[str, float]:
        with torch.no_grad():
            logits = torch.cat([prog.run(evaluation[i:i + batch]) for i in range(0, len(evaluation), batch)])
        return mobilenet.agreement(logits, reference)

    def calibration(seed: int) -> list[tuple[Any, ...]]:
        crops = mobilenet.augmented_crops(args.samples * batch, seed=seed)
        return [(crops[i:i + batch],) for i in range(0, len(crops), batch)]

    return _one_shot_rows("mobilenet", program, score, calibration, args)


RUNNERS = {"smollm": run_smollm, "minilm": run_minilm, "digits": run_digits, "mobilenet": run_mobilenet}
#: per model: the metrics reported, and whether they are perplexities (shown with a ratio to dense)
METRICS = {"smollm": {"tutorial": True, "howto": True}, "minilm": {"cosine": False, "rank": False},
           "digits": {"accuracy": False}, "mobilenet": {"top1": False, "top5": False, "kl": False}}


def _cell(rows: list[dict[str, Any]], method: str, seed: Any, label: str, fmt: Any) -> str:
    hit = [r for r in rows if (r["method"], r["seed"], r["config"]) == (method, seed, label)]
    return fmt(hit[0]) if hit else ""


def _table(rows: list[dict[str, Any]], keys: list[tuple[str, Any]], labels: list[str], fmt: Any) -> None:
    print("| method | seed | " + " | ".join(labels) + " |")
    print("|---|---|" + "---|" * len(labels))
    for method, seed in keys:
        cells = [_cell(rows, method, seed, label, fmt) for label in labels]
        print(f"| {method} | {'' if seed is None else seed} | " + " | ".join(cells) + " |")


def print_tables(rows: list[dict[str, Any]], configs: list[Config]) -> None:
    labels = [c.label for c in configs]
    for model in dict.fromkeys(r["model"] for r in rows):
        mine = [r for r in rows if r["model"] == model]
        dense = next(r for r in mine if r["method"] == "dense")
        keys = list(dict.fromkeys((r["method"], r["seed"]) for r in mine if r["method"] != "dense"))
        for metric, is_perplexity in METRICS[model].items():
            print(f"\n{model}: {metric}{' (ratio to dense)' if is_perplexity else ''}; dense {dense[metric]:.4g}")
            if is_perplexity:
                _table(mine, keys, labels, lambda r, m=metric, d=dense[metric]: f"{r[m]:.1f} ({r[m] / d:.2f}x)")
            else:
                _table(mine, keys, labels, lambda r, m=metric: f"{r[m]:.4f}")
        print(f"\n{model}: pruning time (s) and peak resident-memory growth (MB)")
        _table(mine, keys, labels, lambda r: f"{r['seconds']:.0f} s, {r['peak_mb']:.0f} MB")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="smollm", help=f"comma-separated subset of {sorted(RUNNERS)}")
    parser.add_argument("--methods", default=DEFAULT_METHODS,
                        help="comma-separated METHOD[+dsnot][/owl|/depth|/erk|/search|/neuroal]")
    parser.add_argument("--configs", default=DEFAULT_CONFIGS, help="comma-separated PATTERN@SPARSITY (N:M alone)")
    parser.add_argument("--seeds", default="0,1", help="calibration seeds (report at least two)")
    parser.add_argument("--samples", type=int, default=32, help="calibration segments per seed")
    parser.add_argument("--seq", type=int, default=256, help="tokens per segment and per window")
    parser.add_argument("--windows", type=int, default=16, help="evaluation windows of tutorial/ (howto/: half)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--extra", default="gradual", help="digits: also fine-tune with gradual pruning ('' to skip)")
    parser.add_argument("--recover", default="",
                        help="also recover every pruned model with this pipeline element (e.g. 'recover' or "
                             "'recover{measure=cosine,soup=3}'): rows METHOD>recover")
    parser.add_argument("--out", default=None, help="write the rows to this JSON file")
    args = parser.parse_args(argv)
    args.methods = [m for m in args.methods.split(",") if m]
    args.seeds = [int(s) for s in args.seeds.split(",") if s]
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    _harness.pin_threads(args.threads)
    _harness.configure_torch(args.threads)
    args.configs = [Config.parse(c) for c in args.configs.split(",") if c]
    print(f"command: {_harness.command_line()}")
    print(f"load average before: {' '.join(f'{v:.2f}' for v in _harness.load())}", flush=True)
    rows: list[dict[str, Any]] = []
    for name in args.models.split(","):
        if name not in RUNNERS:
            raise SystemExit(f"unknown model {name!r}; choose from {sorted(RUNNERS)}")
        rows.extend(RUNNERS[name](args))
    print_tables(rows, args.configs)
    print(f"\nload average after: {' '.join(f'{v:.2f}' for v in _harness.load())}")
    if args.out:
        with open(args.out, "w", encoding="utf-8") as f:
            json.dump({"command": _harness.command_line(), "rows": rows}, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
