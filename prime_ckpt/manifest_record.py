"""The manifest record of a step directory: which files it covers, hashing, writing and reading
``manifest.json`` (checking it is done by :mod:`prime_ckpt.verify`).

:func:`write_manifest` records, for every file of a step's parts, its path relative to the
step directory, its size and an XXH3-64 checksum (:mod:`xxhash`), and writes
``<step_dir>/manifest.json`` atomically (:func:`prime_ckpt.storage.atomic_write_bytes`). Call it
on one process (rank 0) *after* the data is durable (the step is committed). A checkpoint's data
files are hashed by the writer as they are written (:mod:`prime_ckpt.writing`); the post-commit
manifest takes those digests (``known``) and reads back only what it has none for.

Which files a manifest covers:

* ``checkpoints/step_<N>``: every regular file under ``trainer/`` (``.metadata`` and the
  ``__<rank>_<n>.distcp`` data files) and ``orchestrator.pt`` if it exists when the manifest is
  written. ``save_info.json`` (informational) and the manifest itself are not covered. The
  orchestrator is a separate process and may write ``orchestrator.pt`` after the trainer wrote
  the manifest; the manifest's ``parts`` says which parts it covers, and a part it does not
  cover is reported as *unverified*, not as a failure.
* ``weights/step_<N>``: every regular file except the ``COMPLETE`` marker (empty; it only says
  the directory is finished) and the manifest itself.

Crash leftovers of :mod:`prime_ckpt.storage` (temp files of an atomic write in progress,
``.<name>.tmp.<pid>.<n>``, and ``.<name>.deleting.<pid>.<n>`` trees; see
:func:`prime_ckpt.storage.is_leftover`) are never covered or reported.

A manifest entry is only ever read inside its step directory (:func:`manifest_entry_path`): an
absolute path, a ``..`` component, or (locally) a path that resolves through a symlink to outside
the step directory is a :class:`ManifestError` and never opened.

Manifest format (``"schema": "prime-ckpt.manifest/1"``)::

    {"schema": "prime-ckpt.manifest/1", "kind": "checkpoint" | "weights", "step": N | null,
     "algorithm": "xxh3_64", "parts": ["trainer", "orchestrator"] (checkpoints) | ["weights"],
     "created_at": unix seconds, "total_bytes": int,
     "files": [{"path": "trainer/__0_0.distcp", "size": int, "xxh3_64": "16 hex digits"}, ...]}

Every path may be an fsspec URL or a UPath carrying storage options (files are then listed with
one uncached listing and read through fsspec; see :mod:`prime_ckpt.storage`).
"""

from __future__ import annotations

import json
import logging
import os
import posixpath
import time
from collections.abc import Callable
from pathlib import Path, PurePosixPath
from typing import Any

import xxhash

from prime_ckpt.errors import PrimeCkptError
from prime_ckpt.layout import (
    CHECKPOINTS_DIR,
    MANIFEST_FILE,
    ORCHESTRATOR_FILE,
    ORCHESTRATOR_PART,
    TRAINER_PART,
    WEIGHTS_DIR,
    WEIGHTS_MARKER,
    parse_step,
)
from prime_ckpt.storage import (
    AnyPath,
    atomic_write_bytes,
    is_leftover,
    is_remote,
    list_tree,
    to_path,
)

logger = logging.getLogger(__name__)

SCHEMA = "prime-ckpt.manifest/1"
ALGORITHM = "xxh3_64"
WEIGHTS_PART = "weights"

#: Bytes read per ``read`` call while hashing.
CHUNK_BYTES = 8 * 1024 * 1024

#: Called with the number of bytes just hashed (drives a progress bar).
OnBytes = Callable[[int], None]


class ManifestError(PrimeCkptError, ValueError):
    """``manifest.json`` is unreadable or not a prime-ckpt manifest (one line, names the path)."""


# -- hashing ----------------------------------------------------------------------------------
def hash_file(path: AnyPath | str, on_bytes: OnBytes | None = None) -> tuple[int, str]:
    """``(size, xxh3_64 hex digest)`` of a file, read in :data:`CHUNK_BYTES` chunks."""
    h = xxhash.xxh3_64()
    buf = bytearray(CHUNK_BYTES)
    view = memoryview(buf)
    size = 0
    path = to_path(path)
    with path.open("rb") if is_remote(path) else open(path, "rb", buffering=0) as f:
        while True:
            n = f.readinto(buf)
            if not n:
                break
            h.update(view[:n])
            size += n
            if on_bytes is not None:
                on_bytes(n)
    return size, h.hexdigest()


def _size_of(path: AnyPath) -> int | None:
    """``path``'s size in bytes on its storage (``None`` if it cannot be read)."""
    try:
        return path.stat().st_size  # as verify reads it (a local Path or a UPath)
    except (OSError, ValueError, TypeError):
        return None


