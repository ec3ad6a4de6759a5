"""Entering a run: the lease on the output directory, resumability, setting aside an earlier run's
steps (issue 15, items 1-7)."""

import json
import os
import subprocess
import sys
import textwrap
import time

import pytest

from prime_ckpt.errors import NotResumableError, RunLeaseError
from prime_ckpt.layout import RunLayout, resolve_resume_step, scan_checkpoints, scan_weights
from prime_ckpt.retention import RetentionPolicy, plan_output_dir
from prime_ckpt.run import LEASE_FILE, RUN_FILE, SUPERSEDED_DIR, RunLease, enter_run, read_run_record
from tests.marks import write_orchestrator_mark, write_trainer_mark


def make_ckpt(root, step, orchestrator=True, async_level=None):
    layout = RunLayout(root)
    write_trainer_mark(layout.trainer_dir(step))
    if orchestrator:
        write_orchestrator_mark(layout.orchestrator_path(step), step)
    if async_level is not None:
        (layout.step_dir(step) / "save_info.json").write_text(json.dumps({"async_level": async_level}))


def make_weights(root, step, complete=True):
    d = RunLayout(root).weights_step_dir(step)
    d.mkdir(parents=True)
    (d / "model.safetensors").write_bytes(b"w")
    if complete:
        (d / "COMPLETE").write_bytes(b"")


# -- item 1: a mark that does not parse is not "complete" ---------------------------------------
@pytest.mark.parametrize("content", [b"", b"garbage", None])
def test_unparsable_metadata_is_not_complete_and_never_resumed_or_kept_as_newest(tmp_path, content):
    for s in (5, 10):
        make_ckpt(tmp_path, s)
    meta = RunLayout(tmp_path).trainer_dir(10) / ".metadata"
    if content is None:  # truncated real metadata
        meta.write_bytes(meta.read_bytes()[:20])
    else:
        meta.write_bytes(content)
    [c5, c10] = scan_checkpoints(tmp_path)
    assert c5.complete() and not c10.complete()
    assert "unreadable .metadata" in c10.problems["trainer"]
    assert resolve_resume_step(tmp_path, -1) == 5
    p = plan_output_dir(tmp_path, RetentionPolicy(keep=1))
    assert p.action_for("checkpoint", 5) == "keep" and "newest complete" in dict(
        (e.step, e.reasons) for e in p.entries)[5]
    with pytest.raises(NotResumableError, match=r"step_10: checkpoint step is incomplete .*trainer: unreadable \.metadata"):
        resolve_resume_step(tmp_path, 10)


def test_unparsable_orchestrator_record_and_missing_data_file_are_not_complete(tmp_path):
    make_ckpt(tmp_path, 3)
    make_ckpt(tmp_path, 4)
    RunLayout(tmp_path).orchestrator_path(4).write_bytes(b"not a torch file")
    c3, c4 = scan_checkpoints(tmp_path)
    assert c3.complete() and not c4.complete() and "unreadable orchestrator.pt" in c4.problems["orchestrator"]
    assert resolve_resume_step(tmp_path, -1) == 3


def test_data_file_missing_or_truncated_makes_a_real_dcp_step_incomplete(tmp_path):
    import torch
    import torch.distributed.checkpoint as dcp

    for s in (1, 2):
        dcp.save({"w": torch.arange(1000.0)}, checkpoint_id=str(RunLayout(tmp_path).trainer_dir(s)))
    assert [c.parts["trainer"] for c in scan_checkpoints(tmp_path)] == [True, True]
    [data] = [p for p in RunLayout(tmp_path).trainer_dir(2).iterdir() if p.suffix == ".distcp"]
    data.write_bytes(data.read_bytes()[:100])
    c2 = scan_checkpoints(tmp_path)[1]
    assert not c2.parts["trainer"] and "truncated" in c2.problems["trainer"]
    data.unlink()
    assert scan_checkpoints(tmp_path)[1].problems["trainer"] == f"data file {data.name} missing"
    assert resolve_resume_step(tmp_path, -1, ("trainer",)) == 1


# -- item 2: resumable = complete + the weights window [x - k, x] --------------------------------
def test_checkpoint_without_its_weights_is_not_resumable(tmp_path):
    for s in (15, 20):
        make_ckpt(tmp_path, s, async_level=2)
    for s in range(13, 21):
        if s not in (18, 19):
            make_weights(tmp_path, s)
    assert resolve_resume_step(tmp_path, -1) == 15
    with pytest.raises(NotResumableError, match=r"step_20: checkpoint step is not resumable: the weights it needs, "
                       r"steps \[18, 20\] \(async level 2\), are not all complete: missing weights/step_18, step_19"):
        resolve_resume_step(tmp_path, 20)
    p = plan_output_dir(tmp_path, RetentionPolicy(keep=1, async_level=2))
    assert p.action_for("checkpoint", 15) == "keep"  # the newest resumable, kept though keep=1
    assert p.action_for("checkpoint", 20) == "keep"
    assert all(p.action_for("weights", s) == "keep" for s in (13, 14, 15))


