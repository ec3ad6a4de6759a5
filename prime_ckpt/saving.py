"""Pieces of a trainer save around the DCP write: the checks before it (the ranks agree on
:class:`~prime_ckpt.state.Progress`; the step directory is free, or set aside), its error
(:class:`CheckpointSaveError`, one line per failing rank, a full disk named as such), the bytes
a rank saves, and the DCP write itself, sync or staged and in the background, recorded in the
save's :class:`~prime_ckpt.save_record.SaveRecord`."""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import asdict
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict_saver import AsyncCheckpointerType
from torch.distributed.tensor import DTensor

from prime_ckpt.dcp_io import dcp_writer
from prime_ckpt.errors import PrimeCkptError, ProgressMismatchError
from prime_ckpt.layout import CHECKPOINTS_DIR, RunLayout, foreign_reason, trainer_part_complete
from prime_ckpt.run import superseded_dir
from prime_ckpt.save_record import SaveRecord
from prime_ckpt.staging import ReusedBufferStager
from prime_ckpt.state import Progress, current_rank, ranks_by_value, ranks_text
from prime_ckpt.storage import AnyPath, is_remote, one_line, remove_tree, set_aside
from prime_ckpt.writing import file_digests

# the trainer's logger: what users filter on and tests capture
logger = logging.getLogger("prime_ckpt.trainer")


class CheckpointSaveError(PrimeCkptError, RuntimeError):
    """A checkpoint save failed; raised on every rank.

    Attributes:
        step: the checkpoint step.
        path: the step's trainer directory.
        failures: ``{rank: "ExceptionType: message"}`` for every rank that failed.
    """

    def __init__(self, step: int, path: AnyPath, failures: dict[int, str]) -> None:
        self.step, self.path, self.failures = step, path, failures
        detail = "; ".join(f"rank {r}: {msg}" for r, msg in sorted(failures.items()))
        super().__init__(f"{path}: checkpoint step {step} failed ({detail}); earlier checkpoints are untouched")



def _free_bytes(path: AnyPath) -> int | None:
    """Free bytes on the local file system holding ``path`` (its nearest existing parent), or
    None (remote, or unknown)."""
    import shutil

    if is_remote(path):
        return None
    p = str(path)
    while p and not os.path.exists(p):
        p = os.path.dirname(p)
    try:
        return shutil.disk_usage(p or ".").free
    except OSError:
        return None


def _save_error(step: int, path: AnyPath, exc: BaseException) -> CheckpointSaveError:
    """The :class:`CheckpointSaveError` for ``exc`` raised by a save of ``step`` into ``path``:
    every failing rank of DCP's ``CheckpointException``, else this rank, each as one line."""

    def line(e: BaseException) -> str:
        if "PytorchStreamWriter failed writing" in " ".join(str(e).split()) and (free := _free_bytes(path)) is not None and free < 1 << 20:
            # torch's zip writer hides the errno (ENOSPC) behind its own text
            return f"OSError: [Errno 28] No space left on device ({free} bytes free on the file system of {path})"
        return one_line(e)

    return CheckpointSaveError(step, path, rank_failures(exc, line))


def rank_failures(exc: BaseException, line: Callable[[BaseException], str] = one_line) -> dict[int, str]:
    """``{rank: line(error)}`` of a failed DCP save or load: every failing rank of DCP's
    ``CheckpointException`` (its ``failures``; empty if it names none), else this rank's ``exc``."""
    from torch.distributed.checkpoint.api import CheckpointException

    if isinstance(exc, CheckpointException):
        return {int(r): line(pair[0] if isinstance(pair, tuple) else pair) for r, pair in exc.failures.items()}
    return {current_rank(): line(exc)}


def has_files(directory) -> bool:
    """True if ``directory`` exists and holds any entry (local or remote path)."""
    try:
        return directory.is_dir() and any(True for _ in directory.iterdir())
    except FileNotFoundError:
        return False


