"""Shared fixtures: launch N gloo ranks under torchrun with a hard timeout."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import psutil
import pytest

ROOT = Path(__file__).resolve().parent.parent
SCRIPTS = Path(__file__).resolve().parent / "dist_scripts"

os.environ.setdefault("WANDB_MODE", "offline")


def _env(extra: dict[str, str] | None = None) -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    env.setdefault("OMP_NUM_THREADS", "1")
    env["WANDB_MODE"] = "offline"
    env["PYTHONUNBUFFERED"] = "1"
    env.update(extra or {})
    return env


def kill_tree(pid: int) -> None:
    """SIGKILL ``pid``, its process group and every descendant.

    torchrun starts each worker in a session of its own, so killing the launcher's process group
    alone leaves hung workers alive (holding the output pipe open, so reading it never ends).
    """
    try:
        descendants = psutil.Process(pid).children(recursive=True)
    except psutil.NoSuchProcess:
        descendants = []
    try:
        os.killpg(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    for child in descendants:
        try:
            child.kill()
        except psutil.NoSuchProcess:
            pass


def run_proc(cmd: list[str], *, timeout: float, env: dict[str, str] | None = None, cwd: Path | None = None, check: bool = True) -> subprocess.CompletedProcess:
    """Run ``cmd`` in its own process group; on timeout kill the whole group and fail the test."""
    proc = subprocess.Popen(
        cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=_env(env), cwd=cwd or ROOT, start_new_session=True
    )
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        kill_tree(proc.pid)
        out, _ = proc.communicate()
        pytest.fail(f"timed out after {timeout} s: {' '.join(cmd)}\n{out[-4000:]}")
    result = subprocess.CompletedProcess(cmd, proc.returncode, out, "")
    if check and proc.returncode != 0:
        pytest.fail(f"exit {proc.returncode}: {' '.join(cmd)}\n{out[-6000:]}")
    return result


def torchrun(script: str | Path, *args: str, nproc: int = 2, timeout: float = 180, env: dict[str, str] | None = None, check: bool = True) -> subprocess.CompletedProcess:
    """Run ``script`` (a path, or a name under ``tests/dist_scripts``) on ``nproc`` CPU/gloo ranks."""
    path = Path(script)
    if not path.is_absolute():
        path = SCRIPTS / path
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}", str(path), *args]
    return run_proc(cmd, timeout=timeout, env=env, check=check)


@pytest.fixture
def run_ranks():
    """``run_ranks(script, *args, nproc=2, timeout=180)`` -> CompletedProcess (fails the test on
    non-zero exit or timeout)."""
    return torchrun


# -- S3 protocol server (moto) ------------------------------------------------------------------
S3_ENV = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_DEFAULT_REGION": "us-east-1",
}


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class MotoServer:
    """``python -m moto.server`` on 127.0.0.1 at a free port, in its own process group.

    Attributes: ``endpoint`` (``http://127.0.0.1:<port>``), ``proc`` (the server process).
    """

    def __init__(self, log_dir: Path) -> None:
        self.port = _free_port()
        self.endpoint = f"http://127.0.0.1:{self.port}"
        self.log = log_dir / f"moto-{self.port}.log"
        self.proc: subprocess.Popen | None = None

    def start(self, timeout: float = 60.0) -> MotoServer:
        import time
        import urllib.request

        with open(self.log, "wb") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(self.port)],
                stdout=log, stderr=subprocess.STDOUT, env=_env(), start_new_session=True,
            )
        deadline = time.monotonic() + timeout
        while True:
            if self.proc.poll() is not None:
                pytest.fail(f"moto server exited with {self.proc.returncode}:\n{self.log.read_text()[-3000:]}")
            try:
                with urllib.request.urlopen(f"{self.endpoint}/moto-api/", timeout=2):
                    return self
            except OSError:
                if time.monotonic() > deadline:
                    self.stop()
                    pytest.fail(f"moto server did not answer within {timeout} s")
                time.sleep(0.1)

    def stop(self) -> None:
        """SIGKILL the server (its in-memory buckets are gone with it)."""
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=30)


@pytest.fixture(scope="session")
def moto_server(tmp_path_factory):
    """A moto S3 server for the whole session; yields its endpoint URL."""
    server = MotoServer(tmp_path_factory.mktemp("moto")).start()
    yield server.endpoint
    server.stop()


class S3Bucket:
    """A fresh bucket on a moto server.

    Attributes:
        endpoint: the server's URL.
        bucket: the bucket name.
        url: ``s3://<bucket>/run`` (a run output dir).
        storage_options: fsspec options reaching the server (``client_kwargs.endpoint_url``;
            credentials come from the environment).
        env: environment for subprocesses: ``AWS_*`` credentials and ``AWS_ENDPOINT_URL`` (which
            botocore honours, so a subprocess needs no storage options at all).
    """

    _n = 0

    def __init__(self, endpoint: str) -> None:
        S3Bucket._n += 1
        self.endpoint = endpoint
        self.bucket = f"bkt-{os.getpid()}-{S3Bucket._n}"
        self.url = f"s3://{self.bucket}/run"
        self.storage_options = {"client_kwargs": {"endpoint_url": endpoint}}
        self.env = {**S3_ENV, "AWS_ENDPOINT_URL": endpoint}

    @property
    def fs(self):
        """An uncached s3fs file system on the server (for listing from the test process)."""
        import s3fs

        return s3fs.S3FileSystem(**self.storage_options, use_listings_cache=False)

    def object_keys(self) -> list[str]:
        """Every object key in the bucket, sorted (``run/checkpoints/step_1/...``)."""
        return sorted(k.split("/", 1)[1] for k in self.fs.find(self.bucket))


def _s3_env(monkeypatch, tmp_path: Path) -> None:
    for k, v in S3_ENV.items():
        monkeypatch.setenv(k, v)
    # Hermetic: no ~/.aws profile or real endpoint leaks into the tests.
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "no-aws-config"))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "no-aws-credentials"))
    monkeypatch.delenv("AWS_ENDPOINT_URL", raising=False)
    monkeypatch.delenv("AWS_PROFILE", raising=False)


def _new_bucket(endpoint: str) -> S3Bucket:
    b = S3Bucket(endpoint)
    b.fs.mkdir(b.bucket)
    return b


@pytest.fixture
def s3_bucket(moto_server, monkeypatch, tmp_path):
    """A fresh bucket on the session's moto server (see :class:`S3Bucket`); the test process
    gets the ``AWS_*`` credentials in its environment, the endpoint through ``storage_options``."""
    _s3_env(monkeypatch, tmp_path)
    return _new_bucket(moto_server)


@pytest.fixture
def own_moto_server(tmp_path, monkeypatch):
    """A moto server of this test alone (``.stop()`` it to kill it mid-save); yields
    ``(server, bucket)``; killed at teardown if still running."""
    _s3_env(monkeypatch, tmp_path)
    server = MotoServer(tmp_path).start()
    try:
        yield server, _new_bucket(server.endpoint)
    finally:
        server.stop()


# -- the inference server (vLLM) ----------------------------------------------------------------
class VllmServer:
    """The example's vLLM server (``examples.reverse_text.inference.start_server``) on
    127.0.0.1 at a free port, from ``.venv-inference`` (``make inference-env``; ``make test``
    creates it). Attributes: ``url``, ``proc``, ``log``."""

    def __init__(self, work: Path) -> None:
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.work = work
        self.log = work / "vllm.log"
        self.proc = None

    def start(self, timeout: float = 600.0) -> VllmServer:
        from examples.reverse_text.inference import InferenceClient, InferenceError, inference_python, start_server
        from examples.reverse_text.model import ModelConfig

        if not inference_python().exists():
            pytest.fail(f"{inference_python()}: no inference environment; run `make inference-env` (make test does)")
        self.proc = start_server(ModelConfig(), self.work, self.port, log=self.log)
        try:
            InferenceClient(self.url).wait_ready(timeout, should_stop=lambda: self.proc.poll() is not None)
        except InferenceError as e:
            self.stop()
            pytest.fail(f"vLLM server did not start: {e}\n{self.log.read_text()[-4000:]}")
        return self

    def stop(self) -> None:
        from examples.reverse_text.inference import stop_server

        if self.proc is not None:
            stop_server(self.proc)


@pytest.fixture(scope="session")
def vllm_server(tmp_path_factory):
    """One vLLM server for the whole test session (ready in ~1 min on 2 cores); stopped at the end."""
    server = VllmServer(tmp_path_factory.mktemp("vllm")).start()
    yield server
    server.stop()
