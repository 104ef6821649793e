"""Open ``.pt2`` files (``torch.export.save`` archives) without running code from them.

``torch.export.load`` trusts its input, and a ``.pt2`` file can run code when it is opened:

* pickles: weights and tensor constants whose payload config says ``use_pickle: true``
  (``torch.load(weights_only=False)``), opaque-object constants (``pickle.loads``), TorchScript
  custom objects (``torch._C._pickle_load_obj``), legacy ``data/weights/<model>.pt`` and
  ``data/constants/<model>.pt`` files, the sample inputs (``weights_only=True`` first, then
  ``weights_only=False`` when that fails) and the pre-2.8 zip format (``version`` +
  ``serialized_*.pt`` at the top of the zip);
* native code: AOTInductor shared libraries under ``data/aotinductor/``;
* Python source built from the program's JSON: symbolic shapes are parsed with
  ``sympy.sympify`` (an ``eval``), ``guards_code`` is ``exec``-ed by ``ExportedProgram.module()``,
  and input names, attribute paths and keyword names are pasted unquoted or inside quotes into the
  ``forward`` source torch.fx generates and executes.

:func:`load_pt2_safely` checks an archive's bytes against what ``torch.export.save`` (torch 2.13)
writes for an ordinary program (an allow-list, not a deny-list: anything else is refused), then
gives those same bytes to ``torch.export.load``, with torch's logging kept off the terminal. Every
refusal is one :class:`~sparsecc.errors.CaptureError` line: the problem, the file, the entry, the fix.
"""

from __future__ import annotations

import ast
import contextlib
import io
import json
import logging
import math
import operator
import re
import zipfile
from collections.abc import Iterator
from typing import Any, ClassVar

import torch

from .errors import CaptureError

TRUSTED_FIX = "re-export it with torch.export.save from a trusted source"

# The entries torch.export.save writes for one program named "model" (torch 2.13, archive version
# 0), below the archive's single top folder. The names are spelled out rather than read from
# torch.export.pt2_archive.constants so that a torch that renames them fails closed.
_ARCHIVE_FORMAT = "archive_format"
_ARCHIVE_VERSION = "archive_version"
_PROGRAM = "models/model.json"
_WEIGHTS_CONFIG = "data/weights/model_weights_config.json"
_CONSTANTS_CONFIG = "data/constants/model_constants_config.json"
_SAMPLE_INPUTS = "data/sample_inputs/model.pt"
_REQUIRED = (_ARCHIVE_FORMAT, _ARCHIVE_VERSION, _PROGRAM, _WEIGHTS_CONFIG, _CONSTANTS_CONFIG, _SAMPLE_INPUTS)
# Zip bookkeeping torch's writer adds; torch never reads them as data.
_BOOKKEEPING = ("byteorder", ".data/version", ".data/serialization_id")
_WEIGHT_FILE = re.compile(r"weight_[0-9]+")
_TENSOR_CONSTANT_FILE = re.compile(r"tensor_[0-9]+")


class _Archive:
    """The zip's entries as torch's own zip reader sees them (the reader torch.export.load uses)."""

    def __init__(self, name: str, reader: Any, entries: list[str]) -> None:
        self.name = name
        self.reader = reader
        self.entries = set(entries)

    def read(self, entry: str) -> bytes:
        return self.reader.get_record(entry)

    def json(self, entry: str) -> Any:
        # The same decoding torch applies (bytes.decode, then json.loads), so both see one document.
        try:
            return json.loads(self.read(entry).decode("utf-8"))
        except (ValueError, RecursionError) as exc:
            raise _damaged(self.name, f"entry {entry} is not valid JSON ({type(exc).__name__})") from None


def _refused(name: str, entry: str, problem: str) -> CaptureError:
    """The one-line error for an archive entry that would run code when torch loads it."""
    return CaptureError(f"unsafe .pt2 file {name}: entry {entry} {problem}; sparsecc refuses files that would run "
                        f"code when loaded: fix: {TRUSTED_FIX}")


