"""Pieces shared by the toolchains that link one TVM-compiled kernel with a small C runtime of
its own (:mod:`sparsecc.targets.wasm_toolchain`, :mod:`sparsecc.targets.arm_toolchain`).

A kernel object exports ``__tvm_ffi_<name>`` (TVM's packed calling convention: ``int(void* self,
const TVMFFIAny* args, int32 nargs, TVMFFIAny* ret)``) and calls a few runtime functions TVM's
C++ runtime would normally provide. :data:`C_RUNTIME` defines them (the error setter, a serial
parallel launch, the weak pointer slots TVM's object reads) plus the DLTensor argument helpers;
it expects ``<stdint.h>``-style integer types, an ``EXPORT(name)`` macro and the two functions
``sc_workspace_alloc`` / ``sc_workspace_free`` from the source it is pasted into.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import pathlib
import shutil
import subprocess
import tempfile
from collections.abc import Iterator

import numpy as np
from sparsecc.errors import TargetError

C_RUNTIME = r"""
/* ---- workspace: TVM's scratch buffers, from the allocator of the including source ---------- */
void* TVMBackendAllocWorkspace(int device_type, int device_id, uint64_t nbytes, int code, int bits) {
  (void)device_type; (void)device_id; (void)code; (void)bits;
  return sc_workspace_alloc((size_t)nbytes);
}

int TVMBackendFreeWorkspace(int device_type, int device_id, void* ptr) {
  (void)device_type; (void)device_id;
  sc_workspace_free(ptr);
  return 0;
}

/* TVM's object calls these through weak pointer slots of its own; defining the slots fills them. */
void* (*__TVMBackendAllocWorkspace)(int, int, uint64_t, int, int) = TVMBackendAllocWorkspace;
int (*__TVMBackendFreeWorkspace)(int, int, void*) = TVMBackendFreeWorkspace;

/* ---- errors: kept as one message the runner reads after a nonzero return -------------------- */
static char error_text[2048];
static size_t error_len;

static void error_append(const char* s) {
  while (s && *s && error_len + 1 < sizeof(error_text)) error_text[error_len++] = *s++;
  error_text[error_len] = 0;
}

void TVMFFIErrorSetRaisedFromCStr(const char* kind, const char* message) {
  error_len = 0;
  error_append(kind);
  error_append(": ");
  error_append(message);
}

void TVMFFIErrorSetRaisedFromCStrParts(const char* kind, const char** parts, int32_t n) {
  error_len = 0;
  error_append(kind);
  error_append(": ");
  for (int32_t i = 0; i < n; i++) error_append(parts[i]);
}

EXPORT(sc_error) const char* sc_error(void) { return error_text; }
EXPORT(sc_error_len) size_t sc_error_len(void) { return error_len; }

/* ---- parallel loops: one thread, every task in one call ------------------------------------ */
typedef struct { void* sync_handle; int32_t num_task; } ParallelEnv;
typedef int (*ParallelLambda)(int task_id, ParallelEnv* env, void* cdata);

static int launch_serial(ParallelLambda f, void* cdata, int num_task) {
  (void)num_task;
  ParallelEnv env = {0, 1};
  return f(0, &env, cdata);
}

static int barrier_none(int task_id, ParallelEnv* env) { (void)task_id; (void)env; return 0; }

int (*__TVMBackendParallelLaunch)(ParallelLambda, void*, int) = launch_serial;
int (*__TVMBackendParallelBarrier)(int, ParallelEnv*) = barrier_none;

/* ---- arguments: DLTensors and the packed-call argument array ------------------------------ */
typedef struct { int32_t device_type; int32_t device_id; } Device;
typedef struct { uint8_t code; uint8_t bits; uint16_t lanes; } DataType;
typedef struct {
  void* data; Device device; int32_t ndim; DataType dtype;
  int64_t* shape; int64_t* strides; uint64_t byte_offset;
} Tensor;
typedef struct { int32_t type_index; uint32_t pad; union { int64_t v_int64; void* v_ptr; } v; } Any;

#define MAX_ARGS 32
#define MAX_DIMS 8
static Tensor tensors[MAX_ARGS];
static int64_t shapes[MAX_ARGS][MAX_DIMS];
static Any args[MAX_ARGS];
static Any result;

EXPORT(sc_shape) int64_t* sc_shape(int i) { return shapes[i]; }

