"""A copy-free read path for DCP loads: each saved tensor is read straight into its target.

DCP's ``FileSystemReader.read_data`` runs ``torch.load`` on every stored tensor (each one is a
small ``torch.save`` zip inside the ``.distcp`` file), which allocates fresh memory for it (page
faults), reads the file in many small pieces, and then copies the result into the live shard.
On this CPU box that made a load 4-5x slower than reading the same bytes (``load_vs_raw_read``
in ``benchmarks/``). :class:`DirectReadMixin` reads the tensor's bytes from the file directly
into the target shard instead: one copy, from the page cache into memory that is already there.

It does so only when that is provably the same result, and hands every other item to DCP's own
path unchanged:

* the item is a tensor without storage transforms (no compression/extension), the target is a
  contiguous CPU tensor of the same dtype;
* the stored blob is a ``torch.save`` zip whose ``data.pkl`` is exactly one
  ``torch._utils._rebuild_tensor_v2`` of one little-endian, uncompressed storage, with storage
  offset 0 and contiguous strides (read with a restricted unpickler that admits only those
  globals: nothing is executed);
* the requested region (``req.storage_offsets`` / ``req.lengths``, resharding) is one contiguous
  byte range of the stored tensor: every dim before the last narrowed one has length 1.

Bitwise equality with DCP's path is tested in ``tests/test_loading.py``.
"""

from __future__ import annotations

import collections
import io
import math
import pickle
import struct
import zipfile
from typing import Any

import torch
from torch.distributed.checkpoint.planner import LoadItemType, LoadPlan, LoadPlanner, ReadItem

_STORAGE_DTYPES: dict[str, torch.dtype] = {
    "FloatStorage": torch.float32,
    "DoubleStorage": torch.float64,
    "HalfStorage": torch.float16,
    "BFloat16Storage": torch.bfloat16,
    "LongStorage": torch.int64,
    "IntStorage": torch.int32,
    "ShortStorage": torch.int16,
    "CharStorage": torch.int8,
    "ByteStorage": torch.uint8,
    "BoolStorage": torch.bool,
}


class _NotDirect(Exception):
    """The item is not one the direct path handles; DCP's own path reads it."""


class _Storage:
    def __init__(self, key: str, dtype: torch.dtype, numel: int) -> None:
        self.key, self.dtype, self.numel = key, dtype, numel


class _Rebuilt:
    def __init__(self, storage: _Storage, storage_offset: int, size: tuple, stride: tuple) -> None:
        self.storage, self.storage_offset, self.size, self.stride = storage, storage_offset, tuple(size), tuple(stride)


def _rebuild_tensor_v2(storage, storage_offset, size, stride, requires_grad=False, backward_hooks=None, metadata=None):
    if not isinstance(storage, _Storage):
        raise _NotDirect("not a plain storage")
    return _Rebuilt(storage, storage_offset, size, stride)


class _TensorPickleReader(pickle.Unpickler):
    """Reads a ``torch.save`` pickle of one tensor into a description; executes nothing."""

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) == ("torch._utils", "_rebuild_tensor_v2"):
            return _rebuild_tensor_v2
        if (module, name) == ("collections", "OrderedDict"):
            return collections.OrderedDict
        if module == "torch" and name in _STORAGE_DTYPES:
            return name
        raise _NotDirect(f"global {module}.{name}")

    def persistent_load(self, pid: Any) -> _Storage:
        if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage" and pid[1] in _STORAGE_DTYPES):
            raise _NotDirect(f"persistent id {pid!r}")
        _, storage_type, key, location, numel = pid
        if location != "cpu" or not isinstance(key, str) or not isinstance(numel, int):
            raise _NotDirect(f"storage {pid!r}")
        return _Storage(key, _STORAGE_DTYPES[storage_type], numel)


class _FileView(io.RawIOBase):
    """A read-only seekable window ``[offset, offset + length)`` of an open binary file.

    The first and last ``edge`` bytes of the window (bytes; where a ``torch.save`` zip keeps its
    pickle, local headers and central directory) are read once, in two reads, and served from
    memory: parsing the zip then costs two syscalls instead of dozens of small seeks and reads.
    Reads elsewhere (the tensor bytes) go to the file.
    """

    def __init__(self, f, offset: int, length: int, edge: int = 4096) -> None:
        self._f, self._offset, self._length, self._pos = f, offset, length, 0
        self._chunks: list[tuple[int, bytes]] = []
        if edge > 0 and length > 0:
            if length <= 2 * edge:
                self._chunks.append((0, self._pread(0, length)))
            else:
                self._chunks.append((0, self._pread(0, edge)))
                self._chunks.append((length - edge, self._pread(length - edge, edge)))

    def _pread(self, pos: int, n: int) -> bytes:
        self._f.seek(self._offset + pos)
        return self._f.read(n)

    def seekable(self) -> bool:
        return True

    def readable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._pos

    def seek(self, pos: int, whence: int = 0) -> int:
        self._pos = {0: pos, 1: self._pos + pos, 2: self._length + pos}[whence]
        return self._pos

    def readinto(self, b) -> int:
        n = max(0, min(len(b), self._length - self._pos))
        if n == 0:
            return 0
        for start, data in self._chunks:
            if start <= self._pos < start + len(data):
                # a short read is allowed (RawIOBase); the caller asks again for the rest
                got = min(n, start + len(data) - self._pos)
                memoryview(b)[:got] = data[self._pos - start : self._pos - start + got]
                self._pos += got
                return got
        self._f.seek(self._offset + self._pos)
        got = self._f.readinto(memoryview(b)[:n])
        self._pos += got
        return got


