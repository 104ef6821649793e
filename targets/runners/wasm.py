"""WebAssembly runner: load a kernel module built by :mod:`sparsecc.targets.wasm_toolchain` into
wasmtime, copy numpy arrays into its linear memory, call the kernel, read the outputs back.

One :class:`WasmKernel` holds one instance (one linear memory). Buffers are allocated in that
memory with the shim's ``sc_alloc`` once per distinct argument shape and reused by later calls,
so repeated calls (and :meth:`WasmKernel.time`) measure the kernel, not allocation.

:func:`load` loads a whole model (:class:`WasmModel`, built by
:mod:`sparsecc.targets.static_program`); kernels are loaded with :func:`load_kernel`.
"""

from __future__ import annotations

import os
import pathlib
import statistics
import time
from collections.abc import Sequence
from typing import Any

import numpy as np
from sparsecc.errors import ArtifactError, TargetError

from ..kernel_runtime import dlpack_code
from . import static_io


class WasmKernel:
    """A built kernel module: ``kernel(*arrays)`` runs the kernel on numpy arrays in wasmtime.

    ``arrays`` are every argument of the PrimFunc in order, outputs included; after the call the
    output arguments (the last ``n_outputs``) hold the results (copied back into the given arrays).
    """

    def __init__(self, path: str | os.PathLike[str], export: str, n_outputs: int = 1):
        import wasmtime

        path = pathlib.Path(path)
        if not path.is_file():
            raise ArtifactError(f"wasm module {path} does not exist; build the kernel first")
        self.path = path
        # compiled on this thread: a kernel module is small, and no compiler thread is then left
        # on the other CPU while the kernel is timed (fewer slow timings in short tests, not none)
        config = wasmtime.Config()
        config.parallel_compilation = False
        self.engine = wasmtime.Engine(config)
        self.store = wasmtime.Store(self.engine)
        module = wasmtime.Module.from_file(self.engine, str(path))
        if module.imports:
            names = ", ".join(f"{i.module}.{i.name}" for i in module.imports)
            raise ArtifactError(f"wasm module {path} imports {names}; sparsecc kernels must import nothing")
        self.instance = wasmtime.Instance(self.store, module, [])
        exports = self.instance.exports(self.store)
        self._memory = exports["memory"]
        self._fn = {name: exports[name] for name in ("sc_alloc", "sc_shape", "sc_set_tensor", "sc_args",
                                                      "sc_result", "sc_error", "sc_error_len")}
        try:
            self._kernel = exports[export]
        except KeyError:
            raise ArtifactError(f"wasm module {path} has no export {export!r}") from None
        self.export = export
        self.n_outputs = n_outputs
        # argument index -> (address, nbytes, shape, dtype) of its buffer in linear memory
        self._slots: dict[int, tuple[int, int, tuple[int, ...], np.dtype]] = {}

    def _slot(self, index: int, array: np.ndarray) -> int:
        key = (array.nbytes, tuple(array.shape), array.dtype)
        slot = self._slots.get(index)
        if slot is None or slot[1:] != key:
            code, bits = dlpack_code(index, array)
            addr = self._fn["sc_alloc"](self.store, max(array.nbytes, 1))
            if not addr:
                raise TargetError(f"wasm linear memory exhausted allocating {array.nbytes} bytes")
            shape_addr = self._fn["sc_shape"](self.store, index)
            self._memory.write(self.store, np.asarray(array.shape, np.int64).tobytes(), shape_addr)
            if self._fn["sc_set_tensor"](self.store, index, addr, array.ndim, code, bits) != 0:
                raise TargetError(f"argument {index}: the shim rejected it")
            slot = (addr, *key)
            self._slots[index] = slot
        return slot[0]

    def load(self, *arrays: np.ndarray) -> list[np.ndarray]:
        """Copy every argument into linear memory (outputs too: a NaN-filled output shows
        elements the kernel never writes). Returns the arrays as C-contiguous numpy."""
        arrays = [np.ascontiguousarray(a) for a in arrays]
        for i, a in enumerate(arrays):
            self._memory.write(self.store, a.tobytes(), self._slot(i, a))
        self._nargs = len(arrays)
        # fixed addresses of the shim's argument and result records: fetched once, so a call is
        # one crossing into wasm (each costs about 15 us from Python) and timings are the kernel's
        self._call_args = (self._fn["sc_args"](self.store), self._nargs, self._fn["sc_result"](self.store))
        return arrays

    def call(self) -> None:
        """Run the kernel on the arguments last given to :meth:`load`."""
        rc = self._kernel(self.store, 0, *self._call_args)
        if rc != 0:
            start = self._fn["sc_error"](self.store)
            length = self._fn["sc_error_len"](self.store)
            text = bytes(self._memory.read(self.store, start, start + length)).decode("utf-8", "replace")
            raise TargetError(f"wasm kernel {self.export} failed ({rc}): {text or 'no message'}")

    def read(self, index: int) -> np.ndarray:
        """A copy of argument ``index`` as it is now in linear memory."""
        addr, nbytes, shape, dtype = self._slots[index]
        raw = self._memory.read(self.store, addr, addr + nbytes)
        return np.frombuffer(bytes(raw), dtype=dtype).reshape(shape).copy()

    def __call__(self, *arrays: np.ndarray) -> list[np.ndarray]:
        arrays = self.load(*arrays)
        self.call()
        outs = []
        for i in range(len(arrays) - self.n_outputs, len(arrays)):
            outs.append(self.read(i))
        return outs

    def time(self, number: int = 10) -> float:
        """Seconds per call of ``number`` back-to-back calls on the loaded arguments."""
        start = time.perf_counter()
        for _ in range(number):
            self.call()
        return (time.perf_counter() - start) / number


