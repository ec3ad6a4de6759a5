"""The orchestrator progress record: atomic writes, weights_only reads, crash safety."""

import os
import pickle
import subprocess
import sys
import textwrap

import pytest
import torch

from prime_ckpt.layout import RunLayout, scan_checkpoints
from prime_ckpt.orchestrator import (
    OrchestratorProgress,
    ProgressRecordError,
    load_orchestrator_checkpoint,
    load_progress,
    save_orchestrator_checkpoint,
    save_progress,
)


def test_roundtrip_with_extra_fields(tmp_path):
    p = OrchestratorProgress(step=30, total_tokens=1234, total_samples=96, total_problems=24, extra={"lr": 0.5, "tags": ["a", 1]})
    path = save_orchestrator_checkpoint(tmp_path, p)
    assert path == RunLayout(tmp_path).orchestrator_path(30)
    assert load_orchestrator_checkpoint(tmp_path, 30) == p
    raw = torch.load(path, weights_only=True)
    assert raw == {"step": 30, "total_tokens": 1234, "total_samples": 96, "total_problems": 24, "extra": {"lr": 0.5, "tags": ["a", 1]}}
    assert [c.step for c in scan_checkpoints(tmp_path)] == [30]
    assert os.listdir(path.parent) == ["orchestrator.pt"]  # no temp file left behind


def test_unknown_fields_are_kept_in_extra(tmp_path):
    path = tmp_path / "orchestrator.pt"
    torch.save({"step": 3, "total_tokens": 5, "future_field": 7}, path)
    assert load_progress(path) == OrchestratorProgress(step=3, total_tokens=5, extra={"future_field": 7})


def test_only_plain_values(tmp_path):
    with pytest.raises(TypeError, match="progress.extra.t: only plain values"):
        save_progress(tmp_path / "o.pt", OrchestratorProgress(step=1, extra={"t": torch.zeros(1)}))
    assert not (tmp_path / "o.pt").exists()


class _Evil:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_bad_files_are_refused_without_executing(tmp_path):
    marker = tmp_path / "pwned"
    evil = tmp_path / "evil.pt"
    with open(evil, "wb") as f:
        pickle.dump({"step": _Evil(marker)}, f)
    torch.save({"step": _Evil(marker)}, tmp_path / "evil_torch.pt")
    for bad in (evil, tmp_path / "evil_torch.pt"):
        with pytest.raises(ProgressRecordError, match=str(bad)):
            load_progress(bad)
    assert not marker.exists()
    (tmp_path / "text.pt").write_text("hello")
    with pytest.raises(ProgressRecordError, match=r"text.pt: not a torch file \(neither a torch.save zip nor a legacy"):
        load_progress(tmp_path / "text.pt")
    (tmp_path / "empty.pt").write_bytes(b"")
    with pytest.raises(ProgressRecordError, match="empty.pt: empty file, not a torch file"):
        load_progress(tmp_path / "empty.pt")
    torch.save([1, 2], tmp_path / "list.pt")
    with pytest.raises(ProgressRecordError, match="not a progress record"):
        load_progress(tmp_path / "list.pt")
    with pytest.raises(FileNotFoundError, match="missing.pt"):
        load_progress(tmp_path / "missing.pt")


def test_torch_free_reader_matches_torch_load(tmp_path):
    """load_progress reads torch.save's zip without torch: the same value torch.load gives."""
    from collections import OrderedDict

    from prime_ckpt.orchestrator import _read_plain

    p = OrchestratorProgress(step=5, total_tokens=7, extra={"lr": 0.25, "tags": ["a", 1, None, True], "nested": {"k": [1.5]}})
    save_progress(tmp_path / "o.pt", p)
    assert _read_plain(tmp_path / "o.pt") == torch.load(tmp_path / "o.pt", weights_only=True)
    torch.save(OrderedDict(step=3, total_tokens=4), tmp_path / "od.pt")  # the one global admitted
    assert _read_plain(tmp_path / "od.pt") == {"step": 3, "total_tokens": 4}
    assert load_progress(tmp_path / "od.pt") == OrchestratorProgress(step=3, total_tokens=4)


def test_record_holding_a_tensor_is_refused(tmp_path):
    torch.save({"step": torch.tensor(3)}, tmp_path / "t.pt")
    with pytest.raises(ProgressRecordError, match=r"t\.pt: holds a tensor"):
        load_progress(tmp_path / "t.pt")


