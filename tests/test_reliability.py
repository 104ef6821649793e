"""Reliability: hostile and broken inputs, as a user or an attacker would give them.

Every refusal is exit status 2 with exactly one ``sparsecc: error:`` line and no traceback, and
changes no file the user owns. Loading an artifact reads nothing outside its folder and runs no
pickle. A save killed at any moment leaves the old or the new artifact, and the next save
sweeps what the killed one left. (The ``.pt2`` pickle payloads are in test_safe_pt2.py, bad
calibration data and plans in test_bad_input.py.)
"""

from __future__ import annotations

import hashlib
import json
import os
import pathlib
import random
import shutil
import signal
import subprocess
import sys
import time
import warnings

import pytest
import sparsecc
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sparsecc.cli import main as cli_main
from sparsecc.errors import ArtifactError, SparseccError

SETTINGS = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


# -- fixtures and helpers ----------------------------------------------------------------------


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """A small x86 artifact saved once, its model file and its inputs file."""
    from conftest import TinyMLP, seeded

    root = tmp_path_factory.mktemp("reliability")
    model = seeded(TinyMLP())
    example = (torch.randn(2, 3, 64, generator=torch.Generator().manual_seed(0)),)
    torch.export.save(torch.export.export(model, example), root / "model.pt2")
    torch.save(example, root / "in.pt")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        artifact = sparsecc.compile(model, example, target="x86", sparsity=0.5, pattern="unstructured",
                                    progress=False)
    artifact.save(root / "art")
    return root


def copy_artifact(built: pathlib.Path, dst: pathlib.Path) -> pathlib.Path:
    shutil.copytree(built / "art", dst)
    return dst


def tree(root: pathlib.Path) -> dict[str, str]:
    """Every path under ``root`` with a digest of its content (or its link target / 'dir');
    iterative, as a folder may be deeper than the recursion limit."""
    found, stack, base = {}, [str(root)], len(str(root)) + 1
    while stack:
        for entry in os.scandir(stack.pop()):
            rel = entry.path[base:]
            if entry.is_symlink():
                found[rel] = "link:" + os.readlink(entry.path)
            elif entry.is_dir():
                found[rel] = "dir"
                stack.append(entry.path)
            elif not entry.is_file():
                found[rel] = "special"  # a FIFO: reading it would block
            else:
                with open(entry.path, "rb") as fh:
                    found[rel] = hashlib.sha256(fh.read()).hexdigest()
    return found


def assert_one_error(code: int, err: str, *, contains: str = "") -> None:
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2, err
    assert len(lines) == 1 and lines[0].startswith("sparsecc: error: "), err
    assert "Traceback" not in err
    assert contains in lines[0], lines[0]


def refuse(capsys, argv: list[str], root: pathlib.Path, contains: str = "", changed: set[str] = frozenset()) -> str:
    """Run the CLI in-process; it must refuse in one line and change nothing under ``root``
    except the paths in ``changed``."""
    before = tree(root)
    capsys.readouterr()
    code = cli_main(argv)
    out, err = capsys.readouterr()
    assert_one_error(code, err, contains=contains)
    after = tree(root)
    diff = {k for k in before.keys() | after.keys() if before.get(k) != after.get(k)}
    assert diff <= set(changed), f"files changed: {sorted(diff)}"
    return err


def rewrite_manifest(folder: pathlib.Path, edit) -> None:
    manifest = json.loads((folder / "manifest.json").read_text())
    edit(manifest)
    (folder / "manifest.json").write_text(json.dumps(manifest))


def rehash(folder: pathlib.Path, rel: str) -> None:
    """Make the manifest vouch for the current bytes of ``rel`` (as an attacker would)."""
    digest = hashlib.sha256((folder / rel).read_bytes()).hexdigest()
    rewrite_manifest(folder, lambda m: m["files"].__setitem__(rel, digest))