def test_a_trainer_only_run_needs_no_weights(tmp_path):
    make_ckpt(tmp_path, 7, orchestrator=False, async_level=3)
    assert resolve_resume_step(tmp_path, -1, ("trainer",)) == 7


# -- item 6: a step directory that is not ours is never complete, resumed or deleted ------------
def test_plain_dcp_checkpoint_as_step_dir_is_foreign_and_kept(tmp_path):
    import torch
    import torch.distributed.checkpoint as dcp

    ck = tmp_path / "checkpoints"
    for s in (1, 2):
        dcp.save({"w": torch.ones(4)}, checkpoint_id=str(ck / f"step_{s}"))
    make_ckpt(tmp_path, 3, orchestrator=False)
    make_ckpt(tmp_path, 4, orchestrator=False)
    steps = scan_checkpoints(tmp_path)
    assert [bool(c.foreign) for c in steps] == [True, True, False, False]
    assert "DCP checkpoint saved directly in the step directory" in steps[0].foreign
    p = plan_output_dir(tmp_path, RetentionPolicy(keep=1, parts=("trainer",)))
    assert [(e.step, e.action) for e in p.entries if e.kind == "checkpoint"] == [(1, "keep"), (2, "keep"), (3, "delete"), (4, "keep")]
    assert "never deleted" in p.entries[0].reasons[0]
    assert resolve_resume_step(tmp_path, -1, ("trainer",)) == 4
    with pytest.raises(NotResumableError, match="not this project's checkpoint"):
        resolve_resume_step(tmp_path, 2, ("trainer",))
    from prime_ckpt.retention import apply_plan

    apply_plan(p)
    assert sorted(os.listdir(ck)) == ["step_1", "step_2", "step_4"]


def test_weights_dir_with_unknown_files_is_foreign(tmp_path):
    make_weights(tmp_path, 1)
    make_weights(tmp_path, 2)
    (RunLayout(tmp_path).weights_step_dir(1) / "pytorch_model.bin").write_bytes(b"x")
    w1, w2 = scan_weights(tmp_path)
    assert w1.foreign and "pytorch_model.bin" in w1.foreign and w2.foreign is None
    p = plan_output_dir(tmp_path, RetentionPolicy(keep=1, async_level=0), current_step=10)
    assert p.action_for("weights", 1) == "keep" and p.action_for("weights", 2) == "delete"


# -- item 7: one meaning of "no keep" ------------------------------------------------------------
def test_no_keep_deletes_nothing(tmp_path):
    for s in (5, 10):
        make_ckpt(tmp_path, s)
    for s in range(11):
        make_weights(tmp_path, s)
    p = plan_output_dir(tmp_path, RetentionPolicy(keep=None, async_level=1))
    assert p.deletes == ()


# -- items 3, 4: entering a run sets an earlier run's steps aside --------------------------------
def test_fresh_entry_sets_aside_every_earlier_step_and_resume_cannot_pick_them(tmp_path):
    for s in (500, 600, 700):
        make_ckpt(tmp_path, s)
    for s in (2, 3, 4, 5):
        make_weights(tmp_path, s)
    (tmp_path / "checkpoints" / "notes").mkdir()
    entry = enter_run(tmp_path, None, run_id="newrun")
    try:
        assert entry.start_step is None
        assert scan_checkpoints(tmp_path) == [] and scan_weights(tmp_path) == []
        assert resolve_resume_step(tmp_path, -1) is None
        where = tmp_path / SUPERSEDED_DIR
        [moved] = os.listdir(where)
        assert "-newrun-" in moved
        assert sorted(os.listdir(where / moved / "checkpoints")) == ["step_500", "step_600", "step_700"]
        assert sorted(os.listdir(where / moved / "weights")) == ["step_2", "step_3", "step_4", "step_5"]
        assert (tmp_path / "checkpoints" / "notes").is_dir()  # not ours: untouched
        assert read_run_record(tmp_path)["run_id"] == "newrun"
    finally:
        entry.lease.release()
    assert not (tmp_path / LEASE_FILE).exists()


def test_resume_from_an_older_step_sets_newer_steps_aside_together(tmp_path):
    for s in (5, 10, 20):
        make_ckpt(tmp_path, s, async_level=2)
    for s in range(21):
        make_weights(tmp_path, s)
    (tmp_path / "rollouts").mkdir()
    for s in range(1, 21):
        (tmp_path / "rollouts" / f"step_{s}.pt").write_bytes(b"r")
    entry = enter_run(tmp_path, 5, also=("rollouts",), lease=False)
    assert entry.start_step == 5
    assert [c.step for c in scan_checkpoints(tmp_path)] == [5]
    assert [w.step for w in scan_weights(tmp_path)] == list(range(6))
    assert sorted(os.listdir(tmp_path / "rollouts")) == [f"step_{s}.pt" for s in range(1, 6)]
    aside = entry.superseded_dir
    assert sorted(os.listdir(aside / "checkpoints")) == ["step_10", "step_20"]
    assert len(os.listdir(aside / "weights")) == 15 and len(os.listdir(aside / "rollouts")) == 15
    # nothing was deleted: the set-aside steps keep a run's layout, whole, and the newest is still
    # resumable there (its weights window went with it)
    assert resolve_resume_step(aside, -1) == 20


