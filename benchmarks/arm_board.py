"""Time arm-neon artifacts on a real ARM board: sparse against dense builds of the same model.

ARM speed cannot be measured on an x86 machine (qemu translates instructions; its timings say
nothing). This script is for a user with an AArch64 board (Raspberry Pi 5, Graviton, Ampere...):
copy the artifact folders (``sparsecc compile MODEL --target arm-neon -o OUT``, one dense with
``--sparsity 0`` and one or more sparse) and this file to the board, then run there::

    python3 arm_board.py OUT_DENSE OUT_SPARSE [OUT_SPARSE2 ...] [--rounds 15]

It needs only Python 3 and a C compiler on the board (no sparsecc, torch or numpy). For each
folder it compiles a small timing harness against the artifact's ``model.o`` / ``model.h``
(``gcc -O2``), then runs the executables one after another, round after round, so that a drift of
the board (heat, clock) hits all of them alike. Each run fills the model's inputs with zeros,
calls ``sparsecc_invoke`` once to warm up, then times enough back-to-back calls for about
``--block-ms``; the median over rounds is reported with the ratio to the first folder.

``--cc`` and ``--exec`` let the script run elsewhere, e.g. on x86 through the cross compiler and
qemu (``--cc "aarch64-linux-gnu-gcc -static" --exec qemu-aarch64-static``): that checks that the
harness builds and runs, and the script prints that such timings are not ARM timings.
"""

from __future__ import annotations

import argparse
import json
import platform
import shlex
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

HARNESS = r"""
/* Times one sparsecc arm-neon model: zero inputs, one warm-up call, then blocks of calls. */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include "model.h"

static double now(void) {
  struct timespec t;
  clock_gettime(CLOCK_MONOTONIC, &t);
  return (double)t.tv_sec + 1e-9 * (double)t.tv_nsec;
}

int main(int argc, char** argv) {
  double block = argc > 1 ? atof(argv[1]) : 0.2; /* seconds of calls to time */
  for (int i = 0; i < sparsecc_num_inputs(); i++) memset(sparsecc_input(i), 0, sparsecc_input_nbytes(i));
  double t0 = now();
  if (sparsecc_invoke() != 0) {
    fprintf(stderr, "sparsecc: the model failed: %s\n", sparsecc_error());
    return 3;
  }
  double once = now() - t0;
  long reps = once > 0 ? (long)(block / once) : 1;
  if (reps < 1) reps = 1;
  t0 = now();
  for (long r = 0; r < reps; r++) sparsecc_invoke();
  printf("{\"seconds_per_call\": %.9f, \"calls\": %ld}\n", (now() - t0) / (double)reps, reps);
  return 0;
}
"""


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("artifacts", nargs="+", help="arm-neon artifact folders (the first is the baseline, e.g. dense)")
    p.add_argument("--rounds", type=int, default=15, help="rounds; each runs every artifact once")
    p.add_argument("--block-ms", type=float, default=200.0, help="milliseconds of calls timed per run")
    p.add_argument("--cc", default="gcc", help="C compiler command for the board (default gcc)")
    p.add_argument("--exec", default="", help="command prefix to run the executables (e.g. qemu-aarch64-static)")
    return p.parse_args(argv)


def _describe(folder: Path) -> str:
    """Target and plan summary from the artifact's manifest."""
    manifest = json.loads((folder / "manifest.json").read_text())
    if manifest.get("target") != "arm-neon":
        raise SystemExit(f"{folder}: an artifact for {manifest.get('target')!r}, not arm-neon")
    layers = manifest.get("plan", {}).get("layers", [])
    layers = layers.values() if isinstance(layers, dict) else layers
    sparse = [lp for lp in layers if lp.get("pattern")]
    if not sparse:
        return "dense"
    patterns = sorted({lp["pattern"] for lp in sparse})
    mean = sum(lp["sparsity"] for lp in sparse) / len(sparse)
    return f"{'/'.join(patterns)} {mean:.0%} ({len(sparse)} sparse layers)"


def build(folder: Path, cc: str, work: Path, index: int) -> Path:
    """Compile the timing harness against ``folder``'s model.o / model.h, as executable number
    ``index`` in ``work`` (folders may share a name: run1/out, run2/out)."""
    for name in ("model.o", "model.h"):
        if not (folder / name).is_file():
            raise SystemExit(f"{folder}: no {name}; compile the model with --target arm-neon")
    source = work / f"{index}_timing.c"
    source.write_text(HARNESS)
    exe = work / f"{index}_timing"
    cmd = [*shlex.split(cc), "-O2", f"-I{folder}", str(source), str(folder / "model.o"), "-lm", "-o", str(exe)]
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"building the harness for {folder} failed:\n{' '.join(cmd)}\n{done.stderr}")
    return exe


def run_once(exe: Path, prefix: list[str], block_ms: float) -> float:
    done = subprocess.run([*prefix, str(exe), str(block_ms / 1000)], capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"{exe} failed ({done.returncode}): {done.stderr.strip()}")
    return float(json.loads(done.stdout)["seconds_per_call"])


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    folders = [Path(a) for a in args.artifacts]
    prefix = shlex.split(args.exec)
    native = platform.machine() in ("aarch64", "arm64") and not prefix
    print(f"command: {' '.join(shlex.quote(a) for a in sys.argv)}")
    print(f"machine: {platform.machine()} {platform.processor() or ''}".rstrip())
    if not native:
        print("NOTE: not running natively on AArch64: these times are not ARM timings (emulated or cross run)")
    plans = {f: _describe(f) for f in folders}  # also refuses folders that are not arm-neon artifacts
    samples: dict[Path, list[float]] = {f: [] for f in folders}
    with tempfile.TemporaryDirectory(prefix="sparsecc-arm-board-") as tmp:
        exes = {f: build(f, args.cc, Path(tmp), i) for i, f in enumerate(folders)}
        for _ in range(args.rounds):
            for f in folders:
                samples[f].append(run_once(exes[f], prefix, args.block_ms))
    base = statistics.median(samples[folders[0]])
    unique = len({f.name for f in folders}) == len(folders)
    names = {f: f.name if unique else f"{f.parent.name}/{f.name}" for f in folders}
    print(f"\n{'artifact':<32} {'plan':<40} {'median ms':>10} {'vs first':>9}")
    for f in folders:
        med = statistics.median(samples[f])
        print(f"{names[f]:<32} {plans[f]:<40} {med * 1e3:10.3f} {base / med:9.2f}x")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