class Payload:
    """Pickled, this object would create ``marker``: proof a pickle ran."""

    def __init__(self, marker: pathlib.Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (pathlib.Path.touch, (pathlib.Path(self.marker),))


# -- 1. load reads nothing outside the folder, and only what the manifest vouches for ----------


@pytest.mark.parametrize("name", ["/etc/passwd", "../outside.bin", "stages/../../outside.bin", "a\\..\\b", "",
                                  "./model.so", "C:/x"])
def test_manifest_paths_outside_the_folder_are_refused(built, tmp_path, name):
    (tmp_path / "outside.bin").write_bytes(b"secret")
    art = copy_artifact(built, tmp_path / "art")
    digest = hashlib.sha256(b"secret").hexdigest()
    rewrite_manifest(art, lambda m: m["files"].__setitem__(name, digest))
    with pytest.raises(ArtifactError, match="not a plain path inside the artifact folder"):
        sparsecc.load(art)


@pytest.mark.parametrize("key", ["library", "model_files"])
def test_compiled_file_from_another_folder_is_refused(built, tmp_path, key):
    other = copy_artifact(built, tmp_path / "other")
    art = copy_artifact(built, tmp_path / "art")
    rel = os.path.relpath(other / "model.so", art)
    digest = hashlib.sha256((other / "model.so").read_bytes()).hexdigest()

    def edit(m):
        m["files"][rel] = digest
        m[key] = rel if key == "library" else [rel]

    rewrite_manifest(art, edit)
    with pytest.raises(ArtifactError, match="not a plain path"):
        sparsecc.load(art)


@pytest.mark.parametrize("where", ["file", "listed", "folder"])
def test_symlinks_inside_the_folder_are_refused(built, tmp_path, where):
    art = copy_artifact(built, tmp_path / "art")
    if where == "file":
        (art / "extra").symlink_to("/etc/passwd")
    elif where == "listed":
        (art / "report.json").unlink()
        (art / "report.json").symlink_to(built / "art" / "report.json")
    else:
        (art / "linked").symlink_to(tmp_path)
    with pytest.raises(ArtifactError, match="symbolic link"):
        sparsecc.load(art)


@pytest.mark.parametrize("name", ["pruned.pt2", "packed.pt2", "example_inputs.pt", "report.json", "plan.json",
                                  "packed_weights.safetensors"])
def test_every_file_load_reads_must_be_listed(built, tmp_path, name):
    art = copy_artifact(built, tmp_path / "art")
    rewrite_manifest(art, lambda m: m["files"].pop(name))
    with pytest.raises(ArtifactError, match=f"does not list {name}"):
        sparsecc.load(art)


def test_swapped_program_without_its_entry_is_refused(built, tmp_path):
    """The probe's case: a different pruned.pt2 and no manifest entry for it."""
    art = copy_artifact(built, tmp_path / "art")
    shutil.copy(built / "model.pt2", art / "pruned.pt2")
    rewrite_manifest(art, lambda m: m["files"].pop("pruned.pt2"))
    with pytest.raises(ArtifactError, match="pruned.pt2"):
        sparsecc.load(art)


def test_unknown_extra_files_are_ignored(built, tmp_path):
    art = copy_artifact(built, tmp_path / "art")
    (art / "notes.txt").write_text("mine")
    (art / "stages" / "99-mine.txt").write_text("not a stage")
    loaded = sparsecc.load(art)
    assert all(label != "99-mine" for label, _ in loaded.stages)


def test_compiled_library_is_checked_again_before_it_runs(built, tmp_path):
    art = copy_artifact(built, tmp_path / "art")
    loaded = sparsecc.load(art)
    (art / "model.so").write_bytes(b"\x7fELF not the library that was verified")
    with pytest.raises(ArtifactError, match="changed since the artifact was loaded"):
        loaded(*loaded.example_inputs)


@pytest.mark.parametrize("name, content", [
    ("report.json", b"{ not json"), ("report.json", b'{"layers": 3}'), ("report.json", b"[]"),
    ("plan.json", b'{"schema_version": 1}'), ("plan.json", b"\xff\xfe"),
    ("example_inputs.pt", b"not a torch file"), ("packed_weights.safetensors", b"\x00" * 16),
    ("pruned.pt2", b"PK\x03\x04 truncated"), ("stages/00-captured.txt", b"\xff\xff"),
])
def test_verified_but_malformed_files_are_one_line_errors(built, tmp_path, name, content):
    art = copy_artifact(built, tmp_path / "art")
    if not (art / name).exists():
        name = next(p for p in json.loads((art / "manifest.json").read_text())["files"] if p.startswith("stages/"))
    (art / name).write_bytes(content)
    rehash(art, name)
    with pytest.raises(ArtifactError) as info:
        sparsecc.load(art)
    assert "\n" not in str(info.value) and name in str(info.value)


def test_pickle_in_example_inputs_does_not_run(built, tmp_path):
    art = copy_artifact(built, tmp_path / "art")
    marker = tmp_path / "ran"
    torch.save((Payload(marker),), art / "example_inputs.pt")
    rehash(art, "example_inputs.pt")
    with pytest.raises(ArtifactError, match="example_inputs.pt"):
        sparsecc.load(art)
    assert not marker.exists()


@pytest.mark.parametrize("edit, message", [
    (lambda m: m.pop("target"), "names no target"),
    (lambda m: m.__setitem__("files", []), "lists no files"),
    (lambda m: m["files"].__setitem__("plan.json", "abc"), "no valid sha256"),
    (lambda m: m.__setitem__("library", 7), "compiled files wrongly"),
    (lambda m: m.__setitem__("library", "missing.so"), "does not list it"),
    (lambda m: m.__setitem__("versions", "x"), "built with torch None"),
    (lambda m: m.__setitem__("format", "other"), "not a sparsecc manifest"),
])
def test_malformed_manifests_are_refused(built, tmp_path, edit, message):
    art = copy_artifact(built, tmp_path / "art")
    rewrite_manifest(art, edit)
    with pytest.raises(ArtifactError, match=message):
        sparsecc.load(art)


_JSON = st.recursive(st.none() | st.booleans() | st.integers() | st.floats(allow_nan=True) | st.text(max_size=12),
                     lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner,
                                                                                   max_size=3), max_leaves=8)