def local_tensor_bytes(obj: Any) -> int:
    """Bytes of tensor data held by this rank in a nested state dict (local shards of DTensors)."""
    if isinstance(obj, DTensor):
        # the local shard itself, not to_local(): that goes through autograd dispatch, ~10 us a
        # tensor, which adds up for ~1000 tensors
        return obj._local_tensor.numel() * obj.element_size()
    if isinstance(obj, torch.Tensor):
        return obj.numel() * obj.element_size()
    if isinstance(obj, dict):
        return sum(local_tensor_bytes(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(local_tensor_bytes(v) for v in obj)
    return 0


def check_progress(step: int, trainer_dir: AnyPath, progress: Progress, group: Any) -> None:
    """Raise on every rank, before anything is written, unless every rank holds the same
    ``progress`` (one ``all_gather_object`` of a few ints on the checkpoint group; nothing
    when not distributed).

    The rule's source: ``app.progress`` is saved as a replicated value and DCP keeps one copy
    of a value every rank saves under the same key, so a per-rank count (tokens this rank
    saw) would silently come back as one rank's value (issue 15, item 13a).

    Raises:
        ProgressMismatchError: a field differs between ranks; names the first such field and
            each rank's value (on every rank, with the same message).
    """
    if group is None:
        return
    mine = asdict(progress)
    gathered: list[Any] = [None] * dist.get_world_size(group)
    dist.all_gather_object(gathered, mine, group=group)
    for name in mine:
        values = {r: g.get(name) for r, g in enumerate(gathered)}
        if len(set(values.values())) > 1:
            detail = "; ".join(f"{v} on {ranks_text(rs)}" for v, rs in ranks_by_value(values).items())
            raise ProgressMismatchError(
                f"{trainer_dir}: not saving checkpoint step {step}: Progress.{name} differs "
                f"across ranks ({detail}); progress must be the same on every rank "
                "(all-reduce per-rank counts before saving); nothing was written",
                step=step, field=name, values=values,
            )


def clear_way(layout: RunLayout, step: int, overwrite: bool, before_set_aside: Callable[[], None]) -> str | None:
    """Rank 0, before a save writes anything: refuse (returns the error line) or make the step's
    ``trainer`` directory free (``before_set_aside`` runs before a complete earlier step is set
    aside: the wait for its post-commit job).

    * A step directory that is not this project's (:func:`prime_ckpt.layout.foreign_reason`)
      is never written into: refused.
    * A complete earlier save of this step is never deleted: without ``overwrite`` the save is
      refused; with it the whole ``checkpoints/step_<N>`` (trainer part, orchestrator record,
      manifest, save record) is set aside into ``superseded/`` first, so the new step never
      mixes with the old one's parts.
    * A directory holding files of an unfinished save (a crash) is removed: never mix old and
      new files. An empty directory is left alone: it is this save's, created by a faster
      rank's planning step (removing it opened a window where a crash left no trace of the
      save in progress).
    """
    step_dir, trainer_dir = layout.step_dir(step), layout.trainer_dir(step)
    names = [p.name for p in step_dir.iterdir()] if step_dir.is_dir() else []
    if (why := foreign_reason("checkpoint", names)) is not None:
        return f"{step_dir}: not this project's checkpoint step ({why}); not writing into it"
    if not has_files(trainer_dir):
        return None
    if trainer_part_complete(trainer_dir):
        if not overwrite:
            return (f"{trainer_dir}: checkpoint step {step} is already complete; not replacing it "
                    "(save(..., overwrite=True) sets the earlier one aside and writes a new one)")
        before_set_aside()  # the earlier save's record/manifest job first
        where = superseded_dir(layout.output_dir, f"resave-step_{step}") / CHECKPOINTS_DIR
        set_aside([step_dir], where)
        logger.warning("%s: overwrite=True: the complete earlier step is set aside into %s", step_dir, where)
        return None
    logger.warning("%s holds files of an unfinished save; replacing it", trainer_dir)
    remove_tree(trainer_dir)
    return None


def write_sync(sd: dict[str, Any], trainer_dir: AnyPath, record: SaveRecord, group: Any, write_threads: int,
               t_call: float) -> None:
    """Write ``sd`` into ``trainer_dir`` with ``dcp.save`` (collective on ``group``; returns once
    durable) and fill ``record``: its bytes and timings (``t_call``: ``perf_counter()`` when
    ``save()`` was called), the data files' digests taken while writing (``file_digests``; on
    rank 0), its stages up to ``durable``.

    Raises:
        CheckpointSaveError: the write failed (on every rank); set on ``record``'s stages too,
            ``record.error`` holds DCP's text.
    """
    record.bytes = local_tensor_bytes(sd)  # no collective on the blocking path
    t0 = time.perf_counter()
    try:
        metadata = dcp.save(sd, storage_writer=dcp_writer(trainer_dir, thread_count=write_threads), process_group=group)
    except BaseException as e:  # DCP's CheckpointException is a BaseException
        if isinstance(e, (KeyboardInterrupt, SystemExit)):
            raise
        record.error = str(e)
        err = _save_error(record.step, trainer_dir, e)
        record.failed(err)
        raise err from e
    record.file_digests = file_digests(metadata)
    record.upload_s = time.perf_counter() - t0
    record.blocking_s = time.perf_counter() - t_call
    record.total_s = record.blocking_s
    record.stage_reached("durable")


def write_async(
    sd: dict[str, Any], trainer_dir: AnyPath, record: SaveRecord, group: Any, write_threads: int, t_call: float, *,
    stager: ReusedBufferStager, async_mode: str, on_durable: Callable[[SaveRecord], None],
) -> None:
    """Stage ``sd`` into ``stager``'s CPU buffers and start its write into ``trainer_dir`` in the
    background (``dcp.async_save``, ``async_mode`` ``"thread"`` or ``"process"``, collective on
    ``group``); returns once staged, ``record``'s bytes, blocking timings and ``staged`` stage set.

    When the write ends (on DCP's upload thread) ``record.upload_s`` / ``total_s`` (and on rank 0
    ``record.file_digests``, the data files hashed while written) are set, then
    either ``durable`` is resolved and ``on_durable(record)`` called, or the
    :class:`CheckpointSaveError` (chained to DCP's error) is set on the unresolved stages and
    ``record.error`` holds DCP's error.
    """
    t0 = time.perf_counter()
    result = dcp.async_save(
        sd,
        storage_writer=dcp_writer(trainer_dir, thread_count=write_threads),
        process_group=group,
        async_stager=stager,
        async_checkpointer_type=AsyncCheckpointerType(async_mode),
    )
    upload: Future = result.upload_completion if hasattr(result, "upload_completion") else result
    record.staging_s = stager.last_staging_s
    record.bytes = stager.last_staged_bytes  # counted while staging: no second walk
    record.blocking_s = time.perf_counter() - t_call
    record.stage_reached("staged")

    def _done(fut: Future) -> None:
        now = time.perf_counter()
        record.upload_s = now - t0
        record.total_s = now - t_call
        if (exc := fut.exception()) is None:
            record.file_digests = file_digests(fut.result())
            # Upload completion on rank 0 means .metadata is written: the step is committed.
            record.stage_reached("durable")
            on_durable(record)
            return
        record.error = f"{type(exc).__name__}: {exc}"
        if isinstance(exc, (KeyboardInterrupt, SystemExit)):
            record.failed(exc)
            return
        err = _save_error(record.step, trainer_dir, exc)
        err.__cause__ = exc
        record.failed(err)

    upload.add_done_callback(_done)
