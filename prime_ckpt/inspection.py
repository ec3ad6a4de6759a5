"""What is on disk at a path, read-only: the library behind ``prime-ckpt inspect``.

:func:`describe` identifies what a path is and returns a structured, JSON-ready result:

* a run output dir (has ``checkpoints/`` or ``weights/``), a ``checkpoints/`` dir or a
  ``weights/`` dir -> :class:`RunListing` (steps and completeness; no tensor tables);
* ``checkpoints/step_<N>`` -> :class:`CheckpointStepInfo` (parts, orchestrator progress record,
  ``save_info.json``, and the trainer's tensor table);
* ``checkpoints/step_<N>/trainer`` (any DCP dir) -> :class:`TrainerDirInfo`;
* ``weights/step_<N>`` -> :class:`WeightsStepInfo` (files, ``config.json``, marker, tensors from
  the safetensors header).

Tensor tables come from metadata only: DCP's ``.metadata`` (read through
:func:`prime_ckpt.dcp_metadata.read_dcp_metadata`, never plain pickle) and the safetensors
header. No tensor data is read and nothing is written. Completeness is
:mod:`prime_ckpt.layout`'s, so nothing incomplete is reported as complete.

Every path may be a local path, an fsspec URL (``s3://bucket/run/checkpoints/step_10``) or a
UPath carrying storage options (:func:`prime_ckpt.storage.to_path`): every read goes through the
path API, the inventory scans of :mod:`prime_ckpt.layout` or one uncached directory listing
(remote), never through local-only calls.

This module does not import torch (nor does anything it calls, unless torch is already
imported): ``.metadata`` is read into torch-free stand-ins, the safetensors header is parsed
from its JSON (:func:`prime_ckpt.manifest.safetensors_header`) and ``orchestrator.pt`` with
:func:`prime_ckpt.orchestrator.load_progress`'s torch-free reader, so ``prime-ckpt inspect`` /
``list`` start in a fraction of a second. The same code works on DCP's own metadata classes, for
callers that have torch imported.
"""

from __future__ import annotations

import fnmatch
import json
import os
import posixpath
import re
from dataclasses import asdict, dataclass, field, fields
from typing import Any

from prime_ckpt.dcp_metadata import (
    DTYPES,
    has_dcp_metadata,
    is_bytes_entry,
    is_tensor_entry,
    rank_metadata_files,
    read_dcp_metadata,
)
from prime_ckpt.errors import PrimeCkptError
from prime_ckpt.foreign import titan_folder, titan_step, titan_step_parent
from prime_ckpt.layout import (
    CHECKPOINTS_DIR,
    CONFIG_FILE,
    DCP_METADATA_FILE,
    MODEL_FILE,
    ORCHESTRATOR_FILE,
    SAFETENSORS_INDEX_FILE,
    SAVE_INFO_FILE,
    TRAINER_PART,
    WEIGHTS_DIR,
    WEIGHTS_MARKER,
    detect_parts,
    orchestrator_part_complete,
    parse_step,
    scan_checkpoints,
    scan_weights,
    trainer_part_complete,
    trainer_part_problem,
    weights_complete,
    weights_files,
)
from prime_ckpt.orchestrator import ProgressRecordError, load_progress
from prime_ckpt.storage import AnyPath, is_remote, missing_reason, refresh, remote_errors, to_path

#: Version tag of the JSON that :func:`describe` results serialise to (``to_dict()``).
SCHEMA = "prime-ckpt.inspect/1"


_DISTCP_RE = re.compile(r"^__(\d+)_(\d+)\.distcp$")

#: safetensors dtype -> name of the torch dtype (``getattr(torch, name)``; without torch,
#: ``dcp_metadata.DTYPES[name]`` has its element size).
SAFETENSORS_DTYPES: dict[str, str] = {
    "BOOL": "bool", "U8": "uint8", "I8": "int8", "I16": "int16", "I32": "int32", "I64": "int64",
    "F16": "float16", "BF16": "bfloat16", "F32": "float32", "F64": "float64", "U16": "uint16",
    "U32": "uint32", "U64": "uint64", "F8_E4M3": "float8_e4m3fn", "F8_E5M2": "float8_e5m2",
}  # fmt: skip

_EXPECTED = (
    "expected a run output dir (with checkpoints/ or weights/), a checkpoints/ or weights/ dir, "
    "a step_<N> dir, a trainer/ or other DCP dir, a torchtitan checkpoint folder, or safetensors"
)


class InspectError(PrimeCkptError, ValueError):
    """The path is missing or not something :func:`describe` knows (one line, names the path)."""


# -- result types ---------------------------------------------------------------------------
@dataclass
class TensorEntry:
    """One tensor: fully-qualified name, global shape, dtype (``"float32"``), bytes of the global
    tensor (numel * element size), number of stored chunks (``sharded`` iff > 1)."""

    name: str
    shape: list[int]
    dtype: str
    bytes: int
    chunks: int = 1
    sharded: bool = False


@dataclass
class BytesEntry:
    """One non-tensor (pickled value) entry of a DCP checkpoint; ``stored_bytes`` is its size in
    the data file (``None`` if the metadata does not say)."""

    name: str
    stored_bytes: int | None


@dataclass
class KeyTotals:
    """Totals of one top-level key (``app.model``, ``app.optimizer`` ...)."""

    tensors: int = 0
    bytes: int = 0
    sharded: int = 0
    non_tensors: int = 0


