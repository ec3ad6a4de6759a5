"""Rank 0's work after a save is committed: the save record (``save_info.json``), the manifest and
retention, run on one background worker in commit order, and the count of consecutive failures
that makes the next save refuse (:data:`POST_COMMIT_FAILURE_LIMIT`)."""

from __future__ import annotations

import json
import logging
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict

from prime_ckpt.layout import SAVE_INFO_FILE, TRAINER_PART, RunLayout, scan_inventory
from prime_ckpt.manifest import write_manifest
from prime_ckpt.retention import Plan, RetentionPolicy, apply_plan, plan, with_consumer_ack
from prime_ckpt.save_record import SaveRecord
from prime_ckpt.storage import atomic_write_bytes, one_line, tree_size

# the trainer's logger: what users filter on and tests capture
logger = logging.getLogger("prime_ckpt.trainer")

#: Consecutive saves whose post-commit work (save record, manifest, retention) failed before the
#: next ``save()`` raises :class:`~prime_ckpt.errors.PostCommitError`. One failure can be transient (an object-store
#: request that timed out, a file briefly held open); the next save's job retries everything, as
#: retention plans the whole directory each time. Three in a row is a persistent fault: pruning
#: has not run for three intervals, so the disk holds at most three checkpoints beyond ``keep``,
#: and the user learns of it well before it fills.
POST_COMMIT_FAILURE_LIMIT = 3


class PostCommit:
    """Rank 0's post-commit work for the committed saves of one run directory.

    Args:
        layout: the run directory.
        retention: the policy applied after each commit, or None (nothing is ever deleted).

    Jobs run on one background thread (created at the first :meth:`submit`), in commit order, so
    neither hashing nor deleting ever blocks the training loop.
    """

    def __init__(self, layout: RunLayout, retention: RetentionPolicy | None) -> None:
        self.layout = layout
        self.retention = retention
        self._worker: ThreadPoolExecutor | None = None
        #: one line per consecutive save whose post-commit work failed (reset on success)
        self.failures: list[str] = []

    def submit(self, record: SaveRecord) -> None:
        """Queue the post-commit job of the committed ``record``; returns at once."""
        if self._worker is None:
            self._worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="prime-ckpt-commit")
        self._worker.submit(self._job, record)

    def drain(self) -> None:
        """Block until every queued job is done (one FIFO worker: earlier jobs finish first)."""
        if self._worker is not None:
            self._worker.submit(lambda: None).result()

    def close(self) -> None:
        """Wait for the queued jobs and stop the worker (a later :meth:`submit` starts a new one)."""
        if self._worker is not None:
            self._worker.shutdown(wait=True)
            self._worker = None

    def refusal(self) -> str | None:
        """Why the next save must not start (one line), or None: the last
        :data:`POST_COMMIT_FAILURE_LIMIT` saves' post-commit work failed."""
        failures = list(self.failures)
        if len(failures) < POST_COMMIT_FAILURE_LIMIT:
            return None
        return (f"{self.layout.output_dir}: the work after the commit failed for the last {len(failures)} saves "
                f"(limit {POST_COMMIT_FAILURE_LIMIT}; checkpoints are whole, but retention and manifests stopped): "
                f"{failures[-1]}")

    def plan(self, current_step: int, in_flight: frozenset[int]) -> Plan:
        """Retention plan after a commit; the consumer acknowledgement on disk (what the
        inference side has loaded, :func:`prime_ckpt.orchestrator.write_consumer_ack`) pins
        every weights step at or after it, unless the policy was given one explicitly."""
        assert self.retention is not None
        policy = with_consumer_ack(self.retention, self.layout.output_dir)
        return plan(scan_inventory(self.layout.output_dir), policy, current_step=current_step, in_flight=in_flight)

    def _job(self, record: SaveRecord) -> None:
        """Write ``save_info.json`` and ``manifest.json`` for the committed step, then apply
        retention (one decider: rank 0 alone deletes on shared storage). Failures are logged and
        recorded (``record.post_commit_error``), never raised: the checkpoint itself is already
        committed (and on object storage a failure may come from the client library, not as an
        ``OSError``)."""
        step_dir = self.layout.step_dir(record.step)
        errors = []
        try:
            record.total_bytes = tree_size(self.layout.trainer_dir(record.step))
            atomic_write_bytes(step_dir / SAVE_INFO_FILE, json.dumps(asdict(record), indent=2).encode())
            # the data files hashed while written are not read back (on S3: not downloaded)
            write_manifest(step_dir, known={f"{TRAINER_PART}/{name}": v for name, v in record.file_digests.items()})
        except Exception as e:
            logger.warning("%s: could not write the save record or manifest: %s", step_dir, e)
            errors.append(f"save record/manifest: {one_line(e)}")
        if self.retention is not None:
            try:
                apply_plan(self.plan(record.step, frozenset()))
            except Exception as e:
                logger.warning("retention after step %d failed: %s", record.step, e)
                errors.append(f"retention: {one_line(e)}")
        if not errors:
            self.failures = []
            return
        record.post_commit_error = "; ".join(errors)
        self.failures.append(f"step {record.step}: {record.post_commit_error}")
        try:  # the record says what failed, where it can still be written
            atomic_write_bytes(step_dir / SAVE_INFO_FILE, json.dumps(asdict(record), indent=2).encode())
        except Exception:
            pass
