"""Whole models as static programs: a scheduled Relax module turned into TVM-built kernels plus a
generated C driver, for targets where the Relax VM cannot run (WebAssembly in wasmtime or a
browser, a static AArch64 executable under qemu or on a device).

:func:`plan_memory` runs Relax's own lowering (the dataflow-lowering passes, then
``StaticPlanBlockMemory``) so ``main`` becomes a flat sequence of storage allocations, tensor
views and calls of PrimFuncs; :func:`translate` reads that sequence into a
:class:`StaticProgram`: storage blocks with their sizes (intermediates share blocks as TVM's
planner decided), DLTensor views of inputs / blocks / constants, the kernel calls in order, and
the outputs. Any binding it does not know raises :class:`StaticProgramError` naming it; nothing
is skipped.

:func:`driver_source` writes that program as C: static 64-byte-aligned blocks, the constants
(weights, packed sparse arrays) as one binary blob pulled in with ``.incbin``, a DLTensor and a
packed-call argument array per call, and these entry points (declared for C users by
:func:`header_source`)::

    int sparsecc_run(const T* input0, ..., T* output0, ...)  copy in, run, copy out
    int sparsecc_invoke(void)                               run on the static input buffers
    void* sparsecc_input(int i) / const void* sparsecc_output(int i)  (and their sizes)
    const char* sparsecc_error(void)                        TVM's message after a nonzero return

:func:`build_model` (through :func:`build_program`) compiles every PrimFunc into one object for
the target and hands the program, that object and the constants' file to the record's
``link_model`` (``wasm_toolchain.link_model``, ``arm_toolchain.link_model``), which writes the
driver and links. ``model.json`` beside the result is the signature the runners read.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import pathlib
import re
from typing import Any

from sparsecc.errors import TargetError

#: the version of the static-model signature file (``model.json``) this module writes
SIGNATURE_VERSION = 1
SIGNATURE_FORMAT = "sparsecc-static-model"
SIGNATURE_FILE = "model.json"
#: alignment of every static block and constant: TVM's kernels assume 64-byte-aligned tensors
ALIGN = 64
#: prefix of the kernels' symbols: keeps TVM's names (``exp``, ``tanh``, ``max_pool2d``) off libc's
SYMBOL_PREFIX = "sparsecc_k_"

_C_TYPES = {"float32": "float", "float64": "double", "int64": "int64_t", "int32": "int32_t",
            "int16": "int16_t", "int8": "int8_t", "uint8": "uint8_t", "uint16": "uint16_t",
            "uint32": "uint32_t", "bfloat16": "uint16_t", "bool": "uint8_t"}
_DL_CODES = {"int": 0, "uint": 1, "float": 2, "bfloat": 4}


class StaticProgramError(TargetError):
    """The Relax module holds something the static driver cannot express."""


@dataclasses.dataclass(frozen=True)
class TensorSpec:
    """Shape and dtype (TVM spelling, e.g. ``float32``) of one tensor."""

    shape: tuple[int, ...]
    dtype: str

    @property
    def dlpack(self) -> tuple[int, int]:
        """DLPack (type code, bits)."""
        if self.dtype == "bool":
            return 6, 8
        found = re.fullmatch(r"(bfloat|float|uint|int)(\d+)", self.dtype)
        if found is None:
            raise StaticProgramError(f"dtype {self.dtype} has no DLPack code in the static driver")
        return _DL_CODES[found.group(1)], int(found.group(2))

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * max(1, self.dlpack[1] // 8)

    @property
    def c_type(self) -> str:
        try:
            return _C_TYPES[self.dtype]
        except KeyError:
            raise StaticProgramError(f"dtype {self.dtype} has no C type in the static driver") from None

    def to_json(self) -> dict[str, Any]:
        return {"shape": list(self.shape), "dtype": self.dtype}


@dataclasses.dataclass(frozen=True)
class View:
    """A DLTensor the driver lays out: ``spec`` at byte ``offset`` of input, block or constant
    ``index`` (``base`` is ``"input"``, ``"block"`` or ``"const"``; constants' offsets are into
    the blob)."""

    base: str
    index: int
    offset: int
    spec: TensorSpec


@dataclasses.dataclass(frozen=True)
class KernelCall:
    symbol: str  # the PrimFunc's global symbol in the kernel object (its packed entry is __tvm_ffi_<symbol>)
    args: tuple[int, ...]  # view indices, outputs last (Relax's destination-passing order)


@dataclasses.dataclass
class StaticProgram:
    """``main`` of a memory-planned Relax module as static data (see the module docstring)."""

    inputs: list[TensorSpec]
    blocks: list[int]  # bytes of each static storage block
    views: list[View]
    calls: list[KernelCall]
    outputs: list[int]  # view indices
    blob: bytes  # every constant, each at a 64-byte-aligned offset
    kernels: Any  # tvm.IRModule of the called PrimFuncs, global symbols prefixed

    @property
    def output_specs(self) -> list[TensorSpec]:
        return [self.views[i].spec for i in self.outputs]

    def signature(self, target: str) -> dict[str, Any]:
        """What a runner needs to call the built model (written as ``model.json``)."""
        return {"format": SIGNATURE_FORMAT, "version": SIGNATURE_VERSION, "target": target,
                "inputs": [s.to_json() for s in self.inputs], "outputs": [s.to_json() for s in self.output_specs],
                "kernels": len(self.calls), "blocks_bytes": sum(self.blocks), "constants_bytes": len(self.blob)}


# --------------------------------------------------------------------------------------------
# Relax -> StaticProgram
# --------------------------------------------------------------------------------------------


def plan_memory(mod: Any, tvm_target: dict[str, Any]) -> Any:
    """Lower a scheduled Relax module until ``main`` is a flat, memory-planned sequence: TVM's
    dataflow-lowering passes (reshape to views, explicit output buffers for every call) and
    ``StaticPlanBlockMemory`` (intermediates share a few storage blocks)."""
    import tvm
    from tvm import relax
    from tvm.relax.backend.cpu_generic import pipeline as cpu

    target = tvm.target.Target(tvm_target)
    with target:
        passes = cpu.dataflow_lower_passes(target) + [relax.transform.StaticPlanBlockMemory()]
        return tvm.transform.Sequential(passes)(mod)


def _ints(expr: Any, what: str) -> tuple[int, ...]:
    try:
        return tuple(int(v) for v in expr.values)
    except (AttributeError, TypeError, ValueError):
        raise StaticProgramError(f"{what}: {expr} is not a static shape") from None


def _spec_of(ty: Any, what: str) -> TensorSpec:
    shape = getattr(ty, "shape", None)
    if shape is None or getattr(ty, "dtype", None) is None:
        raise StaticProgramError(f"{what}: {ty} is not a tensor of known shape")
    try:
        return TensorSpec(tuple(int(d) for d in shape), str(ty.dtype))
    except (TypeError, ValueError):
        raise StaticProgramError(f"{what}: shape {shape} is not static; compile for fixed input shapes") from None


def _tensor_constant(expr: Any) -> bool:
    """Whether ``expr`` is a tensor constant (TVM 0.27 spells every immediate ``GenericConst``:
    tensors, dtypes and strings alike; a tensor's ``value`` is a runtime tensor)."""
    import tvm

    return isinstance(expr, tvm.ir.expr.GenericConst) and isinstance(expr.value, tvm.runtime.Tensor)


class _Translator:
    """Walks ``main``'s bindings once; ``env`` maps each Relax variable to a view index, a storage
    block index (``("storage", i)``) or a tuple of those."""

    def __init__(self, mod: Any):
        self.mod = mod
        self.views: list[View] = []
        self.blocks: list[int] = []
        self.calls: list[KernelCall] = []
        self.blob = bytearray()
        self.constants: dict[tuple[str, tuple[int, ...], str], int] = {}
        self.env: dict[Any, Any] = {}
        self.called: dict[str, Any] = {}

    def view(self, base: str, index: int, offset: int, spec: TensorSpec) -> int:
        self.views.append(View(base, index, offset, spec))
        return len(self.views) - 1

    def constant(self, const: Any) -> int:
        spec = _spec_of(const.ty, "constant")
        raw = const.value.numpy().tobytes()
        key = (spec.dtype, spec.shape, hashlib.sha256(raw).hexdigest())
        if key not in self.constants:
            # The same weight used twice (a shared layer) is stored once.
            offset = -len(self.blob) % ALIGN + len(self.blob)
            self.blob.extend(b"\0" * (offset - len(self.blob)))
            self.blob.extend(raw)
            self.constants[key] = self.view("const", 0, offset, spec)
        return self.constants[key]

    def lookup(self, expr: Any, where: str) -> Any:
        from tvm import relax

        if _tensor_constant(expr):
            return self.constant(expr)
        if isinstance(expr, relax.Var) and expr in self.env:
            return self.env[expr]
        raise StaticProgramError(f"{where}: argument {expr} is neither a tensor of the program nor a constant")

    def tensor(self, expr: Any, where: str) -> int:
        found = self.lookup(expr, where)
        if not isinstance(found, int):
            raise StaticProgramError(f"{where}: argument {expr} is not a tensor")
        return found

    def binding(self, binding: Any) -> None:
        from tvm import relax

        var, value = binding.var, binding.value
        where = f"binding {var.name} = {type(value).__name__}"
        if isinstance(value, relax.Call):
            self.env[var] = self.call(value, f"binding {var.name}")
        elif isinstance(value, relax.Var) or _tensor_constant(value):
            self.env[var] = self.lookup(value, where)
        elif isinstance(value, relax.Tuple):
            self.env[var] = tuple(self.lookup(f, where) for f in value.fields)
        elif isinstance(value, relax.TupleGetItem):
            self.env[var] = self.lookup(value.tuple_value, where)[value.index]
        else:
            raise StaticProgramError(f"{where}: the static driver cannot translate a {type(value).__name__} "
                                     f"binding:\n{binding}")

    def call(self, call: Any, where: str) -> Any:
        from tvm import ir, tirx

        op = call.op
        if isinstance(op, ir.GlobalVar):
            func = self.mod[op]
            if not isinstance(func, tirx.PrimFunc):
                raise StaticProgramError(f"{where}: call of Relax function {op.name_hint}; only PrimFunc calls are "
                                         "translated")
            symbol = SYMBOL_PREFIX + op.name_hint
            self.called[symbol] = func
            args = tuple(self.tensor(a, f"{where} (call of {op.name_hint})") for a in call.args)
            self.calls.append(KernelCall(symbol, args))
            return ()
        name = op.name if isinstance(op, ir.Op) else str(op)
        if name == "relax.memory.alloc_storage":
            (nbytes,) = _ints(call.args[0], where)
            self.blocks.append(nbytes)
            return ("storage", len(self.blocks) - 1)
        if name == "relax.memory.alloc_tensor":
            storage = self.lookup(call.args[0], where)
            if not (isinstance(storage, tuple) and storage[:1] == ("storage",)):
                raise StaticProgramError(f"{where}: alloc_tensor in {call.args[0]}, which is not a storage block")
            offset = int(call.args[1].value)
            spec = TensorSpec(_ints(call.args[2], where), str(call.args[3].value))
            if spec.nbytes + offset > self.blocks[storage[1]]:
                raise StaticProgramError(f"{where}: tensor of {spec.nbytes} bytes at offset {offset} overruns its "
                                         f"{self.blocks[storage[1]]}-byte storage")
            return self.view("block", storage[1], offset, spec)
        if name == "relax.builtin.alloc_tensor":
            spec = TensorSpec(_ints(call.args[0], where), str(call.args[1].value))
            self.blocks.append(spec.nbytes)
            return self.view("block", len(self.blocks) - 1, 0, spec)
        if name == "relax.reshape":
            source = self.views[self.tensor(call.args[0], where)]
            spec = TensorSpec(_ints(call.args[1], where), source.spec.dtype)
            if spec.nbytes != source.spec.nbytes:
                raise StaticProgramError(f"{where}: reshape of {source.spec.shape} to {spec.shape} changes the size")
            return self.view(source.base, source.index, source.offset, spec)
        raise StaticProgramError(f"{where}: the static driver cannot translate a call of {name}:\n{call}")


def translate(mod: Any) -> StaticProgram:
    """Read the memory-planned ``main`` of ``mod`` (see :func:`plan_memory`) into a
    :class:`StaticProgram`; :class:`StaticProgramError` names the first binding it cannot express."""
    import tvm
    from tvm import relax

    main = mod["main"]
    t = _Translator(mod)
    inputs = []
    for i, param in enumerate(main.params):
        spec = _spec_of(param.ty, f"input {i} ({param.name})")
        inputs.append(spec)
        t.env[param] = t.view("input", i, 0, spec)
    body = main.body
    if not isinstance(body, relax.SeqExpr):
        raise StaticProgramError(f"main's body is a {type(body).__name__}, not a sequence of bindings")
    for block in body.blocks:
        for binding in block.bindings:
            if not isinstance(binding, relax.VarBinding):
                raise StaticProgramError(f"the static driver cannot translate a {type(binding).__name__}:\n{binding}")
            t.binding(binding)
    result = t.lookup(body.body, "main's result") if not isinstance(body.body, relax.Tuple) else tuple(
        t.lookup(f, "main's result") for f in body.body.fields)

    def flat(value: Any) -> list[int]:
        if isinstance(value, tuple):
            return [i for v in value for i in flat(v)]
        if not isinstance(value, int):
            raise StaticProgramError(f"main returns {value}, which is not a tensor")
        return [value]

    kernels = tvm.IRModule({sym: f.with_attr("global_symbol", sym) for sym, f in t.called.items()})
    return StaticProgram(inputs, t.blocks, t.views, t.calls, flat(result), bytes(t.blob), kernels)


# --------------------------------------------------------------------------------------------
# StaticProgram -> C
# --------------------------------------------------------------------------------------------


def _blob_asm(blob_path: pathlib.Path, nbytes: int, section: str) -> str:
    # .incbin keeps megabytes of weights out of the C text (and out of the compiler's parser).
    lines = [f".section {section}", f".p2align {ALIGN.bit_length() - 1}", "sparsecc_constants:",
             f'.incbin "{blob_path}"' if nbytes else ".byte 0", f".size sparsecc_constants, {max(nbytes, 1)}"]
    quoted = (line.replace("\\", "\\\\").replace('"', '\\"') for line in lines)
    return "__asm__(\n" + "".join(f'  "{line}\\n"\n' for line in quoted) + ");\n"


def _arg_names(program: StaticProgram) -> list[str]:
    return ([f"const {s.c_type}* input{i}" for i, s in enumerate(program.inputs)]
            + [f"{s.c_type}* output{i}" for i, s in enumerate(program.output_specs)])


def driver_source(program: StaticProgram, blob_path: pathlib.Path, blob_section: str) -> str:
    """The model's C driver (appended to a target's runtime source, which defines ``EXPORT``,
    ``Tensor``, ``Any`` and ``sc_error``). ``blob_path`` is the constants' file as written,
    ``blob_section`` the assembler's section directive arguments for read-only data."""
    return ("\n/* ---- generated by sparsecc: one model as a static program ---- */\n"
            + _c_data(program, blob_path, blob_section) + _c_calls(program) + _c_entries(program))


def _c_data(program: StaticProgram, blob_path: pathlib.Path, blob_section: str) -> str:
    """The constants' blob, the static input and storage blocks, and a DLTensor per view."""
    out = [_blob_asm(blob_path, len(program.blob), blob_section)]
    out.append("extern const unsigned char sparsecc_constants[];\n")
    for i, spec in enumerate(program.inputs):
        out.append(f"static unsigned char input_{i}[{max(spec.nbytes, 1)}] __attribute__((aligned({ALIGN})));\n")
    for i, nbytes in enumerate(program.blocks):
        out.append(f"static unsigned char block_{i}[{max(nbytes, 1)}] __attribute__((aligned({ALIGN})));\n")
    base = {"input": "input_{}", "block": "block_{}", "const": "sparsecc_constants"}
    for i, v in enumerate(program.views):
        out.append(f"static int64_t shape_{i}[] = {{{', '.join(map(str, v.spec.shape)) or '0'}}};\n")
    out.append("static Tensor views[] = {\n")
    for i, v in enumerate(program.views):
        code, bits = v.spec.dlpack
        data = f"(void*)({base[v.base].format(v.index)} + {v.offset})"
        out.append(f"  {{{data}, {{1, 0}}, {len(v.spec.shape)}, {{{code}, {bits}, 1}}, shape_{i}, 0, 0}},\n")
    out.append("};\n")
    return "".join(out)


def _c_calls(program: StaticProgram) -> str:
    """Each kernel's declaration, its argument array, and ``sparsecc_invoke`` calling them in order."""
    out = []
    for symbol in dict.fromkeys(c.symbol for c in program.calls):
        out.append(f"int __tvm_ffi_{symbol}(void* self, const Any* args, int32_t nargs, Any* ret);\n")
    for k, call in enumerate(program.calls):
        args = ", ".join(f"{{7, 0, {{.v_ptr = &views[{a}]}}}}" for a in call.args)
        out.append(f"static Any args_{k}[] = {{{args}}};\n")
    out.append("\nEXPORT(sparsecc_invoke) int sparsecc_invoke(void) {\n  Any ret;\n  int rc;\n")
    for k, call in enumerate(program.calls):
        out.append(f"  ret.type_index = 0;\n  if ((rc = __tvm_ffi_{call.symbol}(0, args_{k}, {len(call.args)}, &ret)) "
                   "!= 0) return rc;\n")
    out.append("  return 0;\n}\n\n")
    return "".join(out)


def _c_entries(program: StaticProgram) -> str:
    """The entry points beside ``sparsecc_invoke``: buffers, sizes, errors and ``sparsecc_run``."""
    out = []
    n_in, n_out = len(program.inputs), len(program.outputs)
    out.append(f"EXPORT(sparsecc_num_inputs) int sparsecc_num_inputs(void) {{ return {n_in}; }}\n")
    out.append(f"EXPORT(sparsecc_num_outputs) int sparsecc_num_outputs(void) {{ return {n_out}; }}\n")
    in_ptrs = ", ".join(f"input_{i}" for i in range(n_in)) or "0"
    in_sizes = ", ".join(str(s.nbytes) for s in program.inputs) or "0"
    out_views = ", ".join(f"&views[{v}]" for v in program.outputs) or "0"
    out_sizes = ", ".join(str(s.nbytes) for s in program.output_specs) or "0"
    out.append(f"static void* const input_data[] = {{{in_ptrs}}};\n"
               f"static const size_t input_nbytes[] = {{{in_sizes}}};\n"
               f"static Tensor* const output_views[] = {{{out_views}}};\n"
               f"static const size_t output_nbytes[] = {{{out_sizes}}};\n")
    out.append(f"EXPORT(sparsecc_input) void* sparsecc_input(int i) "
               f"{{ return i >= 0 && i < {n_in} ? input_data[i] : 0; }}\n"
               f"EXPORT(sparsecc_input_nbytes) size_t sparsecc_input_nbytes(int i) "
               f"{{ return i >= 0 && i < {n_in} ? input_nbytes[i] : 0; }}\n"
               f"EXPORT(sparsecc_output) const void* sparsecc_output(int i) "
               f"{{ return i >= 0 && i < {n_out} ? output_views[i]->data : 0; }}\n"
               f"EXPORT(sparsecc_output_nbytes) size_t sparsecc_output_nbytes(int i) "
               f"{{ return i >= 0 && i < {n_out} ? output_nbytes[i] : 0; }}\n"
               "EXPORT(sparsecc_error) const char* sparsecc_error(void) { return sc_error(); }\n\n")
    out.append(f"EXPORT(sparsecc_run) int sparsecc_run({', '.join(_arg_names(program)) or 'void'}) {{\n")
    for i in range(n_in):
        out.append(f"  if ((const void*)input{i} != input_data[{i}]) "
                   f"__builtin_memcpy(input_data[{i}], input{i}, input_nbytes[{i}]);\n")
    out.append("  int rc = sparsecc_invoke();\n  if (rc != 0) return rc;\n")
    for i in range(n_out):
        out.append(f"  if ((const void*)output{i} != output_views[{i}]->data) "
                   f"__builtin_memcpy(output{i}, output_views[{i}]->data, output_nbytes[{i}]);\n")
    out.append("  return 0;\n}\n")
    return "".join(out)


def header_source(program: StaticProgram, name: str = "model") -> str:
    """A C header declaring the model's entry points, with its input and output shapes."""
    guard = re.sub(r"\W", "_", name).upper() + "_SPARSECC_H"
    lines = [f"/* {name}: a model compiled by sparsecc (static program). Link {name}.o with -lm. */",
             f"#ifndef {guard}", f"#define {guard}", "#include <stddef.h>", "#include <stdint.h>",
             "#ifdef __cplusplus", 'extern "C" {', "#endif", "",
             f"#define SPARSECC_NUM_INPUTS {len(program.inputs)}",
             f"#define SPARSECC_NUM_OUTPUTS {len(program.outputs)}"]
    for kind, specs in (("INPUT", program.inputs), ("OUTPUT", program.output_specs)):
        for i, s in enumerate(specs):
            lines.append(f"/* {kind.lower()} {i}: {s.dtype} {list(s.shape)} */")
            lines.append(f"#define SPARSECC_{kind}{i}_NBYTES {s.nbytes}")
    lines += ["",
              "/* Run the model: copies the inputs in, runs every kernel, copies the outputs out. Returns 0,",
              "   or nonzero with the reason in sparsecc_error(). Not reentrant: one call at a time. */",
              f"int sparsecc_run({', '.join(_arg_names(program)) or 'void'});",
              "/* The model's own 64-byte-aligned input buffers and its outputs after a run: fill",
              "   sparsecc_input(i), call sparsecc_invoke(), read sparsecc_output(i) to avoid the copies. */",
              "void* sparsecc_input(int i);", "size_t sparsecc_input_nbytes(int i);",
              "const void* sparsecc_output(int i);", "size_t sparsecc_output_nbytes(int i);",
              "int sparsecc_invoke(void);", "int sparsecc_num_inputs(void);", "int sparsecc_num_outputs(void);",
              "const char* sparsecc_error(void);", "",
              "#ifdef __cplusplus", "}", "#endif", f"#endif /* {guard} */", ""]
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------
# building
# --------------------------------------------------------------------------------------------


def compile_kernels(program: StaticProgram, tvm_target: dict[str, Any], path: pathlib.Path) -> pathlib.Path:
    """Every called PrimFunc in one object for the target, at ``path``."""
    import tvm

    ex = tvm.compile(program.kernels, target=tvm_target)
    ex.mod.write_to_file(str(path))
    return path


def read_signature(folder: pathlib.Path) -> dict[str, Any]:
    """The signature (``model.json``) of a built static model in ``folder``; an
    :class:`~sparsecc.errors.ArtifactError` when it is missing or damaged."""
    from sparsecc.errors import ArtifactError

    path = folder / SIGNATURE_FILE
    if not path.is_file():
        raise ArtifactError(f"{path} is missing: the static model's signature is needed to run it; recompile")
    try:
        sig = json.loads(path.read_text())
        if sig.get("format") != SIGNATURE_FORMAT:
            raise ValueError("not a sparsecc static-model signature")
        if sig.get("version") != SIGNATURE_VERSION:
            raise ValueError(f"signature version {sig.get('version')!r}, this sparsecc reads {SIGNATURE_VERSION}")
        for entry in sig["inputs"] + sig["outputs"]:
            TensorSpec(tuple(entry["shape"]), entry["dtype"]).dlpack  # noqa: B018 - validates the dtype
    except (ValueError, KeyError, TypeError, StaticProgramError) as exc:
        raise ArtifactError(f"{path} is damaged ({exc}); recompile the model") from None
    return sig


def build_model(mod: Any, target: Any, folder: pathlib.Path) -> pathlib.Path:
    """Build the scheduled Relax module ``mod`` as a static program for ``target`` (a
    :class:`~sparsecc.targets.base.TargetRecord` with ``link_model``) into ``folder``; returns the
    runnable file (what the target's runner loads). ``model.json`` beside it is the signature."""
    if target.link_model is None:
        raise StaticProgramError(f"target {target.name!r} has no static-model linker")
    return build_program(translate(plan_memory(mod, target.tvm_target())), target, folder)


def build_program(program: StaticProgram, target: Any, folder: pathlib.Path) -> pathlib.Path:
    """Compile ``program``'s kernels for ``target``, link them with its driver through the
    record's ``link_model`` into ``folder``, and write ``model.json``; returns the runnable file."""
    folder.mkdir(parents=True, exist_ok=True)
    kernels = compile_kernels(program, target.tvm_target(), folder / "kernels.o")
    # absolute: the driver's .incbin names it, and the compiler may run in another directory
    blob = (folder / "constants.bin").resolve()
    blob.write_bytes(program.blob)
    try:
        main = target.link_model(program, kernels, blob, folder)
    finally:
        kernels.unlink(missing_ok=True)
        blob.unlink(missing_ok=True)
    (folder / SIGNATURE_FILE).write_text(json.dumps(program.signature(target.name), indent=2) + "\n")
    return main
