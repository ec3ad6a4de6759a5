"""A lean write path for DCP saves: the same ``.distcp`` files, without the zip CRC-32.

DCP's ``FileSystemWriter`` stores every tensor as a small ``torch.save`` zip inside the rank's
``.distcp`` file, and ``torch.save`` computes a CRC-32 over every byte it writes, with the
interpreter lock held, so in thread mode it also slows the training loop (``dcp.save`` of 1 GiB
on this CPU box: 2.37 s of CPU with DCP's writer, 0.59 s with this one; benchmarks/README.md). Nothing ever checks that CRC in a DCP checkpoint: ``torch.load``
does not verify it (torch's own note on ``torch.serialization.set_crc32_options``), the
``.distcp`` file is not a zip archive a zip tool would open, and prime-ckpt's integrity record
is the step's ``manifest.json`` (a hash of every file). :class:`DirectWriteMixin` writes the
same blobs (same pickle, same records, same alignment, crc field 0) through torch's zip writer
with the CRC switched off for that writer only: torch's process-wide setting is never touched,
so a ``torch.save`` the training loop makes meanwhile keeps its CRC.

Everything else is DCP's contract, unchanged: one file ``__<rank>_<n>.distcp`` per writer thread
(``thread_count``), non-tensor values first, then tensors largest first; each item resolved by the
planner just before it is written (a planner that copies holds one copy at a time, plus the first
tensor, resolved early to see where the tensors live); each tensor stored with
exactly its own bytes (a view of a larger storage is cloned first, as DCP does); files fsync'd
when ``sync_files``; a :class:`~torch.distributed.checkpoint.storage.WriteResult` per item whose
``_StorageInfo`` says where it is. DCP's reader and :mod:`prime_ckpt.loading` read the files
(``tests/test_writing.py``: bitwise equality through both, crc fields 0).

DCP's own path is kept whenever this one would not be the same thing: a writer with stream
transforms (extensions) or safetensors serialization, one file per item
(``single_file_per_rank=False``), a tensor not on the CPU (a sync save on a GPU: DCP overlaps
the device-to-host copies with the write), or a torch whose zip writer lacks the CRC switch.

Each file is hashed (XXH3-64, the manifest's algorithm) from the bytes as they are written, on
the writer thread (:mod:`xxhash` releases the interpreter lock). The digests reach rank 0 with
DCP's gathered write results and come back from ``dcp.save`` / the async upload future on the
returned ``Metadata`` (:func:`file_digests`), after ``.metadata`` is on disk without them; the
post-commit manifest then uses them instead of reading the step back (on S3: instead of
downloading it).
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import os
import pickle
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import torch
import xxhash
from torch.distributed.checkpoint.planner import SavePlan, SavePlanner, WriteItem, WriteItemType

#: the suffix of DCP's data files
DISTCP_SUFFIX = ".distcp"


#: the attribute of DCP's ``Metadata`` (as ``dcp.save`` returns it, never on disk) that holds
#: :func:`file_digests`
DIGESTS_ATTR = "prime_ckpt_file_digests"


def file_digests(metadata: Any) -> dict[str, tuple[int, str]]:
    """``{file name relative to the checkpoint directory: (size in bytes, xxh3_64 hex digest)}``
    of the data files a :class:`DirectWriteMixin` writer hashed while writing them, from the
    ``Metadata`` that ``dcp.save`` (or an async save's upload future) returned; ``{}`` when it
    holds none (another writer, DCP's fallback path, ``.metadata`` itself)."""
    return dict(getattr(metadata, DIGESTS_ATTR, None) or {})


class _HashingStream:
    """A write-through view of a binary ``stream`` that hashes (XXH3-64) every byte written, in
    order. :attr:`digest` is ``None`` once anything but appending happened (a seek, a short
    write), so a digest is only ever given for exactly the bytes of the file."""

    def __init__(self, stream: Any) -> None:
        self._stream = stream
        self._hash = xxhash.xxh3_64()
        self.nbytes = 0
        self._valid = stream.tell() == 0  # a stream opened mid-file: its digest would not be the file's

    def write(self, data: Any) -> int:
        view = memoryview(data)
        n = self._stream.write(view)
        if n is not None and n != view.nbytes:
            self._valid = False
        self._hash.update(view)
        self.nbytes += view.nbytes
        return view.nbytes if n is None else n

    def tell(self) -> int:
        return self._stream.tell()

    def seek(self, *args: Any) -> int:
        self._valid = False
        return self._stream.seek(*args)

    def flush(self) -> None:
        self._stream.flush()

    def fileno(self) -> int:
        return self._stream.fileno()

    def digest(self) -> str | None:
        """The hex digest of the file's bytes, or ``None`` if they are not exactly what was hashed."""
        if not self._valid or self._stream.tell() != self.nbytes:
            return None
        return self._hash.hexdigest()


def _storage_info_as(cls: type, info: Any) -> Any:
    """A ``cls`` (DCP's ``_StorageInfo`` or :class:`_DigestedStorageInfo`) with ``info``'s fields."""
    return cls(**{f.name: getattr(info, f.name) for f in dataclasses.fields(_StorageInfo)})


def _item_bytes(item: WriteItem) -> int:
    """Bytes of a tensor write item (its chunk's numel x element size); 0 for a value."""
    if item.type == WriteItemType.BYTE_IO or item.tensor_data is None:
        return 0
    n = 1
    for s in item.tensor_data.size:
        n *= s
    return n * item.tensor_data.properties.dtype.itemsize


def split_into_files(items: Sequence[WriteItem], files: int) -> list[list[WriteItem]]:
    """``items`` split into ``files`` lists (one per writer thread and file): values first, dealt
    in turn; then tensors, largest first, each into the list with the fewest bytes so far (the
    greedy bound: no file exceeds the average by more than the largest tensor).

    Raises:
        ValueError: ``files`` < 1.
    """
    if files < 1:
        raise ValueError(f"files must be >= 1, got {files}")
    out: list[list[WriteItem]] = [[] for _ in range(files)]
    sizes = [0] * files
    values = [it for it in items if it.type == WriteItemType.BYTE_IO]
    tensors = sorted((it for it in items if it.type != WriteItemType.BYTE_IO), key=_item_bytes, reverse=True)
    for i, it in enumerate(values):
        out[i % files].append(it)
    for it in tensors:
        k = sizes.index(min(sizes))
        out[k].append(it)
        sizes[k] += _item_bytes(it)
    return out


def _no_crc_writer_available() -> bool:
    """True if this torch's zip writer takes the CRC switch (``PyTorchFileWriter(buffer,
    compute_crc32, storage_alignment)``, torch >= 2.6) and ``torch.serialization._save``."""
    try:
        w = torch._C.PyTorchFileWriter(io.BytesIO(), False, torch.serialization._get_storage_alignment())
        w.write_end_of_file()
    except (AttributeError, TypeError, RuntimeError):
        return False
    return callable(getattr(torch.serialization, "_save", None))


_NO_CRC = _no_crc_writer_available()


def save_tensor_blob(tensor: torch.Tensor, stream: Any, alignment: int | None = None) -> None:
    """Append ``tensor`` to ``stream`` as one ``torch.save`` zip (the blob DCP stores per tensor)
    without computing its records' CRC-32 (crc fields 0); ``torch.load`` reads it unchanged.

    ``tensor`` must own exactly its bytes (a view of a larger storage would store the whole
    storage, as ``torch.save`` does). ``alignment``: bytes the data records are aligned to
    (default: torch's ``config.save.storage_alignment``, read per call: ~0.1 ms, so a writer
    reads it once per file). Falls back to ``torch.save`` where the switch is missing."""
    if not _NO_CRC:
        torch.save(tensor, stream)
        return
    if alignment is None:
        alignment = torch.serialization._get_storage_alignment()
    zip_writer = torch._C.PyTorchFileWriter(stream, False, alignment)
    try:
        torch.serialization._save(tensor, zip_writer, pickle, torch.serialization.DEFAULT_PROTOCOL, False)
    except BaseException:
        # finish the writer here, quietly: left unfinished, its C++ destructor finishes it later,
        # writes into the failed stream and throws from a destructor, which aborts the process
        with contextlib.suppress(Exception):
            zip_writer.write_end_of_file()
        raise
    zip_writer.write_end_of_file()


class DirectWriteMixin:
    """Mixed in before DCP's ``FileSystemWriter`` / ``FsspecWriter``: :meth:`write_data` writes
    each file of the rank's plan with :func:`save_tensor_blob` (no CRC), ``thread_count`` files
    in parallel, or hands the plan to DCP's own ``write_data`` (see the module docstring)."""

    def _direct_ok(self) -> bool:
        from torch.distributed.checkpoint.filesystem import SerializationFormat

        extensions = getattr(getattr(self, "transforms", None), "extensions", ())
        return (
            _NO_CRC
            and getattr(self, "single_file_per_rank", True)
            and getattr(self, "serialization_format", SerializationFormat.TORCH_SAVE) == SerializationFormat.TORCH_SAVE
            and not extensions
        )

    def write_data(self, plan: SavePlan, planner: SavePlanner) -> torch.futures.Future:
        """Write this rank's items (DCP's ``StorageWriter.write_data``); the future holds one
        ``WriteResult`` per item. Raises what the first failing file raised (``OSError`` ...)."""
        if not self._direct_ok():
            return super().write_data(plan, planner)  # type: ignore[misc]
        # Where the tensors live, from the first one (a staged async save: all on the CPU; a
        # sync save from a GPU: all on the GPU, and DCP overlaps their copies with the write).
        # Each item is resolved once, just before it is written, as DCP does: a planner that
        # copies in resolve_data (e.g. a dtype cast) holds one copy at a time, not all of them.
        first = next((it for it in plan.items if it.type != WriteItemType.BYTE_IO), None)
        resolved: dict[int, Any] = {}
        if first is not None:
            t = planner.resolve_data(first)
            if not t.is_cpu:
                del t
                return super().write_data(plan, planner)  # type: ignore[misc]
            resolved[id(first)] = t
        prefix = plan.storage_data.prefix
        # every thread's file, an empty one too (as DCP does: an older file of that name is truncated)
        files = [(f"{prefix}{n}{DISTCP_SUFFIX}", items) for n, items in enumerate(split_into_files(plan.items, self.thread_count))]

        def write_file(name: str, items: list[WriteItem]) -> list[Any]:
            return self._write_file(name, items, planner, resolved)

        if len(files) == 1:
            results = write_file(*files[0])
        else:
            with ThreadPoolExecutor(len(files), thread_name_prefix="prime-ckpt-write") as pool:
                results = [r for rs in pool.map(lambda f: write_file(*f), files) for r in rs]
        fut: torch.futures.Future = torch.futures.Future()
        fut.set_result(results)
        return fut

    def _write_file(self, name: str, items: list[WriteItem], planner: SavePlanner, resolved: dict[int, Any]) -> list[Any]:
        from torch.distributed.checkpoint.storage import WriteResult

        results = []
        alignment = torch.serialization._get_storage_alignment() if _NO_CRC else None
        with self.fs.create_stream(self.fs.concat_path(self.path, name), "wb") as raw:
            stream = _HashingStream(raw)
            for it in items:
                value = resolved.pop(id(it), None)
                if value is None:
                    value = planner.resolve_data(it)
                offset = stream.tell()
                if it.type == WriteItemType.BYTE_IO:
                    stream.write(value.getbuffer())
                else:
                    t = value.detach().cpu()  # a no-op for CPU tensors (a mixed state dict: one copy at a time)
                    if t.untyped_storage().nbytes() != t.nbytes:
                        t = t.clone()  # store exactly the tensor's bytes, not its whole storage
                    save_tensor_blob(t, stream, alignment)
                    del t
                del value  # one resolved item alive at a time
                length = stream.tell() - offset
                results.append(WriteResult(index=it.index, size_in_bytes=length,
                                           storage_data=_StorageInfo(relative_path=name, offset=offset, length=length)))
            stream.flush()
            if self.sync_files:
                try:
                    os.fsync(stream.fileno())
                except (AttributeError, io.UnsupportedOperation):
                    os.sync()
            digest = stream.digest()
        if results and digest is not None:  # the file's size and digest ride on its last result
            last = results[-1]
            info = _storage_info_as(_DigestedStorageInfo, last.storage_data)
            info.file_size, info.file_xxh3 = stream.nbytes, digest
            results[-1] = WriteResult(index=last.index, size_in_bytes=last.size_in_bytes, storage_data=info)
        return results

    def finish(self, metadata: Any, results: list[list[Any]]) -> None:  # noqa: D102 (DCP's signature)
        """DCP's ``finish`` (rank 0 writes ``.metadata``) on plain write results; then the digests
        the ranks' results carried are set on ``metadata`` (:func:`file_digests`): after the write,
        so ``.metadata`` on disk is exactly what DCP's writer would have written."""
        from torch.distributed.checkpoint.storage import WriteResult

        digests: dict[str, tuple[int, str]] = {}
        plain: list[list[Any]] = []
        for rank_results in results:
            out = []
            for wr in rank_results:
                info = wr.storage_data
                if isinstance(info, _DigestedStorageInfo):
                    digests[info.relative_path] = (info.file_size, info.file_xxh3)
                    wr = WriteResult(index=wr.index, size_in_bytes=wr.size_in_bytes, storage_data=_storage_info_as(_StorageInfo, info))
                out.append(wr)
            plain.append(out)
        super().finish(metadata, plain)  # type: ignore[misc]
        with contextlib.suppress(AttributeError, TypeError):  # a Metadata that takes no attributes: no digests
            setattr(metadata, DIGESTS_ATTR, digests)


# The writers dcp_io.dcp_writer hands to DCP: module-level classes, so a process-mode async save
# can pickle them into its writer process.
from torch.distributed.checkpoint import FileSystemWriter  # noqa: E402
from torch.distributed.checkpoint.filesystem import _StorageInfo  # noqa: E402


class _DigestedStorageInfo(_StorageInfo):
    """DCP's ``_StorageInfo`` plus the size and XXH3-64 digest of its whole file, on the way to
    rank 0 only: :meth:`DirectWriteMixin.finish` turns it back into a plain ``_StorageInfo``
    before ``.metadata`` is written (a checkpoint never needs prime-ckpt to be read)."""

    file_size: int = 0
    file_xxh3: str = ""


class DirectFileSystemWriter(DirectWriteMixin, FileSystemWriter):
    """DCP's ``FileSystemWriter`` with :class:`DirectWriteMixin`'s write path (local paths)."""


def _fsspec_writer_base() -> type:
    try:
        from torch.distributed.checkpoint._fsspec_filesystem import FsspecWriter
    except ImportError:
        from torch.distributed.checkpoint import FsspecWriter
    return FsspecWriter


class DirectFsspecWriter(DirectWriteMixin, _fsspec_writer_base()):  # type: ignore[misc]
    """DCP's ``FsspecWriter`` with :class:`DirectWriteMixin`'s write path (remote paths)."""