def _damaged(name: str, problem: str) -> CaptureError:
    """The one-line error for a file that is not a well-formed torch.export.save archive."""
    return CaptureError(f"damaged .pt2 file {name}: {problem}; fix: pass a file written by torch.export.save "
                        "(export the model again, or copy the file again)")


def load_pt2_safely(data: bytes, name: str) -> torch.export.ExportedProgram:
    """Load the ExportedProgram in ``data``, the bytes of a ``.pt2`` file called ``name`` in messages.

    The bytes are checked by :func:`check_pt2` and then the same bytes are loaded, so a file
    cannot change between the check and the load. Raises CaptureError (one line) for a file
    that is damaged, would run code, or fails to deserialize; torch's log output stays quiet.
    """
    check_pt2(data, name)
    with captured_torch_logs() as records:
        try:
            return torch.export.load(io.BytesIO(data))
        except Exception as exc:  # noqa: BLE001 - deserialization raises many unrelated types
            raise CaptureError(f"could not load {name} as a torch.export program: {_reason(exc, records)}; "
                               "fix: pass a file written by torch.export.save with this torch version") from None


def check_pt2(data: bytes, name: str) -> None:
    """Raise CaptureError unless ``data`` is a ``torch.export.save`` archive of one program
    that ``torch.export.load`` can open without unpickling anything but plain tensors through
    torch's weights-only loader, loading native code, or evaluating text from the file."""
    archive = _open(data, name)
    _check_entries(archive)
    _check_payload_config(archive, _WEIGHTS_CONFIG, "data/weights/", _WEIGHT_FILE)
    _check_payload_config(archive, _CONSTANTS_CONFIG, "data/constants/", _TENSOR_CONSTANT_FILE)
    _check_sample_inputs(archive)
    _ProgramCheck(archive).run()


# --- the zip -------------------------------------------------------------------------------------

def _open(data: bytes, name: str) -> _Archive:
    """Both zip readers' views of the archive, which must agree entry for entry."""
    try:
        with zipfile.ZipFile(io.BytesIO(data)) as zf:
            names = zf.namelist()
    except (zipfile.BadZipFile, zipfile.LargeZipFile, OSError, ValueError, EOFError):
        raise _damaged(name, "it is not a zip archive (a truncated download, or not a .pt2 file)") from None
    folder = _single_folder(names, name)
    try:
        reader = torch._C.PyTorchFileReader(io.BytesIO(data))
        torch_names = reader.get_all_records()
    except RuntimeError as exc:
        raise _damaged(name, f"torch cannot read the zip ({_first_line(exc)})") from None
    ours = sorted(n[len(folder) + 1:] for n in names)
    # torch reads the records through miniz, the old-format fallback through Python's zipfile: a
    # zip the two read differently could show this check one file and torch another.
    if sorted(torch_names) != ours:
        raise _refused(name, "names", "differ between torch's zip reader and Python's (a crafted zip can show this "
                       "check one file and torch another)")
    return _Archive(name, reader, torch_names)


def _single_folder(names: list[str], name: str) -> str:
    """The one top folder every entry lies in (torch's writer puts them all under the file's stem)."""
    if not names:
        raise _damaged(name, "the zip archive is empty")
    seen: set[str] = set()
    for entry in names:
        if entry in seen:
            raise _refused(name, entry, "appears twice in the zip (two zip readers may pick different copies)")
        seen.add(entry)
        if "/" not in entry:
            # torch.export.load falls back to the pre-2.8 format, unpickled, when the top of the zip
            # holds "version"; an ordinary archive has nothing at the top.
            raise _refused(name, entry, "lies at the top of the zip, the pre-2.8 torch.export format whose "
                          "serialized_*.pt files torch unpickles with weights_only=False")
    folders = {entry.split("/", 1)[0] for entry in names}
    if len(folders) != 1:
        raise _damaged(name, f"its entries lie in {len(folders)} top folders, torch.export.save writes one")
    return folders.pop()


