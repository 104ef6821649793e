"""Building TVM kernels into static AArch64 executables (NEON) that run under qemu-user.

A kernel (a scheduled ``tvm.tirx.PrimFunc``) is compiled by TVM's LLVM backend to an AArch64
object exporting ``__tvm_ffi_<name>``; :data:`HARNESS_SOURCE` is a small C program around it
(the shared kernel runtime of :mod:`sparsecc.targets.kernel_runtime`, with ``aligned_alloc`` as
the workspace allocator) that reads the arguments from stdin, calls the kernel and writes the
outputs to stdout. ``aarch64-linux-gnu-gcc -static`` links harness and object against glibc into
one executable, which :mod:`sparsecc.targets.runners.arm` runs under ``qemu-aarch64-static``.

Stdin, all little-endian: ``int32 nargs, n_outputs``; then per argument ``int32 code, bits,
ndim, 0``, ``int64 shape[ndim]``, ``int64 nbytes`` and the bytes. Stdout: the bytes of the last
``n_outputs`` arguments after the call. A failing kernel exits with status 3 and TVM's message on
stderr; malformed input exits with status 2.

A whole model (:func:`link_model`) is one relocatable ``model.o`` (kernels, generated driver and
this runtime) with ``model.h``, plus ``model.elf``, the object linked with a generic main that
reads the inputs' bytes from stdin and writes the outputs' to stdout.

Tools looked up: ``aarch64-linux-gnu-gcc`` (with the AArch64 glibc), its ``objcopy`` (binutils)
and ``qemu-aarch64-static`` (or ``qemu-aarch64``). On Debian: ``apt-get install qemu-user-static gcc-aarch64-linux-gnu
libc6-dev-arm64-cross``. qemu translates instructions: its timings say nothing about ARM speed.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import pathlib
import subprocess
from typing import Any

from sparsecc.errors import TargetError

from .kernel_runtime import C_RUNTIME, compiled_object, run_tool, temporary_object, which


class ToolchainMissing(TargetError):
    """A tool the arm-neon target needs is not installed."""


#: LLVM triple TVM compiles ARM kernels for
TRIPLE = "aarch64-linux-gnu"

#: CPUs the target tunes for (``mcpu``); the first is the default
CPUS = ("cortex-a76", "neoverse-n1")

#: flags of the harness's compile
HARNESS_FLAGS = ("-O2", "-std=c11", "-Wall")

#: the C runtime TVM's objects need, on glibc (``aligned_alloc`` as the workspace allocator);
#: the kernel harness and a whole model's object (:mod:`sparsecc.targets.static_program`) use it
RUNTIME_SOURCE = r"""
/* Runtime support for TVM-compiled AArch64 objects on glibc. */
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define EXPORT(name)
#define ALIGN 64u

static void* sc_workspace_alloc(size_t nbytes) {
  return aligned_alloc(ALIGN, (nbytes + ALIGN - 1) / ALIGN * ALIGN + ALIGN);
}
static void sc_workspace_free(void* ptr) { free(ptr); }
""" + C_RUNTIME

HARNESS_SOURCE = RUNTIME_SOURCE + r"""
/* Runs one TVM-compiled kernel: arguments from stdin, outputs to stdout (see arm_toolchain.py). */
/* the kernel's packed entry, forwarded by a one-line source linked beside it (see build_kernel) */
int sc_kernel(void* self, const Any* args, int32_t nargs, Any* ret);

static int read_all(void* dst, size_t n) { return fread(dst, 1, n, stdin) == n; }