@dataclass
class StorageFile:
    """A ``__<rank>_<n>.distcp`` data file referenced by the metadata (``size`` from ``stat``)."""

    name: str
    rank: int | None
    exists: bool
    size: int | None


@dataclass
class TrainerPartInfo:
    """A DCP directory. When ``complete`` is False (no ``.metadata``) the table fields are None."""

    path: str
    complete: bool
    world_size: int | None = None
    storage_files: list[StorageFile] | None = None
    tensors: list[TensorEntry] | None = None
    non_tensors: list[BytesEntry] | None = None
    totals: dict[str, KeyTotals] | None = None
    total_bytes: int | None = None
    #: ``[".metadata"]``, or the per-rank ``__<rank>.metadata`` files of a save without
    #: collectives (``dcp.save(..., use_collectives=False)``), merged into one table
    metadata_files: list[str] | None = None


@dataclass
class StepSummary:
    """One ``checkpoints/step_<N>`` in a listing; ``complete`` iff every part the run writes is
    (``layout.detect_parts``: a trainer-only run needs only ``trainer``)."""

    step: int
    path: str
    complete: bool
    parts: dict[str, bool]
    present: list[str]


@dataclass
class WeightsSummary:
    """One ``weights/step_<N>`` in a listing; ``complete`` iff its ``COMPLETE`` marker exists."""

    step: int
    path: str
    complete: bool


@dataclass
class RunListing:
    """kind ``run`` (output dir), ``checkpoints`` or ``weights`` (a listing; no tensor tables)."""

    kind: str
    path: str
    checkpoints: list[StepSummary] | None
    weights: list[WeightsSummary] | None
    latest_complete_step: int | None
    ignored: list[str] = field(default_factory=list)
    #: why each ignored entry is not a step (leftover, symlink, file, other name)
    ignored_reasons: dict[str, str] = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)


@dataclass
class CheckpointStepInfo:
    """kind ``checkpoint_step``: one ``checkpoints/step_<N>``."""

    kind: str
    path: str
    step: int | None
    complete: bool
    parts: dict[str, bool]
    present: list[str]
    save_info: dict[str, Any] | None
    orchestrator: dict[str, Any] | None
    trainer: TrainerPartInfo | None
    filter: str | None = None
    problems: list[str] = field(default_factory=list)


@dataclass
class TrainerDirInfo:
    """kind ``trainer``: a DCP directory pointed at directly."""

    kind: str
    path: str
    step: int | None
    trainer: TrainerPartInfo
    filter: str | None = None
    problems: list[str] = field(default_factory=list)


@dataclass
class WeightsStepInfo:
    """kind ``weights_step``: one ``weights/step_<N>``."""

    kind: str
    path: str
    step: int | None
    complete: bool
    files: list[dict[str, Any]]
    config: dict[str, Any] | None
    tensors: list[TensorEntry] | None
    total_bytes: int | None
    filter: str | None = None
    problems: list[str] = field(default_factory=list)


Description = RunListing | CheckpointStepInfo | TrainerDirInfo | WeightsStepInfo


def to_dict(result: Description) -> dict[str, Any]:
    """The JSON-ready form of a :func:`describe` result, tagged with ``"schema": SCHEMA``."""
    return {"schema": SCHEMA, **asdict(result)}


# -- helpers --------------------------------------------------------------------------------
def dtype_name(dtype: Any) -> str:
    """``torch.float32`` (a ``torch.dtype`` or its stand-in ``dcp_metadata.DType``) -> ``"float32"``."""
    return str(dtype).removeprefix("torch.")


def _numel(shape: list[int]) -> int:
    n = 1
    for s in shape:
        n *= int(s)
    return n


def top_level_key(fqn: str) -> str:
    """The first two dotted components (``app.model.0.weight`` -> ``app.model``)."""
    return ".".join(fqn.split(".")[:2])


def _matches(name: str, pattern: str | None) -> bool:
    return pattern is None or fnmatch.fnmatchcase(name, pattern)


def _remote_entries(directory: AnyPath) -> dict[str, int | None]:
    """The direct children of a remote directory from one uncached listing: name -> size of a
    file, ``None`` for a subdirectory (``{}`` if nothing is there)."""
    refresh(directory)
    base = directory.path.rstrip("/")
    with remote_errors(directory):
        try:
            found = directory.fs.ls(base, detail=True)
        except FileNotFoundError:
            return {}
    out: dict[str, int | None] = {}
    for info in found:
        name = str(info.get("name", "")).rstrip("/")
        if name == base or not name.startswith(base + "/"):
            continue
        out[posixpath.basename(name)] = None if info.get("type") == "directory" else int(info.get("size") or 0)
    return out


def _read_json(path: AnyPath, problems: list[str]) -> dict[str, Any] | None:
    if not path.is_file():
        return None
    try:
        value = json.loads(path.read_text())
    except (OSError, ValueError, RecursionError) as e:
        problems.append(f"{path}: not readable JSON ({type(e).__name__})")
        return None
    if not isinstance(value, dict):
        problems.append(f"{path}: not a JSON object")
        return None
    return value


def _is_int(v: Any, low: int) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= low


