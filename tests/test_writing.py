"""The lean write path (prime_ckpt.writing): the same DCP files, read bitwise by DCP's own reader
and by ours, written without the zip CRC-32 and without touching torch's process-wide setting;
DCP's path wherever the lean one would not be the same thing."""

from __future__ import annotations

import io
import subprocess
import sys
import weakref
import zipfile

import pytest
import torch
import torch.distributed.checkpoint as dcp
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.distributed.checkpoint import FileSystemReader, FileSystemWriter
from torch.distributed.checkpoint.metadata import BytesStorageMetadata
from torch.distributed.checkpoint.planner import WriteItemType

from prime_ckpt.dcp_io import dcp_reader, dcp_writer
from prime_ckpt.writing import DirectFileSystemWriter, _item_bytes, save_tensor_blob, split_into_files
from tests.conftest import ROOT


def _state() -> dict:
    g = torch.Generator().manual_seed(1)
    big = torch.randn(64, 16, generator=g)
    return {
        "f32": torch.randn(33, 7, generator=g),
        "bf16": torch.randn(5, 3, generator=g).to(torch.bfloat16),
        "i64": torch.randint(-(2**40), 2**40, (6, 2), generator=g),
        "bool": torch.rand(9, generator=g) > 0.5,
        "scalar": torch.tensor(3.25),
        "empty": torch.zeros(0, 4),
        "view": big[10:20],  # a view of a larger storage: only its own bytes are stored
        "transposed": torch.randn(6, 4, generator=g).t(),
        "nested": {"u8": torch.randint(0, 255, (3, 3), generator=g, dtype=torch.uint8), "lr": 0.5},
        "step": 7,
    }


def _blank(sd):
    return {k: _blank(v) if isinstance(v, dict) else (torch.zeros_like(v) if torch.is_tensor(v) else None)
            for k, v in sd.items()}


def _assert_same(a, b):
    for k, v in a.items():
        if isinstance(v, dict):
            _assert_same(v, b[k])
        elif torch.is_tensor(v):
            assert b[k].dtype == v.dtype and b[k].shape == v.shape, k
            assert torch.equal(b[k].reshape(-1).view(torch.uint8), v.reshape(-1).view(torch.uint8)), k  # bitwise
        else:
            assert b[k] == v, k


def _tensor_blobs(path):
    """{fqn: the bytes of its stored torch.save zip} of a single-rank DCP checkpoint."""
    md = FileSystemReader(path).read_metadata()
    out = {}
    for idx, info in md.storage_data.items():
        if isinstance(md.state_dict_metadata[idx.fqn], BytesStorageMetadata):
            continue
        with open(path / info.relative_path, "rb") as f:
            f.seek(info.offset)
            out[idx.fqn] = f.read(info.length)
    return out


@pytest.mark.parametrize("threads", [1, 2, 3])
def test_a_direct_write_reads_back_bitwise_through_dcp_and_ours(tmp_path, threads):
    sd = _state()
    dcp.save(sd, storage_writer=dcp_writer(tmp_path, thread_count=threads), no_dist=True)
    assert sorted(p.name for p in tmp_path.glob("*.distcp")) == [f"__0_{n}.distcp" for n in range(threads)]
    for reader in (FileSystemReader(tmp_path), dcp_reader(tmp_path)):
        out = _blank(sd)
        dcp.load(out, storage_reader=reader, no_dist=True)
        _assert_same(sd, out)
    # each tensor is stored with exactly its own bytes, as DCP's writer stores it
    assert torch.load(io.BytesIO(_tensor_blobs(tmp_path)["view"]), weights_only=True).untyped_storage().nbytes() == 10 * 16 * 4


