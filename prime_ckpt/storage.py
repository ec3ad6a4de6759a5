"""File operations in one place, on a local file system or on object storage (fsspec).

Every write that the commit protocol relies on goes through here, and every path may be a local
path or an fsspec URL (``s3://bucket/run``, ``gs://...``, ``memory://...`` in tests;
``file://`` means local). :func:`to_path` turns either into a path object: a plain
:class:`pathlib.Path` for local paths, a :class:`upath.UPath` (the pathlib API over fsspec) for
URLs, so callers build paths with ``/`` and call ``.is_file()`` / ``.iterdir()`` on both.

Local paths (unchanged fast paths): a small file is written
``tmp file -> write -> fsync(file) -> rename -> fsync(parent dir)``. A crash at any instant
leaves either the old file or the complete new one, never a partial one under the final name.
Temp files are named ``.<name>.tmp.<pid>.<n>`` so they never parse as a step or a part. A
directory is deleted by renaming it to a hidden name first.

Object stores have no rename and no fsync, but an object becomes visible whole, once, when its
upload completes (and S3 reads and listings are strongly consistent). The commit protocol
therefore holds by *order*, with the completion mark of each part written last:

* small files (``orchestrator.pt``, ``manifest.json``, ``save_info.json``, ``config.json``,
  ``COMPLETE``) are one PUT each (:func:`atomic_write`): a reader sees the old object, the new
  one or none, never a partial one;
* ``trainer/`` goes through DCP's ``FsspecWriter`` (:func:`dcp_writer`): every rank uploads its
  ``__<rank>_<n>.distcp`` (one object each, complete when its upload completes); only after every
  rank reported success does the coordinator (rank 0) write ``.metadata`` (uploaded as
  ``.metadata.tmp`` and copied server-side to ``.metadata``). ``.metadata`` is the mark;
* ``weights/step_<N>``: ``model.safetensors``, ``config.json``, ``manifest.json``, then
  ``COMPLETE``;
* a delete (:func:`remove_tree`) removes the completion marks first (``trainer/.metadata``,
  ``orchestrator.pt``, ``COMPLETE``, ``manifest.json``), then the rest: a crash mid-delete leaves
  a visibly incomplete step, never a half-deleted one that looks complete.

Listings are not cached: :func:`to_path` turns fsspec's listings cache off unless the options
say otherwise, and the inventory scans call :func:`refresh` first, because other ranks and
other processes (the orchestrator) write under the same prefix.

Credentials and the endpoint come from the standard fsspec / botocore configuration:
environment variables (``AWS_ACCESS_KEY_ID``, ``AWS_SECRET_ACCESS_KEY``, ``AWS_ENDPOINT_URL``
...), ``~/.aws``, or ``storage_options`` (``--storage.options '{"client_kwargs": ...}'``). They
are never logged: a UPath's ``str`` and ``repr`` carry no options.

Errors of a remote backend that are not ``OSError`` (botocore's connection errors ...) are
re-raised as ``OSError`` naming the path, so callers handle local and remote failures alike.
"""

from __future__ import annotations

import errno
import functools
import io
import itertools
import logging
import os
import posixpath
import re
import shutil
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path, PurePath
from typing import TYPE_CHECKING, Any, BinaryIO, NoReturn, Union

if TYPE_CHECKING:
    from torch.distributed.checkpoint.metadata import Metadata
    from upath import UPath

logger = logging.getLogger(__name__)
_counter = itertools.count()

#: A local path or a remote UPath (what :func:`to_path` returns). ``upath`` (and fsspec) are
#: imported on the first URL only, so local-only programs never pay for them.
AnyPath = Union[Path, "UPath"]  # noqa: UP007 - a forward reference: no import at runtime

_URL_RE = re.compile(r"^([A-Za-z][A-Za-z0-9+.\-]*)://")
_LOCAL_SCHEMES = frozenset({"file", "local"})

#: Completion marks, in the order a remote delete removes them (before anything else).
COMPLETION_MARKS: tuple[str, ...] = (".metadata", "orchestrator.pt", "COMPLETE", "manifest.json")


# -- paths ------------------------------------------------------------------------------------
def _is_upath(path: Any) -> bool:
    upath = sys.modules.get("upath")  # no UPath can exist before upath is imported
    return upath is not None and isinstance(path, upath.UPath)


def is_remote(path: Any) -> bool:
    """True for an fsspec URL other than ``file://`` (``s3://``, ``gs://``, ``memory://`` ...) or
    a UPath of one; False for local paths (``str``, :class:`pathlib.Path`, ``file://``)."""
    if isinstance(path, PurePath):
        return False
    if _is_upath(path):
        return True
    if isinstance(path, (str, os.PathLike)):
        text = os.fspath(path)
        match = _URL_RE.match(text) if isinstance(text, str) else None
        return match is not None and match.group(1).lower() not in _LOCAL_SCHEMES
    return False