# -- item 5: one run per output directory --------------------------------------------------------
HOLD = textwrap.dedent(
    """
    import sys, time
    from prime_ckpt.run import enter_run
    entry = enter_run(sys.argv[1], None, run_id="first")
    print("held", flush=True)
    time.sleep(60)
    """
)


def test_a_second_run_fails_at_once_naming_the_holder_and_a_dead_holder_is_taken_over(tmp_path):
    proc = subprocess.Popen([sys.executable, "-c", HOLD, str(tmp_path)], stdout=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONPATH": os.getcwd()})
    try:
        assert proc.stdout.readline().strip() == "held"
        t0 = time.monotonic()
        with pytest.raises(RunLeaseError, match=rf"run.lock: output directory is in use by run first \(pid {proc.pid} on host") as info:
            enter_run(tmp_path, -1, run_id="second")
        assert time.monotonic() - t0 < 5 and "\n" not in str(info.value)
        assert info.value.holder["pid"] == proc.pid
    finally:
        proc.kill()
        proc.wait()
    # the holder died (kill -9): its lease is stale at once on the same host
    entry = enter_run(tmp_path, -1, run_id="second")
    assert json.loads((tmp_path / LEASE_FILE).read_text())["run_id"] == "second"
    entry.lease.release()


def test_a_launcher_s_child_joins_the_lease_and_leaves_it_to_the_owner(tmp_path):
    owner = RunLease(tmp_path, "r1").acquire()
    child = RunLease(tmp_path, "r1").acquire()
    assert owner.owned and not child.owned
    child.release()
    assert (tmp_path / LEASE_FILE).exists()
    owner.release()
    assert not (tmp_path / LEASE_FILE).exists()


def test_lease_from_another_host_expires_by_heartbeat(tmp_path):
    (tmp_path / LEASE_FILE).write_text(json.dumps({"run_id": "x", "host": "elsewhere", "pid": 1, "heartbeat_at": time.time()}))
    with pytest.raises(RunLeaseError, match="pid 1 on host elsewhere, heartbeat 0 s ago"):
        RunLease(tmp_path, "y", ttl_s=60).acquire()
    (tmp_path / LEASE_FILE).write_text(json.dumps({"run_id": "x", "host": "elsewhere", "pid": 1, "heartbeat_at": time.time() - 120}))
    lease = RunLease(tmp_path, "y", ttl_s=60).acquire()
    assert lease.owned
    lease.release()


def test_heartbeat_refreshes_the_lease(tmp_path):
    lease = RunLease(tmp_path, "hb", ttl_s=2, heartbeat_s=0.1).acquire()
    try:
        first = json.loads((tmp_path / LEASE_FILE).read_text())["heartbeat_at"]
        deadline = time.monotonic() + 10
        while json.loads((tmp_path / LEASE_FILE).read_text())["heartbeat_at"] == first:
            assert time.monotonic() < deadline
            time.sleep(0.05)
    finally:
        lease.release()


def test_run_record_is_written(tmp_path):
    make_ckpt(tmp_path, 4, async_level=0)
    make_weights(tmp_path, 4)
    entry = enter_run(tmp_path, -1, run_id="abc", lease=False)
    record = json.loads((tmp_path / RUN_FILE).read_text())
    assert entry.start_step == 4 and record["run_id"] == "abc" and record["start_step"] == 4 and record["set_aside"] == []


def test_a_same_host_lease_with_a_reused_pid_expires_by_heartbeat(tmp_path):
    import socket

    # pid 1 is alive (another process reused the dead holder's pid): only the heartbeat tells
    (tmp_path / LEASE_FILE).write_text(json.dumps({"run_id": "old", "host": socket.gethostname(), "pid": 1,
                                                   "heartbeat_at": time.time() - 3600}))
    lease = RunLease(tmp_path, "new", ttl_s=60).acquire()
    assert lease.owned and json.loads((tmp_path / LEASE_FILE).read_text())["run_id"] == "new"
    lease.release()
    # this very process with a stale record (pid reuse in a container) is not joined silently
    (tmp_path / LEASE_FILE).write_text(json.dumps({"run_id": "old", "host": socket.gethostname(), "pid": os.getpid(),
                                                   "heartbeat_at": time.time() - 3600}))
    lease = RunLease(tmp_path, "new2", ttl_s=60).acquire()
    assert lease.owned
    lease.release()