def _check_entries(archive: _Archive) -> None:
    """Every entry is one torch.export.save writes for a plain program, and the needed ones exist.

    Entries torch.export.save does not write are refused rather than judged inert: torch's loader
    picks entries up by prefix (models/, data/aotinductor/, legacy .pt names) and a later torch may
    read more of them. The exception is extra/, which torch reads only as UTF-8 text.
    """
    for entry in sorted(archive.entries):
        problem = _entry_problem(entry)
        if problem:
            raise _refused(archive.name, entry, problem)
    for entry in _REQUIRED:
        if entry not in archive.entries:
            raise _damaged(archive.name, f"entry {entry} is missing")
    if archive.read(_ARCHIVE_FORMAT) != b"pt2":
        raise _damaged(archive.name, f"entry {_ARCHIVE_FORMAT} does not say pt2")
    version = archive.read(_ARCHIVE_VERSION)
    if version != b"0":
        raise _damaged(archive.name, f"archive version {version[:20]!r}, this torch reads version 0")


def _entry_problem(entry: str) -> str | None:
    """None for an allowed entry name, else what is wrong with it (the start of a refusal)."""
    head, _, leaf = entry.rpartition("/")
    if entry in _REQUIRED or entry in _BOOKKEEPING or entry.startswith("extra/"):
        return None
    if head == "data/weights" and _WEIGHT_FILE.fullmatch(leaf):
        return None
    if head == "data/constants" and _TENSOR_CONSTANT_FILE.fullmatch(leaf):
        return None
    if entry.startswith("data/aotinductor/"):
        return "is AOTInductor compiled code (a shared library torch would load)"
    if head in ("data/weights", "data/constants") and leaf.endswith(".pt"):
        return "is a legacy pickled weights/constants file (torch unpickles it with weights_only=False)"
    if head == "data/constants" and leaf.startswith("custom_obj_"):
        return "is a TorchScript custom object (torch._C._pickle_load_obj)"
    if head == "data/constants" and leaf.startswith("opaque_obj_"):
        return "is a pickled opaque object (pickle.loads)"
    if entry.startswith(("models/", "data/sample_inputs/")):
        return "belongs to a second program in the archive (torch.export.save writes one, named model)"
    return "is not an entry torch.export.save writes for a program"


def _check_payload_config(archive: _Archive, config_entry: str, folder: str, payload: re.Pattern[str]) -> None:
    """Each weight or constant is raw tensor bytes (``use_pickle: false``) in an allowed entry."""
    config = archive.json(config_entry)
    items = config.get("config") if isinstance(config, dict) else None
    if not isinstance(items, dict):
        raise _damaged(archive.name, f"entry {config_entry} has no config table")
    for fqn, meta in items.items():
        path = meta.get("path_name") if isinstance(meta, dict) else None
        if not isinstance(path, str):
            raise _damaged(archive.name, f"entry {config_entry} lists {fqn!r} without a path_name")
        entry = f"{folder}{path}"
        problem = None if payload.fullmatch(path) else _entry_problem(entry)
        if problem:
            raise _refused(archive.name, entry, f"(named in {config_entry}) {problem}")
        # torch tests `if payload_meta.use_pickle:`; anything but false would be unpickled.
        if meta.get("use_pickle") is not False:
            raise _refused(archive.name, entry, f"holds {fqn!r} as a pickle (use_pickle: {meta.get('use_pickle')!r} "
                          f"in {config_entry}), which torch unpickles with weights_only=False")
        if entry not in archive.entries:
            raise _damaged(archive.name, f"entry {config_entry} names {entry}, which is missing")
        _check_text(archive.name, config_entry, fqn)


