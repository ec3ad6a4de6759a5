"""Errors the library raises on purpose. Imports nothing from the package.

Every error here subclasses :class:`PrimeCkptError` (an ``Exception``: ``except Exception``
catches it) and carries a one-line message that names the path, step or flag and what is wrong.
Older error types elsewhere in the package are being moved here (issue 17); new ones start here.
"""

from __future__ import annotations


class PrimeCkptError(Exception):
    """Base of every error prime-ckpt raises on purpose."""


class RunLeaseError(PrimeCkptError):
    """Another live run holds the output directory's lease (``<output_dir>/run.lock``).

    Attributes:
        path: the lease file.
        holder: the holder's record (``run_id``, ``host``, ``pid``, ``heartbeat_at`` ...).
    """

    def __init__(self, message: str, path: object = None, holder: dict | None = None) -> None:
        super().__init__(message)
        self.path, self.holder = path, holder or {}


class StepExistsError(PrimeCkptError):
    """A save or publish would replace a complete step; pass ``overwrite=True`` to replace it
    (the old one is set aside, never deleted)."""


class NotResumableError(PrimeCkptError, FileNotFoundError):
    """A checkpoint step cannot be resumed: it is missing, incomplete, unreadable, or the weights
    ``[x - async_level, x]`` it needs are not all complete (the seed's rule). A
    ``FileNotFoundError`` too, for callers that caught the older ``CheckpointNotFoundError``."""


class CheckpointLoadError(PrimeCkptError):
    """Loading a checkpoint failed; raised on every rank, one line naming the step and the first
    failing rank or key, with the cause chained (``__cause__``).

    Args:
        message: the one-line message.
        step: the checkpoint step (``None`` if unknown).
        path: the step's trainer directory.
        failures: ``{rank: "reason"}`` for every rank that failed (empty if unknown).
    """

    def __init__(
        self, message: str, *, step: int | None = None, path: object = None, failures: dict[int, str] | None = None
    ) -> None:
        super().__init__(message)
        self.step, self.path, self.failures = step, path, dict(failures or {})


class IncompleteCheckpointError(CheckpointLoadError, NotResumableError):
    """The checkpoint step asked for is missing or incomplete (as rank 0 sees it); raised on every
    rank by :meth:`prime_ckpt.checkpointer.Checkpointer.load`. Both a :class:`CheckpointLoadError` and
    a :class:`NotResumableError` (so a ``FileNotFoundError``, what ``load`` raised before)."""


class ProgressMismatchError(PrimeCkptError):
    """The ranks disagree on a ``Progress`` field at save time (DCP keeps one copy of a replicated
    value, so the checkpoint would silently hold one rank's value); raised on every rank before
    anything is written.

    Attributes:
        step: the checkpoint step being saved.
        field: the first field that differs (``"step"``, ``"total_samples"``, ``"total_tokens"``).
        values: ``{rank: value}`` of that field on every rank.
    """

    def __init__(self, message: str, *, step: int | None = None, field: str | None = None, values: dict[int, int] | None = None) -> None:
        super().__init__(message)
        self.step, self.field, self.values = step, field, dict(values or {})


class PostCommitError(PrimeCkptError):
    """The work after a commit (save record, manifest, retention) failed for several saves in a
    row (``prime_ckpt.commit.POST_COMMIT_FAILURE_LIMIT``); raised by the next ``save()`` on every
    rank, before anything is written. The committed checkpoints themselves are whole; what stops
    is pruning (the disk would fill) and verification records."""
