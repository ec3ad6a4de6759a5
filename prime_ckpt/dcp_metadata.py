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
import functools
import io
import os
import pickle
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from prime_ckpt.layout import DCP_METADATA_FILE
from prime_ckpt.storage import AnyPath, is_remote, to_path

if TYPE_CHECKING:
    from torch.distributed.checkpoint.metadata import Metadata as TorchMetadata

_DCP_PREFIX = "torch.distributed.checkpoint"
_DCP_METADATA_MODULE = "torch.distributed.checkpoint.metadata"

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


class MetadataError(ValueError):
    """A ``.metadata`` file is missing, truncated or not DCP metadata (one line, names the path)."""


class UnsafeMetadataError(MetadataError):
    """A ``.metadata`` file references a global outside the allow-list; nothing was executed."""


class _NoStandIn(UnsafeMetadataError):
    """Torch-free mode met a DCP global it has no stand-in for (the default mode retries with torch)."""


# -- torch-free stand-ins -----------------------------------------------------------------------
@dataclass(frozen=True, repr=False)
class _TorchConstant:
    """A named torch constant (``torch.<name>``) without torch."""

    name: str

    def __repr__(self) -> str:
        return f"torch.{self.name}"


@dataclass(frozen=True, repr=False)
class DType(_TorchConstant):
    """Stand-in for a ``torch.dtype``: ``str(d) == "torch.float32"``, ``d.itemsize`` in bytes."""

    itemsize: int = 0


class Layout(_TorchConstant):
    """Stand-in for a ``torch.layout`` (``torch.strided`` ...)."""


class MemoryFormat(_TorchConstant):
    """Stand-in for a ``torch.memory_format`` (``torch.contiguous_format`` ...)."""


#: Element size in bytes of every torch dtype, by its canonical name (torch 2.13;
#: ``tests/test_dcp_metadata.py`` checks this table against the installed torch).
_DTYPE_ITEMSIZE: dict[str, int] = {
    "bool": 1, "uint8": 1, "int8": 1, "int16": 2, "int32": 4, "int64": 8,
    "uint16": 2, "uint32": 4, "uint64": 8,
    "float16": 2, "bfloat16": 2, "float32": 4, "float64": 8,
    "complex32": 4, "complex64": 8, "complex128": 16,
    "float8_e5m2": 1, "float8_e4m3fn": 1, "float8_e5m2fnuz": 1, "float8_e4m3fnuz": 1,
    "float8_e8m0fnu": 1, "float4_e2m1fn_x2": 1,
    "qint8": 1, "quint8": 1, "qint32": 4, "quint4x2": 1, "quint2x4": 1,
    "bits1x8": 1, "bits2x4": 1, "bits4x2": 1, "bits8": 1, "bits16": 2,
    "uint1": 1, "uint2": 1, "uint3": 1, "uint4": 1, "uint5": 1, "uint6": 1, "uint7": 1,
    "int1": 1, "int2": 1, "int3": 1, "int4": 1, "int5": 1, "int6": 1, "int7": 1,
}  # fmt: skip

#: ``torch.<alias>`` names of dtypes (``torch.float`` is ``torch.float32``).
_DTYPE_ALIASES: dict[str, str] = {
    "short": "int16", "int": "int32", "long": "int64", "half": "float16", "float": "float32",
    "double": "float64", "chalf": "complex32", "cfloat": "complex64", "cdouble": "complex128",
    "bit": "uint1",
}  # fmt: skip

#: Stand-in dtypes by every name torch has for them (``DTYPES["float"] is DTYPES["float32"]``).
DTYPES: dict[str, DType] = {n: DType(n, size) for n, size in _DTYPE_ITEMSIZE.items()}
DTYPES.update({alias: DTYPES[name] for alias, name in _DTYPE_ALIASES.items()})

LAYOUTS: dict[str, Layout] = {
    n: Layout(n) for n in ("strided", "sparse_coo", "sparse_csr", "sparse_csc", "sparse_bsr", "sparse_bsc", "_mkldnn", "jagged")
}
MEMORY_FORMATS: dict[str, MemoryFormat] = {
    n: MemoryFormat(n) for n in ("contiguous_format", "channels_last", "channels_last_3d", "preserve_format")
}
MEMORY_FORMATS["legacy_contiguous_format"] = MEMORY_FORMATS["contiguous_format"]


def _get_layout(name: str) -> Layout:
    """Stand-in for ``torch.serialization._get_layout``: ``"torch.strided"`` -> the layout
    (``KeyError`` for a name torch does not know either)."""
    if not isinstance(name, str) or not name.startswith("torch."):
        raise KeyError(name)
    return LAYOUTS[name.removeprefix("torch.")]


