"""On-disk layout of a run: paths, ``step_<N>`` parsing, inventory and completeness.

Layout (see ``shared/DESIGN.md``)::

    <output_dir>/
    ├── checkpoints/step_<N>/trainer/         DCP dir: .metadata + __<rank>_<n>.distcp
    ├── checkpoints/step_<N>/orchestrator.pt  orchestrator progress record
    └── weights/step_<N>/                     Hugging Face model dir: model-0000i-of-0000n.safetensors,
                                              model.safetensors.index.json, config.json, tokenizer
                                              files, manifest.json, then COMPLETE (older runs:
                                              one model.safetensors)

Rules kept here and nowhere else:

* a step directory is named ``step_<int>`` with a canonical integer (``step_10``, never
  ``step_010``); anything else under ``checkpoints/`` or ``weights/`` is not ours and is never
  listed as a step;
* steps are ordered by the integer, never by string or mtime;
* a part is *complete* only when its last-written file exists: ``trainer/.metadata`` (DCP writes
  it atomically after every rank's data is fsync'd), ``orchestrator.pt`` (written by atomic
  rename) and ``weights/step_<N>/COMPLETE`` (written last, after the data is fsync'd).
  On object storage the same files are the marks, written last by upload order (see
  :mod:`prime_ckpt.storage`).

``output_dir`` may be a local path or an fsspec URL (``s3://bucket/run``; see
:func:`prime_ckpt.storage.to_path`); on a remote path an inventory scan is one listing of
``checkpoints/`` (and of ``weights/``), never served from a cache.

This module only reads the file system; it never writes.
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

from prime_ckpt.storage import AnyPath, is_remote, list_tree, refresh, to_path

logger = logging.getLogger(__name__)

CHECKPOINTS_DIR = "checkpoints"
WEIGHTS_DIR = "weights"
TRAINER_PART = "trainer"
ORCHESTRATOR_PART = "orchestrator"
ORCHESTRATOR_FILE = "orchestrator.pt"
DCP_METADATA_FILE = ".metadata"
WEIGHTS_MARKER = "COMPLETE"
MODEL_FILE = "model.safetensors"  # in weights/step_<N>/ of runs before sharded publishing
SAFETENSORS_INDEX_FILE = "model.safetensors.index.json"  # in weights/step_<N>/: tensor name -> shard file
CONFIG_FILE = "config.json"  # in weights/step_<N>/ (the model's Hugging Face config)
GENERATION_CONFIG_FILE = "generation_config.json"  # in weights/step_<N>/, when the model has one
SAVE_INFO_FILE = "save_info.json"
CONSUMER_ACK_FILE = "consumer_ack.json"  # in <output_dir>/: the weights step the inference side has loaded
MANIFEST_FILE = "manifest.json"

#: The parts a full run (trainer + orchestrator) writes for each checkpoint step.
RUN_PARTS: tuple[str, ...] = (TRAINER_PART, ORCHESTRATOR_PART)

_STEP_RE = re.compile(r"^step_(0|[1-9][0-9]*)$")


class CheckpointNotFoundError(FileNotFoundError):
    """A requested checkpoint step is missing or incomplete (message lists what exists)."""


def parse_step(name: str) -> int | None:
    """Return N for a directory name ``step_<N>``, else ``None``.

    Only canonical integers count: ``step_10`` -> 10, while ``step_010``, ``step_-1``,
    ``step_10.tmp`` and ``latest`` -> ``None`` (not ours, never touched).
    """
    match = _STEP_RE.match(name)
    return int(match.group(1)) if match else None


def shard_file_name(index: int, count: int) -> str:
    """Hugging Face's name of shard ``index`` (1-based) of ``count``:
    ``model-00001-of-00002.safetensors``."""
    if not 1 <= index <= count:
        raise ValueError(f"shard index {index} not in 1..{count}")
    return f"model-{index:05d}-of-{count:05d}.safetensors"


def step_dirname(step: int) -> str:
    """``step_<step>``; raises ``ValueError`` for a negative step."""
    if step < 0:
        raise ValueError(f"step must be >= 0, got {step}")
    return f"step_{step}"


@dataclass(frozen=True)
class RunLayout:
    """Paths of one run's output directory (pure: builds paths, touches nothing)."""

    output_dir: AnyPath

    def __post_init__(self) -> None:
        object.__setattr__(self, "output_dir", to_path(self.output_dir))

    @property
    def checkpoints_dir(self) -> Path:
        return self.output_dir / CHECKPOINTS_DIR

    @property
    def weights_dir(self) -> Path:
        return self.output_dir / WEIGHTS_DIR

    def step_dir(self, step: int) -> Path:
        """``checkpoints/step_<step>``."""
        return self.checkpoints_dir / step_dirname(step)

    def trainer_dir(self, step: int) -> Path:
        """``checkpoints/step_<step>/trainer`` (a DCP checkpoint directory)."""
        return self.step_dir(step) / TRAINER_PART

    def orchestrator_path(self, step: int) -> Path:
        """``checkpoints/step_<step>/orchestrator.pt``."""
        return self.step_dir(step) / ORCHESTRATOR_FILE

    def weights_step_dir(self, step: int) -> Path:
        """``weights/step_<step>``."""
        return self.weights_dir / step_dirname(step)


