"""Trainer checkpointing on 2 CPU/gloo ranks with FSDP2 (each run under a hard timeout)."""

import json
import os

import pytest

from prime_ckpt.layout import scan_checkpoints
from prime_ckpt.manifest import verify_manifest


@pytest.mark.parametrize("mode", ["sync", "async"])
def test_roundtrip_bitwise_and_async_snapshot(tmp_path, run_ranks, mode):
    """Model + AdamW + scheduler + progress + per-rank RNG reload bitwise; for async, changes made
    after save() returned do not reach the checkpoint (the script asserts both)."""
    out = run_ranks("trainer_roundtrip.py", str(tmp_path / "run"), mode, timeout=180)
    assert out.stdout.count(f"roundtrip {mode} ok") == 2, out.stdout
    [step] = scan_checkpoints(tmp_path / "run")
    assert step.step == 2 and step.parts["trainer"]
    files = sorted(p.name for p in (step.path / "trainer").iterdir())
    assert files == [".metadata", "__0_0.distcp", "__1_0.distcp"]
    info = json.loads((step.path / "save_info.json").read_text())
    assert info["step"] == 2 and info["mode"] == mode and info["world_size"] == 2 and info["bytes"] > 0
    assert info["total_bytes"] > info["bytes"] and info["total_s"] >= info["blocking_s"]
    # the post-commit job wrote a manifest covering every trainer file; it verifies
    report = verify_manifest(step.path)
    assert report.ok and report.files_checked == 3, report


def _run(run_ranks, out, result, *args):
    run_ranks("train_tiny.py", str(out), str(result), *args, timeout=180)
    return json.loads(result.read_text())


def test_resume_equivalence(tmp_path, run_ranks):
    """2K uninterrupted steps == K steps + resume from step K for K more: bitwise-equal final
    parameters and optimizer state, identical per-step losses (needs per-rank RNG for dropout,
    Python random and NumPy, and the per-rank dataloader position)."""
    k = 5
    ref = _run(run_ranks, tmp_path / "ref", tmp_path / "ref.json", "--steps", str(2 * k))
    first = _run(run_ranks, tmp_path / "run", tmp_path / "a.json", "--steps", str(k), "--save-every", str(k), "--async")
    assert first["start"] is None
    resumed = _run(run_ranks, tmp_path / "run", tmp_path / "b.json", "--steps", str(2 * k), "--resume-step", "-1")
    assert resumed["start"] == k
    assert [first["losses"][str(s)] for s in range(1, k + 1)] == [ref["losses"][str(s)] for s in range(1, k + 1)]
    assert resumed["losses"] == {str(s): ref["losses"][str(s)] for s in range(k + 1, 2 * k + 1)}
    assert resumed["final"] == ref["final"]
    assert resumed["progress"] == ref["progress"]


def test_source_rank_key_rule():
    from prime_ckpt.trainer import source_rank_key

    keys = [f"app.rank_state.rank_{r}.rng.torch_cpu" for r in (0, 1)] + ["app.model.w", "app.rank_state_x.rank_5.a"]
    assert [source_rank_key(keys, r) for r in range(5)] == ["rank_0", "rank_1", "rank_0", "rank_1", "rank_0"]
    assert source_rank_key(["app.model.w"], 0) is None
    assert source_rank_key(["app.rank_state.rank_0.rng.torch_cpu"], 3) == "rank_0"


@pytest.mark.parametrize("mode", ["sync", "async"])
def test_write_failure_on_one_rank_raises_everywhere(tmp_path, run_ranks, mode):
    """ENOSPC on rank 1 only: every rank raises CheckpointSaveError naming rank 1 and the path,
    the previous checkpoint still loads bitwise, nothing is deleted, and the job exits non-zero."""
    res = run_ranks("save_failure.py", str(tmp_path / "run"), mode, timeout=180, check=False)
    assert res.returncode != 0, res.stdout
    for r in (0, 1):
        assert f"rank {r}: CheckpointSaveError: " in res.stdout, res.stdout[-3000:]
        assert f"rank {r}: step 1 still loads bitwise" in res.stdout
    assert "checkpoint step 2 failed (rank 1: OSError: [Errno 28] No space left on device" in res.stdout
    # the resume from step 1 set the failed step 2 aside (nothing deleted)
    assert sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir()) == ["step_1"]
    [failed] = (tmp_path / "run" / "superseded").glob("*/checkpoints/step_2")
    assert (tmp_path / "run" / "checkpoints" / "step_1" / "trainer" / ".metadata").is_file()
    assert not (failed / "trainer" / ".metadata").exists()