def _check_sample_inputs(archive: _Archive) -> None:
    """The stored example inputs load with torch's weights-only unpickler.

    torch tries ``weights_only=True`` first and falls back to ``weights_only=False`` when that
    raises. The same call on the same bytes gives the same answer, so if it succeeds here,
    torch's first try succeeds and the fallback never runs.
    """
    data = archive.read(_SAMPLE_INPUTS)
    if not data:
        return  # torch skips empty sample inputs without unpickling
    try:
        inputs = torch.load(io.BytesIO(data), weights_only=True)
    except Exception as exc:  # noqa: BLE001 - the unpickler raises many types
        found = re.search(r"Unsupported global: GLOBAL ([\w.]+)", str(exc))
        what = f"the global {found.group(1)}" if found else "it"
        raise _refused(archive.name, _SAMPLE_INPUTS, f"is not plain tensors (torch's weights-only loader refuses "
                       f"{what}), so torch would unpickle it with weights_only=False") from None
    if not isinstance(inputs, (tuple, dict)):
        raise _damaged(archive.name, f"entry {_SAMPLE_INPUTS} holds a {type(inputs).__name__}, not (args, kwargs)")


# --- the program's JSON --------------------------------------------------------------------------

# Keys whose values torch.fx pastes unquoted into generated source (placeholder and node names).
_IDENTIFIER_KEYS = frozenset({"name", "as_name", "user_input_name"})
# Characters that would end or escape a quoted string in generated source, or start a new line.
_QUOTING = re.compile(r"['\"\\]")


class _ProgramCheck:
    """Walks models/model.json: the strings torch evaluates or pastes into source must be inert."""

    def __init__(self, archive: _Archive) -> None:
        self.archive = archive

    # Keys whose values need their own check. A dict-typed field (tensor_values, ...) may use any
    # of these as a key: each check then fails on the unexpected value, so nothing hides behind them.
    SPECIAL: ClassVar[dict[str, str]] = {
        "expr_str": "sym_expr", "guards_code": "guards", "in_spec": "treespec", "out_spec": "treespec",
        "forward_arg_names": "arg_names", "metadata": "metadata"}

    def run(self) -> None:
        program = self.archive.json(_PROGRAM)
        try:
            self.walk(program, "")
        except RecursionError:
            raise _damaged(self.archive.name, f"entry {_PROGRAM} is nested too deeply") from None

    def fail(self, what: str) -> CaptureError:
        return _refused(self.archive.name, _PROGRAM, what)

    def walk(self, value: Any, key: str) -> None:
        if key in self.SPECIAL:
            getattr(self, self.SPECIAL[key])(value)
            return
        if isinstance(value, dict):
            for child_key, child in value.items():
                _check_text(self.archive.name, _PROGRAM, child_key)
                self.walk(child, child_key)
        elif isinstance(value, list):
            for child in value:
                self.walk(child, key)
        elif isinstance(value, str):
            _check_text(self.archive.name, _PROGRAM, value)
            if key in _IDENTIFIER_KEYS and value and not value.isidentifier():
                raise self.fail(f"has the {key} {value[:60]!r}, which is not an identifier: torch.fx would paste "
                                "it into generated Python source")
            if key == "target":
                _check_call_target(self.archive.name, value)
            elif key == "as_operator":
                self.operator_argument(value)

    def operator_argument(self, value: str) -> None:
        """An operator passed as an argument (to a higher-order op) is resolved by walking
        attributes from torch, operator or math, and no verifier looks at it afterwards: it must
        name an operator, not any callable those modules reach (torch.os.system, torch.load)."""
        resolved = _resolve_operator(value)
        ops = (torch._ops.OpOverload, torch._ops.OpOverloadPacket, torch._ops.HigherOrderOperator)
        if resolved is not value and not isinstance(resolved, ops):
            raise self.fail(f"passes {value[:60]!r} as an operator argument, which is not a torch operator: the "
                            "program would call it")

    def metadata(self, value: Any) -> None:
        """Node and graph metadata (stack traces, module paths, JSON annotations) is a flat
        str -> str table that torch keeps as data; its text may hold quotes."""
        if not (isinstance(value, dict) and all(isinstance(v, str) for v in value.values())):
            raise self.fail("has metadata that is not a table of strings")
        for child_key in value:
            _check_text(self.archive.name, _PROGRAM, child_key)

    def sym_expr(self, value: Any) -> None:
        if not (isinstance(value, str) and _SymExpr.safe(value)):
            raise self.fail(f"has a symbolic shape {str(value)[:60]!r} that is not a plain sympy expression: "
                            "torch parses it with sympy.sympify (eval)")

    def guards(self, value: Any) -> None:
        for guard in _as_list(value):
            if not (isinstance(guard, str) and _Guard.safe(guard)):
                raise self.fail(f"has a shape guard {str(guard)[:60]!r} that is not a plain comparison of input "
                                "sizes: ExportedProgram.module() runs it with exec")

    def arg_names(self, value: Any) -> None:
        for arg in _as_list(value):
            if not (isinstance(arg, str) and arg.isidentifier()):
                raise self.fail(f"has the argument name {str(arg)[:60]!r}, which is not an identifier: torch.fx "
                                "would paste it into generated Python source")

    def treespec(self, value: Any) -> None:
        """Input/output tree specs: a JSON string whose dict keys torch.fx pastes inside quotes."""
        try:
            tree = json.loads(value)
        except (TypeError, ValueError, RecursionError):
            raise self.fail("has an input/output tree spec that is not JSON") from None
        self.spec_strings(tree)

    def spec_strings(self, value: Any) -> None:
        if isinstance(value, dict):
            for child_key, child in value.items():
                _check_text(self.archive.name, _PROGRAM, child_key)
                if child_key == "context" and isinstance(child, str):
                    # a dict node's context is its keys, itself JSON-encoded
                    try:
                        child = json.loads(child)
                    except (ValueError, RecursionError):
                        pass
                self.spec_strings(child)
        elif isinstance(value, list):
            for child in value:
                self.spec_strings(child)
        elif isinstance(value, str):
            _check_text(self.archive.name, _PROGRAM, value)