def _is_seconds(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and v >= 0 and v == v and v != float("inf")


#: The fields of the trainer's ``save_info.json`` (:class:`prime_ckpt.trainer.SaveRecord`) that
#: `inspect` and `list` show, with the rule each value must satisfy and its description.
_SAVE_INFO_RULES: dict[str, tuple[Any, str]] = {
    "step": (lambda v: _is_int(v, 0), "a step (int >= 0)"),
    "mode": (lambda v: v in ("sync", "async"), '"sync" or "async"'),
    "world_size": (lambda v: _is_int(v, 1), "a world size (int >= 1)"),
    "async_level": (lambda v: _is_int(v, 0), "an async level (int >= 0)"),
    "bytes": (lambda v: _is_int(v, 0), "bytes (int >= 0)"),
    "total_bytes": (lambda v: _is_int(v, 0), "bytes (int >= 0)"),
    **{k: (lambda v: v is None or _is_seconds(v), "seconds (a number >= 0)")
       for k in ("wait_previous_s", "staging_s", "blocking_s", "upload_s", "total_s")},
    "error": (lambda v: v is None or isinstance(v, str), "text or null"),
    "run_id": (lambda v: v is None or isinstance(v, str), "text or null"),
}  # fmt: skip


def save_info_problems(info: dict[str, Any], where: AnyPath | str) -> list[str]:
    """One line per field of a parsed ``save_info.json`` whose value has the wrong type or range
    (pure; unknown fields are not judged). The values are still shown, with these lines."""
    problems = []
    for name, (ok, expected) in _SAVE_INFO_RULES.items():
        if name in info and not ok(info[name]):
            problems.append(f"{where}: field {name!r} is {info[name]!r} ({type(info[name]).__name__}), expected {expected}")
    return problems


def read_save_info(path: AnyPath, problems: list[str]) -> dict[str, Any] | None:
    """A step's ``save_info.json`` (None when absent or unreadable, with a problem recorded), its
    field values checked by :func:`save_info_problems`."""
    info = _read_json(path, problems)
    if info is not None:
        problems += save_info_problems(info, path)
    return info


# -- trainer (DCP) --------------------------------------------------------------------------
def describe_trainer_part(trainer_dir: AnyPath | str, name_filter: str | None = None) -> TrainerPartInfo:
    """Tensor table of a DCP directory from its ``.metadata`` alone.

    Returns ``complete=False`` and no table when ``.metadata`` is absent (save not finished).
    Raises :class:`prime_ckpt.dcp_metadata.MetadataError` (or its ``UnsafeMetadataError``) when
    ``.metadata`` exists but cannot be read safely.
    """
    trainer_dir = to_path(trainer_dir)
    refresh(trainer_dir / DCP_METADATA_FILE)
    if not has_dcp_metadata(trainer_dir):
        return TrainerPartInfo(path=str(trainer_dir), complete=False)
    per_rank = [p.name for p in rank_metadata_files(trainer_dir)] if not (trainer_dir / DCP_METADATA_FILE).is_file() else []
    md = read_dcp_metadata(trainer_dir)
    listed = _remote_entries(trainer_dir) if is_remote(trainer_dir) else {}
    storage = md.storage_data if isinstance(md.storage_data, dict) else {}
    # non-tensor entries are stored under MetadataIndex(fqn) (offset None); other keys are chunks
    bytes_info = {k.fqn: v for k, v in storage.items() if getattr(k, "offset", 0) is None and isinstance(getattr(k, "fqn", None), str)}

    files: dict[str, StorageFile] = {}
    for info in storage.values():
        rel = getattr(info, "relative_path", None)
        if not isinstance(rel, str) or rel in files:
            continue
        m = _DISTCP_RE.match(rel)
        size: int | None = listed.get(rel)
        if size is None:  # local, or not in the remote listing (missing, or below a subdirectory)
            try:
                size = (trainer_dir / rel).stat().st_size
            except OSError:
                size = None
        files[rel] = StorageFile(name=rel, rank=int(m.group(1)) if m else None, exists=size is not None, size=size)
    ranks = {f.rank for f in files.values() if f.rank is not None}

    tensors: list[TensorEntry] = []
    non_tensors: list[BytesEntry] = []
    totals: dict[str, KeyTotals] = {}
    for fqn, entry in md.state_dict_metadata.items():
        if not _matches(fqn, name_filter):
            continue
        key = totals.setdefault(top_level_key(fqn), KeyTotals())
        if is_tensor_entry(entry):
            shape = [int(s) for s in entry.size]
            dtype = entry.properties.dtype
            nbytes = _numel(shape) * dtype.itemsize
            chunks = len(entry.chunks)
            tensors.append(TensorEntry(fqn, shape, dtype_name(dtype), nbytes, chunks, chunks > 1))
            key.tensors += 1
            key.bytes += nbytes
            key.sharded += chunks > 1
        elif is_bytes_entry(entry):
            info = bytes_info.get(fqn)
            non_tensors.append(BytesEntry(fqn, getattr(info, "length", None)))
            key.non_tensors += 1
    return TrainerPartInfo(
        path=str(trainer_dir),
        complete=True,
        world_size=len(ranks) or None,
        storage_files=sorted(files.values(), key=lambda f: (f.rank is None, f.rank or 0, f.name)),
        tensors=tensors,
        non_tensors=non_tensors,
        totals=totals,
        total_bytes=sum(t.bytes for t in tensors),
        metadata_files=per_rank or [DCP_METADATA_FILE],
    )


def _storage_problems(trainer: TrainerPartInfo) -> list[str]:
    return [
        f"{trainer.path}/{f.name}: referenced by {DCP_METADATA_FILE} but missing"
        for f in trainer.storage_files or []
        if not f.exists
    ]


def describe_checkpoint_step(step_dir: AnyPath | str, name_filter: str | None = None) -> CheckpointStepInfo:
    """One ``checkpoints/step_<N>``: parts, progress record, save record, tensor table.

    Raises:
        InspectError: the directory has no ``trainer/`` part.
        MetadataError: ``trainer/.metadata`` exists but cannot be read safely.
    """
    step_dir = to_path(step_dir)
    trainer_dir = step_dir / TRAINER_PART
    orch_path = step_dir / ORCHESTRATOR_FILE
    if not trainer_dir.is_dir():
        has_orch = orch_path.is_file()
        raise InspectError(
            f"{step_dir}: no {TRAINER_PART}/ directory, not a trainer checkpoint "
            f"({ORCHESTRATOR_FILE}: {'present' if has_orch else 'absent'})"
        )
    problems: list[str] = []
    # the same completeness as `list` and resume (marks that parse, data files that hold their bytes)
    parts = {TRAINER_PART: trainer_part_complete(trainer_dir), "orchestrator": orchestrator_part_complete(orch_path)}
    present = [TRAINER_PART] + (["orchestrator"] if orch_path.exists() else [])
    orchestrator = None
    if orch_path.is_file():
        try:
            orchestrator = asdict(load_progress(orch_path))
        except (ProgressRecordError, OSError) as e:
            problems.append(str(e))
    trainer = describe_trainer_part(trainer_dir, name_filter)
    if not trainer.complete:
        problems.append(f"{trainer_dir}: {DCP_METADATA_FILE} missing (save did not finish?)")
    problems += _storage_problems(trainer)
    if trainer.complete and not _storage_problems(trainer) and (why := trainer_part_problem(trainer_dir)) is not None:
        problems.append(f"{trainer_dir}: {why}")  # e.g. a truncated data file
    return CheckpointStepInfo(
        kind="checkpoint_step",
        path=str(step_dir),
        step=parse_step(step_dir.name),
        complete=all(parts.get(p, False) for p in _run_parts(step_dir.parent.parent)),
        parts=parts,
        present=present,
        save_info=read_save_info(step_dir / SAVE_INFO_FILE, problems),
        orchestrator=orchestrator,
        trainer=trainer,
        filter=name_filter,
        problems=problems,
    )


# -- weights --------------------------------------------------------------------------------
def describe_weights_step(step_dir: AnyPath | str, name_filter: str | None = None) -> WeightsStepInfo:
    """One ``weights/step_<N>``: files, ``config.json``, marker, tensors from the safetensors
    header (only the header is read, never tensor data; torch is not imported)."""
    step_dir = to_path(step_dir)
    problems: list[str] = []
    if is_remote(step_dir):
        files = [{"name": n, "size": size} for n, size in sorted(_remote_entries(step_dir).items()) if size is not None]
    else:
        files = [
            {"name": entry.name, "size": entry.stat().st_size}
            for entry in sorted(step_dir.iterdir(), key=lambda e: e.name)
            if not entry.is_symlink() and entry.is_file()
        ]
    complete = weights_complete(step_dir)
    if not complete:
        problems.append(f"{step_dir}: no {WEIGHTS_MARKER} marker (weights not finished?)")
    tensors: list[TensorEntry] | None = None
    sizes = {f["name"]: f["size"] for f in files}
    try:
        shard_files = weights_files(step_dir)
    except ValueError as e:  # an unreadable index: one line, names it
        problems.append(str(e))
        shard_files = []
    for model in shard_files:
        if model.name not in sizes:
            if complete:
                problems.append(f"{model}: missing")
            continue
        found = _safetensors_tensors(model, sizes.get(model.name), name_filter, problems)
        if found is not None:
            tensors = sorted((tensors or []) + found, key=lambda t: t.name)
    if not shard_files and complete:
        problems.append(f"{step_dir / MODEL_FILE}: missing")
    return WeightsStepInfo(
        kind="weights_step",
        path=str(step_dir),
        step=parse_step(step_dir.name),
        complete=complete,
        files=files,
        config=_read_json(step_dir / CONFIG_FILE, problems),
        tensors=tensors,
        total_bytes=sum(t.bytes for t in tensors) if tensors is not None else None,
        filter=name_filter,
        problems=problems,
    )


def describe_safetensors_file(file: AnyPath | str, name_filter: str | None = None) -> WeightsStepInfo:
    """A bare ``.safetensors`` file (any producer): its tensor table from the header, as for a
    weights step (``kind`` ``"safetensors_file"``, ``step`` None, ``complete`` = the header reads
    and the size matches it). Only the header is read."""
    from prime_ckpt.foreign import rank_shard_info
    from prime_ckpt.manifest import safetensors_header

    file = to_path(file)
    problems: list[str] = []
    size = file.stat().st_size
    tensors = _safetensors_tensors(file, size, name_filter, problems)
    if tensors is None:  # the header does not read: nothing to show (exit 2, as unreadable .metadata)
        raise InspectError(problems[0])
    try:
        if tensors is not None and rank_shard_info(file.name, safetensors_header(file)[0]) is not None:
            problems.append(f"{file}: one rank's shard written by DCP's HuggingFaceStorageWriter (DCP_SHARDING_INFO): "
                            "shapes are that rank's slices, not the model's")
    except ValueError as e:
        problems.append(f"{file}: {e}")
    return WeightsStepInfo(
        kind="safetensors_file",
        path=str(file),
        step=None,
        complete=not problems,
        files=[{"name": file.name, "size": size}],
        config=None,
        tensors=tensors,
        total_bytes=sum(t.bytes for t in tensors) if tensors is not None else None,
        filter=name_filter,
        problems=problems,
    )


def _safetensors_tensors(
    model: AnyPath, size: int | None, name_filter: str | None, problems: list[str]
) -> list[TensorEntry] | None:
    """The tensor table of a safetensors file from its header (sorted by name), or ``None``
    with a problem recorded when the header cannot be read. ``size`` (the file's, if known) is
    checked against the size the header declares."""
    from prime_ckpt.manifest import safetensors_header

    try:
        header, expected = safetensors_header(model)
    except ValueError as e:  # one line, names the file
        problems.append(str(e))
        return None
    except OSError as e:
        problems.append(f"{model}: cannot read ({e.strerror or type(e).__name__})")
        return None
    if size is not None and size != expected:
        problems.append(f"{model}: size {size} != {expected} declared by its header (truncated?)")
    tensors = []
    try:
        for name in sorted(k for k in header if k != "__metadata__"):
            if not _matches(name, name_filter):
                continue
            shape = [int(s) for s in header[name]["shape"]]
            st_dtype = str(header[name]["dtype"])
            dtype = DTYPES.get(SAFETENSORS_DTYPES.get(st_dtype, ""))
            nbytes = _numel(shape) * dtype.itemsize if dtype is not None else 0
            if dtype is None:
                problems.append(f"{model}: tensor {name!r}: unknown dtype {st_dtype!r} (size not counted; convert/diff refuse it)")
            tensors.append(TensorEntry(name, shape, dtype_name(dtype) if dtype else st_dtype, nbytes))
    except (ValueError, KeyError, TypeError, AttributeError) as e:
        problems.append(f"{model}: unreadable safetensors header ({type(e).__name__}: {' '.join(str(e).split())})")
        return None
    return tensors


def _shard_note(where: AnyPath) -> str:
    return (f"{where}: rank shards written by DCP's HuggingFaceStorageWriter (save_distributed, not consolidated): "
            "shapes are assembled from DCP_SHARDING_INFO; convert/diff need the consolidated model-*.safetensors")


def describe_safetensors_dir(path: AnyPath | str, name_filter: str | None = None) -> WeightsStepInfo:
    """A directory of safetensors files from any producer (kind ``"safetensors_dir"``, ``step``
    None): an HF checkpoint (``model.safetensors`` or ``model-*-of-*.safetensors`` + index, e.g.
    DCP's ``HuggingFaceStorageWriter`` consolidated, torchtitan's ``last_save_in_hf``), or the
    per-rank ``shard-*`` files of an unconsolidated distributed HF-writer save, whose full shapes
    are assembled from each header's ``DCP_SHARDING_INFO`` (:mod:`prime_ckpt.foreign`) and which
    carries a problem saying it is not a model yet. ``complete``: every header reads and matches
    its file's size. Only headers are read."""
    from prime_ckpt.foreign import assembled_shapes, rank_shard_info
    from prime_ckpt.manifest import safetensors_header

    path = to_path(path)
    problems: list[str] = []
    try:
        files = weights_files(path)
    except ValueError as e:
        files, problems = [], [str(e)]
    listed = [{"name": f.name, "size": f.stat().st_size} for f in files if f.is_file()]
    sizes = {f["name"]: f["size"] for f in listed}
    headers, tensors = [], []
    for f in files:
        if f.name not in sizes:
            problems.append(f"{f}: missing")
            continue
        try:
            header, expected = safetensors_header(f)
            shard = rank_shard_info(f.name, header) is not None
        except ValueError as e:
            problems.append(str(e) if str(e).startswith(str(f)) else f"{f}: {e}")
            continue
        if sizes[f.name] != expected:
            problems.append(f"{f}: size {sizes[f.name]} != {expected} declared by its header (truncated?)")
        if shard:
            headers.append(header)
        else:
            tensors += _safetensors_tensors(f, sizes[f.name], name_filter, []) or []
    complete = not problems
    if headers:
        problems.insert(0, _shard_note(path))
        for name, shape in sorted(assembled_shapes(headers).items()):
            if _matches(name, name_filter):
                st = next(h[name]["dtype"] for h in headers if name in h)
                dtype = DTYPES.get(SAFETENSORS_DTYPES.get(str(st), ""))
                tensors.append(TensorEntry(name, shape, dtype_name(dtype) if dtype else str(st),
                                           _numel(shape) * dtype.itemsize if dtype else 0,
                                           sum(name in h for h in headers), sum(name in h for h in headers) > 1))
    tensors.sort(key=lambda t: t.name)
    return WeightsStepInfo(
        kind="safetensors_dir",
        path=str(path),
        step=None,
        complete=complete,
        files=listed,
        config=_read_json(path / CONFIG_FILE, problems) if (path / CONFIG_FILE).is_file() else None,
        tensors=tensors,
        total_bytes=sum(t.bytes for t in tensors),
        filter=name_filter,
        problems=problems,
    )


def describe_titan_folder(folder: AnyPath | str) -> RunListing:
    """kind ``"torchtitan"``: a torchtitan checkpoint folder (``<dump>/checkpoint``), one row per
    ``step-<N>`` (a DCP checkpoint; ``complete`` by :func:`prime_ckpt.layout.trainer_part_problem`,
    the rule for this project's own trainer part). Read-only; nothing here is this project's."""
    from prime_ckpt.foreign import titan_steps

    folder = to_path(folder)
    steps, problems = [], []
    for n, p in titan_steps(folder):
        why = trainer_part_problem(p)
        steps.append(StepSummary(n, str(p), why is None, {"trainer": why is None}, ["trainer"]))
        if why is not None:
            problems.append(f"{p}: not complete: {why}")
    complete = [s.step for s in steps if s.complete]
    return RunListing(kind="torchtitan", path=str(folder), checkpoints=steps, weights=None,
                      latest_complete_step=max(complete) if complete else None, problems=problems)


# -- listings -------------------------------------------------------------------------------
def ignored_reasons(root: AnyPath) -> dict[str, str]:
    """``{"<root name>/<entry>": why it is not a step}`` for every entry of ``root``
    (``checkpoints/`` or ``weights/``) that is not a ``step_<int>`` directory: a crash leftover of
    this project (``.step_N.deleting.*``: a delete that did not finish; ``.<name>.tmp.*``), a
    symlink (never followed: what it points at is not this run's), a file, or another name."""
    from prime_ckpt.storage import is_leftover

    def why(name: str, is_dir: bool, is_link: bool) -> str | None:
        if is_leftover(name):
            return "leftover of an interrupted delete" if ".deleting." in name else "leftover of an interrupted write"
        if is_link:
            return "a symlink (never followed)"
        if parse_step(name) is None:
            return "not a step_<N> name"
        if not is_dir:
            return "a file, not a step directory"
        return None

    out: dict[str, str] = {}
    if is_remote(root):
        for n, size in _remote_entries(root).items():
            if (reason := why(n, size is None, False)) is not None:
                out[f"{root.name}/{n}"] = reason
        return dict(sorted(out.items()))
    if not root.is_dir():
        return {}
    for e in os.scandir(root):
        if (reason := why(e.name, e.is_dir(follow_symlinks=False), e.is_symlink())) is not None:
            out[f"{root.name}/{e.name}"] = reason
    return dict(sorted(out.items()))


def _ignored(root: AnyPath) -> list[str]:
    """``<root name>/<entry>`` for every entry of ``root`` that is not a ``step_<int>`` directory
    (see :func:`ignored_reasons` for why each one is)."""
    return list(ignored_reasons(root))


def _run_parts(output_dir: AnyPath) -> tuple[str, ...]:
    """The parts this run writes (a trainer-only run has no orchestrator records)."""
    return detect_parts(scan_checkpoints(output_dir))


def _listing(kind: str, path: AnyPath, output_dir: AnyPath, checkpoints: bool, weights: bool) -> RunListing:
    scanned = scan_checkpoints(output_dir) if checkpoints else []
    parts = detect_parts(scanned)
    steps = [
        StepSummary(c.step, str(c.path), c.complete(parts), dict(c.parts), list(c.present))
        for c in scanned
    ] if checkpoints else None  # fmt: skip
    wsteps = [WeightsSummary(w.step, str(w.path), w.complete) for w in scan_weights(output_dir)] if weights else None
    ignored = (_ignored(output_dir / CHECKPOINTS_DIR) if checkpoints else []) + (
        _ignored(output_dir / WEIGHTS_DIR) if weights else []
    )
    complete = [s.step for s in steps or [] if s.complete]
    return RunListing(
        kind=kind,
        path=str(path),
        checkpoints=steps,
        weights=wsteps,
        latest_complete_step=max(complete) if complete else None,
        ignored=ignored,
        ignored_reasons={**(ignored_reasons(output_dir / CHECKPOINTS_DIR) if checkpoints else {}),
                         **(ignored_reasons(output_dir / WEIGHTS_DIR) if weights else {})},
    )


# -- entry point ----------------------------------------------------------------------------
def describe(path: AnyPath | str, name_filter: str | None = None) -> Description:
    """Identify what ``path`` is and describe it (read-only; reads metadata, never tensor data).

    Args:
        path: a run output dir, ``checkpoints/``, ``weights/``, ``checkpoints/step_<N>``,
            ``checkpoints/step_<N>/trainer`` (or any DCP dir) or ``weights/step_<N>``; local,
            an fsspec URL or a UPath carrying storage options.
        name_filter: a glob (``fnmatch``, case-sensitive) on tensor/entry names; only matching
            entries are listed and totalled. Ignored for listings.
    Raises:
        InspectError: ``path`` is missing, not a directory, or none of the above.
        MetadataError: a DCP ``.metadata`` exists but cannot be read safely (its subclass
            ``UnsafeMetadataError`` when it references a global DCP metadata never needs).
    """
    path = to_path(path)
    if not path.exists():
        raise InspectError(f"{path}: {missing_reason(path)}")
    if not path.is_dir():
        if path.name.endswith(".safetensors"):
            return describe_safetensors_file(path, name_filter)
        raise InspectError(f"{path}: not a directory ({_EXPECTED})")
    step = parse_step(path.name)
    parent = path.parent.name
    if has_dcp_metadata(path) or (path.name == TRAINER_PART and parse_step(parent) is not None) or (
        titan_step(path.name) is not None and titan_step_parent(path)
    ):
        trainer = describe_trainer_part(path, name_filter)
        problems = [] if trainer.complete else [f"{path}: {DCP_METADATA_FILE} missing (save did not finish?)"]
        if trainer.complete and trainer.metadata_files == [DCP_METADATA_FILE] and not _storage_problems(trainer) and (
            why := trainer_part_problem(path)
        ) is not None:
            problems.append(f"{path}: {why}")  # the same completeness as `list` and resume
        return TrainerDirInfo(
            kind="trainer",
            path=str(path),
            step=parse_step(parent) if parse_step(parent) is not None else titan_step(path.name),
            trainer=trainer,
            filter=name_filter,
            problems=problems + _storage_problems(trainer),
        )
    if step is not None:
        if parent == WEIGHTS_DIR or (parent != CHECKPOINTS_DIR and (path / WEIGHTS_MARKER).exists()):
            return describe_weights_step(path, name_filter)
        return describe_checkpoint_step(path, name_filter)
    if path.name == CHECKPOINTS_DIR:
        return _listing("checkpoints", path, path.parent, checkpoints=True, weights=False)
    if path.name == WEIGHTS_DIR:
        return _listing("weights", path, path.parent, checkpoints=False, weights=True)
    if (path / CHECKPOINTS_DIR).is_dir() or (path / WEIGHTS_DIR).is_dir():
        return _listing("run", path, path, checkpoints=True, weights=True)
    if (folder := titan_folder(path)) is not None:
        return describe_titan_folder(folder)
    if (path / SAFETENSORS_INDEX_FILE).is_file() or any(path.glob("*.safetensors")):
        return describe_safetensors_dir(path, name_filter)
    raise InspectError(f"{path}: not a checkpoint ({_EXPECTED})")


# -- list (one row per step) ------------------------------------------------------------------
#: Version tag of :func:`list_run`'s JSON (``RunTable.to_dict()``).
LIST_SCHEMA = "prime-ckpt.list/1"

_SAVE_INFO_KEYS = ("mode", "world_size", "blocking_s", "total_s", "total_bytes")


@dataclass
class ListedCheckpoint:
    """One ``checkpoints/step_<N>`` row of :func:`list_run`.

    ``bytes`` is the size on disk of the step dir; ``progress`` the orchestrator's
    ``{step, total_samples, total_tokens, total_problems}`` (None without a readable
    ``orchestrator.pt``); ``save_info`` a few fields of the trainer's ``save_info.json``;
    ``retention`` ``{action, reasons}`` under the policy given, else None.
    """

    step: int
    path: str
    complete: bool
    parts: dict[str, bool]
    present: list[str]
    bytes: int
    manifest: bool
    progress: dict[str, Any] | None
    save_info: dict[str, Any] | None
    retention: dict[str, Any] | None = None
    problems: list[str] = field(default_factory=list)
    #: complete, ours, and (when the run publishes weights) its weights [x - k, x] complete
    resumable: bool = False
    #: why the directory is not this project's (kept, never resumed or deleted), else None
    foreign: str | None = None


@dataclass
class ListedWeights:
    """One ``weights/step_<N>`` row of :func:`list_run`."""

    step: int
    path: str
    complete: bool
    bytes: int
    manifest: bool
    retention: dict[str, Any] | None = None
    foreign: str | None = None
    problem: str | None = None


@dataclass
class RunTable:
    """:func:`list_run`'s result: every step of a run with completeness, size and progress."""

    path: str
    parts: list[str]
    latest_complete_step: int | None
    policy: dict[str, Any] | None
    checkpoints: list[ListedCheckpoint]
    weights: list[ListedWeights]
    ignored: list[str]
    #: why each ignored entry is not a step (leftover, symlink, file, other name)
    ignored_reasons: dict[str, str] = field(default_factory=dict)
    #: the newest step a resume (-1) would load, or None
    latest_resumable_step: int | None = None
    #: the live run's record (run.json: run_id, start_step, what it set aside), or None
    run: dict[str, Any] | None = None
    #: the directories under superseded/ (earlier runs' steps, set aside on entry)
    superseded: list[str] = field(default_factory=list)
    #: ``"prime-ckpt"`` (this project's run output dir) or ``"torchtitan"`` (its
    #: ``checkpoint/step-<N>`` folder, listed read-only: see :mod:`prime_ckpt.foreign`)
    layout: str = "prime-ckpt"

    def to_dict(self) -> dict[str, Any]:
        return {"schema": LIST_SCHEMA, **asdict(self)}


def _list_titan(folder: AnyPath) -> RunTable:
    """:func:`list_run` of a torchtitan checkpoint folder (``layout`` ``"torchtitan"``): one row per
    ``step-<N>``; resumable = complete (torchtitan resumes the highest step with ``.metadata``);
    no weights, run record or retention (nothing here is this project's to plan or delete)."""
    from prime_ckpt.storage import tree_size

    listing = describe_titan_folder(folder)
    rows = [
        ListedCheckpoint(step=s.step, path=s.path, complete=s.complete, parts=dict(s.parts), present=list(s.present),
                         bytes=tree_size(to_path(s.path)), manifest=False, progress=None, save_info=None,
                         problems=[p for p in listing.problems if p.startswith(s.path + ":")], resumable=s.complete)
        for s in listing.checkpoints or []
    ]  # fmt: skip
    return RunTable(path=str(folder), parts=["trainer"], latest_complete_step=listing.latest_complete_step,
                    policy=None, checkpoints=rows, weights=[], ignored=[],
                    latest_resumable_step=listing.latest_complete_step, layout="torchtitan")


def list_run(output_dir: AnyPath | str, policy: Any = None, current_step: int | None = None) -> RunTable:
    """One row per checkpoint step and per weights step of a run (read-only, no tensor data).

    Args:
        output_dir: the run output dir (a ``checkpoints/`` or ``weights/`` dir means its parent);
            local, an fsspec URL or a UPath carrying storage options.
        policy: a :class:`prime_ckpt.retention.RetentionPolicy`; when given, every row carries
            the plan's keep/delete decision and its reasons (``retention``), else ``None``.
        current_step: passed to the planner (default: the highest step on disk).
    Raises:
        InspectError: ``output_dir`` is missing, not a directory, or not a run output dir.
    """
    from prime_ckpt.manifest import MANIFEST_FILE
    from prime_ckpt.storage import tree_size

    path = to_path(output_dir)
    if not path.exists():
        raise InspectError(f"{path}: {missing_reason(path)}")
    if not path.is_dir():
        raise InspectError(f"{path}: not a directory (expected a run output dir)")
    root = path.parent if path.name in (CHECKPOINTS_DIR, WEIGHTS_DIR) else path
    if not ((root / CHECKPOINTS_DIR).is_dir() or (root / WEIGHTS_DIR).is_dir()) and (folder := titan_folder(path)) is not None:
        if policy is not None:
            raise InspectError(f"{folder}: a torchtitan checkpoint folder: retention options do not apply "
                               "(another tool's steps are never planned or pruned here)")
        return _list_titan(folder)
    if not ((root / CHECKPOINTS_DIR).is_dir() or (root / WEIGHTS_DIR).is_dir()):
        raise InspectError(f"{path}: not a run output dir (no {CHECKPOINTS_DIR}/ or {WEIGHTS_DIR}/)")
    scanned = scan_checkpoints(root)
    parts = detect_parts(scanned)
    decisions: dict[tuple[str, int], dict[str, Any]] = {}
    if policy is not None:
        from prime_ckpt.retention import plan_output_dir

        for e in plan_output_dir(root, policy, current_step=current_step).entries:
            decisions[(e.kind, e.step)] = {"action": e.action, "reasons": list(e.reasons)}
    from prime_ckpt.layout import missing_weights, step_async_level
    from prime_ckpt.run import SUPERSEDED_DIR, read_run_record

    scanned_weights = scan_weights(root)
    rows = []
    for c in scanned:
        problems: list[str] = []
        if c.foreign:
            problems.append(f"{c.path}: not this project's checkpoint ({c.foreign}); kept, never resumed or deleted")
        for part, why in c.problems.items():
            problems.append(f"{c.path}: {part} is not complete: {why}")
        resumable = c.complete(parts)
        if resumable:
            k = policy.async_level if policy is not None else (step_async_level(c.path) or 0)
            gone = missing_weights(c.step, k, scanned_weights)
            if gone:
                resumable = False
                problems.append(f"{c.path}: not resumable: weights step(s) {', '.join(map(str, gone))} of its window "
                                f"[{max(0, c.step - k)}, {c.step}] (async level {k}) are not complete")
        progress = None
        orch = c.path / ORCHESTRATOR_FILE
        if orch.is_file():
            try:
                p = load_progress(orch)
                progress = {k: getattr(p, k) for k in ("step", "total_samples", "total_tokens", "total_problems")}
            except (ProgressRecordError, OSError) as e:
                problems.append(str(e))
        info = read_save_info(c.path / SAVE_INFO_FILE, problems)
        rows.append(
            ListedCheckpoint(
                step=c.step,
                path=str(c.path),
                complete=c.complete(parts),
                parts=dict(c.parts),
                present=list(c.present),
                bytes=tree_size(c.path),
                manifest=(c.path / MANIFEST_FILE).is_file(),
                progress=progress,
                save_info={k: info[k] for k in _SAVE_INFO_KEYS if k in info} if info else None,
                retention=decisions.get(("checkpoint", c.step)),
                problems=problems,
                resumable=resumable,
                foreign=c.foreign,
            )
        )
    weights = [
        ListedWeights(
            step=w.step, path=str(w.path), complete=w.complete, bytes=tree_size(w.path),
            manifest=(w.path / MANIFEST_FILE).is_file(), retention=decisions.get(("weights", w.step)),
            foreign=w.foreign, problem=w.problem,
        )
        for w in scanned_weights
    ]  # fmt: skip
    complete = [r.step for r in rows if r.complete]
    resumable_steps = [r.step for r in rows if r.resumable]
    superseded_root = root / SUPERSEDED_DIR
    return RunTable(
        latest_resumable_step=max(resumable_steps) if resumable_steps else None,
        run=read_run_record(root),
        superseded=sorted(f"{SUPERSEDED_DIR}/{p.name}" for p in superseded_root.iterdir()) if superseded_root.is_dir() else [],
        path=str(root),
        parts=list(parts),
        latest_complete_step=max(complete) if complete else None,
        policy={f.name: getattr(policy, f.name) for f in fields(policy) if f.name not in ("parts", "rules")} if policy is not None else None,
        checkpoints=rows,
        weights=weights,
        ignored=_ignored(root / CHECKPOINTS_DIR) + _ignored(root / WEIGHTS_DIR),
        ignored_reasons={**ignored_reasons(root / CHECKPOINTS_DIR), **ignored_reasons(root / WEIGHTS_DIR)},
    )