_PATHS = st.sampled_from(["/etc/passwd", "../outside.bin", "..", "model.so", "stages/../../outside.bin",
                          "stages", "manifest.json", "a/./b", "x\x00y"]) | st.text(max_size=16)


@SETTINGS
@given(field=st.sampled_from(["files", "library", "model_files", "target", "format_version", "versions",
                              "pipeline", "format"]), value=_JSON, path=_PATHS)
def test_manifest_fuzz_loads_or_refuses(built, tmp_path_factory, field, value, path):
    """Random types and paths in every manifest field: the artifact loads, or ArtifactError."""
    root = tmp_path_factory.mktemp("fuzz")
    (root / "outside.bin").write_bytes(b"secret")
    art = copy_artifact(built, root / "art")
    digest = hashlib.sha256(b"secret").hexdigest()

    def edit(m):
        m[field] = value
        if isinstance(m.get("files"), dict):
            m["files"][path] = digest
        if field == "library":
            m["library"] = path

    rewrite_manifest(art, edit)
    try:
        sparsecc.load(art)
    except ArtifactError as exc:
        assert "\n" not in str(exc)
    else:
        # only a harmless listing may load: the outside file was never vouched for as inside
        assert not path.startswith("/") and ".." not in path.split("/")


@pytest.mark.parametrize("mode", ["flip", "truncate"])
def test_byte_flips_and_truncation_of_every_file(built, tmp_path, mode):
    """Each file of the artifact damaged in turn: refused with one ArtifactError line (manifest
    edits that keep it valid JSON may still load)."""
    rng = random.Random(0)
    names = sorted(str(p.relative_to(built / "art")) for p in (built / "art").rglob("*") if p.is_file())
    for i, name in enumerate(names):
        art = copy_artifact(built, tmp_path / f"{mode}{i}")
        data = bytearray((art / name).read_bytes())
        if mode == "flip":
            pos = rng.randrange(len(data))
            data[pos] ^= 1 << rng.randrange(8)
        else:
            data = data[: rng.randrange(len(data))]
        (art / name).write_bytes(bytes(data))
        try:
            sparsecc.load(art)
        except ArtifactError as exc:
            assert "\n" not in str(exc)
        else:
            assert name == "manifest.json", f"a damaged {name} loaded"


@SETTINGS
@given(data=st.data())
def test_hostile_rehashed_files_load_or_refuse(built, tmp_path_factory, data):
    """An attacker edits a file and fixes its hash: the load refuses with ArtifactError or loads;
    nothing else escapes and no pickle runs."""
    root = tmp_path_factory.mktemp("hostile")
    art = copy_artifact(built, root / "art")
    name = data.draw(st.sampled_from(["pruned.pt2", "packed.pt2", "example_inputs.pt", "report.json", "plan.json",
                                      "packed_weights.safetensors"]))
    raw = bytearray((art / name).read_bytes())
    for _ in range(data.draw(st.integers(1, 4))):
        pos = data.draw(st.integers(0, len(raw) - 1))
        raw[pos] = data.draw(st.integers(0, 255))
    (art / name).write_bytes(bytes(raw))
    rehash(art, name)
    try:
        sparsecc.load(art)
    except ArtifactError as exc:
        assert "\n" not in str(exc)


