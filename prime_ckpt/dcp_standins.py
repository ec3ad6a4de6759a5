"""Torch-free stand-ins for the classes a DCP ``.metadata`` pickles (same names, same attributes).

:mod:`prime_ckpt.dcp_metadata`'s torch-free mode resolves the admitted globals to these
(:class:`Metadata`, :class:`TensorStorageMetadata`, :class:`DType` ... with ``state_dict_metadata``,
``.size``, ``.properties.dtype``, ``.chunks``, ``.offsets``, ``.sizes``, ``storage_data``,
``relative_path`` ...), so the read-only CLI commands never import torch. A stand-in dtype knows
its name and element size (``str(d) == "torch.float32"``, ``d.itemsize == 4``). Also here: which
DCP globals have a stand-in (``STANDINS``), the names torch <= 2.2 used (``LEGACY_GLOBALS``),
and :func:`is_tensor_entry` / :func:`is_bytes_entry`, true for DCP's class or the stand-in.
"""

from __future__ import annotations

import enum
import os
import sys
from dataclasses import dataclass, field
from typing import Any

DCP_PREFIX = "torch.distributed.checkpoint"
DCP_METADATA_MODULE = "torch.distributed.checkpoint.metadata"


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


STANDINS: dict[tuple[str, str], Any] = {
    (DCP_METADATA_MODULE, "Metadata"): Metadata,
    (DCP_METADATA_MODULE, "MetadataIndex"): MetadataIndex,
    (DCP_METADATA_MODULE, "StorageMeta"): StorageMeta,
    (DCP_METADATA_MODULE, "TensorStorageMetadata"): TensorStorageMetadata,
    (DCP_METADATA_MODULE, "TensorProperties"): TensorProperties,
    (DCP_METADATA_MODULE, "ChunkStorageMetadata"): ChunkStorageMetadata,
    (DCP_METADATA_MODULE, "BytesStorageMetadata"): BytesStorageMetadata,
    (DCP_METADATA_MODULE, "_MEM_FORMAT_ENCODING"): _MemFormatEncoding,
    ("torch.distributed.checkpoint.filesystem", "_StorageInfo"): _StorageInfo,
    ("torch", "Size"): Size,
    ("torch.serialization", "_get_layout"): _get_layout,
}
DCP_STANDINS_BY_NAME = {name: obj for (module, name), obj in STANDINS.items() if module.startswith(DCP_PREFIX)}

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


def is_dcp_module(module: str) -> bool:
    return module == DCP_PREFIX or module.startswith(DCP_PREFIX + ".")


def _dcp_classes(name: str) -> tuple[type, ...]:
    """The stand-in class ``name`` and, when DCP is imported, DCP's own class of that name."""
    real = getattr(sys.modules.get(DCP_METADATA_MODULE), name, None)
    return (DCP_STANDINS_BY_NAME[name],) + ((real,) if isinstance(real, type) else ())


def is_tensor_entry(entry: Any) -> bool:
    """Whether a ``state_dict_metadata`` value is a tensor entry (DCP's class or the stand-in)."""
    return isinstance(entry, _dcp_classes("TensorStorageMetadata"))


def is_bytes_entry(entry: Any) -> bool:
    """Whether a ``state_dict_metadata`` value is a non-tensor entry (DCP's class or the stand-in)."""
    return isinstance(entry, _dcp_classes("BytesStorageMetadata"))


# -- paths and stdlib globals ------------------------------------------------------------------
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


def foreign_path(module: str, name: str) -> type | None:
    """:class:`PathRecord` for a universal-pathlib path class, else None."""
    if module.split(".", 1)[0] == "upath" and name.isidentifier() and name.endswith("Path"):
        return PathRecord
    return None


def resolve_stdlib(module: str, name: str) -> Any:
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
