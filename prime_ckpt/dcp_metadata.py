"""Read a DCP checkpoint's ``.metadata`` without unsafe deserialisation (DESIGN invariant 7).

DCP writes ``trainer/.metadata`` with plain :mod:`pickle`; ``FileSystemReader.read_metadata``
reads it back with ``pickle.load``, which runs whatever a crafted file asks for. The CLI and the
inspection library read files a user points them at, so they go through
:func:`read_dcp_metadata` instead: a :class:`pickle.Unpickler` whose ``find_class`` admits only
the globals a real ``.metadata`` references (found by disassembling real files with
:mod:`pickletools`, torch 2.13):

* the DCP metadata dataclasses ``torch.distributed.checkpoint.metadata.{Metadata,
  MetadataIndex, StorageMeta, TensorStorageMetadata, TensorProperties, ChunkStorageMetadata,
  BytesStorageMetadata}``, the enum ``_MEM_FORMAT_ENCODING`` and
  ``torch.distributed.checkpoint.filesystem._StorageInfo``;
* ``torch.Size``; ``torch.<dtype>`` (``torch.float32`` ...), ``torch.<layout>`` and
  ``torch.<memory_format>`` objects (looked up by name, never called);
* ``torch.serialization._get_layout`` (how ``torch.strided`` is pickled: a lookup of the layout
  by its name in torch's own table);
* ``pathlib.PosixPath`` / ``WindowsPath`` and their pure variants (``StorageMeta.checkpoint_id``),
  also under ``pathlib._local`` (Python 3.13+); a path of the other OS's flavour comes back as
  the pure variant;
* ``collections.OrderedDict`` (older torch releases);
* torch <= 2.2: ``torch.distributed._shard.sharded_tensor.metadata.{TensorProperties,
  MEM_FORMAT_ENCODING}`` (what DCP used then), read as today's DCP classes (``LEGACY_GLOBALS``).

Everything else raises :class:`UnsafeMetadataError` before it is resolved: no import, no
attribute lookup, no call.

**Two modes, one allow-list.** With ``torch_free=False`` the admitted globals resolve to torch's
own classes and the result is DCP's ``Metadata`` (what ``dcp.load`` needs; see
:class:`SafeFileSystemReader`). With ``torch_free=True`` they resolve to small stand-ins defined
here (:class:`Metadata`, :class:`TensorStorageMetadata`, :class:`DType` ... with the same names
and attributes: ``state_dict_metadata``, ``.size``, ``.properties.dtype``, ``.chunks``,
``.offsets``, ``.sizes``, ``storage_data``, ``relative_path`` ...), so the read-only CLI
commands never import torch, whose import alone takes seconds. A stand-in dtype knows its name
and element size (``str(d) == "torch.float32"``, ``d.itemsize == 4``). The default
(``torch_free=None``) is torch-free unless torch is already imported.

So that the reader keeps working across torch 2.9-2.14, where a class may move between
``torch.distributed.checkpoint`` submodules, a global outside that list is also admitted when its
module is ``torch.distributed.checkpoint`` or below and: (torch mode) that module is already
imported (nothing is imported on a file's request) and the object is a dataclass or an
:class:`enum.Enum` subclass defined there; (torch-free mode) its name is one of the DCP classes
above. A DCP global the torch-free mode has no stand-in for makes the default mode retry with
torch, under the torch mode's rules.

**Where from.** :func:`read_dcp_metadata` takes a local path, an fsspec URL (``s3://...``) or a
UPath carrying storage options (the bytes are read through fsspec; see
:mod:`prime_ckpt.storage`); :func:`decode_metadata` decodes bytes already read (DCP's remote
reader uses it).
"""

from __future__ import annotations

import dataclasses
import enum
import io
import pickle
import re
import sys
from typing import TYPE_CHECKING, Any

from prime_ckpt.dcp_standins import (  # noqa: F401 - re-exported: the stand-in types are this module's API
    DCP_METADATA_MODULE,
    DCP_PREFIX,
    DCP_STANDINS_BY_NAME,
    DTYPES,
    LAYOUTS,
    LEGACY_GLOBALS,
    MEMORY_FORMATS,
    STANDINS,
    BytesStorageMetadata,
    ChunkStorageMetadata,
    DType,
    Layout,
    MemoryFormat,
    Metadata,
    MetadataIndex,
    PathRecord,
    Size,
    StorageMeta,
    TensorProperties,
    TensorStorageMetadata,
    foreign_path,
    is_bytes_entry,
    is_dcp_module,
    is_tensor_entry,
    resolve_stdlib,
)
from prime_ckpt.errors import PrimeCkptError
from prime_ckpt.names import DCP_METADATA_FILE
from prime_ckpt.storage import AnyPath, is_remote, to_path

