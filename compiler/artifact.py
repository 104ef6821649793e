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

import hashlib
import json
import os
import pathlib
import shutil
import tempfile
from dataclasses import dataclass, field
from typing import Any

import torch

from .errors import ArtifactError
from .plan import Plan
from .report import Report

FORMAT_NAME = "sparsecc-artifact"
#: version 2 names the compiled files in the manifest ("library", "model_files"); version 1 (x86
#: only) always had exactly ``model.so``
FORMAT_VERSION = 2
READABLE_VERSIONS = (1, 2)
MANIFEST = "manifest.json"
LIBRARY = "model.so"


def _sha256(path: pathlib.Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


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
        return tuple(checked)

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
            self._session = load_library(record.runner, self.library)
        return self._unflatten(list(self._session(*checked)))

    def _run_exported(self, key: str, exported: torch.export.ExportedProgram, inputs: tuple[Any, ...]) -> Any:
        checked = self._check_inputs(inputs)
        if key not in self._modules:
            self._modules[key] = exported.module()
        with torch.no_grad():
            return self._modules[key](*checked)

    def reference(self, *inputs: Any) -> Any:
        """Run the masked-dense (pruned) program in torch."""
        return self._run_exported("pruned", self.pruned, inputs)

    def packed(self, *inputs: Any) -> Any:
        """Run the packed program in torch (sparse ops' reference kernels)."""
        return self._run_exported("packed", self.packed_program, inputs)

    # -- saving ---------------------------------------------------------------------------------

    def save(self, out: str | os.PathLike[str]) -> pathlib.Path:
        out = pathlib.Path(out)
        _check_destination(out)
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = pathlib.Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
        try:
            self._write(tmp)
            if out.exists():
                old = pathlib.Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
                old.rmdir()
                out.rename(old)
                tmp.rename(out)
                shutil.rmtree(old)
            else:
                tmp.rename(out)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        self.path = out
        return out

    def _write(self, folder: pathlib.Path) -> None:
        from safetensors.torch import save_file

        # copy2 keeps the mode: an ARM model's executable stays executable
        shutil.copy2(self.library, folder / self.library.name)
        for extra in self.model_files:
            shutil.copy2(extra, folder / extra.name)
        torch.export.save(self.pruned, str(folder / "pruned.pt2"))
        torch.export.save(self.packed_program, str(folder / "packed.pt2"))
        arrays = {k: v.contiguous() for k, v in self.packed_arrays.items()}
        save_file(arrays, str(folder / "packed_weights.safetensors"))
        self.plan.save(folder / "plan.json")
        (folder / "report.json").write_text(json.dumps(self.report.to_json(), indent=2) + "\n")
        (folder / "report.txt").write_text(self.report.summary())
        (folder / "report.html").write_text(_report_page(self), encoding="utf-8")
        (folder / "stages").mkdir()
        for label, text in self.stages:
            (folder / "stages" / f"{label}.txt").write_text(text)
        torch.save(tuple(t.clone() for t in self.example_inputs), folder / "example_inputs.pt")
        files = sorted(p for p in folder.rglob("*") if p.is_file())
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
            "files": {str(p.relative_to(folder)): _sha256(p) for p in files},
        }
        (folder / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")


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


def _read_manifest(folder: pathlib.Path) -> dict[str, Any]:
    path = folder / MANIFEST
    if not path.is_file():
        raise ArtifactError(f"{folder} is not a sparsecc artifact: {MANIFEST} is missing "
                            "(compile again with `sparsecc compile ... -o DIR`)")
    try:
        manifest = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ArtifactError(f"{path} is damaged (not valid JSON: {exc}); compile the model again") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT_NAME:
        raise ArtifactError(f"{path} is not a sparsecc manifest")
    return manifest


def _check_destination(out: pathlib.Path) -> None:
    """Allow an absent or empty folder, or one holding exactly an earlier artifact."""
    if not out.exists():
        return
    if not out.is_dir():
        raise ArtifactError(f"output path {out} exists and is not a folder; choose another -o path")
    present = {str(p.relative_to(out)) for p in out.rglob("*") if p.is_file()}
    if not present:
        return
    if not (out / MANIFEST).is_file():
        raise ArtifactError(
            f"output folder {out} already holds files that are not a sparsecc artifact "
            f"({', '.join(sorted(present)[:3])}{' ...' if len(present) > 3 else ''}); "
            "refusing to overwrite them: choose an empty or new folder")
    try:
        listed = set(_read_manifest(out)["files"]) | {MANIFEST}
    except (ArtifactError, KeyError, TypeError):
        raise ArtifactError(f"output folder {out} holds a damaged artifact; remove it yourself or choose "
                            "another folder") from None
    foreign = sorted(present - listed)
    if foreign:
        raise ArtifactError(
            f"output folder {out} holds an artifact plus files sparsecc did not write "
            f"({', '.join(foreign[:3])}); refusing to overwrite: move them or choose another folder")


def load(folder: str | os.PathLike[str], *, check_versions: bool = True) -> Artifact:
    """Load an artifact folder, verifying format, versions and the sha256 of every file."""
    from safetensors.torch import load_file

    from .capture import load_exported

    folder = pathlib.Path(folder)
    if not folder.is_dir():
        raise ArtifactError(f"artifact folder {folder} does not exist")
    manifest = _read_manifest(folder)
    if manifest.get("format_version") not in READABLE_VERSIONS:
        raise ArtifactError(
            f"{folder} has artifact format version {manifest.get('format_version')!r}; this sparsecc "
            f"reads versions {', '.join(map(str, READABLE_VERSIONS))}: compile the model again with this version")
    files = manifest.get("files")
    library = manifest.get("library", LIBRARY)
    model_files = manifest.get("model_files", [])
    if (not isinstance(files, dict) or not isinstance(library, str) or not isinstance(model_files, list)
            or any(name not in files for name in [library, *model_files])):
        raise ArtifactError(f"{folder}/{MANIFEST} does not list the compiled files it names; the artifact is "
                            "damaged")
    for rel, digest in files.items():
        path = folder / rel
        if not path.is_file():
            raise ArtifactError(f"{folder} is incomplete: {rel} is missing (truncated copy?); copy the whole "
                                "folder again or recompile")
        if _sha256(path) != digest:
            raise ArtifactError(f"{folder}/{rel} is damaged: its sha256 does not match the manifest; copy "
                                "the artifact again or recompile")
    if check_versions:
        built = manifest.get("versions", {})
        here = versions()
        for dist in ("torch", "apache-tvm"):
            if built.get(dist) != here.get(dist):
                raise ArtifactError(
                    f"{folder} was built with {dist} {built.get(dist)}, this environment has "
                    f"{here.get(dist)}; compiled code and saved programs are tied to that version: "
                    "recompile here, or install the version it was built with")
    example_inputs = tuple(torch.load(folder / "example_inputs.pt", weights_only=True))
    report = Report.from_json(json.loads((folder / "report.json").read_text()))
    stages = [(p.stem, p.read_text()) for p in sorted((folder / "stages").glob("*.txt"))]
    return Artifact(
        target=manifest["target"],
        library=folder / library,
        model_files=[folder / name for name in model_files],
        pruned=load_exported(folder / "pruned.pt2"),
        packed_program=load_exported(folder / "packed.pt2"),
        plan=Plan.load(folder / "plan.json"),
        report=report,
        example_inputs=example_inputs,
        stages=stages,
        packed_arrays=load_file(str(folder / "packed_weights.safetensors")),
        pipeline=manifest.get("pipeline", ""),
        path=folder,
    )