def _as_list(value: Any) -> list[Any]:
    """A list field torch may also leave null (forward_arg_names, guards_code)."""
    return value if isinstance(value, list) else [] if value is None else [value]


def _check_text(name: str, entry: str, text: Any) -> None:
    """A string from the archive that torch may paste into source inside quotes: no quote,
    backslash or line break can end the string literal it lands in."""
    if isinstance(text, str) and (_QUOTING.search(text) or not text.isprintable()):
        raise _refused(name, entry, f"has the string {text[:60]!r}, whose quotes, backslashes or line breaks "
                      "could end the literal torch.fx pastes it into")


# Python callables a node may call besides torch operators: what torch's serializer writes for
# symbolic-shape arithmetic. Any other callable torch's attribute walk reaches (a function that
# imports a module by name, torch.load) could run code when the graph runs.
_SAFE_CALLS = frozenset({
    *(f"_operator.{name}" for name in ("getitem", "add", "sub", "mul", "floordiv", "truediv", "mod", "pow", "neg",
                                       "pos", "abs", "eq", "ne", "lt", "le", "gt", "ge", "and_", "or_", "xor",
                                       "not_", "invert", "lshift", "rshift")),
    *(f"math.{name}" for name in ("ceil", "floor", "trunc", "sqrt", "log2", "pow")),
    *(f"torch.{name}" for name in ("sym_float", "sym_int", "sym_max", "sym_min", "sym_not", "sym_ite", "sym_sqrt",
                                   "_sym_sqrt", "sym_sum")),
})
# Higher-order operators that only call the program's own subgraphs or registered operators.
_SAFE_HIGHER_ORDER = frozenset({
    "cond", "while_loop", "map_impl", "scan", "associative_scan", "auto_functionalized", "auto_functionalized_v2",
    "wrap_with_set_grad_enabled", "wrap_with_autocast", "invoke_subgraph", "with_effects",
})