if TYPE_CHECKING:
    from torch.distributed.checkpoint.metadata import Metadata as TorchMetadata


#: Exact ``(module, name)`` globals a DCP ``.metadata`` may reference (besides torch dtypes,
#: layouts and memory formats, and the DCP dataclass/enum rule; see the module docstring).
ALLOWED_GLOBALS: frozenset[tuple[str, str]] = frozenset(
    {
        ("torch.distributed.checkpoint.metadata", "Metadata"),
        ("torch.distributed.checkpoint.metadata", "MetadataIndex"),
        ("torch.distributed.checkpoint.metadata", "StorageMeta"),
        ("torch.distributed.checkpoint.metadata", "TensorStorageMetadata"),
        ("torch.distributed.checkpoint.metadata", "TensorProperties"),
        ("torch.distributed.checkpoint.metadata", "ChunkStorageMetadata"),
        ("torch.distributed.checkpoint.metadata", "BytesStorageMetadata"),
        ("torch.distributed.checkpoint.metadata", "_MEM_FORMAT_ENCODING"),
        ("torch.distributed.checkpoint.filesystem", "_StorageInfo"),
        ("torch", "Size"),
        ("torch.serialization", "_get_layout"),
        ("collections", "OrderedDict"),
    }
    | {
        (module, cls)
        for module in ("pathlib", "pathlib._local")
        for cls in ("PosixPath", "WindowsPath", "PurePosixPath", "PureWindowsPath")
    }
)


class MetadataError(PrimeCkptError, ValueError):
    """A ``.metadata`` file is missing, truncated or not DCP metadata (one line, names the path)."""


class UnsafeMetadataError(MetadataError):
    """A ``.metadata`` file references a global outside the allow-list; nothing was executed."""


class _NoStandIn(UnsafeMetadataError):
    """Torch-free mode met a DCP global it has no stand-in for (the default mode retries with torch)."""



# -- resolving globals --------------------------------------------------------------------------
def _resolve_torch(module: str, name: str) -> Any | None:
    """Torch mode: the torch object for an admitted global, or ``None`` if it is not admitted."""
    import torch

    if not name.isidentifier():  # no dotted names: pickle would getattr along the chain
        return None
    if (module, name) in LEGACY_GLOBALS:
        return vars(sys.modules[DCP_METADATA_MODULE])[LEGACY_GLOBALS[(module, name)]]
    if (module, name) in ALLOWED_GLOBALS:
        if module.startswith("pathlib") or module == "collections":
            return resolve_stdlib(module, name)
        mod = sys.modules.get(module)
        obj = vars(mod).get(name) if mod is not None else None
        if obj is not None:
            return obj
        # A listed DCP class that moved in this torch version: fall through to the DCP rule.
    if module == "torch":
        obj = vars(torch).get(name)
        return obj if isinstance(obj, (torch.dtype, torch.layout, torch.memory_format)) else None
    if (path_cls := foreign_path(module, name)) is not None:
        return path_cls
    if is_dcp_module(module):
        mod = sys.modules.get(module)
        obj = vars(mod).get(name) if mod is not None else None
        if (
            isinstance(obj, type)
            and (getattr(obj, "__module__", "") or "").startswith(DCP_PREFIX)
            and (dataclasses.is_dataclass(obj) or issubclass(obj, enum.Enum))
        ):
            return obj
    return None


def _resolve_standin(module: str, name: str) -> Any | None:
    """Torch-free mode: the stand-in for an admitted global, or ``None`` if it is not admitted.

    Raises :class:`_NoStandIn` for a DCP global that torch mode might admit but that has no
    stand-in here."""
    if not name.isidentifier():
        return None
    if (module, name) in LEGACY_GLOBALS:
        return DCP_STANDINS_BY_NAME[LEGACY_GLOBALS[(module, name)]]
    if (module, name) in ALLOWED_GLOBALS:
        if module.startswith("pathlib") or module == "collections":
            return resolve_stdlib(module, name)
        return STANDINS[(module, name)]
    if module == "torch":
        return DTYPES.get(name) or LAYOUTS.get(name) or MEMORY_FORMATS.get(name)
    if (path_cls := foreign_path(module, name)) is not None:
        return path_cls
    if is_dcp_module(module):
        obj = DCP_STANDINS_BY_NAME.get(name)
        if obj is None:
            raise _NoStandIn(f"references {module}.{name}, a DCP type the torch-free reader does not know")
        return obj
    return None


