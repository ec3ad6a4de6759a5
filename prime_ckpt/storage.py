"""File operations in one place: durable (fsync'd) atomic small-file writes and tolerant deletes.

Every write that the commit protocol relies on goes through here:
``tmp file -> write -> fsync(file) -> rename -> fsync(parent dir)``. A crash at any instant
leaves either the old file or the complete new one, never a partial one under the final name.
Temp files are named ``.<name>.tmp.<pid>`` so they never parse as a step or a part.
"""

from __future__ import annotations

import errno
import logging
import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO

logger = logging.getLogger(__name__)


def fsync_dir(path: Path | str) -> None:
    """fsync a directory so that a rename or create inside it is durable (POSIX)."""
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def tmp_path_for(path: Path | str) -> Path:
    """The temp name used while ``path`` is being written: ``.<name>.tmp.<pid>`` beside it."""
    path = Path(path)
    return path.with_name(f".{path.name}.tmp.{os.getpid()}")


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


def remove_tree(path: Path | str) -> bool:
    """Delete a directory tree or file; a path that is already gone is not an error.

    Returns ``True`` if something was deleted. Other ``OSError``s propagate.
    """
    path = Path(path)
    try:
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        else:
            path.unlink()
    except FileNotFoundError:
        return False
    except OSError as e:  # a concurrent delete can surface as ENOTEMPTY/ENOENT mid-rmtree
        if e.errno == errno.ENOENT:
            return False
        raise
    return True


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