def _check_call_target(name: str, target: str) -> None:
    """A node may call a torch operator (registered ones; higher-order ones from a short list) or
    one of the symbolic-shape functions in ``_SAFE_CALLS``, nothing else."""
    parts = target.split(".")
    if parts[:3] == ["torch", "ops", "higher_order"]:
        if len(parts) == 4 and parts[3] in _SAFE_HIGHER_ORDER:
            return
    elif parts[:2] == ["torch", "ops"] and len(parts) == 5:
        _check_operator(name, target)
        return
    elif target in _SAFE_CALLS:
        return
    raise _refused(name, _PROGRAM, f"calls {target[:80]!r}, which is not a torch operator: running the program would "
                   "call it")


def _check_operator(name: str, target: str) -> None:
    """A custom operator the program calls must be registered before loading, as torch needs it
    to be; say so in one line instead of torch's node dump."""
    parts = target.split(".")
    namespace, op, overload = parts[2:]
    # dunder names are real operators (aten::__and__.Tensor); the lookup must end at an operator,
    # not at some attribute of the namespace objects
    if all(p.isidentifier() for p in parts) and not namespace.startswith("_"):
        try:
            found = getattr(getattr(getattr(torch.ops, namespace), op), overload)
        except (AttributeError, RuntimeError):
            found = None
        if isinstance(found, torch._ops.OpOverload):
            return
    raise CaptureError(f"could not load {name}: it calls the operator {namespace}::{op}.{overload}, which is not "
                       "registered in this process; fix: if it is a custom op, import the module that registers it "
                       "(torch.library) before loading; otherwise export the program with this torch version")


def _resolve_operator(target: str) -> Any:
    """What torch's deserializer (``deserialize_operator``) makes of an operator string: the object
    its attribute walk reaches, or the string itself when the walk fails; None (refused) for a
    dunder step, which this check does not walk."""
    roots = (("_operator", operator), ("torch", torch), ("math", math))
    module = next((mod for prefix, mod in roots if target.startswith(prefix)), None)
    if module is None:
        return target
    obj: Any = module
    for step in target.split(".")[1:]:
        if step.startswith("__"):
            return None  # not an operator: refused by the caller
        if not hasattr(obj, step):
            return target
        obj = getattr(obj, step)
    return obj


class _SymExpr:
    """Symbolic shapes as torch writes them: ``sympy.srepr`` text, e.g.
    ``Add(Symbol('s0', positive=True, integer=True), Integer(1))``. Calls may only name sympy or
    torch shape functions, and strings may only be symbol names or numbers, so the ``eval`` inside
    ``sympy.sympify`` (which also sympifies string arguments) can only build expressions."""

    CALLS = frozenset({
        "Symbol", "Dummy", "Integer", "Rational", "Float", "Add", "Mul", "Pow", "Mod", "Max", "Min", "Abs",
        "Eq", "Ne", "Lt", "Le", "Gt", "Ge", "Equality", "Unequality", "StrictLessThan", "LessThan",
        "StrictGreaterThan", "GreaterThan", "And", "Or", "Not", "Xor", "floor", "ceiling", "Piecewise",
        "ExprCondPair", "ITE", "Tuple", "sqrt",
        # torch.utils._sympy.functions, as the deserializer names them
        "FloorDiv", "ModularIndexing", "Where", "PythonMod", "CleanDiv", "CeilToInt", "FloorToInt", "CeilDiv",
        "LShift", "RShift", "PowByNatural", "FloatPow", "FloatTrueDiv", "IntTrueDiv",
        "IsNonOverlappingAndDenseIndicator", "TruncToFloat", "TruncToInt", "RoundToInt", "RoundDecimal",
        "ToFloat", "Identity",
    })
    TORCH_FUNCTION = re.compile(r"(OpaqueUnaryFn|BitwiseFn)_[a-z0-9_]+")
    SAFE_STRING = re.compile(r"[A-Za-z][A-Za-z0-9_]*|[-+]?[0-9]*\.?[0-9]+(e[-+]?[0-9]+)?", re.IGNORECASE)

    @classmethod
    def safe(cls, text: str) -> bool:
        tree = _parse_expression(text)
        return tree is not None and cls.node(tree.body)

    @classmethod
    def node(cls, node: ast.AST) -> bool:
        if isinstance(node, ast.Constant):
            return isinstance(node.value, (int, float, bool)) or node.value is None
        if isinstance(node, ast.Name):
            return not node.id.startswith("_")  # a bare name is looked up, never called
        if isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.USub, ast.UAdd)):
            return cls.node(node.operand)
        if isinstance(node, ast.Tuple):
            return all(cls.node(e) for e in node.elts)
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Name):
            name = node.func.id
            known = name in cls.CALLS or cls.TORCH_FUNCTION.fullmatch(name) is not None
            args_ok = all(cls.string(a) or cls.node(a) for a in node.args)
            keywords_ok = all(k.arg is not None and isinstance(k.value, ast.Constant)
                              and not isinstance(k.value.value, str) for k in node.keywords)
            return known and args_ok and keywords_ok
        return False

    @classmethod
    def string(cls, node: ast.AST) -> bool:
        return (isinstance(node, ast.Constant) and isinstance(node.value, str)
                and cls.SAFE_STRING.fullmatch(node.value) is not None)


