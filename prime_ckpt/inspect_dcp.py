"""Describing a DCP checkpoint from its metadata: a ``trainer/`` (or any DCP) directory and a
``checkpoints/step_<N>`` (its parts, progress record, ``save_info.json``, tensor table).

Tensor tables come from DCP's ``.metadata`` alone, read through
:func:`prime_ckpt.dcp_metadata.read_dcp_metadata` (never plain pickle; torch-free stand-ins
unless torch is already imported). No tensor data is read and nothing is written.
Completeness is :mod:`prime_ckpt.layout`'s, the same as ``list`` and resume.
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass, field
from typing import Any

from prime_ckpt.dcp_metadata import (
    has_dcp_metadata,
    is_bytes_entry,
    is_tensor_entry,
    rank_metadata_files,
    read_dcp_metadata,
)
from prime_ckpt.foreign import titan_step, titan_step_parent
from prime_ckpt.inspect_common import (
    InspectError,
    StepInfo,
    TensorEntry,
    dtype_name,
    matches,
    numel,
    read_save_info,
    remote_entries,
    top_level_key,
)
from prime_ckpt.layout import (
    DCP_METADATA_FILE,
    ORCHESTRATOR_FILE,
    SAVE_INFO_FILE,
    TRAINER_PART,
    detect_parts,
    orchestrator_part_complete,
    parse_step,
    scan_checkpoints,
    trainer_part_complete,
    trainer_part_problem,
)
from prime_ckpt.orchestrator import ProgressRecordError, load_progress
from prime_ckpt.storage import AnyPath, is_remote, refresh, to_path

_DISTCP_RE = re.compile(r"^__(\d+)_(\d+)\.distcp$")


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
class CheckpointStepInfo(StepInfo):
    """kind ``checkpoint_step``: one ``checkpoints/step_<N>``."""

    complete: bool
    parts: dict[str, bool]
    present: list[str]
    save_info: dict[str, Any] | None
    orchestrator: dict[str, Any] | None
    trainer: TrainerPartInfo | None
    filter: str | None = None
    problems: list[str] = field(default_factory=list)


@dataclass
class TrainerDirInfo(StepInfo):
    """kind ``trainer``: a DCP directory pointed at directly."""

    trainer: TrainerPartInfo
    filter: str | None = None
    problems: list[str] = field(default_factory=list)


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
    listed = remote_entries(trainer_dir) if is_remote(trainer_dir) else {}
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
        if not matches(fqn, name_filter):
            continue
        key = totals.setdefault(top_level_key(fqn), KeyTotals())
        if is_tensor_entry(entry):
            shape = [int(s) for s in entry.size]
            dtype = entry.properties.dtype
            nbytes = numel(shape) * dtype.itemsize
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


def storage_problems(trainer: TrainerPartInfo) -> list[str]:
    """One line per data file the ``.metadata`` references that is missing."""
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
    problems += storage_problems(trainer)
    if trainer.complete and not storage_problems(trainer) and (why := trainer_part_problem(trainer_dir)) is not None:
        problems.append(f"{trainer_dir}: {why}")  # e.g. a truncated data file
    return CheckpointStepInfo(
        kind="checkpoint_step",
        path=str(step_dir),
        step=parse_step(step_dir.name),
        complete=all(parts.get(p, False) for p in detect_parts(scan_checkpoints(step_dir.parent.parent))),
        parts=parts,
        present=present,
        save_info=read_save_info(step_dir / SAVE_INFO_FILE, problems),
        orchestrator=orchestrator,
        trainer=trainer,
        filter=name_filter,
        problems=problems,
    )


def is_trainer_dir(path: AnyPath) -> bool:
    """Whether ``path`` is described as a DCP directory: it has DCP metadata, is the ``trainer/``
    of a ``step_<N>``, or is a torchtitan ``step-<N>`` folder."""
    return has_dcp_metadata(path) or (path.name == TRAINER_PART and parse_step(path.parent.name) is not None) or (
        titan_step(path.name) is not None and titan_step_parent(path)
    )


def describe_trainer_dir(path: AnyPath | str, name_filter: str | None = None) -> TrainerDirInfo:
    """kind ``trainer``: a DCP directory pointed at directly (``step`` from its parent
    ``step_<N>`` or its torchtitan ``step-<N>`` name), with the same completeness as ``list``
    and resume.

    Raises:
        MetadataError: ``.metadata`` exists but cannot be read safely.
    """
    path = to_path(path)
    parent = path.parent.name
    trainer = describe_trainer_part(path, name_filter)
    problems = [] if trainer.complete else [f"{path}: {DCP_METADATA_FILE} missing (save did not finish?)"]
    if trainer.complete and trainer.metadata_files == [DCP_METADATA_FILE] and not storage_problems(trainer) and (
        why := trainer_part_problem(path)
    ) is not None:
        problems.append(f"{path}: {why}")  # the same completeness as `list` and resume
    return TrainerDirInfo(
        kind="trainer",
        path=str(path),
        step=parse_step(parent) if parse_step(parent) is not None else titan_step(path.name),
        trainer=trainer,
        filter=name_filter,
        problems=problems + storage_problems(trainer),
    )
