"""Artifacts: a compiled model as a folder that can be saved, checked, loaded and run.

Layout of an artifact folder::

    manifest.json           format version, sparsecc/torch/TVM versions, target, pipeline,
                            input signature, the compiled files, sha256 of every other file
    model.so                x86: the compiled library (Relax VM executable)
    model.wasm, model.js    wasm-simd: the self-contained module and its Node/browser loader
    model.elf, model.o,     arm-neon: the static executable (run under qemu here), and the
    model.h                 object and header to link into a program on a device
    model.json              wasm-simd / arm-neon: the static model's input and output signature
    pruned.pt2              the masked-dense program (torch.export), the numerics reference
    packed.pt2              the packed program with sparsecc sparse ops (runs in torch)
    packed_weights.safetensors   the packed arrays of every sparse layer
    plan.json               per-layer decisions
    report.json, report.txt what the compile did
    report.html             the same as a page to open in a browser (graphs, masks, timeline)
    stages/NN-<stage>.txt   the printed program after each pass

Saving never overwrites files sparsecc did not write: a folder is replaced only when it is empty
or holds exactly an earlier artifact. Loading checks the manifest, the versions and every hash,
and refuses a damaged or mismatched artifact with a message that says what to do.
"""

from __future__ import annotations

import io
import json
import os
import pathlib
import shutil
from dataclasses import dataclass, field
from typing import Any

import torch

from .artifact_files import (
    FORMAT_NAME,
    MANIFEST,
    check_destination,
    check_relative_path,
    install_folder,
    read_manifest,
    read_verified,
    scan_folder,
    scratch_sibling,
    sha256_file,
    verify_listed,
)
from .errors import ArtifactError, SparseccError
from .plan import Plan
from .report import Report
from .workdirs import MARKER, apply_umask, remove_tree

#: version 2 names the compiled files in the manifest ("library", "model_files"); version 1 (x86
#: only) always had exactly ``model.so``
FORMAT_VERSION = 2
READABLE_VERSIONS = (1, 2)
LIBRARY = "model.so"


def versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    found = {"torch": torch.__version__}
    for dist in ("sparsecc", "apache-tvm"):
        try:
            found[dist] = version(dist)
        except PackageNotFoundError:
            found[dist] = "unknown"
    return found


def _input_signature(inputs: tuple[Any, ...]) -> list[dict[str, Any]]:
    return [{"shape": list(t.shape), "dtype": str(t.dtype).replace("torch.", "")} for t in inputs]


