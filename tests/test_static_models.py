"""Whole models compiled for the targets without a Relax VM (``wasm-simd`` under wasmtime,
``arm-neon`` under qemu): the bundled digits CNN, sparse and dense, run from saved artifacts and
compared with the masked-dense program; ``model.js`` under Node; ``model.o`` + ``model.h`` linked
into a C program; wrong inputs, damaged files and untranslatable Relax refused with clear errors."""

from __future__ import annotations

import dataclasses
import gc
import json
import shutil
import subprocess
import warnings

import numpy as np
import pytest

tvm = pytest.importorskip("tvm")

import sparsecc  # noqa: E402
import torch  # noqa: E402
from sparsecc.errors import ArtifactError, TargetError  # noqa: E402
from sparsecc.targets import arm_toolchain, get_target, wasm_toolchain  # noqa: E402
from sparsecc.targets import static_program as sp  # noqa: E402
from target_cases import require  # noqa: E402

TOOLCHAINS = {"wasm-simd": (wasm_toolchain.missing, "the wasm toolchain"),
              "arm-neon": (arm_toolchain.missing, "the arm-neon toolchain")}
#: the files each target's artifact carries beside the common ones
MODEL_FILES = {"wasm-simd": {"model.wasm", "model.js", "model.json"},
               "arm-neon": {"model.elf", "model.o", "model.h", "model.json"}}
BATCH = 8


def _require(target: str) -> None:
    missing, what = TOOLCHAINS[target]
    require(missing(), what)


@pytest.fixture(scope="module")
def digits():
    from sparsecc.zoo.digits import train_digits_cnn

    model, data = train_digits_cnn(seed=0)
    example = (data.train_images[:BATCH].contiguous(),)
    calib = [(data.train_images[i:i + BATCH].contiguous(),) for i in range(0, BATCH * 4, BATCH)]
    return model, data, example, calib


@pytest.fixture(scope="module")
def built():
    """Artifacts built in this module, by (target, sparsity); dropped at the end so wasmtime's
    objects are freed before interpreter shutdown (freed later, they print errors)."""
    cache: dict[tuple[str, float], tuple[object, object]] = {}
    yield cache
    cache.clear()
    gc.collect()


def _artifact(digits, built, tmp_path_factory, target: str, sparsity: float):
    """The digits CNN compiled for ``target`` (block4x1 at ``sparsity``), saved to a folder (built
    once per module and configuration)."""
    _require(target)
    key = (target, sparsity)
    if key not in built:
        model, _, example, calib = digits
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            artifact = sparsecc.compile(model, example, target=target, sparsity=sparsity, pattern="block4x1",
                                        method="wanda", calibration=calib, progress=False)
        out = artifact.save(tmp_path_factory.mktemp(f"{target}-{sparsity:g}") / "art")
        built[key] = (artifact, out)
    return built[key]


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


@pytest.mark.parametrize("target", ["wasm-simd", "arm-neon"])
@pytest.mark.parametrize("sparsity", [0.5, 0.0])
def test_digits_cnn_matches_masked_dense(digits, built, tmp_path_factory, target, sparsity):
    artifact, out = _artifact(digits, built, tmp_path_factory, target, sparsity)
    _, data, _, _ = digits
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["target"] == target and manifest["format_version"] == 2
    assert MODEL_FILES[target] <= set(manifest["files"]) and manifest["library"] in MODEL_FILES[target]
    assert artifact.report.compiled_vs_reference["rel"] < 1e-4
    build = next(p for p in artifact.report.passes if p["name"] == "build")
    assert build["counters"]["static_kernel_calls"] >= 8 and build["counters"]["static_constant_bytes"] > 0
    assert any(d["message"].startswith("static program: ") for d in artifact.report.diagnostics)
    sparse = [lr for lr in artifact.report.layers if lr.decision == "sparse"]
    assert len(sparse) >= (2 if sparsity else 0)
    loaded = sparsecc.load(out)
    for start in (0, 40):
        x = data.test_images[start:start + BATCH].contiguous()
        got, want = loaded(x), artifact.reference(x)
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(artifact.packed(x), want, rtol=1e-5, atol=1e-5)
        assert _rel(got, want) < 1e-4


