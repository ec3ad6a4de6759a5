"""Where a tensor's bytes sit inside a ``torch.save`` blob of a ``.distcp`` file (no torch.load).

Each tensor DCP saves is a small ``torch.save`` zip inside the ``.distcp`` file. These helpers
find its data without running the unpickler on anything but the admitted globals (one
``torch._utils._rebuild_tensor_v2`` of one storage; :class:`_TensorPickleReader`):
:func:`_guess_data_start` from the blob's first 4 KiB, :func:`_confirm_guess` against its zip
central directory, :func:`_locate` (full :mod:`zipfile` parse) when the guess fails, and
:func:`_byte_range` for the requested region. Anything unusual raises :class:`_NotDirect`, and
the caller (:mod:`prime_ckpt.loading`) hands the item to DCP's own path.
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

    def key(self) -> tuple:
        s = self.storage
        return (s.key, s.dtype, s.numel, self.storage_offset, self.size, self.stride)


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
    The head is read at construction, the tail on first use (after the data, in file order).
    Reads elsewhere (the tensor bytes) go to the file. ``f`` needs ``seek``/``read``/``readinto``.
    """

    def __init__(self, f, offset: int, length: int, edge: int = 4096) -> None:
        self._f, self._offset, self._length, self._pos, self._edge = f, offset, length, 0, edge
        self._chunks: list[tuple[int, bytes]] = []
        self._tail_pending = False
        if edge > 0 and length > 0:
            self._chunks.append((0, self._pread(0, min(edge, length))))
            self._tail_pending = length > edge

    @property
    def head(self) -> bytes:
        """The window's first ``edge`` bytes (all of it if shorter), read at construction."""
        return self._chunks[0][1] if self._chunks else b""

    def cached(self, pos: int, n: int) -> bytes | None:
        """Bytes ``[pos, pos + n)`` of the window if they lie in the head or the tail (the tail is
        read on first use), else ``None``; never reads the middle of the window."""
        if pos < 0 or n < 0 or pos + n > self._length:
            return None
        if self._tail_pending and pos + n > self._length - self._edge:
            self._load_tail()
        for start, data in self._chunks:
            if start <= pos and pos + n <= start + len(data):
                return data[pos - start : pos - start + n]
        return None

    def _load_tail(self) -> None:
        # read lazily, on the first access past the head: a caller that reads the tensor's data
        # first keeps the file's reads in ascending order (kernel read-ahead stays sequential)
        self._tail_pending = False
        start = max(self._edge, self._length - self._edge)
        tail = self._pread(start, self._length - start)
        if start == self._edge == len(self._chunks[0][1]):  # adjacent to the head: one chunk, so a span across both is cached
            self._chunks[0] = (0, self._chunks[0][1] + tail)
        else:
            self._chunks.append((start, tail))

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
        if self._tail_pending and self._pos >= self._length - self._edge:
            self._load_tail()
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


def _locate(f, offset: int, length: int, view: _FileView | None = None) -> tuple[_Rebuilt, int]:
    """``(tensor description, absolute file offset of its data)`` of the ``torch.save`` blob at
    ``[offset, offset + length)``, read through the zip's central directory; raises
    :class:`_NotDirect` for anything unusual. ``view``: an existing view of that window."""
    view = view if view is not None else _FileView(f, offset, length)
    try:
        z = zipfile.ZipFile(io.BufferedReader(view))
    except zipfile.BadZipFile as e:
        raise _NotDirect(str(e)) from e
    names = [i.filename for i in z.infolist()]
    if not names or "/" not in names[0] or len(set(names)) != len(names):
        raise _NotDirect("no archive directory or duplicate names")
    # torch.load's rule: the archive is the first entry's name up to its first "/"
    archive = names[0].split("/", 1)[0] + "/"
    infos = {i.filename[len(archive) :]: i for i in z.infolist() if i.filename.startswith(archive)}
    if "data.pkl" not in infos or infos.get("byteorder") is None:
        raise _NotDirect("not a torch.save zip")
    if _stored_bytes(view, infos["byteorder"], length).strip() != b"little":
        raise _NotDirect("big-endian data")
    desc = _TensorPickleReader(io.BytesIO(_stored_bytes(view, infos["data.pkl"], length))).load()
    if not isinstance(desc, _Rebuilt):
        raise _NotDirect("not a single tensor")
    data = infos.get(f"data/{desc.storage.key}")
    if data is None or data.compress_type != zipfile.ZIP_STORED:
        raise _NotDirect("storage missing or compressed")
    if data.file_size != desc.storage.numel * desc.storage.dtype.itemsize:
        raise _NotDirect("storage size mismatch")
    return desc, offset + _entry_start(view, data, length)