class Size(tuple):
    """Stand-in for ``torch.Size``: a tuple of ints."""

    __slots__ = ()

    def __repr__(self) -> str:
        return f"torch.Size({list(self)!r})"


class _MemFormatEncoding(enum.Enum):
    """Stand-in for DCP's ``_MEM_FORMAT_ENCODING`` (how ``TensorProperties`` pickles its memory format)."""

    TORCH_CONTIGUOUS_FORMAT = 0
    TORCH_CHANNELS_LAST = 1
    TORCH_PRESERVE_FORMAT = 2


_DECODED_MEMORY_FORMAT = {
    _MemFormatEncoding.TORCH_CONTIGUOUS_FORMAT: MEMORY_FORMATS["contiguous_format"],
    _MemFormatEncoding.TORCH_CHANNELS_LAST: MEMORY_FORMATS["channels_last"],
    _MemFormatEncoding.TORCH_PRESERVE_FORMAT: MEMORY_FORMATS["preserve_format"],
}


@dataclass
class ChunkStorageMetadata:
    """Stand-in: one stored chunk of a tensor (global ``offsets`` and ``sizes``)."""

    offsets: Size | None = None
    sizes: Size | None = None


@dataclass
class TensorProperties:
    """Stand-in: dtype, layout, ... of a stored tensor."""

    dtype: DType | None = None
    layout: Layout | None = None
    requires_grad: bool = False
    memory_format: MemoryFormat | None = None
    pin_memory: bool = False

    def __setstate__(self, state: Any) -> None:
        # DCP pickles (dtype, layout, requires_grad, _MEM_FORMAT_ENCODING, pin_memory).
        if isinstance(state, dict):
            self.__dict__.update(state)
            return
        self.dtype, self.layout, self.requires_grad, encoding, self.pin_memory = state
        if encoding not in _DECODED_MEMORY_FORMAT:
            raise ValueError(f"invalid memory format encoding {encoding!r}")
        self.memory_format = _DECODED_MEMORY_FORMAT[encoding]


@dataclass
class TensorStorageMetadata:
    """Stand-in: a tensor entry (``properties``, global ``size``, stored ``chunks``)."""

    properties: TensorProperties | None = None
    size: Size | None = None
    chunks: list[ChunkStorageMetadata] | None = None


@dataclass
class BytesStorageMetadata:
    """Stand-in: a non-tensor (pickled value) entry."""


@dataclass
class StorageMeta:
    """Stand-in: ids of the save."""

    checkpoint_id: Any = None
    save_id: str | None = None
    load_id: str | None = None
    modules: list[str] | None = None


@dataclass
class Metadata:
    """Stand-in for DCP's ``Metadata`` (same attribute names)."""

    state_dict_metadata: dict[str, Any] | None = None
    planner_data: Any = None
    storage_data: Any = None
    storage_meta: StorageMeta | None = None
    version: str | None = None


@dataclass(frozen=True)
class MetadataIndex:
    """Stand-in: the key of ``Metadata.storage_data`` (equal and hashed by ``fqn`` and ``offset``)."""

    fqn: str = ""
    offset: Size | None = None
    index: int | None = field(default=None, hash=False, compare=False)


@dataclass
class _StorageInfo:
    """Stand-in for the filesystem storage's per-item location (file, byte offset, length)."""

    relative_path: str | None = None
    offset: int | None = None
    length: int | None = None
    transform_descriptors: Any = None


_STANDINS: dict[tuple[str, str], Any] = {
    (_DCP_METADATA_MODULE, "Metadata"): Metadata,
    (_DCP_METADATA_MODULE, "MetadataIndex"): MetadataIndex,
    (_DCP_METADATA_MODULE, "StorageMeta"): StorageMeta,
    (_DCP_METADATA_MODULE, "TensorStorageMetadata"): TensorStorageMetadata,
    (_DCP_METADATA_MODULE, "TensorProperties"): TensorProperties,
    (_DCP_METADATA_MODULE, "ChunkStorageMetadata"): ChunkStorageMetadata,
    (_DCP_METADATA_MODULE, "BytesStorageMetadata"): BytesStorageMetadata,
    (_DCP_METADATA_MODULE, "_MEM_FORMAT_ENCODING"): _MemFormatEncoding,
    ("torch.distributed.checkpoint.filesystem", "_StorageInfo"): _StorageInfo,
    ("torch", "Size"): Size,
    ("torch.serialization", "_get_layout"): _get_layout,
}
_DCP_STANDINS_BY_NAME = {name: obj for (module, name), obj in _STANDINS.items() if module.startswith(_DCP_PREFIX)}

