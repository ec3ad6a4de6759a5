"""#17: ``Checkpointer.save()`` returns a handle (:class:`SaveRecord`) with the stages staged /
durable / committed as futures, ``poll()`` and ``wait(timeout)``; one in-process gloo rank."""

import errno
import json
from concurrent.futures import Future

import pytest
import torch
import torch.distributed as dist

from prime_ckpt.config import CheckpointConfig
from prime_ckpt.layout import scan_checkpoints
from prime_ckpt.trainer import Checkpointer, CheckpointSaveError, SaveRecord, TrainerState
from prime_ckpt.writing import DirectFileSystemWriter as FileSystemWriter  # the writer a save uses


@pytest.fixture
def gloo1():
    """One in-process gloo rank (world size 1) for the duration of a test."""
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        yield
    finally:
        dist.destroy_process_group()


def _state(seed: int = 0) -> TrainerState:
    torch.manual_seed(seed)
    model = torch.nn.Linear(8, 4)
    opt = torch.optim.AdamW(model.parameters())
    model(torch.randn(2, 8)).sum().backward()
    opt.step()
    return TrainerState(model, opt)


def _files(step_dir):
    return sorted(p.name for p in (step_dir / "trainer").iterdir())


def _stages(rec: SaveRecord) -> list[Future]:
    return [rec.staged, rec.durable, rec.committed]


def test_a_sync_save_returns_a_handle_with_every_stage_resolved(tmp_path, gloo1):
    ck = Checkpointer(tmp_path, CheckpointConfig(interval=1))
    try:
        rec = ck.save(3, _state())
        assert isinstance(rec, SaveRecord) and rec.mode == "sync"
        assert all(isinstance(f, Future) and f.done() for f in _stages(rec))
        assert [f.result() for f in _stages(rec)] == [3, 3, 3]
        assert rec.poll() == "committed"
        assert rec.wait(timeout=0) is rec
        assert rec.error is None and rec.total_s is not None and rec.bytes > 0
        assert _files(tmp_path / "checkpoints" / "step_3") == [".metadata", "__0_0.distcp"]
    finally:
        ck.close()


def test_an_async_save_handle_resolves_committed_with_the_step(tmp_path, gloo1):
    ck = Checkpointer(tmp_path, CheckpointConfig(interval=1, save_async=True))
    try:
        rec = ck.save(4, _state())
        assert rec.mode == "async" and rec.staged.done() and rec.staged.result() == 4
        assert rec.poll() in ("staged", "durable", "committed")
        assert rec.committed.result(timeout=120) == 4
        assert rec.wait(timeout=120) is rec and rec.poll() == "committed"
        assert rec.durable.result() == 4 and rec.total_s is not None and rec.upload_s is not None
        assert _files(tmp_path / "checkpoints" / "step_4") == [".metadata", "__0_0.distcp"]
        [step] = scan_checkpoints(tmp_path)
        assert step.step == 4 and step.parts["trainer"]
        assert ck.wait() is rec  # the checkpointer's own wait still returns it
        ck.flush()
        info = json.loads((tmp_path / "checkpoints" / "step_4" / "save_info.json").read_text())
        assert info["step"] == 4 and info["mode"] == "async" and "committed" not in info
    finally:
        ck.close()


@pytest.mark.parametrize("save_async", [False, True])
def test_a_failed_save_sets_its_error_on_the_unreached_stages(tmp_path, gloo1, monkeypatch, save_async):
    ck = Checkpointer(tmp_path, CheckpointConfig(interval=1, save_async=save_async))
    try:
        ck.save(1, _state())
        ck.wait()

        def no_space(self, plan, planner):
            raise OSError(errno.ENOSPC, "No space left on device", str(self.path))

        monkeypatch.setattr(FileSystemWriter, "write_data", no_space)
        if save_async:
            rec = ck.save(2, _state(1))
            assert rec.staged.result() == 2
        else:
            with pytest.raises(CheckpointSaveError):
                ck.save(2, _state(1))
            rec = ck.records[-1]
            assert isinstance(rec.staged.exception(), CheckpointSaveError)
        with pytest.raises(CheckpointSaveError, match=r"checkpoint step 2 failed \(rank 0: OSError: \[Errno 28\] No space left on device"):
            rec.wait(timeout=120)
        for f in (rec.durable, rec.committed):
            assert isinstance(f.exception(timeout=0), CheckpointSaveError) and f.exception().step == 2
        assert rec.poll() == "failed" and rec.error is not None
        if save_async:
            with pytest.raises(CheckpointSaveError):  # the checkpointer's wait raises it too
                ck.wait()
    finally:
        monkeypatch.undo()
        ck.close()
    assert [c.step for c in scan_checkpoints(tmp_path) if c.parts["trainer"]] == [1]


def test_the_old_pattern_save_then_wait_still_works(tmp_path, gloo1):
    ck = Checkpointer(tmp_path, CheckpointConfig(interval=1, save_async=True))
    try:
        rec = ck.save(5, _state())
        assert rec.blocking_s > 0 and rec.step == 5
        done = ck.wait()
        assert done is rec and rec.total_s >= rec.blocking_s and rec.error is None
        assert rec.poll() == "committed"  # the checkpointer's wait leaves the handle committed
        ck.flush()
        assert rec.total_bytes > 0 and rec in ck.records
    finally:
        ck.close()
    assert _files(tmp_path / "checkpoints" / "step_5") == [".metadata", "__0_0.distcp"]


@pytest.mark.parametrize("save_async", [False, True])
def test_the_manifest_takes_the_digests_taken_while_writing_and_reads_no_data_file_back(tmp_path, gloo1, monkeypatch,
                                                                                         save_async):
    import xxhash

    import prime_ckpt.manifest_record as manifest_record
    from prime_ckpt.manifest import read_manifest

    read_back: list[str] = []
    real_hash_file = manifest_record.hash_file
    monkeypatch.setattr(manifest_record, "hash_file", lambda p, *a, **k: read_back.append(p.name) or real_hash_file(p, *a, **k))
    ck = Checkpointer(tmp_path, CheckpointConfig(interval=1, save_async=save_async, write_threads=2))
    try:
        rec = ck.save(5, _state())
        ck.flush()
    finally:
        ck.close()
    step = tmp_path / "checkpoints" / "step_5"
    assert sorted(rec.file_digests) == ["__0_0.distcp", "__0_1.distcp"]
    assert read_back == [".metadata"]  # only the file DCP wrote itself is read back
    m = read_manifest(step)
    assert [f["path"] for f in m["files"]] == ["trainer/.metadata", "trainer/__0_0.distcp", "trainer/__0_1.distcp"]
    for f in m["files"]:  # and every digest is the file's
        data = (step / f["path"]).read_bytes()
        assert (f["size"], f["xxh3_64"]) == (len(data), xxhash.xxh3_64_hexdigest(data))
