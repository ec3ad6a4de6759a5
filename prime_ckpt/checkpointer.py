"""The trainer's checkpointer: the lifecycle of saves (sync, or staged then written in the
background), waiting, closing and loading, for one run directory. The pieces it calls live in
:mod:`prime_ckpt.state` (what is saved), :mod:`prime_ckpt.saving` (the checks and errors around a
DCP write), :mod:`prime_ckpt.commit` (rank 0's post-commit work), :mod:`prime_ckpt.restore`
(loading) and :mod:`prime_ckpt.run_entry` (entering the run)."""

from __future__ import annotations

import logging
import threading
import time
from datetime import timedelta
from typing import Any

import torch.distributed as dist

from prime_ckpt.commit import PostCommit
from prime_ckpt.config import CheckpointConfig
from prime_ckpt.errors import PostCommitError, StepExistsError
from prime_ckpt.gc_pause import gc_paused
from prime_ckpt.layout import TRAINER_PART, RunLayout
from prime_ckpt.lifecycle import WaitThenRelease
from prime_ckpt.restore import check_unused_rank_state, load_checkpoint
from prime_ckpt.retention import RetentionPolicy, RetentionRule
from prime_ckpt.run import DEFAULT_LEASE_TTL_S, RunEntry
from prime_ckpt.run_entry import enter_everywhere, resolve_everywhere
from prime_ckpt.save_record import SaveRecord
from prime_ckpt.saving import CheckpointSaveError, check_progress, clear_way, write_async, write_sync
from prime_ckpt.staging import ReusedBufferStager
from prime_ckpt.state import APP_KEY, TrainerState, current_rank, current_world_size, rank0_decision
from prime_ckpt.storage import AnyPath, clean_leftovers, one_line, to_path

# the trainer's logger: what users filter on and tests capture
logger = logging.getLogger("prime_ckpt.trainer")


