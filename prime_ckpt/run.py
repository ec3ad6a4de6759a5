"""Entering a run: the output directory's lease, the run record, and setting aside what an
earlier run left.

Two guarantees every user gets from the library (DESIGN invariants 8 and 9), not from a launcher:

* **One run per output directory.** :class:`RunLease` is an exclusive lease on
  ``<output_dir>/run.lock``: a JSON record of the holder (``run_id``, ``host``, ``pid``,
  ``started_at``, ``heartbeat_at``) created only if absent (locally ``O_CREAT | O_EXCL``; on object
  storage a conditional PUT, ``If-None-Match: *``) and refreshed by a heartbeat thread. A second
  run fails at once with :class:`~prime_ckpt.errors.RunLeaseError`, one line naming the holder.
  A lease is stale, and taken over with a warning, when its holder's process is gone (same host)
  or its heartbeat is older than ``ttl_s``. A process started by the holder (a launcher's trainer)
  joins the lease by passing the same ``run_id`` (environment variable ``PRIME_CKPT_RUN_ID``).
* **An earlier run's steps are never resumed or served by mistake.** :func:`enter_run` decides the
  step the run starts from (the newest *resumable* one for ``-1``:
  :func:`prime_ckpt.layout.resolve_resume_step`) and moves every checkpoint and weights step
  newer than it (all of them on a fresh start), with the consumer acknowledgement if it points
  past it, into ``<output_dir>/superseded/<UTC time>-<run id>/`` — set aside together, never
  deleted. To resume one of them later, move its ``checkpoints/step_N`` and ``weights/step_*``
  back. ``<output_dir>/run.json`` records the live run.

:class:`prime_ckpt.checkpointer.Checkpointer` enters the run on construction (rank 0, decision
broadcast); a program that publishes weights without checkpointing calls :func:`enter_run`
itself before its first publish.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import threading
import time
import uuid
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from prime_ckpt.errors import RunLeaseError
from prime_ckpt.layout import (
    CHECKPOINTS_DIR,
    CONSUMER_ACK_FILE,
    LEASE_FILE,
    RUN_FILE,
    SUPERSEDED_DIR,
    WEIGHTS_DIR,
    RunLayout,
    parse_step,
    resolve_resume_step,
    scan_checkpoints,
    scan_weights,
)
from prime_ckpt.storage import AnyPath, atomic_write_bytes, is_remote, remote_errors, set_aside, to_path

logger = logging.getLogger(__name__)

#: A launcher passes its run id to the processes it starts, which then join its lease.
RUN_ID_ENV = "PRIME_CKPT_RUN_ID"
#: Seconds without a heartbeat after which a lease held from another host counts as abandoned.
DEFAULT_LEASE_TTL_S = 60.0


def new_run_id() -> str:
    """A fresh run id: 12 hex characters."""
    return uuid.uuid4().hex[:12]


def superseded_dir(output_dir: AnyPath | str, label: str) -> AnyPath:
    """A fresh ``<output_dir>/superseded/<UTC time>-<label>-<6 hex>`` path (not created): where
    set-aside steps go, unique even for two set-asides in one second."""
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    return to_path(output_dir) / SUPERSEDED_DIR / f"{stamp}-{label}-{uuid.uuid4().hex[:6]}"


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _age(record: dict[str, Any]) -> float:
    beat = record.get("heartbeat_at")
    return time.time() - beat if isinstance(beat, (int, float)) else float("inf")


class RunLease:
    """An exclusive lease on an output directory (``<output_dir>/run.lock``).

    Args:
        output_dir: the run's output directory (local path or fsspec URL).
        run_id: this run's id; a lease already held under the same id is joined (not owned:
            :meth:`release` leaves it to its owner).
        ttl_s: a lease whose heartbeat is older than this counts as abandoned (seconds).
        heartbeat_s: how often the holder refreshes ``heartbeat_at`` (seconds; default ttl/4).

    Raises (from :meth:`acquire`):
        RunLeaseError: another live run holds the lease (one line naming it).
    """

    def __init__(self, output_dir: AnyPath | str, run_id: str, *, ttl_s: float = DEFAULT_LEASE_TTL_S,
                 heartbeat_s: float | None = None) -> None:
        self.path = to_path(output_dir) / LEASE_FILE
        self.run_id = run_id
        self.ttl_s = ttl_s
        self.heartbeat_s = heartbeat_s if heartbeat_s is not None else max(0.5, ttl_s / 4)
        self.record: dict[str, Any] = {}
        self.owned = False
        self.held = False
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # -- file operations ------------------------------------------------------------------
    def _read(self) -> dict[str, Any] | None:
        try:
            with remote_errors(self.path):
                data = self.path.read_bytes()
        except FileNotFoundError:
            return None
        try:
            record = json.loads(data)
        except (ValueError, RecursionError):
            return {}
        return record if isinstance(record, dict) else {}

    def _create(self, record: dict[str, Any]) -> bool:
        """Create the lease file only if absent; False if it exists."""
        data = json.dumps(record, indent=2).encode()
        if is_remote(self.path):
            self.path.parent.fs.makedirs(self.path.parent.path, exist_ok=True)
            try:
                with remote_errors(self.path), self.path.fs.open(self.path.path, "xb") as f:
                    f.write(data)
            except FileExistsError:
                return False
            return True
        self.path.parent.mkdir(parents=True, exist_ok=True)
        try:
            fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            return False
        try:
            os.write(fd, data)
            os.fsync(fd)
        finally:
            os.close(fd)
        return True

    def _remove_if(self, record: dict[str, Any] | None) -> None:
        """Remove the lease file if it still holds ``record`` (a stale holder's)."""
        if self._read() != record:
            return
        try:
            if is_remote(self.path):
                self.path.fs.rm_file(self.path.path)
            else:
                os.unlink(self.path)
        except FileNotFoundError:
            pass

    def _describe(self, record: dict[str, Any]) -> str:
        age = _age(record)
        beat = f"heartbeat {age:.0f} s ago" if age != float("inf") else "no heartbeat"
        return (f"run {record.get('run_id', '?')} (pid {record.get('pid', '?')} on host {record.get('host', '?')}, "
                f"{beat})")

    def stale(self, record: dict[str, Any]) -> str | None:
        """Why the holder ``record`` is gone, or ``None`` if it may be alive."""
        if not record:
            return "the lease file is unreadable"
        if record.get("host") == socket.gethostname() and isinstance(record.get("pid"), int) and not _pid_alive(record["pid"]):
            return f"its process {record['pid']} is gone"
        if _age(record) > self.ttl_s:  # a live holder beats every ttl/4; covers a reused pid too
            return f"no heartbeat for {_age(record):.0f} s (ttl {self.ttl_s:.0f} s)"
        return None

    # -- lifecycle ------------------------------------------------------------------------
    def acquire(self) -> RunLease:
        """Take (or join) the lease; start the heartbeat when this process owns it.

        Raises:
            RunLeaseError: another live run holds it.
        """
        now = time.time()
        mine = {"run_id": self.run_id, "host": socket.gethostname(), "pid": os.getpid(),
                "started_at": now, "heartbeat_at": now}
        for _ in range(3):
            if self._create(mine):
                self.record, self.owned, self.held = mine, True, True
                self._start_heartbeat()
                return self
            current = self._read()
            if current is None:
                continue  # released in between: try again
            if current.get("run_id") == self.run_id or (
                current.get("host") == socket.gethostname() and current.get("pid") == os.getpid() and self.stale(current) is None
            ):
                # the same run (a launcher's child), or this very process (a second Checkpointer)
                self.record, self.owned, self.held = current, False, True
                return self
            why = self.stale(current)
            if why is None:
                raise RunLeaseError(
                    f"{self.path}: output directory is in use by {self._describe(current)}; stop that run, "
                    f"or choose another output directory (a lease without a heartbeat for {self.ttl_s:.0f} s is taken over)",
                    self.path, current,
                )
            logger.warning("%s: taking over the lease of %s: %s", self.path, self._describe(current), why)
            self._remove_if(current)
        raise RunLeaseError(f"{self.path}: could not take the lease (another run keeps taking it)", self.path)

    def _start_heartbeat(self) -> None:
        def beat() -> None:
            while not self._stop.wait(self.heartbeat_s):
                try:
                    current = self._read()
                    if current is not None and current.get("run_id") != self.run_id:
                        logger.error("%s: the lease was taken over by %s", self.path, self._describe(current))
                        return
                    self.record = {**self.record, "heartbeat_at": time.time()}
                    atomic_write_bytes(self.path, json.dumps(self.record, indent=2).encode())
                except Exception as e:  # keep beating through a transient storage error
                    logger.warning("%s: heartbeat failed: %s", self.path, e)

        self._thread = threading.Thread(target=beat, name="prime-ckpt-lease", daemon=True)
        self._thread.start()

    def release(self) -> None:
        """Stop the heartbeat and remove the lease file if this process owns it (a joined lease
        is left to its owner). Safe to call twice."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None
        if self.owned and self.held:
            current = self._read()
            if current is not None and current.get("run_id") == self.run_id and current.get("pid") == os.getpid():
                self._remove_if(current)
        self.held = False

    def __enter__(self) -> RunLease:
        return self.acquire()

    def __exit__(self, *exc: Any) -> None:
        self.release()


@dataclass
class RunEntry:
    """What :func:`enter_run` decided and did.

    Attributes:
        run_id: this run's id (recorded in ``run.json`` and the lease).
        start_step: the checkpoint step to load, or ``None`` for a fresh start.
        set_aside: the step directories (and files) moved aside, as paths relative to the
            output directory before the move (e.g. ``checkpoints/step_20``).
        superseded_dir: where they went (``None`` if nothing was moved).
        lease: the held lease (``None`` when entered without one).
    """

    run_id: str
    start_step: int | None
    set_aside: list[str] = field(default_factory=list)
    superseded_dir: AnyPath | None = None
    lease: RunLease | None = None


def _newer(names: Iterable[tuple[str, AnyPath]], start: int | None) -> list[tuple[str, AnyPath]]:
    """Entries named ``step_N`` or ``step_N.<ext>`` with N newer than ``start`` (all if None)."""
    out = []
    for name, path in names:
        step = parse_step(name.split(".", 1)[0])
        if step is not None and (start is None or step > start):
            out.append((name, path))
    return out


def enter_run(
    output_dir: AnyPath | str,
    resume_step: int | None = None,
    *,
    parts: tuple[str, ...] | None = None,
    async_level: int | None = None,
    run_id: str | None = None,
    also: Iterable[str] = (),
    lease: bool = True,
    lease_ttl_s: float = DEFAULT_LEASE_TTL_S,
) -> RunEntry:
    """Enter a run in ``output_dir`` (call from one process: rank 0).

    1. Take the directory's lease (:class:`RunLease`; ``lease=False`` skips it).
    2. Decide the start: :func:`prime_ckpt.layout.resolve_resume_step` (``None``: fresh; ``-1``:
       the newest resumable step, else fresh; ``N``: N, which must be resumable).
    3. Set aside, never delete, everything of ours newer than the start (all of it when fresh):
       ``checkpoints/step_N`` (foreign step directories stay), ``weights/step_N``, entries
       ``step_N`` / ``step_N.<ext>`` of each directory named in ``also`` (a caller's own per-step
       files, e.g. rollouts), and ``consumer_ack.json`` when it acknowledges a later step;
       all into one ``<output_dir>/superseded/<UTC time>-<run id>/``.
    4. Write ``<output_dir>/run.json``: the run id, start step, time, host and pid.

    Args:
        run_id: this run's id; default: ``$PRIME_CKPT_RUN_ID`` (a launcher's), else a new one.
        async_level: k of the seed's rule ``[x - k, x]`` for resumability; ``None``: each step's
            recorded one.

    Raises:
        RunLeaseError: another live run holds the directory.
        NotResumableError: an explicit ``resume_step`` is missing, incomplete, foreign or lacks
            the weights it needs.
        ValueError: ``resume_step < -1``.
    """
    layout = RunLayout(output_dir)
    run_id = run_id or os.environ.get(RUN_ID_ENV) or new_run_id()
    held = RunLease(layout.output_dir, run_id, ttl_s=lease_ttl_s).acquire() if lease else None
    try:
        start = resolve_resume_step(layout.output_dir, resume_step, parts, async_level=async_level)
        moves: list[tuple[str, AnyPath]] = []
        moves += [(f"{CHECKPOINTS_DIR}/{c.path.name}", c.path) for c in scan_checkpoints(layout.output_dir)
                  if c.foreign is None and (start is None or c.step > start)]
        moves += [(f"{WEIGHTS_DIR}/{w.path.name}", w.path) for w in scan_weights(layout.output_dir)
                  if w.foreign is None and (start is None or w.step > start)]
        for sub in also:
            d = layout.output_dir / sub
            if d.is_dir():
                moves += [(f"{sub}/{name}", p) for name, p in _newer(sorted((p.name, p) for p in d.iterdir()), start)]
        from prime_ckpt.orchestrator import read_consumer_ack

        acked = read_consumer_ack(layout.output_dir)
        if acked is not None and (start is None or acked > start):
            moves.append((CONSUMER_ACK_FILE, layout.output_dir / CONSUMER_ACK_FILE))
        entry = RunEntry(run_id=run_id, start_step=start, lease=held)
        if moves:
            where = superseded_dir(layout.output_dir, run_id)
            by_parent: dict[str, list[AnyPath]] = {}
            for rel, path in moves:
                by_parent.setdefault(rel.rsplit("/", 1)[0] if "/" in rel else "", []).append(path)
            for parent, paths in by_parent.items():
                set_aside(paths, where / parent if parent else where)
            entry.set_aside, entry.superseded_dir = [rel for rel, _ in moves], where
            logger.warning(
                "%s: %s; set aside (not deleted) into %s: %s",
                layout.output_dir,
                "fresh start" if start is None else f"resuming from checkpoint step {start}",
                where, ", ".join(rel for rel, _ in moves),
            )
        record = {"run_id": run_id, "start_step": start, "entered_at": time.time(), "host": socket.gethostname(),
                  "pid": os.getpid(), "set_aside": entry.set_aside,
                  "superseded_dir": str(entry.superseded_dir) if entry.superseded_dir else None}
        atomic_write_bytes(layout.output_dir / RUN_FILE, json.dumps(record, indent=2).encode())
        return entry
    except BaseException:
        if held is not None:
            held.release()
        raise


def read_run_record(output_dir: AnyPath | str) -> dict[str, Any] | None:
    """``<output_dir>/run.json`` (the live run: id, start step, what it set aside), or ``None``
    if absent or unreadable."""
    try:
        record = json.loads((to_path(output_dir) / RUN_FILE).read_bytes())
    except (OSError, ValueError, RecursionError):
        return None
    return record if isinstance(record, dict) else None


def lease_holder(output_dir: AnyPath | str) -> dict[str, Any] | None:
    """The record in ``<output_dir>/run.lock`` (who holds the directory), or ``None``."""
    return RunLease(output_dir, "")._read()