def to_path(path: str | os.PathLike | AnyPath, storage_options: dict[str, Any] | None = None) -> AnyPath:
    """A path object for a local path or an fsspec URL.

    Plain paths and ``file://`` URLs give a :class:`pathlib.Path`; other URLs a
    :class:`upath.UPath` built with ``storage_options`` (fsspec's keyword arguments for that
    file system, e.g. ``{"client_kwargs": {"endpoint_url": ...}}`` for S3), with fsspec's
    listings cache off unless the options set ``use_listings_cache``. A UPath passed in is
    returned as is (with ``storage_options`` merged over its own, if given).
    """
    if isinstance(path, PurePath):
        return path if type(path) is type(Path()) else Path(path)
    if _is_upath(path):
        if not storage_options:
            return path
        return type(path)(str(path), **{**path.storage_options, **storage_options})
    text = os.fspath(path)
    match = _URL_RE.match(text)
    if match is None:
        return Path(text)
    if match.group(1).lower() in _LOCAL_SCHEMES:
        from fsspec.implementations.local import LocalFileSystem

        return Path(LocalFileSystem._strip_protocol(text))
    from upath import UPath

    return UPath(text, **{"use_listings_cache": False, **(storage_options or {})})


def storage_options_of(path: AnyPath) -> dict[str, Any]:
    """The fsspec storage options a remote path carries (``{}`` for a local path)."""
    return dict(path.storage_options) if is_remote(path) else {}


def refresh(path: AnyPath) -> None:
    """Drop fsspec's cached listings of ``path``, its parents and everything below it, so the
    next listing sees what other processes wrote. No-op for local paths."""
    if not is_remote(path):
        return
    fs = path.fs
    key = fs._strip_protocol(str(path)).rstrip("/")
    fs.invalidate_cache(key)
    cache = getattr(fs, "dircache", None)
    if cache:
        for k in [k for k in list(cache) if k.startswith(key + "/")]:
            cache.pop(k, None)


def one_line(e: BaseException) -> str:
    """``"ExceptionType: message"`` on one line (whitespace runs collapsed): how a failure is
    named in an error that reports it (a save, a publish, a remote backend)."""
    text = " ".join(str(e).split())
    return f"{type(e).__name__}: {text}" if text else type(e).__name__


_one_line = one_line


@contextmanager
def remote_errors(path: AnyPath) -> Iterator[None]:
    """Re-raise a remote backend's non-``OSError`` failure as ``OSError`` naming ``path``."""
    try:
        yield
    except OSError:
        raise
    except Exception as e:
        raise OSError(f"{path}: {_one_line(e)}") from e


def missing_reason(path: AnyPath | str) -> str:
    """Why a path that does not exist is missing, for an error message: ``"no such bucket"``
    when ``path`` is on a bucket store (s3, gcs, azure) whose bucket does not exist (or is not
    visible with these credentials); locally ``"a symlink loop"`` (ELOOP) or ``"a dangling
    symlink"`` when that is why; else ``"no such file or directory"``."""
    if is_remote(path):
        if hasattr(path.fs, "split_path"):
            bucket = path.path.split("/", 1)[0]
            with remote_errors(path):
                if bucket and not path.fs.exists(bucket):
                    return f"no such bucket {bucket!r} (or no access to it)"
        return "no such file or directory"
    try:
        os.stat(path)
    except OSError as e:
        if e.errno == errno.ELOOP:
            return "too many levels of symbolic links (a symlink loop)"
        if e.errno == errno.ENOTDIR:
            return "not a directory on the way (a file where a directory is expected)"
        if os.path.islink(path):
            return f"a dangling symlink (to {os.readlink(path)})"
    return "no such file or directory"


def list_tree(root: AnyPath) -> dict[str, str]:
    """Everything under a remote ``root`` in one listing: ``{relative posix path: "file" |
    "directory"}`` (directories inferred from the keys; ``root`` itself left out). ``{}`` if
    nothing is there. Remote paths only."""
    fs, base = root.fs, root.path.rstrip("/")
    refresh(root)
    with remote_errors(root):
        try:
            found = fs.find(base, withdirs=True, detail=True)
        except FileNotFoundError:
            return {}
    out: dict[str, str] = {}
    for name, info in found.items():
        name = name.rstrip("/")
        if not name.startswith(base + "/"):
            continue
        rel = name[len(base) + 1 :]
        kind = "directory" if info.get("type") == "directory" else "file"
        out[rel] = kind
        parent = posixpath.dirname(rel)
        while parent:
            out.setdefault(parent, "directory")
            parent = posixpath.dirname(parent)
    return out


# -- writes -----------------------------------------------------------------------------------
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
    return path.with_name(f".{path.name}.tmp.{os.getpid()}.{next(_counter)}")


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


