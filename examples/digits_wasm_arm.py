"""Example: the bundled digits CNN compiled for WebAssembly and for AArch64, as whole models.

Trains (or loads from the cache) the small CNN on scikit-learn's digits, prunes it with Wanda to
70 % ``block4x1`` and compiles it for ``wasm-simd`` and ``arm-neon``. Each artifact is a folder
with a static program: ``model.wasm`` + ``model.js`` (loadable in Node and browsers) or
``model.o`` + ``model.h`` (link into a C program on an ARM device) + ``model.elf``. The held-out
accuracy of the compiled model (run in wasmtime, or under qemu) is printed beside the dense
model's and the pruned program's; with Node.js installed the wasm model also runs through
``model.js``.

    python examples/digits_wasm_arm.py [--sparsity 0.7] [--out DIR]
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import tempfile
import warnings
from pathlib import Path

import sparsecc
from sparsecc.targets import get_target
from sparsecc.zoo import accuracy, train_digits_cnn

BATCH = 64
TARGETS = ("wasm-simd", "arm-neon")

NODE_SCRIPT = """
const { load } = require(process.argv[2]);
load().then((model) => {
  const [logits] = model.run(new Float32Array(model.signature.inputs[0].size));
  console.log(JSON.stringify({ outputs: logits.length }));
});
"""


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sparsity", type=float, default=0.7)
    parser.add_argument("--out", type=Path, default=None, help="folder for the two artifacts (default: temporary)")
    args = parser.parse_args(argv)
    out = args.out or Path(tempfile.mkdtemp(prefix="sparsecc-digits-"))

    model, data = train_digits_cnn(seed=0)
    example = (data.train_images[:BATCH].contiguous(),)
    calibration = [(data.train_images[i:i + BATCH].contiguous(),) for i in range(0, BATCH * 8, BATCH)]
    dense = accuracy(model, data.test_images, data.test_labels, batch_size=BATCH)
    print(f"dense PyTorch accuracy: {dense:.3f}")
    for target in TARGETS:
        if not get_target(target).runs_here:
            print(f"{target}: toolchain missing here, skipped (see `sparsecc targets`)")
            continue
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            artifact = sparsecc.compile(model, example, target=target, sparsity=args.sparsity, pattern="block4x1",
                                        method="wanda", calibration=calibration, progress=False)
        folder = artifact.save(out / target)
        loaded = sparsecc.load(folder)
        pruned = accuracy(loaded.reference, data.test_images, data.test_labels, batch_size=BATCH)
        compiled = accuracy(loaded, data.test_images, data.test_labels, batch_size=BATCH)
        files = json.loads((folder / "manifest.json").read_text())
        model_files = [files["library"], *files["model_files"]]
        print(f"{target}: pruned {pruned:.3f}, compiled {compiled:.3f}; {folder}: {', '.join(model_files)}")
        node = shutil.which("node")
        if target == "wasm-simd" and node:
            script = folder.parent / "run_model.js"
            script.write_text(NODE_SCRIPT)
            done = subprocess.run([node, str(script), str(folder / "model.js")], capture_output=True, text=True)
            print(f"  node model.js: {done.stdout.strip() or done.stderr.strip()}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