# -- which files ------------------------------------------------------------------------------
def is_weights_dir(step_dir: AnyPath) -> bool:
    """Whether ``step_dir`` is a ``weights/step_<N>`` (by its parent's name; elsewhere: it has the
    ``COMPLETE`` marker and no ``trainer/``)."""
    if step_dir.parent.name == WEIGHTS_DIR:
        return True
    if step_dir.parent.name == CHECKPOINTS_DIR:
        return False
    return (step_dir / WEIGHTS_MARKER).exists() and not (step_dir / TRAINER_PART).exists()


def walk_files(root: AnyPath, base: AnyPath) -> list[str]:
    """Regular files under ``root``, relative to ``base``; crash leftovers
    (:func:`~prime_ckpt.storage.is_leftover`, files or anything under a leftover directory) and
    symlinks are left out."""
    if is_remote(root):
        prefix = str(root)[len(str(base)) :].strip("/")
        return sorted(
            posixpath.join(prefix, rel) if prefix else rel
            for rel, kind in list_tree(root).items()
            if kind == "file" and not any(is_leftover(part) for part in rel.split("/"))
        )
    out = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if not is_leftover(d))
        for name in sorted(filenames):
            p = Path(dirpath) / name
            if is_leftover(name) or p.is_symlink() or not p.is_file():
                continue
            out.append(p.relative_to(base).as_posix())
    return out


def covered_files(step_dir: AnyPath | str) -> tuple[str, list[str], list[str]]:
    """``(kind, parts, relative paths)`` of the files a manifest of ``step_dir`` covers now."""
    step_dir = to_path(step_dir)
    if is_weights_dir(step_dir):
        files = [f for f in walk_files(step_dir, step_dir) if f not in (MANIFEST_FILE, WEIGHTS_MARKER)]
        return "weights", [WEIGHTS_PART], files
    parts: list[str] = []
    files: list[str] = []
    if (step_dir / TRAINER_PART).is_dir():
        parts.append(TRAINER_PART)
        files += walk_files(step_dir / TRAINER_PART, step_dir)
    if (step_dir / ORCHESTRATOR_FILE).is_file():
        parts.append(ORCHESTRATOR_PART)
        files.append(ORCHESTRATOR_FILE)
    return "checkpoint", parts, files


def files_of_parts(step_dir: AnyPath, kind: str, parts: list[str]) -> list[str]:
    """Files on disk now that belong to ``parts`` (what a manifest covering them must list)."""
    if kind == "weights":
        return covered_files(step_dir)[2]
    files: list[str] = []
    if TRAINER_PART in parts and (step_dir / TRAINER_PART).is_dir():
        files += walk_files(step_dir / TRAINER_PART, step_dir)
    if ORCHESTRATOR_PART in parts and (step_dir / ORCHESTRATOR_FILE).is_file():
        files.append(ORCHESTRATOR_FILE)
    return files


# -- write ------------------------------------------------------------------------------------
def write_manifest(step_dir: AnyPath | str, on_bytes: OnBytes | None = None,
                   known: dict[str, tuple[int, str]] | None = None) -> AnyPath:
    """Hash every file of the step's parts and write ``<step_dir>/manifest.json`` atomically.

    Call on one process (rank 0) after the step's data is durable; an existing manifest is
    replaced. Returns the manifest's path.

    ``known``: ``{path relative to step_dir: (size in bytes, xxh3_64 hex)}`` of files hashed
    while they were written (the checkpoint writer's digests,
    :func:`prime_ckpt.writing.file_digests`). Such a file is not read back: its size on storage
    is checked against the known size (one ``stat``) and, if it matches, the known digest is
    recorded; a file whose size differs (logged as a warning: storage does not hold what was
    written), or that ``known`` does not name, is read and hashed.

    Raises:
        FileNotFoundError: ``step_dir`` is not a directory.
        ManifestError: ``step_dir`` holds nothing a manifest covers (no ``trainer/``, no
            ``orchestrator.pt``; or an empty weights dir).
    """
    step_dir = to_path(step_dir)
    if not step_dir.is_dir():
        raise FileNotFoundError(f"{step_dir}: no such step directory")
    kind, parts, files = covered_files(step_dir)
    if not files:
        raise ManifestError(f"{step_dir}: nothing to record (no trainer/, {ORCHESTRATOR_FILE} or weight files)")
    known = known or {}
    entries = []
    for rel in files:
        size_digest = known.get(rel)
        if size_digest is not None and (on_storage := _size_of(step_dir / rel)) != size_digest[0]:
            logger.warning("%s: %s bytes on storage, %d written: recording what is there now (hashed again)",
                           step_dir / rel, on_storage, size_digest[0])
            size_digest = None
        if size_digest is None:
            size_digest = hash_file(step_dir / rel, on_bytes)
        size, digest = size_digest
        entries.append({"path": rel, "size": size, ALGORITHM: digest})
    path = step_dir / MANIFEST_FILE
    atomic_write_bytes(path, build_manifest(kind, step_dir, entries, parts))
    return path


