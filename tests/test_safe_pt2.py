"""Opening a .pt2 file runs no code from it (sparsecc.safe_pt2): every place torch.export.load
would unpickle, load a library or evaluate text is refused with one line, before torch sees the
file; ordinary programs and sparsecc's own artifacts still load."""

from __future__ import annotations

import io
import json
import pathlib
import pickle
import subprocess
import sys
import warnings
import zipfile

import pytest
import sparsecc
import torch
from sparsecc.capture import load_exported, load_exported_bytes
from sparsecc.errors import CaptureError
from sparsecc.safe_pt2 import load_pt2_safely


class Payload:
    """Unpickling this creates ``marker``: the stand-in for arbitrary code."""

    def __init__(self, marker: pathlib.Path) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return (pathlib.Path.touch, (self.marker,))


def _torch_pickle(marker: pathlib.Path) -> bytes:
    buffer = io.BytesIO()
    torch.save(Payload(marker), buffer)
    return buffer.getvalue()


def _touch_code(marker: pathlib.Path) -> str:
    return f"__import__('pathlib').Path({str(marker)!r}).touch()"


class MLP(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.fc2 = torch.nn.Linear(4, 8), torch.nn.Linear(8, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(torch.relu(self.fc1(x)))


class ConvBN(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv, self.bn = torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn(self.conv(x))


class WithConstant(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc, self.offset = torch.nn.Linear(3, 3), torch.randn(3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x) + self.offset


class PairAndKeyword(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = torch.nn.Linear(3, 3)

    def forward(self, pair: tuple[torch.Tensor, torch.Tensor], *, scale: torch.Tensor) -> torch.Tensor:
        return self.fc(pair[0]) * scale + pair[1]


class Guarded(torch.nn.Module):
    """Dynamic sizes with guards (guards_code) and symbolic shapes (expr_str) in the file."""

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        if x.shape[0] % 2 == 0 and x.shape[0] > 3:
            return x[: x.shape[0] // 2] + y
        return x


class DunderOp(torch.nn.Module):
    """Calls aten::__and__ (a real operator with a dunder name, as MiniLM's attention mask does)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return ((x > 0) & (x < 1)).float() * x


def _programs() -> dict[str, tuple[torch.export.ExportedProgram, tuple, dict]]:
    torch.manual_seed(0)
    dyn = torch.export.Dim.DYNAMIC
    cases = {
        "mlp": (MLP(), (torch.randn(2, 4),), {}, None),
        "conv_bn": (ConvBN().eval(), (torch.randn(1, 3, 8, 8),), {}, None),
        "constant": (WithConstant(), (torch.randn(2, 3),), {}, None),
        "pair_kwargs": (PairAndKeyword(), ((torch.randn(2, 3), torch.randn(2, 3)),), {"scale": torch.tensor(2.0)},
                        None),
        "guarded": (Guarded(), (torch.randn(8, 4), torch.randn(4, 4)), {}, {"x": {0: dyn}, "y": {0: dyn}}),
        "dunder_op": (DunderOp(), (torch.randn(2, 3),), {}, None),
    }
    out = {}
    for name, (model, args, kwargs, dynamic) in cases.items():
        out[name] = (torch.export.export(model, args, kwargs, dynamic_shapes=dynamic), args, kwargs)
    return out


def _saved(ep: torch.export.ExportedProgram) -> bytes:
    buffer = io.BytesIO()
    torch.export.save(ep, buffer)
    return buffer.getvalue()


@pytest.fixture(scope="module")
def programs():
    return _programs()


@pytest.fixture(scope="module")
def archives(programs):
    return {name: _saved(ep) for name, (ep, _, _) in programs.items()}


def _rewrite(data: bytes, replace: dict[str, bytes] | None = None, add: dict[str, bytes] | None = None,
             top: dict[str, bytes] | None = None) -> bytes:
    """A copy of the archive with entries (named below its top folder) replaced or added, or,
    with ``top``, a zip of only those top-level entries."""
    replace, add = replace or {}, add or {}
    out = io.BytesIO()
    with zipfile.ZipFile(io.BytesIO(data)) as src, zipfile.ZipFile(out, "w") as dst:
        if top is not None:
            for name, payload in top.items():
                dst.writestr(name, payload)
        else:
            root = src.namelist()[0].split("/", 1)[0]
            for info in src.infolist():
                entry = info.filename[len(root) + 1:]
                dst.writestr(info.filename, replace.get(entry, src.read(info.filename)))
            for entry, payload in add.items():
                dst.writestr(f"{root}/{entry}", payload)
    return out.getvalue()


def _read(data: bytes, entry: str) -> bytes:
    with zipfile.ZipFile(io.BytesIO(data)) as zf:
        root = zf.namelist()[0].split("/", 1)[0]
        return zf.read(f"{root}/{entry}")


def _edit_json(data: bytes, entry: str, edit) -> dict[str, bytes]:
    doc = json.loads(_read(data, entry))
    edit(doc)
    return {entry: json.dumps(doc).encode()}


WEIGHTS = "data/weights/model_weights_config.json"
CONSTANTS = "data/constants/model_constants_config.json"
PROGRAM = "models/model.json"


def _pickled_weight(archives, marker):
    def edit(doc):
        doc["config"]["fc1.weight"]["use_pickle"] = True
    return _rewrite(archives["mlp"], {**_edit_json(archives["mlp"], WEIGHTS, edit),
                                      "data/weights/weight_0": _torch_pickle(marker)}), "data/weights/weight_0"


def _pickled_constant(archives, marker):
    def edit(doc):
        doc["config"]["offset"]["use_pickle"] = True
    return _rewrite(archives["constant"], {**_edit_json(archives["constant"], CONSTANTS, edit),
                                           "data/constants/tensor_0": _torch_pickle(marker)}), "data/constants/tensor_0"


def _object_constant(prefix):
    def build(archives, marker):
        entry = f"{prefix}0"

        def edit(doc):
            doc["config"]["obj"] = {"path_name": entry, "is_param": False, "use_pickle": True, "tensor_meta": None}
        replace = _edit_json(archives["mlp"], CONSTANTS, edit)
        return _rewrite(archives["mlp"], replace, {f"data/constants/{entry}": pickle.dumps(Payload(marker))}), entry
    return build


def _object_constant_config_only(archives, marker):
    """The config names an opaque object whose file is absent: refused by the config check."""
    def edit(doc):
        doc["config"]["obj"] = {"path_name": "opaque_obj_0", "is_param": False, "use_pickle": True,
                                "tensor_meta": None}
    return _rewrite(archives["mlp"], _edit_json(archives["mlp"], CONSTANTS, edit)), "data/constants/opaque_obj_0"


def _sample_inputs(archives, marker):
    return _rewrite(archives["mlp"], {"data/sample_inputs/model.pt": _torch_pickle(marker)}), \
        "data/sample_inputs/model.pt"


def _legacy(folder):
    def build(archives, marker):
        entry = f"data/{folder}/model.pt"
        return _rewrite(archives["mlp"], add={entry: _torch_pickle(marker)}), entry
    return build


def _old_format(archives, marker):
    payload = _torch_pickle(marker)
    top = {"version": b"8.20", "serialized_exported_program.json": _read(archives["mlp"], PROGRAM),
           "serialized_state_dict.pt": payload, "serialized_constants.pt": payload,
           "serialized_example_inputs.pt": payload}
    return _rewrite(archives["mlp"], top=top), "version"


def _aotinductor(archives, marker):
    entry = "data/aotinductor/model/model.so"
    return _rewrite(archives["mlp"], add={entry: b"\x7fELF not really"}), entry


def _symbolic_shape(archives, marker):
    text = _read(archives["guarded"], PROGRAM).decode()
    symbol = next(s for s in json.loads(text)["range_constraints"])
    original = json.dumps(f"Symbol('{symbol}', positive=True, integer=True)")
    assert original in text
    hostile = json.dumps(f"{_touch_code(marker)} or Symbol('{symbol}', positive=True, integer=True)")
    return _rewrite(archives["guarded"], {PROGRAM: text.replace(original, hostile, 1).encode()}), PROGRAM


def _input_name(archives, marker):
    text = _read(archives["mlp"], PROGRAM).decode()
    hostile = text.replace('"x"', json.dumps(f"x={_touch_code(marker)}"))
    return _rewrite(archives["mlp"], {PROGRAM: hostile.encode()}), PROGRAM


def _guards_code(archives, marker):
    def edit(doc):
        doc["guards_code"] = [f"{_touch_code(marker)} or True"]
    return _rewrite(archives["mlp"], _edit_json(archives["mlp"], PROGRAM, edit)), PROGRAM


def _quoted_attribute(archives, marker):
    """A weight name that would end the "..." torch.fx pastes attribute paths into."""
    def rename(doc):
        doc["config"]['fc1.w"x'] = doc["config"].pop("fc1.weight")
    return _rewrite(archives["mlp"], _edit_json(archives["mlp"], WEIGHTS, rename)), WEIGHTS


def _operator_argument(archives, marker):
    """A callable smuggled in as an operator argument (no verifier looks at arguments)."""
    def edit(doc):
        node = doc["graph_module"]["graph"]["nodes"][0]
        node["inputs"].append({"name": "fn", "arg": {"as_operator": "torch.os.system"}, "kind": 1})
    return _rewrite(archives["mlp"], _edit_json(archives["mlp"], PROGRAM, edit)), PROGRAM


def _node_target(archives, marker):
    """A node calling a torch function that imports a module named by its string argument."""
    def edit(doc):
        node = doc["graph_module"]["graph"]["nodes"][0]
        node["target"] = "torch.export.custom_ops._call_custom_autograd_function_in_pre_dispatch"
    return _rewrite(archives["mlp"], _edit_json(archives["mlp"], PROGRAM, edit)), PROGRAM


# Every place a .pt2 can hide code, and (where plain torch.export.load shows it) proof that it runs.
HOSTILE = {
    "pickled_weight": (_pickled_weight, True),
    "pickled_tensor_constant": (_pickled_constant, True),
    "opaque_object_constant": (_object_constant("opaque_obj_"), True),
    "opaque_object_in_config_only": (_object_constant_config_only, False),
    "custom_object_constant": (_object_constant("custom_obj_"), False),
    "sample_inputs_pickle": (_sample_inputs, True),
    "legacy_weights_file": (_legacy("weights"), True),
    "legacy_constants_file": (_legacy("constants"), True),
    "old_zip_format": (_old_format, True),
    "aotinductor_library": (_aotinductor, False),
    "sympy_expression": (_symbolic_shape, True),
    "input_name_in_source": (_input_name, True),
    "guards_code": (_guards_code, True),
    "quote_in_attribute_name": (_quoted_attribute, False),
    "operator_argument": (_operator_argument, False),
    "node_target_function": (_node_target, False),
}


@pytest.mark.parametrize("kind", sorted(HOSTILE))
def test_hostile_archive_is_refused_without_running_code(kind, archives, tmp_path):
    marker = tmp_path / "ran"
    data, entry = HOSTILE[kind][0](archives, marker)
    with pytest.raises(CaptureError) as info:
        load_pt2_safely(data, "hostile.pt2")
    message = str(info.value)
    assert not marker.exists()
    assert "\n" not in message and "hostile.pt2" in message and entry in message
    assert message.startswith(("unsafe .pt2 file", "damaged .pt2 file"))
    assert "torch.export.save" in message
    # The file path API refuses it the same way.
    path = tmp_path / "hostile.pt2"
    path.write_bytes(data)
    with pytest.raises(CaptureError, match="unsafe .pt2 file"):
        load_exported(path)
    assert not marker.exists()


_PLAIN_LOAD = """
import io, json, sys, torch
for path in json.loads(sys.argv[1]):
    try:
        ep = torch.export.load(io.BytesIO(open(path, "rb").read()))
        args, kwargs = ep.example_inputs
        ep.module()(*args, **kwargs)  # guards_code runs here, in the generated guard function
    except Exception:
        pass
"""


def test_plain_torch_load_runs_the_payloads(archives, tmp_path):
    """Without sparsecc's checks the same files do run code: the tests above can fail."""
    provable = sorted(kind for kind, (_, runs) in HOSTILE.items() if runs)
    paths, markers = [], {}
    for kind in provable:
        markers[kind] = tmp_path / f"ran-{kind}"
        data, _ = HOSTILE[kind][0](archives, markers[kind])
        paths.append(str(tmp_path / f"{kind}.pt2"))
        pathlib.Path(paths[-1]).write_bytes(data)
    subprocess.run([sys.executable, "-c", _PLAIN_LOAD, json.dumps(paths)], capture_output=True, timeout=120,
                   check=False)
    assert [kind for kind in provable if not markers[kind].exists()] == []


@pytest.mark.parametrize("name", ["mlp", "conv_bn", "constant", "pair_kwargs", "guarded", "dunder_op"])
def test_ordinary_programs_round_trip(name, programs, archives):
    ep, args, kwargs = programs[name]
    loaded = load_pt2_safely(archives[name], f"{name}.pt2")
    torch.testing.assert_close(loaded.module()(*args, **kwargs), ep.module()(*args, **kwargs), rtol=0, atol=0)
    assert loaded.graph_signature.input_specs == ep.graph_signature.input_specs


def test_load_exported_reads_the_file_once(archives, tmp_path, monkeypatch):
    path = tmp_path / "model.pt2"
    path.write_bytes(archives["mlp"])
    seen = []
    real = torch.export.load

    def spy(f, *a, **k):
        seen.append(f)
        return real(f, *a, **k)
    monkeypatch.setattr(torch.export, "load", spy)
    load_exported(path)
    assert len(seen) == 1 and isinstance(seen[0], io.BytesIO)  # the checked bytes, not the path again


def test_unregistered_custom_op_gets_the_plain_hint(archives):
    text = _read(archives["mlp"], PROGRAM).replace(b"torch.ops.aten.relu.default",
                                                   b"torch.ops.sparsecc_test.absent.default")
    with pytest.raises(CaptureError, match=r"calls the operator sparsecc_test::absent.default, which is not registered"
                       r".*custom op") as info:
        load_exported_bytes(_rewrite(archives["mlp"], {PROGRAM: text}), "op.pt2")
    assert "\n" not in str(info.value)


def test_missing_file_is_one_line(tmp_path):
    with pytest.raises(CaptureError, match="does not exist") as info:
        load_exported(tmp_path / "nope.pt2")
    assert "\n" not in str(info.value)


@pytest.fixture(scope="module")
def artifact_dir(tmp_path_factory):
    class Small(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.b = torch.nn.Linear(64, 64), torch.nn.Linear(64, 8)

        def forward(self, x):
            return self.b(torch.relu(self.a(x)))

    torch.manual_seed(0)
    example = (torch.randn(4, 64),)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        artifact = sparsecc.compile(Small().eval(), example, target="x86", sparsity=0.5, pattern="unstructured",
                                    progress=False)
    folder = tmp_path_factory.mktemp("artifact")
    artifact.save(folder)
    return folder, artifact, example


def test_sparsecc_artifact_programs_load(artifact_dir):
    folder, artifact, example = artifact_dir
    packed = load_exported(folder / "packed.pt2")
    pruned = load_exported_bytes((folder / "pruned.pt2").read_bytes(), "pruned.pt2")
    assert any(str(n.target).startswith("sparsecc.") for n in packed.graph.nodes)  # sparsecc's own ops
    (x,) = example
    torch.testing.assert_close(packed.module()(x), artifact.packed(x), rtol=0, atol=0)
    torch.testing.assert_close(pruned.module()(x), artifact.reference(x), rtol=0, atol=0)


_LOAD_BAD = """
import sys
from sparsecc.capture import load_exported
for path in sys.argv[1:]:
    try:
        load_exported(path)
    except Exception as exc:
        print(type(exc).__name__, "|", str(exc).replace("\\n", "<NL>"))
"""


def test_text_and_truncated_files_print_one_line_and_nothing_from_torch(archives, tmp_path):
    text = tmp_path / "text.pt2"
    text.write_text("not a model\n")
    truncated = tmp_path / "truncated.pt2"
    truncated.write_bytes(archives["mlp"][: len(archives["mlp"]) // 2])
    # A well-formed zip whose program torch fails on: torch logs a traceback while loading it.
    broken = tmp_path / "broken.pt2"

    def dangle(doc):
        doc["graph_module"]["graph"]["nodes"][1]["inputs"][0]["arg"]["as_tensor"]["name"] = "missing_tensor"
    broken.write_bytes(_rewrite(archives["mlp"], _edit_json(archives["mlp"], PROGRAM, dangle)))
    shapes = tmp_path / "shapes.pt2"
    shapes.write_bytes(_rewrite(archives["mlp"], {"data/weights/weight_0": b"\0" * 6}))
    files = [text, truncated, broken, shapes]
    result = subprocess.run([sys.executable, "-c", _LOAD_BAD, *map(str, files)], capture_output=True, text=True,
                            timeout=120, check=False)
    assert result.stderr == ""
    lines = result.stdout.splitlines()
    assert len(lines) == len(files)
    for line, path in zip(lines, files, strict=True):
        assert line.startswith("CaptureError | ") and "<NL>" not in line and str(path) in line


def test_cli_prints_one_line_for_a_bad_model(archives, tmp_path):
    bad = tmp_path / "bad.pt2"
    bad.write_bytes(archives["mlp"][:1000])
    result = subprocess.run([sys.executable, "-c", "import sys; from sparsecc.cli import main; sys.exit(main())",
                             "compile", str(bad), "-o", str(tmp_path / "out")], capture_output=True, text=True,
                            timeout=120, check=False)
    assert result.returncode == 2
    assert result.stderr.count("\n") == 1 and result.stderr.startswith("sparsecc: error: damaged .pt2 file")


def test_data_dependent_shapes_are_a_capture_error():
    class Select(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = torch.nn.Linear(4, 4)

        def forward(self, x):
            y = self.fc(x)
            return y[y > 0]

    class NonZero(torch.nn.Module):
        def forward(self, x):
            return torch.nonzero(x)

    for model in (Select(), NonZero()):
        with pytest.raises(CaptureError, match="shape depends on the input's values") as info:
            sparsecc.capture(model, (torch.randn(3, 4),))
        assert "\n" not in str(info.value) and "test_safe_pt2.py" in str(info.value)
    with pytest.raises(CaptureError, match="shape depends on the input's values"):
        sparsecc.compile(Select(), (torch.randn(3, 4),), target="x86", sparsity=0.5, pattern="unstructured",
                         progress=False)
