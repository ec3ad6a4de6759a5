"""Names on disk: directory and file names, ``step_<N>`` parsing, and which names are ours.

Imports nothing from the package (every other module may import it). Every module that needs a
name of the layout (``docs/DESIGN.md``) takes it from here, never as a literal::

    <output_dir>/
    ├── run.json, run.lock, consumer_ack.json, superseded/
    ├── checkpoints/step_<N>/trainer/         DCP dir: .metadata + __<rank>_<n>.distcp
    ├── checkpoints/step_<N>/orchestrator.pt  orchestrator progress record
    ├── checkpoints/step_<N>/save_info.json, manifest.json
    └── weights/step_<N>/                     Hugging Face model dir, manifest.json, COMPLETE last

Rules kept here and nowhere else:

* a step directory is named ``step_<int>`` with a canonical integer (``step_10``, never
  ``step_010``): :func:`parse_step`;
* temp and delete-in-progress names of :mod:`prime_ckpt.storage` are hidden
  (``.<name>.tmp.<pid>.<n>``, ``.<name>.deleting.<pid>.<n>``) so they never parse as a step or a
  part: :func:`tmp_name`, :func:`deleting_name`, :func:`is_leftover`;
* a step directory is *ours* only when it holds nothing but names this project writes there
  (:func:`foreign_reason`; DESIGN invariant 8: delete only what is positively recognised).
"""

from __future__ import annotations

import re
from collections.abc import Iterable

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

#: The completion marks, in the order a remote delete removes them (each part's mark first, so a
#: crash mid-delete leaves a visibly incomplete step; see :func:`prime_ckpt.storage.remove_tree`).
COMPLETION_MARKS: tuple[str, ...] = (DCP_METADATA_FILE, ORCHESTRATOR_FILE, WEIGHTS_MARKER, MANIFEST_FILE)

_STEP_RE = re.compile(r"^step_(0|[1-9][0-9]*)$")

# hidden temp / delete names of prime_ckpt.storage (what a crash mid-write or mid-delete leaves)
TMP_INFIX = ".tmp."
DELETING_INFIX = ".deleting."


def parse_step(name: str) -> int | None:
    """Return N for a directory name ``step_<N>``, else ``None``.

    Only canonical integers count: ``step_10`` -> 10, while ``step_010``, ``step_-1``,
    ``step_10.tmp`` and ``latest`` -> ``None`` (not ours, never touched).
    """
    match = _STEP_RE.match(name)
    return int(match.group(1)) if match else None


def step_dirname(step: int) -> str:
    """``step_<step>``; raises ``ValueError`` for a negative step."""
    if step < 0:
        raise ValueError(f"step must be >= 0, got {step}")
    return f"step_{step}"


def shard_file_name(index: int, count: int) -> str:
    """Hugging Face's name of shard ``index`` (1-based) of ``count``:
    ``model-00001-of-00002.safetensors``; raises ``ValueError`` outside ``1..count``."""
    if not 1 <= index <= count:
        raise ValueError(f"shard index {index} not in 1..{count}")
    return f"model-{index:05d}-of-{count:05d}.safetensors"


def tmp_name(name: str, pid: int, n: int) -> str:
    """The hidden temp name a write of ``name`` goes through: ``.<name>.tmp.<pid>.<n>``."""
    return f".{name}{TMP_INFIX}{pid}.{n}"


def deleting_name(name: str, pid: int, n: int) -> str:
    """The hidden name a directory is renamed to before it is deleted: ``.<name>.deleting.<pid>.<n>``."""
    return f".{name}{DELETING_INFIX}{pid}.{n}"


def is_leftover(name: str) -> bool:
    """True for the hidden temp names of :func:`tmp_name` and :func:`deleting_name`: what a crash
    in the middle of a write or delete leaves."""
    return name.startswith(".") and (TMP_INFIX in name or DELETING_INFIX in name)


def is_tmp_leftover(name: str) -> bool:
    """True for a :func:`tmp_name` (a write's temp file, perhaps still being written)."""
    return name.startswith(".") and TMP_INFIX in name


# Names this project writes directly inside a step directory (besides crash leftovers,
# :func:`is_leftover`). Anything else makes the directory foreign.
CHECKPOINT_STEP_NAMES = frozenset({TRAINER_PART, ORCHESTRATOR_FILE, SAVE_INFO_FILE, MANIFEST_FILE})
WEIGHTS_NAME_RE = re.compile(
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
    # hidden names (.DS_Store, .nfs*, an editor's swap file) say nothing about who wrote the
    # step, except DCP's own .metadata (a DCP checkpoint saved directly in the step directory)
    others = sorted(n for n in names if not is_leftover(n) and not (n.startswith(".") and n != DCP_METADATA_FILE) and not (
        n in CHECKPOINT_STEP_NAMES if kind == "checkpoint" else WEIGHTS_NAME_RE.match(n)))
    if not others:
        return None
    if kind == "checkpoint" and DCP_METADATA_FILE in others:
        return "a DCP checkpoint saved directly in the step directory (no trainer/): not this project's layout"
    shown = ", ".join(others[:3]) + (f" (+{len(others) - 3} more)" if len(others) > 3 else "")
    return f"holds {shown}, which this project never writes there"
