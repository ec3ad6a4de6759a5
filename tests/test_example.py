"""The reverse-text example end to end: launcher, checkpoints, bitwise resume, bad flags."""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import pytest
import torch

from examples.reverse_text.model import (
    ModelConfig,
    build_model,
    completion_logprobs,
    generate,
)
from examples.reverse_text.rl import UsageError, route
from examples.reverse_text.task import (
    EOS,
    encode,
    prompt_tokens,
    reward,
    sample_problems,
)
from prime_ckpt.layout import latest_complete_step, scan_checkpoints, scan_weights
from tests.conftest import kill_tree, run_proc

STEP_RE = re.compile(r"^step (\d+) \| loss (\S+) \| reward (\S+)", re.MULTILINE)
FINAL_RE = re.compile(r"^final step (\d+) \| params sha256 ([0-9a-f]{64})$", re.MULTILINE)
# Small and quick: fewer samples and warm-start steps than the demo.
FAST = [
    "--trainer", "@", "examples/configs/reverse_text/train.toml",
    "--orchestrator", "@", "examples/configs/reverse_text/orch.toml",
    "--orchestrator.inference.backend", "local",  # in-process sampling (the vLLM server: tests/test_inference_server.py)
    "--orchestrator.batch-size", "32", "--trainer.warm-start-steps", "5",
]


def rl(output_dir: Path, *args: str, timeout: float = 240, check: bool = True, env=None):
    cmd = [sys.executable, "-m", "examples.reverse_text.rl", *FAST, "--output-dir", str(output_dir), *args]
    return run_proc(cmd, timeout=timeout, check=check, env=env)


def losses(out: str) -> dict[int, str]:
    return {int(n): loss for n, loss, _ in STEP_RE.findall(out)}


def final_sha(out: str) -> str:
    found = FINAL_RE.findall(out)
    assert len(found) == 1, out[-3000:]
    return found[0][1]


# -- pieces -------------------------------------------------------------------------------------
def test_reward_is_positional_overlap():
    s = "abcd"
    assert reward(s, encode("dcba") + [EOS]) == 1.0
    assert reward(s, encode("dcdd") + [EOS]) == 0.5
    assert reward(s, encode("dcbaaaaa")) == 0.5  # too long: 4 matches / 8
    assert reward(s, [EOS]) == 0.0


def test_model_init_and_sampling_are_deterministic():
    cfg = ModelConfig()
    a, b = build_model(cfg, seed=3), build_model(cfg, seed=3)
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))
    prompts = [prompt_tokens(s) for s in sample_problems(8, torch.Generator().manual_seed(0))]
    r1 = generate(a, prompts, 7, torch.Generator().manual_seed(1))
    r2 = generate(a, prompts, 7, torch.Generator().manual_seed(1))
    assert torch.equal(r1["completion"], r2["completion"])
    lp = completion_logprobs(a, r1["prompt"], r1["prompt_mask"], r1["completion"], r1["completion_mask"])
    assert torch.allclose(lp, r1["logprobs"], atol=1e-5)


@pytest.mark.parametrize("d_model,n_heads", [(96, 2), (64, 4), (48, 1)])
def test_model_shapes_vllm_cannot_serve_are_refused(d_model, n_heads):
    """Head dims 48, 16 and 48: vLLM's CPU attention would fail at the first request."""
    with pytest.raises(ValueError, match="vLLM's CPU attention serves 32, 64, 80"):
        ModelConfig(d_model=d_model, n_heads=n_heads)


