"""The direct read path (prime_ckpt.loading) gives bitwise what DCP's own path gives, takes the
direct path where it should, and hands everything else to DCP."""

from __future__ import annotations

import io
import zipfile

import pytest
import torch
import torch.distributed.checkpoint as dcp
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.distributed.checkpoint import FileSystemReader, FileSystemWriter
from torch.distributed.checkpoint.planner import LoadItemType

from prime_ckpt.loading import DirectReadMixin
from prime_ckpt.tensor_blob import _byte_range, _FileView, _locate, _NotDirect


class DirectReader(DirectReadMixin, FileSystemReader):
    pass


def _state() -> dict:
    g = torch.Generator().manual_seed(0)
    return {
        "f32": torch.randn(33, 7, generator=g),
        "bf16": torch.randn(5, 3, generator=g).to(torch.bfloat16),
        "f16": torch.randn(4, generator=g).to(torch.float16),
        "i64": torch.randint(-(2**40), 2**40, (6, 2), generator=g),
        "bool": torch.rand(9, generator=g) > 0.5,
        "scalar": torch.tensor(3.25),
        "empty": torch.zeros(0, 4),
        "nested": {"u8": torch.randint(0, 255, (3, 3), generator=g, dtype=torch.uint8)},
        "step": 7,  # a non-tensor value: a BYTE_IO item, read by DCP's path
        "transposed": torch.randn(6, 4, generator=g).t(),  # saved with its strides: not contiguous
    }


def _zeros_like(sd):
    return {k: _zeros_like(v) if isinstance(v, dict) else (torch.zeros_like(v) if torch.is_tensor(v) else 0) for k, v in sd.items()}


def _flat(sd, prefix=""):
    for k, v in sd.items():
        if isinstance(v, dict):
            yield from _flat(v, f"{prefix}{k}.")
        else:
            yield prefix + k, v


def test_direct_read_is_bitwise_equal_to_dcp(tmp_path):
    sd = _state()
    dcp.save(sd, storage_writer=FileSystemWriter(tmp_path), no_dist=True)
    ours, theirs = _zeros_like(sd), _zeros_like(sd)
    reader = DirectReader(tmp_path)
    dcp.load(ours, storage_reader=reader, no_dist=True)
    dcp.load(theirs, storage_reader=FileSystemReader(tmp_path), no_dist=True)
    for (k, a), (_, b) in zip(_flat(ours), _flat(theirs)):
        if torch.is_tensor(a):
            assert a.dtype == b.dtype and a.shape == b.shape, k
            assert torch.equal(a.contiguous().view(-1).view(torch.uint8), b.contiguous().view(-1).view(torch.uint8)), k
        else:
            assert a == b == 7, k
    for (k, a), (_, b) in zip(_flat(ours), _flat(sd)):
        assert (torch.equal(a, b) if torch.is_tensor(a) else a == b), k
    # direct: f32 bf16 f16 i64 bool scalar u8; DCP's path: the int (bytes) and the transposed
    # tensor (its target is not contiguous); the empty tensor has no bytes and no read item
    assert (reader.direct_items, reader.fallback_items) == (7, 2)


def test_non_contiguous_storage_falls_back(tmp_path):
    """A tensor saved with permuted strides (torch.save keeps them) into a contiguous target:
    the stored bytes are not in the target's order, so the direct path must decline."""
    src = torch.randn(6, 4).t().contiguous().t()  # strides (1, 6): column-major storage
    assert not src.is_contiguous()
    dcp.save({"w": src}, storage_writer=FileSystemWriter(tmp_path), no_dist=True)
    out = {"w": torch.zeros(6, 4)}
    reader = DirectReader(tmp_path)
    dcp.load(out, storage_reader=reader, no_dist=True)
    assert torch.equal(out["w"], src)
    assert (reader.direct_items, reader.fallback_items) == (0, 1)


def test_dtype_mismatch_falls_back_and_dcp_converts(tmp_path):
    dcp.save({"w": torch.arange(6, dtype=torch.float32)}, storage_writer=FileSystemWriter(tmp_path), no_dist=True)
    out = {"w": torch.zeros(6, dtype=torch.float64)}
    reader = DirectReader(tmp_path)
    dcp.load(out, storage_reader=reader, no_dist=True)
    assert torch.equal(out["w"], torch.arange(6, dtype=torch.float64))
    assert reader.fallback_items == 1 and reader.direct_items == 0


def _blob(obj) -> bytes:
    b = io.BytesIO()
    torch.save(obj, b)
    return b.getvalue()


