"""Inference weights ``weights/step_<N>/``: the readers, and the gather-to-rank-0 writer.

Publishing every step is :class:`prime_ckpt.publisher.WeightsPublisher` (sharded across ranks,
asynchronous, Hugging Face layout). This module keeps what reads a weights step
(:func:`load_weights`, :func:`wait_for_weights`; both layouts) and the single-file writer of
earlier versions (:func:`save_weights`: gathers the full model onto rank 0 and writes one
``model.safetensors`` there, synchronously; the approach most RL trainers use, kept as the
benchmark's baseline and for small tools). In both layouts ``COMPLETE`` is written last, after
the data is fsync'd; a reader treats a directory without it as not there yet.

``output_dir`` / ``step_dir`` may be fsspec URLs (``s3://...``) or UPaths carrying storage
options: each file is then one upload, in the same order, ``COMPLETE`` last.
"""

from __future__ import annotations

import json
import os
import time
from typing import Any

import torch
import torch.distributed as dist
from safetensors.torch import load, load_file, save, save_file
from torch import nn

from prime_ckpt.errors import PrimeCkptError
from prime_ckpt.layout import CONFIG_FILE, MODEL_FILE, WEIGHTS_MARKER, RunLayout, weights_complete, weights_files
from prime_ckpt.manifest import safetensors_header, write_manifest
from prime_ckpt.storage import AnyPath, atomic_write_bytes, fsync_dir, fsync_file, is_remote, remove_tree, to_path


class WeightsNotReadyError(PrimeCkptError, TimeoutError):
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
    os.chmod(step_dir / MODEL_FILE, 0o644)  # safetensors creates 0600: unreadable to a server of another user
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

    Reads both layouts: the sharded Hugging Face one (``model.safetensors.index.json`` and the
    ``model-0000i-of-0000n.safetensors`` it names, written by
    :class:`prime_ckpt.publisher.WeightsPublisher`) and the single ``model.safetensors`` of
    older runs. Tensors are CPU, in the dtype they were published in. ``config`` is the parsed
    ``config.json`` (``{}`` if there is none).

    Raises:
        FileNotFoundError: the directory or its ``COMPLETE`` marker is missing, or a shard the
            index names is missing (names the path).
        ValueError: the index is unreadable, a shard is not safetensors or shorter / longer
            than its header declares, or a tensor appears in two shards (names the file).
    """
    step_dir = to_path(step_dir)
    if not weights_complete(step_dir):
        raise FileNotFoundError(f"{step_dir}: weights missing or incomplete (no {WEIGHTS_MARKER} marker)")
    sd: dict[str, torch.Tensor] = {}
    for f in weights_files(step_dir):
        if not f.is_file():
            raise FileNotFoundError(f"{f}: missing (named by the weights index)")
        _, expected = safetensors_header(f)  # ValueError naming the file if it is not safetensors
        size = f.stat().st_size
        if size != expected:
            raise ValueError(f"{f}: size {size} != {expected} declared by its header (truncated?)")
        part = load(f.read_bytes()) if is_remote(f) else load_file(str(f))
        dup = set(part) & set(sd)
        if dup:
            raise ValueError(f"{f}: tensor {sorted(dup)[0]!r} is also in another shard")
        sd.update(part)
    config_path = step_dir / CONFIG_FILE
    config = json.loads(config_path.read_text()) if config_path.is_file() else {}
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