class _RestrictedUnpickler(pickle.Unpickler):
    """Admits only DCP metadata types (see the module docstring); refuses everything else."""

    def __init__(self, file: io.BufferedIOBase, path: AnyPath | str, torch_free: bool) -> None:
        super().__init__(file)
        self._path = path
        self._resolve = _resolve_standin if torch_free else _resolve_torch

    def find_class(self, module: str, name: str) -> Any:
        try:
            obj = self._resolve(module, name)
        except _NoStandIn as e:
            raise _NoStandIn(f"{self._path}: refused to load torch-free: {e} (read it with torch); nothing was executed") from None
        if obj is None:
            raise UnsafeMetadataError(
                f"{self._path}: refused to load: references {module}.{name}, which is not a DCP "
                "metadata type (crafted or foreign file?); nothing was executed"
            )
        return obj

    def persistent_load(self, pid: Any) -> Any:
        raise UnsafeMetadataError(f"{self._path}: refused to load: uses a persistent id; nothing was executed")


def metadata_path(trainer_dir: AnyPath | str) -> AnyPath:
    """``<trainer_dir>/.metadata``; a path that already names a ``.metadata`` file is kept.
    ``trainer_dir`` may be an fsspec URL or a UPath (see :func:`prime_ckpt.storage.to_path`)."""
    path = to_path(trainer_dir)
    return path if path.name == DCP_METADATA_FILE and not path.is_dir() else path / DCP_METADATA_FILE


def _unpickle(data: bytes, path: AnyPath | str, torch_free: bool) -> Any:
    if not torch_free:
        import torch.distributed.checkpoint  # noqa: F401 - the DCP modules find_class looks up
    try:
        result = _RestrictedUnpickler(io.BytesIO(data), path, torch_free).load()
    except MetadataError:
        raise
    except Exception as e:  # truncated / corrupt / not a pickle: pickle raises many types
        detail = str(e).splitlines()[0] if str(e) else ""
        raise MetadataError(
            f"{path}: not readable DCP metadata (truncated or not a pickle: {type(e).__name__}"
            + (f": {detail}" if detail else "")
            + ")"
        ) from None
    expected = Metadata if torch_free else sys.modules[DCP_METADATA_MODULE].Metadata
    if not isinstance(result, expected) or not isinstance(getattr(result, "state_dict_metadata", None), dict):
        raise MetadataError(f"{path}: not DCP metadata (holds a {type(result).__name__})")
    return result


def decode_metadata(data: bytes, where: AnyPath | str, *, torch_free: bool | None = None) -> Metadata | TorchMetadata:
    """DCP metadata from the bytes of a ``.metadata`` file, through the restricted unpickler.

    Args:
        data: the file's content.
        where: the file's path or URL (only used in error messages).
        torch_free: as in :func:`read_dcp_metadata`.
    Raises:
        UnsafeMetadataError, MetadataError: as :func:`read_dcp_metadata` (one line, starting
            with ``where``).
    """
    if not data:
        raise MetadataError(f"{where}: empty file (save did not finish?)")
    if torch_free is not None:
        return _unpickle(data, where, torch_free)
    if "torch" in sys.modules:
        return _unpickle(data, where, torch_free=False)
    try:
        return _unpickle(data, where, torch_free=True)
    except _NoStandIn:
        return _unpickle(data, where, torch_free=False)


def _read_bytes(path: AnyPath) -> bytes:
    """The bytes of a ``.metadata`` file, local or remote; ``MetadataError`` (one line) if it
    cannot be read."""
    if is_remote(path):
        try:
            return path.fs.cat_file(path.path)
        except FileNotFoundError:
            raise MetadataError(f"{path}: missing (save did not finish?)") from None
        except Exception as e:  # OSError or a backend's own type (botocore ...)
            text = " ".join(str(e).split())
            raise MetadataError(f"{path}: cannot read ({type(e).__name__}" + (f": {text})" if text else ")")) from None
    try:
        return path.read_bytes()
    except FileNotFoundError:
        raise MetadataError(f"{path}: missing (save did not finish?)") from None
    except OSError as e:
        raise MetadataError(f"{path}: cannot read ({e.strerror or type(e).__name__})") from None


#: DCP's per-rank metadata files: ``dcp.save(..., use_collectives=False)`` writes no global
#: ``.metadata``; each rank writes ``__<rank>.metadata`` describing only what it saved.
RANK_METADATA_RE = re.compile(r"^__(\d+)\.metadata$")