def test_resume_step_errors_keep_their_type(tmp_path):
    from prime_ckpt.config import CheckpointConfig
    from prime_ckpt.layout import CheckpointNotFoundError
    from prime_ckpt.trainer import Checkpointer

    with pytest.raises(CheckpointNotFoundError, match=r"step_7: no such checkpoint step; no checkpoint steps on disk"):
        Checkpointer(tmp_path, CheckpointConfig(resume_step=7)).resume_step()
    assert Checkpointer(tmp_path, CheckpointConfig(resume_step=-1)).resume_step() is None


def test_stale_trainer_dir_replaced_but_an_empty_one_left_alone(tmp_path, run_ranks):
    """Files in a trainer dir before a save are an earlier save's: rank 0 removes them. An empty
    trainer dir is this save's own (a faster rank's planning step made it): removing it opened a
    window in which a crash left no trace of the save in progress (seen in the fault harness)."""
    res = run_ranks("stale_trainer_dir.py", str(tmp_path / "run"), timeout=120)
    assert "removed: ['step_1']" in res.stdout
    assert "step 1 files: ['.metadata', '__0_0.distcp', '__1_0.distcp']" in res.stdout


def test_gc_paused_restores_the_collectors_state():
    import gc

    from prime_ckpt.trainer import gc_paused

    assert gc.isenabled()
    with gc_paused():
        assert not gc.isenabled()
        with gc_paused():
            assert not gc.isenabled()
        assert not gc.isenabled()  # the inner block does not re-enable for the outer one
    assert gc.isenabled()
    gc.disable()
    try:
        with gc_paused():
            pass
        assert not gc.isenabled()  # a caller's own gc.disable() is kept
    finally:
        gc.enable()
    with pytest.raises(ValueError), gc_paused():
        raise ValueError
    assert gc.isenabled()


@pytest.mark.parametrize("save_async", [False, True])
def test_save_and_load_run_with_the_collector_paused(tmp_path, save_async):
    """The state is read (save) and written back (load) while the cyclic collector is paused, and
    it runs again afterwards; one in-process gloo rank."""
    import gc

    import torch
    import torch.distributed as dist

    from prime_ckpt.config import CheckpointConfig
    from prime_ckpt.trainer import Checkpointer, TrainerState

    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        model = torch.nn.Linear(4, 3)
        opt = torch.optim.AdamW(model.parameters())
        model(torch.randn(2, 4)).sum().backward()
        opt.step()
        state = TrainerState(model, opt)
        seen: list[tuple[str, bool]] = []
        real_sd, real_load = state.state_dict, state.load_state_dict
        state.state_dict = lambda: (seen.append(("state_dict", gc.isenabled())), real_sd())[1]
        state.load_state_dict = lambda sd: (seen.append(("load_state_dict", gc.isenabled())), real_load(sd))[1]
        ck = Checkpointer(tmp_path, CheckpointConfig(interval=1, save_async=save_async))
        ck.save(1, state)
        assert gc.isenabled()
        ck.flush()
        want = {k: v.clone() for k, v in model.state_dict().items()}
        with torch.no_grad():
            model.weight.add_(1)
        ck.load(1, state)
        assert gc.isenabled()
        ck.close()
        assert seen == [("state_dict", False), ("state_dict", False), ("load_state_dict", False)]
        assert all(torch.equal(model.state_dict()[k], v) for k, v in want.items())
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("save_async", [False, True])
def test_write_threads_write_one_file_each_and_load_back(tmp_path, save_async):
    """``--ckpt.write-threads 2``: each rank writes two data files, the manifest covers both,
    and the step loads back bitwise (one in-process gloo rank)."""
    import torch
    import torch.distributed as dist

    from prime_ckpt.config import CheckpointConfig
    from prime_ckpt.trainer import Checkpointer, TrainerState

    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        torch.manual_seed(0)
        model = torch.nn.Sequential(*[torch.nn.Linear(16, 16) for _ in range(4)])
        opt = torch.optim.AdamW(model.parameters())
        model(torch.randn(2, 16)).sum().backward()
        opt.step()
        state = TrainerState(model, opt)
        ck = Checkpointer(tmp_path, CheckpointConfig(interval=1, save_async=save_async, write_threads=2))
        ck.save(1, state)
        ck.flush()
        want = {k: v.clone() for k, v in model.state_dict().items()}
        want_opt = [s["exp_avg"].clone() for s in opt.state.values()]
        with torch.no_grad():
            for p in model.parameters():
                p.add_(1)
            for s in opt.state.values():
                s["exp_avg"].zero_()
        ck.load(1, state)
        ck.close()
        trainer_dir = tmp_path / "checkpoints" / "step_1" / "trainer"
        assert sorted(p.name for p in trainer_dir.glob("*.distcp")) == ["__0_0.distcp", "__0_1.distcp"]
        report = verify_manifest(tmp_path / "checkpoints" / "step_1")
        assert report.status == "ok" and {"trainer/__0_0.distcp", "trainer/__0_1.distcp"} <= {f["path"] for f in json.loads((tmp_path / "checkpoints" / "step_1" / "manifest.json").read_text())["files"]}
        assert all(torch.equal(model.state_dict()[k], v) for k, v in want.items())
        assert all(torch.equal(s["exp_avg"], w) for s, w in zip(opt.state.values(), want_opt))
    finally:
        dist.destroy_process_group()


