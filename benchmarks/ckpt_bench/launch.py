"""The launcher: a ``moto`` S3 server, one ``torchrun`` of the script per world size under a
timeout, then the result (records, extras, environment, targets) and its output files."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from typing_extensions import Self

from ckpt_bench.common import ROOT, SCRIPT, environment
from ckpt_bench.report import write_outputs
from ckpt_bench.settings import Settings
from ckpt_bench.targets import compute_targets, explain


def free_port() -> int:
    """A free TCP port on 127.0.0.1."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class MotoServer:
    """``moto`` S3 server on 127.0.0.1 at a free port, in a child process (stopped on exit)."""

    def __init__(self) -> None:
        self.port = free_port()
        self.endpoint = f"http://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen | None = None

    def __enter__(self) -> Self:
        self.proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(self.port)],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
        deadline = time.time() + 30
        while time.time() < deadline:
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.5):
                    return self
            except OSError:
                if self.proc.poll() is not None:
                    raise RuntimeError("moto server exited at start") from None
                time.sleep(0.1)
        self.__exit__()
        raise RuntimeError("moto server did not start within 30 s")

    def __exit__(self, *exc: object) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()


def run_world(s: Settings, ws: int, argv: list[str], workdir: str, s3_endpoint: str | None) -> dict[str, Any]:
    """One torchrun of ``ws`` ranks of this script (killed after ``s.timeout``): its worker output.

    Raises RuntimeError (one line) when it times out or the workers fail."""
    out = os.path.join(workdir, f"worker_ws{ws}.json")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={ws}",
           str(SCRIPT), *argv, "--worker-out", out, "--workdir", workdir]
    if s3_endpoint:
        cmd += ["--s3-endpoint", s3_endpoint]
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    env.setdefault("OMP_NUM_THREADS", "1")
    env.update({"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"})
    proc = subprocess.Popen(cmd, env=env, start_new_session=True)
    try:
        rc = proc.wait(timeout=s.timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        raise RuntimeError(f"world size {ws}: timed out after {s.timeout:.0f} s") from None
    if rc != 0 or not os.path.exists(out):
        raise RuntimeError(f"world size {ws}: workers exited with {rc}")
    return json.loads(Path(out).read_text())



def titan_notes(s: Settings, argv: list[str]) -> list[str]:
    """Whether this launch runs the torchtitan cases: one line for the results when they are
    selected but skipped (``--no-titan``, or no torchtitan in ``--titan-env``; then ``--no-titan``
    is appended to ``argv``, which the workers get), else the torchtitan version it imports."""
    from ckpt_bench import registry
    from ckpt_bench.titan_env import availability

    if s.weights_only or not any(spec.family == "titan" for phase in ("save", "load")
                                 for spec in registry.selected(phase, s.cases)):
        return []
    if not s.titan:
        return ["torchtitan cases skipped: --no-titan"]
    ok, what = availability(Path(s.titan_env))
    if not ok:
        s.titan = False
        argv.append("--no-titan")
        return [f"torchtitan cases skipped: {what}"]
    return [f"torchtitan {what}, imported from {s.titan_env} (behind the project's venv: one torch for every case)"]


def launcher(s: Settings, argv: list[str]) -> Path:
    """Every world size in turn (a moto server for the S3 cases), then the targets and the
    outputs; exits 1 after writing them when a world size failed."""
    t0 = time.perf_counter()
    s.results_dir.mkdir(parents=True, exist_ok=True)
    own_workdir = s.workdir is None
    workdir = s.workdir or tempfile.mkdtemp(prefix="prime_ckpt_bench_")
    records: list[dict] = []
    extras: dict[int, dict] = {}
    env: dict[str, Any] = {}
    errors: list[str] = []
    argv = list(argv)
    notes = titan_notes(s, argv)
    for note in notes:
        print(note, flush=True)
    try:
        server = MotoServer() if s.s3 else None
        with server if server is not None else contextlib.nullcontext():
            for ws in s.world_sizes:
                print(f"== world size {ws} ==", flush=True)
                try:
                    out = run_world(s, ws, argv, workdir, server.endpoint if server else None)
                except RuntimeError as e:
                    errors.append(str(e))
                    print(f"error: {e}", file=sys.stderr, flush=True)
                    continue
                records += out["records"]
                extras[ws] = out["extras"]
                env = out["env"]
    finally:
        if own_workdir:
            shutil.rmtree(workdir, ignore_errors=True)
    result: dict[str, Any] = {
        "name": s.name,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "wall_s": time.perf_counter() - t0,
        "environment": {**(env or environment()), "loadavg_end": list(os.getloadavg())},
        "settings": {"sizes": s.sizes, "world_sizes": s.world_sizes, "reps": s.reps, "quick": s.quick, "s3": s.s3,
                     "s3_max_size": s.s3_max_size, "step_size": s.step_size, "steps": s.steps,
                     "rss_saves": s.rss_saves, "rss_size": s.rss_size, "weights_sizes": s.weights_sizes,
                     "weights_only": s.weights_only,
                     # only when narrowed: a subset of the cases, or cases from files outside the package
                     **({"cases": s.cases} if s.cases is not None else {}),
                     **({"case_modules": s.case_modules} if s.case_modules else {})},
        "errors": errors,
        "notes": notes,
        "records": records,
        "extras": {str(k): v for k, v in extras.items()},
        "targets": compute_targets(records, extras, s.world_sizes, s.sizes) if records else {},
    }
    explain(result)
    base = write_outputs(result, s.results_dir, s.name, s.plot)
    print(f"wrote {base}.json / .md{' / .png' if s.plot and records else ''}")
    if errors:
        raise SystemExit(1)
    return base