int main(void) {
  int32_t head[2];
  if (!read_all(head, sizeof head) || head[0] < 0 || head[0] > MAX_ARGS || head[1] < 0 || head[1] > head[0]) {
    fprintf(stderr, "bad argument header\n");
    return 2;
  }
  int32_t nargs = head[0], n_outputs = head[1];
  void* data[MAX_ARGS];
  int64_t nbytes[MAX_ARGS];
  for (int32_t i = 0; i < nargs; i++) {
    int32_t meta[4];
    if (!read_all(meta, sizeof meta) || meta[2] < 0 || meta[2] > MAX_DIMS ||
        !read_all(sc_shape(i), sizeof(int64_t) * (size_t)meta[2]) || !read_all(&nbytes[i], sizeof nbytes[i]) ||
        nbytes[i] < 0) {
      fprintf(stderr, "bad header of argument %d\n", (int)i);
      return 2;
    }
    data[i] = sc_workspace_alloc((size_t)nbytes[i]);
    if (!data[i] || !read_all(data[i], (size_t)nbytes[i])) {
      fprintf(stderr, "argument %d: could not read %lld bytes\n", (int)i, (long long)nbytes[i]);
      return 2;
    }
    sc_set_tensor(i, data[i], meta[2], meta[0], meta[1]);
  }
  int rc = sc_kernel(0, sc_args(), nargs, sc_result());
  if (rc != 0) {
    fprintf(stderr, "%s\n", sc_error_len() ? sc_error() : "no message");
    return 3;
  }
  for (int32_t i = nargs - n_outputs; i < nargs; i++) fwrite(data[i], 1, (size_t)nbytes[i], stdout);
  return fflush(stdout) == 0 ? 0 : 2;
}
"""


@dataclasses.dataclass(frozen=True)
class Toolchain:
    gcc: str
    qemu: str


def _gcc() -> str | None:
    return which("aarch64-linux-gnu-gcc", *[f"aarch64-linux-gnu-gcc-{v}" for v in range(14, 9, -1)])


def _qemu() -> str | None:
    return which("qemu-aarch64-static", "qemu-aarch64")


def binutil(gcc: str, tool: str) -> pathlib.Path:
    """The cross binutils program ``tool`` (``objcopy``, ``objdump``) of the toolchain whose gcc
    is ``gcc``: beside it, with its target prefix (Debian: binutils-aarch64-linux-gnu)."""
    return pathlib.Path(gcc).with_name(pathlib.Path(gcc).name.split("-gcc")[0] + f"-{tool}")


@functools.cache
def _has_static_libc(gcc: str) -> bool:
    # gcc finds its target's libc.a itself; without libc6-dev-arm64-cross it is not there
    done = subprocess.run([gcc, "-print-file-name=libc.a"], capture_output=True, text=True)
    return done.returncode == 0 and os.path.isabs(done.stdout.strip())


def missing() -> list[str]:
    """What the arm-neon target lacks on this machine (empty when everything is there)."""
    out = []
    gcc = _gcc()
    if gcc is None:
        out.append("aarch64-linux-gnu-gcc (Debian: gcc-aarch64-linux-gnu)")
    elif not _has_static_libc(gcc):
        out.append("the AArch64 glibc's libc.a (Debian: libc6-dev-arm64-cross)")
    if gcc is not None and not binutil(gcc, "objcopy").is_file():
        # a whole model's object keeps only its entry points global with it
        out.append(f"{binutil(gcc, 'objcopy').name} (Debian: binutils-aarch64-linux-gnu)")
    if _qemu() is None:
        out.append("qemu-aarch64-static (Debian: qemu-user-static)")
    return out


def available() -> bool:
    return not missing()


def find_toolchain() -> Toolchain:
    """The tools the arm-neon target builds and runs with; :class:`ToolchainMissing` names what is
    absent."""
    lacking = missing()
    if lacking:
        raise ToolchainMissing("the arm-neon target needs " + ", ".join(lacking))
    return Toolchain(gcc=_gcc(), qemu=_qemu())


@functools.cache
def harness_object(gcc: str) -> pathlib.Path:
    """The compiled harness (cached per harness text, flags and compiler)."""
    return compiled_object("arm", "harness", HARNESS_SOURCE, gcc, HARNESS_FLAGS)


def cpu(name: str | None = None) -> str:
    """The CPU to tune for: ``name``, else ``$SPARSECC_ARM_CPU``, else ``cortex-a76``."""
    chosen = name or os.environ.get("SPARSECC_ARM_CPU") or CPUS[0]
    if chosen not in CPUS:
        raise TargetError(f"arm-neon: unknown CPU {chosen!r} (SPARSECC_ARM_CPU); known: {', '.join(CPUS)}")
    return chosen


def tvm_target(mattr: tuple[str, ...] = ("+neon",), mcpu: str | None = None) -> dict[str, Any]:
    """TVM 0.27 target dict for AArch64 tuned for ``mcpu`` (see :func:`cpu`)."""
    return {"kind": "llvm", "mtriple": TRIPLE, "mcpu": cpu(mcpu), "mattr": list(mattr), "num-cores": 1}


def kernel_export(func: Any) -> str:
    """The symbol of ``func``'s packed entry in the object TVM builds."""
    return f"__tvm_ffi_{func.attrs['global_symbol']}"