def test_legacy_torch_save_format_falls_back_to_torch(tmp_path):
    torch.save({"step": 4, "total_samples": 2}, tmp_path / "old.pt", _use_new_zipfile_serialization=False)
    assert load_progress(tmp_path / "old.pt") == OrchestratorProgress(step=4, total_samples=2)


KILLER = textwrap.dedent(
    """
    import os, signal, sys
    from prime_ckpt.storage import writes
    from prime_ckpt.orchestrator import OrchestratorProgress, save_progress
    where = sys.argv[2]
    real_replace, real_fsync = os.replace, os.fsync
    def die(*a, **k):
        os.kill(os.getpid(), signal.SIGKILL)
    if where == "before_fsync":
        os.fsync = die
    elif where == "before_rename":
        os.replace = die
    elif where == "after_rename":
        writes.fsync_dir = die
    save_progress(sys.argv[1], OrchestratorProgress(step=20, total_samples=2))
    """
)


@pytest.mark.parametrize("where,expected_step", [("before_fsync", 10), ("before_rename", 10), ("after_rename", 20)])
def test_kill_during_write_leaves_old_or_new_record(tmp_path, where, expected_step):
    """SIGKILL between tmp write and rename: the old record is intact; after the rename: the new
    one is complete. Never a partial file under the final name."""
    path = tmp_path / "checkpoints" / "step_10" / "orchestrator.pt"
    save_progress(path, OrchestratorProgress(step=10, total_samples=1))
    proc = subprocess.run([sys.executable, "-c", KILLER, str(path), where], cwd=os.getcwd(), timeout=60,
                          env={**os.environ, "PYTHONPATH": os.getcwd()})
    assert proc.returncode == -9
    assert load_progress(path).step == expected_step
    leftovers = [p.name for p in path.parent.iterdir() if p.name != "orchestrator.pt"]
    assert all(n.startswith(".orchestrator.pt.tmp.") for n in leftovers)
    assert [c.step for c in scan_checkpoints(tmp_path)] == [10]  # the temp file is never a step or a part


def test_a_foreign_file_is_refused_without_importing_torch(tmp_path):
    """Read-only commands stay torch-free on a garbage orchestrator.pt (a fresh-user trial saw
    `list` take 6 s instead of 1 s: the reader fell back to torch.load for it)."""
    import subprocess
    import sys

    (tmp_path / "orchestrator.pt").write_text("hello")
    code = (
        "import sys\n"
        "from prime_ckpt.orchestrator import load_progress, ProgressRecordError\n"
        f"try:\n    load_progress({str(tmp_path / 'orchestrator.pt')!r})\n"
        "except ProgressRecordError as e:\n    print('refused:', e)\n"
        "print('torch imported:', 'torch' in sys.modules)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=120).stdout
    assert "refused: " in out and "not a torch file" in out and "torch imported: False" in out


def test_consumer_ack_takes_int_steps_only(tmp_path):
    from prime_ckpt.orchestrator import read_consumer_ack, write_consumer_ack

    for bad in (True, 3.7, "5", -1):
        with pytest.raises(ValueError, match="step must be an int >= 0"):
            write_consumer_ack(tmp_path, bad)
    assert read_consumer_ack(tmp_path) is None
    write_consumer_ack(tmp_path, 4)
    assert read_consumer_ack(tmp_path) == 4
    (tmp_path / "consumer_ack.json").write_text("not json")
    assert read_consumer_ack(tmp_path) is None  # unreadable: pins nothing extra


@pytest.mark.parametrize("bad", [{"step": "5"}, {"step": -1}, {"step": True}, {"step": 3, "total_tokens": 1.5},
                                 {"step": 3, "extra": [1]}])
def test_a_record_with_wrong_types_is_refused_by_field(tmp_path, bad):
    import torch

    from prime_ckpt.layout import scan_checkpoints
    from prime_ckpt.orchestrator import ProgressRecordError, load_progress

    path = tmp_path / "checkpoints" / "step_3" / "orchestrator.pt"
    path.parent.mkdir(parents=True)
    torch.save(bad, path)
    field = next(k for k in ("step", "total_tokens", "extra") if k in bad and (k != "step" or len(bad) == 1))
    with pytest.raises(ProgressRecordError, match=rf"orchestrator.pt: field '{field}' is "):
        load_progress(path)
    [c] = scan_checkpoints(tmp_path)
    assert not c.parts["orchestrator"] and f"field '{field}'" in c.problems["orchestrator"]
