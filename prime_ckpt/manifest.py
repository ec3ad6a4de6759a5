"""Integrity of a step directory: ``manifest.json`` (sizes + checksums) and ``verify``.

:func:`write_manifest` records, for every file of a step's parts, its path relative to the
step directory, its size and an XXH3-64 checksum (:mod:`xxhash`), and writes
``<step_dir>/manifest.json`` atomically (:func:`prime_ckpt.storage.atomic_write_bytes`). Call it
on one process (rank 0) *after* the data is durable (the step is committed).

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
the step directory is reported by :func:`verify_manifest` as a problem and never opened.

Manifest format (``"schema": "prime-ckpt.manifest/1"``)::

    {"schema": "prime-ckpt.manifest/1", "kind": "checkpoint" | "weights", "step": N | null,
     "algorithm": "xxh3_64", "parts": ["trainer", "orchestrator"] (checkpoints) | ["weights"],
     "created_at": unix seconds, "total_bytes": int,
     "files": [{"path": "trainer/__0_0.distcp", "size": int, "xxh3_64": "16 hex digits"}, ...]}

:func:`verify_manifest` re-hashes every listed file (in chunks: a checkpoint is never held in
memory) and reports every mismatched, missing and extra file. :func:`verify_step` adds
structural checks that need no manifest and read no tensor data (``.metadata`` through the
restricted unpickler, every data file the metadata references present and long enough,
``orchestrator.pt`` readable with ``weights_only=True``, the safetensors header consistent with
the file size). :func:`verify_path` runs :func:`verify_step` over an output dir, a
``checkpoints/`` or ``weights/`` dir, or one step dir.

Every path may be an fsspec URL or a UPath carrying storage options (files are then listed with
one uncached listing and read through fsspec; see :mod:`prime_ckpt.storage`).
"""

from __future__ import annotations

import json
import os
import posixpath
import struct
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

import xxhash

from prime_ckpt.errors import PrimeCkptError
from prime_ckpt.layout import (
    CHECKPOINTS_DIR,
    DCP_METADATA_FILE,
    MANIFEST_FILE,
    ORCHESTRATOR_FILE,
    ORCHESTRATOR_PART,
    TRAINER_PART,
    WEIGHTS_DIR,
    WEIGHTS_MARKER,
    detect_parts,
    parse_step,
    scan_checkpoints,
    scan_weights,
)
from prime_ckpt.storage import (
    AnyPath,
    atomic_write_bytes,
    is_leftover,
    is_remote,
    list_tree,
    missing_reason,
    to_path,
)

SCHEMA = "prime-ckpt.manifest/1"
VERIFY_SCHEMA = "prime-ckpt.verify/1"
ALGORITHM = "xxh3_64"
WEIGHTS_PART = "weights"

#: Bytes read per ``read`` call while hashing.
CHUNK_BYTES = 8 * 1024 * 1024

#: Called with the number of bytes just hashed (drives a progress bar).
OnBytes = Callable[[int], None]


class ManifestError(PrimeCkptError, ValueError):
    """``manifest.json`` is unreadable or not a prime-ckpt manifest (one line, names the path)."""


class VerifyTargetError(PrimeCkptError, ValueError):
    """The path given to :func:`verify_path` is not something that can be verified."""


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


# -- which files ------------------------------------------------------------------------------
def _is_weights_dir(step_dir: AnyPath) -> bool:
    if step_dir.parent.name == WEIGHTS_DIR:
        return True
    if step_dir.parent.name == CHECKPOINTS_DIR:
        return False
    return (step_dir / WEIGHTS_MARKER).exists() and not (step_dir / TRAINER_PART).exists()


