"""Describing safetensors from their headers: a ``weights/step_<N>``, a bare ``.safetensors``
file, or a directory of safetensors from any producer (HF checkpoints, DCP's
``HuggingFaceStorageWriter`` rank shards).

Only headers are read (:func:`prime_ckpt.safetensors_io.safetensors_header`), never tensor data;
torch is not imported. Nothing is written.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from prime_ckpt.foreign import assembled_shapes, rank_shard_info
from prime_ckpt.inspect_common import InspectError, StepInfo, TensorEntry, dtype_name, matches, numel, read_json, remote_entries
from prime_ckpt.layout import (
    CONFIG_FILE,
    MODEL_FILE,
    WEIGHTS_MARKER,
    parse_step,
    weights_complete,
    weights_files,
)
from prime_ckpt.safetensors_io import safetensors_header, stand_in_dtype
from prime_ckpt.storage import AnyPath, is_remote, to_path


@dataclass
class WeightsStepInfo(StepInfo):
    """kind ``weights_step``: one ``weights/step_<N>``."""

    complete: bool
    files: list[dict[str, Any]]
    config: dict[str, Any] | None
    tensors: list[TensorEntry] | None
    total_bytes: int | None
    filter: str | None = None
    problems: list[str] = field(default_factory=list)



def describe_weights_step(step_dir: AnyPath | str, name_filter: str | None = None) -> WeightsStepInfo:
    """One ``weights/step_<N>``: files, ``config.json``, marker, tensors from the safetensors
    header (only the header is read, never tensor data; torch is not imported)."""
    step_dir = to_path(step_dir)
    problems: list[str] = []
    if is_remote(step_dir):
        files = [{"name": n, "size": size} for n, size in sorted(remote_entries(step_dir).items()) if size is not None]
    else:
        files = [
            {"name": entry.name, "size": entry.stat().st_size}
            for entry in sorted(step_dir.iterdir(), key=lambda e: e.name)
            if not entry.is_symlink() and entry.is_file()
        ]
    complete = weights_complete(step_dir)
    if not complete:
        problems.append(f"{step_dir}: no {WEIGHTS_MARKER} marker (weights not finished?)")
    tensors: list[TensorEntry] | None = None
    sizes = {f["name"]: f["size"] for f in files}
    try:
        shard_files = weights_files(step_dir)
    except ValueError as e:  # an unreadable index: one line, names it
        problems.append(str(e))
        shard_files = []
    for model in shard_files:
        if model.name not in sizes:
            if complete:
                problems.append(f"{model}: missing")
            continue
        found = _safetensors_tensors(model, sizes.get(model.name), name_filter, problems)
        if found is not None:
            tensors = sorted((tensors or []) + found, key=lambda t: t.name)
    if not shard_files and complete:
        problems.append(f"{step_dir / MODEL_FILE}: missing")
    return WeightsStepInfo(
        kind="weights_step",
        path=str(step_dir),
        step=parse_step(step_dir.name),
        complete=complete,
        files=files,
        config=read_json(step_dir / CONFIG_FILE, problems),
        tensors=tensors,
        total_bytes=sum(t.bytes for t in tensors) if tensors is not None else None,
        filter=name_filter,
        problems=problems,
    )


def describe_safetensors_file(file: AnyPath | str, name_filter: str | None = None) -> WeightsStepInfo:
    """A bare ``.safetensors`` file (any producer): its tensor table from the header, as for a
    weights step (``kind`` ``"safetensors_file"``, ``step`` None, ``complete`` = the header reads
    and the size matches it). Only the header is read."""
    file = to_path(file)
    problems: list[str] = []
    size = file.stat().st_size
    tensors = _safetensors_tensors(file, size, name_filter, problems)
    if tensors is None:  # the header does not read: nothing to show (exit 2, as unreadable .metadata)
        raise InspectError(problems[0])
    try:
        if tensors is not None and rank_shard_info(file.name, safetensors_header(file)[0]) is not None:
            problems.append(f"{file}: one rank's shard written by DCP's HuggingFaceStorageWriter (DCP_SHARDING_INFO): "
                            "shapes are that rank's slices, not the model's")
    except ValueError as e:
        problems.append(f"{file}: {e}")
    return WeightsStepInfo(
        kind="safetensors_file",
        path=str(file),
        step=None,
        complete=not problems,
        files=[{"name": file.name, "size": size}],
        config=None,
        tensors=tensors,
        total_bytes=sum(t.bytes for t in tensors) if tensors is not None else None,
        filter=name_filter,
        problems=problems,
    )


def _safetensors_tensors(
    model: AnyPath, size: int | None, name_filter: str | None, problems: list[str]
) -> list[TensorEntry] | None:
    """The tensor table of a safetensors file from its header (sorted by name), or ``None``
    with a problem recorded when the header cannot be read. ``size`` (the file's, if known) is
    checked against the size the header declares."""
    try:
        header, expected = safetensors_header(model)
    except ValueError as e:  # one line, names the file
        problems.append(str(e))
        return None
    except OSError as e:
        problems.append(f"{model}: cannot read ({e.strerror or type(e).__name__})")
        return None
    if size is not None and size != expected:
        problems.append(f"{model}: size {size} != {expected} declared by its header (truncated?)")
    tensors = []
    try:
        for name in sorted(k for k in header if k != "__metadata__"):
            if not matches(name, name_filter):
                continue
            shape = [int(s) for s in header[name]["shape"]]
            st_dtype = str(header[name]["dtype"])
            dtype = stand_in_dtype(st_dtype)
            nbytes = numel(shape) * dtype.itemsize if dtype is not None else 0
            if dtype is None:
                problems.append(f"{model}: tensor {name!r}: unknown dtype {st_dtype!r} (size not counted; convert/diff refuse it)")
            tensors.append(TensorEntry(name, shape, dtype_name(dtype) if dtype else st_dtype, nbytes))
    except (ValueError, KeyError, TypeError, AttributeError) as e:
        problems.append(f"{model}: unreadable safetensors header ({type(e).__name__}: {' '.join(str(e).split())})")
        return None
    return tensors


def _shard_note(where: AnyPath) -> str:
    return (f"{where}: rank shards written by DCP's HuggingFaceStorageWriter (save_distributed, not consolidated): "
            "shapes are assembled from DCP_SHARDING_INFO; convert/diff need the consolidated model-*.safetensors")


def describe_safetensors_dir(path: AnyPath | str, name_filter: str | None = None) -> WeightsStepInfo:
    """A directory of safetensors files from any producer (kind ``"safetensors_dir"``, ``step``
    None): an HF checkpoint (``model.safetensors`` or ``model-*-of-*.safetensors`` + index, e.g.
    DCP's ``HuggingFaceStorageWriter`` consolidated, torchtitan's ``last_save_in_hf``), or the
    per-rank ``shard-*`` files of an unconsolidated distributed HF-writer save, whose full shapes
    are assembled from each header's ``DCP_SHARDING_INFO`` (:mod:`prime_ckpt.foreign`) and which
    carries a problem saying it is not a model yet. ``complete``: every header reads and matches
    its file's size. Only headers are read."""
    path = to_path(path)
    problems: list[str] = []
    try:
        files = weights_files(path)
    except ValueError as e:
        files, problems = [], [str(e)]
    listed = [{"name": f.name, "size": f.stat().st_size} for f in files if f.is_file()]
    sizes = {f["name"]: f["size"] for f in listed}
    headers, tensors = [], []
    for f in files:
        if f.name not in sizes:
            problems.append(f"{f}: missing")
            continue
        try:
            header, expected = safetensors_header(f)
            shard = rank_shard_info(f.name, header) is not None
        except ValueError as e:
            problems.append(str(e) if str(e).startswith(str(f)) else f"{f}: {e}")
            continue
        if sizes[f.name] != expected:
            problems.append(f"{f}: size {sizes[f.name]} != {expected} declared by its header (truncated?)")
        if shard:
            headers.append(header)
        else:
            tensors += _safetensors_tensors(f, sizes[f.name], name_filter, []) or []
    complete = not problems
    if headers:
        problems.insert(0, _shard_note(path))
        for name, shape in sorted(assembled_shapes(headers).items()):
            if matches(name, name_filter):
                st = next(h[name]["dtype"] for h in headers if name in h)
                dtype = stand_in_dtype(str(st))
                tensors.append(TensorEntry(name, shape, dtype_name(dtype) if dtype else str(st),
                                           numel(shape) * dtype.itemsize if dtype else 0,
                                           sum(name in h for h in headers), sum(name in h for h in headers) > 1))
    tensors.sort(key=lambda t: t.name)
    return WeightsStepInfo(
        kind="safetensors_dir",
        path=str(path),
        step=None,
        complete=complete,
        files=listed,
        config=read_json(path / CONFIG_FILE, problems) if (path / CONFIG_FILE).is_file() else None,
        tensors=tensors,
        total_bytes=sum(t.bytes for t in tensors),
        filter=name_filter,
        problems=problems,
    )
