"""The inference side: the vLLM server program, its HTTP client, and the samplers the
orchestrator uses.

``python -m examples.reverse_text.inference @ infer.toml [flags]`` (console script ``inference``)
writes a base model directory (the ``--model.*`` shape, random weights, the tokenizer) and runs
a vLLM OpenAI-compatible server on it, from its own environment (``.venv-inference``, made by
``make inference-env``). It is a separate, long-lived process: a resumed run never restarts it;
the orchestrator tells it which ``weights/step_N`` to serve (:class:`InferenceClient.load`).

Samplers (the orchestrator's interface, :class:`Sampler`): :class:`ServerSampler` samples from
the server's ``/v1/completions`` with the policy's ``allowed_token_ids``; :class:`LocalSampler`
samples the same policy in-process with ``transformers`` (fast tests).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Literal, Protocol

import torch
from pydantic import BaseModel, ConfigDict, Field

from examples.reverse_text.model import ModelConfig, build_model, generate, right_pad
from examples.reverse_text.task import ALLOWED_TOKENS, build_tokenizer

ROOT = Path(__file__).resolve().parents[2]
SERVED_NAME = "reverse-text"

#: The environment vLLM runs best with on a CPU-only machine (``docs/vllm-cpu.md``).
VLLM_CPU_ENV = {
    "OMP_NUM_THREADS": "1",
    "VLLM_ENABLE_V1_MULTIPROCESSING": "0",
    "VLLM_CPU_KVCACHE_SPACE": "1",
    "VLLM_SERVER_DEV_MODE": "1",  # /collective_rpc, /pause, /resume, /reset_prefix_cache
    "VLLM_HOST_IP": "127.0.0.1",
    "HF_HUB_OFFLINE": "1",
    "VLLM_NO_USAGE_STATS": "1",
    "DO_NOT_TRACK": "1",
}


class InferenceConfig(BaseModel):
    """Where rollouts are sampled (``--inference.*``)."""

    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True)

    backend: Literal["server", "local"] = "server"
    """server: an inference server (vLLM) over HTTP at base-url; local: transformers in this process (tests)."""

    base_url: str = "http://127.0.0.1:8000"
    """Base URL of the inference server (OpenAI-compatible API, vLLM dev-mode routes)."""

    timeout_s: float = Field(120.0, gt=0)
    """Seconds one request to the server may take; also how long to wait for it to be ready."""


class InferenceError(RuntimeError):
    """The inference server failed, refused, or served something else than asked (one line)."""


class InferenceClient:
    """HTTP client of a vLLM server started by :func:`main` (or by hand with the same flags).

    Args:
        base_url: ``http://host:port``.
        timeout_s: per-request timeout (seconds).
    """

    def __init__(self, base_url: str, timeout_s: float = 120.0) -> None:
        import httpx

        self.base_url = base_url.rstrip("/")
        self._http = httpx.Client(base_url=self.base_url, timeout=timeout_s)

    def _post(self, route: str, body: dict | None = None, **params) -> dict:
        import httpx

        try:
            r = self._http.post(route, json=body if body is not None else {}, params=params or None)
        except httpx.HTTPError as e:
            raise InferenceError(f"{self.base_url}{route}: {type(e).__name__}: {e}") from None
        if r.status_code != 200:
            raise InferenceError(f"{self.base_url}{route}: HTTP {r.status_code}: {' '.join(r.text.split())[:300]}")
        return r.json() if r.content else {}

    def ready(self) -> bool:
        """True iff the server answers ``GET /v1/models``."""
        import httpx

        try:
            return self._http.get("/v1/models", timeout=2.0).status_code == 200
        except httpx.HTTPError:
            return False

    def wait_ready(self, timeout_s: float, should_stop=None) -> None:
        """Block until :meth:`ready`; raises :class:`InferenceError` after ``timeout_s`` seconds
        or when ``should_stop()`` returns True."""
        deadline = time.monotonic() + timeout_s
        while not self.ready():
            if should_stop is not None and should_stop():
                raise InferenceError(f"{self.base_url}: gave up waiting for the server (stopping)")
            if time.monotonic() > deadline:
                raise InferenceError(f"{self.base_url}: no inference server answered within {timeout_s:.0f} s")
            time.sleep(0.5)

    def _rpc(self, method: str, **kwargs) -> list:
        out = self._post("/collective_rpc", {"method": method, "kwargs": kwargs})
        results = out.get("results", out) if isinstance(out, dict) else out
        return results if isinstance(results, list) else [results]

    def loaded_step(self) -> int | None:
        """The weights step every worker serves (None if none was loaded through us, or the
        workers disagree)."""
        steps = {r.get("step") if isinstance(r, dict) else None for r in self._rpc("prime_loaded_step")}
        return steps.pop() if len(steps) == 1 else None

    def load(self, step: int, step_dir: Path | str) -> float:
        """Serve ``weights/step_<step>`` (``step_dir``, complete): pause (in-flight requests
        finish), reload from the directory, drop cached prefixes, resume; then check the server
        reports ``step``. Returns the seconds it took.

        Raises:
            InferenceError: the server failed or reports another step.
        """
        t0 = time.perf_counter()
        path = str(Path(step_dir).resolve())
        self._post("/pause", mode="wait")
        try:
            self._rpc("prime_load_step", weights_path=path, step=int(step))
            self._post("/reset_prefix_cache")
        finally:
            self._post("/resume")
        served = self.loaded_step()
        if served != step:
            raise InferenceError(f"{self.base_url}: asked to serve weights step {step} ({path}), it reports {served}")
        return time.perf_counter() - t0

    def complete(
        self, prompts: list[list[int]], max_tokens: int, temperature: float, seeds: list[int],
        allowed_token_ids: tuple[int, ...] | None = ALLOWED_TOKENS,
    ) -> list[list[int]]:
        """Sample one completion per prompt (token ids in, token ids out, EOS included when
        emitted), restricted to ``allowed_token_ids`` (the policy's, by default; None: any).

        One request per prompt, sent concurrently (the server batches them), each with its own
        seed: one request with many prompts would give every prompt the same random stream."""
        from concurrent.futures import ThreadPoolExecutor

        def one(i: int) -> list[int]:
            body = {
                "model": SERVED_NAME, "prompt": [prompts[i]], "max_tokens": max_tokens, "temperature": temperature,
                "seed": int(seeds[i]), "n": 1, "return_token_ids": True, "skip_special_tokens": False,
            }
            if allowed_token_ids is not None:
                body["allowed_token_ids"] = list(allowed_token_ids)
            out = self._post("/v1/completions", body)
            return list(out["choices"][0]["token_ids"])

        with ThreadPoolExecutor(max_workers=min(32, max(1, len(prompts)))) as pool:
            return list(pool.map(one, range(len(prompts))))

    def close(self) -> None:
        self._http.close()


class Sampler(Protocol):
    """What the orchestrator samples rollouts with."""

    def load(self, step: int, step_dir: Path) -> None: ...

    def sample(self, prompts: list[list[int]], max_new_tokens: int, seed: int, temperature: float) -> dict[str, torch.Tensor]: ...


class LocalSampler:
    """The policy sampled in this process with ``transformers`` (no server; for fast tests)."""

    def __init__(self, model_cfg: ModelConfig) -> None:
        self.model = build_model(model_cfg).eval()
        self.step: int | None = None

    def load(self, step: int, step_dir: Path) -> None:
        from prime_ckpt.weights import load_weights

        sd, _ = load_weights(step_dir)
        self.model.load_state_dict(sd)
        self.step = step

    def sample(self, prompts, max_new_tokens, seed, temperature):
        return generate(self.model, prompts, max_new_tokens, torch.Generator().manual_seed(seed), temperature)


class ServerSampler:
    """The policy sampled by the inference server (vLLM) over HTTP."""

    def __init__(self, client: InferenceClient) -> None:
        self.client = client
        self.step: int | None = None
        self.last_load_s = 0.0

    def load(self, step: int, step_dir: Path) -> None:
        self.last_load_s = self.client.load(step, step_dir)
        self.step = step

    def sample(self, prompts, max_new_tokens, seed, temperature):
        from examples.reverse_text.model import left_pad

        seeds = [(seed * 100_003 + i) % (2**63) for i in range(len(prompts))]
        completions = self.client.complete(prompts, max_new_tokens, temperature, seeds)
        prompt, prompt_mask = left_pad(prompts)
        completion, completion_mask = right_pad(completions, max(max_new_tokens, max(map(len, completions), default=0)))
        return {"prompt": prompt, "prompt_mask": prompt_mask, "completion": completion, "completion_mask": completion_mask}


# -- the server program ---------------------------------------------------------------------------
def inference_python() -> Path:
    """The Python of the inference environment: ``$PRIME_INFERENCE_PYTHON`` or ``.venv-inference``."""
    return Path(os.environ.get("PRIME_INFERENCE_PYTHON", ROOT / ".venv-inference" / "bin" / "python"))


def write_base_model(model_cfg: ModelConfig, directory: Path) -> Path:
    """A Hugging Face model dir the server starts on (random weights of the right shape, the
    tokenizer); the orchestrator loads the run's weights into it before sampling."""
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    directory.mkdir(parents=True, exist_ok=True)
    model = build_model(model_cfg)
    model.save_pretrained(directory)
    build_tokenizer().save_pretrained(directory)
    for p in directory.iterdir():
        p.chmod(0o644)
    return directory


def server_command(python: Path, model_dir: Path, host: str, port: int, max_model_len: int) -> list[str]:
    """The vLLM server command line (the ``vllm serve`` console script of vllm-cpu 0.32.0 is
    broken; the module is started directly)."""
    return [
        str(python), "-m", "vllm.entrypoints.openai.api_server", "--model", str(model_dir), "--served-model-name", SERVED_NAME,
        "--host", host, "--port", str(port), "--max-model-len", str(max_model_len), "--dtype", "float32",
        "--enforce-eager", "--max-num-seqs", "256", "--seed", "0",
        "--worker-extension-cls", "examples.reverse_text.vllm_worker.StepReloader",
    ]


def server_env() -> dict[str, str]:
    env = dict(os.environ)
    env.update(VLLM_CPU_ENV)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH", "")) if p)
    return env


def start_server(model_cfg: ModelConfig, work_dir: Path, port: int, host: str = "127.0.0.1", log: Path | None = None) -> subprocess.Popen:
    """Write the base model under ``work_dir`` and start the server in its own process group
    (stop it with :func:`stop_server`). Raises :class:`InferenceError` if the inference
    environment is missing."""
    python = inference_python()
    if not python.exists():
        raise InferenceError(f"{python}: no inference environment (run `make inference-env`, or set PRIME_INFERENCE_PYTHON)")
    model_dir = write_base_model(model_cfg, work_dir / "base_model")
    cmd = server_command(python, model_dir, host, port, model_cfg.max_seq_len)
    out = open(log, "ab") if log is not None else None  # noqa: SIM115 - the child holds it
    return subprocess.Popen(cmd, env=server_env(), cwd=ROOT, stdout=out, stderr=subprocess.STDOUT if out else None, start_new_session=True)


def stop_server(proc: subprocess.Popen, grace_s: float = 20.0) -> None:
    """SIGTERM the server's process group, then SIGKILL after ``grace_s`` seconds."""
    for sig, wait in ((signal.SIGTERM, grace_s), (signal.SIGKILL, 10.0)):
        if proc.poll() is not None:
            return
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=wait)
        except subprocess.TimeoutExpired:
            continue


def main(argv: list[str] | None = None) -> None:
    from prime_ckpt.config import CliSettings, cli_entry

    class InferenceServerConfig(CliSettings):
        """The inference server (vLLM) of the reverse-text example; runs until stopped."""

        host: str = "127.0.0.1"
        """Address to listen on."""

        port: int = Field(8000, ge=1, le=65535)
        """Port to listen on."""

        work_dir: Path = Path("outputs/inference")
        """Where the base model directory the server starts on is written."""

        model: ModelConfig = ModelConfig()
        """Model shape (must match the trainer's)."""

    cfg = cli_entry(InferenceServerConfig, argv, prog="inference")
    proc = start_server(cfg.model, cfg.work_dir, cfg.port, cfg.host)
    print(f"inference: vLLM server pid {proc.pid} on http://{cfg.host}:{cfg.port} (model dir {cfg.work_dir / 'base_model'})", flush=True)

    def forward(signum, _frame):
        stop_server(proc)
        raise SystemExit(0)

    signal.signal(signal.SIGTERM, forward)
    signal.signal(signal.SIGINT, forward)
    raise SystemExit(proc.wait())


if __name__ == "__main__":
    main(sys.argv[1:])