def test_whole_models_use_vector_instructions(digits, built, tmp_path_factory):
    """The kernels linked into a whole model are the vectorized ones: f32x4 arithmetic in
    model.wasm, NEON ``fmla v.4s`` in model.o."""
    import re

    from wasm_check import require_wasm2wat

    _, wasm_out = _artifact(digits, built, tmp_path_factory, "wasm-simd", 0.5)
    _, arm_out = _artifact(digits, built, tmp_path_factory, "arm-neon", 0.5)
    require_wasm2wat()
    assert len(re.findall(r"f32x4\.(?:mul|add|fma)", wasm_toolchain.wat(wasm_out / "model.wasm"))) > 50
    objdump = arm_toolchain.binutil(arm_toolchain.find_toolchain().gcc, "objdump")
    require([] if objdump.is_file() else [f"{objdump.name} (Debian: binutils-aarch64-linux-gnu)"], "objdump")
    listing = subprocess.run([str(objdump), "-d", str(arm_out / "model.o")], capture_output=True, text=True,
                             check=True).stdout
    assert len(re.findall(r"\bfmla\s+v\d+\.4s", listing)) > 50


@pytest.mark.parametrize("target", ["wasm-simd", "arm-neon"])
def test_bf16_weights(digits, target):
    """bf16-stored weights and values (16-bit constants in the blob, fp32 arithmetic): within bf16
    rounding of the masked-dense program."""
    _require(target)
    model, data, example, calib = digits
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        artifact = sparsecc.compile(model, example, target=target, sparsity=0.5, pattern="block4x1",
                                    weights="bf16", calibration=calib, progress=False)
    x = data.test_images[:BATCH].contiguous()
    rel = _rel(artifact(x), artifact.reference(x))
    assert 1e-6 < rel < 1e-2  # bf16 rounding shows, and nothing more


@pytest.mark.parametrize("target", ["wasm-simd", "arm-neon"])
def test_wrong_inputs_are_refused(digits, built, tmp_path_factory, target):
    artifact, out = _artifact(digits, built, tmp_path_factory, target, 0.5)
    loaded = sparsecc.load(out)
    with pytest.raises(ArtifactError, match=r"input 0 has shape \(4, 1, 8, 8\).*compiled for \(8, 1, 8, 8\)"):
        loaded(torch.zeros(4, 1, 8, 8))
    # The runner checks on its own too (it is used without an Artifact by benchmarks and users).
    from sparsecc.targets.runners import load_library

    session = load_library(get_target(target).runner, loaded.library)
    with pytest.raises(TargetError, match=r"input 0 has shape \(8, 1, 8, 8\) torch.float64"):
        session(torch.zeros(BATCH, 1, 8, 8, dtype=torch.float64))
    with pytest.raises(TargetError, match="takes 1 inputs, got 2"):
        session(torch.zeros(BATCH, 1, 8, 8), torch.zeros(BATCH, 1, 8, 8))


@pytest.mark.parametrize("target", ["wasm-simd", "arm-neon"])
def test_damaged_model_files_are_refused(digits, built, tmp_path_factory, tmp_path, target):
    _, out = _artifact(digits, built, tmp_path_factory, target, 0.5)
    damaged = shutil.copytree(out, tmp_path / "damaged")
    (damaged / "model.json").write_text("{}")
    with pytest.raises(ArtifactError, match="model.json is damaged"):
        sparsecc.load(damaged)
    missing = shutil.copytree(out, tmp_path / "missing")
    library = json.loads((missing / "manifest.json").read_text())["library"]
    (missing / library).unlink()
    with pytest.raises(ArtifactError, match=f"{library} is missing"):
        sparsecc.load(missing)
    # Without the manifest's hashes the runner still refuses a damaged signature.
    from sparsecc.targets.runners import load_library

    with pytest.raises(ArtifactError, match="model.json is damaged"):
        load_library(get_target(target).runner, damaged / library)


@pytest.mark.parametrize("target", ["arm-neon", "wasm-simd"])
def test_cli_compiles_and_runs(mlp, tmp_path, capsys, target):
    """``sparsecc compile --target T`` then ``sparsecc run``: the command line end to end."""
    from sparsecc.cli import main as cli_main

    _require(target)
    model, example, calib = mlp
    torch.export.save(torch.export.export(model, example), tmp_path / "model.pt2")
    torch.save(calib, tmp_path / "calib.pt")
    torch.save(example, tmp_path / "x.pt")
    out = tmp_path / "out"
    assert cli_main(["compile", str(tmp_path / "model.pt2"), "--target", target, "--sparsity", "0.5",
                     "--pattern", "block4x1", "--calib", str(tmp_path / "calib.pt"), "-o", str(out), "-q"]) == 0
    assert "artifact written" in capsys.readouterr().out
    assert MODEL_FILES[target] <= {p.name for p in out.iterdir()}
    for engine in ("compiled", "reference"):
        assert cli_main(["run", str(out), "--inputs", str(tmp_path / "x.pt"), "--output",
                         str(tmp_path / f"{engine}.pt"), "--engine", engine]) == 0
    compiled, reference = torch.load(tmp_path / "compiled.pt"), torch.load(tmp_path / "reference.pt")
    torch.testing.assert_close(compiled, reference, rtol=1e-4, atol=1e-5)