# -- entering a run (issue 15: items 3, 5, 8 through the README's library loop) ------------------
def _small_state(seed: int = 0):
    import torch

    from prime_ckpt.trainer import TrainerState

    torch.manual_seed(seed)
    model = torch.nn.Linear(4, 3)
    opt = torch.optim.AdamW(model.parameters())
    model(torch.randn(2, 4)).sum().backward()
    opt.step()
    return model, TrainerState(model, opt)


def test_a_fresh_checkpointer_in_a_reused_dir_never_resumes_the_earlier_run(tmp_path):
    """An earlier run left complete steps 500..700; a fresh Checkpointer (no resume) with keep=3
    saves 100 and 200: the old steps were set aside on entry (not deleted), so a crash-resume of
    the new run (-1) loads 200, and nothing of the earlier run is lost."""
    from prime_ckpt.config import CheckpointConfig
    from prime_ckpt.layout import resolve_resume_step
    from prime_ckpt.trainer import Checkpointer

    _model, state = _small_state(1)
    old = Checkpointer(tmp_path, CheckpointConfig(interval=100))
    for s in (500, 600, 700):
        old.save(s, state)
    old.close()
    _model, state = _small_state(2)
    new = Checkpointer(tmp_path, CheckpointConfig(interval=100, keep=3))
    assert new.resume_step() is None
    for s in (100, 200):
        new.save(s, state)
    new.close()
    assert [c.step for c in scan_checkpoints(tmp_path)] == [100, 200]
    assert resolve_resume_step(tmp_path, -1, ("trainer",)) == 200
    [aside] = (tmp_path / "superseded").iterdir()
    assert sorted(p.name for p in (aside / "checkpoints").iterdir()) == ["step_500", "step_600", "step_700"]
    assert all(c.complete(("trainer",)) for c in scan_checkpoints(aside))
    assert json.loads((tmp_path / "run.json").read_text())["run_id"] == new.run_id
    assert json.loads((tmp_path / "checkpoints" / "step_200" / "save_info.json").read_text())["run_id"] == new.run_id
    assert not (tmp_path / "run.lock").exists()  # released by close()


def test_resaving_a_complete_step_is_refused_and_overwrite_sets_the_old_one_aside(tmp_path):
    import torch

    from prime_ckpt.config import CheckpointConfig
    from prime_ckpt.errors import StepExistsError
    from prime_ckpt.trainer import Checkpointer

    model, state = _small_state(3)
    ck = Checkpointer(tmp_path, CheckpointConfig(interval=1))
    ck.save(5, state)
    first = model.weight.detach().clone()
    with torch.no_grad():
        model.weight.add_(1)
    with pytest.raises(StepExistsError, match=r"step_5/trainer: checkpoint step 5 is already complete; not replacing it"):
        ck.save(5, state)
    ck.save(5, state, overwrite=True)
    ck.close()
    [aside] = (tmp_path / "superseded").glob("*-resave-step_5-*/checkpoints/step_5/trainer")
    for where, want in ((tmp_path, model.weight.detach().clone()), (None, first)):
        model2, state2 = _small_state(4)
        if where is None:  # the set-aside earlier save is whole and loads bitwise
            import torch.distributed.checkpoint as dcp

            sd = {"app": {"model": {"weight": torch.empty(3, 4), "bias": torch.empty(3)}}}
            dcp.load(sd, checkpoint_id=str(aside))
            assert torch.equal(sd["app"]["model"]["weight"], want)
        else:
            Checkpointer(tmp_path, CheckpointConfig(resume_step=5)).load(5, state2)
            assert torch.equal(model2.weight, want)


