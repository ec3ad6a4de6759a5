"""The trainer's two start-of-run decisions, made by rank 0 and broadcast so that every rank gets
the same answer or the same error: entering the run (lease, start step, setting aside what is
newer; :func:`prime_ckpt.run.enter_run`) and, without entry, resolving the step to resume."""

from __future__ import annotations

from typing import Any

from prime_ckpt.errors import NotResumableError, PrimeCkptError, RunLeaseError
from prime_ckpt.layout import CheckpointNotFoundError, RunLayout, resolve_resume_step
from prime_ckpt.run import RunEntry, enter_run
from prime_ckpt.state import rank0_decision
from prime_ckpt.storage import one_line


def enter_everywhere(
    layout: RunLayout, resume_step: int, group: Any, *, parts: tuple[str, ...], async_level: int,
    run_id: str | None, also: tuple[str, ...], lease_ttl_s: float,
) -> tuple[RunEntry | None, int | None, str | None]:
    """Rank 0 enters the run (:func:`prime_ckpt.run.enter_run` with these arguments); every rank
    gets the decision (or the same error) by one broadcast on ``group`` (None: not distributed).

    Returns:
        ``(entry, start_step, run_id)``: ``entry`` (holding the lease) on rank 0, None elsewhere;
        the step the run starts from (None: fresh) and the run's id, the same on every rank.
    Raises (on every rank):
        RunLeaseError, NotResumableError, ValueError: as :func:`prime_ckpt.run.enter_run`.
        PrimeCkptError: a storage error while entering (one line).
    """
    entry: list[RunEntry | None] = [None]

    def decide() -> tuple[str, Any, str | None]:
        try:
            entry[0] = enter_run(layout.output_dir, resume_step, parts=parts, async_level=async_level,
                                 run_id=run_id, also=also, lease_ttl_s=lease_ttl_s)
            return ("ok", entry[0].start_step, entry[0].run_id)
        except RunLeaseError as e:
            return ("lease", str(e), None)
        except NotResumableError as e:
            return ("missing", str(e), None)
        except ValueError as e:
            return ("invalid", str(e), None)
        except Exception as e:  # storage errors (OSError, a backend's own types)
            return ("error", f"{layout.output_dir}: could not enter the run: {one_line(e)}", None)

    status, value, rid = rank0_decision(group, decide)
    errors = {"lease": RunLeaseError, "missing": NotResumableError, "invalid": ValueError, "error": PrimeCkptError}
    if status in errors:
        raise errors[status](value)
    return entry[0], value, rid  # entry[0] is set on rank 0 only


def resolve_everywhere(layout: RunLayout, resume_step: int, parts: tuple[str, ...], async_level: int, group: Any) -> int | None:
    """The step to load (None: fresh start), resolved on rank 0
    (:func:`prime_ckpt.layout.resolve_resume_step`: ``-1`` is the newest resumable step) and
    broadcast on ``group``, so every rank loads the same step.

    Raises (on every rank):
        CheckpointNotFoundError: an explicit step is missing, incomplete or not resumable.
        ValueError: ``resume_step < -1``.
    """
    def decide() -> tuple[str, Any]:
        try:
            return ("ok", resolve_resume_step(layout.output_dir, resume_step, parts, async_level=async_level))
        except (CheckpointNotFoundError, ValueError) as e:  # re-raised on every rank below
            return ("missing" if isinstance(e, CheckpointNotFoundError) else "invalid", str(e))

    status, value = rank0_decision(group, decide)
    if status == "missing":
        raise CheckpointNotFoundError(value)
    if status == "invalid":
        raise ValueError(value)
    return value
