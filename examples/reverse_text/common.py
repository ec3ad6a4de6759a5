"""Bits the trainer, orchestrator and launcher share: the rollouts hand-off, waits that give up,
dying with the parent process, and starting a W&B run whose id a resume can find."""

from __future__ import annotations

import ctypes
import hashlib
import io
import os
import signal
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from prime_ckpt.layout import step_dirname
from prime_ckpt.storage import atomic_write_bytes

ROLLOUTS_DIR = "rollouts"
WANDB_IDS_DIR = "wandb"


def rollouts_path(output_dir: Path | str, step: int) -> Path:
    """``<output_dir>/rollouts/step_<step>.pt``: the batch the trainer consumes at ``step``."""
    return Path(output_dir) / ROLLOUTS_DIR / f"{step_dirname(step)}.pt"


def write_rollouts(output_dir: Path | str, step: int, batch: dict) -> Path:
    """Write a rollout batch (tensors and plain values) atomically (tmp -> fsync -> rename)."""
    buf = io.BytesIO()
    torch.save(batch, buf)
    path = rollouts_path(output_dir, step)
    atomic_write_bytes(path, buf.getvalue())
    return path


def read_rollouts(path: Path | str) -> dict:
    """Read a rollout batch with ``weights_only=True`` (no arbitrary unpickling)."""
    return torch.load(path, map_location="cpu", weights_only=True)


class Preempted(Exception):
    """A wait was abandoned because this process received a preemption signal."""


def wait_for_file(
    path: Path,
    *,
    timeout: float,
    poll_interval: float = 0.02,
    should_stop: Callable[[], bool] | None = None,
    preempted: Callable[[], bool] | None = None,
) -> Path:
    """Block until ``path`` exists; raise ``TimeoutError`` after ``timeout`` s or when
    ``should_stop()`` turns true (the producer is gone), ``Preempted`` when ``preempted()`` does."""
    deadline = time.monotonic() + timeout
    while not path.is_file():
        if preempted is not None and preempted():
            raise Preempted(str(path))
        if should_stop is not None and should_stop():
            raise TimeoutError(f"{path}: gave up waiting (parent process exited)")
        if time.monotonic() > deadline:
            raise TimeoutError(f"{path}: not written after {timeout:.0f} s (is the producer running?)")
        time.sleep(poll_interval)
    return path


def die_with_parent() -> Callable[[], bool]:
    """Ask the kernel to SIGKILL this process when its parent dies (Linux ``PR_SET_PDEATHSIG``).

    torchrun starts its workers in new sessions, so killing the launcher's process group would
    otherwise leave trainer ranks orphaned, still able to write checkpoints into the run
    directory. Returns ``parent_gone()``, a check for the wait loops (portable fallback).
    """
    parent = os.getppid()
    if sys.platform.startswith("linux"):
        try:
            libc = ctypes.CDLL(None, use_errno=True)
            libc.prctl(1, int(signal.SIGKILL), 0, 0, 0)  # PR_SET_PDEATHSIG = 1
        except (OSError, AttributeError):
            pass
    if os.getppid() != parent:  # the parent died before prctl took effect
        os._exit(1)
    return lambda: os.getppid() != parent


def params_sha256(state_dict: dict[str, torch.Tensor]) -> str:
    """sha256 over ``name``, dtype, shape and raw bytes of every tensor, in sorted key order."""
    h = hashlib.sha256()
    for name in sorted(state_dict):
        t = state_dict[name].detach().cpu().contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def set_deterministic_threads() -> None:
    """One intra-op thread: same thread count in every run, so float sums reduce in one order."""
    torch.set_num_threads(1)


def whole_lines() -> None:
    """Make every ``print`` reach stdout as one ``write`` of the whole line.

    The programs run unbuffered (``PYTHONUNBUFFERED=1``) and share one pipe (the launcher's
    stdout): unbuffered ``print`` writes the text, the separators and the newline separately,
    so another process's line could land in the middle of ours. Line buffering in the text
    layer hands the finished line to the (unbuffered) binary layer in one piece; a pipe write of
    up to ``PIPE_BUF`` (4096) bytes is atomic.
    """
    for stream in (sys.stdout, sys.stderr):
        if hasattr(stream, "reconfigure"):
            stream.reconfigure(line_buffering=True, write_through=False)


def wandb_id_path(output_dir: Path | str, program: str) -> Path:
    """``<output_dir>/wandb/<program>.id``: the id of the W&B run ``program`` logs to (one line),
    what ``--monitor.wandb.id`` takes to continue that run on a resume."""
    return Path(output_dir) / WANDB_IDS_DIR / f"{program}.id"


def start_wandb(program: str, output_dir: Path | str, monitor: Any, config: dict) -> Any:
    """Start (or, with ``--monitor.wandb.id``, continue) the W&B run of ``program``; None when
    ``--monitor.wandb.project`` is unset.

    Prints the run id on one line (``trainer: W&B run id ...``) and writes it to
    :func:`wandb_id_path`, so a resume can pass it back: the id W&B actually uses, whether it
    was given or generated. Metrics are plotted against ``progress/step``.
    """
    w = monitor.wandb
    if w.project is None:
        return None
    import wandb

    run = wandb.init(project=w.project, id=w.id, name=w.name, mode=w.mode, resume="allow", config=config, job_type=program)
    run.define_metric("progress/step")
    run.define_metric("*", step_metric="progress/step")
    path = wandb_id_path(output_dir, program)
    atomic_write_bytes(path, f"{run.id}\n".encode())
    mode = "offline" if run.offline else "online"
    print(f"{program}: W&B run id {run.id} (project {run.project}, {mode}; written to {path})", flush=True)
    return run
