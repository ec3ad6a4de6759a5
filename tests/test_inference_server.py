"""The real inference server (vLLM, one per test session): weights reloads and the example job
killed and resumed without restarting it."""

from __future__ import annotations

import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from examples.reverse_text.inference import InferenceClient
from examples.reverse_text.model import ModelConfig, build_model
from examples.reverse_text.task import EOS, PAD, build_tokenizer, prompt_tokens, sample_problems
from prime_ckpt.layout import RUN_PARTS, resolve_resume_step
from prime_ckpt.publisher import WeightsPublisher
from tests.conftest import _env, kill_tree, run_proc

FINAL_RE = re.compile(r"^final step (\d+) \| params sha256 ([0-9a-f]{64})$", re.MULTILINE)
STEP_RE = re.compile(r"^step (\d+) \| loss (\S+) \| reward (\S+)", re.MULTILINE)


def _publish(out: Path, step: int, seed: int) -> Path:
    with WeightsPublisher(out, save_async=False, tokenizer=build_tokenizer()) as pub:
        pub.publish(step, build_model(ModelConfig(), seed=seed))
    return out / "weights" / f"step_{step}"


def _hf_greedy(step_dir: Path, prompts: list[list[int]], n: int) -> list[list[int]]:
    """``transformers`` greedy generation from the published directory, cut after EOS."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(step_dir, attn_implementation="eager").eval()
    outs = []
    for p in prompts:
        ids = torch.tensor([p])
        gen = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=n,
                             eos_token_id=EOS, pad_token_id=PAD)[0, len(p):].tolist()
        outs.append(gen[: gen.index(EOS) + 1] if EOS in gen else gen)
    return outs


@pytest.mark.timeout(900)  # the session's server starts first (~1 min; more under load)
def test_greedy_after_each_reload_equals_transformers(vllm_server, tmp_path):
    """Two weight sets, reloaded 1 -> 2 -> 1 into the running server: each time its greedy
    completions equal ``transformers``' greedy generation of the same directory, token for token,
    and the server reports the step it serves."""
    client = InferenceClient(vllm_server.url)
    dirs = {1: _publish(tmp_path, 1, seed=11), 2: _publish(tmp_path, 2, seed=22)}
    prompts = [prompt_tokens(s) for s in sample_problems(6, torch.Generator().manual_seed(5))]
    expected = {step: _hf_greedy(d, prompts, 8) for step, d in dirs.items()}
    assert expected[1] != expected[2]  # the two weight sets really differ
    for step in (1, 2, 1):
        client.load(step, dirs[step])
        assert client.loaded_step() == step
        got = client.complete(prompts, 8, 0.0, seeds=[0] * len(prompts), allowed_token_ids=None)
        assert got == expected[step], (step, got, expected[step])


def _rl(out: Path, url: str, *args: str, steps: int = 8) -> list[str]:
    return [
        sys.executable, "-m", "examples.reverse_text.rl",
        "--trainer", "@", "examples/configs/reverse_text/train.toml",
        "--orchestrator", "@", "examples/configs/reverse_text/orch.toml",
        "--orchestrator.inference.base-url", url, "--orchestrator.batch-size", "32", "--trainer.warm-start-steps", "0",
        "--output-dir", str(out), "--max-steps", str(steps), *args,
    ]


@pytest.mark.timeout(1200)
def test_kill_and_resume_with_the_server_running(vllm_server, tmp_path):
    """Reference run, then a checkpointing run SIGKILLed mid-run, then ``--ckpt.resume-step -1``:
    the server process is the same throughout; on resume from x it is told to serve
    x - async_level (although it served a later step); the resumed run ends bitwise where the
    reference ends (vLLM's seeded sampling reproduces the rollouts)."""
    pid = vllm_server.proc.pid
    ref = run_proc(_rl(tmp_path / "ref", vllm_server.url), timeout=400)
    assert "using the inference server" in ref.stdout and "left running" in ref.stdout
    ref_sha = FINAL_RE.findall(ref.stdout)[0][1]
    ref_losses = dict((int(n), loss) for n, loss, _ in STEP_RE.findall(ref.stdout))

    out = tmp_path / "run"
    ckpt = ["--ckpt.interval", "2", "--ckpt.save-async"]
    proc = subprocess.Popen(_rl(out, vllm_server.url, *ckpt), stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT,
                            env=_env(), cwd=Path(__file__).resolve().parent.parent, start_new_session=True)
    deadline = time.monotonic() + 400

    def resumable() -> int | None:
        # what --ckpt.resume-step -1 will pick: a complete checkpoint step whose weights
        # [x - 2, x] are complete too (a checkpoint can complete before its step's weights)
        return resolve_resume_step(out, -1, RUN_PARTS, async_level=2)

    try:
        while (resumable() or 0) < 4:
            assert proc.poll() is None, f"run exited early ({proc.returncode})"
            assert time.monotonic() < deadline, "no checkpoint step 4 in time"
            time.sleep(0.05)
    finally:
        kill_tree(proc.pid)  # SIGKILL, whole job
        proc.wait()
    x = resumable()
    assert x is not None and x >= 4
    served_before = InferenceClient(vllm_server.url).loaded_step()
    resumed = run_proc(_rl(out, vllm_server.url, *ckpt, "--ckpt.resume-step", "-1"), timeout=400)
    assert f"resuming from checkpoint step {x}" in resumed.stdout, resumed.stdout[-3000:]
    assert (f"inference server served weights step {served_before}; now serves step {x - 2} "
            f"(resume from checkpoint step {x}, async level 2)") in resumed.stdout, resumed.stdout[-3000:]
    assert vllm_server.proc.poll() is None and vllm_server.proc.pid == pid  # never restarted
    assert FINAL_RE.findall(resumed.stdout)[0][1] == ref_sha
    got = dict((int(n), loss) for n, loss, _ in STEP_RE.findall(resumed.stdout))
    assert got == {n: ref_losses[n] for n in range(x + 1, 9)}
    assert (out / "consumer_ack.json").is_file()