# -- deletes ----------------------------------------------------------------------------------
_DELETING = ".deleting."
_TMP = ".tmp."


def remove_tree(path: AnyPath | str) -> bool:
    """Delete a directory tree or file; a path that is already gone is not an error.

    Local: a directory is first renamed to a hidden sibling (``.<name>.deleting.<pid>``) and
    only then deleted, so a crash mid-delete never leaves a half-deleted step directory under
    its step name (where a surviving ``.metadata`` or marker could make it look complete).
    Leftovers are removed by :func:`clean_leftovers`.

    Remote (no rename): the completion marks (:data:`COMPLETION_MARKS`) under ``path`` are
    deleted first, one by one, then everything else; a crash in between leaves a step without
    its marks, i.e. visibly incomplete.

    Returns ``True`` if something was deleted; other ``OSError``s propagate.
    """
    path = to_path(path)
    if is_remote(path):
        return _remove_remote(path)
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


def _remove_remote(path: UPath) -> bool:
    fs, root = path.fs, path.path.rstrip("/")
    tree = list_tree(path)
    with remote_errors(path):
        if not tree:
            try:
                if not fs.isfile(root):
                    return False
                fs.rm_file(root)
            except FileNotFoundError:
                return False
            return True
        marks = sorted(
            (rel for rel, kind in tree.items() if kind == "file" and posixpath.basename(rel) in COMPLETION_MARKS),
            key=lambda rel: (COMPLETION_MARKS.index(posixpath.basename(rel)), rel),
        )
        for rel in marks:
            try:
                fs.rm_file(f"{root}/{rel}")
            except FileNotFoundError:
                pass
        try:
            fs.rm(root, recursive=True)
        except FileNotFoundError:
            pass
    return True


def is_leftover(name: str) -> bool:
    """True for the hidden temp names this module creates (``.<name>.tmp.<pid>``,
    ``.<name>.deleting.<pid>.<n>``): what a crash in the middle of a write or delete leaves."""
    return name.startswith(".") and (_TMP in name or _DELETING in name)


def clean_leftovers(directory: AnyPath | str, *, min_age_s: float = 300.0) -> list[Path]:
    """Remove crash leftovers (see :func:`is_leftover`) directly inside ``directory`` and inside
    its ``step_*`` subdirectories; returns what was removed.

    ``.deleting.`` trees are always removed (nothing writes into them); ``.tmp.`` files only once
    they are older than ``min_age_s`` seconds, so a temp file another live process (the
    orchestrator) is writing right now is left alone. Call from one process (rank 0) at start-up.
    A missing directory is not an error. On a remote path there is nothing to clean (no temp
    files, no renames) and this returns ``[]``.
    """
    from prime_ckpt.layout import parse_step

    directory = to_path(directory)
    removed: list[Path] = []
    if is_remote(directory) or not directory.is_dir():
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
                except OSError as e:  # e.g. permission denied: left in place, listed by `list`
                    logger.warning("could not remove the leftover %s: %s", entry, e)
    return removed


def set_aside(paths: list[AnyPath], into: AnyPath) -> list[AnyPath]:
    """Move each of ``paths`` into the directory ``into`` (created), keeping their names; returns
    the new paths. Used for checkpoint steps a new run supersedes: they leave the ``step_<N>``
    namespace (so nothing can load them or mix their parts with the new run's) but nothing is
    deleted.

    Local (same file system): one atomic rename each. Remote (no rename): each tree is copied
    into ``into`` (a name that never parses as a step), then removed with :func:`remove_tree`
    (marks first); a crash in between leaves the original in place, as before the call.
    """
    into = to_path(into)
    if is_remote(into):
        moved = []
        for p in paths:
            p = to_path(p)
            target = into / p.name
            with remote_errors(p):
                p.fs.copy(p.path.rstrip("/"), target.path.rstrip("/"), recursive=True)
            remove_tree(p)
            moved.append(target)
        return moved
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


def tree_size(path: AnyPath | str) -> int:
    """Total size in bytes of the regular files under ``path`` (0 if it is gone)."""
    path = to_path(path)
    if is_remote(path):
        refresh(path)
        with remote_errors(path):
            try:
                found = path.fs.find(path.path.rstrip("/"), detail=True)
            except FileNotFoundError:
                return 0
        return sum(int(info.get("size") or 0) for info in found.values() if info.get("type") != "directory")
    total = 0
    for root, _dirs, files in os.walk(path):
        for name in files:
            try:
                total += os.stat(os.path.join(root, name)).st_size
            except FileNotFoundError:
                pass
    return total