def _fresh_is_file(path: AnyPath) -> bool:
    refresh(path)
    return path.is_file()


def trainer_part_complete(trainer_dir: AnyPath | str) -> bool:
    """True iff the DCP directory has its ``.metadata`` (written last, atomically)."""
    return _fresh_is_file(to_path(trainer_dir) / DCP_METADATA_FILE)


def orchestrator_part_complete(path: AnyPath | str) -> bool:
    """True iff ``orchestrator.pt`` exists (it only ever appears by atomic rename or one PUT)."""
    return _fresh_is_file(to_path(path))


def weights_complete(weights_step_dir: AnyPath | str) -> bool:
    """True iff ``weights/step_<N>/COMPLETE`` exists (written after the data is durable)."""
    return _fresh_is_file(to_path(weights_step_dir) / WEIGHTS_MARKER)


def weights_files(weights_step_dir: AnyPath | str) -> list[AnyPath]:
    """The safetensors files of a weights step, in order.

    The shards ``model.safetensors.index.json`` names (sharded layout, what
    :class:`prime_ckpt.publisher.WeightsPublisher` writes), else ``model.safetensors`` (the
    single-file layout of older runs), else every ``*.safetensors`` in the directory. Files are
    not checked for existence here.

    Raises:
        ValueError: the index is not JSON with a ``weight_map`` of plain ``*.safetensors`` file
            names (one line naming the index).
    """
    import json

    step_dir = to_path(weights_step_dir)
    index = step_dir / SAFETENSORS_INDEX_FILE
    refresh(step_dir)
    if index.is_file():
        try:
            weight_map = json.loads(index.read_bytes())["weight_map"]
            names = sorted(set(weight_map.values()))
        except (ValueError, KeyError, TypeError, AttributeError):
            raise ValueError(f"{index}: not a safetensors index (no weight_map of tensor -> file)") from None
        bad = [n for n in names if not isinstance(n, str) or "/" in n or "\\" in n or n.startswith(".") or not n.endswith(".safetensors")]
        if bad:
            raise ValueError(f"{index}: weight_map names {bad[0]!r}, not a .safetensors file in this directory")
        return [step_dir / n for n in names]
    if (step_dir / MODEL_FILE).is_file():
        return [step_dir / MODEL_FILE]
    return sorted(step_dir.glob("*.safetensors"), key=lambda p: p.name) if step_dir.is_dir() else []


@dataclass(frozen=True)
class CheckpointStep:
    """One ``checkpoints/step_<N>`` directory as found on disk.

    ``parts`` maps part name (``"trainer"``, ``"orchestrator"``) to whether it is complete;
    a part that is absent maps to ``False``; ``present`` lists the parts that exist at all.
    """

    step: int
    path: AnyPath
    parts: dict[str, bool] = field(default_factory=dict)
    present: tuple[str, ...] = ()

    def complete(self, parts: tuple[str, ...] = RUN_PARTS) -> bool:
        """True iff every part in ``parts`` is complete."""
        return all(self.parts.get(p, False) for p in parts)


@dataclass(frozen=True)
class WeightsStep:
    """One ``weights/step_<N>`` directory as found on disk."""

    step: int
    path: AnyPath
    complete: bool


def _step_dirs(root: Path) -> list[tuple[int, Path]]:
    if not root.is_dir():
        return []
    found = []
    for entry in os.scandir(root):
        step = parse_step(entry.name)
        if step is not None and entry.is_dir(follow_symlinks=False):
            found.append((step, Path(entry.path)))
    return sorted(found)


def scan_checkpoints(output_dir: AnyPath | str) -> list[CheckpointStep]:
    """Inventory of ``<output_dir>/checkpoints/step_*``, ordered by step (integer order).

    Names that are not ``step_<int>`` are skipped. A missing ``checkpoints/`` gives ``[]``.
    """
    layout = RunLayout(output_dir)
    if is_remote(layout.checkpoints_dir):
        return _scan_checkpoints_remote(layout.checkpoints_dir)
    result = []
    for step, path in _step_dirs(layout.checkpoints_dir):
        trainer_dir = path / TRAINER_PART
        orch = path / ORCHESTRATOR_FILE
        present = tuple(
            name
            for name, exists in ((TRAINER_PART, trainer_dir.exists()), (ORCHESTRATOR_PART, orch.exists()))
            if exists
        )
        parts = {
            TRAINER_PART: trainer_part_complete(trainer_dir),
            ORCHESTRATOR_PART: orchestrator_part_complete(orch),
        }
        result.append(CheckpointStep(step=step, path=path, parts=parts, present=present))
    return result


