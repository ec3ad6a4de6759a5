"""On-disk layout of a run: paths, ``step_<N>`` parsing, inventory and completeness.

Layout (see ``docs/DESIGN.md``)::

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
* a part is *complete* only when its last-written file exists **and reads back**:
  ``trainer/.metadata`` (DCP writes it atomically after every rank's data is fsync'd) must decode
  through the restricted unpickler and every data file it names must hold the bytes it points at;
  ``orchestrator.pt`` (written by atomic rename) must parse as a progress record;
  ``weights/step_<N>/COMPLETE`` (written last, after the data is fsync'd) must exist with every
  shard the index names. A mark that exists but does not parse is a *problem* shown by ``list``
  and ``inspect``, never "complete" (issue 15). On object storage the same files are the marks,
  written last by upload order (see :mod:`prime_ckpt.storage`);
* a step directory is *ours* only when it holds nothing but names this project writes (see
  :func:`foreign_reason`); another tool's checkpoint saved as ``checkpoints/step_<N>/`` (e.g. a
  plain DCP ``.metadata`` directly inside) is *foreign*: listed, never complete, never resumed,
  never deleted (DESIGN invariant 8);
* a checkpoint step x is *resumable* when it is complete and, in a run that publishes weights,
  the weights ``[x - async_level, x]`` it needs (the seed's rule) are complete
  (:func:`missing_weights`); ``--ckpt.resume-step -1``, ``list`` and retention use this one
  definition.

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
from typing import Any

from prime_ckpt.errors import NotResumableError
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
RUN_FILE = "run.json"  # in <output_dir>/: the live run (prime_ckpt.run.enter_run)
LEASE_FILE = "run.lock"  # in <output_dir>/: who holds the directory (prime_ckpt.run.RunLease)
SUPERSEDED_DIR = "superseded"  # in <output_dir>/: earlier runs' steps, set aside (never deleted)

#: The parts a full run (trainer + orchestrator) writes for each checkpoint step.
RUN_PARTS: tuple[str, ...] = (TRAINER_PART, ORCHESTRATOR_PART)

_STEP_RE = re.compile(r"^step_(0|[1-9][0-9]*)$")


#: A requested checkpoint step is missing, incomplete or not resumable (message lists what
#: exists); the older name of :class:`prime_ckpt.errors.NotResumableError`.
CheckpointNotFoundError = NotResumableError


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


def _stat_key(path: AnyPath) -> tuple | None:
    """What identifies one version of a file cheaply: (path, size, mtime) locally, (path, size)
    remotely; None if it is not a file."""
    try:
        if is_remote(path):
            info = path.fs.info(path.path)
            return (str(path), info.get("size"), info.get("ETag") or info.get("LastModified"))
        st = os.stat(path)
        if not os.path.isfile(path):
            return None
        return (str(path), st.st_size, st.st_mtime_ns)
    except (FileNotFoundError, NotADirectoryError):
        return None
    except OSError:
        return None


# Parsed marks by file version: a scan after every save re-reads no unchanged .metadata.
_METADATA_CACHE: dict[tuple, dict[str, int] | str] = {}
_PROGRESS_CACHE: dict[tuple, str | None] = {}
_CACHE_MAX = 4096


def _remember(cache: dict, key: tuple, value: Any) -> Any:
    if len(cache) >= _CACHE_MAX:
        cache.clear()
    cache[key] = value
    return value


def _required_sizes(meta_path: AnyPath, key: tuple) -> dict[str, int] | str:
    """``{data file: bytes it must hold at least}`` from a ``.metadata`` (cached by file
    version), or a one-line reason it does not decode."""
    if key in _METADATA_CACHE:
        return _METADATA_CACHE[key]
    from prime_ckpt.dcp_metadata import MetadataError, read_dcp_metadata

    try:
        md = read_dcp_metadata(meta_path)
    except MetadataError as e:
        return _remember(_METADATA_CACHE, key, f"unreadable .metadata ({str(e).removeprefix(str(meta_path) + ': ')})")
    required: dict[str, int] = {}
    for info in (getattr(md, "storage_data", None) or {}).values():
        rel = getattr(info, "relative_path", None)
        if not isinstance(rel, str):
            continue
        end = int(getattr(info, "offset", 0) or 0) + int(getattr(info, "length", 0) or 0)
        required[rel] = max(required.get(rel, 0), end)
    return _remember(_METADATA_CACHE, key, required)


def trainer_part_problem(trainer_dir: AnyPath | str) -> str | None:
    """Why ``trainer_dir`` is not a complete, loadable-looking DCP checkpoint, or ``None`` if it
    is: ``.metadata`` exists, decodes through the restricted unpickler, and every data file it
    names exists and holds at least the bytes its entries point at (no tensor data is read).

    Returns one of ``"no .metadata"``, ``"unreadable .metadata (...)"``,
    ``"data file <name> missing"``, ``"data file <name> truncated (<n> of <m> bytes)"``.
    """
    trainer_dir = to_path(trainer_dir)
    meta = trainer_dir / DCP_METADATA_FILE
    refresh(meta)
    key = _stat_key(meta)
    if key is None:
        return "no .metadata"
    required = _required_sizes(meta, key)
    if isinstance(required, str):
        return required
    if not required:
        return None
    if is_remote(trainer_dir):
        try:
            sizes = {_basename(i["name"]): int(i.get("size") or 0) for i in trainer_dir.fs.ls(trainer_dir.path, detail=True)}
        except OSError:
            sizes = {}
    else:
        sizes = {}
        for rel in required:
            try:
                sizes[rel] = os.stat(trainer_dir / rel).st_size
            except OSError:
                pass
    for rel, need in sorted(required.items()):
        have = sizes.get(rel)
        if have is None:
            return f"data file {rel} missing"
        if have < need:
            return f"data file {rel} truncated ({have} of {need} bytes)"
    return None


def _basename(name: str) -> str:
    """The last component of a ``/``-separated name."""
    return name.rstrip("/").rsplit("/", 1)[-1]


def trainer_part_complete(trainer_dir: AnyPath | str) -> bool:
    """True iff the DCP directory is complete and reads back (:func:`trainer_part_problem`)."""
    return trainer_part_problem(trainer_dir) is None


def orchestrator_part_problem(path: AnyPath | str) -> str | None:
    """Why ``orchestrator.pt`` is not a readable progress record, or ``None`` if it is (it only
    ever appears by atomic rename or one PUT; a file that does not parse was damaged or written
    by something else). Parsed once per file version."""
    path = to_path(path)
    refresh(path)
    key = _stat_key(path)
    if key is None:
        return "no orchestrator.pt"
    if key in _PROGRESS_CACHE:
        return _PROGRESS_CACHE[key]
    from prime_ckpt.orchestrator import load_progress

    try:
        load_progress(path)
        problem = None
    except (ValueError, OSError) as e:  # ProgressRecordError is a ValueError
        problem = f"unreadable orchestrator.pt ({str(e).removeprefix(str(path) + ': ')})"
    return _remember(_PROGRESS_CACHE, key, problem)


def orchestrator_part_complete(path: AnyPath | str) -> bool:
    """True iff ``orchestrator.pt`` exists and parses (:func:`orchestrator_part_problem`)."""
    return orchestrator_part_problem(path) is None


def weights_problem(weights_step_dir: AnyPath | str) -> str | None:
    """Why ``weights/step_<N>`` is not complete, or ``None``: ``COMPLETE`` (written last, after
    the data is fsync'd) exists and every shard the index names is present."""
    step_dir = to_path(weights_step_dir)
    if not _fresh_is_file(step_dir / WEIGHTS_MARKER):
        return "no COMPLETE"
    try:
        files = weights_files(step_dir)
    except ValueError as e:
        return str(e).removeprefix(str(step_dir) + "/")
    for f in files:
        if not f.is_file():
            return f"{f.name} missing"
    return None


def weights_complete(weights_step_dir: AnyPath | str) -> bool:
    """True iff ``weights/step_<N>`` is complete (:func:`weights_problem`)."""
    return weights_problem(weights_step_dir) is None


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
        except (ValueError, KeyError, TypeError, AttributeError, RecursionError):
            raise ValueError(f"{index}: not a safetensors index (no weight_map of tensor -> file)") from None
        bad = [n for n in names if not isinstance(n, str) or "/" in n or "\\" in n or n.startswith(".") or not n.endswith(".safetensors")]
        if bad:
            raise ValueError(f"{index}: weight_map names {bad[0]!r}, not a .safetensors file in this directory")
        return [step_dir / n for n in names]
    if (step_dir / MODEL_FILE).is_file():
        return [step_dir / MODEL_FILE]
    return sorted(step_dir.glob("*.safetensors"), key=lambda p: p.name) if step_dir.is_dir() else []


# Names this project writes directly inside a step directory (besides crash leftovers,
# :func:`prime_ckpt.storage.is_leftover`). Anything else makes the directory foreign.
CHECKPOINT_STEP_NAMES = frozenset({TRAINER_PART, ORCHESTRATOR_FILE, SAVE_INFO_FILE, MANIFEST_FILE})
_WEIGHTS_NAME_RE = re.compile(
    r"^(?:[\w.-]+\.safetensors|model\.safetensors\.index\.json|config\.json|generation_config\.json"
    r"|manifest\.json|COMPLETE|tokenizer[\w.-]*|special_tokens_map\.json|added_tokens\.json"
    r"|vocab\.[\w.]+|merges\.txt|chat_template\.[\w.]+|[\w.-]*\.model)$"
)


def foreign_reason(kind: str, names: Iterable[str]) -> str | None:
    """Why a ``step_<N>`` directory holding ``names`` is not this project's, or ``None`` if it
    is (DESIGN invariant 8: delete only what is positively recognised as ours).

    ``kind`` is ``"checkpoint"`` (ours: ``trainer/``, ``orchestrator.pt``, ``save_info.json``,
    ``manifest.json``) or ``"weights"`` (ours: safetensors shards and index, ``config.json``,
    ``generation_config.json``, tokenizer files, ``manifest.json``, ``COMPLETE``). Crash
    leftovers of this project's writes are ours; an empty directory is ours (a save creating it);
    hidden names other than DCP's ``.metadata`` (``.DS_Store``, ``.nfs*``) are not counted.
    """
    from prime_ckpt.storage import is_leftover

    # hidden names (.DS_Store, .nfs*, an editor's swap file) say nothing about who wrote the
    # step, except DCP's own .metadata (a DCP checkpoint saved directly in the step directory)
    others = sorted(n for n in names if not is_leftover(n) and not (n.startswith(".") and n != DCP_METADATA_FILE) and not (
        n in CHECKPOINT_STEP_NAMES if kind == "checkpoint" else _WEIGHTS_NAME_RE.match(n)))
    if not others:
        return None
    if kind == "checkpoint" and DCP_METADATA_FILE in others:
        return "a DCP checkpoint saved directly in the step directory (no trainer/): not this project's layout"
    shown = ", ".join(others[:3]) + (f" (+{len(others) - 3} more)" if len(others) > 3 else "")
    return f"holds {shown}, which this project never writes there"


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


def _step_dirs(root: Path) -> list[tuple[int, Path]]:
    if not root.is_dir():
        return []
    found = []
    for entry in os.scandir(root):
        step = parse_step(entry.name)
        if step is not None and entry.is_dir(follow_symlinks=False):
            found.append((step, Path(entry.path)))
    return sorted(found)


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
    for step, path in _step_dirs(layout.checkpoints_dir):
        names = _names(path)
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
    for step, path in _step_dirs(layout.weights_dir):
        names = _names(path)
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