class Checkpointer(WaitThenRelease):
    """Saves and loads a :class:`TrainerState` under ``<output_dir>/checkpoints/step_<N>/trainer``.

    Args:
        output_dir: run output directory: a local path or an fsspec URL (``s3://bucket/run``,
            ``gs://...``); see :func:`prime_ckpt.storage.to_path`.
        config: the ``--ckpt.*`` config (``interval``, ``save_async``, ``resume_step`` ...).
        timeout_s: collective timeout of the dedicated save process group (seconds; default
            ``config.timeout``); a rank that fails or hangs mid-save makes the others raise
            within this bound.
        async_level: k for retention: checkpoint step x pins weights [x - k, x].
        parts: the parts a step needs to count as complete (``("trainer", "orchestrator")`` for
            an async-RL run; a trainer-only run needs only ``"trainer"``).
        weights_interval: retention also keeps weights steps that are multiples of N.
        async_mode: ``"thread"`` (default) or ``"process"`` for ``dcp.async_save``.
        storage_options: fsspec options for a remote ``output_dir`` (``--storage.options``, e.g.
            ``{"client_kwargs": {"endpoint_url": ...}}``); None: the file system's defaults
            (environment variables, ``~/.aws`` ...). Never logged.
        enter: enter the run on construction (default): rank 0 takes the output directory's
            lease, decides the start step from ``config.resume_step`` (``-1``: the newest
            *resumable* step) and sets aside, never deletes, every checkpoint and weights step
            newer than it (all of them on a fresh start) — see :func:`prime_ckpt.run.enter_run`;
            the decision is broadcast and :meth:`resume_step` returns it. ``False``: a tool that
            only reads (or a benchmark) — no lease, nothing moved, no protection.
        run_id: the run id for the lease (default ``$PRIME_CKPT_RUN_ID``, a launcher's, whose
            lease is then joined; else a new one). Recorded in ``run.json``.
        also: the caller's own per-step directories under ``output_dir`` (entries ``step_N`` or
            ``step_N.<ext>``, e.g. ``("rollouts",)``) set aside with the run's steps on entry.
        lease_ttl_s: a lease from another host without a heartbeat for this long is taken over
            (seconds).
        retention_rules: your own :data:`prime_ckpt.retention.RetentionRule` s (keep the best
            eval step, the steps an eval job pinned ...), applied with ``config.keep``'s policy.

    Construct on every rank (collective when distributed: it creates the gloo group once and
    broadcasts rank 0's entry decision).

    Raises (on every rank, from construction):
        RunLeaseError: another live run holds the output directory (one line naming it).
        NotResumableError: an explicit ``config.resume_step`` is missing, incomplete, foreign or
            lacks the weights ``[x - async_level, x]`` it needs.
        ValueError: ``config.resume_step < -1`` or a bad ``async_mode``.
    """

    def __init__(
        self,
        output_dir: AnyPath | str,
        config: CheckpointConfig,
        *,
        timeout_s: float | None = None,
        async_level: int = 0,
        parts: tuple[str, ...] = (TRAINER_PART,),
        weights_interval: int | None = None,
        async_mode: str = "thread",
        storage_options: dict[str, Any] | None = None,
        enter: bool = True,
        run_id: str | None = None,
        also: tuple[str, ...] = (),
        lease_ttl_s: float = DEFAULT_LEASE_TTL_S,
        retention_rules: tuple[RetentionRule, ...] = (),
    ) -> None:
        if async_mode not in ("thread", "process"):
            raise ValueError(f"async_mode must be 'thread' or 'process', got {async_mode!r}")
        self.async_mode = async_mode
        self.layout = RunLayout(to_path(output_dir, storage_options))
        self.config = config
        self.parts = parts
        #: k of the seed's rule (checkpoint step x needs weights [x - k, x]); recorded in save_info.json
        self.async_level = async_level
        retention = None if config.keep is None else RetentionPolicy(
            keep=config.keep, keep_interval=config.keep_interval, async_level=async_level,
            weights_interval=weights_interval, parts=parts, rules=tuple(retention_rules),
        )
        # Rank 0's post-commit work (save record, manifest, retention) on one background thread.
        self._commit = PostCommit(self.layout, retention)
        self.records: list[SaveRecord] = []
        self._pending: SaveRecord | None = None
        self._pg = None
        self._stager: ReusedBufferStager | None = None
        self._closed = False
        self._lock = threading.Lock()
        if dist.is_available() and dist.is_initialized():
            # One dedicated gloo group for every checkpoint collective (created once): async
            # writes never share a communicator with training, and CPU-side coordination works
            # whatever backend (nccl) the default group uses.
            timeout = timedelta(seconds=timeout_s if timeout_s is not None else config.timeout)
            self._pg = dist.new_group(backend="gloo", timeout=timeout)
        if config.save_async:
            self._stager = ReusedBufferStager()
        #: the step this run started from (None: fresh), decided on entry
        self.start_step: int | None = None
        #: this run's id (``run.json``, the lease); None when not entered
        self.run_id: str | None = None
        self._entered = enter
        self._entry: RunEntry | None = None
        if enter:
            self._entry, self.start_step, self.run_id = enter_everywhere(
                self.layout, config.resume_step, self._pg, parts=parts, async_level=async_level,
                run_id=run_id, also=also, lease_ttl_s=lease_ttl_s,
            )
        if current_rank() == 0:
            for leftover in clean_leftovers(self.layout.checkpoints_dir) + clean_leftovers(self.layout.weights_dir):
                logger.warning("removed a leftover of an interrupted write or delete: %s", leftover)

    @property
    def retention(self) -> RetentionPolicy | None:
        """The retention policy applied after each committed save (None: ``--ckpt.keep`` unset,
        nothing is ever deleted, as in the seed)."""
        return self._commit.retention

    @property
    def process_group(self):
        """The dedicated gloo group of checkpoint collectives (None when not distributed).
        Async saves use it from a background thread: issue no other collective on it."""
        return self._pg

    # -- policy -----------------------------------------------------------------------------
    def should_save(self, step: int) -> bool:
        """True iff ``step`` is a positive multiple of ``--ckpt.interval``."""
        return step > 0 and step % self.config.interval == 0

    def resume_step(self, parts: tuple[str, ...] | None = None) -> int | None:
        """The step to load, or None for a fresh start: the step decided when the run was
        entered on construction (``enter=True``; ``parts`` is then ignored). Without entry it is
        resolved now (see :func:`prime_ckpt.layout.resolve_resume_step`: ``-1`` is the newest
        resumable step), on rank 0 and broadcast, so every rank loads the same step.

        Raises (on every rank; without entry only):
            CheckpointNotFoundError: an explicit step is missing, incomplete or not resumable.
            ValueError: ``resume_step < -1``.
        """
        if self._entered:
            return self.start_step
        return resolve_everywhere(self.layout, self.config.resume_step, parts or self.parts, self.async_level, self._pg)

    # -- save -------------------------------------------------------------------------------
    def save(self, step: int, state: TrainerState, *, overwrite: bool = False) -> SaveRecord:
        """Save ``state`` as checkpoint ``step`` (collective: every rank calls it).

        Sync mode returns once the checkpoint is durable. Async mode waits for the previous save,
        stages the state into CPU buffers, starts the write in the background and returns; the
        state as of this call is what gets saved (snapshot semantics).

        Returns:
            this save's :class:`~prime_ckpt.save_record.SaveRecord`: its timings, and a handle on
            its stages (``staged`` / ``durable`` / ``committed`` futures, ``poll()``,
            ``wait(timeout)``); a sync save's stages are all resolved.
        Raises:
            CheckpointSaveError: this (sync) save failed, or the previous async save failed; on
                every rank (DCP gathers write errors across ranks), naming the ranks and path.
            ProgressMismatchError: the ranks' :class:`Progress` differ (see
                :func:`prime_ckpt.saving.check_progress`); on every rank, before anything is written.
            StepExistsError: checkpoint ``step`` is already complete and ``overwrite`` is False
                (on every rank, nothing written). With ``overwrite=True`` the complete earlier
                ``trainer/`` is set aside into ``superseded/`` (never deleted) before the write,
                so a failed re-save loses nothing.
            PostCommitError: the post-commit work of the last
                :data:`~prime_ckpt.commit.POST_COMMIT_FAILURE_LIMIT` saves failed (nothing written).
            RuntimeError: after :meth:`close`.
        """
        if self._closed:
            raise RuntimeError("Checkpointer.save() after close()")
        t_call = time.perf_counter()
        self.wait()  # outside the pause: the previous upload may take a while
        wait_prev = time.perf_counter() - t_call
        with gc_paused():
            return self._save(step, state, t_call, wait_prev, overwrite)

    def _refusal(self, step: int, overwrite: bool) -> tuple[str, str] | None:
        """Rank 0: why the save of ``step`` must not start (kind, one line), or None once the
        step's directory is free."""
        try:
            if (text := self._commit.refusal()) is not None:
                return ("post_commit", text)
            refused = clear_way(self.layout, step, overwrite, self._commit.drain)
            return ("exists", refused) if refused else None
        except Exception as e:
            return ("error", one_line(e))

    def _save(self, step: int, state: TrainerState, t_call: float, wait_prev: float, overwrite: bool = False) -> SaveRecord:
        trainer_dir = self.layout.trainer_dir(step)
        check_progress(step, trainer_dir, state.progress, self._pg)
        # Rank 0 decides and broadcasts (one decider); no rank writes before DCP's planning
        # collective, which follows this one.
        verdict = rank0_decision(self._pg, lambda: self._refusal(step, overwrite))
        if verdict is not None:
            kind, text = verdict
            if kind == "exists":
                raise StepExistsError(text)
            if kind == "post_commit":
                raise PostCommitError(text)
            raise CheckpointSaveError(step, trainer_dir, {0: text})
        record = SaveRecord(step=step, mode="async" if self.config.save_async else "sync", world_size=current_world_size(),
                            async_level=self.async_level, run_id=self.run_id)
        record.wait_previous_s = wait_prev
        sd = {APP_KEY: state.state_dict()}
        if not self.config.save_async:
            try:
                write_sync(sd, trainer_dir, record, self._pg, self.config.write_threads, t_call)
            except CheckpointSaveError:
                self.records.append(record)
                raise
            self._finish(record)
            self._committed(record)
            return record
        assert self._stager is not None
        write_async(sd, trainer_dir, record, self._pg, self.config.write_threads, t_call,
                    stager=self._stager, async_mode=self.async_mode, on_durable=self._committed)
        with self._lock:
            self._pending = record
        self.records.append(record)
        return record

    def _committed(self, record: SaveRecord) -> None:
        """Called on every rank once a save is durable (for async saves from DCP's upload
        thread): rank 0 queues the post-commit job and returns at once; the record's
        ``committed`` stage is then resolved."""
        try:
            if current_rank() == 0:
                self._commit.submit(record)
        finally:
            record.stage_reached("committed")

    def _finish(self, record: SaveRecord) -> None:
        if record not in self.records:
            self.records.append(record)
        logger.info(
            "checkpoint step %d (%s): blocked %.3f s (staging %.3f s), durable after %.3f s, %d bytes/rank",
            record.step, record.mode, record.blocking_s, record.staging_s, record.total_s or 0.0, record.bytes,
        )

    def wait(self) -> SaveRecord | None:
        """Block until the in-flight async save (if any) is durable; return its record.

        Raises:
            CheckpointSaveError: the save failed (on every rank: DCP gathers write errors across
                ranks; a rank that died or hangs makes the others fail after ``timeout``).
        """
        with self._lock:
            record, self._pending = self._pending, None
        if record is None:
            return None
        try:
            record.wait()
        except CheckpointSaveError as err:
            record.error = str(err)
            raise
        self._finish(record)
        return record

    def flush(self) -> SaveRecord | None:
        """:meth:`wait`, then also wait for rank 0's post-commit work of every committed save
        (``save_info.json``, ``manifest.json``, retention). Returns what :meth:`wait` returned."""
        record = self.wait()
        self._commit.drain()
        return record

    def close(self) -> None:
        """Wait for the last save and the post-commit work, release the staging buffers and
        the lease and synchronise the ranks; raises the last save's error. Safe to call twice.
        ``with Checkpointer(...) as ckpt:`` closes on exit. The dedicated gloo group is released
        by ``torch.distributed.destroy_process_group()``."""
        super().close()

    def _release(self) -> None:
        self._commit.close()
        if self._stager is not None:
            self._stager.close()
            self._stager = None
        if self._entry is not None and self._entry.lease is not None:
            self._entry.lease.release()
        if self._pg is not None:
            # Every rank must be past its last collective on the save group before the run
            # goes on (or exits): a rank whose upload finished first would otherwise leave
            # while a peer still receives DCP's final broadcast. The group itself is torn
            # down with all the others by the caller's destroy_process_group(): destroying
            # it separately added a teardown step that occasionally aborted gloo at exit.
            dist.barrier(group=self._pg)

    # -- load -------------------------------------------------------------------------------
    def load(self, step: int, state: TrainerState, *, strict: bool = True, unused_rank_state: str = "warn") -> None:
        """Load checkpoint ``step`` into ``state`` in place (collective: every rank calls it with
        the same arguments).

        Args:
            step: the checkpoint step (``checkpoints/step_<step>/trainer``).
            state: the live state; model and optimizer are updated in place (``set_state_dict``).
            strict: True (default): the flattened model and optimizer keys of ``state``
                (``app.model.*``, ``app.optimizer.*``: DCP's own flattening, the FQNs of
                ``.metadata``) must be the saved ones, else :class:`CheckpointLoadError` before
                anything is read. False: an explicit partial load of the intersection; entries of
                ``state`` that were not saved keep their current values, saved entries ``state``
                lacks are not read, and one warning lists both. Either way an optimizer
                hyperparameter (``app.optimizer.param_groups.<g>.<name>``) saved for a param
                group the live optimizer has is loaded even if the live group lacks it (e.g.
                ``initial_lr``, set by an LR scheduler built before the save, which a scheduler
                built after the load with ``last_epoch`` needs), and one the live group has but
                the checkpoint lacks keeps its live value (debug log); neither is a mismatch.
            unused_rank_state: when the per-rank state (RNG, dataloader position) of a saved
                rank is taken by no current rank (the world size shrank; rule of
                :func:`source_rank_key`, see :func:`unused_saved_ranks`): ``"warn"`` (default:
                one warning on rank 0 naming those ranks), ``"error"`` (raise
                :class:`CheckpointLoadError` on every rank) or ``"ignore"``.

        Raises (on every rank, with the same message):
            IncompleteCheckpointError: rank 0 finds ``checkpoints/step_<step>/trainer``
                missing or incomplete (a :class:`CheckpointLoadError`, a ``NotResumableError``
                and a ``FileNotFoundError``, what this raised before).
            CheckpointLoadError: some rank could not prepare the load (``.metadata``
                unreadable, keys differ under ``strict``, unused rank state under ``"error"``
                ...): names the step, path, failing rank(s) and reason, nothing was read; or
                DCP's read failed (raised from DCP's ``CheckpointException``, naming the first
                failing rank).
            ValueError: ``unused_rank_state`` is not one of the three values (before any
                collective).

        Why the agreement (issue 15, item 12): rank 0 alone decides whether the step is
        complete and broadcasts it, and each rank's local preparation (reading ``.metadata``,
        the key check, choosing the per-rank state) ends in one ``all_gather_object`` of its
        outcome on the checkpoint group before ``dcp.load``, so a rank with a stale view of
        shared storage makes every rank raise at once instead of leaving the others blocked
        inside DCP until the group's timeout.
        """
        check_unused_rank_state(unused_rank_state)
        with gc_paused():
            load_checkpoint(self.layout.trainer_dir(step), step, state, self._pg, strict=strict,
                            unused_rank_state=unused_rank_state)