def _contiguous_strides(size: tuple[int, ...]) -> tuple[int, ...]:
    strides, acc = [], 1
    for n in reversed(size):
        strides.append(acc)
        acc *= n
    return tuple(reversed(strides))


def _locate(f, offset: int, length: int) -> tuple[_Rebuilt, int]:
    """``(tensor description, absolute file offset of its data)`` of the ``torch.save`` blob at
    ``[offset, offset + length)``; raises :class:`_NotDirect` for anything unusual."""
    view = _FileView(f, offset, length)
    try:
        z = zipfile.ZipFile(io.BufferedReader(view))
    except zipfile.BadZipFile as e:
        raise _NotDirect(str(e)) from e
    infos = {i.filename.split("/", 1)[-1]: i for i in z.infolist()}
    if "data.pkl" not in infos or infos.get("byteorder") is None:
        raise _NotDirect("not a torch.save zip")
    if z.read(infos["byteorder"]).strip() != b"little":
        raise _NotDirect("big-endian data")
    desc = _TensorPickleReader(io.BytesIO(z.read(infos["data.pkl"]))).load()
    if not isinstance(desc, _Rebuilt):
        raise _NotDirect("not a single tensor")
    data = infos.get(f"data/{desc.storage.key}")
    if data is None or data.compress_type != zipfile.ZIP_STORED:
        raise _NotDirect("storage missing or compressed")
    if data.file_size != desc.storage.numel * desc.storage.dtype.itemsize:
        raise _NotDirect("storage size mismatch")
    view.seek(data.header_offset)
    header = io.BufferedReader(view).read(30)  # buffered: the raw view may return short reads
    if len(header) != 30 or header[:4] != b"PK\x03\x04":
        raise _NotDirect("bad local header")
    name_len, extra_len = struct.unpack("<HH", bytes(header[26:30]))
    return desc, offset + data.header_offset + 30 + name_len + extra_len


def _byte_range(desc: _Rebuilt, offsets: tuple[int, ...], lengths: tuple[int, ...]) -> tuple[int, int]:
    """``(start, nbytes)`` of the region ``offsets``/``lengths`` of a contiguous tensor, if that
    region is one contiguous byte range; raises :class:`_NotDirect` otherwise."""
    size = desc.size
    if desc.storage_offset != 0 or desc.stride != _contiguous_strides(size) or len(offsets) != len(size):
        raise _NotDirect("not a contiguous tensor")
    # contiguous iff every dim after the last narrowed one is full and every dim before it
    # has length 1
    narrowed = [i for i, (off, n, full) in enumerate(zip(offsets, lengths, size)) if off != 0 or n != full]
    if narrowed and any(n != 1 for n in lengths[: narrowed[-1]]):
        raise _NotDirect("region not contiguous")
    itemsize = desc.storage.dtype.itemsize
    start = sum(o * s for o, s in zip(offsets, desc.stride)) * itemsize
    return start, math.prod(lengths) * itemsize


class DirectReadMixin:
    """Mix into a DCP ``FileSystemReader`` or ``FsspecReader`` (before it in the bases) to read
    tensors directly into their targets; see the module docstring for when it applies.
    Everything else goes to the base class's ``read_data`` unchanged. Counters ``direct_items`` / ``fallback_items``
    (ints, cumulative) say how many items took which path.
    """

    direct_items = 0
    fallback_items = 0

    def read_data(self, plan: LoadPlan, planner: LoadPlanner):  # noqa: D102 (DCP's signature)
        per_file: dict[str, list[ReadItem]] = {}
        for req in plan.items:
            per_file.setdefault(self.storage_data[req.storage_index].relative_path, []).append(req)
        fallback: list[ReadItem] = []
        for relative_path, reqs in per_file.items():
            path = self.fs.concat_path(self.path, relative_path)
            with self.fs.create_stream(path, "rb") as f:
                for req in sorted(reqs, key=lambda r: self.storage_data[r.storage_index].offset):
                    if not self._read_direct(f, req, planner):
                        fallback.append(req)
        self.direct_items += len(plan.items) - len(fallback)
        self.fallback_items += len(fallback)
        if fallback:
            return super().read_data(LoadPlan(fallback, storage_data=plan.storage_data, planner_data=plan.planner_data), planner)
        fut: torch.futures.Future = torch.futures.Future()
        fut.set_result(None)
        return fut

    def _read_direct(self, f, req: ReadItem, planner: LoadPlanner) -> bool:
        info = self.storage_data[req.storage_index]
        if req.type != LoadItemType.TENSOR or getattr(info, "transform_descriptors", None):
            return False
        target = planner.resolve_tensor(req).detach()
        if target.device.type != "cpu" or not target.is_contiguous() or tuple(target.shape) != tuple(req.lengths):
            return False
        try:
            desc, data_start = _locate(f, info.offset, info.length)
            if desc.storage.dtype != target.dtype:
                return False
            start, nbytes = _byte_range(desc, tuple(req.storage_offsets), tuple(req.lengths))
        except Exception:  # noqa: BLE001 - any surprise in the blob's layout: DCP's own path reads it
            return False
        if nbytes != target.numel() * target.element_size():
            return False
        if nbytes:
            dst = memoryview(target.view(-1).view(torch.uint8).numpy())
            f.seek(data_start + start)
            got = 0
            while got < nbytes:
                n = f.readinto(dst[got:])
                if not n:
                    raise OSError(f"{self.path}/{info.relative_path}: unexpected end of file at byte {data_start + start + got}")
                got += n
        planner.commit_tensor(req, target)
        return True
