"""Atomic, durable writes of small and large files, local or on object storage.

Local: ``tmp file -> write -> fsync(file) -> rename -> fsync(parent dir)``; the temp file is
named by :func:`prime_ckpt.names.tmp_name` (``.<name>.tmp.<pid>.<n>``). Remote: one PUT for a
small file, a multipart upload that appears whole at close for a large one. Part of
:mod:`prime_ckpt.storage`.
"""

from __future__ import annotations

import io
import itertools
import os
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO

from prime_ckpt.names import tmp_name
from prime_ckpt.storage.paths import AnyPath, is_remote, remote_errors, to_path

_counter = itertools.count()


def fsync_dir(path: AnyPath | str) -> None:
    """fsync a directory so that a rename or create inside it is durable (POSIX). No-op for a
    remote path (an object store has no directories to sync)."""
    if is_remote(path):
        return
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def tmp_path_for(path: Path | str) -> Path:
    """A fresh temp name for writing ``path``: ``.<name>.tmp.<pid>.<n>`` beside it (unique per
    call, so two threads of one process writing the same file never share a temp file)."""
    path = Path(path)
    return path.with_name(tmp_name(path.name, os.getpid(), next(_counter)))


def atomic_write(path: AnyPath | str, write: Callable[[BinaryIO], None]) -> None:
    """Write ``path`` atomically and durably; ``write(f)`` fills the open binary file.

    Local: creates missing parent directories; tmp file, fsync, rename, fsync(dir). On any error
    the temp file is removed and the error re-raised; the previous content of ``path`` (if any)
    is untouched.

    Remote: ``write`` fills an in-memory buffer, then the object is uploaded in one PUT (atomic
    on an object store: the old object or the new one, never a partial one). A failing
    ``write`` uploads nothing.
    """
    path = to_path(path)
    if is_remote(path):
        buf = io.BytesIO()
        write(buf)
        with remote_errors(path):
            path.fs.pipe_file(path.path, buf.getvalue())
        return
    def fill(tmp: Path) -> None:
        with open(tmp, "wb") as f:
            write(f)

    atomic_write_path(path, fill, mode=None)


def atomic_write_path(path: Path | str, write_to: Callable[[Path], None], mode: int | None = 0o644) -> None:
    """Write the local file ``path`` atomically and durably through a writer that takes a file
    name (``safetensors.torch.save_file``, ...): ``write_to(tmp)`` creates the temp file beside
    ``path``; then chmod ``mode`` (``None``: leave it), fsync, rename, fsync(dir).

    Creates missing parent directories. On any error the temp file is removed and the error
    re-raised; the previous content of ``path`` (if any) is untouched.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = tmp_path_for(path)
    try:
        write_to(tmp)
        if mode is not None:
            os.chmod(tmp, mode)  # an output for others to read (mkstemp-style temp files are 0600)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def atomic_write_streamed(path: AnyPath | str, write: Callable[[BinaryIO], None]) -> None:
    """:func:`atomic_write` for large files, never held in memory whole.

    Local: exactly :func:`atomic_write` (temp file, fsync, rename, fsync(dir); the file gets
    the usual mode, 0644 under the common umask 022). Remote: ``write`` streams into an fsspec
    file opened for writing (multipart upload on S3); the object appears, whole, when the
    upload completes at close. If ``write`` raises, the upload is discarded (nothing appears)
    and the error re-raised.
    """
    path = to_path(path)
    if not is_remote(path):
        atomic_write(path, write)
        return
    with remote_errors(path):
        f = path.fs.open(path.path, "wb")
        try:
            write(f)
        except BaseException:
            discard = getattr(f, "discard", None)
            if discard is not None:
                discard()
            else:  # pragma: no cover - every fsspec buffered file has discard()
                f.close()
                path.fs.rm_file(path.path)
            raise
        f.close()


def atomic_write_bytes(path: AnyPath | str, data: bytes) -> None:
    """:func:`atomic_write` of a bytes payload."""
    atomic_write(path, lambda f: f.write(data))


def fsync_file(path: AnyPath | str) -> None:
    """fsync one existing file's data. No-op for a remote path (an uploaded object is durable
    once its upload has returned)."""
    if is_remote(path):
        return
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)

