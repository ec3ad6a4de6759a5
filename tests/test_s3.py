"""The trainer, orchestrator record, weights, inventory, retention and manifests on ``s3://``,
against a real S3 protocol server (moto, started by the ``moto_server`` fixture) through s3fs.

Every multi-process run has a hard timeout (``run_ranks``); nothing here measures time.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time

import pytest
from conftest import ROOT, SCRIPTS, _env, kill_tree

from prime_ckpt.layout import RunLayout, latest_complete_step, resolve_resume_step, scan_inventory
from prime_ckpt.manifest import verify_path
from prime_ckpt.orchestrator import OrchestratorProgress, load_orchestrator_checkpoint, save_orchestrator_checkpoint
from prime_ckpt.retention import RetentionPolicy, apply_plan, plan_output_dir, plan_sizes
from prime_ckpt.storage import to_path
from prime_ckpt.weights import load_weights, wait_for_weights, write_weights

pytestmark = pytest.mark.timeout(600)


def _steps(inv):
    return [c.step for c in inv.checkpoints if c.complete()], [w.step for w in inv.weights if w.complete]


@pytest.mark.parametrize(
    "flags",
    [(), ("--ckpt.save-async",), ("--ckpt.save-async", "--async-mode", "process")],
    ids=["sync", "async-thread", "async-process"],
)
def test_two_rank_run_on_s3_resumes_bitwise(s3_bucket, run_ranks, flags):
    """2 ranks save every step to ``s3://bucket/run`` (options from ``--storage.options``, no
    endpoint in the environment), retention keeps 2; a fresh Checkpointer resumes ``-1`` and
    loads bitwise (checked inside the script). Then, from this process (another process than the
    writers: its listings see their objects), the inventory, resume step, manifests and a
    retention pass."""
    secret = "s3cr3t-never-logged"  # moto accepts any key pair
    options = json.dumps({**s3_bucket.storage_options, "key": "AKIAPRIMECKPTTEST", "secret": secret})
    res = run_ranks(
        "s3_run.py", "--output-dir", s3_bucket.url, "--storage.options", options,
        "--ckpt.interval", "1", "--ckpt.keep", "2", *flags, timeout=300,
    )
    for r in (0, 1):
        assert f"rank {r}: s3 resume ok (step 4" in res.stdout, res.stdout[-3000:]
    # The storage options never reach the output: the script logs its parsed config and the
    # library logs at INFO (saves, retention deletes); only the masked form shows.
    assert "storage=StorageConfig()" in res.stdout and "'options': '**********'" in res.stdout
    assert "retention: deleted" in res.stdout
    assert secret not in res.stdout and "AKIAPRIMECKPTTEST" not in res.stdout

    root = to_path(s3_bucket.url, s3_bucket.storage_options)
    # keep=2 of steps 1..4 -> {3, 4}; async level 1 pins weights [x-1, x] -> {2, 3, 4}
    assert _steps(scan_inventory(root)) == ([3, 4], [2, 3, 4])
    assert resolve_resume_step(root, -1) == 4
    keys = s3_bucket.object_keys()
    for name in ("trainer/.metadata", "trainer/__0_0.distcp", "trainer/__1_0.distcp", "orchestrator.pt",
                 "manifest.json", "save_info.json"):
        assert f"run/checkpoints/step_4/{name}" in keys, keys
    assert not any(k.startswith(("run/checkpoints/step_1/", "run/checkpoints/step_2/", "run/weights/step_1/")) for k in keys)
    assert not any(".tmp" in k for k in keys), keys  # DCP's .metadata.tmp was copied into place and removed
    info = json.loads(root.joinpath("checkpoints/step_4/save_info.json").read_bytes())
    assert info["step"] == 4 and info["world_size"] == 2 and info["total_bytes"] > 0

    # Manifests written by rank 0 after each commit verify from here...
    reports = verify_path(root)
    assert [(r.kind, r.step, r.status) for r in reports] == [
        ("checkpoint", 3, "ok"), ("checkpoint", 4, "ok"), ("weights", 2, "ok"), ("weights", 3, "ok"), ("weights", 4, "ok"),
    ], [(r.path, r.status, r.problems) for r in reports]
    # ... and catch a rewritten object.
    shard = f"{s3_bucket.bucket}/run/checkpoints/step_3/trainer/__1_0.distcp"
    data = bytearray(s3_bucket.fs.cat_file(shard))
    data[-1] ^= 0xFF
    s3_bucket.fs.pipe_file(shard, bytes(data))
    bad = {r.step: r for r in verify_path(root / "checkpoints")}
    assert bad[3].status == "failed" and "checksum mismatch" in " ".join(bad[3].problems), bad[3]
    assert bad[4].status == "ok"

    # Retention from here: keep 1 -> checkpoint 4, weights [3, 4].
    plan = plan_output_dir(root, RetentionPolicy(keep=1, async_level=1))
    assert {(e.kind, e.step) for e in plan.deletes} == {("checkpoint", 3), ("weights", 2)}
    assert plan_sizes(plan)[RunLayout(root).step_dir(3)] > 0
    result = apply_plan(plan)
    assert sorted(str(p) for p in result.deleted) == [f"{s3_bucket.url}/checkpoints/step_3", f"{s3_bucket.url}/weights/step_2"]
    assert _steps(scan_inventory(root)) == ([4], [3, 4])
    assert not any(k.startswith(("run/checkpoints/step_3/", "run/weights/step_2/")) for k in s3_bucket.object_keys())
    assert apply_plan(plan).already_gone  # deleting what is gone is not an error


def test_orchestrator_record_and_weights_on_s3(s3_bucket):
    import torch

    root = to_path(s3_bucket.url, s3_bucket.storage_options)
    path = save_orchestrator_checkpoint(root, OrchestratorProgress(step=5, total_tokens=123, extra={"seed": 1}))
    assert str(path) == f"{s3_bucket.url}/checkpoints/step_5/orchestrator.pt"
    assert load_orchestrator_checkpoint(root, 5) == OrchestratorProgress(step=5, total_tokens=123, extra={"seed": 1})
    # only the trainer part is missing: a step with a record alone is not complete
    inv = scan_inventory(root)
    assert [(c.step, c.parts, c.present) for c in inv.checkpoints] == [(5, {"trainer": False, "orchestrator": True}, ("orchestrator",))]
    assert latest_complete_step(root) is None and latest_complete_step(root, ("orchestrator",)) == 5

    sd = {"w": torch.arange(6, dtype=torch.float32).reshape(2, 3), "b": torch.ones(3, dtype=torch.bfloat16)}
    write_weights(RunLayout(root).weights_step_dir(5), sd, {"step": 5})
    assert wait_for_weights(root, 5, timeout=30) == RunLayout(root).weights_step_dir(5)
    got, config = load_weights(RunLayout(root).weights_step_dir(5))
    assert config == {"step": 5} and set(got) == {"w", "b"}
    assert all(torch.equal(got[k], sd[k]) and got[k].dtype == sd[k].dtype for k in sd)
    assert s3_bucket.object_keys()[-4:] == [f"run/weights/step_5/{n}" for n in ("COMPLETE", "config.json", "manifest.json", "model.safetensors")]


WRITE_STEP = """
import sys
import s3fs
fs = s3fs.S3FileSystem(client_kwargs={"endpoint_url": sys.argv[1]})
fs.pipe_file(sys.argv[2] + "/checkpoints/step_7/trainer/.metadata", bytes.fromhex(sys.argv[3]))
fs.pipe_file(sys.argv[2] + "/weights/step_7/COMPLETE", b"")
"""


def test_step_written_by_another_process_becomes_visible(s3_bucket):
    """s3fs caches listings per file system instance. A caller's UPath with the cache *on*
    lists ``checkpoints/`` once (cached), another process writes step 7: the cached listing
    is stale (the control), yet the inventory, the resume step and the weights wait see step 7
    (the scans drop the cache first)."""
    from upath import UPath

    from prime_ckpt.storage import atomic_write_bytes

    root = UPath(s3_bucket.url, **s3_bucket.storage_options, use_listings_cache=True)
    from tests.marks import EMPTY_METADATA

    atomic_write_bytes(root / "checkpoints" / "step_3" / "trainer" / ".metadata", EMPTY_METADATA)
    fs, ckpts = root.fs, f"{s3_bucket.bucket}/run/checkpoints"
    assert latest_complete_step(root, ("trainer",)) == 3
    assert [p.rsplit("/", 1)[1] for p in fs.ls(ckpts)] == ["step_3"]
    subprocess.run([sys.executable, "-c", WRITE_STEP, s3_bucket.endpoint, f"{s3_bucket.bucket}/run", EMPTY_METADATA.hex()],
                   check=True, timeout=120)
    assert [p.rsplit("/", 1)[1] for p in fs.ls(ckpts)] == ["step_3"]  # the cached listing is stale
    assert latest_complete_step(root, ("trainer",)) == 7
    assert resolve_resume_step(root, -1, ("trainer",)) == 7
    assert wait_for_weights(root, 7, timeout=30).name == "step_7"


@pytest.mark.parametrize("mode", ["sync", "async"])
def test_killing_the_s3_server_mid_save_fails_loudly(own_moto_server, tmp_path, mode):
    """The server dies while step 2 is being saved: every rank raises ``CheckpointSaveError``
    (one line, naming the step's path), the job exits non-zero, and step 2 was never complete.

    How "mid-save" is made deterministic: the script holds step 2's save inside every rank's
    DCP ``write_data`` (after the save's planning collective, before any shard is uploaded) and
    says so with ``writing.<rank>`` files; the test then lists the bucket, kills the server and
    releases the ranks, whose uploads now fail. Retries are off (``max_attempts: 1``) so they
    fail at once; the endpoint comes from ``AWS_ENDPOINT_URL``.

    Why "no step reported complete" holds: once the server is dead nothing more can be written,
    so what the bucket holds at the kill is final. Right before the kill the inventory read from
    here says step 1 is complete and step 2 is not (its weights and orchestrator record are
    there, ``trainer/.metadata`` is not); after the run, the server's own request log shows a
    PUT of step 1's ``trainer/.metadata`` (the positive control) and none of step 2's.
    """
    server, bucket = own_moto_server
    gate = tmp_path / "gate"
    gate.mkdir()
    options = json.dumps({"config_kwargs": {"retries": {"max_attempts": 1}, "connect_timeout": 5, "read_timeout": 10}})
    flags = ("--ckpt.save-async",) if mode == "async" else ()
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
           str(SCRIPTS / "s3_run.py"), "--output-dir", bucket.url, "--storage.options", options,
           "--ckpt.interval", "1", "--ckpt.timeout", "60", "--gate-dir", str(gate), "--steps", "3", *flags]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=ROOT,
                            env=_env(bucket.env), start_new_session=True)
    try:
        deadline = time.monotonic() + 240
        while not all((gate / f"writing.{r}").exists() for r in (0, 1)):
            assert proc.poll() is None, proc.communicate()[0][-4000:]
            assert time.monotonic() < deadline, "the ranks never reached step 2's upload"
            time.sleep(0.1)
        root = to_path(bucket.url, bucket.storage_options)
        inv = scan_inventory(root)
        # (async: training went on to step 3, whose record may be there too; its save waits for step 2's)
        assert [c.step for c in inv.checkpoints if c.complete()] == [1], inv
        assert inv.checkpoints[1].step == 2 and inv.checkpoints[1].parts == {"trainer": False, "orchestrator": True}
        assert latest_complete_step(root) == 1
        assert "run/checkpoints/step_2/trainer/.metadata" not in bucket.object_keys()
        server.stop()
        (gate / "go").touch()
        out, _ = proc.communicate(timeout=240)
    finally:
        if proc.poll() is None:
            kill_tree(proc.pid)
            proc.communicate()
    assert proc.returncode != 0, out[-4000:]
    step_path = f"{bucket.url}/checkpoints/step_2/trainer"
    for r in (0, 1):
        lines = [ln for ln in out.splitlines() if ln.startswith(f"rank {r}: CheckpointSaveError: ")]
        assert lines, out[-4000:]
        assert lines[0].startswith(f"rank {r}: CheckpointSaveError: {step_path}: checkpoint step 2 failed ("), lines[0]
    assert "committed up to step" not in out
    log = server.log.read_text()
    assert re.search(r'"PUT /[^ ]+/run/checkpoints/step_1/trainer/\.metadata HTTP', log)
    assert not re.search(r'"PUT /[^ ]+/run/checkpoints/step_2/trainer/\.metadata HTTP', log)