def build_manifest(kind: str, step_dir: AnyPath | str, entries: list[dict[str, Any]], parts: list[str] | None = None) -> bytes:
    """The bytes of a ``manifest.json`` over ``entries`` (``{"path", "size", "xxh3_64"}`` each,
    already hashed: the weights publisher hashes each shard while writing it, so nothing is read
    twice). ``kind`` is ``"checkpoint"`` or ``"weights"``; ``parts`` defaults to ``["weights"]``
    for weights."""
    manifest = {
        "schema": SCHEMA,
        "kind": kind,
        "step": parse_step(to_path(step_dir).name),
        "algorithm": ALGORITHM,
        "parts": parts if parts is not None else [WEIGHTS_PART],
        "created_at": time.time(),
        "total_bytes": sum(e["size"] for e in entries),
        "files": entries,
    }
    return (json.dumps(manifest, indent=1) + "\n").encode()


def read_manifest(step_dir: AnyPath | str) -> dict[str, Any] | None:
    """The parsed ``manifest.json`` of ``step_dir``, or ``None`` if there is none.

    Raises:
        ManifestError: the file exists but is not a readable prime-ckpt manifest.
    """
    path = to_path(step_dir) / MANIFEST_FILE
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_bytes())
    except (OSError, ValueError, RecursionError) as e:  # RecursionError: nested too deeply
        raise ManifestError(f"{path}: not a readable manifest ({type(e).__name__})") from None
    ok = (
        isinstance(data, dict)
        and data.get("schema") == SCHEMA
        and data.get("algorithm") == ALGORITHM
        and isinstance(data.get("files"), list)
        and all(
            isinstance(f, dict) and isinstance(f.get("path"), str) and isinstance(f.get("size"), int)
            and isinstance(f.get(ALGORITHM), str)
            for f in data["files"]
        )
    )
    if not ok:
        raise ManifestError(f"{path}: not a {SCHEMA} manifest with {ALGORITHM} checksums")
    return data


def manifest_entry_path(step_dir: AnyPath | str, rel: str) -> AnyPath:
    """The file a manifest entry ``rel`` names, checked to lie inside ``step_dir``.

    Nothing is opened: a local path is resolved (symlinks followed) with :meth:`Path.resolve`
    and compared with the resolved step directory; a remote path (no symlinks) is checked by
    its name only.

    Args:
        step_dir: the step directory holding the manifest (local path, URL or UPath).
        rel: the entry's ``"path"``, relative to ``step_dir``.

    Returns:
        ``step_dir / rel``.

    Raises:
        ManifestError: ``rel`` is absolute, has a ``..`` component, contains a NUL byte, is a
            URL (``://``), names another location once joined (remote), or (locally) resolves through a symlink to outside
            ``step_dir`` (or cannot be resolved: a symlink loop). One line naming the manifest
            and the entry.
    """
    step_dir = to_path(step_dir)
    where = f"{step_dir / MANIFEST_FILE}: entry {rel!r}"
    if "\0" in rel:
        raise ManifestError(f"{where} is not a valid path (NUL byte); not read")
    if PurePosixPath(rel).is_absolute() or rel.startswith("\\"):
        raise ManifestError(f"{where} is an absolute path, outside the step directory; not read")
    if ".." in rel.replace("\\", "/").split("/"):
        raise ManifestError(f"{where} has a '..' component, outside the step directory; not read")
    if "://" in rel:
        raise ManifestError(f"{where} is a URL, outside the step directory; not read")
    try:
        path = step_dir / rel
    except (ValueError, TypeError):  # a UPath refusing what it cannot join
        raise ManifestError(f"{where} names another location, outside the step directory; not read") from None
    if is_remote(step_dir):
        base = step_dir.path.rstrip("/") + "/"
        if not is_remote(path) or path.protocol != step_dir.protocol or not path.path.startswith(base):
            raise ManifestError(f"{where} names another location, outside the step directory; not read")
        return path
    try:
        inside = Path(path).resolve().is_relative_to(Path(step_dir).resolve())
    except (OSError, RuntimeError):  # a symlink loop (RuntimeError before Python 3.13)
        raise ManifestError(f"{where} cannot be resolved (symlink loop?); not read") from None
    if not inside:
        raise ManifestError(f"{where} resolves through a symlink to outside the step directory; not read")
    return path


def manifest_bytes(step_dir: AnyPath | str) -> int:
    """Bytes :func:`verify_manifest` would hash (0 without a readable manifest)."""
    try:
        m = read_manifest(step_dir)
    except ManifestError:
        return 0
    return sum(f["size"] for f in m["files"]) if m else 0