def test_route_splits_flags():
    t, o, n = route([
        "--trainer", "@", "t.toml", "--orchestrator", "@o.toml", "--ckpt.interval", "10", "--ckpt.save-async",
        "--ckpt.resume-step", "-1", "--trainer.monitor.wandb.id", "X", "--orchestrator.batch-size=8",
        "--max-steps", "5", "--nproc", "3",
    ])
    assert t == ["@", "t.toml", "--ckpt.interval", "10", "--ckpt.save-async", "--ckpt.resume-step", "-1",
                 "--monitor.wandb.id", "X", "--max-steps", "5"]
    assert o == ["@o.toml", "--ckpt.interval", "10", "--ckpt.save-async", "--ckpt.resume-step", "-1",
                 "--batch-size=8", "--max-steps", "5"]
    assert n == 3
    with pytest.raises(UsageError, match="--bogus"):
        route(["--bogus", "1"])


def test_trainer_fsdp_setup_warns_nothing_and_matches_an_unsharded_step(run_ranks):
    """The trainer's FSDP2 setup (``shard_model``) on 2 ranks: a policy-gradient step records no
    warning at all (FSDP2's "returned a view tensor ... wrong gradients" printed once per rank is
    what a root returning a view gives) and its gradients equal an unsharded step's over the whole
    batch. The script's probe, a root that does return a view, shows the recording sees it."""
    out = run_ranks("example_fsdp.py", nproc=2, timeout=180).stdout
    [line] = [x for x in out.splitlines() if x.startswith("RESULT ")]
    result = json.loads(line.removeprefix("RESULT "))
    assert result["example"] == [], result["example"]
    assert len([w for w in result["probe"] if "returned a view tensor" in w]) == 2, result["probe"]
    assert result["max_grad_diff"] < 1e-5, result["max_grad_diff"]


# -- the real launcher --------------------------------------------------------------------------
def test_launcher_run_writes_complete_checkpoints_and_weights(tmp_path):
    out = tmp_path / "run"
    r = rl(out, "--max-steps", "6", "--ckpt.interval", "2", "--ckpt.save-async",
           "--trainer.monitor.wandb.project", "prime-ckpt-test", env={"WANDB_DIR": str(tmp_path)})
    assert sorted(losses(r.stdout)) == list(range(1, 7))
    final_sha(r.stdout)
    ckpts = scan_checkpoints(out)
    assert [c.step for c in ckpts] == [2, 4, 6] and all(c.complete() for c in ckpts)
    assert latest_complete_step(out) == 6
    weights = scan_weights(out)
    assert [w.step for w in weights] == list(range(7)) and all(w.complete for w in weights)
    assert (tmp_path / "wandb").is_dir()  # offline W&B run of the trainer
    # the trainer's W&B run id, printed once at start (the orchestrator has W&B off here)
    [(program, run_id)] = re.findall(r"^(\w+): W&B run id (\w+) \(project prime-ckpt-test, offline; ", r.stdout, re.MULTILINE)
    assert program == "trainer" and (out / "wandb" / "trainer.id").read_text() == f"{run_id}\n"
    assert "view tensor" not in r.stdout, r.stdout  # FSDP2's warning (stderr is in r.stdout)
    # weights/step_N is what an inference engine loads: the HF model and the tokenizer
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from prime_ckpt.weights import load_weights

    step_dir = out / "weights" / "step_6"
    assert AutoTokenizer.from_pretrained(step_dir).encode("abc=") == encode("abc=")
    hf = AutoModelForCausalLM.from_pretrained(step_dir).state_dict()
    published, config = load_weights(step_dir)
    assert config["architectures"] == ["LlamaForCausalLM"]
    assert set(hf) == set(published) and all(torch.equal(hf[k], v) for k, v in published.items())


