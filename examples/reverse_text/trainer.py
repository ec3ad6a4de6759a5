"""The RL trainer: ``torchrun -m examples.reverse_text.trainer @ train.toml [flags]``.

FSDP2-sharded Hugging Face ``LlamaForCausalLM`` (:func:`~examples.reverse_text.model.build_model`), AdamW, warmup/constant LR. Step
``n`` waits for ``rollouts/step_n.pt`` (from the orchestrator), takes this rank's shard, does
one policy-gradient step, publishes inference weights ``weights/step_n`` (sharded across ranks,
in the background: :class:`prime_ckpt.publisher.WeightsPublisher`) and, with ``--ckpt.*``,
a DCP checkpoint every ``--ckpt.interval`` steps. ``--ckpt.resume-step`` (-1 = newest complete)
continues a run bitwise-identically.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from pydantic import Field

from examples.reverse_text.common import (
    Preempted,
    die_with_parent,
    params_sha256,
    read_rollouts,
    rollouts_path,
    set_deterministic_threads,
    start_wandb,
    wait_for_file,
    whole_lines,
)
from examples.reverse_text.model import (
    ModelConfig,
    build_model,
    completion_logprobs,
    left_pad,
    shard_model,
)
from examples.reverse_text.task import EOS, PAD, build_tokenizer, encode, prompt_tokens, sample_problems
from prime_ckpt.config import CheckpointConfig, CliSettings, MonitorConfig, WeightsConfig, cli_entry
from prime_ckpt.layout import RUN_PARTS
from prime_ckpt.preemption import PreemptionHandler
from prime_ckpt.publisher import WeightsPublisher
from prime_ckpt.trainer import Checkpointer, Progress, TrainerState
from prime_ckpt.weights import gather_full_state_dict


class TrainerConfig(CliSettings):
    """RL trainer for the reverse-text task (run under torchrun)."""

    output_dir: Path = Path("outputs/reverse_text")
    """Run directory: checkpoints/, weights/ and rollouts/ live here."""

    max_steps: int = Field(40, ge=1)
    """Train until this step (optimizer steps; a resumed run continues up to it)."""

    async_level: int = Field(1, ge=1)
    """Rollouts of step n come from the weights of step n - async_level (1 = on-policy)."""

    lr: float = Field(1e-3, gt=0)
    """Peak learning rate of AdamW."""

    warmup_steps: int = Field(3, ge=0)
    """Linear LR warmup steps, then constant (the schedule never depends on max_steps)."""

    weight_decay: float = Field(0.0, ge=0)
    """AdamW weight decay."""

    max_grad_norm: float = Field(1.0, gt=0)
    """Clip the global gradient norm to this value."""

    temperature: float = Field(1.0, gt=0)
    """Sampling temperature the orchestrator used (log-probs are recomputed under it)."""

    warm_start_steps: int = Field(30, ge=0)
    """Supervised steps that make the base policy before RL (fresh runs only; 0 = RL from scratch)."""

    seed: int = Field(0, ge=0, lt=2**31)
    """Seed of the model initialisation and the warm start."""

    model: ModelConfig = ModelConfig()
    """Model shape."""

    rollout_timeout_s: float = Field(600.0, gt=0)
    """Give up (exit non-zero) if a step's rollouts do not arrive within this many seconds."""

    ckpt: CheckpointConfig | None = None
    """Checkpointing; off unless --ckpt / --ckpt.* / a [ckpt] table asks for it."""

    weights: WeightsConfig = WeightsConfig()
    """Per-step weights publishing (weights/step_N for the orchestrator / inference side)."""

    monitor: MonitorConfig = MonitorConfig()
    """Monitoring (W&B)."""


class RolloutLoader:
    """Per-rank reader of ``rollouts/step_<n>.pt``; its state is the next step to read."""

    def __init__(self, output_dir: Path, rank: int, world_size: int, timeout: float, should_stop=None, preempted=None) -> None:
        self.output_dir = output_dir
        self.rank, self.world_size = rank, world_size
        self.timeout, self.should_stop, self.preempted = timeout, should_stop, preempted
        self.next_step = 1

    def next_batch(self) -> tuple[int, dict[str, Any]]:
        """``(step, batch)``: the full batch plus ``shard`` (this rank's rows, ``rank::world_size``).
        Raises ``Preempted`` if a preemption signal arrives while waiting (nothing consumed)."""
        step = self.next_step
        path = wait_for_file(
            rollouts_path(self.output_dir, step), timeout=self.timeout, should_stop=self.should_stop, preempted=self.preempted
        )
        batch = read_rollouts(path)
        if int(batch["step"]) != step:
            raise RuntimeError(f"{path}: holds step {batch['step']}, expected {step}")
        rows = slice(self.rank, None, self.world_size)
        batch["shard"] = {k: batch[k][rows] for k in ("prompt", "prompt_mask", "completion", "completion_mask", "rewards")}
        self.next_step = step + 1
        return step, batch

    def state_dict(self) -> dict[str, Any]:
        return {"next_step": self.next_step, "rank": self.rank, "world_size": self.world_size}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.next_step = int(state["next_step"])


