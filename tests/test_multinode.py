"""A 2-node torchrun launch simulated on one machine (two agents, c10d rendezvous on
127.0.0.1, one process each): checkpoint on 2 nodes, resume on 1 node, and the reverse."""

import json
import socket
import subprocess
import sys

from conftest import SCRIPTS, _env, run_proc


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def two_nodes(*args: str, timeout: float = 180) -> None:
    """Run tests/dist_scripts/train_tiny.py as 2 nodes x 1 process (the README's command)."""
    port = _free_port()
    procs = []
    for node_rank in (0, 1):
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc-per-node", "1",
               "--node-rank", str(node_rank), "--rdzv-backend", "c10d", "--rdzv-endpoint", f"127.0.0.1:{port}",
               "--rdzv-id", "prime-ckpt-test", str(SCRIPTS / "train_tiny.py"), *args]
        procs.append(subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=_env(), start_new_session=True))
    outs = []
    try:
        for p in procs:
            outs.append(p.communicate(timeout=timeout)[0])
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    assert all(p.returncode == 0 for p in procs), "\n".join(o[-3000:] for o in outs)


def one_node(*args: str) -> None:
    run_proc([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
              str(SCRIPTS / "train_tiny.py"), *args], timeout=180)


def test_checkpoint_on_two_nodes_resume_on_one(tmp_path):
    ref, a, b = tmp_path / "ref.json", tmp_path / "a.json", tmp_path / "b.json"
    one_node(str(tmp_path / "ref"), str(ref), "--steps", "6")
    two_nodes(str(tmp_path / "run"), str(a), "--steps", "3", "--save-every", "3", "--async")
    one_node(str(tmp_path / "run"), str(b), "--steps", "6", "--resume-step", "-1")
    r, x, y = (json.loads(p.read_text()) for p in (ref, a, b))
    assert y["start"] == 3
    assert x["losses"] == {k: v for k, v in r["losses"].items() if int(k) <= 3}
    assert y["losses"] == {k: v for k, v in r["losses"].items() if int(k) > 3}
    assert y["final"] == r["final"]


def test_checkpoint_on_one_node_resume_on_two(tmp_path):
    ref, a, b = tmp_path / "ref.json", tmp_path / "a.json", tmp_path / "b.json"
    one_node(str(tmp_path / "ref"), str(ref), "--steps", "4")
    one_node(str(tmp_path / "run"), str(a), "--steps", "2", "--save-every", "2")
    two_nodes(str(tmp_path / "run"), str(b), "--steps", "4", "--resume-step", "-1")
    r, y = json.loads(ref.read_text()), json.loads(b.read_text())
    assert y["start"] == 2 and y["final"] == r["final"]
    assert y["losses"] == {k: v for k, v in r["losses"].items() if int(k) > 2}
