"""Where commands write single files (plans, outputs, pages): checked before any work, written
whole or not at all.

An output path may not be one of the command's inputs, a folder, a path under a missing folder,
or a file inside an artifact folder (that would turn the artifact into "not an artifact").
Files are written to a hidden sibling first and renamed over the destination, so a failure
half-way never leaves a truncated file where the user's earlier one was.
"""

from __future__ import annotations

import os
import pathlib
import re
import tempfile
from collections.abc import Iterable

from .errors import SparseccError
from .workdirs import user_umask


def _same_path(a: pathlib.Path, b: pathlib.Path) -> bool:
    try:
        if a.exists() and b.exists():
            return os.path.samefile(a, b)
    except OSError:
        pass
    return a.resolve() == b.resolve()


def check_output_file(path: str | os.PathLike[str], flag: str, inputs: Iterable[str | os.PathLike[str]] = (),
                      inside: Iterable[str | os.PathLike[str]] = ()) -> pathlib.Path:
    """``path`` as a place a command may write one file, or a one-line SparseccError. ``inputs``
    are files the command reads; ``inside`` folders it must not write into (an artifact)."""
    out = pathlib.Path(path)
    for given in inputs:
        if _same_path(out, pathlib.Path(given)):
            raise SparseccError(f"{flag} {out} is also an input of this command ({given}); writing it would destroy "
                                "it: choose another path")
    folders = [pathlib.Path(folder).resolve() for folder in inside] + _artifacts_above(out)
    for folder in folders:
        if folder == out.resolve().parent or folder in out.resolve().parents:
            raise SparseccError(f"{flag} {out} lies inside the artifact folder {folder}; a file added there makes it "
                                "no longer verify as an artifact: write it elsewhere")
    if out.is_dir():
        raise SparseccError(f"{flag} {out} is a folder; give a file path")
    if out.exists() and not out.is_file():
        raise SparseccError(f"{flag} {out} exists and is not a regular file; give a file path")
    if not out.parent.is_dir():
        raise SparseccError(f"{flag} {out}: the folder {out.parent} does not exist; create it first or choose another "
                            "path")
    return out


def _artifacts_above(path: pathlib.Path) -> list[pathlib.Path]:
    """The folders above ``path`` that hold a sparsecc artifact's manifest."""
    from .artifact_files import FORMAT_NAME, MANIFEST

    found = []
    for folder in pathlib.Path(os.path.abspath(path)).parents:
        manifest = folder / MANIFEST
        try:
            is_artifact = manifest.is_file() and FORMAT_NAME in manifest.read_text(errors="replace")[:4096]
        except OSError:
            is_artifact = False
        if is_artifact:
            found.append(folder.resolve())
    return found


DUMP_NAME = re.compile(r"\d{2}-(before|after)-[a-z0-9-]+\.txt")


def _starts_like_a_dump(path: pathlib.Path) -> bool:
    """A file sparsecc dumped starts with the printed program's header; a user's file of the same
    name does not."""
    with path.open("rb") as fh:
        return fh.read(64).startswith(b"# sparsecc program, stage ")


def check_dump_dir(folder: pathlib.Path, output: pathlib.Path) -> None:
    """``--dump-dir`` takes a new or empty folder, or one holding only earlier dumps (plain
    ``NN-before-PASS.txt`` / ``NN-after-PASS.txt`` files), outside the artifact folder."""
    if folder.resolve() == output.resolve() or output.resolve() in folder.resolve().parents:
        raise SparseccError(f"--dump-dir {folder} lies inside the -o folder {output}; dumps there would make the "
                            "artifact refuse to be replaced: choose another folder")
    if folder.is_symlink() or (folder.exists() and not folder.is_dir()):
        raise SparseccError(f"--dump-dir {folder} exists and is not a folder; choose a new or empty folder")
    if not folder.exists():
        return
    foreign = sorted(entry.name for entry in os.scandir(folder)
                     if not (entry.is_file(follow_symlinks=False) and DUMP_NAME.fullmatch(entry.name)
                             and _starts_like_a_dump(pathlib.Path(entry.path))))
    if foreign:
        raise SparseccError(f"--dump-dir {folder} holds files that are not sparsecc dumps ({', '.join(foreign[:3])}); "
                            "refusing to overwrite them: choose a new or empty folder")


def write_file(path: pathlib.Path, data: bytes | str) -> None:
    """Write ``data`` to ``path`` atomically, with the mode a new file gets under the umask."""
    payload = data.encode("utf-8") if isinstance(data, str) else data
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(payload)
        os.chmod(tmp, 0o666 & ~user_umask())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