# -- 3. nothing the user owns is lost ----------------------------------------------------------


def test_search_refuses_to_write_over_its_model(built, tmp_path, capsys):
    shutil.copy(built / "model.pt2", tmp_path / "model.pt2")
    refuse(capsys, ["search", str(tmp_path / "model.pt2"), "--sparsity", "0.5", "-o", str(tmp_path / "model.pt2")],
           tmp_path, contains="also an input")


def test_search_refuses_to_overwrite_a_file_that_is_not_a_plan(built, tmp_path, capsys):
    (tmp_path / "thesis.tex").write_text("\\documentclass{article}")
    refuse(capsys, ["search", str(built / "model.pt2"), "--sparsity", "0.5", "-o", str(tmp_path / "thesis.tex")],
           tmp_path, contains="not a sparsecc plan")


@pytest.mark.parametrize("argv", [
    ["compile", "{model}", "--sparsity", "0.5", "-o", "{model}"],
    ["compile", "{model}", "--sparsity", "0.5", "--calib", "{inputs}", "-o", "{inputs}"],
    ["run", "{art}", "--inputs", "{inputs}", "--output", "{inputs}"],
    ["run", "{art}", "--inputs", "{inputs}", "--output", "{art}/y.pt"],
    ["inspect", "{art}", "--format", "html", "-o", "{art}/report.html"],
    ["compare", "{art}/plan.json", "{art}/plan.json", "-o", "{art}/plan.json"],
])
def test_outputs_that_are_inputs_are_refused(built, tmp_path, capsys, argv):
    art = copy_artifact(built, tmp_path / "art")
    shutil.copy(built / "model.pt2", tmp_path / "model.pt2")
    shutil.copy(built / "in.pt", tmp_path / "in.pt")
    paths = {"model": tmp_path / "model.pt2", "inputs": tmp_path / "in.pt", "art": art}
    refuse(capsys, [a.format(**paths) for a in argv], tmp_path)


def test_handwritten_manifest_does_not_make_a_folder_replaceable(built, tmp_path, capsys):
    folder = tmp_path / "work"
    folder.mkdir()
    (folder / "thesis.tex").write_text("chapter 1")
    digest = hashlib.sha256(b"chapter 1").hexdigest()
    (folder / "manifest.json").write_text(json.dumps({"format": "sparsecc-artifact", "format_version": 2,
                                                      "target": "x86", "files": {"thesis.tex": digest}}))
    (folder / "thesis.tex").write_text("chapter 1, revised")
    refuse(capsys, ["compile", str(built / "model.pt2"), "-o", str(folder), "-q"], tmp_path, contains="does not verify")
    with pytest.raises(ArtifactError, match="does not verify"):
        sparsecc.load(built / "art").save(folder)
    assert (folder / "thesis.tex").read_text() == "chapter 1, revised"


def test_user_edits_inside_an_artifact_make_it_not_replaceable(built, tmp_path):
    art = copy_artifact(built, tmp_path / "art")
    with (art / "report.txt").open("a") as fh:
        fh.write("my note\n")
    with pytest.raises(ArtifactError, match="does not verify"):
        sparsecc.load(built / "art").save(art)
    assert (art / "report.txt").read_text().endswith("my note\n")


def test_destination_is_checked_before_the_model_is_even_loaded(tmp_path, capsys):
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "data.csv").write_text("1,2")
    # the model file does not exist: the -o problem must be the one reported, before any work
    refuse(capsys, ["compile", str(tmp_path / "missing.pt2"), "-o", str(tmp_path / "mine")], tmp_path,
           contains="not a sparsecc artifact")


def test_symlink_output_is_refused_and_its_target_kept(built, tmp_path, capsys):
    art = copy_artifact(built, tmp_path / "art")
    (tmp_path / "latest").symlink_to(art)
    refuse(capsys, ["compile", str(built / "model.pt2"), "-o", str(tmp_path / "latest"), "-q"], tmp_path,
           contains="symbolic link")


def test_saved_artifacts_follow_the_umask(built, tmp_path):
    old = os.umask(0o027)
    try:
        out = sparsecc.load(built / "art").save(tmp_path / "art")
    finally:
        os.umask(old)
    assert out.stat().st_mode & 0o777 == 0o750
    assert (out / "packed_weights.safetensors").stat().st_mode & 0o777 == 0o640
    assert (out / "stages").stat().st_mode & 0o777 == 0o750