def test_a_second_checkpointer_on_a_held_dir_fails_at_once(tmp_path):
    import os
    import subprocess
    import sys
    import textwrap

    from prime_ckpt.config import CheckpointConfig
    from prime_ckpt.errors import RunLeaseError
    from prime_ckpt.trainer import Checkpointer

    hold = textwrap.dedent("""
        import sys, time
        from prime_ckpt.config import CheckpointConfig
        from prime_ckpt.trainer import Checkpointer
        ck = Checkpointer(sys.argv[1], CheckpointConfig(interval=1))
        print("held", ck.run_id, flush=True)
        time.sleep(60)
    """)
    proc = subprocess.Popen([sys.executable, "-c", hold, str(tmp_path)], stdout=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONPATH": os.getcwd()})
    try:
        _, holder = proc.stdout.readline().split()
        with pytest.raises(RunLeaseError, match=rf"output directory is in use by run {holder} \(pid {proc.pid} "):
            Checkpointer(tmp_path, CheckpointConfig(interval=1, resume_step=-1))
    finally:
        proc.kill()
        proc.wait()


@pytest.mark.parametrize("what", ["save", "publish"])
def test_kill_while_overwriting_a_step_loses_nothing(tmp_path, what):
    """SIGKILL at several instants while step 5 is being overwritten (a checkpoint re-saved with
    overwrite=True, a weights step published again): the earlier complete version is always whole
    somewhere — still in place, or set aside under superseded/ — and the step in place is either
    version, complete, or visibly incomplete; never a mix."""
    import hashlib
    import os
    import signal
    import subprocess
    import sys
    import time

    import torch
    import torch.distributed.checkpoint as dcp

    from prime_ckpt.layout import scan_weights, trainer_part_complete, weights_complete
    from prime_ckpt.weights import load_weights

    def sha(t):
        return hashlib.sha256(t.contiguous().numpy().tobytes()).hexdigest()

    def weight_of(path):
        if what == "save":
            sd = {"app": {"model": {"weight": torch.empty(1024, 1024), "bias": torch.empty(1024)}}}
            dcp.load(sd, checkpoint_id=str(path), no_dist=True)
            return sha(sd["app"]["model"]["weight"])
        return sha(load_weights(path)[0]["weight"])

    def complete(path):
        return trainer_part_complete(path) if what == "save" else weights_complete(path)

    for i, delay in enumerate((0.0, 0.005, 0.02, 0.05, 0.1, 0.3)):
        out = tmp_path / f"run{i}"
        proc = subprocess.Popen([sys.executable, "tests/dist_scripts/overwrite_kill.py", str(out), what],
                                stdout=subprocess.PIPE, text=True, env={**os.environ, "PYTHONPATH": os.getcwd()})
        try:
            v1 = proc.stdout.readline().split()[1]
            v2 = proc.stdout.readline().split()[1]
            time.sleep(delay)
            proc.send_signal(signal.SIGKILL)
            proc.wait(timeout=60)
        finally:
            proc.kill()
            proc.wait()
        place = out / "checkpoints" / "step_5" / "trainer" if what == "save" else out / "weights" / "step_5"
        aside = sorted((out / "superseded").glob("*/checkpoints/step_5/trainer" if what == "save" else "*/weights/step_5"))
        versions = {weight_of(p) for p in [place, *aside] if p.exists() and complete(p)}
        assert v1 in versions, (delay, versions)  # the earlier version is never lost
        assert versions <= {v1, v2}
        if place.exists() and complete(place):
            assert weight_of(place) in (v1, v2)
        if what == "publish":
            assert all(w.foreign is None for w in scan_weights(out))


def test_a_full_disk_during_a_save_is_named_no_space_left(tmp_path, monkeypatch):
    """torch's zip writer reports a full disk as 'PytorchStreamWriter failed writing ... file write
    failed'; the save error says 'No space left on device' when the file system is full."""
    import shutil

    from prime_ckpt import trainer

    err = RuntimeError("[enforce fail at inline_container.cc:664] . PytorchStreamWriter failed writing file data/0: file write failed")
    monkeypatch.setattr(shutil, "disk_usage", lambda p: shutil._ntuple_diskusage(100, 100, 0))
    e = trainer._save_error(3, tmp_path / "checkpoints" / "step_3" / "trainer", err)
    assert "rank 0: OSError: [Errno 28] No space left on device (0 bytes free on the file system of" in str(e)
    monkeypatch.setattr(shutil, "disk_usage", lambda p: shutil._ntuple_diskusage(10 << 30, 1 << 30, 9 << 30))
    assert "PytorchStreamWriter failed writing" in str(trainer._save_error(3, tmp_path, err))  # not a full disk: as torch says


def test_a_save_never_writes_into_a_foreign_step_dir_and_a_stray_hidden_file_changes_nothing(tmp_path):
    """A step directory another tool wrote (a plain DCP save at checkpoints/step_3) is refused,
    untouched; a .DS_Store in a complete step of ours keeps it ours, complete and resumable; two
    overwrites within one second both set the earlier step aside (unique names) (review of #15)."""
    import torch
    import torch.distributed.checkpoint as dcp

    from prime_ckpt.config import CheckpointConfig
    from prime_ckpt.errors import StepExistsError
    from prime_ckpt.layout import resolve_resume_step
    from prime_ckpt.trainer import Checkpointer

    foreign = tmp_path / "checkpoints" / "step_3"
    dcp.save({"w": torch.ones(3)}, checkpoint_id=str(foreign), no_dist=True)
    before = sorted(os.listdir(foreign))
    _model, state = _small_state(5)
    ck = Checkpointer(tmp_path, CheckpointConfig(interval=1))
    ck.save(2, state)
    with pytest.raises(StepExistsError, match=r"step_3: not this project's checkpoint step \(a DCP checkpoint saved directly"):
        ck.save(3, state)
    assert sorted(os.listdir(foreign)) == before
    (tmp_path / "checkpoints" / "step_2" / ".DS_Store").write_bytes(b"x")
    assert resolve_resume_step(tmp_path, -1, ("trainer",)) == 2
    ck.save(2, state, overwrite=True)
    ck.save(2, state, overwrite=True)
    ck.close()
    asides = sorted((tmp_path / "superseded").glob("*-resave-step_2-*/checkpoints/step_2"))
    assert len(asides) == 2 and all((a / "trainer" / ".metadata").is_file() and (a / "save_info.json").is_file() for a in asides)


def test_post_commit_failures_are_recorded_and_raise_after_the_limit(tmp_path, monkeypatch):
    """#17: a failing retention is recorded in each save's record (and save_info.json); after
    POST_COMMIT_FAILURE_LIMIT consecutive failures the next save raises PostCommitError (an
    Exception, one line) before writing anything; a success resets the count."""
    import json

    from prime_ckpt import commit as commit_mod
    from prime_ckpt.config import CheckpointConfig
    from prime_ckpt.errors import PostCommitError, PrimeCkptError
    from prime_ckpt.trainer import POST_COMMIT_FAILURE_LIMIT, Checkpointer

    assert POST_COMMIT_FAILURE_LIMIT == 3
    _, state = _small_state()
    broken = {"on": True}
    real_apply = commit_mod.apply_plan

    def apply(plan):
        if broken["on"]:
            raise OSError(28, "No space left on device")
        return real_apply(plan)

    monkeypatch.setattr(commit_mod, "apply_plan", apply)
    ck = Checkpointer(tmp_path, CheckpointConfig(interval=1, keep=1))
    try:
        ck.save(1, state)
        ck.flush()
        broken["on"] = False  # one success resets the count
        ck.save(2, state)
        ck.flush()
        broken["on"] = True
        for step in (3, 4, 5):
            ck.save(step, state)
            ck.flush()
            info = json.loads((tmp_path / "checkpoints" / f"step_{step}" / "save_info.json").read_text())
            assert info["post_commit_error"] == "retention: OSError: [Errno 28] No space left on device", info
        assert ck.records[-1].post_commit_error == "retention: OSError: [Errno 28] No space left on device"
        with pytest.raises(PostCommitError) as err:
            ck.save(6, state)
        assert isinstance(err.value, PrimeCkptError) and isinstance(err.value, Exception)
        assert "\n" not in str(err.value) and "last 3 saves" in str(err.value) and "step 5: retention" in str(err.value)
        assert not (tmp_path / "checkpoints" / "step_6").exists()
        assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["step_2", "step_3", "step_4", "step_5"]
    finally:
        ck.close()


def test_checkpointer_is_a_context_manager(tmp_path):
    """#17: `with Checkpointer(...)` closes on exit: the async save is durable and the lease is
    released (a second Checkpointer can enter the directory at once)."""
    from prime_ckpt.config import CheckpointConfig
    from prime_ckpt.layout import latest_complete_step
    from prime_ckpt.trainer import Checkpointer

    _, state = _small_state()
    with Checkpointer(tmp_path, CheckpointConfig(interval=1, save_async=True)) as ck:
        ck.save(1, state)
        assert (tmp_path / "run.lock").is_file()
    assert ck._closed and latest_complete_step(tmp_path) == 1 and not (tmp_path / "run.lock").exists()
    with Checkpointer(tmp_path, CheckpointConfig(interval=1, resume_step=-1)) as again:
        assert again.resume_step() == 1