def rank_metadata_files(trainer_dir: AnyPath | str) -> list[AnyPath]:
    """The ``__<rank>.metadata`` files of a DCP directory saved without collectives, by rank
    (empty for a normal DCP checkpoint, a missing directory or a file)."""
    path = to_path(trainer_dir)
    try:
        names = [p.name for p in path.iterdir()] if path.is_dir() else []
    except OSError:
        return []
    found = sorted((int(m.group(1)), n) for n in names if (m := RANK_METADATA_RE.match(n)))
    return [path / n for _, n in found]


def has_dcp_metadata(trainer_dir: AnyPath | str) -> bool:
    """Whether ``trainer_dir`` holds DCP metadata: a global ``.metadata``, or per-rank
    ``__<rank>.metadata`` files (``use_collectives=False``)."""
    path = to_path(trainer_dir)
    return (path / DCP_METADATA_FILE).is_file() or bool(rank_metadata_files(path))


def merge_rank_metadata(parts: list[Any], where: AnyPath | str) -> Any:
    """One :class:`Metadata` from per-rank ones (``dcp.save(..., use_collectives=False)``): the
    union of the entries, each tensor's chunks once (a replicated tensor every rank saved keeps
    rank 0's copy, as does a non-tensor value), and the union of ``storage_data`` (keys are
    equal by name and chunk offset, as DCP's ``MetadataIndex``). The result reads as a whole
    checkpoint: DCP's planners only look chunks up by offset.

    Raises:
        MetadataError: two ranks disagree on a tensor's global size or dtype, or on whether an
            entry is a tensor (one line naming the entry).
    """
    merged = parts[0]
    entries: dict[str, Any] = {}
    storage: dict[Any, Any] = {}
    for md in parts:
        for fqn, entry in md.state_dict_metadata.items():
            have = entries.get(fqn)
            if have is None:
                entries[fqn] = dataclasses.replace(entry, chunks=list(entry.chunks)) if is_tensor_entry(entry) else entry
                continue
            if is_tensor_entry(have) != is_tensor_entry(entry) or (
                is_tensor_entry(entry)
                and (tuple(have.size) != tuple(entry.size) or str(have.properties.dtype) != str(entry.properties.dtype))
            ):
                raise MetadataError(f"{where}: ranks disagree on entry {fqn!r} (size, dtype or kind)")
            if is_tensor_entry(entry):
                seen = {tuple(c.offsets) for c in have.chunks}
                have.chunks.extend(c for c in entry.chunks if tuple(c.offsets) not in seen)
        for key, info in (md.storage_data or {}).items():
            storage.setdefault(key, info)
    merged.state_dict_metadata = entries
    merged.storage_data = storage
    if isinstance(merged.planner_data, dict):
        for md in parts[1:]:
            for k, v in (md.planner_data or {}).items() if isinstance(md.planner_data, dict) else ():
                merged.planner_data.setdefault(k, v)
    return merged


def read_dcp_metadata(trainer_dir: AnyPath | str, *, torch_free: bool | None = None) -> Metadata | TorchMetadata:
    """Read ``<trainer_dir>/.metadata`` through the restricted unpickler.

    A directory saved with ``dcp.save(..., use_collectives=False)`` has no global ``.metadata``
    but one ``__<rank>.metadata`` per rank: those are read the same way and merged
    (:func:`merge_rank_metadata`).

    Args:
        trainer_dir: a DCP checkpoint directory (``checkpoints/step_<N>/trainer``), or the
            ``.metadata`` file itself; a local path, an fsspec URL (``s3://...``, read with the
            environment's credentials) or a UPath carrying storage options.
        torch_free: ``False``: resolve to torch's classes (imports torch). ``True``: resolve to
            this module's stand-ins (never imports torch). ``None`` (default): torch-free unless
            torch is already imported; a DCP class without a stand-in retries with torch.
    Returns:
        DCP's :class:`~torch.distributed.checkpoint.metadata.Metadata`, or the stand-in
        :class:`Metadata` with the same attributes (tensor data is never read).
    Raises:
        UnsafeMetadataError: the file references a global that DCP metadata never needs.
        MetadataError: the file is missing, unreadable, truncated, not a pickle, or not DCP
            metadata. Messages are one line and start with the file's path.
    """
    path = metadata_path(trainer_dir)
    try:
        data = _read_bytes(path)
    except MetadataError:
        ranks = rank_metadata_files(path.parent) if path.name == DCP_METADATA_FILE else []
        if not ranks:
            raise
        parts = [decode_metadata(_read_bytes(p), p, torch_free=torch_free) for p in ranks]
        if len({type(p) for p in parts}) > 1:  # the default mode retried one file with torch
            parts = [decode_metadata(_read_bytes(p), p, torch_free=False) for p in ranks]
        return merge_rank_metadata(parts, path.parent)
    return decode_metadata(data, path, torch_free=torch_free)