def test_resume_through_launcher_is_bitwise_identical(tmp_path):
    a = rl(tmp_path / "a", "--max-steps", "8")
    b1 = rl(tmp_path / "b", "--max-steps", "4", "--ckpt.interval", "2", "--ckpt.save-async")
    assert latest_complete_step(tmp_path / "b") == 4
    b2 = rl(tmp_path / "b", "--max-steps", "8", "--ckpt.interval", "2", "--ckpt.save-async", "--ckpt.resume-step", "-1")
    assert "resuming from checkpoint step 4" in b2.stdout
    assert "trainer: resumed from checkpoint step 4" in b2.stdout
    la, lb1, lb2 = losses(a.stdout), losses(b1.stdout), losses(b2.stdout)
    assert sorted(lb2) == [5, 6, 7, 8]
    assert {n: la[n] for n in range(1, 5)} == lb1
    assert {n: la[n] for n in range(5, 9)} == lb2
    assert final_sha(a.stdout) == final_sha(b2.stdout)


def test_fresh_run_in_a_used_dir_never_mixes_runs(tmp_path):
    """An earlier run (other seed) left complete steps 2 and 4; a fresh run with another seed
    writes steps 2 only: the old steps are moved aside before anything starts, so no step ever
    pairs the new trainer state with the old orchestrator record, and -1 never picks the old 4."""
    out = tmp_path / "run"
    rl(out, "--max-steps", "4", "--ckpt.interval", "2", "--seed", "1")
    old_records = {c.step: (c.path / "orchestrator.pt").read_bytes() for c in scan_checkpoints(out)}
    assert sorted(old_records) == [2, 4]
    r = rl(out, "--max-steps", "2", "--ckpt.interval", "2", "--seed", "2")
    assert re.search(r"rl: set aside \d+ step\(s\) of an earlier run newer than step 0 into .*superseded", r.stdout)
    steps = scan_checkpoints(out)
    assert [c.step for c in steps] == [2] and steps[0].complete()
    assert (steps[0].path / "orchestrator.pt").read_bytes() != old_records[2]
    [aside] = list((out / "superseded").iterdir())
    assert sorted(p.name for p in (aside / "checkpoints").iterdir()) == ["step_2", "step_4"]
    assert sorted(p.name for p in (aside / "weights").iterdir()) == [f"step_{s}" for s in range(5)]
    assert (aside / "checkpoints" / "step_4" / "orchestrator.pt").read_bytes() == old_records[4]  # nothing deleted
    assert latest_complete_step(out) == 2


@pytest.mark.parametrize(
    "args, named",
    [
        (["--trainer.lr", "-1"], "--lr"),
        (["--ckpt.interval", "0"], "--ckpt.interval"),
        (["--bogus-flag", "1"], "--bogus-flag"),
        (["--orchestrator.batch-sise", "4"], "batch-sise"),
    ],
)
def test_bad_flag_exits_2_before_starting(tmp_path, args, named):
    out = tmp_path / "never"
    r = rl(out, "--max-steps", "2", *args, check=False, timeout=60)
    assert r.returncode == 2, r.stdout
    errors = [line for line in r.stdout.splitlines() if "error" in line]
    assert len(errors) == 1 and named in errors[0], r.stdout
    assert not out.exists()


def test_sigterm_checkpoints_exits_0_and_resumes_bitwise(tmp_path):
    """SIGTERM to the launcher mid-run (no interval checkpoint due): the trainer finishes its
    step and checkpoints it, the orchestrator writes its record for that step, exit 0; a resume
    loads exactly the model of that step (weights/step_t of the same run)."""
    import signal
    import subprocess
    import time

    from examples.reverse_text.common import params_sha256
    from prime_ckpt.weights import load_weights
    from tests.conftest import _env

    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "examples.reverse_text.rl", *FAST, "--output-dir", str(out),
           "--max-steps", "500", "--ckpt.interval", "100", "--ckpt.save-async"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=_env(), start_new_session=True)
    try:
        deadline = time.monotonic() + 180
        while not (out / "weights" / "step_3" / "COMPLETE").exists():
            assert proc.poll() is None and time.monotonic() < deadline, proc.stdout.read() if proc.poll() is not None else "timeout"
            time.sleep(0.05)
        proc.send_signal(signal.SIGTERM)
        stdout, _ = proc.communicate(timeout=180)
    finally:
        if proc.poll() is None:
            kill_tree(proc.pid)
    assert proc.returncode == 0, stdout[-4000:]
    assert "rl: preempted: every program checkpointed and exited 0" in stdout
    [t] = [int(m) for m in re.findall(r"^trainer: wrote checkpoint step (\d+) before exiting$", stdout, re.MULTILINE)]
    assert 3 <= t < 500
    assert latest_complete_step(out) == t
    weights_t = params_sha256(load_weights(out / "weights" / f"step_{t}")[0])
    r = rl(out, "--max-steps", str(t + 1), "--ckpt.interval", "100", "--ckpt.resume-step", "-1")
    assert f"trainer: resumed from checkpoint step {t}" in r.stdout
    assert f"resumed params sha256 {weights_t}" in r.stdout


