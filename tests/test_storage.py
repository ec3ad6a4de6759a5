"""Durable atomic writes, crash-safe deletes and leftover cleaning."""

import os
import subprocess
import sys
import textwrap
import time

from prime_ckpt.layout import scan_checkpoints
from prime_ckpt.storage import (
    atomic_write_bytes,
    clean_leftovers,
    is_leftover,
    remove_tree,
    tree_size,
)


def test_atomic_write_replaces_and_leaves_no_temp(tmp_path):
    p = tmp_path / "a" / "b.bin"
    atomic_write_bytes(p, b"one")
    atomic_write_bytes(p, b"two")
    assert p.read_bytes() == b"two"
    assert os.listdir(p.parent) == ["b.bin"]


def test_atomic_write_error_keeps_old_content(tmp_path):
    p = tmp_path / "b.bin"
    atomic_write_bytes(p, b"old")

    def boom(f):
        f.write(b"partial")
        raise RuntimeError("disk on fire")

    from prime_ckpt.storage import atomic_write

    try:
        atomic_write(p, boom)
    except RuntimeError:
        pass
    assert p.read_bytes() == b"old" and os.listdir(tmp_path) == ["b.bin"]


def test_remove_tree(tmp_path):
    d = tmp_path / "step_3"
    (d / "trainer").mkdir(parents=True)
    (d / "trainer" / ".metadata").write_bytes(b"x" * 7)
    assert tree_size(d) == 7
    assert remove_tree(d) is True
    assert not d.exists() and os.listdir(tmp_path) == []
    assert remove_tree(d) is False  # already gone is not an error
    f = tmp_path / "f"
    f.write_text("x")
    assert remove_tree(f) is True and not f.exists()


KILL_MID_DELETE = textwrap.dedent(
    """
    import os, shutil, signal, sys
    from prime_ckpt.storage import remove_tree
    def die(*a, **k):
        os.kill(os.getpid(), signal.SIGKILL)
    shutil.rmtree = die
    remove_tree(sys.argv[1])
    """
)


def test_kill_mid_delete_never_leaves_a_step_that_looks_complete(tmp_path):
    step = tmp_path / "checkpoints" / "step_10"
    (step / "trainer").mkdir(parents=True)
    (step / "trainer" / ".metadata").write_bytes(b"m")
    (step / "orchestrator.pt").write_bytes(b"o")
    proc = subprocess.run([sys.executable, "-c", KILL_MID_DELETE, str(step)], timeout=60,
                          env={**os.environ, "PYTHONPATH": os.getcwd()})
    assert proc.returncode == -9
    assert scan_checkpoints(tmp_path) == []  # the half-deleted dir is hidden, not a step
    [leftover] = os.listdir(tmp_path / "checkpoints")
    assert is_leftover(leftover) and leftover.startswith(".step_10.deleting.")
    assert clean_leftovers(tmp_path / "checkpoints") == [tmp_path / "checkpoints" / leftover]
    assert os.listdir(tmp_path / "checkpoints") == []


def test_clean_leftovers_spares_fresh_temp_files_and_foreign_names(tmp_path):
    ck = tmp_path / "checkpoints"
    (ck / "step_5").mkdir(parents=True)
    fresh = ck / "step_5" / ".orchestrator.pt.tmp.123"
    old = ck / "step_5" / ".orchestrator.pt.tmp.456"
    fresh.write_bytes(b"being written")
    old.write_bytes(b"crashed")
    past = time.time() - 3600
    os.utime(old, (past, past))
    (ck / "notes.tmp.txt").write_text("not ours")
    (ck / "my.deleting.dir").mkdir()
    assert clean_leftovers(ck) == [old]
    assert sorted(os.listdir(ck / "step_5")) == [".orchestrator.pt.tmp.123"]
    assert sorted(os.listdir(ck)) == ["my.deleting.dir", "notes.tmp.txt", "step_5"]
    assert clean_leftovers(tmp_path / "missing") == []


def test_set_aside_moves_whole_steps_out_of_the_namespace(tmp_path):
    from prime_ckpt.storage import set_aside

    ck = tmp_path / "checkpoints"
    for s in (3, 4):
        (ck / f"step_{s}" / "trainer").mkdir(parents=True)
        (ck / f"step_{s}" / "trainer" / ".metadata").write_bytes(b"m")
    moved = set_aside([ck / "step_3", ck / "step_4"], ck / ".superseded-x")
    assert moved == [ck / ".superseded-x" / "step_3", ck / ".superseded-x" / "step_4"]
    assert scan_checkpoints(tmp_path) == []
    assert (ck / ".superseded-x" / "step_4" / "trainer" / ".metadata").read_bytes() == b"m"
    assert clean_leftovers(ck) == []  # not a crash leftover: kept for the user