NODE_SCRIPT = r"""
const fs = require("fs");
const { load } = require(process.argv[2]);
(async () => {
  const model = await load();
  const raw = fs.readFileSync(process.argv[3]);  // a Buffer: a view into a shared pool
  const x = new Float32Array(raw.buffer.slice(raw.byteOffset, raw.byteOffset + raw.byteLength));
  const [y] = model.run(x);
  let refused = "";
  try { model.run(new Float32Array(3)); } catch (e) { refused = e.message; }
  process.stdout.write(JSON.stringify({ y: Array.from(y), shape: model.signature.outputs[0].shape, refused }));
})().catch((e) => { console.error(e); process.exit(1); });
"""


def test_model_js_runs_under_node(digits, built, tmp_path_factory, tmp_path):
    node = shutil.which("node")
    require([] if node else ["node (Debian: nodejs)"], "Node.js")
    artifact, out = _artifact(digits, built, tmp_path_factory, "wasm-simd", 0.5)
    x = digits[1].test_images[:BATCH].contiguous()
    (tmp_path / "x.bin").write_bytes(x.numpy().tobytes())
    (tmp_path / "run.js").write_text(NODE_SCRIPT)
    done = subprocess.run([node, str(tmp_path / "run.js"), str(out / "model.js"), str(tmp_path / "x.bin")],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout)
    assert result["shape"] == [BATCH, 10]
    y = torch.tensor(result["y"], dtype=torch.float32).reshape(BATCH, 10)
    torch.testing.assert_close(y, artifact.reference(x), rtol=1e-4, atol=1e-4)
    assert "input 0 must be a Float32Array of 512 elements" in result["refused"]


USER_PROGRAM = r"""
#include <stdio.h>
#include "model.h"
static float x[SPARSECC_INPUT0_NBYTES / sizeof(float)];
static float y[SPARSECC_OUTPUT0_NBYTES / sizeof(float)];
int main(void) {
  if (fread(x, 1, sizeof x, stdin) != sizeof x) return 2;
  if (sparsecc_run(x, y) != 0) { fprintf(stderr, "%s\n", sparsecc_error()); return 3; }
  fwrite(y, 1, sizeof y, stdout);
  return 0;
}
"""


def test_arm_object_and_header_link_into_a_program(digits, built, tmp_path_factory, tmp_path):
    """What a user does on a device: compile a program against model.h, link model.o (-lm)."""
    artifact, out = _artifact(digits, built, tmp_path_factory, "arm-neon", 0.5)
    tools = arm_toolchain.find_toolchain()
    (tmp_path / "main.c").write_text(USER_PROGRAM)
    exe = tmp_path / "user"
    subprocess.run([tools.gcc, "-O2", "-Wall", "-Werror", "-static", f"-I{out}", str(tmp_path / "main.c"),
                    str(out / "model.o"), "-lm", "-o", str(exe)], check=True, capture_output=True)
    x = digits[1].test_images[:BATCH].contiguous()
    done = subprocess.run([tools.qemu, str(exe)], input=x.numpy().tobytes(), capture_output=True, timeout=120)
    assert done.returncode == 0, done.stderr
    y = torch.from_numpy(np.frombuffer(done.stdout, np.float32).copy()).reshape(BATCH, 10)
    torch.testing.assert_close(y, artifact.reference(x), rtol=1e-4, atol=1e-4)
    header = (out / "model.h").read_text()
    assert "int sparsecc_run(const float* input0, float* output0);" in header
    assert "input 0: float32 [8, 1, 8, 8]" in header