/* Argument i: a CPU DLTensor (type index 7) over ``data``, shape already written at sc_shape(i). */
EXPORT(sc_set_tensor) int sc_set_tensor(int i, void* data, int ndim, int code, int bits) {
  if (i < 0 || i >= MAX_ARGS || ndim < 0 || ndim > MAX_DIMS) return -1;
  Tensor* t = &tensors[i];
  t->data = data;
  t->device.device_type = 1;
  t->device.device_id = 0;
  t->ndim = ndim;
  t->dtype.code = (uint8_t)code;
  t->dtype.bits = (uint8_t)bits;
  t->dtype.lanes = 1;
  t->shape = shapes[i];
  t->strides = 0;
  t->byte_offset = 0;
  args[i].type_index = 7;
  args[i].pad = 0;
  args[i].v.v_int64 = 0;
  args[i].v.v_ptr = t;
  return 0;
}

EXPORT(sc_args) Any* sc_args(void) { return args; }
EXPORT(sc_result) Any* sc_result(void) { return &result; }
"""

#: numpy dtype -> DLPack (type code, bits): 0 int, 1 uint, 2 float
DLPACK = {
    np.dtype("float32"): (2, 32), np.dtype("float64"): (2, 64), np.dtype("int32"): (0, 32),
    np.dtype("int64"): (0, 64), np.dtype("uint16"): (1, 16), np.dtype("uint8"): (1, 8),
    np.dtype("int8"): (0, 8), np.dtype("uint32"): (1, 32), np.dtype("int16"): (0, 16),
}


def dlpack_code(index: int, array: np.ndarray) -> tuple[int, int]:
    """The DLPack (type code, bits) of argument ``index``; a clear error for what the runtime
    cannot pass (an unknown dtype, more than 8 dimensions)."""
    if array.dtype not in DLPACK:
        raise TargetError(f"argument {index}: dtype {array.dtype} has no DLPack code here")
    if array.ndim > 8:
        raise TargetError(f"argument {index}: {array.ndim} dimensions (at most 8)")
    return DLPACK[array.dtype]


def which(*names: str) -> str | None:
    """The first of ``names`` found on PATH."""
    for name in names:
        found = shutil.which(name)
        if found:
            return found
    return None


def run_tool(cmd: list[str]) -> None:
    """Run a build tool; a :class:`TargetError` with its command line and stderr when it fails."""
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0:
        raise TargetError(f"{pathlib.Path(cmd[0]).name} failed ({done.returncode}): {' '.join(cmd)}\n"
                          f"{done.stderr.strip()}")


def cache_dir(target: str) -> pathlib.Path:
    """Where a toolchain keeps its compiled runtime objects (``$XDG_CACHE_HOME/sparsecc/<target>``)."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return pathlib.Path(base) / "sparsecc" / target


def compiled_object(target: str, stem: str, source: str, compiler: str, flags: tuple[str, ...]) -> pathlib.Path:
    """``source`` compiled to an object by ``compiler`` with ``flags``, kept in :func:`cache_dir`
    under a name that changes with the text, the flags and the compiler."""
    key = hashlib.sha256("\0".join([source, *flags, compiler]).encode()).hexdigest()[:16]
    folder = cache_dir(target)
    folder.mkdir(parents=True, exist_ok=True)
    obj = folder / f"{stem}-{key}.o"
    if not obj.is_file():
        with tempfile.TemporaryDirectory(dir=folder) as tmp:
            src = pathlib.Path(tmp) / f"{stem}.c"
            src.write_text(source)
            out = pathlib.Path(tmp) / f"{stem}.o"
            run_tool([compiler, *flags, "-c", str(src), "-o", str(out)])
            os.replace(out, obj)  # atomic: a concurrent build sees the old name or the whole object
    return obj


@contextlib.contextmanager
def temporary_object(source: str, compiler: str, flags: tuple[str, ...], folder: pathlib.Path,
                     stem: str) -> Iterator[pathlib.Path]:
    """``source`` compiled by ``compiler`` into ``folder/<stem>.o``, for a link inside the
    ``with`` block; source and object are removed on leaving it (a model's driver is built
    once, so unlike :func:`compiled_object` nothing is cached)."""
    src, obj = folder / f"{stem}.c", folder / f"{stem}.o"
    src.write_text(source)
    try:
        run_tool([compiler, *flags, "-c", str(src), "-o", str(obj)])
        yield obj
    finally:
        src.unlink(missing_ok=True)
        obj.unlink(missing_ok=True)
