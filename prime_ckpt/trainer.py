"""Trainer checkpointing: the ``Stateful`` app state, DCP save/load and the async lifecycle.

``checkpoints/step_<N>/trainer/`` is a DCP directory (``.metadata`` + ``__<rank>_<n>.distcp`` files,
one per rank and writer thread, ``write_threads``). What is saved, under these top-level keys of the DCP state dict::

    app.model          FSDP2 / DTensor model state dict (sharded; get_state_dict)
    app.optimizer      state of every optimizer (sharded; get_state_dict)
    app.scheduler      LR scheduler state dict (replicated: same on every rank)
    app.progress       {"step", "total_samples", "total_tokens"} (replicated)
    app.rank_state.rank_<r>  per-rank RNG (torch CPU/CUDA, Python random, NumPy) and dataloader
                             state. Keyed per rank on purpose: DCP keeps one copy of a plain
                             value saved under the same key by every rank, so an un-keyed RNG
                             state would silently come back as rank 0's on every rank.

Lifecycle (``--ckpt.save-async``): :meth:`Checkpointer.save` returns once the state is staged
(copied into reused CPU buffers), the write runs in the background on a dedicated gloo process
group; :meth:`Checkpointer.wait` blocks until it is durable and raises its error;
:meth:`Checkpointer.close` waits for the last save. A second save first waits for the first.

``output_dir`` may be an fsspec URL (``s3://bucket/run``): the trainer directory is then written
with DCP's ``FsspecWriter`` and read with an ``FsspecReader`` whose ``.metadata`` goes through
the restricted unpickler, and rank 0's post-commit work goes through :mod:`prime_ckpt.storage`
(see there for the commit protocol on object stores).

The pieces live in their own modules (issue #17): :mod:`prime_ckpt.state` (:class:`TrainerState`,
RNG, the per-rank key rule), :mod:`prime_ckpt.checkpointer` (:class:`Checkpointer`),
:mod:`prime_ckpt.save_record` (:class:`SaveRecord`, the handle ``save()`` returns),
:mod:`prime_ckpt.saving` (the DCP write, its checks and errors), :mod:`prime_ckpt.commit`
(post-commit work), :mod:`prime_ckpt.restore` (loading), :mod:`prime_ckpt.run_entry` and
:mod:`prime_ckpt.gc_pause`. This module re-exports their public names (the old import path).
"""

from prime_ckpt.checkpointer import Checkpointer
from prime_ckpt.commit import POST_COMMIT_FAILURE_LIMIT, PostCommit
from prime_ckpt.dcp_metadata import read_dcp_metadata
from prime_ckpt.gc_pause import gc_paused
from prime_ckpt.save_record import SaveRecord
from prime_ckpt.saving import CheckpointSaveError, _save_error, local_tensor_bytes
from prime_ckpt.state import (
    APP_KEY,
    Progress,
    StatefulLike,
    TrainerState,
    current_rank,
    current_world_size,
    get_rng_state,
    set_rng_state,
    source_rank_key,
    unused_saved_ranks,
)

__all__ = [
    "APP_KEY",
    "POST_COMMIT_FAILURE_LIMIT",
    "CheckpointSaveError",
    "Checkpointer",
    "PostCommit",
    "Progress",
    "SaveRecord",
    "StatefulLike",
    "TrainerState",
    "_save_error",
    "current_rank",
    "current_world_size",
    "gc_paused",
    "get_rng_state",
    "local_tensor_bytes",
    "read_dcp_metadata",
    "set_rng_state",
    "source_rank_key",
    "unused_saved_ranks",
]