def test_stale_save_leftovers_are_swept_and_an_interrupted_swap_restored(built, tmp_path):
    from sparsecc.workdirs import MARKER

    dead = _dead_pid()
    out = copy_artifact(built, tmp_path / "art")
    killed = tmp_path / f".art.tmp-{dead}-abc12345"  # a save killed while writing: it holds the marker
    killed.mkdir()
    (killed / MARKER).touch()
    (killed / "model.so").write_bytes(b"half")
    users = tmp_path / f".art.tmp-{dead}-mine0000"  # the same kind of name, but the user's folder
    users.mkdir()
    (users / "notes.txt").write_text("mine")
    alive = tmp_path / f".art.tmp-{os.getppid()}-live0001"
    alive.mkdir()
    (alive / MARKER).touch()
    sparsecc.load(built / "art").save(out)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["art", alive.name, users.name])
    # a two-step swap killed between its renames: no folder, only the earlier artifact beside it
    out.rename(tmp_path / f".art.old-{dead}-xyz78900")
    sparsecc.load(built / "art").save(out)
    assert not (tmp_path / f".art.old-{dead}-xyz78900").exists()
    sparsecc.load(out)


def test_a_users_folder_named_like_a_leftover_is_never_moved_or_removed(built, tmp_path):
    dead = _dead_pid()
    users = tmp_path / f".results.old-{dead}-abcdefgh"
    users.mkdir()
    (users / "thesis.tex").write_text("mine")
    sparsecc.load(built / "art").save(tmp_path / "results")
    assert (users / "thesis.tex").read_text() == "mine"
    sparsecc.load(tmp_path / "results")


def test_work_folder_sweep_leaves_user_folders_alone(tmp_path, monkeypatch):
    import tempfile

    from sparsecc.workdirs import make_workdir

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    dead = _dead_pid()
    user_folders = [tmp_path / f"sparsecc-bench-{dead}-results", tmp_path / f"sparsecc-{dead}-abcdefgh"]
    for folder in user_folders:
        folder.mkdir()
        (folder / "results.csv").write_text("1,2")
    stale = tmp_path / f"sparsecc-{dead}-zzzzzzzz"
    stale.mkdir()
    (stale / ".sparsecc-scratch").touch()
    fresh = make_workdir()
    assert all((folder / "results.csv").exists() for folder in user_folders)
    assert not stale.exists() and fresh.exists()


def test_deep_folders_neither_crash_nor_get_removed(built, tmp_path, capsys):
    art = copy_artifact(built, tmp_path / "art")
    subprocess.run(["mkdir", "-p", str(art) + "/d" * 1200], check=True)  # deeper than the recursion limit
    try:
        sparsecc.load(art)  # unlisted folders are ignored by load
        refuse(capsys, ["compile", str(built / "model.pt2"), "-o", str(art), "-q"], tmp_path, contains="did not write")
    finally:
        subprocess.run(["rm", "-rf", str(art / "d")], check=True)  # pytest's own cleanup recurses


@pytest.mark.parametrize("layout", ["only-empty-subfolder", "artifact-plus-empty-subfolder"])
def test_empty_user_folders_are_not_replaced(built, tmp_path, layout):
    out = tmp_path / "out"
    if layout == "only-empty-subfolder":
        (out / "sub").mkdir(parents=True)
    else:
        copy_artifact(built, out)
        (out / "my_results").mkdir()
    with pytest.raises(ArtifactError):
        sparsecc.load(built / "art").save(out)
    assert any(p.is_dir() for p in out.iterdir())


def test_manifest_with_an_integer_past_the_digit_limit(built, tmp_path):
    art = copy_artifact(built, tmp_path / "art")
    text = (art / "manifest.json").read_text()
    (art / "manifest.json").write_text(text.replace('"format_version": 2', '"format_version": ' + "9" * 5000))
    with pytest.raises(ArtifactError, match="not valid JSON"):
        sparsecc.load(art)


def test_library_that_is_not_code_is_one_error(built, tmp_path):
    art = copy_artifact(built, tmp_path / "art")
    rewrite_manifest(art, lambda m: m.__setitem__("library", "plan.json"))
    loaded = sparsecc.load(art)
    with pytest.raises(ArtifactError, match="cannot be loaded as compiled code"):
        loaded(*loaded.example_inputs)