def test_locate_finds_the_data_of_a_torch_save_blob(tmp_path):
    t = torch.arange(12, dtype=torch.int32).reshape(3, 4)
    prefix = b"x" * 37  # the blob sits at an arbitrary offset inside a bigger file
    f = tmp_path / "f"
    f.write_bytes(prefix + _blob(t) + b"tail")
    with open(f, "rb") as fh:
        desc, start = _locate(fh, len(prefix), len(_blob(t)))
        fh.seek(start)
        data = fh.read(t.numel() * 4)
    assert desc.size == (3, 4) and desc.stride == (4, 1) and desc.storage.dtype == torch.int32
    assert data == t.numpy().tobytes()


@pytest.mark.parametrize("obj", [
    {"a": torch.zeros(2)},  # not a single tensor
    torch.zeros(4)[1:3],  # a view: storage offset 1 (torch.save keeps the whole storage)
])
def test_locate_or_range_refuses_unusual_blobs(tmp_path, obj):
    f = tmp_path / "f"
    f.write_bytes(_blob(obj))
    with open(f, "rb") as fh, pytest.raises(_NotDirect):
        desc, _ = _locate(fh, 0, f.stat().st_size)
        _byte_range(desc, (0,) * len(desc.size), desc.size)


def test_locate_never_runs_a_pickled_callable(tmp_path):
    """A blob whose data.pkl asks for another global (here os.system) is declined before the
    global is resolved."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        z.writestr("archive/data.pkl", b"cos\nsystem\n(S'touch " + str(tmp_path / "pwned").encode() + b"'\ntR.")
        z.writestr("archive/byteorder", "little")
    f = tmp_path / "f"
    f.write_bytes(buf.getvalue())
    with open(f, "rb") as fh, pytest.raises(_NotDirect, match="global os.system"):
        _locate(fh, 0, f.stat().st_size)
    assert not (tmp_path / "pwned").exists()


@settings(max_examples=300, deadline=None)
@given(st.data())
def test_file_view_reads_the_same_bytes_as_the_file(tmp_path_factory, data):
    """The window's cached head/tail and the file reads around them give exactly the file's
    bytes, for any window, edge size, read position and read size (short reads included)."""
    raw = bytes(range(256)) * 40
    f = tmp_path_factory.mktemp("view") / "f"
    f.write_bytes(raw)
    offset = data.draw(st.integers(0, len(raw)))
    length = data.draw(st.integers(0, len(raw) - offset))
    edge = data.draw(st.sampled_from([0, 1, 7, 64, 4096]))
    with open(f, "rb") as fh:
        view = io.BufferedReader(_FileView(fh, offset, length, edge=edge), buffer_size=data.draw(st.sampled_from([1, 13, 8192])))
        for _ in range(5):
            pos = data.draw(st.integers(0, length))
            n = data.draw(st.integers(0, length + 3))
            view.seek(pos)
            assert view.read(n) == raw[offset + pos : offset + min(pos + n, length)]


@pytest.mark.parametrize("edge", [0, 1, 64, 4096, "inside_header"])
def test_locate_is_independent_of_the_cached_edge(tmp_path, monkeypatch, edge):
    """Wherever the cached head ends (even inside the data's local header, which the raw view
    then returns in two short reads), _locate finds the same data offset."""
    import prime_ckpt.loading as loading

    t = torch.arange(300, dtype=torch.float32)
    blob = _blob(t)
    f = tmp_path / "f"
    f.write_bytes(blob)
    if edge == "inside_header":
        z = zipfile.ZipFile(io.BytesIO(blob))
        edge = next(i.header_offset for i in z.infolist() if i.filename.endswith("data/0")) + 10
    with open(f, "rb") as fh:
        expected = _locate(fh, 0, len(blob))[1]
        orig = loading._FileView.__init__
        monkeypatch.setattr(loading._FileView, "__init__", lambda self, f_, o, n, edge=edge: orig(self, f_, o, n, edge))
        _, start = _locate(fh, 0, len(blob))
        fh.seek(start)
        assert start == expected and fh.read(t.numel() * 4) == t.numpy().tobytes()


@st.composite
def _regions(draw):
    size = tuple(draw(st.lists(st.integers(1, 5), min_size=1, max_size=4)))
    offsets, lengths = [], []
    for n in size:
        off = draw(st.integers(0, n - 1))
        offsets.append(off)
        lengths.append(draw(st.integers(1, n - off)))
    return size, tuple(offsets), tuple(lengths)


@settings(max_examples=400, deadline=None)
@given(_regions())
def test_byte_range_matches_narrow(region):
    """Whenever ``_byte_range`` accepts a region, those bytes are exactly the narrowed tensor's;
    it accepts every region that is one contiguous range."""
    size, offsets, lengths = region
    t = torch.arange(int(torch.tensor(size).prod())).reshape(size)
    expected = t
    for d, (o, n) in enumerate(zip(offsets, lengths)):
        expected = expected.narrow(d, o, n)
    from prime_ckpt.tensor_blob import _Rebuilt, _Storage

    desc = _Rebuilt(_Storage("0", torch.int64, t.numel()), 0, size, t.stride())
    raw = t.numpy().tobytes()
    try:
        start, nbytes = _byte_range(desc, offsets, lengths)
    except _NotDirect:
        # declined: the region must really not be one range of the storage
        flat = expected.reshape(-1)
        first = int(flat[0]) if flat.numel() else 0
        assert not torch.equal(flat, torch.arange(first, first + flat.numel()))
        return
    assert raw[start:start + nbytes] == expected.contiguous().numpy().tobytes()


def test_checkpointer_reader_takes_the_direct_path_locally(tmp_path):
    """``dcp_io.dcp_reader`` (what ``Checkpointer.load`` uses) reads local checkpoints directly."""
    from prime_ckpt.dcp_io import dcp_reader

    sd = {"w": torch.randn(8, 3), "b": torch.randn(3)}
    dcp.save(sd, storage_writer=FileSystemWriter(tmp_path), no_dist=True)
    reader = dcp_reader(tmp_path)
    out = {"w": torch.zeros(8, 3), "b": torch.zeros(3)}
    dcp.load(out, storage_reader=reader, no_dist=True)
    assert isinstance(reader, DirectReadMixin)
    assert (reader.direct_items, reader.fallback_items) == (2, 0)
    assert torch.equal(out["w"], sd["w"]) and torch.equal(out["b"], sd["b"])


_DTYPES = [torch.float32, torch.bfloat16, torch.float16, torch.int64, torch.int8, torch.bool, torch.float64]


@settings(max_examples=60, deadline=None)
@given(st.lists(st.integers(0, 70), min_size=0, max_size=3), st.sampled_from(_DTYPES), st.integers(0, 2000))
def test_guess_from_the_head_is_confirmed_and_equals_locate(tmp_path_factory, shape, dtype, prefix_len):
    """For torch.save blobs of any shape and dtype, the guess made from the blob's first bytes is
    what the zip's central directory says (the lean check confirms it, zipfile agrees)."""
    from prime_ckpt.tensor_blob import _confirm_guess, _guess_data_start

    t = torch.zeros(shape, dtype=torch.float64).uniform_(-3, 3).to(dtype)
    blob = _blob(t)
    f = tmp_path_factory.mktemp("guess") / "f"
    f.write_bytes(b"p" * prefix_len + blob + b"after")
    with open(f, "rb") as fh:
        view = _FileView(fh, prefix_len, len(blob))
        guess = _guess_data_start(view.head)
        assert guess is not None
        desc, start = _locate(fh, prefix_len, len(blob))
        assert guess[0].key() == desc.key() and prefix_len + guess[1] == start
        assert _confirm_guess(view, *guess)
        fh.seek(start)
        assert fh.read(t.numel() * t.element_size()) == t.view(-1).view(torch.uint8).numpy().tobytes()


