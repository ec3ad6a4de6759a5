"""Other tools' checkpoint layouts, recognised so that `inspect`, `list`, `convert` and `diff`
read them as what they are (read-only: nothing here writes, and none of it is ever treated as
this project's own, so retention never deletes it).

* **torchtitan's run folder**: ``<dump_folder>/checkpoint/step-<N>/``, one DCP checkpoint per
  step (``.metadata`` + ``__<rank>_<n>.distcp``), the model's tensors flattened to the root beside
  ``optimizer`` / ``lr_scheduler`` / ``dataloader`` / ``train_state``. torchtitan resumes from
  the highest ``step-<N>`` whose ``.metadata`` exists; a step is *complete* here when its
  ``.metadata`` decodes and every data file holds the bytes it points at
  (:func:`prime_ckpt.layout.trainer_part_problem`, the rule for this project's own steps).
* **DCP's HuggingFace writer** (``torch.distributed.checkpoint.HuggingFaceStorageWriter``): with
  ``save_distributed=True`` and no consolidation each rank writes
  ``shard-<rank>-model-<i>-of-<n>.safetensors`` holding only its slices, the slice offsets in
  the header's ``__metadata__["DCP_SHARDING_INFO"]``. Such a file is not a model: its shapes are
  local. :func:`sharding_info` detects it; :func:`assembled_shapes` gives the full shapes.
  Consolidated output (``model-<i>-of-<n>.safetensors`` + ``model.safetensors.index.json``) is
  a plain HF checkpoint.

Pure functions take what was read; the two listing helpers only list directories.
"""

from __future__ import annotations

import json
import re
from typing import Any

from prime_ckpt.storage import AnyPath, to_path

#: torchtitan's checkpoint folder name under its dump folder (``--checkpoint.folder``'s default).
TITAN_FOLDER = "checkpoint"
#: torchtitan's step directory names: ``step-<N>``.
TITAN_STEP_RE = re.compile(r"^step-(\d+)$")
#: The ``__metadata__`` key DCP's HuggingFace writer records each tensor's slice offsets under.
DCP_SHARDING_KEY = "DCP_SHARDING_INFO"
#: The file names DCP's HuggingFace writer gives one rank's shard (``save_distributed=True``);
#: a rank-0 save (``model-<i>-of-<n>.safetensors``) also records DCP_SHARDING_INFO, with full
#: tensors at offset 0, and is a model.
RANK_SHARD_RE = re.compile(r"^shard-\d+-model-\d+-of-\d+\.safetensors$")
#: DCP data files (``__<rank>_<n>.distcp``): a directory holding them is a DCP checkpoint, even
#: before its ``.metadata`` is written.
DISTCP_RE = re.compile(r"^__\d+_\d+\.distcp$")


def rank_shard_info(name: str, header: dict[str, Any]) -> dict[str, list[int]] | None:
    """:func:`sharding_info` for a file called ``name`` when it is one rank's shard of an
    unconsolidated HuggingFace-writer save (its name matches :data:`RANK_SHARD_RE`), else None
    (pure)."""
    return sharding_info(header) if RANK_SHARD_RE.match(name) else None


def foreign_checkpoint_kind(directory: AnyPath | str) -> str | None:
    """What other tool's checkpoint ``directory`` is (a DCP save in progress, a torchtitan
    folder or step, HuggingFace-writer rank shards), or None. Lists one directory; used to
    refuse writing into it."""
    directory = to_path(directory)
    try:
        names = [p.name for p in directory.iterdir()] if directory.is_dir() else []
    except OSError:
        return None
    if any(DISTCP_RE.match(n) or re.match(r"^__\d+\.metadata$", n) for n in names):
        return "DCP directory"
    # torchtitan's default folder name only: a "step-<N>" directory elsewhere is not enough to
    # refuse writing below a directory (any user directory could hold one)
    if titan_step(directory.name) is not None and directory.parent.name == TITAN_FOLDER:
        return "torchtitan checkpoint step"
    if directory.name == TITAN_FOLDER and titan_steps(directory):
        return "torchtitan checkpoint folder"
    if any(RANK_SHARD_RE.match(n) for n in names):
        return "HuggingFace-writer shard directory"
    return None


def titan_step_parent(step_dir: AnyPath) -> bool:
    """Whether ``step_dir`` (named ``step-<N>``) is a directory that sits in a torchtitan
    checkpoint folder (one that holds ``step-<N>`` directories)."""
    step_dir = to_path(step_dir)
    return step_dir.is_dir() and titan_step(step_dir.name) is not None and bool(titan_steps(step_dir.parent))


def titan_step(name: str) -> int | None:
    """``N`` for a torchtitan step directory name ``step-<N>``, else None (pure)."""
    m = TITAN_STEP_RE.match(name)
    return int(m.group(1)) if m else None


def titan_steps(folder: AnyPath | str) -> list[tuple[int, AnyPath]]:
    """``[(N, folder/step-<N>)]`` sorted by N: the step directories of a torchtitan checkpoint
    folder (symlinks are not followed; entries that are not ``step-<N>`` directories are skipped)."""
    folder = to_path(folder)
    found = []
    try:
        entries = list(folder.iterdir()) if folder.is_dir() else []
    except OSError:
        return []
    for p in entries:
        n = titan_step(p.name)
        if n is not None and p.is_dir() and not p.is_symlink():
            found.append((n, p))
    return sorted(found, key=lambda t: t[0])


def titan_folder(path: AnyPath | str) -> AnyPath | None:
    """The torchtitan checkpoint folder ``path`` names: ``path`` itself when it holds
    ``step-<N>`` directories, or ``path/checkpoint`` (a dump folder); else None."""
    path = to_path(path)
    for candidate in (path, path / TITAN_FOLDER):
        if titan_steps(candidate):
            return candidate
    return None


def sharding_info(header: dict[str, Any]) -> dict[str, list[int]] | None:
    """``{tensor name: saved offsets}`` when a safetensors header (parsed JSON) is one rank's
    shard written by DCP's HuggingFace writer without consolidation, else None (pure).

    Raises:
        ValueError: the ``DCP_SHARDING_INFO`` value is not JSON mapping names to
            ``{"saved_offsets": [int, ...]}``.
    """
    meta = header.get("__metadata__")
    if not isinstance(meta, dict) or DCP_SHARDING_KEY not in meta:
        return None
    try:
        info = json.loads(meta[DCP_SHARDING_KEY])
        return {str(k): [int(o) for o in v["saved_offsets"]] for k, v in info.items()}
    except (ValueError, TypeError, KeyError, AttributeError, RecursionError):
        raise ValueError(f"unreadable {DCP_SHARDING_KEY} in the safetensors header") from None


def assembled_shapes(shards: list[dict[str, Any]]) -> dict[str, list[int]]:
    """The full shape of every tensor from the headers of all rank shards of one HuggingFace
    writer save (pure): per dimension, the furthest ``offset + local size`` any shard reaches."""
    full: dict[str, list[int]] = {}
    for header in shards:
        offsets = sharding_info(header) or {}
        for name, entry in header.items():
            if name == "__metadata__":
                continue
            shape = [int(s) for s in entry["shape"]]
            ends = [o + s for o, s in zip(offsets.get(name, [0] * len(shape)), shape)]
            have = full.setdefault(name, ends)
            full[name] = [max(a, b) for a, b in zip(have, ends)]
    return full
