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