def test_the_spec_commands_as_written(tmp_path):
    """The spec's commands through the console scripts (README, 'The programs'): the trainer and
    the orchestrator as two programs with --ckpt.interval, both resumed from a step with
    --ckpt.resume-step, then ``rl`` resuming the same W&B runs by id."""
    import subprocess

    from tests.conftest import _env

    bin_dir = Path(sys.executable).parent
    out = tmp_path / "rt"
    trainer = [str(bin_dir / "trainer"), "@", "examples/configs/reverse_text/train.toml", "--output-dir", str(out), "--warm-start-steps", "0"]
    orch = [str(bin_dir / "orchestrator"), "@", "examples/configs/reverse_text/orch.toml", "--output-dir", str(out),
            "--batch-size", "16", "--inference.backend", "local"]

    def both(*args: str) -> str:
        procs = [subprocess.Popen([*cmd, *args], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=_env(),
                                  start_new_session=True) for cmd in (trainer, orch)]
        outs = []
        for p in procs:
            try:
                outs.append(p.communicate(timeout=240)[0])
            except subprocess.TimeoutExpired:
                for q in procs:
                    kill_tree(q.pid)
                pytest.fail("trainer/orchestrator timed out")
            assert p.returncode == 0, outs[-1][-3000:]
        return "\n".join(outs)

    first = both("--max-steps", "4", "--ckpt.interval", "2")
    assert "trainer: fresh start, world size 1" in first and latest_complete_step(out) == 4
    again = both("--max-steps", "6", "--ckpt.interval", "2", "--ckpt.resume-step", "2")
    assert "trainer: resumed from checkpoint step 2" in again and "orchestrator: resumed from checkpoint step 2" in again
    assert sorted(losses(again)) == [3, 4, 5, 6]
    r = run_proc([
        str(bin_dir / "rl"), "--trainer", "@", "examples/configs/reverse_text/train.toml",
        "--orchestrator", "@", "examples/configs/reverse_text/orch.toml", "--orchestrator.inference.backend", "local",
        "--orchestrator.batch-size", "16", "--output-dir", str(out), "--max-steps", "8", "--nproc", "1",
        "--ckpt.interval", "2", "--ckpt.resume-step", "6",
        "--trainer.monitor.wandb.project", "spec", "--trainer.monitor.wandb.id", "trainer-run-1",
        "--orchestrator.monitor.wandb.project", "spec", "--orchestrator.monitor.wandb.id", "orch-run-1",
    ], timeout=300, env={"WANDB_DIR": str(tmp_path)})
    assert "rl: resuming from checkpoint step 6" in r.stdout and sorted(losses(r.stdout)) == [7, 8]
    runs = {p.name.split("-", 3)[-1] for p in (tmp_path / "wandb").glob("offline-run-*")}
    assert runs == {"trainer-run-1", "orch-run-1"}, runs
    printed = re.findall(r"^(trainer|orchestrator): W&B run id (\S+) ", r.stdout, re.MULTILINE)
    assert sorted(printed) == [("orchestrator", "orch-run-1"), ("trainer", "trainer-run-1")], printed
