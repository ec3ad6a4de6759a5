"""A run's inventory: its checkpoint and weights steps, which are complete, which are resumable.

Names (``step_<N>`` parsing, file names, which names are ours) live in :mod:`prime_ckpt.names`,
paths in :mod:`prime_ckpt.run_layout`, a part's completeness in :mod:`prime_ckpt.completeness`;
they are re-exported here. Rules kept here and nowhere else:

* anything under ``checkpoints/`` or ``weights/`` that does not parse as ``step_<N>`` is not ours
  and is never listed as a step; steps are ordered by the integer, never by string or mtime;
* a step directory holding a name this project never writes there is *foreign*
  (:func:`prime_ckpt.names.foreign_reason`): listed, never complete, never resumed, never
  deleted (DESIGN invariant 8);
* a checkpoint step x is *resumable* when it is complete and, in a run that publishes weights,
  the weights ``[x - async_level, x]`` it needs (the seed's rule) are complete
  (:func:`missing_weights`); ``--ckpt.resume-step -1``, ``list`` and retention use this one
  definition.

``output_dir`` may be a local path or an fsspec URL (``s3://bucket/run``; see
:func:`prime_ckpt.storage.to_path`); on a remote path an inventory scan is one listing of
``checkpoints/`` (and of ``weights/``), never served from a cache. Only reads.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

from prime_ckpt.completeness import (  # noqa: F401 - re-exported
    orchestrator_part_complete,
    orchestrator_part_problem,
    trainer_part_complete,
    trainer_part_problem,
    weights_complete,
    weights_files,
    weights_problem,
)
from prime_ckpt.errors import NotResumableError
from prime_ckpt.names import (  # noqa: F401 - re-exported: the layout's names
    CHECKPOINT_STEP_NAMES,
    CHECKPOINTS_DIR,
    CONFIG_FILE,
    CONSUMER_ACK_FILE,
    DCP_METADATA_FILE,
    GENERATION_CONFIG_FILE,
    LEASE_FILE,
    MANIFEST_FILE,
    MODEL_FILE,
    ORCHESTRATOR_FILE,
    ORCHESTRATOR_PART,
    RUN_FILE,
    RUN_PARTS,
    SAFETENSORS_INDEX_FILE,
    SAVE_INFO_FILE,
    SUPERSEDED_DIR,
    TRAINER_PART,
    WEIGHTS_DIR,
    WEIGHTS_MARKER,
    foreign_reason,
    parse_step,
    shard_file_name,
    step_dirname,
)
from prime_ckpt.run_layout import RunLayout  # noqa: F401 - re-exported
from prime_ckpt.storage import AnyPath, is_remote, list_tree, to_path

logger = logging.getLogger(__name__)


#: A requested checkpoint step is missing, incomplete or not resumable (message lists what
#: exists); the older name of :class:`prime_ckpt.errors.NotResumableError`.
CheckpointNotFoundError = NotResumableError


@dataclass(frozen=True)
class CheckpointStep:
    """One ``checkpoints/step_<N>`` directory as found on disk.

    ``parts`` maps part name (``"trainer"``, ``"orchestrator"``) to whether it is complete;
    a part that is absent maps to ``False``; ``present`` lists the parts that exist at all;
    ``problems`` maps a present part that is not complete to why (e.g. ``"unreadable .metadata
    (...)"``); ``foreign`` says why the directory is not this project's (then it is never
    complete, resumed or deleted), else ``None``.
    """

    step: int
    path: AnyPath
    parts: dict[str, bool] = field(default_factory=dict)
    present: tuple[str, ...] = ()
    problems: dict[str, str] = field(default_factory=dict)
    foreign: str | None = None

    def complete(self, parts: tuple[str, ...] = RUN_PARTS) -> bool:
        """True iff the directory is ours and every part in ``parts`` is complete."""
        return self.foreign is None and all(self.parts.get(p, False) for p in parts)


@dataclass(frozen=True)
class WeightsStep:
    """One ``weights/step_<N>`` directory as found on disk (``foreign``: as in
    :class:`CheckpointStep`; ``problem``: why it is not complete although ``COMPLETE`` exists)."""

    step: int
    path: AnyPath
    complete: bool
    foreign: str | None = None
    problem: str | None = None


def _step_dirs(root: Path) -> list[tuple[int, Path, list[str]]]:
    """``(step, path, names inside)`` of each local ``step_<int>`` directory, by step."""
    if not root.is_dir():
        return []
    found = []
    for entry in os.scandir(root):
        step = parse_step(entry.name)
        if step is not None and entry.is_dir(follow_symlinks=False):
            found.append((step, Path(entry.path)))
    return [(step, path, _names(path)) for step, path in sorted(found)]


def _names(path: Path) -> list[str]:
    try:
        return os.listdir(path)
    except OSError:
        return []


def scan_checkpoints(output_dir: AnyPath | str) -> list[CheckpointStep]:
    """Inventory of ``<output_dir>/checkpoints/step_*``, ordered by step (integer order).

    Names that are not ``step_<int>`` are skipped. A missing ``checkpoints/`` gives ``[]``.
    Each part's mark is parsed (once per file version): see :func:`trainer_part_problem`.
    """
    layout = RunLayout(output_dir)
    if is_remote(layout.checkpoints_dir):
        return _scan_checkpoints_remote(layout.checkpoints_dir)
    result = []
    for step, path, names in _step_dirs(layout.checkpoints_dir):
        foreign = foreign_reason("checkpoint", names)
        present = tuple(
            part for part, name in ((TRAINER_PART, TRAINER_PART), (ORCHESTRATOR_PART, ORCHESTRATOR_FILE)) if name in names
        )
        problems: dict[str, str] = {}
        parts = {}
        for part, problem in (
            (TRAINER_PART, trainer_part_problem(path / TRAINER_PART) if TRAINER_PART in present else "absent"),
            (ORCHESTRATOR_PART, orchestrator_part_problem(path / ORCHESTRATOR_FILE) if ORCHESTRATOR_PART in present else "absent"),
        ):
            parts[part] = problem is None
            if problem is not None and part in present:
                problems[part] = problem
        result.append(CheckpointStep(step=step, path=path, parts=parts, present=present, problems=problems, foreign=foreign))
    return result


def scan_weights(output_dir: AnyPath | str) -> list[WeightsStep]:
    """Inventory of ``<output_dir>/weights/step_*``, ordered by step (integer order)."""
    layout = RunLayout(output_dir)
    if is_remote(layout.weights_dir):
        return _scan_weights_remote(layout.weights_dir)
    result = []
    for step, path, names in _step_dirs(layout.weights_dir):
        problem = weights_problem(path) if WEIGHTS_MARKER in names else None
        result.append(WeightsStep(step=step, path=path, complete=WEIGHTS_MARKER in names and problem is None,
                                  foreign=foreign_reason("weights", names), problem=problem))
    return result


def _remote_steps(root: AnyPath) -> list[tuple[int, AnyPath, set[str]]]:
    """``(step, path, {relative paths under the step dir})`` for every ``step_<int>`` directory
    under a remote ``root``, from one uncached listing, ordered by step."""
    tree = list_tree(root)
    by_step: dict[str, set[str]] = {}
    for rel, kind in tree.items():
        head, _, tail = rel.partition("/")
        if parse_step(head) is None:
            continue
        if not tail:
            if kind == "directory":
                by_step.setdefault(head, set())
            continue
        by_step.setdefault(head, set()).add(tail)
    return sorted((parse_step(name), root / name, entries) for name, entries in by_step.items())  # type: ignore[misc]


def _scan_checkpoints_remote(checkpoints_dir: AnyPath) -> list[CheckpointStep]:
    result = []
    for step, path, entries in _remote_steps(checkpoints_dir):
        top = {e.split("/", 1)[0] for e in entries}
        present = tuple(name for name, rel in ((TRAINER_PART, TRAINER_PART), (ORCHESTRATOR_PART, ORCHESTRATOR_FILE)) if rel in entries)
        problems: dict[str, str] = {}
        parts = {TRAINER_PART: False, ORCHESTRATOR_PART: False}
        if f"{TRAINER_PART}/{DCP_METADATA_FILE}" in entries:
            problem = trainer_part_problem(path / TRAINER_PART)
            parts[TRAINER_PART] = problem is None
            if problem:
                problems[TRAINER_PART] = problem
        if ORCHESTRATOR_FILE in entries:
            problem = orchestrator_part_problem(path / ORCHESTRATOR_FILE)
            parts[ORCHESTRATOR_PART] = problem is None
            if problem:
                problems[ORCHESTRATOR_PART] = problem
        result.append(CheckpointStep(step=step, path=path, parts=parts, present=present, problems=problems,
                                     foreign=foreign_reason("checkpoint", top)))
    return result


def _scan_weights_remote(weights_dir: AnyPath) -> list[WeightsStep]:
    return [
        WeightsStep(step=step, path=path, complete=WEIGHTS_MARKER in entries,
                    foreign=foreign_reason("weights", {e.split("/", 1)[0] for e in entries}))
        for step, path, entries in _remote_steps(weights_dir)
    ]


def step_async_level(step_dir: AnyPath | str) -> int | None:
    """The async level k recorded in ``<step_dir>/save_info.json`` (the trainer's
    ``Checkpointer`` writes it with every save), or ``None`` if absent or unreadable."""
    import json

    try:
        info = json.loads((to_path(step_dir) / SAVE_INFO_FILE).read_bytes())
    except (OSError, ValueError, RecursionError):
        return None
    level = info.get("async_level") if isinstance(info, dict) else None
    if isinstance(level, int) and not isinstance(level, bool) and level >= 0:
        return level
    return None


def recorded_async_level(output_dir: AnyPath | str) -> int | None:
    """The async level k the run recorded (``save_info.json`` of its newest step that has one,
    written by the trainer's ``Checkpointer``), or ``None`` if no step records it. k is the
    seed's rule: resuming at checkpoint step x needs weights ``[x - k, x]``. Unreadable records
    are skipped."""
    for c in reversed(scan_checkpoints(output_dir)):
        level = step_async_level(c.path)
        if level is not None:
            return level
    return None


def weights_window(step: int, async_level: int) -> range:
    """The weights steps resuming at checkpoint step ``step`` needs: ``[step - k, step]``
    (the seed's rule), clipped at 0."""
    return range(max(0, step - async_level), step + 1)


def publishes_weights(weights: Iterable[WeightsStep]) -> bool:
    """True iff the run publishes weights: its ``weights/`` holds a step directory of ours. A
    trainer-only run (no weights) needs none to resume."""
    return any(w.foreign is None for w in weights)


def missing_weights(step: int, async_level: int, weights: Iterable[WeightsStep]) -> list[int]:
    """The steps of :func:`weights_window` that have no complete weights of ours (``[]``: all
    there, or the run publishes no weights)."""
    weights = list(weights)
    if not publishes_weights(weights):
        return []
    done = {w.step for w in weights if w.complete and w.foreign is None}
    return [s for s in weights_window(step, async_level) if s not in done]


def latest_complete_step(output_dir: AnyPath | str, parts: tuple[str, ...] | None = None) -> int | None:
    """The highest step whose every part in ``parts`` is complete, or ``None``. ``parts`` None:
    the parts the run writes, judged from disk (:func:`detect_parts`; a trainer-only run needs
    only ``trainer``), the one default of every function that takes ``parts``."""
    steps = scan_checkpoints(output_dir)
    parts = detect_parts(steps) if parts is None else parts
    complete = [c.step for c in steps if c.complete(parts)]
    return max(complete) if complete else None


def _describe(steps: list[CheckpointStep], parts: tuple[str, ...]) -> str:
    if not steps:
        return "no checkpoint steps on disk"
    described = []
    for c in steps:
        if c.foreign:
            described.append(f"{c.step} (not ours)")
            continue
        missing = [p for p in parts if not c.parts.get(p, False)]
        described.append(f"{c.step}" + (f" (incomplete: {', '.join(missing)})" if missing else ""))
    return "steps on disk: " + ", ".join(described)


def _why_not_resumable(c: CheckpointStep, parts: tuple[str, ...], k: int, weights: list[WeightsStep]) -> str | None:
    if c.foreign:
        return f"not this project's checkpoint ({c.foreign})"
    bad = [f"{p}: {c.problems[p]}" if p in c.problems else p for p in parts if not c.parts.get(p, False)]
    if bad:
        return "checkpoint step is incomplete (missing or unfinished: " + ", ".join(bad) + ")"
    gone = missing_weights(c.step, k, weights)
    if gone:
        return (f"checkpoint step is not resumable: the weights it needs, steps [{max(0, c.step - k)}, {c.step}] (async level {k}), are not all "
                f"complete: missing weights/step_{', step_'.join(map(str, gone))}")
    return None


def resolve_resume_step(
    output_dir: AnyPath | str,
    resume_step: int | None,
    parts: tuple[str, ...] | None = None,
    *,
    async_level: int | None = None,
) -> int | None:
    """Turn ``--ckpt.resume-step`` into the step to load, or ``None`` to start fresh.

    * ``None``: start fresh (returns ``None``).
    * ``-1``: the newest *resumable* step: every part in ``parts`` complete (marks parse) and,
      when the run publishes weights, the weights ``[x - k, x]`` complete (the seed's rule);
      newer steps that are not resumable are skipped with a warning naming why. With none,
      logs that the run starts fresh and returns ``None``.
    * ``N >= 0``: N itself, if it is resumable.

    ``async_level`` is k; each step needs at least the k its run recorded (``save_info.json``);
    ``None`` takes the recorded one, else 0. ``parts`` None: the parts the run writes, judged
    from disk (:func:`detect_parts`); a program that knows its run writes both should pass
    :data:`RUN_PARTS`, so that a step missing the orchestrator's record is never resumed.

    Raises:
        NotResumableError (a ``FileNotFoundError``; ``CheckpointNotFoundError`` is its alias):
            an explicit step is missing, foreign, incomplete, or lacks weights; one line naming
            the path and what is missing, and listing the steps that exist.
        ValueError: ``resume_step < -1``.
    """
    if resume_step is None:
        return None
    if resume_step < -1:
        raise ValueError(f"--ckpt.resume-step must be -1 (latest) or a step >= 0, got {resume_step}")
    steps = scan_checkpoints(output_dir)
    weights = scan_weights(output_dir)
    parts = detect_parts(steps) if parts is None else parts

    def level(c: CheckpointStep) -> int:
        # the larger of the given and the recorded level: a step needs at least the weights its
        # own run said it would
        recorded = step_async_level(c.path)
        return max(async_level or 0, recorded or 0)

    if resume_step == -1:
        for c in sorted(steps, key=lambda c: c.step, reverse=True):
            if c.complete(parts):
                why = _why_not_resumable(c, parts, level(c), weights)
                if why is None:
                    return c.step
                logger.warning("--ckpt.resume-step -1: skipping checkpoint step %d: %s", c.step, why)
            elif c.problems and c.foreign is None:
                logger.warning("--ckpt.resume-step -1: skipping checkpoint step %d: %s", c.step,
                               "; ".join(f"{p}: {m}" for p, m in c.problems.items()))
        logger.info(
            "--ckpt.resume-step -1: no resumable checkpoint under %s (%s); starting fresh",
            RunLayout(output_dir).checkpoints_dir,
            _describe(steps, parts),
        )
        return None
    match = [c for c in steps if c.step == resume_step]
    path = RunLayout(output_dir).step_dir(resume_step)
    if not match:
        raise CheckpointNotFoundError(f"{path}: no such checkpoint step; {_describe(steps, parts)}")
    why = _why_not_resumable(match[0], parts, level(match[0]), weights)
    if why is not None:
        raise CheckpointNotFoundError(f"{path}: {why}; {_describe(steps, parts)}")
    return resume_step


@dataclass(frozen=True)
class Inventory:
    """Everything under a run's ``checkpoints/`` and ``weights/`` that parses as a step."""

    checkpoints: tuple[CheckpointStep, ...] = ()
    weights: tuple[WeightsStep, ...] = ()


def scan_inventory(output_dir: AnyPath | str) -> Inventory:
    """:func:`scan_checkpoints` and :func:`scan_weights` together."""
    return Inventory(tuple(scan_checkpoints(output_dir)), tuple(scan_weights(output_dir)))


def detect_parts(checkpoints: Iterable[CheckpointStep]) -> tuple[str, ...]:
    """The parts a run writes, judged from what is on disk: ``("trainer", "orchestrator")`` if
    any step holds an orchestrator record, else ``("trainer",)`` (a trainer-only run)."""
    if any(ORCHESTRATOR_PART in c.present or c.parts.get(ORCHESTRATOR_PART) for c in checkpoints):
        return RUN_PARTS
    return (TRAINER_PART,)
