"""The files of an artifact folder: what a manifest may name, how a folder is verified, and how a
saved folder replaces an earlier one without losing anything.

Rules that keep a hostile or damaged folder from reaching outside itself:

- every path a manifest names is a plain relative path inside the folder (no absolute path, no
  ``..``, no backslash), and the folder holds no symbolic link anywhere;
- every file the loader reads is listed in the manifest and read once: the bytes that were hashed
  are the bytes that are used (:func:`read_verified`);
- files the manifest does not list are ignored by ``load``, and make the folder "not an
  artifact" for ``save``, which replaces only a folder that verifies completely.

Saves take a lock on the parent folder around the swap, swap atomically where the kernel allows
(``renameat2(RENAME_EXCHANGE)``), and sweep what a killed save left beside the artifact.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import fcntl
import hashlib
import json
import os
import pathlib
import re
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from .errors import ArtifactError
from .workdirs import MARKER, mark, process_alive, remove_tree

FORMAT_NAME = "sparsecc-artifact"
MANIFEST = "manifest.json"
_HEX64 = re.compile(r"[0-9a-f]{64}")


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def shown(rel: str) -> str:
    """A file name as a message shows it: as is when printable, else quoted with escapes (a name
    from a manifest can hold line breaks)."""
    return rel if rel.isprintable() else repr(rel)


def check_relative_path(rel: Any, folder: pathlib.Path) -> str:
    """``rel`` as a safe path inside ``folder``, or an ArtifactError naming it."""
    bad = (not isinstance(rel, str) or not rel or "\\" in rel or "\x00" in rel or rel.startswith("/")
           or re.match(r"^[A-Za-z]:", rel) is not None)
    parts = rel.split("/") if isinstance(rel, str) else []
    if bad or any(part in ("", ".", "..") for part in parts):
        raise ArtifactError(f"{folder}/{MANIFEST} names the file {rel!r}, which is not a plain path inside the "
                            "artifact folder; refusing to read it: recompile the artifact")
    return rel


def scan_folder(folder: pathlib.Path, folders: set[str] | None = None) -> set[str]:
    """Relative paths of every file in ``folder`` (and of every sub-folder into ``folders``);
    refuses symbolic links and special files. Iterative: a folder may be deeper than Python's
    recursion limit."""
    found: set[str] = set()
    stack = [folder]
    while stack:
        current = stack.pop()
        for entry in sorted(os.scandir(current), key=lambda e: e.name):
            rel = pathlib.Path(entry.path).relative_to(folder).as_posix()
            if entry.is_symlink():
                raise ArtifactError(f"{folder} holds a symbolic link ({shown(rel)}); an artifact folder holds plain "
                                    "files only: copy the artifact with links resolved, or recompile")
            if entry.is_dir(follow_symlinks=False):
                stack.append(pathlib.Path(entry.path))
                if folders is not None:
                    folders.add(rel)
            elif entry.is_file(follow_symlinks=False):
                found.add(rel)
            else:
                raise ArtifactError(f"{folder}/{shown(rel)} is not a regular file; recompile the artifact")
    return found


def read_manifest(folder: pathlib.Path) -> dict[str, Any]:
    """The manifest, checked for shape: format, a ``files`` map of safe paths to sha256 digests,
    a target name, and compiled file names that the map lists."""
    path = folder / MANIFEST
    if path.is_symlink() or not path.is_file():
        raise ArtifactError(f"{folder} is not a sparsecc artifact: {MANIFEST} is missing "
                            "(compile again with `sparsecc compile ... -o DIR`)")
    try:
        manifest = json.loads(path.read_bytes().decode("utf-8"))
    except (ValueError, RecursionError) as exc:  # bad JSON or UTF-8, integers past Python's digit limit
        raise ArtifactError(f"{path} is damaged (not valid JSON: {str(exc).splitlines()[0]}); "
                            "compile the model again") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT_NAME:
        raise ArtifactError(f"{path} is not a sparsecc manifest; compile the model again")
    files = manifest.get("files")
    if not isinstance(files, dict) or not files:
        raise ArtifactError(f"{path} lists no files; the artifact is damaged: compile the model again")
    for rel, digest in files.items():
        check_relative_path(rel, folder)
        if not isinstance(digest, str) or not _HEX64.fullmatch(digest):
            raise ArtifactError(f"{path} gives {rel!r} no valid sha256 digest; the artifact is damaged: "
                                "compile the model again")
    if MANIFEST in files:
        raise ArtifactError(f"{path} lists itself; the artifact is damaged: compile the model again")
    if not isinstance(manifest.get("target"), str) or not manifest["target"]:
        raise ArtifactError(f"{path} names no target; the artifact is damaged: compile the model again")
    return manifest


def verify_listed(folder: pathlib.Path, manifest: dict[str, Any], present: set[str]) -> None:
    """Every listed file is present and matches its digest."""
    for rel, digest in manifest["files"].items():
        if rel not in present:
            raise ArtifactError(f"{folder} is incomplete: {shown(rel)} is missing (truncated copy?); copy the whole "
                                "folder again or recompile")
        if sha256_file(folder / rel) != digest:
            raise ArtifactError(f"{folder}/{shown(rel)} is damaged: its sha256 does not match the manifest; copy "
                                "the artifact again or recompile")


def sha256_file(path: pathlib.Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def read_verified(folder: pathlib.Path, manifest: dict[str, Any], rel: str) -> bytes:
    """The bytes of listed file ``rel``, checked against the manifest's digest."""
    digest = manifest["files"].get(rel)
    if digest is None:
        raise ArtifactError(f"{folder}/{MANIFEST} does not list {shown(rel)}, which loading needs; the artifact is "
                            "damaged or was edited: recompile it")
    path = folder / rel
    if path.is_symlink() or not path.is_file():
        raise ArtifactError(f"{folder} is incomplete: {shown(rel)} is missing (truncated copy?); copy the whole folder "
                            "again or recompile")
    data = path.read_bytes()
    if sha256_bytes(data) != digest:
        raise ArtifactError(f"{folder}/{shown(rel)} is damaged: its sha256 does not match the manifest; copy the "
                            "artifact again or recompile")
    return data


