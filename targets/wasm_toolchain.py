"""Building TVM kernels into self-contained WebAssembly modules (wasm32 + simd128).

A kernel (a scheduled ``tvm.tirx.PrimFunc``) is compiled by TVM's LLVM backend to a wasm object
that exports ``__tvm_ffi_<name>`` (TVM's packed calling convention: ``int(void* self, const
TVMFFIAny* args, int32 nargs, TVMFFIAny* ret)``). That object needs a few runtime functions TVM's
C++ runtime would normally provide; :data:`SHIM_SOURCE` is a small freestanding C file with them
(a stack-like workspace allocator on linear memory, the error setter, a serial parallel launch)
plus helpers the runner calls to lay out DLTensor arguments. ``wasm-ld`` links object and shim
against wasi-libc's ``libc.a`` (which supplies ``expf``, ``memcpy`` and friends) into a module
with no imports, which :mod:`sparsecc.targets.runners.wasm` runs under wasmtime.

A whole model (:func:`link_model`) links its kernels, the shim and a generated driver into one
``model.wasm`` the same way, and gets ``model.js``, a loader for Node and browsers.

Tools looked up: ``clang`` and ``wasm-ld`` (plain or versioned names, e.g. ``clang-14``), wasi-libc
(``$WASI_SYSROOT/lib/wasm32-wasi`` or ``/usr/lib/wasm32-wasi``) and the ``wasmtime`` Python
package. On Debian: ``apt-get install clang lld wasi-libc wabt`` and ``pip install wasmtime``.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib.util
import os
import pathlib
import subprocess
from typing import Any

from sparsecc.errors import TargetError

from .kernel_runtime import C_RUNTIME, compiled_object, run_tool, temporary_object, which


class ToolchainMissing(TargetError):
    """A tool the wasm target needs is not installed."""


#: LLVM triple TVM compiles wasm kernels for
TRIPLE = "wasm32-unknown-unknown-wasm"

#: flags of the shim's compile (freestanding: no libc headers, no start files)
SHIM_FLAGS = ("--target=wasm32", "-O2", "-msimd128", "-ffreestanding", "-nostdlib", "-fno-builtin")

SHIM_SOURCE = r"""
/* Runtime support for one TVM-compiled kernel in a wasm32 module (freestanding, no headers). */
typedef __SIZE_TYPE__ size_t;
typedef __INT64_TYPE__ int64_t;
typedef __UINT64_TYPE__ uint64_t;
typedef __INT32_TYPE__ int32_t;
typedef __UINT32_TYPE__ uint32_t;
typedef __UINT16_TYPE__ uint16_t;
typedef __UINT8_TYPE__ uint8_t;

#define EXPORT(name) __attribute__((export_name(#name)))
#define ALIGN 64u
#define PAGE 65536u

extern unsigned char __heap_base;

/* ---- memory: a bump allocator whose blocks are released last-in first-out ---------------- */
static size_t top;
#define MAX_BLOCKS 1024
static size_t block_start[MAX_BLOCKS];
static size_t block_prev[MAX_BLOCKS];
static uint8_t block_live[MAX_BLOCKS];
static int n_blocks;

static size_t heap_top(void) {
  if (!top) top = (size_t)&__heap_base;
  return top;
}

EXPORT(sc_alloc) void* sc_alloc(size_t nbytes) {
  size_t start = (heap_top() + ALIGN - 1) & ~(size_t)(ALIGN - 1);
  size_t end = start + (nbytes ? nbytes : 1);
  size_t have = __builtin_wasm_memory_size(0) * PAGE;
  if (end < start) return 0;
  if (end > have && __builtin_wasm_memory_grow(0, (end - have + PAGE - 1) / PAGE) == (size_t)-1) return 0;
  if (n_blocks < MAX_BLOCKS) {
    block_start[n_blocks] = start;
    block_prev[n_blocks] = top;
    block_live[n_blocks] = 1;
    n_blocks++;
  }
  top = end;
  return (void*)start;
}

/* Free a block; the heap top drops past every freed block at the end of the stack. */
EXPORT(sc_free) void sc_free(void* ptr) {
  for (int i = n_blocks - 1; i >= 0; i--) {
    if (block_start[i] == (size_t)ptr) { block_live[i] = 0; break; }
  }
  while (n_blocks > 0 && !block_live[n_blocks - 1]) {
    n_blocks--;
    top = block_prev[n_blocks];
  }
}

