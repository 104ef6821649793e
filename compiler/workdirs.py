"""Scratch folders and file modes: where a compile builds before it saves, and how it cleans up.

A compile builds its library in a work folder under the temp directory named
``sparsecc-<pid>-<random>``. The folder lives as long as the object that uses it (an Artifact
still runs from it before it is saved) and is removed when that object goes or the process
exits; a process killed outright cannot clean up, so every new work folder first sweeps the
folders whose process is gone. The same pid rule lets a save sweep the ``.NAME.tmp-<pid>-*``
siblings that a killed save left beside an artifact.
"""

from __future__ import annotations

import contextlib
import os
import pathlib
import re
import shutil
import tempfile
import weakref
from typing import Any

WORKDIR_PREFIX = "sparsecc-"
#: the file every scratch folder sparsecc makes holds from its first moment: a sweep removes only
#: folders that have it, so a user's folder that happens to match the name pattern is never touched
MARKER = ".sparsecc-scratch"
# sparsecc-[kind-]<pid>-<mkdtemp's 8 random characters>
_WORKDIR_NAME = re.compile(rf"{WORKDIR_PREFIX}(?:[a-z]+-)?(\d+)-[a-z0-9_]{{8}}")
_PID_NAME = re.compile(r"-(\d+)-[a-z0-9_]{8}$")


def process_alive(pid: int) -> bool:
    """Whether a process with this id exists (one owned by another user counts as alive)."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def owner_pid(name: str) -> int | None:
    """The pid written into a scratch name (``...-<pid>-<random>``), or None."""
    match = _PID_NAME.search(name)
    return int(match.group(1)) if match else None


def is_stale(path: pathlib.Path) -> bool:
    """A scratch folder of sparsecc's (it holds the marker) whose creating process no longer runs."""
    pid = owner_pid(path.name)
    if pid is None or pid == os.getpid() or process_alive(pid):
        return False
    marker = path / MARKER
    return marker.is_file() and not marker.is_symlink()


def mark(folder: pathlib.Path) -> pathlib.Path:
    """Put the scratch marker in a folder just made; returns the folder."""
    (folder / MARKER).touch()
    return folder


def remove_tree(path: pathlib.Path) -> None:
    """Remove a folder however deep it is (shutil.rmtree recurses, and a planted or runaway
    folder can be deeper than Python's recursion limit); links are removed, never followed."""
    stack = [pathlib.Path(path)]
    folders = []
    while stack:
        folder = stack.pop()
        folders.append(folder)
        try:
            entries = list(os.scandir(folder))
        except OSError:
            continue
        for entry in entries:
            if entry.is_dir(follow_symlinks=False):
                stack.append(pathlib.Path(entry.path))
            else:
                with contextlib.suppress(OSError):
                    os.unlink(entry.path)
    for folder in reversed(folders):
        with contextlib.suppress(OSError):
            os.rmdir(folder)


def sweep_stale_workdirs(root: pathlib.Path | None = None) -> list[pathlib.Path]:
    """Remove the work folders of sparsecc processes that are gone; returns what was removed."""
    root = pathlib.Path(root or tempfile.gettempdir())
    removed = []
    try:
        candidates = [p for p in root.iterdir() if p.name.startswith(WORKDIR_PREFIX)]
    except OSError:
        return removed
    for path in candidates:
        if _WORKDIR_NAME.fullmatch(path.name) and path.is_dir() and not path.is_symlink() and is_stale(path):
            remove_tree(path)
            removed.append(path)
    return removed


def make_workdir(kind: str = "") -> pathlib.Path:
    """A new scratch folder ``sparsecc-[kind-]<pid>-<random>`` in the temp directory, after
    sweeping the stale ones. The caller removes it, or ties it to an owner with :func:`own`."""
    sweep_stale_workdirs()
    stem = f"{WORKDIR_PREFIX}{kind + '-' if kind else ''}{os.getpid()}-"
    return mark(pathlib.Path(tempfile.mkdtemp(prefix=stem)))


def own(owner: Any, folder: pathlib.Path) -> None:
    """Remove ``folder`` when ``owner`` is garbage-collected or the process exits."""
    weakref.finalize(owner, shutil.rmtree, str(folder), True)


def user_umask() -> int:
    """The process's umask, read without changing it (Linux exposes it in /proc)."""
    try:
        for line in pathlib.Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def apply_umask(folder: pathlib.Path) -> None:
    """Give a folder written through ``mkdtemp`` (0700) and its contents the modes any other tool
    would create them with: 0777 / 0666 less the umask, keeping files' executable bits."""
    mask = user_umask()
    for root, _dirs, files in os.walk(folder):
        os.chmod(root, 0o777 & ~mask)
        for name in files:
            path = os.path.join(root, name)
            executable = os.stat(path).st_mode & 0o111
            os.chmod(path, (0o777 if executable else 0o666) & ~mask)