def test_the_stored_blobs_skip_the_crc_and_the_process_setting_is_untouched(tmp_path):
    sd = _state()
    assert torch.serialization.get_crc32_options()
    dcp.save(sd, storage_writer=dcp_writer(tmp_path / "ours"), no_dist=True)
    dcp.save(sd, storage_writer=FileSystemWriter(tmp_path / "dcp"), no_dist=True)
    assert torch.serialization.get_crc32_options()  # a torch.save elsewhere keeps its CRC

    def crcs(blob: bytes) -> list[int]:
        return [i.CRC for i in zipfile.ZipFile(io.BytesIO(blob)).infolist() if i.file_size]

    ours, theirs = _tensor_blobs(tmp_path / "ours"), _tensor_blobs(tmp_path / "dcp")
    assert ours.keys() == theirs.keys() and len(ours) == 9
    for fqn in ours:
        assert set(crcs(ours[fqn])) == {0}, fqn
        assert any(crcs(theirs[fqn])), fqn  # DCP's writer computes it
        # the same records otherwise: same names, sizes and data
        a, b = zipfile.ZipFile(io.BytesIO(ours[fqn])), zipfile.ZipFile(io.BytesIO(theirs[fqn]))
        assert [(i.filename.split("/", 1)[1], i.file_size) for i in a.infolist()] == \
            [(i.filename.split("/", 1)[1], i.file_size) for i in b.infolist()]


def test_one_blob_loads_with_torch_load():
    t = torch.arange(1000, dtype=torch.float64).reshape(10, 100)
    buf = io.BytesIO()
    save_tensor_blob(t, buf)
    back = torch.load(io.BytesIO(buf.getvalue()), weights_only=True)
    assert torch.equal(back, t) and back.dtype == t.dtype


def test_dcp_own_path_is_kept_for_one_file_per_item(tmp_path):
    sd = {"a": torch.randn(4), "b": torch.randn(3)}
    dcp.save(sd, storage_writer=DirectFileSystemWriter(tmp_path, single_file_per_rank=False), no_dist=True)
    blobs = _tensor_blobs(tmp_path)
    assert all(i.CRC for blob in blobs.values() for i in zipfile.ZipFile(io.BytesIO(blob)).infolist() if i.file_size)
    out = _blank(sd)
    dcp.load(out, storage_reader=FileSystemReader(tmp_path), no_dist=True)
    _assert_same(sd, out)


def _plan_items(sd):
    from torch.distributed.checkpoint.default_planner import DefaultSavePlanner

    planner = DefaultSavePlanner()
    planner.set_up_planner(sd, is_coordinator=True)
    return planner.create_local_plan().items


@settings(max_examples=40, deadline=None)
@given(sizes=st.lists(st.integers(1, 5000), min_size=0, max_size=30), values=st.integers(0, 5), files=st.integers(1, 4))
def test_split_into_files_places_each_item_once_and_balances_bytes(sizes, values, files):
    sd = {f"t{i}": torch.empty(n, dtype=torch.uint8) for i, n in enumerate(sizes)}
    sd.update({f"v{i}": i for i in range(values)})
    items = _plan_items(sd)
    out = split_into_files(items, files)
    assert len(out) == files
    flat = [it for f in out for it in f]
    assert sorted(it.index.fqn for it in flat) == sorted(it.index.fqn for it in items)
    for f in out:  # values first in each file
        kinds = [it.type == WriteItemType.BYTE_IO for it in f]
        assert kinds == sorted(kinds, reverse=True)
    loads = [sum(_item_bytes(it) for it in f) for f in out]
    assert max(loads) <= sum(sizes) / files + max(sizes, default=0)


def test_split_into_files_refuses_zero_files():
    with pytest.raises(ValueError, match="files must be >= 1"):
        split_into_files([], 0)


def test_a_failing_write_raises_and_leaves_the_process_alive(tmp_path):
    """A write error inside a blob (disk full, an S3 part upload) raises; the unfinished zip
    writer must not abort the process later, when it is garbage-collected."""
    script = tmp_path / "disk_full.py"
    script.write_text(
        "import errno, gc, io, torch\n"
        "from prime_ckpt.writing import save_tensor_blob\n"
        "class DiskFull(io.BytesIO):\n"
        "    def write(self, b):\n"
        "        if self.tell() + len(memoryview(b)) > 1000:\n"
        "            raise OSError(errno.ENOSPC, 'No space left on device')\n"
        "        return super().write(b)\n"
        "try:\n"
        "    save_tensor_blob(torch.ones(1000), DiskFull())\n"
        "except OSError as e:\n"
        "    print('raised', e.errno)\n"
        "gc.collect()\n"
        "print('alive')\n"
    )
    done = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.split() == ["raised", "28", "alive"]


