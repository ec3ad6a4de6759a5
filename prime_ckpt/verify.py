"""Verifying a step directory: re-hash against ``manifest.json`` and check its structure.

:func:`verify_manifest` re-hashes every file the manifest (:mod:`prime_ckpt.manifest_record`)
lists (in chunks: a checkpoint is never held in memory) and reports every mismatched, missing
and extra file; an entry outside the step directory is a problem and never opened.
:func:`verify_step` adds structural checks that need no manifest and read no tensor data
(``.metadata`` through the restricted unpickler, every data file the metadata references present
and long enough, ``orchestrator.pt`` readable with ``weights_only=True``, the safetensors header
consistent with the file size). :func:`verify_path` runs :func:`verify_step` over an output dir,
a ``checkpoints/`` or ``weights/`` dir, or one step dir.

Every path may be an fsspec URL or a UPath carrying storage options (see
:mod:`prime_ckpt.storage`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any, TypeVar

from prime_ckpt.dcp_metadata import MetadataError, read_dcp_metadata
from prime_ckpt.errors import PrimeCkptError
from prime_ckpt.layout import (
    CHECKPOINTS_DIR,
    DCP_METADATA_FILE,
    MANIFEST_FILE,
    MODEL_FILE,
    ORCHESTRATOR_FILE,
    ORCHESTRATOR_PART,
    TRAINER_PART,
    WEIGHTS_DIR,
    WEIGHTS_MARKER,
    detect_parts,
    parse_step,
    scan_checkpoints,
    scan_weights,
    weights_files,
)
from prime_ckpt.manifest_record import (
    ALGORITHM,
    ManifestError,
    OnBytes,
    files_of_parts,
    hash_file,
    is_weights_dir,
    manifest_entry_path,
    read_manifest,
    walk_files,
)
from prime_ckpt.orchestrator import ProgressRecordError, load_progress
from prime_ckpt.safetensors_io import safetensors_header
from prime_ckpt.storage import AnyPath, missing_reason, to_path

VERIFY_SCHEMA = "prime-ckpt.verify/1"

_T = TypeVar("_T")


class VerifyTargetError(PrimeCkptError, ValueError):
    """The path given to :func:`verify_path` is not something that can be verified."""


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
    kind = "weights" if is_weights_dir(step_dir) else "checkpoint"
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
    for rel in files_of_parts(step_dir, kind, parts):
        if rel not in listed:
            report.problems.append(f"{step_dir / rel}: extra file, not in {MANIFEST_FILE}")
    if kind == "checkpoint":
        for part, rel in ((TRAINER_PART, TRAINER_PART), (ORCHESTRATOR_PART, ORCHESTRATOR_FILE)):
            if part not in parts and (step_dir / rel).exists():
                report.unverified.append(str(step_dir / rel))
    report.status = "failed" if report.problems else "ok"
    return report


# -- structural checks (no manifest needed, no tensor data read) -------------------------------
def _or_problem(read: Callable[[AnyPath], _T], path: AnyPath, errors: tuple[type[BaseException], ...], problems: list[str]) -> _T | None:
    """``read(path)``, or None with the error's one line appended to ``problems`` when it raises
    one of ``errors``."""
    try:
        return read(path)
    except errors as e:
        problems.append(str(e))
        return None


def _check_trainer(trainer_dir: AnyPath, problems: list[str]) -> None:
    md = _or_problem(read_dcp_metadata, trainer_dir, (MetadataError,), problems)
    if md is None:
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
    for rel in walk_files(trainer_dir, trainer_dir):
        if rel != DCP_METADATA_FILE and rel not in need:
            problems.append(f"{trainer_dir / rel}: not referenced by {DCP_METADATA_FILE} (stale or foreign file)")


def _check_orchestrator(path: AnyPath, problems: list[str]) -> None:
    _or_problem(load_progress, path, (ProgressRecordError, OSError), problems)


def _check_weights(step_dir: AnyPath, problems: list[str]) -> None:
    files = _or_problem(weights_files, step_dir, (ValueError,), problems)
    if files is None:
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
            parts = run_parts(step_dir)
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


def run_parts(step_dir: AnyPath | str, cache: dict[str, tuple[str, ...]] | None = None) -> tuple[str, ...]:
    """The parts a checkpoint step needs to be complete, judged from its run
    (:func:`prime_ckpt.layout.detect_parts` of ``checkpoints/``; ``()`` for a step outside a
    run's ``checkpoints/``). With ``cache`` (one dict per batch of steps) the run is scanned once,
    not once per step: verifying N steps on object storage lists the run once instead of N
    times (``benchmarks/scaling.py`` measured the requests per step growing with N)."""
    step_dir = to_path(step_dir)
    if step_dir.parent.name != CHECKPOINTS_DIR:
        return ()
    key = str(step_dir.parent)
    if cache is None or key not in cache:
        parts = detect_parts(scan_checkpoints(step_dir.parent.parent))
        if cache is None:
            return parts
        cache[key] = parts
    return cache[key]


def verify_steps(
    targets: list[AnyPath],
    *,
    allow_missing_manifest: bool = False,
    on_bytes: OnBytes | None = None,
) -> list[VerifyReport]:
    """:func:`verify_step` for each of ``targets`` (step directories), each run scanned once for
    the parts its checkpoint steps need (:func:`run_parts`)."""
    cache: dict[str, tuple[str, ...]] = {}
    return [
        verify_step(t, parts=run_parts(t, cache), allow_missing_manifest=allow_missing_manifest, on_bytes=on_bytes)
        for t in targets
    ]


def verify_path(
    path: AnyPath | str,
    *,
    allow_missing_manifest: bool = False,
    on_bytes: OnBytes | None = None,
) -> list[VerifyReport]:
    """:func:`verify_step` for every step under ``path`` (see :func:`verify_targets`)."""
    return verify_steps(verify_targets(path), allow_missing_manifest=allow_missing_manifest, on_bytes=on_bytes)


def all_ok(reports: list[VerifyReport], complete_only: bool = False) -> bool:
    """True iff every report is ``"ok"`` (``"incomplete"`` tolerated with ``complete_only``)."""
    return all(r.ok or (complete_only and r.status == "incomplete") for r in reports)