class _ThreeOutputs(torch.nn.Module):
    """Outputs that are a kernel's result, a reshaped intermediate and a reshaped input scaled:
    views (reshape) and a tuple result through the static driver."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = torch.nn.Linear(64, 32)
        self.head = torch.nn.Linear(32, 16)

    def forward(self, x: torch.Tensor):
        h = torch.relu(self.fc(x))
        return self.head(h), h.reshape(-1), x.reshape(-1) * 2.0


@pytest.mark.parametrize("target", ["wasm-simd", "arm-neon"])
def test_tuple_outputs_and_reshaped_views(target):
    _require(target)
    torch.manual_seed(0)
    model = _ThreeOutputs().eval()
    x = torch.randn(4, 64)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        artifact = sparsecc.compile(model, (x,), target=target, sparsity=0.5, pattern="unstructured",
                                    method="magnitude", progress=False)
    x = torch.randn(4, 64)
    got, want = artifact(x), artifact.reference(x)
    assert isinstance(got, tuple) and [g.shape for g in got] == [w.shape for w in want]
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-5)


BROWSER_SCRIPT = r"""
// model.js as a page's <script> sees it: no module, no process; fetch over HTTP.
const vm = require("vm"), fs = require("fs");
const page = { fetch, WebAssembly, TextDecoder, URL, console };
page.self = page;
vm.runInNewContext(fs.readFileSync(process.argv[2], "utf8"), page);
(async () => {
  const model = await page.sparseccModel.load(process.argv[3]);
  const [y] = model.run(new Float32Array(model.signature.inputs[0].size));
  process.stdout.write(JSON.stringify({ n: y.length, finite: y.every(Number.isFinite) }));
})().catch((e) => { console.error(e); process.exit(1); });
"""


def test_model_js_loads_as_a_browser_script(digits, built, tmp_path_factory, tmp_path):
    """The loader's page path: a global ``sparseccModel`` and the module fetched over HTTP."""
    import functools
    import http.server
    import threading

    node = shutil.which("node")
    require([] if node else ["node (Debian: nodejs)"], "Node.js")
    _, out = _artifact(digits, built, tmp_path_factory, "wasm-simd", 0.5)
    class Quiet(http.server.SimpleHTTPRequestHandler):
        def log_message(self, *args) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(Quiet, directory=str(out)))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        (tmp_path / "page.js").write_text(BROWSER_SCRIPT)
        url = f"http://127.0.0.1:{server.server_address[1]}/model.wasm"
        done = subprocess.run([node, str(tmp_path / "page.js"), str(out / "model.js"), url],
                              capture_output=True, text=True, timeout=120)
    finally:
        server.shutdown()
        server.server_close()
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout) == {"n": BATCH * 10, "finite": True}


def test_untranslatable_binding_raises():
    """A binding the static driver has no translation for (here an operator nobody legalized)
    stops the build with its name, instead of being skipped."""
    from tvm import relax

    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType([4, 8], "float32"))
    with bb.function("main", [x]):
        y = bb.emit(relax.op.nn.relu(x))
        bb.emit_func_output(y)
    with pytest.raises(sp.StaticProgramError, match=r"binding .*cannot translate a call of relax.nn.relu"):
        sp.translate(bb.get())


def test_dynamic_input_shape_raises():
    from tvm import relax, tirx

    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType([tirx.Var("n", "int64"), 8], "float32"))
    with bb.function("main", [x]):
        bb.emit_func_output(x)
    with pytest.raises(sp.StaticProgramError, match="input 0 .*not static"):
        sp.translate(bb.get())


def test_model_build_refusal_still_guards_targets_without_one():
    record = dataclasses.replace(get_target("wasm-simd"), builds_models=False)
    with pytest.raises(TargetError, match="whole-model lowering for this target is not built yet"):
        record.require_model_build()


@pytest.mark.slow
@pytest.mark.parametrize("target", ["wasm-simd", "arm-neon"])
def test_mobilenet_v2_at_50_percent(tmp_path, target):
    """A real ImageNet model (53 convolutions and linears, depthwise and strided ones among them,
    batch norm, relu6, average pooling) through the static driver: about a minute per target."""
    from real_data import mobilenet_or_skip

    _require(target)
    mobilenet = mobilenet_or_skip()
    model = mobilenet.load_mobilenet_v2().eval()
    calib = [(c,) for c in mobilenet.augmented_crops(4, seed=0).split(1)]
    x = mobilenet.augmented_crops(2, seed=1000).split(1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        artifact = sparsecc.compile(model, x[0], target=target, sparsity=0.5, pattern="block4x1", method="wanda",
                                    calibration=calib, progress=False)
    assert sum(lr.decision == "sparse" for lr in artifact.report.layers) >= 20
    loaded = sparsecc.load(artifact.save(tmp_path / "art"))
    for image in x:
        want = artifact.reference(image)
        torch.testing.assert_close(loaded(image), want, rtol=1e-4, atol=1e-4)
    del loaded, artifact
    gc.collect()


@pytest.mark.slow
@pytest.mark.models
@pytest.mark.parametrize("target", ["wasm-simd", "arm-neon"])
def test_minilm_two_int64_inputs(target):
    """A transformer with two int64 inputs (token ids, attention mask): embedding gathers, layer
    norms, softmax, gelu and attention matmuls through the static driver (about 30 s a target)."""
    from real_data import minilm_or_skip

    _require(target)
    minilm = minilm_or_skip()
    embedder, tokenizer = minilm.load_minilm_embedder()
    example = minilm.encode(tokenizer, minilm.CALIBRATION_SENTENCES[:2], length=16)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        artifact = sparsecc.compile(embedder, example, target=target, sparsity=0.5, pattern="block4x1",
                                    method="magnitude", progress=False)
    ids, mask = minilm.encode(tokenizer, minilm.SENTENCES[:2], length=16)
    torch.testing.assert_close(artifact(ids, mask), artifact.reference(ids, mask), rtol=1e-4, atol=1e-5)
    with pytest.raises(ArtifactError, match=r"input 1 has shape \(2, 16\) torch.int32"):
        artifact(ids, mask.int())


def _add_program(target: str):
    """A one-kernel static program (``x + x`` on a (4, 8) input), legalized by TVM."""
    from tvm import relax

    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType([4, 8], "float32"))
    with bb.function("main", [x]):
        with bb.dataflow():
            y = bb.emit_output(bb.emit(relax.op.add(x, x)))
        bb.emit_func_output(y)
    mod = relax.transform.LegalizeOps()(bb.get())
    return sp.translate(sp.plan_memory(mod, get_target(target).tvm_target()))