void* sc_workspace_alloc(size_t nbytes) { return sc_alloc(nbytes); }
void sc_workspace_free(void* ptr) { sc_free(ptr); }
""" + C_RUNTIME


@dataclasses.dataclass(frozen=True)
class Toolchain:
    clang: str
    wasm_ld: str
    wasi_lib: pathlib.Path  # folder holding wasi-libc's libc.a and libm.a
    wasm2wat: str | None  # optional (Debian ``wabt``): only for reading a module's text form


def _versioned(base: str) -> list[str]:
    return [base] + [f"{base}-{v}" for v in range(25, 13, -1)]


def _wasi_lib() -> pathlib.Path | None:
    roots = []
    if os.environ.get("WASI_SYSROOT"):
        roots.append(pathlib.Path(os.environ["WASI_SYSROOT"]) / "lib" / "wasm32-wasi")
    roots += [pathlib.Path("/usr/lib/wasm32-wasi"), pathlib.Path("/usr/share/wasi-sysroot/lib/wasm32-wasi")]
    for root in roots:
        if (root / "libc.a").is_file():
            return root
    return None


def missing() -> list[str]:
    """What the wasm target lacks on this machine (empty when everything is there)."""
    out = []
    if which(*_versioned("clang")) is None:
        out.append("clang (Debian: clang)")
    if which(*_versioned("wasm-ld")) is None:
        out.append("wasm-ld (Debian: lld)")
    if _wasi_lib() is None:
        out.append("wasi-libc's libc.a (Debian: wasi-libc; or set WASI_SYSROOT)")
    # find_spec, not import: listing targets should not load wasmtime
    if importlib.util.find_spec("wasmtime") is None:
        out.append("the wasmtime Python package (pip install wasmtime)")
    return out


def available() -> bool:
    return not missing()


def find_toolchain() -> Toolchain:
    """The tools the wasm target builds with; :class:`ToolchainMissing` names what is absent."""
    lacking = missing()
    if lacking:
        raise ToolchainMissing("the wasm-simd target needs " + ", ".join(lacking))
    return Toolchain(clang=which(*_versioned("clang")), wasm_ld=which(*_versioned("wasm-ld")),
                     wasi_lib=_wasi_lib(), wasm2wat=which("wasm2wat"))


@functools.cache
def shim_object(clang: str) -> pathlib.Path:
    """The compiled shim (cached per shim text, flags and compiler)."""
    return compiled_object("wasm", "shim", SHIM_SOURCE, clang, SHIM_FLAGS)


def tvm_target(mattr: tuple[str, ...] = ("+simd128",)) -> dict[str, Any]:
    return {"kind": "llvm", "mtriple": TRIPLE, "mattr": list(mattr), "num-cores": 1}


def build_kernel(func: Any, out_path: str | os.PathLike[str], target: dict[str, Any] | None = None) -> pathlib.Path:
    """Compile one scheduled PrimFunc into a self-contained ``.wasm`` at ``out_path``.

    The module exports the kernel as ``__tvm_ffi_<global_symbol>``, its linear memory and the
    shim's ``sc_*`` helpers (see :data:`SHIM_SOURCE`), and imports nothing.
    """
    import tvm

    tools = find_toolchain()
    out_path = pathlib.Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    obj = out_path.with_suffix(".o")
    ex = tvm.compile(func, target=target or tvm_target())
    ex.mod.write_to_file(str(obj))
    try:
        run_tool([tools.wasm_ld, "--no-entry", "--export-dynamic", "--export=__heap_base", "--strip-debug",
              "-o", str(out_path), str(obj), str(shim_object(tools.clang)),
              f"-L{tools.wasi_lib}", "-lm", "-lc"])
    finally:
        obj.unlink(missing_ok=True)
    return out_path


def kernel_export(func: Any) -> str:
    """The export name of ``func``'s packed entry in a module from :func:`build_kernel`."""
    return f"__tvm_ffi_{func.attrs['global_symbol']}"


def wat(path: str | os.PathLike[str]) -> str:
    """The text form of a module (needs ``wasm2wat``, Debian's ``wabt``)."""
    tool = which("wasm2wat")
    if tool is None:
        raise ToolchainMissing("wasm2wat (Debian: wabt) is not installed")
    done = subprocess.run([tool, "--enable-all", str(path)], capture_output=True, text=True)
    if done.returncode != 0:
        raise TargetError(f"wasm2wat failed: {done.stderr.strip()}")
    return done.stdout


#: files of a built wasm model: the module, and the JavaScript loader for Node and browsers
MODEL_MODULE, MODEL_LOADER = "model.wasm", "model.js"