class _Guard:
    """Shape guards as torch prints them (``ShapeGuardPythonPrinter``), e.g.
    ``(L['x'].size()[0] % 2) == 0``: arithmetic and comparisons of input sizes, strides and the
    pure helpers the generated guard function sees (math, torch.sym_*, max/min/abs/round)."""

    NAMES = frozenset({"L", "math", "torch", "inf", "IsNonOverlappingAndDenseIndicator",
                       "cast_symbool_to_symint_guardless", "max", "min", "abs", "round", "int", "float", "bool"})
    FUNCTIONS = frozenset({"IsNonOverlappingAndDenseIndicator", "cast_symbool_to_symint_guardless", "max", "min",
                           "abs", "round", "int", "float", "bool"})
    TENSOR_METHODS = frozenset({"size", "stride", "storage_offset", "dim", "numel"})
    OPERATORS = (ast.Add, ast.Sub, ast.Mult, ast.Div, ast.FloorDiv, ast.Mod, ast.Pow, ast.LShift, ast.RShift,
                 ast.BitAnd, ast.BitOr, ast.BitXor, ast.USub, ast.UAdd, ast.Not, ast.Invert, ast.And, ast.Or,
                 ast.Eq, ast.NotEq, ast.Lt, ast.LtE, ast.Gt, ast.GtE)
    KEY = re.compile(r"[A-Za-z0-9_.]*")

    @classmethod
    def safe(cls, text: str) -> bool:
        # The raw text is pasted into torch._assert(<text>, "Guard failed: ...") before exec: no
        # comment, statement separator or string that could reach past that call.
        if not text.isprintable() or any(c in text for c in "\"\\#;"):
            return False
        tree = _parse_expression(text)
        return tree is not None and cls.node(tree.body)

    @classmethod
    def node(cls, node: ast.AST) -> bool:
        if isinstance(node, (ast.BoolOp, ast.BinOp, ast.UnaryOp, ast.Compare)):
            return cls.operation(node)
        if isinstance(node, ast.Constant):
            value = node.value
            return not isinstance(value, (str, bytes)) or (isinstance(value, str) and bool(cls.KEY.fullmatch(value)))
        if isinstance(node, ast.Name):
            return node.id in cls.NAMES
        if isinstance(node, ast.Subscript):
            return cls.node(node.value) and cls.node(node.slice)
        if isinstance(node, (ast.Tuple, ast.List)):
            return all(cls.node(e) for e in node.elts)
        if isinstance(node, ast.IfExp):  # how Piecewise prints
            return cls.node(node.test) and cls.node(node.body) and cls.node(node.orelse)
        if isinstance(node, ast.Attribute):
            return cls.attribute(node)
        if isinstance(node, ast.Call):
            func_ok = (isinstance(node.func, ast.Name) and node.func.id in cls.FUNCTIONS) or (
                isinstance(node.func, ast.Attribute) and cls.attribute(node.func))
            return func_ok and not node.keywords and all(cls.node(a) for a in node.args)
        return False

    @classmethod
    def operation(cls, node: ast.BoolOp | ast.BinOp | ast.UnaryOp | ast.Compare) -> bool:
        if isinstance(node, ast.BoolOp):
            ops, operands = [node.op], node.values
        elif isinstance(node, ast.BinOp):
            ops, operands = [node.op], [node.left, node.right]
        elif isinstance(node, ast.UnaryOp):
            ops, operands = [node.op], [node.operand]
        else:
            ops, operands = node.ops, [node.left, *node.comparators]
        return all(isinstance(op, cls.OPERATORS) for op in ops) and all(cls.node(o) for o in operands)

    @classmethod
    def attribute(cls, node: ast.Attribute) -> bool:
        base, attr = node.value, node.attr
        if isinstance(base, ast.Name) and base.id == "math":
            return not attr.startswith("_")
        if isinstance(base, ast.Name) and base.id == "torch":
            return attr.startswith("sym_") or attr == "_sym_sqrt"
        return attr in cls.TENSOR_METHODS and cls.node(base)