def warm_start(model: torch.nn.Module, steps: int, seed: int, lr: float = 3e-3, batch_size: int = 32) -> None:
    """A short supervised run on reversed strings: the 'base model' RL starts from (the real
    reverse-text recipe is SFT, then RL). Deterministic; every rank computes the same result."""
    if steps <= 0:
        return
    g = torch.Generator().manual_seed(seed + 7919)
    opt = torch.optim.AdamW(model.parameters(), lr=lr)
    for _ in range(steps):
        problems = sample_problems(batch_size, g)
        targets = [encode(s[::-1]) + [EOS] for s in problems]
        c = max(map(len, targets))
        completion = torch.tensor([t + [PAD] * (c - len(t)) for t in targets])
        completion_mask = (completion != PAD).long()
        prompt, prompt_mask = left_pad([prompt_tokens(s) for s in problems])
        lp = completion_logprobs(model, prompt, prompt_mask, completion, completion_mask)
        loss = -lp.sum() / completion_mask.sum()
        opt.zero_grad()
        loss.backward()
        opt.step()


def _ckpt_metrics(checkpointer: Checkpointer | None, logged: set[tuple[str, int]]) -> dict[str, float]:
    """W&B fields of the checkpoint saves, each logged once: a save's blocking / staging time
    and bytes when ``save()`` returned, its upload and total time once it is durable (an async
    save finishes during later steps)."""
    out: dict[str, float] = {}
    for r in checkpointer.records if checkpointer is not None else []:
        if ("saved", r.step) not in logged:
            out.update({"ckpt/blocking_s": r.blocking_s, "ckpt/staging_s": r.staging_s, "ckpt/bytes": r.bytes})
            logged.add(("saved", r.step))
        if r.total_s is not None and ("durable", r.step) not in logged:
            out.update({"ckpt/upload_s": r.upload_s or 0.0, "ckpt/total_s": r.total_s, "ckpt/durable_step": r.step})
            logged.add(("durable", r.step))
    return out


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def main(argv: list[str] | None = None) -> None:
    cfg = cli_entry(TrainerConfig, argv, prog="trainer")
    parent_gone = die_with_parent()
    set_deterministic_threads()
    use_cuda = torch.cuda.is_available()
    if "RANK" not in os.environ:  # started without torchrun: one rank (torchrun for more)
        os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port()))
    dist.init_process_group("nccl" if use_cuda else "gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    if use_cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    device = torch.device("cuda", torch.cuda.current_device()) if use_cuda else torch.device("cpu")
    log = print if rank == 0 else (lambda *a, **k: None)

    from torch.distributed.device_mesh import init_device_mesh

    # Retention (--ckpt.keep) pins weights [x - async_level, x] for every kept checkpoint x.
    checkpointer = (
        Checkpointer(cfg.output_dir, cfg.ckpt, async_level=cfg.async_level, parts=RUN_PARTS)
        if cfg.ckpt is not None
        else None
    )
    resume = checkpointer.resume_step() if checkpointer is not None else None
    # rank 0 logs; the run id is printed and written to <output_dir>/wandb/trainer.id (for a resume)
    run = start_wandb("trainer", cfg.output_dir, cfg.monitor, cfg.model_dump(mode="json")) if rank == 0 else None

    model = build_model(cfg.model, seed=cfg.seed)
    if resume is None:
        warm_start(model, cfg.warm_start_steps, cfg.seed)
    model.to(device)
    shard_model(model, init_device_mesh(device.type, (world,)))

    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay, betas=(0.9, 0.99))
    warmup = cfg.warmup_steps
    scheduler = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / (warmup + 1)))
    progress = Progress()
    # SIGTERM / SIGUSR1: finish the step, checkpoint it, exit 0 (all ranks agree on the step).
    # Its own gloo group: the Checkpointer's group runs async-save collectives on a background
    # thread, and two threads issuing collectives on one group deadlock.
    preempt = PreemptionHandler()
    loader = RolloutLoader(cfg.output_dir, rank, world, cfg.rollout_timeout_s, should_stop=parent_gone, preempted=preempt.requested)
    state = TrainerState(model, opt, scheduler, progress, loader)
    # Every step: stage the local shards, publish in the background (sharded, COMPLETE last):
    # a Hugging Face model dir (the model's config.json, the tokenizer) an inference server loads.
    publisher = WeightsPublisher(
        cfg.output_dir, save_async=cfg.weights.save_async, dtype=cfg.weights.dtype,
        tokenizer=build_tokenizer(), timeout_s=cfg.weights.timeout,
    )

    if resume is not None:
        assert checkpointer is not None
        checkpointer.load(resume, state)
        if progress.step != resume or loader.next_step != resume + 1:
            raise RuntimeError(f"checkpoint step {resume} holds progress.step={progress.step}, next rollouts {loader.next_step}")
        log(f"trainer: resumed from checkpoint step {resume} (samples {progress.total_samples}, tokens {progress.total_tokens})", flush=True)
        # The loaded model, hashed like the final line (and like weights/step_N of another run):
        # lets a test check that a resume loaded bitwise what was saved.
        loaded = gather_full_state_dict(model)
        if rank == 0:
            print(f"resumed params sha256 {params_sha256(loaded)}", flush=True)
        del loaded
    else:
        publisher.publish(0, model)
        log(f"trainer: fresh start, world size {world}, wrote weights/step_0", flush=True)

    logged_saves: set[tuple[str, int]] = set()  # ("saved" | "durable", step) already sent to W&B
    saved_at, stopped = resume, False
    for n in range(progress.step + 1, cfg.max_steps + 1):
        t0 = time.perf_counter()
        try:
            step, batch = loader.next_batch()
        except Preempted:
            batch = None
        # One tiny collective per step, after the wait and before any training collective: a
        # rank that got its rollouts and a rank that got the signal stop together.
        if preempt.should_stop():
            stopped = True
            loader.next_step = n  # step n was not trained: its rollouts are read again on resume
            break
        assert batch is not None and step == n, n
        t_wait = time.perf_counter() - t0
        rewards = batch["rewards"].float()
        advantages = rewards - rewards.mean()
        shard = batch["shard"]
        adv = advantages[rank::world].to(device)
        lp = completion_logprobs(
            model, shard["prompt"].to(device), shard["prompt_mask"].to(device),
            shard["completion"].to(device), shard["completion_mask"].to(device), cfg.temperature,
        ).sum(-1)
        batch_size = rewards.numel()
        # FSDP averages gradients over ranks, so scale by world/B to get the batch mean.
        local = -(adv * lp).sum()
        (local * (world / batch_size)).backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.max_grad_norm)
        grad_norm = float(grad_norm.full_tensor() if hasattr(grad_norm, "full_tensor") else grad_norm)
        lr = scheduler.get_last_lr()[0]
        opt.step()
        scheduler.step()
        opt.zero_grad(set_to_none=True)
        loss_t = local.detach().reshape(1).to(torch.float64)
        dist.all_reduce(loss_t)
        loss = loss_t.item() / batch_size
        tokens = int(batch["prompt_mask"].sum() + batch["completion_mask"].sum())
        progress.step = n
        progress.total_samples += batch_size
        progress.total_tokens += tokens
        pub = publisher.publish(n, model)
        ckpt_note = f" | weights blocked {pub.blocking_s:.3f}s"
        if checkpointer is not None and checkpointer.should_save(n):
            rec = checkpointer.save(n, state)
            saved_at = n
            ckpt_note = f" | ckpt {rec.mode} blocked {rec.blocking_s:.3f}s"
        dt = time.perf_counter() - t0
        reward = rewards.mean().item()
        log(
            f"step {n} | loss {loss:.9g} | reward {reward:.4f} | grad norm {grad_norm:.3f} | lr {lr:.2e} | samples {progress.total_samples}"
            f" | tokens {progress.total_tokens} | policy lag {n - int(batch['weights_step'])}"
            f" | wait {t_wait:.2f}s | step {dt:.2f}s{ckpt_note}",
            flush=True,
        )
        if run is not None:
            run.log({
                "progress/step": n, "progress/total_samples": progress.total_samples,
                "progress/total_tokens": progress.total_tokens, "loss": loss, "reward/mean": reward,
                "optim/lr": lr, "optim/grad_norm": grad_norm, "perf/step_time_s": dt, "perf/wait_rollouts_s": t_wait,
                "weights/blocking_s": pub.blocking_s, "weights/staging_s": pub.staging_s,
                # the previous publish (this one is still in flight): its time until COMPLETE
                **({"weights/ready_s": publisher.records[-2].ready_s}
                   if len(publisher.records) > 1 and publisher.records[-2].ready_s is not None else {}),
                **_ckpt_metrics(checkpointer, logged_saves),
            })
    if stopped:
        log(f"trainer: preempted after step {progress.step}", flush=True)
        if checkpointer is not None and progress.step > 0:
            if saved_at != progress.step:
                checkpointer.save(progress.step, state)  # waits for any in-flight async save first
            # (a step that was just saved at its interval is not saved twice)
            log(f"trainer: wrote checkpoint step {progress.step} before exiting", flush=True)
    preempt.close()
    publisher.close()  # waits for the last publish; raises its error (non-zero exit)
    if checkpointer is not None:
        checkpointer.close()  # waits for the last async save; raises its error (non-zero exit)
    full = gather_full_state_dict(model)
    if rank == 0:
        print(f"final step {progress.step} | params sha256 {params_sha256(full)}", flush=True)
    if run is not None:
        run.finish()
    dist.barrier()
    dist.destroy_process_group()


def cli() -> None:
    """Console script ``trainer``."""
    whole_lines()
    main(sys.argv[1:])


if __name__ == "__main__":  # required: process-based async saving re-imports this module
    whole_lines()
    main(sys.argv[1:])