def interleaved_median(kernels: Sequence[WasmKernel], rounds: int = 15, number: int = 5,
                       warmup: int = 2) -> list[float]:
    """Median seconds per call of each kernel (arguments already loaded), measured in rounds that
    take one sample of every kernel in turn, so drifts of the machine (other jobs, clock changes)
    hit all of them alike. Single samples swing by 2x on a shared machine; medians do not."""
    for k in kernels:
        for _ in range(warmup):
            k.call()
    samples: list[list[float]] = [[] for _ in kernels]
    for _ in range(rounds):
        for i, k in enumerate(kernels):
            samples[i].append(k.time(number))
    return [statistics.median(s) for s in samples]


def load_kernel(path: str | os.PathLike[str], export: str, n_outputs: int = 1) -> WasmKernel:
    return WasmKernel(path, export, n_outputs)


def prepare_kernel(func: Any, inputs: list[np.ndarray], out_shape: tuple[int, ...],
                   tvm_target: Any) -> tuple[Any, Any]:
    """The wasm twin of :func:`sparsecc.targets.runners.host.prepare_kernel`: the kernel built
    into a module (kept in a temporary folder only while it loads), instantiated in wasmtime with
    ``inputs`` copied into its linear memory once; ``call()`` runs it there."""
    import tempfile

    from .. import wasm_toolchain

    with tempfile.TemporaryDirectory(prefix="sparsecc-wasm-") as tmp:
        path = wasm_toolchain.build_kernel(func, pathlib.Path(tmp) / "kernel.wasm", tvm_target)
        kernel = WasmKernel(path, wasm_toolchain.kernel_export(func))
    kernel.load(*inputs, np.zeros(out_shape, np.float32))
    output = len(inputs)
    return kernel.call, lambda: kernel.read(output)


class WasmModel:
    """A whole model built by :mod:`sparsecc.targets.static_program` (``model.wasm`` beside its
    ``model.json``): ``model(*inputs)`` writes the inputs into the module's own input buffers,
    runs every kernel once (``sparsecc_invoke``) and returns the outputs as torch tensors. One
    instance, reused by every call."""

    def __init__(self, path: str | os.PathLike[str]):
        import wasmtime

        path = pathlib.Path(path)
        if not path.is_file():
            raise ArtifactError(f"wasm module {path} does not exist; compile the model first")
        self.path = path
        self.signature = static_io.read_signature(path)
        self.store = wasmtime.Store(wasmtime.Engine())
        try:
            module = wasmtime.Module.from_file(self.store.engine, str(path))
        except wasmtime.WasmtimeError as exc:
            raise ArtifactError(f"{path} is not a valid WebAssembly module ({exc}); recompile the model") from None
        if module.imports:
            names = ", ".join(f"{i.module}.{i.name}" for i in module.imports)
            raise ArtifactError(f"wasm module {path} imports {names}; a sparsecc model must import nothing")
        exports = wasmtime.Instance(self.store, module, []).exports(self.store)
        try:
            self._memory = exports["memory"]
            self._fn = {name: exports[name] for name in ("sparsecc_input", "sparsecc_output", "sparsecc_invoke",
                                                          "sparsecc_num_inputs", "sparsecc_error", "sc_error_len")}
        except KeyError as exc:
            raise ArtifactError(f"wasm module {path} has no export {exc}; it is not a sparsecc model") from None
        if self._fn["sparsecc_num_inputs"](self.store) != len(self.signature["inputs"]):
            raise ArtifactError(f"{path} does not match its model.json (input count); recompile the model")
        self._out_nbytes = static_io.output_nbytes(self.signature)

    def __call__(self, *inputs: Any) -> list[Any]:
        for i, raw in enumerate(static_io.input_bytes(self.signature, inputs)):
            self._memory.write(self.store, raw, self._fn["sparsecc_input"](self.store, i))
        rc = self._fn["sparsecc_invoke"](self.store)
        if rc != 0:
            start = self._fn["sparsecc_error"](self.store)
            length = self._fn["sc_error_len"](self.store)
            text = bytes(self._memory.read(self.store, start, start + length)).decode("utf-8", "replace")
            raise TargetError(f"wasm model {self.path.name} failed ({rc}): {text or 'no message'}")
        chunks = []
        for i, nbytes in enumerate(self._out_nbytes):
            start = self._fn["sparsecc_output"](self.store, i)
            chunks.append(bytes(self._memory.read(self.store, start, start + nbytes)))
        return static_io.output_tensors(self.signature, chunks)


def load(path: str | os.PathLike[str]) -> WasmModel:
    """Load a whole model's ``model.wasm`` (built for the ``wasm-simd`` target)."""
    return WasmModel(path)