def _parse_expression(text: str) -> ast.Expression | None:
    try:
        return ast.parse(text, mode="eval")
    except (SyntaxError, ValueError, RecursionError, MemoryError):
        return None


# --- torch's logging -----------------------------------------------------------------------------

class _Keep(logging.Handler):
    def __init__(self, records: list[logging.LogRecord]) -> None:
        super().__init__(logging.NOTSET)
        self.records = records

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


@contextlib.contextmanager
def captured_torch_logs() -> Iterator[list[logging.LogRecord]]:
    """Collect what torch logs (warnings, logged tracebacks) instead of printing it.

    torch's loggers ("torch", "torch.export", "torch._export.serde.serialize", ...) carry their own
    stderr handlers and do not propagate, so a handler on "torch" alone does not silence them:
    every existing torch logger gets this one handler and no propagation until the block ends
    (loggers created meanwhile propagate to one of them). Levels above WARNING (a caller that
    silenced torch) come down to WARNING meanwhile, so the logged reason for a failure is kept.
    Other threads' torch logs in that window are collected too.
    """
    records: list[logging.LogRecord] = []
    keep = _Keep(records)
    manager = logging.Logger.manager
    loggers = [logging.getLogger("torch")] + [
        lg for key, lg in list(manager.loggerDict.items())
        if key.startswith("torch.") and isinstance(lg, logging.Logger)]
    saved = [(lg, lg.handlers, lg.propagate, lg.level) for lg in loggers]
    for lg in loggers:
        lg.handlers, lg.propagate = [keep], False
        if lg.level > logging.WARNING:
            lg.setLevel(logging.WARNING)
    try:
        yield records
    finally:
        for lg, handlers, propagate, level in saved:
            lg.handlers, lg.propagate = handlers, propagate
            lg.setLevel(level)


def _reason(exc: BaseException, records: list[logging.LogRecord]) -> str:
    """torch's real reason in one line: torch.export.load logs the deserialization error and
    raises a generic "check the warnings above" one, so prefer the logged exception's innermost cause."""
    logged = [r.exc_info[1] for r in records if r.exc_info and r.exc_info[1] is not None]
    cause: BaseException = logged[0] if logged else exc
    while cause.__cause__ is not None:
        cause = cause.__cause__
    return f"{type(cause).__name__}: {_first_line(cause)[:200]}"


def _first_line(exc: BaseException) -> str:
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    return lines[0] if lines else type(exc).__name__

