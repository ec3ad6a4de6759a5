"""File operations in one place: durable (fsync'd) atomic small-file writes and tolerant deletes.

Every write that the commit protocol relies on goes through here:
``tmp file -> write -> fsync(file) -> rename -> fsync(parent dir)``. A crash at any instant
leaves either the old file or the complete new one, never a partial one under the final name.
Temp files are named ``.<name>.tmp.<pid>.<n>`` so they never parse as a step or a part.
"""

from __future__ import annotations

import errno
import itertools
import logging
import os
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO

logger = logging.getLogger(__name__)
_counter = itertools.count()


def fsync_dir(path: Path | str) -> None:
    """fsync a directory so that a rename or create inside it is durable (POSIX)."""
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def tmp_path_for(path: Path | str) -> Path:
    """A fresh temp name for writing ``path``: ``.<name>.tmp.<pid>.<n>`` beside it (unique per
    call, so two threads of one process writing the same file never share a temp file)."""
    path = Path(path)
    return path.with_name(f".{path.name}.tmp.{os.getpid()}.{next(_counter)}")


def atomic_write(path: Path | str, write: Callable[[BinaryIO], None]) -> None:
    """Write ``path`` atomically and durably; ``write(f)`` fills the open binary file.

    Creates missing parent directories. On any error the temp file is removed and the error
    re-raised; the previous content of ``path`` (if any) is untouched.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = tmp_path_for(path)
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def atomic_write_bytes(path: Path | str, data: bytes) -> None:
    """:func:`atomic_write` of a bytes payload."""
    atomic_write(path, lambda f: f.write(data))


def fsync_file(path: Path | str) -> None:
    """fsync one existing file's data."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


_DELETING = ".deleting."
_TMP = ".tmp."


def remove_tree(path: Path | str) -> bool:
    """Delete a directory tree or file; a path that is already gone is not an error.

    A directory is first renamed to a hidden sibling (``.<name>.deleting.<pid>``) and only then
    deleted, so a crash mid-delete never leaves a half-deleted step directory under its step
    name (where a surviving ``.metadata`` or marker could make it look complete). Leftovers are
    removed by :func:`clean_leftovers`. Returns ``True`` if something was deleted; other
    ``OSError``s propagate.
    """
    path = Path(path)
    try:
        if path.is_dir() and not path.is_symlink():
            doomed = path.with_name(f".{path.name}{_DELETING}{os.getpid()}.{next(_counter)}")
            os.rename(path, doomed)
            shutil.rmtree(doomed, ignore_errors=False)
        else:
            path.unlink()
    except FileNotFoundError:
        return False
    except OSError as e:  # a concurrent delete can surface as ENOENT mid-rmtree
        if e.errno == errno.ENOENT:
            return False
        raise
    return True


def is_leftover(name: str) -> bool:
    """True for the hidden temp names this module creates (``.<name>.tmp.<pid>``,
    ``.<name>.deleting.<pid>.<n>``): what a crash in the middle of a write or delete leaves."""
    return name.startswith(".") and (_TMP in name or _DELETING in name)


def clean_leftovers(directory: Path | str, *, min_age_s: float = 300.0) -> list[Path]:
    """Remove crash leftovers (see :func:`is_leftover`) directly inside ``directory`` and inside
    its ``step_*`` subdirectories; returns what was removed.

    ``.deleting.`` trees are always removed (nothing writes into them); ``.tmp.`` files only once
    they are older than ``min_age_s`` seconds, so a temp file another live process (the
    orchestrator) is writing right now is left alone. Call from one process (rank 0) at start-up.
    A missing directory is not an error.
    """
    from prime_ckpt.layout import parse_step

    directory = Path(directory)
    removed: list[Path] = []
    if not directory.is_dir():
        return removed
    candidates = [directory] + [p for p in directory.iterdir() if p.is_dir() and parse_step(p.name) is not None]
    for d in candidates:
        for entry in list(d.iterdir()):
            if is_leftover(entry.name):
                try:
                    if _TMP in entry.name and time.time() - entry.lstat().st_mtime < min_age_s:
                        continue
                    shutil.rmtree(entry) if entry.is_dir() and not entry.is_symlink() else entry.unlink()
                    removed.append(entry)
                except FileNotFoundError:
                    pass
    return removed


def set_aside(paths: list[Path], into: Path) -> list[Path]:
    """Move each of ``paths`` into the directory ``into`` (created; same file system), one atomic
    rename each, keeping their names; returns the new paths. Used for checkpoint steps a new run
    supersedes: they leave the ``step_<N>`` namespace at once (so nothing can load them or mix
    their parts with the new run's) but nothing is deleted.
    """
    into.mkdir(parents=True, exist_ok=True)
    moved = []
    for p in paths:
        target = into / p.name
        os.rename(p, target)
        moved.append(target)
    fsync_dir(into)
    for parent in {p.parent for p in paths}:
        fsync_dir(parent)
    return moved


def tree_size(path: Path | str) -> int:
    """Total size in bytes of the regular files under ``path`` (0 if it is gone)."""
    total = 0
    for root, _dirs, files in os.walk(path):
        for name in files:
            try:
                total += os.stat(os.path.join(root, name)).st_size
            except FileNotFoundError:
                pass
    return total