def _entry_start(view: _FileView, info: zipfile.ZipInfo, length: int) -> int:
    """Where a stored zip entry's bytes start in the blob (``length`` bytes), from its local
    header; raises :class:`_NotDirect` for a bad header or an entry running past the blob."""
    header = _window_bytes(view, info.header_offset, 30)
    if header is None or header[:4] != b"PK\x03\x04":
        raise _NotDirect("bad local header")
    name_len, extra_len = struct.unpack("<HH", bytes(header[26:30]))
    start = info.header_offset + 30 + name_len + extra_len
    if start + info.file_size > length:
        raise _NotDirect("entry runs past the blob")
    return start


def _stored_bytes(view: _FileView, info: zipfile.ZipInfo, length: int) -> bytes:
    """The bytes of a small stored (uncompressed, unencrypted) zip entry, read from where its
    local header says, not with :meth:`zipfile.ZipFile.read`: that checks the entry's CRC-32,
    which blobs written by :mod:`prime_ckpt.writing` leave at 0 (nothing else checks it)."""
    if info.compress_type != zipfile.ZIP_STORED or info.flag_bits & 0x1 or info.compress_size != info.file_size:
        raise _NotDirect("compressed or encrypted entry")
    data = _window_bytes(view, _entry_start(view, info, length), info.file_size)
    if data is None:
        raise _NotDirect("short entry")
    return data


def _window_bytes(view: _FileView, pos: int, n: int) -> bytes | None:
    """Bytes ``[pos, pos + n)`` of the window (from its cached head/tail, else one read), or
    None if fewer are there. Not through an ``io.BufferedReader`` over ``view``: one that is
    garbage-collected closes the view under the zip parser still reading it."""
    data = view.cached(pos, n)
    if data is None:
        data = view._pread(pos, n) if pos >= 0 and pos + n <= view._length else b""
    return bytes(data) if len(data) == n else None


def _guess_data_start(head: bytes) -> tuple[_Rebuilt, int] | None:
    """A quick guess, from the blob's first bytes only, at what :func:`_locate` returns (with
    the data offset relative to the blob): the first zip entry is ``<archive>/data.pkl`` and the
    storage's local header follows within ``head``. ``None`` when the head does not look like
    that. A guess lets the data be read before the zip's central directory at the end of the
    blob, so the file is read front to back; it is always checked, by :func:`_confirm_guess`
    (and, where that cannot confirm it, by :func:`_locate`).
    """
    try:
        if head[:4] != b"PK\x03\x04":
            return None
        name_len, extra_len = struct.unpack_from("<HH", head, 26)
        name = head[30 : 30 + name_len]
        if not name.endswith(b"/data.pkl"):
            return None
        desc = _TensorPickleReader(io.BytesIO(head[30 + name_len + extra_len :])).load()
        if not isinstance(desc, _Rebuilt):
            return None
        data_name = name[: -len(b"data.pkl")] + b"data/" + desc.storage.key.encode()
        at = head.find(data_name)
        while at >= 30:
            header = at - 30
            if head[header : header + 4] == b"PK\x03\x04" and struct.unpack_from("<H", head, header + 26)[0] == len(data_name):
                return desc, at + len(data_name) + struct.unpack_from("<H", head, header + 28)[0]
            at = head.find(data_name, at + 1)
    except Exception:  # noqa: BLE001 - a guess only: anything odd means "no guess"
        return None
    return None