def _with_central_entry(blob: bytes, name_suffix: bytes, field: int, value: int) -> bytes:
    """``blob`` with one field (index into the 46-byte central header struct) of the central
    directory entry whose name ends with ``name_suffix`` replaced."""
    import struct

    fmt = struct.Struct("<4s6H3I5H2I")
    pos = blob.index(b"PK\x01\x02")
    while True:
        fields = list(fmt.unpack_from(blob, pos))
        name = blob[pos + 46 : pos + 46 + fields[10]]
        if name.endswith(name_suffix):
            fields[field] = value
            return blob[:pos] + fmt.pack(*fields) + blob[pos + 46 :]
        pos = blob.index(b"PK\x01\x02", pos + 4)


@pytest.mark.parametrize("suffix,field,value", [
    (b"data/0", 16, 0),  # the storage's local header offset points elsewhere
    (b"data/0", 9, 4 * 300 - 4),  # the storage entry is shorter than the tensor
    (b"data/0", 4, 8),  # deflated
    (b"data.pkl", 9, 20),  # the pickle's recorded length cuts it short
    (b"byteorder", 16, 0),  # the byte order entry's header is not where it says
])
def test_confirm_refuses_what_the_central_directory_contradicts(tmp_path, suffix, field, value):
    from prime_ckpt.tensor_blob import _confirm_guess, _guess_data_start

    blob = _blob(torch.arange(300, dtype=torch.float32))
    bad = _with_central_entry(blob, suffix, field, value)
    for data, expected in ((blob, True), (bad, False)):
        f = tmp_path / "f"
        f.write_bytes(data)
        with open(f, "rb") as fh:
            view = _FileView(fh, 0, len(data))
            guess = _guess_data_start(view.head)
            assert guess is not None  # the head is the same: only the central directory differs
            assert _confirm_guess(view, *guess) is expected