#: ``model.js``: a UMD script (``require`` in Node, ``<script>`` in a page, global
#: ``sparseccModel``) whose ``load(source)`` instantiates the module and returns ``run(...inputs)``;
#: ``__SIGNATURE__`` is replaced by the model's signature (``model.json``).
LOADER_SOURCE = r"""// A model compiled by sparsecc for wasm-simd: load model.wasm and run it.
// Node:    const { load } = require("./model.js"); const model = await load();
// Browser: <script src="model.js"></script> ... const model = await sparseccModel.load("model.wasm");
// Then:    const [logits] = model.run(new Float32Array(model.signature.inputs[0].size));
(function (root, factory) {
  if (typeof module === "object" && module.exports) module.exports = factory();
  else root.sparseccModel = factory();
})(typeof self !== "undefined" ? self : this, function () {
  "use strict";
  const SIGNATURE = __SIGNATURE__;
  const ARRAYS = {
    float32: Float32Array, float64: Float64Array, int32: Int32Array, int16: Int16Array, int8: Int8Array,
    uint8: Uint8Array, uint16: Uint16Array, uint32: Uint32Array, int64: BigInt64Array, bool: Uint8Array,
    bfloat16: Uint16Array,
  };
  for (const t of SIGNATURE.inputs.concat(SIGNATURE.outputs)) t.size = t.shape.reduce((a, b) => a * b, 1);
  const isNode = typeof process !== "undefined" && !!(process.versions && process.versions.node);

  async function bytesOf(source) {
    if (source === undefined) source = isNode ? require("path").join(__dirname, "model.wasm") : "model.wasm";
    if (typeof source !== "string" && !(typeof URL !== "undefined" && source instanceof URL)) return source;
    if (isNode && !/^https?:/.test(String(source))) return require("fs").readFileSync(source);
    const response = await fetch(source);
    if (!response.ok) throw new Error("sparsecc: could not fetch " + source + ": " + response.status);
    return response.arrayBuffer();
  }

  async function load(source) {
    const { instance } = await WebAssembly.instantiate(await bytesOf(source), {});
    const ex = instance.exports;
    function run(...inputs) {
      if (inputs.length !== SIGNATURE.inputs.length) {
        throw new Error("sparsecc: the model takes " + SIGNATURE.inputs.length + " inputs, got " + inputs.length);
      }
      inputs.forEach((x, i) => {
        const want = SIGNATURE.inputs[i];
        // by tag, not instanceof: an array made in another realm (iframe, worker, vm) is as good
        const kind = ArrayBuffer.isView(x) ? Object.prototype.toString.call(x).slice(8, -1) : typeof x;
        if (kind !== ARRAYS[want.dtype].name || x.length !== want.size) {
          throw new Error("sparsecc: input " + i + " must be a " + ARRAYS[want.dtype].name + " of " + want.size +
                          " elements (shape [" + want.shape + "]), got " +
                          kind + " of " + (x && x.length !== undefined ? x.length : 0));
        }
        new Uint8Array(ex.memory.buffer, ex.sparsecc_input(i), x.byteLength)
          .set(new Uint8Array(x.buffer, x.byteOffset, x.byteLength));
      });
      if (ex.sparsecc_invoke() !== 0) {
        const at = ex.sparsecc_error();
        const bytes = new Uint8Array(ex.memory.buffer, at, ex.sc_error_len());
        throw new Error("sparsecc: the model failed: " + new TextDecoder().decode(bytes));
      }
      // Views are made after the call: a kernel's workspace may have grown (and replaced) the memory.
      return SIGNATURE.outputs.map((t, i) => {
        const start = ex.sparsecc_output(i), Kind = ARRAYS[t.dtype];
        return new Kind(ex.memory.buffer.slice(start, start + t.size * Kind.BYTES_PER_ELEMENT));
      });
    }
    return { run, signature: SIGNATURE, instance };
  }
  return { load, signature: SIGNATURE };
});
"""


def link_model(program: Any, kernels: pathlib.Path, blob: pathlib.Path, folder: pathlib.Path) -> pathlib.Path:
    """Link a whole model (a :class:`~sparsecc.targets.static_program.StaticProgram` whose kernels
    are compiled into ``kernels`` and whose constants are the file ``blob``) into ``folder``: the
    self-contained ``model.wasm`` (no imports; the driver's ``sparsecc_*`` entry points, the shim's
    helpers and the memory exported) and ``model.js``, its loader."""
    import json

    from .static_program import driver_source

    tools = find_toolchain()
    source = SHIM_SOURCE + driver_source(program, blob, '.rodata.sparsecc_constants,"",@')
    module = folder / MODEL_MODULE
    with temporary_object(source, tools.clang, SHIM_FLAGS, folder, "driver") as driver:
        run_tool([tools.wasm_ld, "--no-entry", "--strip-debug", "-o", str(module), str(kernels), str(driver),
                  f"-L{tools.wasi_lib}", "-lm", "-lc"])
    signature = {"inputs": [s.to_json() for s in program.inputs],
                 "outputs": [s.to_json() for s in program.output_specs]}
    (folder / MODEL_LOADER).write_text(LOADER_SOURCE.replace("__SIGNATURE__", json.dumps(signature)))
    return module