def scan_weights(output_dir: AnyPath | str) -> list[WeightsStep]:
    """Inventory of ``<output_dir>/weights/step_*``, ordered by step (integer order)."""
    layout = RunLayout(output_dir)
    if is_remote(layout.weights_dir):
        return _scan_weights_remote(layout.weights_dir)
    return [
        WeightsStep(step=step, path=path, complete=weights_complete(path))
        for step, path in _step_dirs(layout.weights_dir)
    ]


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
        present = tuple(name for name, rel in ((TRAINER_PART, TRAINER_PART), (ORCHESTRATOR_PART, ORCHESTRATOR_FILE)) if rel in entries)
        parts = {
            TRAINER_PART: f"{TRAINER_PART}/{DCP_METADATA_FILE}" in entries,
            ORCHESTRATOR_PART: ORCHESTRATOR_FILE in entries,
        }
        result.append(CheckpointStep(step=step, path=path, parts=parts, present=present))
    return result


def _scan_weights_remote(weights_dir: AnyPath) -> list[WeightsStep]:
    return [
        WeightsStep(step=step, path=path, complete=WEIGHTS_MARKER in entries)
        for step, path, entries in _remote_steps(weights_dir)
    ]


def recorded_async_level(output_dir: AnyPath | str) -> int | None:
    """The async level k the run recorded (``save_info.json`` of its newest step that has one,
    written by the trainer's ``Checkpointer``), or ``None`` if no step records it. k is the
    seed's rule: resuming at checkpoint step x needs weights ``[x - k, x]``. Unreadable records
    are skipped."""
    import json

    for c in reversed(scan_checkpoints(output_dir)):
        try:
            info = json.loads((c.path / SAVE_INFO_FILE).read_bytes())
        except (OSError, ValueError):
            continue
        level = info.get("async_level") if isinstance(info, dict) else None
        if isinstance(level, int) and not isinstance(level, bool) and level >= 0:
            return level
    return None


def latest_complete_step(output_dir: AnyPath | str, parts: tuple[str, ...] = RUN_PARTS) -> int | None:
    """The highest step whose every part in ``parts`` is complete, or ``None``."""
    complete = [c.step for c in scan_checkpoints(output_dir) if c.complete(parts)]
    return max(complete) if complete else None


def _describe(steps: list[CheckpointStep], parts: tuple[str, ...]) -> str:
    if not steps:
        return "no checkpoint steps on disk"
    described = []
    for c in steps:
        missing = [p for p in parts if not c.parts.get(p, False)]
        described.append(f"{c.step}" + (f" (incomplete: {', '.join(missing)})" if missing else ""))
    return "steps on disk: " + ", ".join(described)


def resolve_resume_step(
    output_dir: AnyPath | str, resume_step: int | None, parts: tuple[str, ...] = RUN_PARTS
) -> int | None:
    """Turn ``--ckpt.resume-step`` into the step to load, or ``None`` to start fresh.

    * ``None``: start fresh (returns ``None``).
    * ``-1``: the newest step whose every part in ``parts`` is complete; with none on disk,
      logs that the run starts fresh and returns ``None``.
    * ``N >= 0``: N itself, if every part in ``parts`` is complete.

    Raises:
        CheckpointNotFoundError: an explicit step is missing or incomplete; the message names
            the path and lists the steps that exist (and which parts they lack).
        ValueError: ``resume_step < -1``.
    """
    if resume_step is None:
        return None
    if resume_step < -1:
        raise ValueError(f"--ckpt.resume-step must be -1 (latest) or a step >= 0, got {resume_step}")
    steps = scan_checkpoints(output_dir)
    if resume_step == -1:
        complete = [c.step for c in steps if c.complete(parts)]
        if not complete:
            logger.info(
                "--ckpt.resume-step -1: no complete checkpoint under %s (%s); starting fresh",
                RunLayout(output_dir).checkpoints_dir,
                _describe(steps, parts),
            )
            return None
        return max(complete)
    match = [c for c in steps if c.step == resume_step]
    path = RunLayout(output_dir).step_dir(resume_step)
    if not match:
        raise CheckpointNotFoundError(f"{path}: no such checkpoint step; {_describe(steps, parts)}")
    if not match[0].complete(parts):
        missing = [p for p in parts if not match[0].parts.get(p, False)]
        raise CheckpointNotFoundError(
            f"{path}: checkpoint step is incomplete (missing or unfinished: {', '.join(missing)}); "
            f"{_describe(steps, parts)}"
        )
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
    if any(ORCHESTRATOR_PART in c.present for c in checkpoints):
        return RUN_PARTS
    return (TRAINER_PART,)