def check_destination(out: pathlib.Path) -> None:
    """Allow an absent folder, an empty one, or one holding exactly an earlier artifact that
    verifies (manifest, every hash, no other file): anything else may be the user's."""
    if out.is_symlink():
        raise ArtifactError(f"output path {out} is a symbolic link; give the folder it points to, or a new path")
    parent = out.parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if not parent.is_dir():
        raise ArtifactError(f"output path {out} lies under {parent}, which is a file; choose another -o path")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise ArtifactError(f"output path {out}: the folder {parent} is not writable; choose a folder you can write to")
    if not out.exists():
        return
    if not out.is_dir():
        raise ArtifactError(f"output path {out} exists and is not a folder; choose another -o path")
    folders: set[str] = set()
    try:
        present = scan_folder(out, folders)
    except ArtifactError as exc:
        raise ArtifactError(f"output folder {out} is not a plain sparsecc artifact ({exc}); refusing to replace it: "
                            "choose another -o path") from None
    if not present and not folders:
        return
    if not present:
        raise ArtifactError(f"output folder {out} holds folders ({', '.join(sorted(folders)[:3])}) but no artifact; "
                            "refusing to remove them: choose an empty or new folder")
    if MANIFEST not in present:
        shown = ", ".join(sorted(present)[:3]) + (" ..." if len(present) > 3 else "")
        raise ArtifactError(f"output folder {out} already holds files that are not a sparsecc artifact ({shown}); "
                            "refusing to overwrite them: choose an empty or new folder")
    try:
        manifest = read_manifest(out)
        verify_listed(out, manifest, present)
    except ArtifactError:
        raise ArtifactError(f"output folder {out} holds an artifact that does not verify (edited or damaged); "
                            "refusing to replace it: remove it yourself or choose another folder") from None
    implied = {parent.as_posix() for rel in manifest["files"] for parent in pathlib.PurePosixPath(rel).parents}
    foreign = sorted((present - set(manifest["files"]) - {MANIFEST}) | (folders - implied))
    if foreign:
        raise ArtifactError(f"output folder {out} holds an artifact plus files sparsecc did not write "
                            f"({', '.join(foreign[:3])}); refusing to overwrite: move them or choose another folder")


