"""SparseGPT's unstructured mask selection on SmolLM2-135M: ``selection=row`` (every row keeps the
same count in every 128-column range) against ``selection=block`` (the paper's: one threshold over
all rows of the range), as perplexity ratios to the dense model.

Calibration: seeded 256-token segments of the Python docs' ``library/`` (as
``benchmarks/accuracy.py``). Evaluation, on fixed 256-token windows of three texts:

* ``tutorial/`` of the Python docs (in domain);
* ``fortunes``: English quotations, literature, poems and anecdotes from Debian's ``fortunes``
  package (``apt-get install fortunes``), the prose files only (no computing, Linux, Perl or
  ASCII-art ones): text that is not Python documentation, to see the method out of domain;
* ``howto/`` of the Python docs: the split that chose the pass's default selection, kept apart
  from the two reported texts.

N:M patterns have one selection (group by group), so they run once.

    python benchmarks/sparsegpt_selection.py --configs unstructured@0.7 --seeds 0 --threads 2
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _harness  # noqa: E402
from accuracy import Config  # noqa: E402

FORTUNES = Path("/usr/share/games/fortunes")
#: fortune files of English prose (quotations, literature, poems, anecdotes), none about computing
FORTUNE_FILES = ("literature", "songs-poems", "wisdom", "people", "humorists", "love", "education",
                 "politics", "work", "science", "men-women", "food", "sports", "pets", "kids", "law")


def fortune_windows(tokenizer: Any, count: int, length: int) -> list[Any]:
    """``count`` windows of ``length`` tokens spread evenly over the prose fortune files, each
    fortune's ``%`` separator replaced by a blank line."""
    import torch

    if not FORTUNES.is_dir():
        raise SystemExit(f"{FORTUNES} is missing: run apt-get install -y fortunes")
    text = "\n\n".join((FORTUNES / name).read_text(encoding="utf-8", errors="replace").replace("\n%\n", "\n\n")
                       for name in FORTUNE_FILES)
    ids = tokenizer(text).input_ids
    available = len(ids) // length
    step = available / count
    return [torch.tensor([ids[int(i * step) * length:(int(i * step) + 1) * length]]) for i in range(count)]


def prune(program: Any, config: Config, selection: str, calibration: list[tuple[Any, ...]], seed: int) -> Any:
    from sparsecc.pass_manager import PassContext, PassManager
    from sparsecc.targets import get_target

    pipeline = (f"plan-uniform{{sparsity={config.sparsity:g},pattern={config.pattern},method=sparsegpt}},"
                f"prune-sparsegpt{{selection={selection}}}")
    ctx = PassContext(get_target("x86"), calibration=calibration, seed=seed, progress=False)
    result = PassManager(pipeline).run(program, ctx)
    problems = result.program.verify()
    if problems:
        raise SystemExit(f"the pruned program does not verify: {problems[:3]}")
    return result.program


def run(args: argparse.Namespace) -> list[dict[str, Any]]:
    import sparsecc
    from sparsecc.zoo import pydocs, smollm

    model = smollm.load_smollm(max_seq=args.seq)
    tokenizer = smollm.load_tokenizer()
    texts = {"tutorial": pydocs.evaluation_windows(tokenizer, args.windows, args.seq, folder="tutorial"),
             "fortunes": fortune_windows(tokenizer, args.windows, args.seq),
             "howto": pydocs.evaluation_windows(tokenizer, args.windows // 2, args.seq, folder="howto")}
    program = sparsecc.capture(model, (texts["tutorial"][0],))

    def score(prog: Any) -> dict[str, float]:
        return {name: pydocs.perplexity(lambda ids: prog.run(ids), windows) for name, windows in texts.items()}

    rows = [{"selection": "dense", "seed": None, "config": None, **score(program)}] if args.dense else []
    for row in rows:
        print(f"  dense: {row}", flush=True)
    for seed in args.seeds:
        calibration = [(s,) for s in pydocs.calibration_segments(tokenizer, args.samples, args.seq, seed=seed)]
        for config in args.configs:
            for selection in (["row"] if ":" in config.pattern else args.selections):
                start = time.perf_counter()
                pruned = prune(program, config, selection, calibration, seed)
                seconds = time.perf_counter() - start
                row = {"selection": selection, "seed": seed, "config": config.label, "seconds": seconds,
                       **score(pruned)}
                rows.append(row)
                print(f"  {config.label} {selection} seed {seed}: "
                      + ", ".join(f"{k} {row[k]:.4g}" for k in texts) + f" ({seconds:.0f} s to prune)", flush=True)
    return rows


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--configs", default="unstructured@0.5,unstructured@0.7,2:4")
    parser.add_argument("--selections", default="row,block")
    parser.add_argument("--seeds", default="0")
    parser.add_argument("--samples", type=int, default=32)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--windows", type=int, default=16, help="windows of tutorial/ and fortunes (howto/: half)")
    parser.add_argument("--no-dense", dest="dense", action="store_false", help="skip the dense row")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", default=None, help="write the rows to this JSON file")
    args = parser.parse_args(argv)
    args.configs = [Config.parse(c) for c in args.configs.split(",") if c]
    args.selections = [s for s in args.selections.split(",") if s]
    args.seeds = [int(s) for s in args.seeds.split(",") if s]
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    _harness.pin_threads(args.threads)
    _harness.configure_torch(args.threads)
    print(f"command: {_harness.command_line()}", flush=True)
    rows = run(args)
    if args.out:
        with open(args.out, "w", encoding="utf-8") as f:
            json.dump({"command": _harness.command_line(), "rows": rows}, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