@pytest.mark.parametrize("target", ["wasm-simd", "arm-neon"])
def test_a_failing_kernel_reports_tvm_s_message(tmp_path, target):
    """A kernel that rejects its arguments stops the run with TVM's own message, through the
    driver's error text and the runner (here the input's descriptor claims 9 columns, not 8)."""
    from sparsecc.targets.runners import load_library

    _require(target)
    record = get_target(target)
    program = _add_program(target)
    good = sp.build_program(program, record, tmp_path / "good")
    x = torch.arange(32, dtype=torch.float32).reshape(4, 8)
    (y,) = load_library(record.runner, good)(x)
    torch.testing.assert_close(y, x + x)
    view = program.views[0]
    assert view.base == "input"
    program.views[0] = dataclasses.replace(view, spec=sp.TensorSpec((4, 9), "float32"))
    bad = sp.build_program(program, record, tmp_path / "bad")
    with pytest.raises(TargetError, match=r"failed.*Invalid x.shape\[1\]"):
        load_library(record.runner, bad)(x)
    node = shutil.which("node")
    if target == "wasm-simd" and node:
        # model.js throws with the same message
        script = 'require(process.argv[1]).load().then((m) => m.run(new Float32Array(32))).catch((e) => ' \
                 '{ console.log(e.message); process.exit(0); }).then((y) => { if (y) process.exit(1); });'
        done = subprocess.run([node, "-e", script, str(bad.parent / "model.js")], capture_output=True, text=True,
                              timeout=60)
        assert done.returncode == 0 and "the model failed: ValueError: Invalid x.shape[1]" in done.stdout


def test_arm_board_script_builds_and_times_artifacts(digits, built, tmp_path_factory, capsys):
    # benchmarks/arm_board.py is for real boards; here it runs through the cross compiler and qemu,
    # which checks the harness builds against model.o / model.h and times every artifact.
    import importlib.util
    import pathlib

    _require("arm-neon")
    script = pathlib.Path(__file__).parent.parent / "benchmarks" / "arm_board.py"
    spec = importlib.util.spec_from_file_location("arm_board", script)
    board = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(board)
    _, dense = _artifact(digits, built, tmp_path_factory, "arm-neon", 0.0)
    _, sparse = _artifact(digits, built, tmp_path_factory, "arm-neon", 0.5)
    gcc = shutil.which("aarch64-linux-gnu-gcc")
    assert board.main([str(dense), str(sparse), "--rounds", "2", "--block-ms", "5",
                       "--cc", f"{gcc} -static", "--exec", "qemu-aarch64-static"]) == 0
    out = capsys.readouterr().out
    assert "not ARM timings" in out
    rows = [line for line in out.splitlines() if line.startswith("arm-neon")]
    assert len(rows) == 2 and "dense" in rows[0] and rows[0].endswith("1.00x") and "block4x1 50%" in rows[1]
    # both folders are named "art": each still gets its own executable, built from its own model.o
    work = tmp_path_factory.mktemp("board")
    first, second = (board.build(f, f"{gcc} -static", work, i) for i, f in enumerate((dense, sparse)))
    assert dense.name == sparse.name and first != second and first.read_bytes() != second.read_bytes()
    with pytest.raises(SystemExit, match="not arm-neon"):
        _, wasm = _artifact(digits, built, tmp_path_factory, "wasm-simd", 0.0)
        board.main([str(wasm), "--rounds", "1"])
