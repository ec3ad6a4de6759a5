"""Tensor readers for checkpoints: a name -> (shape, dtype) table from metadata alone, and
tensors loaded on request, a few at a time (what ``prime-ckpt convert`` and ``diff`` read).

:func:`open_source` opens

* a DCP directory (``checkpoints/step_<N>`` or its ``trainer/``): the table is the ``.metadata``
  read through :func:`prime_ckpt.dcp_metadata.read_dcp_metadata`; tensors are loaded with DCP
  (sharded tensors come back whole) through :class:`~prime_ckpt.dcp_io.SafeFileSystemReader`
  and :class:`~prime_ckpt.dcp_io.SafeLoadPlanner`, so nothing is unpickled with full pickle;
* a weights step directory (``weights/step_<N>``) or a ``.safetensors`` file: the table is the
  safetensors header; tensors are read one by one.

``model_only=True`` restricts a DCP source to the model (``app.model.*``, or the prefix
:func:`model_prefix` detects) with that prefix stripped, which is how a DCP checkpoint lines up
with a weights directory.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch.distributed.checkpoint.metadata import (
    Metadata,
    StorageMeta,
    TensorStorageMetadata,
)

from prime_ckpt.convert_options import ConvertError
from prime_ckpt.dcp_io import SafeFileSystemReader, SafeLoadPlanner
from prime_ckpt.dcp_metadata import (
    UnsafeMetadataError,
    has_dcp_metadata,
    read_dcp_metadata,
)
from prime_ckpt.foreign import rank_shard_info
from prime_ckpt.layout import (
    DCP_METADATA_FILE,
    TRAINER_PART,
    WEIGHTS_MARKER,
    parse_step,
)
from prime_ckpt.storage import missing_reason

#: Prefix of the model's tensors in a trainer checkpoint (``Checkpointer``'s ``app`` key).
MODEL_PREFIX = "app.model."


@dataclass(frozen=True)
class TensorInfo:
    """Shape and dtype of one tensor, from metadata."""

    shape: tuple[int, ...]
    dtype: torch.dtype

    @property
    def nbytes(self) -> int:
        n = 1
        for s in self.shape:
            n *= s
        return n * self.dtype.itemsize


@dataclass
class TensorSource:
    """Tensors of one checkpoint: ``tensors`` (name -> info, from metadata) and ``load``.

    ``kind`` is ``"dcp"`` or ``"weights"``; ``non_tensors`` lists a DCP checkpoint's pickled
    values (empty for weights); ``prefix`` is the stripped name prefix (``model_only``).
    """

    kind: str
    path: Path
    tensors: dict[str, TensorInfo]
    non_tensors: list[str] = field(default_factory=list)
    prefix: str = ""
    _metadata: Metadata | None = None
    #: weights only: tensor name -> the safetensors file holding it (sharded weights dirs)
    files: dict[str, Path] = field(default_factory=dict)

    def load(self, names: Iterable[str]) -> dict[str, torch.Tensor]:
        """Load the named tensors (CPU, full/unsharded, original dtype)."""
        names = list(names)
        if self.kind == "weights":
            from safetensors import safe_open

            out: dict[str, torch.Tensor] = {}
            by_file: dict[Path, list[str]] = {}
            for n in names:
                by_file.setdefault(self.files.get(n, self.path), []).append(n)
            for file, group in by_file.items():
                with safe_open(str(file), framework="pt") as f:
                    out.update({n: f.get_tensor(n) for n in group})
            return {n: out[n] for n in names}
        sd = {self.prefix + n: torch.empty(self.tensors[n].shape, dtype=self.tensors[n].dtype) for n in names}
        dcp_load(self.path, self._metadata, sd, SafeLoadPlanner())
        return {n: sd[self.prefix + n] for n in names}

    def load_values(self, names: Iterable[str]) -> dict[str, Any]:
        """Load non-tensor (pickled) DCP entries, with ``weights_only=True``."""
        sd: dict[str, Any] = {self.prefix + n: None for n in names}
        if sd:
            dcp_load(self.path, self._metadata, sd, SafeLoadPlanner())
        return {n: sd[self.prefix + n] for n in names}

    def iter_tensors(self, names: Iterable[str] | None = None) -> Iterator[tuple[str, torch.Tensor]]:
        """``(name, tensor)`` one at a time (memory: one tensor at a time)."""
        for n in self.tensors if names is None else names:
            yield n, self.load([n])[n]


def dcp_load(path: Path, metadata: Metadata | None, sd: dict[str, Any], planner: Any) -> None:
    """Load ``sd`` in place from the DCP directory ``path`` (``metadata``: its ``.metadata``
    already read safely, or None) with ``planner``: ``_load_state_dict`` without a process
    group. A read failure becomes one
    :class:`ConvertError` naming the file (DCP wraps it in a multi-line ``CheckpointException``)."""
    from torch.distributed.checkpoint.api import CheckpointException
    from torch.distributed.checkpoint.state_dict_loader import _load_state_dict

    try:
        _load_state_dict(sd, storage_reader=_CachedReader(path, metadata), planner=planner, no_dist=True)
    except CheckpointException as e:
        failures = list(getattr(e, "failures", {}).values())
        exc = failures[0][0] if failures and isinstance(failures[0], tuple) else (failures[0] if failures else e)
        if isinstance(exc, OSError) and exc.filename:
            raise ConvertError(f"{exc.filename}: {exc.strerror or type(exc).__name__}") from None
        if isinstance(exc, UnsafeMetadataError):
            raise ConvertError(f"{path}: {exc}") from None
        detail = (str(exc).splitlines() or [""])[0]
        raise ConvertError(f"{path}: cannot load tensor data ({type(exc).__name__}: {detail}) - run `prime-ckpt verify`") from None


class _CachedReader(SafeFileSystemReader):
    """:class:`SafeFileSystemReader` that reuses metadata already read (safely) once."""

    def __init__(self, path: Path, metadata: Metadata | None) -> None:
        super().__init__(str(path))
        self._cached = metadata

    def read_metadata(self, *args: Any, **kwargs: Any) -> Metadata:
        if self._cached is None:
            return super().read_metadata(*args, **kwargs)
        if getattr(self._cached, "storage_meta", None) is None:
            self._cached.storage_meta = StorageMeta()
        self._cached.storage_meta.load_id = self.load_id
        return self._cached


# -- readers ----------------------------------------------------------------------------------
def _safetensors_files(path: Path) -> list[Path] | None:
    """The safetensors file(s) ``path`` names: itself, or a weights step dir's shards (both
    layouts, :func:`prime_ckpt.layout.weights_files`); None if it is neither."""
    from prime_ckpt.layout import MODEL_FILE, SAFETENSORS_INDEX_FILE, weights_files

    if path.is_file() and path.suffix == ".safetensors":
        return [path]
    if path.is_dir() and ((path / MODEL_FILE).is_file() or (path / SAFETENSORS_INDEX_FILE).is_file() or any(path.glob("*.safetensors"))):
        try:
            return [Path(p) for p in weights_files(path)]
        except ValueError as e:
            raise ConvertError(str(e)) from None
    return None


def dcp_dir_of(path: Path | str) -> Path | None:
    """The DCP directory ``path`` names (a ``trainer/`` or any dir with ``.metadata``, or a
    checkpoint step dir holding ``trainer/``), or ``None``."""
    path = Path(path)
    if path.is_dir() and (has_dcp_metadata(path) or path.name == TRAINER_PART):
        return path
    if path.is_dir() and (path / TRAINER_PART).is_dir():
        return path / TRAINER_PART
    return None


#: Top-level keys that hold training state other than the model, in the checkpoints of this
#: project (``app.*``), torchtitan (``optimizer``, ``lr_scheduler``, ``dataloader``,
#: ``train_state``: its model tensors are flattened to the root) and common hand-written loops.
NON_MODEL_ROOTS = frozenset({
    "app", "optimizer", "optimizers", "optim", "lr_scheduler", "lr_schedulers", "scheduler", "dataloader",
    "train_state", "rng", "rng_state", "progress", "step", "extra_state",
})


def model_prefix(keys: Iterable[str], key: str | None = None, *, where: Path | str = "") -> str:
    """The prefix under which a DCP checkpoint's model tensors live (pure).

    ``key`` given: that prefix (``"model"`` -> ``"model."``; ``""`` = the root). Else the first
    that holds tensors of: ``app.model.`` (this project), ``model.`` (``{"model": ...}`` state
    dicts, accelerate), the root minus :data:`NON_MODEL_ROOTS` (torchtitan, a plain ``dcp.save``
    of a model's state dict).

    Raises:
        ConvertError: nothing matches; names the top-level keys found and ``--key``.
    """
    keys = list(keys)
    if key is not None:
        prefix = key.strip(".") + "." if key.strip(".") else ""
        if not any(k.startswith(prefix) for k in keys):
            raise ConvertError(f"{where}: no tensors under --key {key!r} (top-level keys: {_roots(keys)})")
        return prefix
    for prefix in (MODEL_PREFIX, "model."):
        if any(k.startswith(prefix) for k in keys):
            return prefix
    if any(k.split(".", 1)[0] not in NON_MODEL_ROOTS for k in keys):
        return ""
    raise ConvertError(f"{where}: no model tensors found (top-level keys: {_roots(keys)}); choose them with --key PREFIX")


def _roots(keys: list[str]) -> str:
    roots = sorted({k.split(".", 1)[0] for k in keys})
    return ", ".join(roots[:8]) + (f" (+{len(roots) - 8} more)" if len(roots) > 8 else "") if roots else "none"


def open_dcp(trainer_dir: Path, *, model_only: bool = False, key: str | None = None) -> TensorSource:
    """A DCP directory as a :class:`TensorSource` (reads ``.metadata`` only).

    With ``model_only`` the tensors are those under the model's prefix (:func:`model_prefix`,
    ``key`` to choose it), named without it; at the root, other training state
    (:data:`NON_MODEL_ROOTS`) is left out.
    """
    if not has_dcp_metadata(trainer_dir):
        raise ConvertError(f"{trainer_dir}: {DCP_METADATA_FILE} missing (save did not finish?)")
    md = read_dcp_metadata(trainer_dir)
    tensor_keys = [k for k, e in md.state_dict_metadata.items() if isinstance(e, TensorStorageMetadata)]
    prefix = model_prefix(tensor_keys, key, where=trainer_dir) if model_only else ""
    at_root = model_only and prefix == "" and key is None
    tensors: dict[str, TensorInfo] = {}
    non_tensors: list[str] = []
    for fqn, entry in md.state_dict_metadata.items():
        if not fqn.startswith(prefix) or (at_root and fqn.split(".", 1)[0] in NON_MODEL_ROOTS):
            continue
        if isinstance(entry, TensorStorageMetadata):
            tensors[fqn[len(prefix) :]] = TensorInfo(tuple(int(s) for s in entry.size), entry.properties.dtype)
        else:
            non_tensors.append(fqn[len(prefix) :])
    if model_only and not tensors:
        raise ConvertError(f"{trainer_dir}: no model tensors ({prefix or 'root'}*) in the checkpoint")
    return TensorSource("dcp", trainer_dir, tensors, non_tensors, prefix, md)


def open_safetensors(file: Path) -> TensorSource:
    """A safetensors file as a :class:`TensorSource` (reads its header only)."""
    from prime_ckpt.inspection import SAFETENSORS_DTYPES
    from prime_ckpt.manifest import safetensors_header

    try:
        header, expected = safetensors_header(file)
        size = file.stat().st_size
    except OSError as e:
        raise ConvertError(f"{file}: cannot read ({e.strerror or type(e).__name__})") from None
    except ValueError as e:
        raise ConvertError(str(e)) from None
    if size != expected:
        raise ConvertError(f"{file}: size {size} != {expected} declared by its header (truncated?)")
    try:
        shard = rank_shard_info(file.name, header) is not None
    except ValueError as e:
        raise ConvertError(f"{file}: {e}") from None
    if shard:
        raise ConvertError(
            f"{file}: one rank's shard written by DCP's HuggingFaceStorageWriter without consolidation "
            "(DCP_SHARDING_INFO), not the full model; consolidate the shards first (DCP's consolidate_safetensors_files, "
            "or save with enable_consolidation=True) and give the consolidated files"
        )
    tensors: dict[str, TensorInfo] = {}
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        dtype = getattr(torch, SAFETENSORS_DTYPES.get(entry.get("dtype"), ""), None)
        if dtype is None:
            raise ConvertError(f"{file}: tensor {name}: unsupported dtype {entry.get('dtype')}")
        tensors[name] = TensorInfo(tuple(int(s) for s in entry["shape"]), dtype)
    return TensorSource("weights", file, dict(sorted(tensors.items())))


def open_source(path: Path | str, *, model_only: bool = False, key: str | None = None) -> TensorSource:
    """Open a checkpoint for reading tensors: a DCP dir / checkpoint step dir, a weights step
    dir or a ``.safetensors`` file.

    Raises:
        ConvertError: ``path`` is missing, incomplete, or none of the above.
        MetadataError: a DCP ``.metadata`` cannot be read safely.
    """
    path = Path(path)
    if not path.exists():
        raise ConvertError(f"{path}: {missing_reason(path)}")
    shards = _safetensors_files(path)
    if shards is not None:
        if path.is_dir() and parse_step(path.name) is not None and not (path / WEIGHTS_MARKER).is_file():
            # this project's weights step: COMPLETE is written last; other producers' HF dirs have
            # no marker (every file's header is checked against its size below)
            raise ConvertError(f"{path}: no {WEIGHTS_MARKER} marker (weights not finished?)")
        if len(shards) == 1:
            return open_safetensors(shards[0])
        tensors: dict[str, TensorInfo] = {}
        files: dict[str, Path] = {}
        for shard in shards:
            if not shard.is_file():
                raise ConvertError(f"{shard}: missing (named by the weights index)")
            part = open_safetensors(shard)
            for name, info in part.tensors.items():
                if name in tensors:
                    raise ConvertError(f"{shard}: tensor {name!r} is also in {files[name].name}")
                tensors[name], files[name] = info, shard
        return TensorSource("weights", path, dict(sorted(tensors.items())), files=files)
    trainer_dir = dcp_dir_of(path)
    if trainer_dir is not None:
        return open_dcp(trainer_dir, model_only=model_only, key=key)
    if path.is_dir() and (path / "orchestrator.pt").is_file():
        raise ConvertError(f"{path}: no {TRAINER_PART}/ directory, not a trainer checkpoint")
    kind = "a directory" if path.is_dir() else "a file"
    raise ConvertError(
        f"{path}: not a checkpoint ({kind}; expected a DCP dir, a checkpoint step_<N> dir, a weights "
        "step dir or a .safetensors file)"
    )
