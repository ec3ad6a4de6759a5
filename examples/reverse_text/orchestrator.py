"""The orchestrator: ``python -m examples.reverse_text.orchestrator @ orch.toml [flags]``.

For step ``n`` it makes sure the inference server serves the weights of step
``max(n - async_level, 0)`` (waits for their ``COMPLETE``, tells the server to load them, checks
the server reports that step, records the consumer acknowledgement), samples a batch from it
(``/v1/completions``; ``--inference.backend local`` samples in-process instead), scores it and
writes ``rollouts/step_n.pt`` atomically. Sampling for step ``n`` is seeded from ``(seed, n)``
only. With ``--ckpt.*`` it writes its progress record ``checkpoints/step_<n>/orchestrator.pt``
every ``--ckpt.interval``. On a resume from checkpoint ``x`` the server, which is never
restarted, is first told to load the weights of ``x - async_level`` (whatever it served before).
"""

from __future__ import annotations

import copy
import json
import sys
import time
from collections import deque
from pathlib import Path

import torch
from pydantic import Field, model_validator

from examples.reverse_text.common import (
    die_with_parent,
    set_deterministic_threads,
    start_wandb,
    whole_lines,
    write_rollouts,
)
from examples.reverse_text.inference import InferenceClient, InferenceConfig, LocalSampler, ServerSampler
from examples.reverse_text.model import ModelConfig, same_shape
from examples.reverse_text.task import prompt_tokens, reward, sample_problems
from prime_ckpt.config import CheckpointConfig, CliSettings, MonitorConfig, cli_entry
from prime_ckpt.layout import RUN_PARTS, RunLayout, resolve_resume_step
from prime_ckpt.orchestrator import (
    OrchestratorProgress,
    load_orchestrator_checkpoint,
    save_orchestrator_checkpoint,
    write_consumer_ack,
)
from prime_ckpt.preemption import PreemptionHandler
from prime_ckpt.weights import WeightsNotReadyError, wait_for_weights


class OrchestratorConfig(CliSettings):
    """Rollout generator for the reverse-text task (one process)."""

    output_dir: Path = Path("outputs/reverse_text")
    """Run directory shared with the trainer."""

    max_steps: int = Field(40, ge=1)
    """Produce rollouts up to this step."""

    async_level: int = Field(1, ge=1)
    """Step n samples with the weights of step n - async_level: at most this many steps ahead."""

    seed: int = Field(0, ge=0, lt=2**31)
    """Sampling seed; step n's generator is seeded from (seed, n)."""

    batch_size: int = Field(128, ge=1)
    """Rollouts (problems) per step, split across trainer ranks."""

    min_len: int = Field(3, ge=1)
    """Shortest string to reverse (characters)."""

    max_len: int = Field(6, ge=1)
    """Longest string to reverse (characters)."""

    temperature: float = Field(1.0, gt=0)
    """Sampling temperature."""

    model: ModelConfig = ModelConfig()
    """Model shape (must match the trainer's weights)."""

    inference: InferenceConfig = InferenceConfig()
    """Where rollouts are sampled: the inference server (default) or in-process."""

    weights_timeout_s: float = Field(600.0, gt=0)
    """Give up (exit non-zero) if the weights a step needs do not appear within this many seconds."""

    ckpt: CheckpointConfig | None = None
    """Checkpointing of the progress record; off unless asked for."""

    monitor: MonitorConfig = MonitorConfig()
    """Monitoring (W&B)."""

    @model_validator(mode="after")
    def _lengths_fit(self) -> OrchestratorConfig:
        if self.min_len > self.max_len:
            raise ValueError(f"min_len ({self.min_len}) > max_len ({self.max_len})")
        need = 2 * self.max_len + 3  # <s> s = + reversed(s) </s>
        if need > self.model.max_seq_len:
            raise ValueError(f"max_len {self.max_len} needs model.max_seq_len >= {need}")
        return self


def step_seed(seed: int, step: int) -> int:
    """The seed of step ``step``: depends on ``(seed, step)`` only, never on history."""
    return seed * 1_000_003 + step


def step_generator(seed: int, step: int) -> torch.Generator:
    """The generator of step ``step`` (problems are drawn from it)."""
    return torch.Generator().manual_seed(step_seed(seed, step))


