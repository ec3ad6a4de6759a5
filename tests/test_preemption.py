"""Preemption: SIGTERM/SIGUSR1 -> finish the step, checkpoint, exit 0; the checkpoint resumes
bitwise. Also the signal reaching only one rank stops all of them at the same step."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest
from conftest import SCRIPTS, _env, kill_tree, torchrun

from prime_ckpt.preemption import PreemptionHandler, parse_signals


def test_parse_signals():
    assert parse_signals(["SIGTERM", "usr1"]) == (signal.SIGTERM, signal.SIGUSR1)
    with pytest.raises(ValueError, match="unknown signal 'SIGNOPE'"):
        parse_signals(["SIGNOPE"])


def test_handler_flags_and_restores():
    previous = signal.getsignal(signal.SIGUSR1)
    h = PreemptionHandler(["SIGUSR1"])
    assert not h.requested() and not h.should_stop()
    os.kill(os.getpid(), signal.SIGUSR1)
    time.sleep(0.05)
    assert h.requested() and h.should_stop() and h.signal_received == signal.SIGUSR1
    h.close()
    assert signal.getsignal(signal.SIGUSR1) == previous


@pytest.mark.parametrize("sig,targets", [(signal.SIGTERM, "all"), (signal.SIGUSR1, "rank1")])
def test_preempted_job_exits_0_and_resumes_bitwise(tmp_path, sig, targets):
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", str(SCRIPTS / "preempt.py"), str(out), "run"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=_env(), start_new_session=True)
    try:
        deadline = time.monotonic() + 120
        while not all((out / "pids" / f"ready_{r}").exists() for r in (0, 1)):
            assert proc.poll() is None and time.monotonic() < deadline, proc.stdout.read() if proc.poll() is not None else "timeout"
            time.sleep(0.05)
        pids = [int((out / "pids" / f"rank_{r}").read_text()) for r in (0, 1)]
        for pid in pids if targets == "all" else pids[1:]:
            os.kill(pid, sig)  # as a scheduler does: signal the workers
        stdout, _ = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            kill_tree(proc.pid)
    assert proc.returncode == 0, stdout[-3000:]
    saved = json.loads((out / "preempted.json").read_text())
    assert f"rank 0: preempted at step {saved['step']}" in stdout and f"rank 1: preempted at step {saved['step']}" in stdout
    res = torchrun("preempt.py", str(out), "resume", timeout=120)
    assert f"resumed at step {saved['step']} digest {saved['digest']}" in res.stdout