def _many_tensors(n: int = 40) -> dict:
    g = torch.Generator().manual_seed(1)
    return {f"t{i}": torch.randn(17 + i, 3 + i % 5, generator=g).to(_DTYPES[i % 5]) for i in range(n)}


@pytest.mark.parametrize("threads", [1, 3, 8])
def test_reader_threads_fill_every_tensor_bitwise(tmp_path, threads):
    sd = _many_tensors()
    dcp.save(sd, storage_writer=FileSystemWriter(tmp_path), no_dist=True)
    out = {k: torch.zeros_like(v) for k, v in sd.items()}
    reader = DirectReader(tmp_path)
    reader.read_threads = threads
    dcp.load(out, storage_reader=reader, no_dist=True)
    for k in sd:
        assert torch.equal(out[k].view(-1).view(torch.uint8), sd[k].view(-1).view(torch.uint8)), k
    assert (reader.direct_items, reader.fallback_items) == (40, 0)


def test_a_wrong_guess_is_corrected_by_the_central_directory(tmp_path, monkeypatch):
    """If the head-only guess points at the wrong bytes, the data is read again from where the
    central directory says: the load stays bitwise right and direct."""
    import prime_ckpt.loading as loading

    real = loading._guess_data_start
    monkeypatch.setattr(loading, "_guess_data_start", lambda head: (lambda g: g and (g[0], g[1] - 64))(real(head)))
    sd = _many_tensors(12)
    dcp.save(sd, storage_writer=FileSystemWriter(tmp_path), no_dist=True)
    out = {k: torch.zeros_like(v) for k, v in sd.items()}
    reader = DirectReader(tmp_path)
    dcp.load(out, storage_reader=reader, no_dist=True)
    for k in sd:
        assert torch.equal(out[k].view(-1).view(torch.uint8), sd[k].view(-1).view(torch.uint8)), k
    assert (reader.direct_items, reader.fallback_items) == (12, 0)


@settings(max_examples=200, deadline=None)
@given(st.lists(st.integers(0, 1000), max_size=30), st.integers(1, 9))
def test_split_contiguous_keeps_file_order_in_at_most_parts_runs(sizes, parts):
    from prime_ckpt.loading import _split_contiguous

    items = list(range(len(sizes)))
    runs = _split_contiguous(items, sizes, parts)
    assert [i for run in runs for i in run] == items
    assert len(runs) <= parts
    assert all(runs) or items == []


def _entries(t: torch.Tensor) -> dict[str, bytes]:
    z = zipfile.ZipFile(io.BytesIO(_blob(t)))
    return {n.split("/", 1)[1]: z.read(n) for n in z.namelist()}


def _zip(entries: list[tuple[str, bytes]]) -> bytes:
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w", zipfile.ZIP_STORED) as z:
        for name, data in entries:
            z.writestr(name, data)
    return out.getvalue()


def _fill_from(tmp_path, blob: bytes, n: int, length: int | None = None) -> tuple[bool, torch.Tensor]:
    """What the direct path does with ``blob`` (its first ``length`` bytes, default all, are the
    stored item) as the stored tensor of ``n`` float32 values."""
    import warnings

    from torch.distributed.checkpoint.metadata import MetadataIndex
    from torch.distributed.checkpoint.planner import ReadItem

    f = tmp_path / "blob"
    f.write_bytes(blob)

    class Info:
        offset, relative_path = 0, "blob"

    Info.length = len(blob) if length is None else length

    class Reader(DirectReadMixin):
        def __init__(self) -> None:
            self.storage_data, self.path = {0: Info}, str(tmp_path)

    req = ReadItem(type=LoadItemType.TENSOR, dest_index=MetadataIndex("x"), dest_offsets=torch.Size([0]), storage_index=0,
                   storage_offsets=torch.Size([0]), lengths=torch.Size([n]))
    target = torch.full((n,), -1.0)
    with open(f, "rb") as fh, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return Reader()._fill(fh, req, target), target