@dataclass
class Artifact:
    """A compiled model: call it like the model (``artifact(*inputs)``) to run the compiled code.

    ``reference(*inputs)`` runs the masked-dense program in torch and ``packed(*inputs)`` the
    packed program (torch reference kernels): the two numerics baselines.
    """

    target: str
    library: pathlib.Path
    pruned: torch.export.ExportedProgram
    packed_program: torch.export.ExportedProgram
    plan: Plan
    report: Report
    example_inputs: tuple[Any, ...]
    stages: list[tuple[str, str]] = field(default_factory=list)
    packed_arrays: dict[str, torch.Tensor] = field(default_factory=dict)
    pipeline: str = ""
    path: pathlib.Path | None = None
    # files that belong with ``library`` and are saved beside it (a static model's signature,
    # loader, object and header); the runner finds them next to the library
    model_files: list[pathlib.Path] = field(default_factory=list)
    _session: Any = None
    _out_spec: tuple[Any] | None = None
    _modules: dict[str, Any] = field(default_factory=dict)
    # sha256 of the compiled files of a loaded artifact, checked again right before they run
    _digests: dict[pathlib.Path, str] = field(default_factory=dict)
    _bounds: dict[int, int] | None = None

    # -- running --------------------------------------------------------------------------------

    def _check_inputs(self, inputs: tuple[Any, ...]) -> tuple[torch.Tensor, ...]:
        if len(inputs) != len(self.example_inputs):
            raise ArtifactError(f"the compiled model takes {len(self.example_inputs)} inputs, got {len(inputs)}")
        checked = []
        for i, (got, want) in enumerate(zip(inputs, self.example_inputs, strict=True)):
            got = torch.as_tensor(got)
            if tuple(got.shape) != tuple(want.shape) or got.dtype != want.dtype:
                raise ArtifactError(
                    f"input {i} has shape {tuple(got.shape)} {got.dtype}; the model was compiled for "
                    f"{tuple(want.shape)} {want.dtype} (compile again with example inputs of this shape)")
            checked.append(got.contiguous())
        for i, rows in self._index_bounds().items():
            ids = checked[i]
            if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= rows):
                raise ArtifactError(f"input {i} indexes an embedding of {rows} rows but holds ids from "
                                    f"{int(ids.min())} to {int(ids.max())}; give ids in [0, {rows}) (the model's "
                                    "tokenizer)")
        return tuple(checked)

    def _index_bounds(self) -> dict[int, int]:
        """Inputs the program uses as embedding indices, with the table's row count: compiled code
        does not bound-check its reads, so an id outside the table must be refused here."""
        if self._bounds is None:
            self._bounds = embedding_index_bounds(self.pruned)
        return self._bounds

    def _unflatten(self, flat: list[torch.Tensor]) -> Any:
        from torch.utils import _pytree

        if self._out_spec is None:
            # ExportedProgram.call_spec builds a new NamedTuple class on every access (0.3 ms
            # measured, a fifth of the compiled digits CNN's whole latency): read it once.
            self._out_spec = (self.pruned.call_spec.out_spec,)
        spec = self._out_spec[0]
        return _pytree.tree_unflatten(flat, spec) if spec is not None else flat

    def __call__(self, *inputs: Any) -> Any:
        from sparsecc.targets import get_target
        from sparsecc.targets.runners import load_library

        checked = self._check_inputs(inputs)
        if self._session is None:
            record = get_target(self.target)
            if not record.runs_here:
                raise ArtifactError(f"artifact for target {self.target!r} cannot run on this machine"
                                    + (f": it needs {record.needs}" if record.needs else ""))
            self._verify_compiled_files()
            try:
                self._session = load_library(record.runner, self.library)
            except SparseccError:
                raise
            except Exception as exc:  # noqa: BLE001 - TVM and the runners raise many types
                raise ArtifactError(f"{self.library} cannot be loaded as compiled code for {self.target} "
                                    f"({_first_line(exc)}); recompile the artifact") from None
        try:
            return self._unflatten(list(self._session(*checked)))
        except SparseccError:
            raise
        except Exception as exc:  # noqa: BLE001
            raise ArtifactError(f"the compiled code of this artifact failed on inputs of the shapes its example "
                                f"declares ({_first_line(exc)}); its files disagree: recompile it") from None

    def _verify_compiled_files(self) -> None:
        """A loaded artifact's compiled files still match the manifest when the code is loaded
        (they were checked at ``load``; this closes the window between the two)."""
        for path, digest in self._digests.items():
            if path.is_symlink() or not path.is_file() or sha256_file(path) != digest:
                raise ArtifactError(f"{path} changed since the artifact was loaded (its sha256 no longer matches "
                                    "the manifest); load the artifact again")

    def _run_exported(self, key: str, exported: torch.export.ExportedProgram, inputs: tuple[Any, ...]) -> Any:
        checked = self._check_inputs(inputs)
        try:
            if key not in self._modules:
                self._modules[key] = exported.module()
            with torch.no_grad():
                return self._modules[key](*checked)
        except Exception as exc:  # noqa: BLE001 - a saved program that does not take its example inputs
            raise ArtifactError(f"the artifact's {key} program failed on inputs of the shapes its example declares "
                                f"({_first_line(exc)}); its files disagree: recompile it") from None

    def reference(self, *inputs: Any) -> Any:
        """Run the masked-dense (pruned) program in torch."""
        return self._run_exported("pruned", self.pruned, inputs)

    def packed(self, *inputs: Any) -> Any:
        """Run the packed program in torch (sparse ops' reference kernels)."""
        return self._run_exported("packed", self.packed_program, inputs)

    # -- saving ---------------------------------------------------------------------------------

    def save(self, out: str | os.PathLike[str]) -> pathlib.Path:
        """Write the artifact to folder ``out``: absent, empty, or an earlier artifact that
        verifies. The new folder is written beside it and swapped in whole, so ``out`` holds the
        old artifact or the new one at every moment."""
        out = pathlib.Path(os.path.abspath(out))
        if not out.name:
            raise ArtifactError(f"output path {out} is not a folder sparsecc can create or replace; give a folder path")
        check_destination(out)
        try:
            out.parent.mkdir(parents=True, exist_ok=True)
            tmp = scratch_sibling(out, "tmp")
        except OSError as exc:
            raise ArtifactError(f"cannot write the artifact beside {out}: {exc.strerror}; choose a folder you can "
                                "write to") from None
        try:
            self._write(tmp)
            apply_umask(tmp)
            (tmp / MARKER).unlink()  # complete: from here the folder verifies as an artifact
            install_folder(tmp, out)
        except BaseException as exc:
            remove_tree(tmp)
            if isinstance(exc, Exception) and not isinstance(exc, SparseccError):
                # a full disk surfaces as OSError, or as RuntimeError from torch's and safetensors' writers
                why = exc.strerror if isinstance(exc, OSError) and exc.strerror else _first_line(exc)
                raise ArtifactError(f"could not write the artifact to {out}: {why}; nothing there was changed: "
                                    "free space or choose another folder") from None
            raise
        self.path = out
        return out

    def _write(self, folder: pathlib.Path) -> None:
        from safetensors.torch import save

        # copy2 keeps the mode: an ARM model's executable stays executable
        shutil.copy2(self.library, folder / self.library.name)
        for extra in self.model_files:
            shutil.copy2(extra, folder / extra.name)
        # file objects, not paths: torch's writers cannot take every path a file system allows
        with (folder / "pruned.pt2").open("wb") as fh:
            torch.export.save(self.pruned, fh)
        with (folder / "packed.pt2").open("wb") as fh:
            torch.export.save(self.packed_program, fh)
        arrays = {k: v.contiguous() for k, v in self.packed_arrays.items()}
        (folder / "packed_weights.safetensors").write_bytes(save(arrays))
        self.plan.save(folder / "plan.json")
        (folder / "report.json").write_text(json.dumps(self.report.to_json(), indent=2) + "\n")
        (folder / "report.txt").write_text(self.report.summary())
        (folder / "report.html").write_text(_report_page(self), encoding="utf-8")
        (folder / "stages").mkdir()
        for label, text in self.stages:
            (folder / "stages" / f"{label}.txt").write_text(text)
        with (folder / "example_inputs.pt").open("wb") as fh:
            torch.save(tuple(t.clone() for t in self.example_inputs), fh)
        files = sorted(p for p in folder.rglob("*") if p.is_file() and p != folder / MARKER)
        manifest = {
            "format": FORMAT_NAME,
            "format_version": FORMAT_VERSION,
            "versions": versions(),
            "target": self.target,
            "pipeline": self.pipeline,
            "library": self.library.name,
            "model_files": [p.name for p in self.model_files],
            "inputs": _input_signature(self.example_inputs),
            "plan": self.plan.to_json(),
            "files": {p.relative_to(folder).as_posix(): sha256_file(p) for p in files},
        }
        (folder / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")


def embedding_index_bounds(exported: torch.export.ExportedProgram) -> dict[int, int]:
    """User input position -> rows of the embedding table it indexes directly."""
    signature = exported.graph_signature
    positions = {name: i for i, name in enumerate(signature.user_inputs)}
    tensors = {**signature.inputs_to_parameters, **signature.inputs_to_buffers}
    bounds: dict[int, int] = {}
    for node in exported.graph.nodes:
        if node.op != "call_function" or node.target is not torch.ops.aten.embedding.default:
            continue
        weight, ids = node.args[0], node.args[1]
        if getattr(ids, "name", None) in positions and getattr(weight, "name", None) in tensors:
            rows = int(exported.state_dict[tensors[weight.name]].shape[0])
            position = positions[ids.name]
            bounds[position] = min(rows, bounds.get(position, rows))
    return bounds


def _first_line(exc: BaseException) -> str:
    text = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
    return f"{type(exc).__name__}: {text[:200]}"


def _report_page(artifact: Artifact) -> str:
    """``report.html``; a page that cannot be drawn becomes a plain page with the text report and
    the error, so drawing never costs the user the artifact (the sections already contain their
    own failures: this catches what is left, e.g. a report object of the wrong shape)."""
    import html
    import warnings

    from .report_html import render_html

    try:
        return render_html(artifact)
    except Exception as exc:  # drawing is a convenience; the artifact must still be written
        message = f"report.html could not be drawn ({type(exc).__name__}: {exc}); it holds the text report instead"
        warnings.warn(message, stacklevel=3)
        return ('<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8"><title>sparsecc report</title>'
                f"</head><body><p>{html.escape(message)}</p><pre>{html.escape(artifact.report.summary())}</pre>"
                "</body></html>\n")


#: the files ``load`` reads besides the compiled ones; each must be listed and verified
LOADED_FILES = ("pruned.pt2", "packed.pt2", "packed_weights.safetensors", "plan.json", "report.json",
                "example_inputs.pt")


def _compiled_files(folder: pathlib.Path, manifest: dict[str, Any]) -> tuple[str, list[str]]:
    """The library and model files a manifest names: plain names that its file map lists."""
    library = manifest.get("library", LIBRARY)
    model_files = manifest.get("model_files", [])
    if not isinstance(library, str) or not isinstance(model_files, list):
        raise ArtifactError(f"{folder}/{MANIFEST} names its compiled files wrongly; the artifact is damaged: "
                            "compile the model again")
    for name in [library, *model_files]:
        check_relative_path(name, folder)
        if "/" in name or name not in manifest["files"]:
            raise ArtifactError(f"{folder}/{MANIFEST} names the compiled file {name!r} but does not list it; "
                                "the artifact is damaged: compile the model again")
    return library, model_files


def _check_versions(folder: pathlib.Path, manifest: dict[str, Any]) -> None:
    built = manifest.get("versions")
    built = built if isinstance(built, dict) else {}
    here = versions()
    for dist in ("torch", "apache-tvm"):
        if built.get(dist) != here.get(dist):
            raise ArtifactError(
                f"{folder} was built with {dist} {built.get(dist)}, this environment has "
                f"{here.get(dist)}; compiled code and saved programs are tied to that version: "
                "recompile here, or install the version it was built with")


def _parse(folder: pathlib.Path, rel: str, data: bytes, parse: Any) -> Any:
    """``parse(data)``, with any failure of a verified-but-malformed file as one ArtifactError."""
    try:
        return parse(data)
    except SparseccError as exc:
        raise ArtifactError(f"{folder}/{rel} cannot be read: {str(exc).splitlines()[0]}") from None
    except Exception as exc:  # noqa: BLE001 - torch, json and safetensors raise many types
        reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]
        raise ArtifactError(f"{folder}/{rel} is malformed ({type(exc).__name__}: {reason}); recompile the "
                            "artifact") from None


