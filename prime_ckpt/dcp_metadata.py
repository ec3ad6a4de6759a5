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
  ``torch.<memory_format>`` objects (looked up in ``torch.__dict__``, never called);
* ``torch.serialization._get_layout`` (how ``torch.strided`` is pickled: a lookup of the layout
  by its name in torch's own table);
* ``pathlib.PosixPath`` / ``WindowsPath`` and their pure variants (``StorageMeta.checkpoint_id``),
  also under ``pathlib._local`` (Python 3.13+); a path of the other OS's flavour comes back as
  the pure variant;
* ``collections.OrderedDict`` (older torch releases).

So that the reader keeps working across torch 2.9-2.14, where a class may move between
``torch.distributed.checkpoint`` submodules, a global outside that list is also admitted when its
module is ``torch.distributed.checkpoint`` or below, that module is already imported (nothing is
imported on a file's request), and the object is a dataclass or an :class:`enum.Enum` subclass
defined there. Everything else raises :class:`UnsafeMetadataError` before it is resolved: no
import, no attribute lookup, no call.
"""

from __future__ import annotations

import dataclasses
import enum
import io
import os
import pickle
import sys
from pathlib import Path
from typing import Any

import torch
import torch.distributed.checkpoint
from torch.distributed.checkpoint.metadata import Metadata

from prime_ckpt.layout import DCP_METADATA_FILE

_DCP_PREFIX = "torch.distributed.checkpoint"

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

_TORCH_VALUE_TYPES = (torch.dtype, torch.layout, torch.memory_format)


class MetadataError(ValueError):
    """A ``.metadata`` file is missing, truncated or not DCP metadata (one line, names the path)."""


class UnsafeMetadataError(MetadataError):
    """A ``.metadata`` file references a global outside the allow-list; nothing was executed."""


def _resolve_allowed(module: str, name: str) -> Any | None:
    """The object for an admitted global, or ``None`` if it is not admitted."""
    if not name.isidentifier():  # no dotted names: pickle would getattr along the chain
        return None
    if (module, name) in ALLOWED_GLOBALS:
        if module.startswith("pathlib"):
            import pathlib

            cls = vars(pathlib).get(name)
            if cls is pathlib.WindowsPath and os.name != "nt":
                return pathlib.PureWindowsPath
            if cls is pathlib.PosixPath and os.name == "nt":
                return pathlib.PurePosixPath
            return cls
        if module == "collections":
            import collections

            return collections.OrderedDict
        mod = sys.modules.get(module)
        obj = vars(mod).get(name) if mod is not None else None
        if obj is not None:
            return obj
        # A listed DCP class that moved in this torch version: fall through to the DCP rule.
    if module == "torch":
        obj = vars(torch).get(name)
        return obj if isinstance(obj, _TORCH_VALUE_TYPES) else None
    if module == _DCP_PREFIX or module.startswith(_DCP_PREFIX + "."):
        mod = sys.modules.get(module)
        obj = vars(mod).get(name) if mod is not None else None
        if (
            isinstance(obj, type)
            and (getattr(obj, "__module__", "") or "").startswith(_DCP_PREFIX)
            and (dataclasses.is_dataclass(obj) or issubclass(obj, enum.Enum))
        ):
            return obj
    return None


class _RestrictedUnpickler(pickle.Unpickler):
    """Admits only DCP metadata types (see the module docstring); refuses everything else."""

    def __init__(self, file: io.BufferedIOBase, path: Path) -> None:
        super().__init__(file)
        self._path = path

    def find_class(self, module: str, name: str) -> Any:
        obj = _resolve_allowed(module, name)
        if obj is None:
            raise UnsafeMetadataError(
                f"{self._path}: refused to load: references {module}.{name}, which is not a DCP "
                "metadata type (crafted or foreign file?); nothing was executed"
            )
        return obj

    def persistent_load(self, pid: Any) -> Any:
        raise UnsafeMetadataError(f"{self._path}: refused to load: uses a persistent id; nothing was executed")


def metadata_path(trainer_dir: Path | str) -> Path:
    """``<trainer_dir>/.metadata``; a path that already names a ``.metadata`` file is kept."""
    path = Path(trainer_dir)
    return path if path.name == DCP_METADATA_FILE and not path.is_dir() else path / DCP_METADATA_FILE


def read_dcp_metadata(trainer_dir: Path | str) -> Metadata:
    """Read ``<trainer_dir>/.metadata`` through the restricted unpickler.

    Args:
        trainer_dir: a DCP checkpoint directory (``checkpoints/step_<N>/trainer``), or the
            ``.metadata`` file itself.
    Returns:
        The DCP :class:`~torch.distributed.checkpoint.metadata.Metadata` (tensor data is never
        read).
    Raises:
        UnsafeMetadataError: the file references a global that DCP metadata never needs.
        MetadataError: the file is missing, unreadable, truncated, not a pickle, or not DCP
            metadata. Messages are one line and start with the file's path.
    """
    path = metadata_path(trainer_dir)
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise MetadataError(f"{path}: missing (save did not finish?)") from None
    except OSError as e:
        raise MetadataError(f"{path}: cannot read ({e.strerror or type(e).__name__})") from None
    if not data:
        raise MetadataError(f"{path}: empty file (save did not finish?)")
    try:
        result = _RestrictedUnpickler(io.BytesIO(data), path).load()
    except MetadataError:
        raise
    except Exception as e:  # truncated / corrupt / not a pickle: pickle raises many types
        detail = str(e).splitlines()[0] if str(e) else ""
        raise MetadataError(
            f"{path}: not readable DCP metadata (truncated or not a pickle: {type(e).__name__}"
            + (f": {detail}" if detail else "")
            + ")"
        ) from None
    if not isinstance(result, Metadata) or not isinstance(getattr(result, "state_dict_metadata", None), dict):
        raise MetadataError(f"{path}: not DCP metadata (holds a {type(result).__name__})")
    return result


class SafeFileSystemReader(torch.distributed.checkpoint.FileSystemReader):
    """DCP's ``FileSystemReader`` with ``.metadata`` read through :func:`read_dcp_metadata`."""

    def read_metadata(self, *args: Any, **kwargs: Any) -> Metadata:
        from torch.distributed.checkpoint.metadata import StorageMeta

        metadata = read_dcp_metadata(Path(str(self.path)))
        if getattr(metadata, "storage_meta", None) is None:
            metadata.storage_meta = StorageMeta()
        metadata.storage_meta.load_id = self.load_id
        return metadata


class SafeLoadPlanner(torch.distributed.checkpoint.DefaultLoadPlanner):
    """DCP's ``DefaultLoadPlanner`` that reads non-tensor values with ``weights_only=True``.

    The default planner unpickles every non-tensor entry of a ``.distcp`` file with
    ``torch.load(weights_only=False)``; prime-ckpt only ever saves plain values there (ints,
    floats, str, None, lists, dicts), which the ``weights_only`` unpickler admits.
    """

    def load_bytes(self, read_item: Any, value: io.BytesIO) -> None:
        loaded = torch.load(value, weights_only=True)
        if self.flatten_state_dict:
            from torch.distributed.checkpoint._traverse import set_element

            set_element(self.original_state_dict, self.mappings[read_item.dest_index.fqn], loaded)
        else:
            self.state_dict[read_item.dest_index.fqn] = loaded