def test_the_archive_is_the_first_entrys_directory_as_for_torch_load(tmp_path):
    """Two archives in one zip, the first entry in ``a/b/``: torch.load reads ``a/`` (the first
    entry's name up to its first "/"); the direct path must read the same tensor or decline."""
    ones, twos = _entries(torch.full((8,), 1.0)), _entries(torch.full((8,), 2.0))
    blob = _zip([(p + k, e[k]) for p, e in (("a/b/", ones), ("a/", twos)) for k in ("data.pkl", "byteorder", "data/0", "version")])
    assert torch.equal(torch.load(io.BytesIO(blob), weights_only=True), torch.full((8,), 2.0))
    ok, got = _fill_from(tmp_path, blob, 8)
    assert not ok or torch.equal(got, torch.full((8,), 2.0))


def test_duplicate_names_are_declined(tmp_path):
    e = _entries(torch.zeros(8))
    blob = _zip([("archive/data.pkl", e["data.pkl"]), ("archive/byteorder", e["byteorder"]),
                 ("archive/data/0", torch.full((8,), 1.0).numpy().tobytes()), ("archive/version", e["version"]),
                 ("archive/data/0", torch.full((8,), 2.0).numpy().tobytes())])
    ok, _ = _fill_from(tmp_path, blob, 8)
    assert not ok  # DCP's own path (torch.load) decides which entry counts


def test_a_storage_that_runs_past_the_blob_is_declined(tmp_path):
    """The central directory says the storage is the tensor's 1024 bytes, but the blob ends
    first (its last entry holds 16): the bytes after the blob belong to the next one, so the
    direct path must not read them as this tensor (torch.load refuses the blob too)."""
    import struct

    e = _entries(torch.zeros(256))
    blob = bytearray(_zip([("archive/" + k, v) for k, v in (("data.pkl", e["data.pkl"]), ("byteorder", e["byteorder"]),
                                                            ("version", e["version"]), ("data/0", b"\0" * 16))]))
    cd = blob.rindex(b"PK\x01\x02")  # the last central directory entry: data/0
    struct.pack_into("<II", blob, cd + 20, 1024, 1024)  # compressed, uncompressed size
    with pytest.raises(RuntimeError):
        torch.load(io.BytesIO(bytes(blob)), weights_only=True)
    ok, _ = _fill_from(tmp_path, bytes(blob) + torch.arange(1000, dtype=torch.float32).numpy().tobytes(), 256, length=len(blob))
    assert not ok


def test_tied_targets_get_the_last_stored_value_whatever_the_thread_timing(tmp_path, monkeypatch):
    """Two stored tensors loaded into one target (tied weights): the one later in the file wins,
    as on DCP's path, even if the reader thread of the earlier one is slow."""
    import threading
    import time

    import prime_ckpt.loading as loading

    n = 1 << 16
    pads = [f"pad{i}" for i in range(6)]
    # file order a, pads, z: with 4 threads, a and z land in different runs
    dcp.save({"a": torch.zeros(n), **{p: torch.full((n,), 3.0) for p in pads}, "z": torch.ones(n)},
             storage_writer=FileSystemWriter(tmp_path), no_dist=True)
    real = loading.DirectReadMixin._read_into

    def slow_first_thread(self, f, target, at, nbytes, info):
        if threading.current_thread().name.endswith("_0"):
            time.sleep(0.05)
        return real(self, f, target, at, nbytes, info)

    monkeypatch.setattr(loading.DirectReadMixin, "_read_into", slow_first_thread)
    tied = torch.full((n,), -1.0)
    out = {"a": tied, **{p: torch.zeros(n) for p in pads}, "z": tied}
    shared = torch.zeros(n)
    theirs = {"a": shared, **{p: torch.zeros(n) for p in pads}, "z": shared}
    reader = DirectReader(tmp_path)
    reader.read_threads = 4
    dcp.load(out, storage_reader=reader, no_dist=True)
    dcp.load(theirs, storage_reader=FileSystemReader(tmp_path), no_dist=True)
    assert torch.equal(tied, shared) and torch.equal(tied, torch.ones(n))
    assert (reader.direct_items, reader.fallback_items) == (8, 0)


def test_overlapping_finds_views_of_the_same_bytes():
    from prime_ckpt.loading import _overlapping

    base = torch.zeros(100)
    targets = [base[0:10], base[10:20], base[15:30], torch.zeros(5), base, base[50:50]]
    assert _overlapping(targets) == {0, 1, 2, 4}