def test_program_swapped_for_another_models_is_one_error(built, tmp_path):
    class Other(torch.nn.Module):
        def forward(self, x):
            return x.sum(-1)

    art = copy_artifact(built, tmp_path / "art")
    torch.export.save(torch.export.export(Other(), (torch.randn(4, 5, 16),)), art / "pruned.pt2")
    rehash(art, "pruned.pt2")
    loaded = sparsecc.load(art)
    with pytest.raises(ArtifactError, match="pruned program failed"):
        loaded.reference(*loaded.example_inputs)


def test_empty_stage_file_is_handled(built, tmp_path, capsys):
    art = copy_artifact(built, tmp_path / "art")
    stage = next(p for p in (art / "stages").iterdir())
    stage.write_text("")
    rehash(art, f"stages/{stage.name}")
    capsys.readouterr()
    code = cli_main(["inspect", str(art), "--stage", "packed"])
    out, err = capsys.readouterr()
    assert code in (0, 2) and "Traceback" not in err


def test_output_dot_in_an_empty_folder(built, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    sparsecc.load(built / "art").save(".")
    sparsecc.load(tmp_path)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_output_name_that_is_not_utf8(built, tmp_path):
    out = pathlib.Path(os.fsdecode(os.fsencode(str(tmp_path)) + b"/out\xff"))
    sparsecc.load(built / "art").save(out)
    sparsecc.load(out)


@pytest.mark.parametrize("case", ["user-file", "user-file-named-like-a-dump", "symlink", "inside-output"])
def test_dump_dir_never_overwrites(built, tmp_path, capsys, case):
    dumps = tmp_path / "dumps"
    if case == "user-file":
        dumps.mkdir()
        (dumps / "notes.txt").write_text("mine")
    elif case == "user-file-named-like-a-dump":
        dumps.mkdir()
        (dumps / "01-before-plan-uniform.txt").write_text("mine")
    elif case == "symlink":
        (tmp_path / "elsewhere").mkdir()
        dumps.symlink_to(tmp_path / "elsewhere")
    else:
        dumps = tmp_path / "out" / "dumps"
    refuse(capsys, ["compile", str(built / "model.pt2"), "--dump-dir", str(dumps), "-o", str(tmp_path / "out"), "-q"],
           tmp_path)


@pytest.mark.parametrize("argv", [
    ["inspect", "{art}", "--format", "html", "-o", "{other}/plan.json"],
    ["compare", "{art}/plan.json", "{art}/plan.json", "-o", "{other}/x.txt"],
    ["search", "{model}", "--sparsity", "0.5", "-o", "{other}/plan.json"],
])
def test_outputs_into_any_artifact_are_refused(built, tmp_path, capsys, argv):
    art = copy_artifact(built, tmp_path / "art")
    other = copy_artifact(built, tmp_path / "other")
    shutil.copy(built / "model.pt2", tmp_path / "model.pt2")
    paths = {"art": art, "other": other, "model": tmp_path / "model.pt2"}
    refuse(capsys, [a.format(**paths) for a in argv], tmp_path, contains="inside the artifact folder")


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


_SAVE_LOOP = """
import sys, sparsecc
src, out, n = sys.argv[1], sys.argv[2], int(sys.argv[3])
artifact = sparsecc.load(src)
print("ready", flush=True)
for _ in range(n):
    artifact.save(out)
"""


@pytest.mark.slow
def test_kill_during_save_leaves_old_or_new_and_nothing_after_the_next_save(built, tmp_path):
    out = copy_artifact(built, tmp_path / "art")
    rng = random.Random(1)
    for _ in range(6):
        proc = subprocess.Popen([sys.executable, "-c", _SAVE_LOOP, str(built / "art"), str(out), "1000"],
                                stdout=subprocess.PIPE, text=True)
        assert proc.stdout.readline().strip() == "ready"
        time.sleep(rng.uniform(0.0, 1.5))
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        proc.stdout.close()
        sparsecc.load(out)  # the old or the new artifact, verified
    sparsecc.load(built / "art").save(out)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["art"]


_CONCURRENT = """
import sys, sparsecc
artifact = sparsecc.load(sys.argv[1])
for _ in range(int(sys.argv[3])):
    artifact.save(sys.argv[2])
"""


@pytest.mark.slow
def test_concurrent_saves_to_one_folder(built, tmp_path):
    out = tmp_path / "art"
    procs = [subprocess.Popen([sys.executable, "-c", _CONCURRENT, str(built / "art"), str(out), "15"],
                              stderr=subprocess.PIPE, text=True) for _ in range(3)]
    errors = [proc.communicate()[1] for proc in procs]
    assert all(proc.returncode == 0 for proc in procs), errors
    sparsecc.load(out)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["art"]


def _workdirs(pid: int) -> list[pathlib.Path]:
    import tempfile

    return list(pathlib.Path(tempfile.gettempdir()).glob(f"sparsecc-*{pid}-*"))


def test_compile_leaves_no_work_folder(built, tmp_path):
    proc = subprocess.Popen([sys.executable, "-m", "sparsecc.cli", "compile", str(built / "model.pt2"), "--sparsity",
                             "0.5", "-o", str(tmp_path / "out"), "-q"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    _, err = proc.communicate()
    assert proc.returncode == 0, err
    assert not _workdirs(proc.pid)
    sparsecc.load(tmp_path / "out")


@pytest.mark.slow
def test_ctrl_c_during_compile_is_one_line(built, tmp_path):
    proc = subprocess.Popen([sys.executable, "-m", "sparsecc.cli", "compile", str(built / "model.pt2"), "--sparsity",
                             "0.5", "-o", str(tmp_path / "out"), "-q"], stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 60
    while not _workdirs(proc.pid) and time.time() < deadline and proc.poll() is None:
        time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    # 130, or death by SIGINT after the line (a shell shows both as 130): Python ends that way
    # when the interrupt landed while C++ code was running Python source, even once handled
    assert proc.returncode in (130, -signal.SIGINT), err
    lines = [line for line in err.splitlines() if line.strip() and not line.startswith("warning: no --calib")]
    assert len(lines) == 1 and lines[0].startswith("sparsecc: error: interrupted"), err
    assert not _workdirs(proc.pid) and not (tmp_path / "out").exists()


# -- 5. every failure is one line --------------------------------------------------------------


@pytest.mark.parametrize("case", [
    "run-output-missing-folder", "run-output-folder", "search-output-folder", "search-output-missing-folder",
    "inspect-html-folder", "load-a-file", "inputs-text-file", "model-text-file", "model-truncated",
    "missing-report", "missing-example-inputs", "missing-plan", "missing-weights", "manifest-without-target",
])
def test_cli_failures_are_one_line(built, tmp_path, capsys, case):
    art = copy_artifact(built, tmp_path / "art")
    shutil.copy(built / "in.pt", tmp_path / "in.pt")
    (tmp_path / "text.txt").write_text("hello\n")
    (tmp_path / "truncated.pt2").write_bytes((built / "model.pt2").read_bytes()[:500])
    run = ["run", str(art), "--inputs", str(tmp_path / "in.pt"), "--output"]
    argv = {
        "run-output-missing-folder": run + [str(tmp_path / "nope" / "y.pt")],
        "run-output-folder": run + [str(tmp_path)],
        "search-output-folder": ["search", str(built / "model.pt2"), "--sparsity", "0.5", "-o", str(tmp_path)],
        "search-output-missing-folder": ["search", str(built / "model.pt2"), "--sparsity", "0.5", "-o",
                                         str(tmp_path / "nope" / "p.json")],
        "inspect-html-folder": ["inspect", str(art), "--format", "html", "-o", str(tmp_path)],
        "load-a-file": ["run", str(tmp_path / "in.pt"), "--inputs", str(tmp_path / "in.pt"), "--output",
                        str(tmp_path / "y.pt")],
        "inputs-text-file": run[:3] + [str(tmp_path / "text.txt"), "--output", str(tmp_path / "y.pt")],
        "model-text-file": ["compile", str(tmp_path / "text.txt"), "-o", str(tmp_path / "o"), "-q"],
        "model-truncated": ["compile", str(tmp_path / "truncated.pt2"), "-o", str(tmp_path / "o"), "-q"],
    }.get(case)
    if argv is None:  # an artifact with a file or field missing: run it
        name = {"missing-report": "report.json", "missing-example-inputs": "example_inputs.pt",
                "missing-plan": "plan.json", "missing-weights": "packed_weights.safetensors"}.get(case)
        if name:
            (art / name).unlink()
        else:
            rewrite_manifest(art, lambda m: m.pop("target"))
        argv = run + [str(tmp_path / "y.pt")]
    refuse(capsys, argv, tmp_path)


def test_torch_log_noise_stays_out_of_the_terminal(tmp_path):
    (tmp_path / "bad.pt2").write_text("not a program")
    proc = subprocess.run([sys.executable, "-m", "sparsecc.cli", "compile", str(tmp_path / "bad.pt2"), "-o",
                           str(tmp_path / "out")], capture_output=True, text=True)
    assert_one_error(proc.returncode, proc.stderr)
    assert proc.stdout == ""


def test_api_errors_are_sparsecc_errors(built, tmp_path):
    with pytest.raises(SparseccError):
        sparsecc.load(built / "in.pt")
    with pytest.raises(SparseccError):
        sparsecc.load(built / "art").save(built / "in.pt")


@pytest.mark.parametrize("argv, contains", [
    ([], "required: command"),
    (["frobnicate"], "invalid choice"),
    (["compile", "m.pt2"], "-o/--output"),
    (["compile", "m.pt2", "--sparsity", "abc", "-o", "x"], "invalid float value"),
    (["tune", "--shapes", "64x64", "--m", "abc"], "positive integers"),
    (["tune", "--shapes", "64x64", "--m", "0"], "positive integers"),
    (["tune", "--shapes", "64x64", "--sparsities", "abc"], "not a comma-separated list"),
    (["tune", "--shapes", "64x64", "--rounds", "0"], "--rounds"),
    (["search", "{model}", "--max-error", "nan", "-o", "{tmp}/p.json"], "not a positive number"),
    (["search", "{model}", "--sparsity", "0.5", "--sparsities", "1.5", "-o", "{tmp}/p.json"], "in (0, 1)"),
    (["search", "{model}", "--sparsity", "0.5", "--sparsities", ";;", "-o", "{tmp}/p.json"], "in (0, 1)"),
    (["demo", "--threads", "0"], "at least 1"),
])
def test_bad_arguments_are_one_line(built, tmp_path, capsys, argv, contains):
    argv = [a.format(model=built / "model.pt2", tmp=tmp_path) for a in argv]
    capsys.readouterr()
    try:
        code = cli_main(argv)
    except SystemExit as exc:  # argparse's own refusals exit from inside the parser
        code = exc.code
    _, err = capsys.readouterr()
    assert_one_error(code, err, contains=contains)


@pytest.mark.parametrize("what", ["plan", "search-output", "tokenizer"])
def test_fifos_are_refused_without_blocking(built, tmp_path, capsys, what):
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    model = str(built / "model.pt2")
    argv = {"plan": ["compile", model, "--plan", str(fifo), "-o", str(tmp_path / "o"), "-q"],
            "search-output": ["search", model, "--sparsity", "0.5", "-o", str(fifo)],
            "tokenizer": ["compile", model, "--calib-text", str(tmp_path), "--tokenizer", str(fifo), "-o",
                          str(tmp_path / "o"), "-q"]}[what]
    refuse(capsys, argv, tmp_path)


def test_sparse_calibration_tensors_are_refused(built, tmp_path, capsys):
    batch = torch.load(built / "in.pt")
    torch.save([(batch[0].to_sparse(),)], tmp_path / "calib.pt")
    refuse(capsys, ["compile", str(built / "model.pt2"), "--calib", str(tmp_path / "calib.pt"), "-o",
                    str(tmp_path / "o"), "-q"], tmp_path, contains="to_dense")


def test_token_ids_outside_the_embedding_are_refused_before_compiled_code_reads_them():
    class LM(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.emb, self.fc = torch.nn.Embedding(50, 16), torch.nn.Linear(16, 50)

        def forward(self, ids):
            return self.fc(self.emb(ids))

    ids = torch.randint(0, 50, (2, 8), generator=torch.Generator().manual_seed(0))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        artifact = sparsecc.compile(LM().eval(), (ids,), target="x86", sparsity=0.5, pattern="unstructured",
                                    progress=False)
    for bad in (torch.full_like(ids, 50), torch.full_like(ids, -1)):
        with pytest.raises(ArtifactError, match=r"give ids in \[0, 50\)"):
            artifact(bad)
        with pytest.raises(SparseccError, match="outside the 50-row embedding"):
            sparsecc.compile(LM().eval(), (ids,), target="x86", sparsity=0.5, calibration=[(ids,), (bad,)],
                             progress=False)
    assert artifact(ids).shape == (2, 8, 50)