def main(argv: list[str] | None = None) -> None:
    cfg = cli_entry(OrchestratorConfig, argv, prog="orchestrator")
    parent_gone = die_with_parent()
    set_deterministic_threads()
    start = resolve_resume_step(cfg.output_dir, cfg.ckpt.resume_step, RUN_PARTS) if cfg.ckpt is not None else None
    if start is not None:
        progress = load_orchestrator_checkpoint(cfg.output_dir, start)
        print(f"orchestrator: resumed from checkpoint step {start} (samples {progress.total_samples})", flush=True)
    else:
        progress = OrchestratorProgress(step=0)
        print("orchestrator: fresh start", flush=True)

    # the run id is printed and written to <output_dir>/wandb/orchestrator.id (for a resume)
    run = start_wandb("orchestrator", cfg.output_dir, cfg.monitor, cfg.model_dump(mode="json"))

    layout = RunLayout(cfg.output_dir)
    if cfg.inference.backend == "server":
        client = InferenceClient(cfg.inference.base_url, cfg.inference.timeout_s)
        client.wait_ready(cfg.inference.timeout_s, should_stop=parent_gone)
        sampler = ServerSampler(client)
    else:
        sampler = LocalSampler(cfg.model)

    def serve(wstep: int) -> None:
        """Make the sampler serve weights/step_<wstep> and acknowledge it (retention keeps
        weights at or after the acknowledged step)."""
        step_dir = wait_for_weights(cfg.output_dir, wstep, timeout=cfg.weights_timeout_s, poll_interval=0.02,
                                    should_stop=lambda: parent_gone() or preempt.requested())
        config = json.loads((step_dir / "config.json").read_text())
        if not same_shape(cfg.model, config):
            raise SystemExit(f"orchestrator: weights/step_{wstep}/config.json does not describe the model --model.* gives ({cfg.model.model_dump()})")
        sampler.load(wstep, step_dir)
        write_consumer_ack(cfg.output_dir, wstep)

    # SIGTERM / SIGUSR1: stop producing, write the progress records of the last async_level + 1
    # steps (the trainer, at most async_level steps behind, checkpoints at one of them), exit 0.
    preempt = PreemptionHandler()
    if start is not None and cfg.inference.backend == "server":
        # The server is never restarted: whatever it serves now (a later step of the run that
        # stopped, say) is replaced by what the resumed run needs, the spec's x - async_level.
        before = sampler.client.loaded_step()
        serve(max(start - cfg.async_level, 0))
        print(f"orchestrator: inference server served weights step {before}; now serves step {sampler.step} "
              f"(resume from checkpoint step {start}, async level {cfg.async_level})", flush=True)
    recent: deque[OrchestratorProgress] = deque(maxlen=cfg.async_level + 1)
    for n in range(progress.step + 1, cfg.max_steps + 1):
        if preempt.requested():
            break
        t0 = time.perf_counter()
        wstep = max(n - cfg.async_level, 0)
        if wstep != sampler.step:
            try:
                serve(wstep)
            except WeightsNotReadyError:
                if preempt.requested():
                    break
                raise
        t_wait = time.perf_counter() - t0
        g = step_generator(cfg.seed, n)
        problems = sample_problems(cfg.batch_size, g, cfg.min_len, cfg.max_len)
        t_sample = time.perf_counter()
        out = sampler.sample([prompt_tokens(s) for s in problems], cfg.max_len + 1, step_seed(cfg.seed, n), cfg.temperature)
        t_sample = time.perf_counter() - t_sample
        rewards = torch.tensor([reward(s, c) for s, c in zip(problems, out["completion"].tolist())], dtype=torch.float32)
        write_rollouts(cfg.output_dir, n, {"step": n, "weights_step": wstep, "rewards": rewards, **out})
        tokens = int(out["completion_mask"].sum())
        progress.step = n
        progress.total_samples += cfg.batch_size
        progress.total_problems += cfg.batch_size
        progress.total_tokens += tokens
        recent.append(copy.deepcopy(progress))
        if cfg.ckpt is not None and n % cfg.ckpt.interval == 0:
            save_orchestrator_checkpoint(cfg.output_dir, progress)
        if run is not None:
            run.log({"progress/step": n, "reward/mean": rewards.mean().item(), "progress/total_samples": progress.total_samples,
                     "progress/total_tokens": progress.total_tokens, "perf/wait_weights_s": t_wait,
                     "inference/loaded_step": sampler.step, "inference/samples_per_s": cfg.batch_size / t_sample,
                     "inference/tokens_per_s": tokens / t_sample})
        print(f"orchestrator step {n} | weights step {wstep} | reward {rewards.mean().item():.4f} | wait {t_wait:.2f}s"
              f" | sample {t_sample:.2f}s", flush=True)
    if preempt.requested():
        written = []
        if cfg.ckpt is not None:
            for p in recent:
                if not layout.orchestrator_path(p.step).is_file():
                    save_orchestrator_checkpoint(cfg.output_dir, p)
                    written.append(p.step)
        print(f"orchestrator: preempted after step {progress.step}; wrote progress records {written}", flush=True)
    preempt.close()
    if run is not None:
        run.finish()


def cli() -> None:
    """Console script ``orchestrator``."""
    whole_lines()
    main(sys.argv[1:])


if __name__ == "__main__":
    whole_lines()
    main(sys.argv[1:])