def test_each_item_is_resolved_once_and_one_copy_at_a_time(tmp_path):
    """DCP's SavePlanner contract: resolve_data may allocate (e.g. a dtype cast), so a writer
    resolves each item when it writes it; at most the first tensor (resolved early to see where
    the tensors live) is held beside the one being written."""
    from torch.distributed.checkpoint.default_planner import DefaultSavePlanner

    live, peak, calls = [0], [0], []

    class HalfPlanner(DefaultSavePlanner):
        def create_local_plan(self):
            plan = super().create_local_plan()
            for it in plan.items:
                if it.tensor_data is not None:
                    it.tensor_data.properties.dtype = torch.float16
            return plan

        def resolve_data(self, item):
            calls.append(item.index.fqn)
            value = super().resolve_data(item)
            if item.type == WriteItemType.BYTE_IO:
                return value
            out = value.to(torch.float16)
            live[0] += out.nbytes
            peak[0] = max(peak[0], live[0])
            weakref.finalize(out, lambda n=out.nbytes: live.__setitem__(0, live[0] - n))
            return out

    sd = {f"t{i}": torch.randn(64, 64) for i in range(12)} | {"step": 3}
    dcp.save(sd, storage_writer=dcp_writer(tmp_path), planner=HalfPlanner(), no_dist=True)
    assert sorted(calls) == sorted(sd)
    assert peak[0] <= 2 * 64 * 64 * 2
    out = {k: torch.zeros(64, 64, dtype=torch.float16) for k in sd if k != "step"} | {"step": None}
    dcp.load(out, storage_reader=FileSystemReader(tmp_path), no_dist=True)
    assert all(torch.equal(out[k], sd[k].half()) for k in sd if k != "step") and out["step"] == 3


def test_a_blob_the_quick_check_cannot_confirm_is_still_read_directly(tmp_path):
    """When the data does not start within the blob's first 4 KiB (here: a larger storage
    alignment; in practice zip64 shards of 4 GiB and more) the reader parses the blob's zip
    directory; it must not rely on zipfile's read, which rejects the CRC-less records."""
    from torch.utils.serialization import config

    sd = {"w": torch.arange(4096, dtype=torch.float32)}
    with config.patch({"save.storage_alignment": 8192}):
        dcp.save(sd, storage_writer=dcp_writer(tmp_path), no_dist=True)
    reader = dcp_reader(tmp_path)
    out = {"w": torch.zeros(4096)}
    dcp.load(out, storage_reader=reader, no_dist=True)
    assert torch.equal(out["w"], sd["w"])
    assert (reader.direct_items, reader.fallback_items) == (1, 0)


@pytest.mark.parametrize("threads", [1, 3])
def test_each_data_file_is_hashed_while_written_and_metadata_stays_dcps(tmp_path, threads):
    import pickle

    from torch.distributed.checkpoint.filesystem import _StorageInfo

    from prime_ckpt.manifest import hash_file
    from prime_ckpt.writing import DIGESTS_ATTR, file_digests

    md = dcp.save(_state(), storage_writer=dcp_writer(tmp_path, thread_count=threads), no_dist=True)
    digests = file_digests(md)
    assert sorted(digests) == [f"__0_{n}.distcp" for n in range(threads)]
    for name, size_digest in digests.items():
        assert size_digest == hash_file(tmp_path / name)
    # .metadata on disk: exactly DCP's (plain _StorageInfo, no digests): readable without prime-ckpt
    with open(tmp_path / ".metadata", "rb") as f:
        on_disk = pickle.load(f)
    assert not hasattr(on_disk, DIGESTS_ATTR)
    assert {type(info) for info in on_disk.storage_data.values()} == {_StorageInfo}
    # DCP's own writer gives no digests (nothing to trust): the manifest reads its files back
    assert file_digests(dcp.save(_state(), storage_writer=FileSystemWriter(tmp_path / "dcp"), no_dist=True)) == {}


def test_a_stream_that_was_not_only_appended_to_gives_no_digest():
    from prime_ckpt.writing import _HashingStream

    buf = io.BytesIO()
    s = _HashingStream(buf)
    s.write(b"abc")
    s.write(memoryview(b"defg"))
    import xxhash

    assert s.digest() == xxhash.xxh3_64_hexdigest(b"abcdefg") and s.nbytes == 7
    s.seek(1)
    s.write(b"X")
    assert s.digest() is None
    late = io.BytesIO(b"already here")
    late.seek(0, 2)
    assert _HashingStream(late).digest() is None  # started mid-file: not the whole file's bytes
