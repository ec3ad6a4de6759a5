"""The record of one trainer save: its timings and sizes (``save_info.json``) and a handle on its
stages (staged, durable, committed) as futures."""

from __future__ import annotations

import time
from concurrent.futures import Future
from dataclasses import dataclass, field

from prime_ckpt.lifecycle import StageTimings


@dataclass
class SaveRecord(StageTimings):
    """One save on this rank: a handle on its progress, and its timings and sizes.

    ``save()`` returns it. Its stages are :class:`concurrent.futures.Future` s (as DCP's
    ``AsyncSaveResponse``: ``staging_completion`` / ``upload_completion``), each resolved with the
    step, in this order:

    * ``staged``: the state is copied (async: into the staging buffers; the training loop may
      change it from here on).
    * ``durable``: DCP's write finished on every rank: the data files and ``.metadata`` are
      written (the step is complete on storage).
    * ``committed``: the :class:`~prime_ckpt.checkpointer.Checkpointer` took the step as committed:
      the timings below are set and rank 0's post-commit work (``save_info.json``, manifest,
      retention, in the background; see :mod:`prime_ckpt.commit`) is queued.

    A sync save resolves all three before ``save()`` returns. A failed save sets its
    :class:`~prime_ckpt.saving.CheckpointSaveError` on every stage not reached (and ``error``).
    The futures are not dataclass fields: ``asdict()`` (``save_info.json``) holds the timings only.

    Attributes:
        step: checkpoint step.
        mode: ``"sync"`` or ``"async"``.
        wait_previous_s: seconds spent waiting for the previous async save before this one (s).
        staging_s: seconds copying the state into staging buffers (s; 0 for sync saves).
        blocking_s: seconds the training loop was blocked by ``save()`` in total (s).
        upload_s: seconds from the start of the write to durable (s), set when done.
        total_s: seconds from ``save()`` call to durable (s), set when done.
        bytes: bytes of tensor data this rank saved (local shards; bytes).
        total_bytes: bytes of the committed trainer directory on disk, all ranks (bytes; set
            by rank 0 after the commit, 0 before).
        world_size: ranks that took part.
        async_level: the run's async level k (checkpoint step x needs weights ``[x - k, x]``), as
            given to the :class:`Checkpointer`; recorded so that ``prime-ckpt plan/prune`` apply
            the run's own rule instead of a default.
        error: the error text if the save failed.
        run_id: the run that saved it (``run.json``; None when the Checkpointer did not enter).
        post_commit_error: what failed after the commit (save record, manifest, retention; rank
            0, background), one line, else None.
    """

    upload_s: float | None = None
    total_s: float | None = None
    bytes: int = 0
    total_bytes: int = 0
    world_size: int = 1
    async_level: int = 0
    error: str | None = None
    run_id: str | None = None
    started_at: float = field(default_factory=time.time)
    post_commit_error: str | None = None

    def __post_init__(self) -> None:
        self.staged: Future[int] = Future()
        self.durable: Future[int] = Future()
        self.committed: Future[int] = Future()
        #: rank 0, once durable: ``{data file name in trainer/: (size in bytes, xxh3_64 hex)}``
        #: hashed while written (:func:`prime_ckpt.writing.file_digests`); the post-commit
        #: manifest uses them instead of reading the files back. Not in ``save_info.json``.
        self.file_digests: dict[str, tuple[int, str]] = {}

    def poll(self) -> str:
        """The last stage reached, without blocking: ``"pending"``, ``"staged"``, ``"durable"``,
        ``"committed"``, or ``"failed"`` (then :meth:`wait` raises the error)."""
        stages = (("committed", self.committed), ("durable", self.durable), ("staged", self.staged))
        if any(f.done() and f.exception() is not None for _, f in stages):
            return "failed"
        return next((name for name, f in stages if f.done()), "pending")

    def wait(self, timeout: float | None = None) -> SaveRecord:
        """Block until the save is committed (at most ``timeout`` seconds; None: no limit);
        return this record.

        Raises:
            CheckpointSaveError: the save failed (on every rank, as :meth:`Checkpointer.wait`).
            TimeoutError: not committed within ``timeout`` (``concurrent.futures.TimeoutError``).
        """
        self.committed.result(timeout)
        return self

    def stage_reached(self, stage: str) -> None:
        """Resolve ``stage`` (``"staged"``, ``"durable"`` or ``"committed"``) and every earlier
        one with the step (those already resolved are left alone)."""
        for name in _STAGES[: _STAGES.index(stage) + 1]:
            f = getattr(self, name)
            if not f.done():
                f.set_result(self.step)

    def failed(self, error: BaseException) -> None:
        """Set ``error`` on every stage not yet resolved."""
        for name in _STAGES:
            f = getattr(self, name)
            if not f.done():
                f.set_exception(error)


_STAGES = ("staged", "durable", "committed")