_EOCD = struct.Struct("<4s4H2IH")  # zip end of central directory record (22 bytes)
_CENTRAL = struct.Struct("<4s6H3I5H2I")  # zip central directory file header (46 bytes)
_LOCAL = struct.Struct("<4s5H3I2H")  # zip local file header (30 bytes)


def _confirm_guess(view: _FileView, desc: _Rebuilt, data_start: int) -> bool:
    """Whether the blob's central directory confirms a :func:`_guess_data_start` guess
    ``(desc, data_start)`` (``data_start`` relative to the blob), reading only the cached head
    and tail of ``view``: ``<archive>/data.pkl``, ``byteorder`` and ``data/<key>`` are stored
    (uncompressed, unencrypted) entries whose local headers carry the same names; the pickle,
    read from exactly its recorded length, describes the same tensor; the byte order is
    ``little``; the storage entry is ``numel * itemsize`` bytes starting at ``data_start``.

    ``False`` means "not confirmed here" (e.g. sizes or offsets past 4 GiB, which zip64 records
    hold; an archive comment; duplicate names; a central directory outside the cached tail;
    an archive directory other than the first entry's, which is the one ``torch.load`` reads):
    the caller then parses the blob with :mod:`zipfile`
    (:func:`_locate`), which handles every zip. A lean check instead of :mod:`zipfile` because it
    runs once per tensor: :mod:`zipfile` cost ~0.3 ms per blob, ~0.15 s of a 512 MiB load.
    """
    try:
        eocd = view.cached(view._length - _EOCD.size, _EOCD.size)
        if eocd is None:
            return False
        sig, disk, cd_disk, n_here, n_total, cd_size, cd_offset, comment_len = _EOCD.unpack(eocd)
        if sig != b"PK\x05\x06" or disk or cd_disk or comment_len or n_here != n_total:
            return False
        cd = view.cached(cd_offset, cd_size)
        if cd is None:
            return False
        entries: dict[bytes, tuple[int, int, int, int, int]] = {}
        first: bytes | None = None
        pos = 0
        for _ in range(n_total):
            f = _CENTRAL.unpack_from(cd, pos)
            if f[0] != b"PK\x01\x02":
                return False
            name = cd[pos + _CENTRAL.size : pos + _CENTRAL.size + f[10]]
            if name in entries:
                return False  # duplicate names: left to zipfile/torch.load's own rules
            first = name if first is None else first
            entries[name] = (f[3], f[4], f[8], f[9], f[16])  # flags, method, csize, usize, header offset
            pos += _CENTRAL.size + f[10] + f[11] + f[12]
        if pos != cd_size:
            return False
        if first is None or b"/" not in first:
            return False
        archive = first[: first.index(b"/") + 1]  # torch.load's rule: the first entry's directory

        def content(name: bytes) -> tuple[int, bytes | None] | None:
            entry = entries.get(name)
            if entry is None:
                return None
            flags, method, csize, usize, header_at = entry
            if flags & 0x1 or method != zipfile.ZIP_STORED or csize != usize:
                return None
            header = view.cached(header_at, _LOCAL.size)
            if header is None or header[:4] != b"PK\x03\x04":
                return None
            name_len, extra_len = _LOCAL.unpack(header)[9:11]
            if view.cached(header_at + _LOCAL.size, name_len) != name:
                return None
            start = header_at + _LOCAL.size + name_len + extra_len
            return start, view.cached(start, usize)

        pkl, order = content(archive + b"data.pkl"), content(archive + b"byteorder")
        data = content(archive + b"data/" + desc.storage.key.encode())
        if pkl is None or pkl[1] is None or order is None or order[1] is None or data is None:
            return False
        if order[1].strip() != b"little":
            return False
        stored = _TensorPickleReader(io.BytesIO(pkl[1])).load()
        if not isinstance(stored, _Rebuilt) or stored.key() != desc.key():
            return False
        flags, method, csize, usize, header_at = entries[archive + b"data/" + desc.storage.key.encode()]
        return (
            data[0] == data_start
            and usize == desc.storage.numel * desc.storage.dtype.itemsize
            and data_start + usize <= view._length
        )
    except Exception:  # noqa: BLE001 - not confirmed: the zipfile path decides
        return False


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