def _example_inputs(data: bytes) -> tuple[torch.Tensor, ...]:
    loaded = torch.load(io.BytesIO(data), weights_only=True)
    if not isinstance(loaded, (tuple, list)) or not all(isinstance(t, torch.Tensor) for t in loaded):
        raise ValueError("expected a tuple of tensors")
    return tuple(loaded)


def _report(data: bytes) -> Report:
    report = Report.from_json(json.loads(data.decode("utf-8")))
    report.summary()  # a report of the wrong shape fails here, not later in the user's command
    return report


def load(folder: str | os.PathLike[str], *, check_versions: bool = True) -> Artifact:
    """Load an artifact folder, verifying format, versions and the sha256 of every file.

    Nothing outside the folder is read: the manifest's paths must lie inside it, the folder may
    hold no symbolic link, and every file used is listed and hash-checked (unlisted files are
    ignored). ``.pt2`` programs are opened without unpickling (see :mod:`sparsecc.safe_pt2`);
    the compiled library is native code and is loaded only when the artifact is first called.
    """
    from safetensors.torch import load as load_safetensors

    from .capture import load_exported_bytes

    folder = pathlib.Path(folder)
    if folder.is_file():
        raise ArtifactError(f"{folder} is a file, not an artifact folder; give the folder `sparsecc compile -o` "
                            "wrote")
    if not folder.is_dir():
        raise ArtifactError(f"artifact folder {folder} does not exist")
    folder = folder.resolve()
    manifest = read_manifest(folder)
    present = scan_folder(folder)
    if manifest.get("format_version") not in READABLE_VERSIONS:
        raise ArtifactError(
            f"{folder} has artifact format version {manifest.get('format_version')!r}; this sparsecc "
            f"reads versions {', '.join(map(str, READABLE_VERSIONS))}: compile the model again with this version")
    library, model_files = _compiled_files(folder, manifest)
    verify_listed(folder, manifest, present)
    if check_versions:
        _check_versions(folder, manifest)
    data = {rel: read_verified(folder, manifest, rel) for rel in LOADED_FILES}
    stage_files = sorted(rel for rel in manifest["files"] if rel.startswith("stages/") and rel.endswith(".txt"))
    stages = [(pathlib.PurePosixPath(rel).stem,
               _parse(folder, rel, read_verified(folder, manifest, rel), lambda b: b.decode("utf-8")))
              for rel in stage_files]
    return Artifact(
        target=manifest["target"],
        library=folder / library,
        model_files=[folder / name for name in model_files],
        pruned=_parse(folder, "pruned.pt2", data["pruned.pt2"], lambda b: load_exported_bytes(b, "pruned.pt2")),
        packed_program=_parse(folder, "packed.pt2", data["packed.pt2"],
                              lambda b: load_exported_bytes(b, "packed.pt2")),
        plan=_parse(folder, "plan.json", data["plan.json"], lambda b: Plan.from_json(json.loads(b.decode("utf-8")))),
        report=_parse(folder, "report.json", data["report.json"], _report),
        example_inputs=_parse(folder, "example_inputs.pt", data["example_inputs.pt"], _example_inputs),
        stages=stages,
        packed_arrays=_parse(folder, "packed_weights.safetensors", data["packed_weights.safetensors"],
                             load_safetensors),
        pipeline=str(manifest.get("pipeline", "")),
        path=folder,
        _digests={folder / rel: manifest["files"][rel] for rel in [library, *model_files]},
    )
