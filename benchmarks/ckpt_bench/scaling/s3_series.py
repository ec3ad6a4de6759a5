"""Series 3: ``prime-ckpt list`` / ``verify`` on S3 (a moto server), requests and time vs steps.

A counting moto server (:mod:`moto_counting`) runs in a child process. For each n, a run prefix
``s3://<bucket>/run_<n>`` gets n checkpoint steps written directly (trainer part only: a real
one-rank DCP ``.metadata`` + ``__0_0.distcp`` of one 16x16 tensor, and a ``manifest.json`` over
them); then ``python -m prime_ckpt.cli list --json`` and ``verify --json`` run on it as the user
would (a fresh process, endpoint in ``--storage.options``, credentials in the environment),
timed end to end, with the server's request tally for each. The outputs are checked (n steps
listed, every step verified ok) so a broken run never passes as a fast one.
"""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

from ckpt_bench.common import ROOT
from ckpt_bench.launch import free_port
from ckpt_bench.scaling.moto_counting import COUNT_PATH

S3_ENV = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}
BUCKET = "prime-ckpt-scaling"


class CountingMoto:
    """The counting moto server in a child process group (killed on exit)."""

    def __enter__(self):
        self.port = free_port()
        self.endpoint = f"http://127.0.0.1:{self.port}"
        script = Path(__file__).with_name("moto_counting.py")
        self.proc = subprocess.Popen([sys.executable, str(script), str(self.port)], stdout=subprocess.DEVNULL,
                                     stderr=subprocess.DEVNULL, start_new_session=True)
        deadline = time.time() + 60
        while True:
            try:
                self.counts(reset=True)
                return self
            except OSError:
                if self.proc.poll() is not None or time.time() > deadline:
                    self.__exit__()
                    raise RuntimeError("counting moto server did not start") from None
                time.sleep(0.2)

    def __exit__(self, *exc: object) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()

    def counts(self, reset: bool = False) -> dict[str, int]:
        req = urllib.request.Request(self.endpoint + COUNT_PATH, method="POST" if reset else "GET")
        with urllib.request.urlopen(req, timeout=5) as r:
            return json.loads(r.read())


def step_files(tmp: Path) -> dict[str, bytes]:
    """The trainer part of one tiny real step: relative path -> bytes."""
    import torch
    import torch.distributed.checkpoint as dcp

    d = tmp / "trainer"
    torch.manual_seed(0)
    dcp.save({"model": {"w": torch.randn(16, 16)}}, checkpoint_id=str(d), no_dist=True)
    return {f"trainer/{p.name}": p.read_bytes() for p in sorted(d.iterdir()) if p.is_file()}


def write_run(fs, prefix: str, n: int, files: dict[str, bytes]) -> None:
    """n checkpoint steps under ``prefix`` (``checkpoints/step_1..n``), each with a manifest."""
    import xxhash

    from prime_ckpt.manifest_record import ALGORITHM, build_manifest

    entries = [{"path": rel, "size": len(b), ALGORITHM: xxhash.xxh3_64_hexdigest(b)} for rel, b in files.items()]
    objects: dict[str, bytes] = {}
    for s in range(1, n + 1):
        step = f"{prefix}/checkpoints/step_{s}"
        for rel, b in files.items():
            objects[f"{step}/{rel}"] = b
        objects[f"{step}/manifest.json"] = build_manifest("checkpoint", f"/x/step_{s}", entries, ["trainer"])
    fs.pipe(objects)


def cli(server: CountingMoto, *args: str, timeout: float, parse: bool = True) -> tuple[float, dict[str, int], Any]:
    """``python -m prime_ckpt.cli --storage.options ... ARGS`` in a fresh process: (seconds,
    request tally, parsed JSON output)."""
    env = {**os.environ, **S3_ENV, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep)}
    env.pop("AWS_ENDPOINT_URL", None)
    opts = json.dumps({"client_kwargs": {"endpoint_url": server.endpoint}})
    server.counts(reset=True)
    t0 = time.perf_counter()
    p = subprocess.run([sys.executable, "-m", "prime_ckpt.cli", "--storage.options", opts, *args], env=env,
                       capture_output=True, text=True, timeout=timeout)
    dt = time.perf_counter() - t0
    counts = server.counts()
    if p.returncode != 0:
        raise RuntimeError(f"prime-ckpt {args[0]} exited {p.returncode}: {p.stderr.strip()[-500:]}")
    return dt, counts, json.loads(p.stdout) if parse else p.stdout


def run(quick: bool, max_point_s: float, log) -> dict[str, Any]:
    import s3fs

    ladder = (2, 4, 8) if quick else (3, 10, 30, 60)
    rows: list[dict] = []
    skipped: list[dict] = []
    with CountingMoto() as server, tempfile.TemporaryDirectory(prefix="prime_ckpt_scaling_") as tmp:
        for k, v in S3_ENV.items():
            os.environ.setdefault(k, v)
        fs = s3fs.S3FileSystem(client_kwargs={"endpoint_url": server.endpoint}, use_listings_cache=False)
        fs.mkdir(BUCKET)
        files = step_files(Path(tmp))
        # warm-up: the first CLI process pays cold imports (pyc) the others do not
        cli(server, "--help", timeout=max_point_s, parse=False)
        for n in ladder:
            prefix = f"{BUCKET}/run_{n}"
            t0 = time.perf_counter()
            write_run(fs, prefix, n, files)
            row: dict[str, Any] = {"steps": n, "objects": n * (len(files) + 1), "write_s": time.perf_counter() - t0}
            url = f"s3://{prefix}"
            for cmd in ("list", "verify"):
                done = [r for r in rows if r.get(f"{cmd}_s")]
                guess = _predict(done, cmd, n)
                if guess > max_point_s:
                    skipped.append({"command": cmd, "steps": n, "predicted_s": guess})
                    log(f"  s3 {n} steps: skip {cmd} (predicted {guess:.0f} s > {max_point_s:.0f} s)")
                    continue
                dt, req, out = cli(server, cmd, "--json", url, timeout=max(120.0, 5 * max_point_s))
                if cmd == "list":
                    assert len(out["checkpoints"]) == n and all(c["complete"] for c in out["checkpoints"]), out
                else:
                    assert out["ok"] and len(out["steps"]) == n, out
                row.update({f"{cmd}_s": dt, f"{cmd}_requests": sum(req.values()), f"{cmd}_by_kind": req})
                log(f"  s3 {n} steps: {cmd} {dt:.2f} s / {sum(req.values())} requests")
            rows.append(row)
        # the fixed cost in every point: a process that only imports the CLI
        startup_s, _, _ = cli(server, "--help", timeout=max_point_s, parse=False)
    return {"points": {"s3": rows}, "skipped": skipped, "cli_startup_s": startup_s}


def _predict(done: list[dict], cmd: str, n: int) -> float:
    """Seconds ``cmd`` would take at n steps, from the last two measured points' local exponent
    (at least 1); 0 with fewer than two."""
    if len(done) < 2:
        return 0.0
    a, b = done[-2], done[-1]
    k = max(1.0, math.log(b[f"{cmd}_s"] / a[f"{cmd}_s"]) / math.log(b["steps"] / a["steps"]))
    return b[f"{cmd}_s"] * (n / b["steps"]) ** k
