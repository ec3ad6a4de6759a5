"""DCP reader/writer glue in one place: the storage writers and readers a save or load uses,
and the DCP subclasses that read ``.metadata`` and non-tensor values without unsafe unpickling.

* :func:`dcp_writer` / :func:`dcp_reader`: DCP's ``FileSystemWriter`` / ``FsspecWriter`` for a
  local or remote checkpoint directory; the readers read ``.metadata`` through the restricted
  unpickler of :mod:`prime_ckpt.dcp_metadata` and tensors straight into their target shards
  (:class:`prime_ckpt.loading.DirectReadMixin`).
* :class:`SafeFileSystemReader` (DCP's ``FileSystemReader`` with the restricted ``.metadata``
  reader) and :class:`SafeLoadPlanner` (non-tensor values through :func:`load_value`): defined
  on first use (module ``__getattr__``), so importing this module does not import torch.
"""

from __future__ import annotations

import functools
import io
import re
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn

from prime_ckpt.dcp_metadata import MetadataError, UnsafeMetadataError, decode_metadata, read_dcp_metadata
from prime_ckpt.names import DCP_METADATA_FILE
from prime_ckpt.storage import AnyPath, is_remote, one_line, storage_options_of, to_path

if TYPE_CHECKING:
    from torch.distributed.checkpoint.metadata import Metadata
    from torch.distributed.checkpoint.metadata import Metadata as TorchMetadata


def _fsspec_dcp_class(name: str) -> type:
    """``FsspecWriter`` / ``FsspecReader`` of this torch (private module, public fallback)."""
    try:
        from torch.distributed.checkpoint import _fsspec_filesystem

        return getattr(_fsspec_filesystem, name)
    except (ImportError, AttributeError):
        import torch.distributed.checkpoint as dcp

        return getattr(dcp, name)


def dcp_writer(trainer_dir: AnyPath | str, storage_options: dict[str, Any] | None = None, *, thread_count: int = 1):
    """The DCP ``StorageWriter`` for a checkpoint directory; ``thread_count`` writer threads per
    rank, each writing one file ``__<rank>_<n>.distcp`` (``n < thread_count``).

    Local: DCP's ``FileSystemWriter`` (fsync'd files, ``.metadata`` renamed into place last).
    Remote: DCP's ``FsspecWriter`` with the path's storage options; ``sync_files`` is off (an
    uploaded object is durable once its upload returns; DCP's fsync fallback would ``os.sync()``
    the local machine instead), ``.metadata`` is still written last, by the coordinator.
    Either way tensors are stored without the zip CRC-32 nobody checks
    (:class:`prime_ckpt.writing.DirectWriteMixin`; same files, DCP's reader reads them).
    """
    from prime_ckpt.writing import DirectFileSystemWriter, DirectFsspecWriter

    path = to_path(trainer_dir, storage_options)
    if not is_remote(path):
        return DirectFileSystemWriter(str(path), thread_count=thread_count)
    return DirectFsspecWriter(str(path), sync_files=False, thread_count=thread_count, **storage_options_of(path))


def dcp_reader(trainer_dir: AnyPath | str, storage_options: dict[str, Any] | None = None):
    """The DCP ``StorageReader`` for a checkpoint directory; ``.metadata`` is read through the
    restricted unpickler either way (:class:`SafeFileSystemReader`
    locally, :func:`_safe_fsspec_reader` remotely), and tensors are read straight into their
    target shards either way (:class:`prime_ckpt.loading.DirectReadMixin`)."""
    path = to_path(trainer_dir, storage_options)
    if not is_remote(path):
        return _direct_local_reader()(str(path))
    return _safe_fsspec_reader()(str(path), **storage_options_of(path))


@functools.cache
def _direct_local_reader() -> type:
    """``SafeFileSystemReader`` with the direct read path of :mod:`prime_ckpt.loading`."""
    from prime_ckpt.loading import DirectReadMixin

    return type("DirectSafeFileSystemReader", (DirectReadMixin, _torch_loaders()["SafeFileSystemReader"]), {})


@functools.cache
def _safe_fsspec_reader() -> type:
    """DCP's ``FsspecReader`` with ``.metadata`` read through the restricted unpickler (the
    remote twin of ``SafeFileSystemReader``) and the direct read path of
    :mod:`prime_ckpt.loading`: DCP's own path runs ``torch.load`` on a slice of the remote file
    for every tensor, whose zip parsing seeks back and forth and makes the fsspec file re-fetch
    blocks; the direct path reads each tensor's first 4 KiB, its bytes, then its last 4 KiB (the
    zip directory that confirms where the bytes were), in file order, through the file's
    read-ahead cache."""
    from prime_ckpt.loading import DirectReadMixin, with_load_id

    base = _fsspec_dcp_class("FsspecReader")

    class SafeFsspecReader(DirectReadMixin, base):  # type: ignore[misc, valid-type]
        def read_metadata(self, *args: Any, **kwargs: Any) -> Metadata:
            where = str(self.fs.concat_path(self.path, DCP_METADATA_FILE))
            try:
                data = self.fs.fs.cat_file(where)
            except FileNotFoundError:
                data = None
            except Exception as e:
                _raise_metadata_error(f"{where}: cannot read ({one_line(e)})")
            return with_load_id(decode_dcp_metadata(data, where), self.load_id)

    return SafeFsspecReader


def _raise_metadata_error(message: str) -> NoReturn:
    raise MetadataError(message) from None


def decode_dcp_metadata(data: bytes | None, where: str) -> Metadata:
    """DCP metadata (torch's classes, what ``dcp.load`` needs) from the bytes of a ``.metadata``
    file (``None``: the file is missing), through
    :func:`prime_ckpt.dcp_metadata.decode_metadata` (the restricted unpickler), with the same
    one-line errors as :func:`prime_ckpt.dcp_metadata.read_dcp_metadata`."""
    if data is None:
        _raise_metadata_error(f"{where}: missing (save did not finish?)")
    return decode_metadata(data, where, torch_free=False)


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
            from prime_ckpt.loading import with_load_id

            return with_load_id(read_dcp_metadata(Path(str(self.path)), torch_free=False), self.load_id)

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
        cls.__qualname__ = name  # importable (and picklable) as prime_ckpt.dcp_io.<name>
    return classes


def __getattr__(name: str) -> Any:
    """``SafeFileSystemReader`` / ``SafeLoadPlanner`` (DCP subclasses; importing them imports torch)."""
    if name in ("SafeFileSystemReader", "SafeLoadPlanner"):
        return _torch_loaders()[name]
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
