"""``list``'s view of a run (:class:`RunTable`): one row per checkpoint step and per weights
step, with completeness, resumability, size on disk, progress record, save record and (under a
retention policy) the plan's decision.

The rows are built from the one model of a run's steps, :class:`prime_ckpt.inspect_listing.RunSteps`
(also behind ``inspect <run dir>``). Read-only; no tensor data is read.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from typing import Any

from prime_ckpt.foreign import titan_folder
from prime_ckpt.inspect_common import InspectError, read_save_info
from prime_ckpt.inspect_listing import TORCHTITAN_LAYOUT, RunSteps, scan_run, scan_titan
from prime_ckpt.layout import (
    CHECKPOINTS_DIR,
    MANIFEST_FILE,
    ORCHESTRATOR_FILE,
    SAVE_INFO_FILE,
    WEIGHTS_DIR,
    missing_weights,
    step_async_level,
)
from prime_ckpt.orchestrator import ProgressRecordError, load_progress
from prime_ckpt.storage import AnyPath, missing_reason, to_path, tree_size

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



def _list_titan(steps: RunSteps) -> RunTable:
    """:func:`list_run` of a torchtitan checkpoint folder (``layout`` ``"torchtitan"``): one row per
    ``step-<N>``; resumable = complete (torchtitan resumes the highest step with ``.metadata``);
    no weights, run record or retention (nothing here is this project's to plan or delete)."""
    rows = [
        ListedCheckpoint(step=c.step, path=str(c.path), complete=c.complete(steps.parts), parts=dict(c.parts),
                         present=list(c.present), bytes=tree_size(c.path), manifest=False, progress=None, save_info=None,
                         problems=steps.incomplete_lines(c), resumable=c.complete(steps.parts))
        for c in steps.checkpoints or []
    ]  # fmt: skip
    return RunTable(path=str(steps.root), parts=list(steps.parts), latest_complete_step=steps.latest_complete_step,
                    policy=None, checkpoints=rows, weights=[], ignored=[],
                    latest_resumable_step=steps.latest_complete_step, layout=TORCHTITAN_LAYOUT)


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
        return _list_titan(scan_titan(folder))
    if not ((root / CHECKPOINTS_DIR).is_dir() or (root / WEIGHTS_DIR).is_dir()):
        raise InspectError(f"{path}: not a run output dir (no {CHECKPOINTS_DIR}/ or {WEIGHTS_DIR}/)")
    steps = scan_run(root)
    parts = steps.parts
    decisions: dict[tuple[str, int], dict[str, Any]] = {}
    if policy is not None:
        from prime_ckpt.retention import plan_output_dir

        for e in plan_output_dir(root, policy, current_step=current_step).entries:
            decisions[(e.kind, e.step)] = {"action": e.action, "reasons": list(e.reasons)}
    from prime_ckpt.run import SUPERSEDED_DIR, read_run_record

    scanned_weights = steps.weights or []
    rows = []
    for c in steps.checkpoints or []:
        problems: list[str] = []
        if c.foreign:
            problems.append(f"{c.path}: not this project's checkpoint ({c.foreign}); kept, never resumed or deleted")
        problems += steps.incomplete_lines(c)
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
    resumable_steps = [r.step for r in rows if r.resumable]
    superseded_root = root / SUPERSEDED_DIR
    return RunTable(
        latest_resumable_step=max(resumable_steps) if resumable_steps else None,
        run=read_run_record(root),
        superseded=sorted(f"{SUPERSEDED_DIR}/{p.name}" for p in superseded_root.iterdir()) if superseded_root.is_dir() else [],
        path=str(root),
        parts=list(parts),
        latest_complete_step=steps.latest_complete_step,
        policy={f.name: getattr(policy, f.name) for f in fields(policy) if f.name not in ("parts", "rules")} if policy is not None else None,
        checkpoints=rows,
        weights=weights,
        ignored=list(steps.ignored_reasons),
        ignored_reasons=dict(steps.ignored_reasons),
    )