_LEGACY_MODULE = "torch.distributed._shard.sharded_tensor.metadata"
#: Globals that DCP metadata written by torch <= 2.2 references, by the current DCP name they
#: mean: DCP then reused the sharded-tensor module's ``TensorProperties`` (same fields, same
#: ``(dtype, layout, requires_grad, encoding, pin_memory)`` pickled state) and its enum.
#: They are read as today's DCP classes (torch mode) or the stand-ins (torch-free), so every
#: reader sees one set of types; torch 2.13's ``dcp.load`` still reads such files.
LEGACY_GLOBALS: dict[tuple[str, str], str] = {
    (_LEGACY_MODULE, "TensorProperties"): "TensorProperties",
    (_LEGACY_MODULE, "MEM_FORMAT_ENCODING"): "_MEM_FORMAT_ENCODING",
}


def _is_dcp_module(module: str) -> bool:
    return module == _DCP_PREFIX or module.startswith(_DCP_PREFIX + ".")


def _dcp_classes(name: str) -> tuple[type, ...]:
    """The stand-in class ``name`` and, when DCP is imported, DCP's own class of that name."""
    real = getattr(sys.modules.get(_DCP_METADATA_MODULE), name, None)
    return (_DCP_STANDINS_BY_NAME[name],) + ((real,) if isinstance(real, type) else ())


def is_tensor_entry(entry: Any) -> bool:
    """Whether a ``state_dict_metadata`` value is a tensor entry (DCP's class or the stand-in)."""
    return isinstance(entry, _dcp_classes("TensorStorageMetadata"))


def is_bytes_entry(entry: Any) -> bool:
    """Whether a ``state_dict_metadata`` value is a non-tensor entry (DCP's class or the stand-in)."""
    return isinstance(entry, _dcp_classes("BytesStorageMetadata"))


# -- resolving globals --------------------------------------------------------------------------
class PathRecord(str):
    """What a universal-pathlib path (``upath.*UPath``) in ``StorageMeta.checkpoint_id`` reads back
    as: its text, nothing else (``dcp.save(..., checkpoint_id=UPath(...))`` records it there;
    only the text is informative, and building a real UPath from a file could reach a file
    system). Construction and state restore take any arguments and run nothing."""

    def __new__(cls, *args: Any, **kwargs: Any) -> PathRecord:
        import posixpath

        parts = [a for a in args if isinstance(a, str)]
        return str.__new__(cls, posixpath.join(*parts) if parts else "")

    def __setstate__(self, state: Any) -> None:
        pass


def _foreign_path(module: str, name: str) -> type | None:
    """:class:`PathRecord` for a universal-pathlib path class, else None."""
    if module.split(".", 1)[0] == "upath" and name.isidentifier() and name.endswith("Path"):
        return PathRecord
    return None


def _resolve_stdlib(module: str, name: str) -> Any:
    """An admitted ``pathlib`` / ``collections`` global (the same object in both modes)."""
    if module == "collections":
        import collections

        return collections.OrderedDict
    import pathlib

    cls = vars(pathlib).get(name)
    if cls is pathlib.WindowsPath and os.name != "nt":
        return pathlib.PureWindowsPath
    if cls is pathlib.PosixPath and os.name == "nt":
        return pathlib.PurePosixPath
    return cls