def build_kernel(func: Any, out_path: str | os.PathLike[str], target: dict[str, Any] | None = None) -> pathlib.Path:
    """Compile one scheduled PrimFunc into a static AArch64 executable at ``out_path``, and the
    kernel's assembly beside it (``out_path`` with suffix ``.s``, see :func:`assembly`)."""
    import tvm

    tools = find_toolchain()
    out_path = pathlib.Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    obj = out_path.with_suffix(".o")
    entry = out_path.with_suffix(".entry.c")
    ex = tvm.compile(func, target=target or tvm_target())
    ex.mod.write_to_file(str(obj))
    out_path.with_suffix(".s").write_text(ex.mod.inspect_source("asm"))
    # the harness calls the kernel through sc_kernel(), so one harness object serves every kernel
    export = kernel_export(func)
    entry.write_text(f"int {export}(void*, const void*, int, void*);\n"
                     f"int sc_kernel(void* s, const void* a, int n, void* r) {{ return {export}(s, a, n, r); }}\n")
    try:
        run_tool([tools.gcc, "-O2", "-static", "-o", str(out_path), str(harness_object(tools.gcc)), str(entry),
                  str(obj), "-lm"])
    finally:
        obj.unlink(missing_ok=True)
        entry.unlink(missing_ok=True)
    return out_path


def assembly(path: str | os.PathLike[str]) -> str:
    """The AArch64 assembly TVM generated for the kernel built at ``path``."""
    return pathlib.Path(path).with_suffix(".s").read_text()


#: the ``main`` of a whole model's executable: the inputs' raw bytes from stdin, in order; the
#: outputs' raw bytes to stdout. Exit status 2: wrong input size; 3: a kernel failed (TVM's
#: message on stderr). The model's own object (``model.o``) is what a device links instead.
MODEL_MAIN_SOURCE = r"""
#include <stddef.h>
#include <stdio.h>
int sparsecc_num_inputs(void);
int sparsecc_num_outputs(void);
void* sparsecc_input(int i);
size_t sparsecc_input_nbytes(int i);
const void* sparsecc_output(int i);
size_t sparsecc_output_nbytes(int i);
int sparsecc_invoke(void);
const char* sparsecc_error(void);

int main(void) {
  for (int i = 0; i < sparsecc_num_inputs(); i++) {
    size_t n = sparsecc_input_nbytes(i);
    if (fread(sparsecc_input(i), 1, n, stdin) != n) {
      fprintf(stderr, "input %d: expected %zu bytes on stdin\n", i, n);
      return 2;
    }
  }
  if (getc(stdin) != EOF) {
    fprintf(stderr, "more bytes on stdin than the model's inputs take\n");
    return 2;
  }
  if (sparsecc_invoke() != 0) {
    fprintf(stderr, "%s\n", sparsecc_error());
    return 3;
  }
  for (int i = 0; i < sparsecc_num_outputs(); i++) fwrite(sparsecc_output(i), 1, sparsecc_output_nbytes(i), stdout);
  return fflush(stdout) == 0 ? 0 : 2;
}
"""

#: files of a built ARM model: the executable qemu runs, the object and header a device links
MODEL_EXECUTABLE, MODEL_OBJECT, MODEL_HEADER = "model.elf", "model.o", "model.h"


def link_model(program: Any, kernels: pathlib.Path, blob: pathlib.Path, folder: pathlib.Path) -> pathlib.Path:
    """Link a whole model (a :class:`~sparsecc.targets.static_program.StaticProgram` whose kernels
    are compiled into ``kernels`` and whose constants are the file ``blob``) into ``folder``:
    ``model.o`` (kernels, driver and runtime in one relocatable object whose only global symbols
    are the ``sparsecc_*`` entry points), ``model.h`` declaring them, and the static executable
    ``model.elf`` that :mod:`sparsecc.targets.runners.arm` runs under qemu."""
    from .static_program import driver_source, header_source

    tools = find_toolchain()
    source = RUNTIME_SOURCE + driver_source(program, blob, '.rodata.sparsecc_constants,"a",@progbits')
    obj = folder / MODEL_OBJECT
    with temporary_object(source, tools.gcc, HARNESS_FLAGS, folder, "driver") as driver:
        run_tool([tools.gcc, "-r", "-nostdlib", "-o", str(obj), str(kernels), str(driver)])
    # Only the entry points stay global, so two models (or a model and TVM's runtime) link together.
    run_tool([str(binutil(tools.gcc, "objcopy")), "--wildcard", "--keep-global-symbol=sparsecc_*", str(obj)])
    (folder / MODEL_HEADER).write_text(header_source(program))
    main = compiled_object("arm", "model-main", MODEL_MAIN_SOURCE, tools.gcc, HARNESS_FLAGS)
    exe = folder / MODEL_EXECUTABLE
    run_tool([tools.gcc, "-O2", "-static", "-o", str(exe), str(main), str(obj), "-lm"])
    return exe
