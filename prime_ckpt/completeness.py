"""Completeness of a step's parts: does each part's last-written file exist **and read back**.

* ``trainer/.metadata`` (DCP writes it atomically after every rank's data is fsync'd) must
  decode through the restricted unpickler and every data file it names must hold the bytes it
  points at (:func:`trainer_part_problem`);
* ``orchestrator.pt`` (written by atomic rename) must parse as a progress record
  (:func:`orchestrator_part_problem`);
* ``weights/step_<N>/COMPLETE`` (written last, after the data is fsync'd) must exist with every
  shard the index names (:func:`weights_problem`).

A mark that exists but does not parse is a *problem* (a one-line reason), never "complete"
(issue 15). Parsed marks are cached by file version (path, size, mtime / ETag), so a scan after
every save re-reads no unchanged file. Only reads.
"""

from __future__ import annotations

import json
import os
from typing import Any

from prime_ckpt.dcp_metadata import MetadataError, read_dcp_metadata
from prime_ckpt.names import DCP_METADATA_FILE, MODEL_FILE, SAFETENSORS_INDEX_FILE, WEIGHTS_MARKER
from prime_ckpt.orchestrator import load_progress
from prime_ckpt.storage import AnyPath, is_remote, refresh, to_path


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