# -- DCP storage ------------------------------------------------------------------------------
def _fsspec_dcp_class(name: str) -> type:
    """``FsspecWriter`` / ``FsspecReader`` of this torch (private module, public fallback)."""
    try:
        from torch.distributed.checkpoint import _fsspec_filesystem

        return getattr(_fsspec_filesystem, name)
    except (ImportError, AttributeError):
        import torch.distributed.checkpoint as dcp

        return getattr(dcp, name)


def dcp_writer(trainer_dir: AnyPath | str, storage_options: dict[str, Any] | None = None, *, thread_count: int = 1):
    """The DCP ``StorageWriter`` for a checkpoint directory; ``thread_count`` writer threads per
    rank, each writing one file ``__<rank>_<n>.distcp`` (``n < thread_count``).

    Local: DCP's ``FileSystemWriter`` (fsync'd files, ``.metadata`` renamed into place last).
    Remote: DCP's ``FsspecWriter`` with the path's storage options; ``sync_files`` is off (an
    uploaded object is durable once its upload returns; DCP's fsync fallback would ``os.sync()``
    the local machine instead), ``.metadata`` is still written last, by the coordinator.
    """
    path = to_path(trainer_dir, storage_options)
    if not is_remote(path):
        from torch.distributed.checkpoint import FileSystemWriter

        return FileSystemWriter(str(path), thread_count=thread_count)
    return _fsspec_dcp_class("FsspecWriter")(str(path), sync_files=False, thread_count=thread_count, **storage_options_of(path))


def dcp_reader(trainer_dir: AnyPath | str, storage_options: dict[str, Any] | None = None):
    """The DCP ``StorageReader`` for a checkpoint directory; ``.metadata`` is read through the
    restricted unpickler either way (:class:`prime_ckpt.dcp_metadata.SafeFileSystemReader`
    locally, :func:`_safe_fsspec_reader` remotely), and tensors are read straight into their
    target shards either way (:class:`prime_ckpt.loading.DirectReadMixin`)."""
    path = to_path(trainer_dir, storage_options)
    if not is_remote(path):
        return _direct_local_reader()(str(path))
    return _safe_fsspec_reader()(str(path), **storage_options_of(path))


@functools.cache
def _direct_local_reader() -> type:
    """``SafeFileSystemReader`` with the direct read path of :mod:`prime_ckpt.loading`."""
    from prime_ckpt.dcp_metadata import SafeFileSystemReader
    from prime_ckpt.loading import DirectReadMixin

    return type("DirectSafeFileSystemReader", (DirectReadMixin, SafeFileSystemReader), {})


@functools.cache
def _safe_fsspec_reader() -> type:
    """DCP's ``FsspecReader`` with ``.metadata`` read through the restricted unpickler (the
    remote twin of ``SafeFileSystemReader``) and the direct read path of
    :mod:`prime_ckpt.loading`: DCP's own path runs ``torch.load`` on a slice of the remote file
    for every tensor, whose zip parsing seeks back and forth and makes the fsspec file re-fetch
    blocks; the direct path reads each tensor's first 4 KiB, its bytes, then its last 4 KiB (the
    zip directory that confirms where the bytes were), in file order, through the file's
    read-ahead cache."""
    from prime_ckpt.loading import DirectReadMixin

    base = _fsspec_dcp_class("FsspecReader")

    class SafeFsspecReader(DirectReadMixin, base):  # type: ignore[misc, valid-type]
        def read_metadata(self, *args: Any, **kwargs: Any) -> Metadata:
            from torch.distributed.checkpoint.metadata import StorageMeta

            where = str(self.fs.concat_path(self.path, _METADATA_FILE))
            try:
                data = self.fs.fs.cat_file(where)
            except FileNotFoundError:
                data = None
            except Exception as e:
                _raise_metadata_error(f"{where}: cannot read ({_one_line(e)})")
            metadata = decode_dcp_metadata(data, where)
            if getattr(metadata, "storage_meta", None) is None:
                metadata.storage_meta = StorageMeta()
            metadata.storage_meta.load_id = self.load_id
            return metadata

    return SafeFsspecReader


_METADATA_FILE = ".metadata"


def _raise_metadata_error(message: str) -> NoReturn:
    from prime_ckpt.dcp_metadata import MetadataError

    raise MetadataError(message) from None


def decode_dcp_metadata(data: bytes | None, where: str) -> Metadata:
    """DCP metadata (torch's classes, what ``dcp.load`` needs) from the bytes of a ``.metadata``
    file (``None``: the file is missing), through
    :func:`prime_ckpt.dcp_metadata.decode_metadata` (the restricted unpickler), with the same
    one-line errors as :func:`prime_ckpt.dcp_metadata.read_dcp_metadata`."""
    from prime_ckpt.dcp_metadata import decode_metadata

    if data is None:
        _raise_metadata_error(f"{where}: missing (save did not finish?)")
    return decode_metadata(data, where, torch_free=False)
