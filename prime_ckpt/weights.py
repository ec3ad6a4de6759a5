"""Inference weight checkpoints: ``weights/step_<N>/``.

Each step directory holds the full (gathered, unsharded) model state dict in
``model.safetensors`` plus a small ``config.json``, then the ``COMPLETE`` marker, written last
and only after both files are fsync'd. A reader (the orchestrator / inference side) treats a
directory without the marker as not there yet.

``output_dir`` / ``step_dir`` may be fsspec URLs (``s3://...``) or UPaths carrying storage
options: each file is then one upload, in the same order, ``COMPLETE`` last.
"""

from __future__ import annotations

import json
import time
from typing import Any

import torch
import torch.distributed as dist
from safetensors.torch import load, load_file, save, save_file
from torch import nn

from prime_ckpt.layout import CONFIG_FILE, MODEL_FILE, WEIGHTS_MARKER, RunLayout, weights_complete
from prime_ckpt.manifest import write_manifest
from prime_ckpt.storage import AnyPath, atomic_write_bytes, fsync_dir, fsync_file, is_remote, remove_tree, to_path


class WeightsNotReadyError(TimeoutError):
    """The weights of a step did not become complete within the timeout."""


def gather_full_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """Full (unsharded) model state dict on CPU, materialised on rank 0 only.

    Collective when ``torch.distributed`` is initialised: every rank must call it. Returns
    ``{name: tensor}`` (CPU, contiguous, original dtypes) on rank 0 and ``{}`` elsewhere.
    """
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        get_model_state_dict,
    )

    if dist.is_available() and dist.is_initialized():
        sd = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        if dist.get_rank() != 0:
            return {}
    else:
        sd = model.state_dict()
    return {k: v.detach().to("cpu").contiguous() for k, v in sd.items()}


def write_weights(step_dir: AnyPath | str, state_dict: dict[str, torch.Tensor], config: dict[str, Any] | None = None) -> AnyPath:
    """Write one weights step directory; call on one process (rank 0).

    Order: remove any stale directory of that step, write ``model.safetensors`` and
    ``config.json``, fsync both, write ``manifest.json`` (sizes and checksums), fsync the
    directory, then write ``COMPLETE`` atomically.

    Args:
        step_dir: ``weights/step_<N>``.
        state_dict: ``{name: tensor}``; tensors must be CPU and contiguous.
        config: plain JSON-serialisable values (model shape, step, dtype ...).
    Returns:
        ``step_dir``.
    """
    step_dir = to_path(step_dir)
    remove_tree(step_dir)
    config_bytes = json.dumps(config or {}, indent=2, sort_keys=True).encode()
    if is_remote(step_dir):  # one upload per file; an object appears whole when it completes
        atomic_write_bytes(step_dir / MODEL_FILE, save(state_dict))
        atomic_write_bytes(step_dir / CONFIG_FILE, config_bytes)
        write_manifest(step_dir)
        atomic_write_bytes(step_dir / WEIGHTS_MARKER, b"")
        return step_dir
    step_dir.mkdir(parents=True)
    save_file(state_dict, str(step_dir / MODEL_FILE))
    (step_dir / CONFIG_FILE).write_bytes(config_bytes)
    fsync_file(step_dir / MODEL_FILE)
    fsync_file(step_dir / CONFIG_FILE)
    write_manifest(step_dir)  # sizes + checksums for `prime-ckpt verify` (written atomically)
    fsync_dir(step_dir)
    atomic_write_bytes(step_dir / WEIGHTS_MARKER, b"")
    return step_dir


def save_weights(output_dir: AnyPath | str, step: int, model: nn.Module, config: dict[str, Any] | None = None) -> AnyPath:
    """Gather ``model`` and write ``<output_dir>/weights/step_<step>`` on rank 0.

    Collective (see :func:`gather_full_state_dict`); returns the step directory on every rank.
    """
    step_dir = RunLayout(output_dir).weights_step_dir(step)
    sd = gather_full_state_dict(model)
    if not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0:
        write_weights(step_dir, sd, {**(config or {}), "step": step})
    return step_dir


def load_weights(step_dir: AnyPath | str) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Read a complete weights step: ``({name: tensor}, config)``.

    Raises:
        FileNotFoundError: the directory or its ``COMPLETE`` marker is missing (names the path).
    """
    step_dir = to_path(step_dir)
    if not weights_complete(step_dir):
        raise FileNotFoundError(f"{step_dir}: weights missing or incomplete (no {WEIGHTS_MARKER} marker)")
    sd = load((step_dir / MODEL_FILE).read_bytes()) if is_remote(step_dir) else load_file(str(step_dir / MODEL_FILE))
    config = json.loads((step_dir / CONFIG_FILE).read_text())
    return sd, config


def wait_for_weights(
    output_dir: AnyPath | str, step: int, *, timeout: float = 600.0, poll_interval: float = 0.05, should_stop=None
) -> AnyPath:
    """Block until ``weights/step_<step>`` is complete; returns its path.

    Args:
        timeout: seconds before giving up.
        poll_interval: seconds between checks.
        should_stop: optional callable; if it returns True the wait is abandoned with
            ``WeightsNotReadyError`` (e.g. the trainer process died).
    Raises:
        WeightsNotReadyError: not complete within ``timeout`` seconds.
    """
    step_dir = RunLayout(output_dir).weights_step_dir(step)
    deadline = time.monotonic() + timeout
    while not weights_complete(step_dir):
        if should_stop is not None and should_stop():
            raise WeightsNotReadyError(f"{step_dir}: gave up waiting (producer stopped)")
        if time.monotonic() > deadline:
            raise WeightsNotReadyError(f"{step_dir}: not complete after {timeout:.0f} s")
        time.sleep(poll_interval)
    return step_dir
