"""Paths on a local file system or on object storage (fsspec): what a path is, listing, sizes.

:func:`to_path` turns a local path or an fsspec URL into a path object (a :class:`pathlib.Path`
or a :class:`upath.UPath`); listings are never served from fsspec's cache (:func:`refresh`);
a remote backend's own error types become ``OSError`` naming the path (:func:`remote_errors`).
Part of :mod:`prime_ckpt.storage` (see its docstring for the commit protocol on both).
"""

from __future__ import annotations

import errno
import os
import posixpath
import re
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path, PurePath
from typing import TYPE_CHECKING, Any, Union

if TYPE_CHECKING:
    from upath import UPath

#: A local path or a remote UPath (what :func:`to_path` returns). ``upath`` (and fsspec) are
#: imported on the first URL only, so local-only programs never pay for them.
AnyPath = Union[Path, "UPath"]  # noqa: UP007 - a forward reference: no import at runtime

#: An fsspec URL's start, ``<protocol>://`` (group 1: the protocol); a local path never matches.
URL_RE = re.compile(r"^([A-Za-z][A-Za-z0-9+.\-]*)://")
_LOCAL_SCHEMES = frozenset({"file", "local"})


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
        match = URL_RE.match(text) if isinstance(text, str) else None
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
    match = URL_RE.match(text)
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