@contextmanager
def folder_lock(parent: pathlib.Path) -> Iterator[None]:
    """An exclusive lock on ``parent`` (flock on the folder itself: no lock file is left)."""
    fd = os.open(parent, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def scratch_sibling(out: pathlib.Path, kind: str) -> pathlib.Path:
    """A new hidden folder beside ``out`` whose name carries this process's id (a ``tmp`` one
    holds the scratch marker until it is complete)."""
    folder = pathlib.Path(tempfile.mkdtemp(prefix=f".{out.name}.{kind}-{os.getpid()}-", dir=out.parent))
    return mark(folder) if kind == "tmp" else folder


def verifies(folder: pathlib.Path) -> bool:
    """Whether ``folder`` holds exactly an artifact that verifies (manifest, hashes, no other file)."""
    try:
        present = scan_folder(folder)
        manifest = read_manifest(folder)
        verify_listed(folder, manifest, present)
    except (ArtifactError, OSError):
        return False
    return present - {MANIFEST} == set(manifest["files"])


def sweep_siblings(out: pathlib.Path) -> None:
    """Remove the scratch folders killed saves left beside ``out`` (their process is gone, and
    they hold the scratch marker or an artifact that verifies: a user's folder of the same name
    is left alone); if a killed two-step swap left no ``out`` but its earlier artifact, put
    that back first."""
    pattern = re.compile(rf"\.{re.escape(out.name)}\.(tmp|old)-(\d+)-[a-z0-9_]{{8}}")
    candidates = [p for p in out.parent.iterdir() if pattern.fullmatch(p.name) and p.is_dir() and not p.is_symlink()]
    dead = [p for p in candidates if not process_alive(int(pattern.fullmatch(p.name).group(2)))]
    stale = [p for p in dead if (p / MARKER).is_file() or verifies(p)]
    if not out.exists():
        for old in (p for p in stale if pattern.fullmatch(p.name).group(1) == "old" and verifies(p)):
            old.rename(out)
            stale.remove(old)
            break
    for path in stale:
        remove_tree(path)


def _exchange(a: pathlib.Path, b: pathlib.Path) -> bool:
    """Atomically swap two paths (Linux renameat2 RENAME_EXCHANGE); False where unsupported."""
    libc_name = ctypes.util.find_library("c")
    libc = ctypes.CDLL(libc_name, use_errno=True) if libc_name else None
    renameat2 = getattr(libc, "renameat2", None)
    if renameat2 is None:
        return False
    at_fdcwd, rename_exchange = -100, 2
    if renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0:
        return True
    code = ctypes.get_errno()
    if code in (errno.EINVAL, errno.ENOSYS, errno.ENOTSUP):
        return False
    raise OSError(code, os.strerror(code), str(a))


def install_folder(tmp: pathlib.Path, out: pathlib.Path) -> None:
    """Put the finished folder ``tmp`` at ``out``, replacing the earlier artifact there if any:
    under the parent's lock, after checking ``out`` again and sweeping stale scratch siblings."""
    with folder_lock(out.parent):
        sweep_siblings(out)
        check_destination(out)
        if not out.exists():
            tmp.rename(out)
            return
        if _exchange(tmp, out):
            # now the earlier artifact; what cannot be removed (an immutable file) is swept later
            remove_tree(tmp)
            return
        old = scratch_sibling(out, "old")
        old.rmdir()
        out.rename(old)
        tmp.rename(out)
        remove_tree(old)