def _resolve_torch(module: str, name: str) -> Any | None:
    """Torch mode: the torch object for an admitted global, or ``None`` if it is not admitted."""
    import torch

    if not name.isidentifier():  # no dotted names: pickle would getattr along the chain
        return None
    if (module, name) in LEGACY_GLOBALS:
        return vars(sys.modules[_DCP_METADATA_MODULE])[LEGACY_GLOBALS[(module, name)]]
    if (module, name) in ALLOWED_GLOBALS:
        if module.startswith("pathlib") or module == "collections":
            return _resolve_stdlib(module, name)
        mod = sys.modules.get(module)
        obj = vars(mod).get(name) if mod is not None else None
        if obj is not None:
            return obj
        # A listed DCP class that moved in this torch version: fall through to the DCP rule.
    if module == "torch":
        obj = vars(torch).get(name)
        return obj if isinstance(obj, (torch.dtype, torch.layout, torch.memory_format)) else None
    if (path_cls := _foreign_path(module, name)) is not None:
        return path_cls
    if _is_dcp_module(module):
        mod = sys.modules.get(module)
        obj = vars(mod).get(name) if mod is not None else None
        if (
            isinstance(obj, type)
            and (getattr(obj, "__module__", "") or "").startswith(_DCP_PREFIX)
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
        return _DCP_STANDINS_BY_NAME[LEGACY_GLOBALS[(module, name)]]
    if (module, name) in ALLOWED_GLOBALS:
        if module.startswith("pathlib") or module == "collections":
            return _resolve_stdlib(module, name)
        return _STANDINS[(module, name)]
    if module == "torch":
        return DTYPES.get(name) or LAYOUTS.get(name) or MEMORY_FORMATS.get(name)
    if (path_cls := _foreign_path(module, name)) is not None:
        return path_cls
    if _is_dcp_module(module):
        obj = _DCP_STANDINS_BY_NAME.get(name)
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
    expected = Metadata if torch_free else sys.modules[_DCP_METADATA_MODULE].Metadata
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


# -- loading with torch -------------------------------------------------------------------------
def _value_safe_globals() -> list[Any]:
    """What non-tensor DCP values may hold beyond ``weights_only``'s defaults: ``io.BytesIO`` (a
    documented DCP value type) and numpy arrays (array reconstruction, ``ndarray``, ``dtype`` and
    the numeric dtype classes). None of them runs code on load; anything else stays refused."""
    import numpy as np

    multiarray = np._core.multiarray if hasattr(np, "_core") else np.core.multiarray
    numeric = (np.bool_, np.int8, np.int16, np.int32, np.int64, np.uint8, np.uint16, np.uint32, np.uint64,
               np.float16, np.float32, np.float64, np.complex64, np.complex128)
    return [io.BytesIO, multiarray._reconstruct, np.ndarray, np.dtype, *{type(np.dtype(t)) for t in numeric}]


_GLOBAL_RE = re.compile(r"GLOBAL ([\w.]+)")


def load_value(data: io.BytesIO, name: str) -> Any:
    """One non-tensor DCP value (``torch.save`` bytes) with ``torch.load(weights_only=True)`` plus
    :func:`_value_safe_globals`.

    Raises:
        UnsafeMetadataError: the value references anything else (one line naming the entry and
            the refused type; nothing was executed).
    """
    import pickle

    import torch

    try:
        with torch.serialization.safe_globals(_value_safe_globals()):
            return torch.load(data, weights_only=True)
    except pickle.UnpicklingError as e:
        found = _GLOBAL_RE.search(str(e))
        what = f"a {found.group(1)}" if found else "a value the weights-only unpickler refuses"
        raise UnsafeMetadataError(
            f"entry {name!r} holds {what}: refused to load (tensors, plain values, numpy arrays and BytesIO are read); "
            "nothing was executed"
        ) from None


@functools.cache
def _torch_loaders() -> dict[str, type]:
    """Define the classes that subclass DCP's (on first use, so importing this module does not
    import torch)."""
    import torch.distributed.checkpoint as dcp

    class SafeFileSystemReader(dcp.FileSystemReader):
        """DCP's ``FileSystemReader`` with ``.metadata`` read through :func:`read_dcp_metadata`."""

        def read_metadata(self, *args: Any, **kwargs: Any) -> TorchMetadata:
            from torch.distributed.checkpoint.metadata import StorageMeta

            metadata = read_dcp_metadata(Path(str(self.path)), torch_free=False)
            if getattr(metadata, "storage_meta", None) is None:
                metadata.storage_meta = StorageMeta()
            metadata.storage_meta.load_id = self.load_id
            return metadata

    class SafeLoadPlanner(dcp.DefaultLoadPlanner):
        """DCP's ``DefaultLoadPlanner`` that reads non-tensor values with :func:`load_value`.

        The default planner unpickles every non-tensor entry of a ``.distcp`` file with
        ``torch.load(weights_only=False)``; prime-ckpt only ever saves plain values there (ints,
        floats, str, None, lists, dicts), which the ``weights_only`` unpickler admits; other tools
        also save ``io.BytesIO`` values and numpy arrays (``np.random.get_state()``), admitted by
        name.
        """

        def load_bytes(self, read_item: Any, value: io.BytesIO) -> None:
            loaded = load_value(value, read_item.dest_index.fqn)
            if self.flatten_state_dict:
                from torch.distributed.checkpoint._traverse import set_element

                set_element(self.original_state_dict, self.mappings[read_item.dest_index.fqn], loaded)
            else:
                self.state_dict[read_item.dest_index.fqn] = loaded

    classes: dict[str, type] = {"SafeFileSystemReader": SafeFileSystemReader, "SafeLoadPlanner": SafeLoadPlanner}
    for name, cls in classes.items():
        cls.__qualname__ = name  # importable (and picklable) as prime_ckpt.dcp_metadata.<name>
    return classes


def __getattr__(name: str) -> Any:
    """``SafeFileSystemReader`` / ``SafeLoadPlanner`` (DCP subclasses; importing them imports torch)."""
    if name in ("SafeFileSystemReader", "SafeLoadPlanner"):
        return _torch_loaders()[name]
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