def _walk_files(root: AnyPath, base: AnyPath) -> list[str]:
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
    if _is_weights_dir(step_dir):
        files = [f for f in _walk_files(step_dir, step_dir) if f not in (MANIFEST_FILE, WEIGHTS_MARKER)]
        return "weights", [WEIGHTS_PART], files
    parts: list[str] = []
    files: list[str] = []
    if (step_dir / TRAINER_PART).is_dir():
        parts.append(TRAINER_PART)
        files += _walk_files(step_dir / TRAINER_PART, step_dir)
    if (step_dir / ORCHESTRATOR_FILE).is_file():
        parts.append(ORCHESTRATOR_PART)
        files.append(ORCHESTRATOR_FILE)
    return "checkpoint", parts, files


def _files_of_parts(step_dir: AnyPath, kind: str, parts: list[str]) -> list[str]:
    """Files on disk now that belong to ``parts`` (what a manifest covering them must list)."""
    if kind == "weights":
        return covered_files(step_dir)[2]
    files: list[str] = []
    if TRAINER_PART in parts and (step_dir / TRAINER_PART).is_dir():
        files += _walk_files(step_dir / TRAINER_PART, step_dir)
    if ORCHESTRATOR_PART in parts and (step_dir / ORCHESTRATOR_FILE).is_file():
        files.append(ORCHESTRATOR_FILE)
    return files


# -- write ------------------------------------------------------------------------------------
def write_manifest(step_dir: AnyPath | str, on_bytes: OnBytes | None = None) -> AnyPath:
    """Hash every file of the step's parts and write ``<step_dir>/manifest.json`` atomically.

    Call on one process (rank 0) after the step's data is durable; an existing manifest is
    replaced. Returns the manifest's path.

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
    entries = []
    for rel in files:
        size, digest = hash_file(step_dir / rel, on_bytes)
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


# -- verify -----------------------------------------------------------------------------------
@dataclass
class VerifyReport:
    """Result of checking one step directory.

    Attributes:
        path: the step directory.
        kind: ``"checkpoint"`` or ``"weights"``.
        step: N of ``step_<N>`` (None if the name does not parse).
        status: ``"ok"``, ``"failed"`` (a problem found), ``"no manifest"`` (no ``manifest.json``
            and nothing else wrong) or ``"incomplete"`` (the step is not complete; not checked
            further than its structure).
        manifest: whether a ``manifest.json`` was found.
        files_checked / bytes_checked: files and bytes re-hashed against the manifest.
        problems: one line each, ``<path>: <what>`` (mismatched, missing, extra, unreadable ...).
        unverified: files present but not covered by the manifest (a part written after it,
            e.g. ``orchestrator.pt``); structurally checked, not checksummed.
    """

    path: str
    kind: str
    step: int | None
    status: str = "ok"
    manifest: bool = False
    files_checked: int = 0
    bytes_checked: int = 0
    problems: list[str] = field(default_factory=list)
    unverified: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return self.status == "ok"

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def verify_manifest(step_dir: AnyPath | str, on_bytes: OnBytes | None = None) -> VerifyReport:
    """Re-hash the files ``manifest.json`` lists; report mismatched, missing and extra files.

    Without a manifest the report has ``manifest=False`` and status ``"no manifest"``. A manifest
    that cannot be read is a problem (status ``"failed"``).
    """
    step_dir = to_path(step_dir)
    kind = "weights" if _is_weights_dir(step_dir) else "checkpoint"
    report = VerifyReport(path=str(step_dir), kind=kind, step=parse_step(step_dir.name))
    try:
        m = read_manifest(step_dir)
    except ManifestError as e:
        report.manifest = True
        report.problems.append(str(e))
        report.status = "failed"
        return report
    if m is None:
        report.status = "no manifest"
        return report
    report.manifest = True
    if report.step is not None and m.get("step") is not None and m["step"] != report.step:
        # e.g. `cp -a step_45 step_60`: every file matches its checksum, but the step is not 60
        report.problems.append(
            f"{step_dir / MANIFEST_FILE}: records step {m['step']}, but the directory is {step_dir.name} (copied or renamed?)"
        )
    listed = {f["path"]: f for f in m["files"]}
    for rel, entry in listed.items():
        try:
            p = manifest_entry_path(step_dir, rel)
        except ManifestError as e:  # never opened: it is not part of this step
            report.problems.append(str(e))
            continue
        if not p.is_file():
            report.problems.append(f"{p}: missing (listed in {MANIFEST_FILE})")
            continue
        try:
            size, digest = hash_file(p, on_bytes)
        except OSError as e:
            report.problems.append(f"{p}: cannot read ({e.strerror or type(e).__name__})")
            continue
        report.files_checked += 1
        report.bytes_checked += size
        if size != entry["size"]:
            report.problems.append(f"{p}: size {size} != {entry['size']} in {MANIFEST_FILE} (truncated or rewritten)")
        elif digest != entry[ALGORITHM]:
            report.problems.append(f"{p}: checksum mismatch ({ALGORITHM} {digest} != {entry[ALGORITHM]} in {MANIFEST_FILE})")
    parts = [str(p) for p in m.get("parts", [])] or [TRAINER_PART, ORCHESTRATOR_PART]
    for rel in _files_of_parts(step_dir, kind, parts):
        if rel not in listed:
            report.problems.append(f"{step_dir / rel}: extra file, not in {MANIFEST_FILE}")
    if kind == "checkpoint":
        for part, rel in ((TRAINER_PART, TRAINER_PART), (ORCHESTRATOR_PART, ORCHESTRATOR_FILE)):
            if part not in parts and (step_dir / rel).exists():
                report.unverified.append(str(step_dir / rel))
    report.status = "failed" if report.problems else "ok"
    return report


# -- structural checks (no manifest needed, no tensor data read) -------------------------------
def _check_trainer(trainer_dir: AnyPath, problems: list[str]) -> None:
    from prime_ckpt.dcp_metadata import MetadataError, read_dcp_metadata

    try:
        md = read_dcp_metadata(trainer_dir)
    except MetadataError as e:
        problems.append(str(e))
        return
    need: dict[str, int] = {}
    storage = md.storage_data if isinstance(md.storage_data, dict) else {}
    for info in storage.values():
        rel = getattr(info, "relative_path", None)
        if isinstance(rel, str):
            end = int(getattr(info, "offset", 0) or 0) + int(getattr(info, "length", 0) or 0)
            need[rel] = max(need.get(rel, 0), end)
    for rel, end in sorted(need.items()):
        p = trainer_dir / rel
        try:
            size = p.stat().st_size
        except FileNotFoundError:
            problems.append(f"{p}: missing (referenced by {DCP_METADATA_FILE})")
            continue
        if size < end:
            problems.append(f"{p}: truncated ({size} bytes, {DCP_METADATA_FILE} references up to byte {end})")
    for rel in _walk_files(trainer_dir, trainer_dir):
        if rel != DCP_METADATA_FILE and rel not in need:
            problems.append(f"{trainer_dir / rel}: not referenced by {DCP_METADATA_FILE} (stale or foreign file)")


def _check_orchestrator(path: AnyPath, problems: list[str]) -> None:
    from prime_ckpt.orchestrator import ProgressRecordError, load_progress

    try:
        load_progress(path)
    except (ProgressRecordError, OSError) as e:
        problems.append(str(e))


def safetensors_header(path: AnyPath) -> tuple[dict[str, Any], int]:
    """``(header, expected file size)`` of a safetensors file, reading only its header.

    Raises ``ValueError`` (one line, names the file) for a file that is not safetensors.
    """
    with to_path(path).open("rb") as f:
        raw = f.read(8)
        if len(raw) < 8:
            raise ValueError(f"{path}: not a safetensors file (shorter than its 8-byte header length)")
        (n,) = struct.unpack("<Q", raw)
        if n > 100_000_000:
            raise ValueError(f"{path}: not a safetensors file (header length {n})")
        text = f.read(n)
    try:
        header = json.loads(text)
        end = max((int(v["data_offsets"][1]) for k, v in header.items() if k != "__metadata__"), default=0)
    except (ValueError, KeyError, TypeError, IndexError, AttributeError, RecursionError):
        raise ValueError(f"{path}: not a safetensors file (unreadable header)") from None
    if (why := header_problem(header)) is not None:
        raise ValueError(f"{path}: not a valid safetensors file ({why})")
    return header, 8 + n + end


def header_problem(header: dict[str, Any]) -> str | None:
    """Why a parsed safetensors header is inconsistent, or None (pure; the rules the
    ``safetensors`` library enforces when it opens a file, checked before it does so that a
    bad file is one line naming the tensor): every entry has a dtype name, a shape of
    non-negative ints, and ``data_offsets`` ``[begin, end]`` with ``end - begin`` = numel x
    element size (for the dtypes :data:`prime_ckpt.inspection.SAFETENSORS_DTYPES` knows); the entries, in offset order, tile the data from byte 0 with no gap or overlap.
    """
    from prime_ckpt.dcp_metadata import DTYPES
    from prime_ckpt.inspection import SAFETENSORS_DTYPES

    spans = []
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        if not isinstance(entry, dict):
            return f"tensor {name!r}: not an object"
        shape, offsets, dtype = entry.get("shape"), entry.get("data_offsets"), entry.get("dtype")
        if not isinstance(shape, list) or not all(isinstance(s, int) and not isinstance(s, bool) and s >= 0 for s in shape):
            return f"tensor {name!r}: shape {shape!r} is not a list of non-negative ints"
        if not (isinstance(offsets, list) and len(offsets) == 2 and all(isinstance(o, int) and not isinstance(o, bool) for o in offsets)
                and 0 <= offsets[0] <= offsets[1]):
            return f"tensor {name!r}: data_offsets {offsets!r} are not [begin, end] with 0 <= begin <= end"
        if not isinstance(dtype, str):
            return f"tensor {name!r}: dtype {dtype!r} is not a string"
        stand_in = DTYPES.get(SAFETENSORS_DTYPES.get(dtype, ""))  # None: a dtype newer than this table
        numel = 1
        for s in shape:
            numel *= s
        if stand_in is not None and offsets[1] - offsets[0] != numel * stand_in.itemsize:
            return (f"tensor {name!r}: data_offsets {offsets} hold {offsets[1] - offsets[0]} bytes, "
                    f"but shape {shape} {dtype} needs {numel * stand_in.itemsize}")
        spans.append((offsets[0], offsets[1], name))
    at = 0
    for begin, end, name in sorted(spans):
        if begin != at:
            return f"tensor {name!r}: data_offsets start at {begin}, expected {at} ({'overlap' if begin < at else 'gap'})"
        at = end
    return None


def _check_weights(step_dir: AnyPath, problems: list[str]) -> None:
    from prime_ckpt.layout import MODEL_FILE, weights_files

    try:
        files = weights_files(step_dir)
    except ValueError as e:
        problems.append(str(e))
        return
    for p in files or [step_dir / MODEL_FILE]:
        if not p.is_file():
            problems.append(f"{p}: missing")
            continue
        try:
            _, expected = safetensors_header(p)
        except (ValueError, OSError) as e:
            problems.append(str(e) if isinstance(e, ValueError) else f"{p}: cannot read ({e.strerror})")
            continue
        size = p.stat().st_size
        if size != expected:
            problems.append(f"{p}: size {size} != {expected} declared by its header (truncated?)")


def verify_step(
    step_dir: AnyPath | str,
    *,
    parts: tuple[str, ...] | None = None,
    allow_missing_manifest: bool = False,
    on_bytes: OnBytes | None = None,
) -> VerifyReport:
    """Check one ``checkpoints/step_<N>`` or ``weights/step_<N>``: manifest and structure.

    Args:
        step_dir: the step directory.
        parts: the parts a checkpoint step needs to be complete (default: judged from the run,
            see :func:`prime_ckpt.layout.detect_parts`).
        allow_missing_manifest: a step without ``manifest.json`` whose structure is sound is
            ``"ok"`` instead of ``"no manifest"``.
        on_bytes: progress callback (bytes hashed).
    """
    step_dir = to_path(step_dir)
    report = verify_manifest(step_dir, on_bytes)
    structural: list[str] = []
    incomplete = False
    if report.kind == "weights":
        if not (step_dir / WEIGHTS_MARKER).is_file():
            incomplete = True
            structural.append(f"{step_dir}: no {WEIGHTS_MARKER} marker (weights not finished?)")
        _check_weights(step_dir, structural)
    else:
        if parts is None:
            parts = detect_parts(scan_checkpoints(step_dir.parent.parent)) if step_dir.parent.name == CHECKPOINTS_DIR else ()
        trainer_dir = step_dir / TRAINER_PART
        orch = step_dir / ORCHESTRATOR_FILE
        if not trainer_dir.is_dir():
            incomplete = True
            structural.append(f"{step_dir}: no {TRAINER_PART}/ directory")
        elif not (trainer_dir / DCP_METADATA_FILE).is_file():
            incomplete = True
            structural.append(f"{trainer_dir}: {DCP_METADATA_FILE} missing (save did not finish?)")
        else:
            _check_trainer(trainer_dir, structural)
        if orch.is_file():
            _check_orchestrator(orch, structural)
        elif ORCHESTRATOR_PART in (parts or ()):
            incomplete = True
            structural.append(f"{orch}: missing (the run writes orchestrator records)")
    for p in structural:
        if p not in report.problems:
            report.problems.append(p)
    if incomplete:
        report.status = "incomplete"
    elif report.problems:
        report.status = "failed"
    elif not report.manifest:
        report.status = "ok" if allow_missing_manifest else "no manifest"
        if not allow_missing_manifest:
            report.problems.append(f"{step_dir}: no {MANIFEST_FILE} (checksums cannot be verified; --allow-missing-manifest to accept)")
    else:
        report.status = "ok"
    return report


def verify_targets(path: AnyPath | str) -> list[AnyPath]:
    """The step directories :func:`verify_path` checks for ``path``, in (kind, step) order.

    Raises:
        VerifyTargetError: ``path`` is missing, not a directory, not a checkpoint, or holds no
            step directories.
    """
    path = to_path(path)
    if not path.exists():
        raise VerifyTargetError(f"{path}: {missing_reason(path)}")
    if not path.is_dir():
        raise VerifyTargetError(f"{path}: not a directory (expected a run output dir or a step_<N> dir)")
    if parse_step(path.name) is not None:
        return [path]
    if path.name == TRAINER_PART and parse_step(path.parent.name) is not None:
        return [path.parent]
    if path.name == CHECKPOINTS_DIR:
        targets = [c.path for c in scan_checkpoints(path.parent)]
    elif path.name == WEIGHTS_DIR:
        targets = [w.path for w in scan_weights(path.parent)]
    elif (path / CHECKPOINTS_DIR).is_dir() or (path / WEIGHTS_DIR).is_dir():
        targets = [c.path for c in scan_checkpoints(path)] + [w.path for w in scan_weights(path)]
    else:
        raise VerifyTargetError(f"{path}: not a checkpoint (expected a run output dir, checkpoints/, weights/ or a step_<N> dir)")
    if not targets:
        raise VerifyTargetError(f"{path}: no step_<N> directories to verify")
    return targets


def verify_path(
    path: AnyPath | str,
    *,
    allow_missing_manifest: bool = False,
    on_bytes: OnBytes | None = None,
) -> list[VerifyReport]:
    """:func:`verify_step` for every step under ``path`` (see :func:`verify_targets`)."""
    return [
        verify_step(target, allow_missing_manifest=allow_missing_manifest, on_bytes=on_bytes)
        for target in verify_targets(path)
    ]


def all_ok(reports: list[VerifyReport], complete_only: bool = False) -> bool:
    """True iff every report is ``"ok"`` (``"incomplete"`` tolerated with ``complete_only``)."""
    return all(r.ok or (complete_only and r.status == "incomplete") for r in reports)
