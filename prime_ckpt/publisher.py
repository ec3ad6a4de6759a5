"""Per-step weights publishing: ``weights/step_<N>/`` as a Hugging Face model directory.

In async RL the trainer hands new weights to the inference side every step, so this is the hot
path. :class:`WeightsPublisher` makes a publish cost the training loop only the staging copy:

1. **stage** (the caller's thread, the only part the loop pays for): every rank copies its local
   shards into CPU buffers reused across steps (:class:`prime_ckpt.staging.ReusedBufferStager`,
   cast to the export dtype on the way). A replicated tensor is staged by its owner only.
2. **redistribute** (background thread, a dedicated gloo process group): every tensor has one
   owner rank; the other ranks send it their slices (:mod:`prime_ckpt.redistribute`).
3. **write**: each owner streams its own ``model-0000i-of-0000n.safetensors``, fsyncs it, and
   hashes it while writing (:mod:`prime_ckpt.hf_writer` is the format).
4. **commit**: the ranks exchange their outcome (one ``all_gather_object``). If every rank
   succeeded, rank 0 writes ``model.safetensors.index.json``, ``config.json`` (the model's own
   Hugging Face config when it has one), ``generation_config.json``, the tokenizer files,
   ``manifest.json`` (from the hashes the owners computed, no second read), fsyncs the
   directory and writes ``COMPLETE`` last. Rank 0's outcome is broadcast, so a failure anywhere
   raises :class:`WeightsPublishError` on every rank, naming the step and ranks.

A directory without ``COMPLETE`` is never complete (``prime_ckpt.layout.weights_complete``):
a crash or a failure at any instant leaves the step absent or visibly incomplete. A publish
waits for the previous one (the staging buffers are reused). The synchronous mode runs the same
steps on the caller's thread and gives the same files.

Sharded parameters must be DTensors on a one-dimensional mesh (FSDP2's ``fully_shard``), placed
``Shard(d)`` (any ``d``) or ``Replicate()``; plain tensors are treated as replicated.
"""

from __future__ import annotations

import logging
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.tensor import DTensor

from prime_ckpt.errors import PrimeCkptError, StepExistsError
from prime_ckpt.hf_writer import (
    EXPORT_DTYPES,
    SAFETENSORS_DTYPES,
    TensorSpec,
    commit_weights_dir,
    hf_files,
    published_tensors,
    safetensors_header,
)
from prime_ckpt.layout import WEIGHTS_DIR, WEIGHTS_MARKER, RunLayout, foreign_reason, weights_complete
from prime_ckpt.lifecycle import StageTimings, WaitThenRelease
from prime_ckpt.redistribute import ShardWriter, assign_owners, chunk_bounds, dist_rank, dist_world_size, tensor_specs
from prime_ckpt.run import superseded_dir
from prime_ckpt.staging import ReusedBufferStager
from prime_ckpt.storage import AnyPath, is_remote, one_line, refresh, remove_tree, set_aside

logger = logging.getLogger(__name__)


class WeightsPublishError(PrimeCkptError, RuntimeError):
    """A weights publish failed; raised on every rank.

    Attributes:
        step: the weights step.
        path: ``weights/step_<step>``.
        failures: ``{rank: "ExceptionType: message"}`` for every rank that failed.
    """

    def __init__(self, step: int, path: AnyPath, failures: dict[int, str]) -> None:
        self.step, self.path, self.failures = step, path, failures
        detail = "; ".join(f"rank {r}: {msg}" for r, msg in sorted(failures.items()))
        super().__init__(f"{path}: publishing weights step {step} failed ({detail}); no {WEIGHTS_MARKER} was written")


@dataclass
class PublishRecord(StageTimings):
    """Timings and sizes of one publish, on this rank.

    Attributes:
        step: weights step.
        mode: ``"async"`` or ``"sync"``.
        wait_previous_s: seconds waiting for the previous publish first (s).
        staging_s: seconds copying local shards into the staging buffers (s).
        blocking_s: seconds ``publish()`` held the caller in total (s).
        ready_s: seconds from the ``publish()`` call until ``COMPLETE`` was written (s; set
            when done, on every rank).
        staged_bytes: bytes this rank staged (its local shards, in the export dtype).
        file_bytes: bytes of the safetensors file this rank wrote (0 if it owns no tensor).
        world_size: ranks that took part.
        error: the error text if the publish failed.
    """

    ready_s: float | None = None
    staged_bytes: int = 0
    file_bytes: int = 0
    world_size: int = 1
    error: str | None = None


class WeightsPublisher(WaitThenRelease):
    """Publishes a model's weights as ``<output_dir>/weights/step_<N>/`` every step.

    Collective: every rank constructs it and calls :meth:`publish` with the same step.

    Args:
        output_dir: run output directory, local path or fsspec URL (``s3://bucket/run``).
        save_async: True: :meth:`publish` returns once the local shards are staged and the rest
            runs on a background thread; False: it returns once ``COMPLETE`` is written (same
            files).
        dtype: export dtype of floating-point tensors: ``torch.float32``, ``torch.bfloat16`` or
            ``torch.float16`` (or their names, ``"bfloat16"`` ...), e.g. bf16 from fp32 master
            weights; None keeps the parameters' dtypes. Anything else raises ``ValueError``.
        config: JSON-serialisable ``config.json`` for a model that is not a ``transformers``
            model; None takes ``model.config`` (Hugging Face) when there is one.
        tokenizer: a ``transformers`` tokenizer whose ``save_pretrained`` files go into every
            step directory (what an inference server needs beside the weights), or None.
        timeout_s: collective timeout of the publisher's gloo process group (seconds): a rank
            that dies or hangs mid-publish makes the others fail after it.

    Raises (from :meth:`publish`, :meth:`wait`, :meth:`close`): :class:`WeightsPublishError`
    on every rank when any rank's publish failed.
    """

    def __init__(
        self,
        output_dir: AnyPath | str,
        *,
        save_async: bool = True,
        dtype: torch.dtype | str | None = None,
        config: dict[str, Any] | None = None,
        tokenizer: Any = None,
        timeout_s: float = 300.0,
    ) -> None:
        self.layout = RunLayout(output_dir)
        self.save_async = save_async
        if isinstance(dtype, str):
            if dtype not in EXPORT_DTYPES:
                raise ValueError(f"weights dtype {dtype!r}: expected one of {', '.join(EXPORT_DTYPES)}")
            dtype = EXPORT_DTYPES[dtype]
        elif dtype is not None and dtype not in EXPORT_DTYPES.values():
            raise ValueError(f"weights dtype {dtype}: expected one of {', '.join(EXPORT_DTYPES)} (a float dtype inference engines load)")
        self.dtype: torch.dtype | None = dtype
        self._config, self._tokenizer = config, tokenizer
        self._files: dict[str, bytes] | None = None
        self._specs: list[TensorSpec] | None = None
        self._specs_key: tuple | None = None
        self._stager = ReusedBufferStager(dtype=dtype)
        self.records: list[PublishRecord] = []
        self._pending: Future | None = None
        self._pending_record: PublishRecord | None = None
        self._executor: ThreadPoolExecutor | None = None
        self._closed = False
        self._lock = threading.Lock()
        self._pg = None
        if dist.is_available() and dist.is_initialized():
            # Its own gloo group: never shares a communicator with training or with the
            # Checkpointer's background saves (two threads on one group deadlock).
            self._pg = dist.new_group(backend="gloo", timeout=timedelta(seconds=timeout_s))
        self._shards = ShardWriter(self._pg)

    @property
    def process_group(self):
        """The publisher's dedicated gloo group (None when not distributed)."""
        return self._pg

    # -- plan ---------------------------------------------------------------------------------
    def _plan(self, tensors: list[tuple[str, torch.Tensor]]) -> list[TensorSpec]:
        key = tuple((n, tuple(t.shape), t.dtype) for n, t in tensors)
        if self._specs is not None and key == self._specs_key:
            return self._specs
        specs = tensor_specs(tensors, self.dtype)
        self._specs, self._specs_key = specs, key
        return specs

    # -- publish ------------------------------------------------------------------------------
    def publish(self, step: int, model: nn.Module) -> PublishRecord:
        """Publish ``model``'s weights as ``weights/step_<step>`` (collective).

        Waits for the previous publish, stages this rank's shards (the model as of this call is
        what gets published: snapshot semantics) and returns; async mode writes in the
        background, sync mode before returning.

        Raises:
            WeightsPublishError: the previous (async) or this (sync) publish failed, on every rank.
            RuntimeError: after :meth:`close`.
            ValueError: ``step`` is not an int >= 0.
        """
        if self._closed:
            raise RuntimeError("WeightsPublisher.publish() after close()")
        if isinstance(step, bool) or not isinstance(step, int) or step < 0:
            raise ValueError(f"WeightsPublisher.publish(): step must be an int >= 0, got {step!r}")
        t_call = time.perf_counter()
        self.wait()
        record = PublishRecord(step=step, mode="async" if self.save_async else "sync", world_size=dist_world_size())
        record.wait_previous_s = time.perf_counter() - t_call
        if self._files is None:
            self._files = hf_files(model, self.dtype, self._config, self._tokenizer) if dist_rank() == 0 else {}
        tensors = published_tensors(model)
        specs = self._plan(tensors)
        rank = dist_rank()
        local: dict[str, torch.Tensor] = {}
        for spec, (_, t) in zip(specs, tensors):
            if spec.shard_dim is not None or spec.owner == rank:
                local[spec.name] = t._local_tensor if isinstance(t, DTensor) else t
        staged = self._stager.stage(local)
        record.staging_s = self._stager.last_staging_s
        record.staged_bytes = self._stager.last_staged_bytes
        record.blocking_s = time.perf_counter() - t_call
        self.records.append(record)
        if not self.save_async:
            self._job(step, specs, staged, record, t_call)
            self._raise_if_failed(record)
            record.blocking_s = time.perf_counter() - t_call
            return record
        if self._executor is None:
            self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="prime-ckpt-publish")
        future = self._executor.submit(self._job, step, specs, staged, record, t_call)
        with self._lock:
            self._pending, self._pending_record = future, record
        return record

    @property
    def held_bytes(self) -> int:
        """Bytes of CPU memory this rank's publisher holds between publishes: its staging
        buffers plus the two scratch buffers it assembles owned tensors in (bytes)."""
        return self._stager.buffer_bytes + sum(t.numel() for t in self._shards.scratch)

    def wait(self) -> PublishRecord | None:
        """Block until the in-flight publish (if any) is complete; return its record.

        Raises:
            WeightsPublishError: it failed (on every rank).
        """
        with self._lock:
            pending, record = self._pending, self._pending_record
            self._pending = self._pending_record = None
        if pending is None:
            return None
        pending.result()  # the job records its errors; it raises only on a bug
        assert record is not None
        self._raise_if_failed(record)
        return record

    def close(self) -> None:
        """Wait for the last publish and release the staging buffers and the background
        thread; raises the last publish's error. Safe to call twice; ``with WeightsPublisher(...)
        as pub:`` closes on exit. The process group is released with the others by
        ``destroy_process_group()``."""
        super().close()

    def _release(self) -> None:
        if self._executor is not None:
            self._executor.shutdown(wait=True)
            self._executor = None
        self._stager.close()
        self._shards.release()

    def _raise_if_failed(self, record: PublishRecord) -> None:
        failures = getattr(record, "_failures", None)
        if failures:
            raise WeightsPublishError(record.step, self.layout.weights_step_dir(record.step), failures)

    # -- background job -----------------------------------------------------------------------
    def _job(self, step: int, specs: list[TensorSpec], staged: dict[str, torch.Tensor], record: PublishRecord, t_call: float) -> None:
        """Prepare, redistribute + write, commit; records failures in ``record`` (all ranks
        agree on them) instead of raising."""
        step_dir = self.layout.weights_step_dir(step)
        rank, world = dist_rank(), dist_world_size()
        failures: dict[int, str] = {}
        try:
            # 1. rank 0 clears the way, then everyone writes. A directory of this step that is
            #    complete (a repeated publish) is set aside, never deleted; an incomplete one of ours
            #    (a crashed attempt) is removed; one that is not ours fails the publish. Its outcome
            #    is broadcast: nobody writes into a dir it failed to clear.
            prep: list[Any] = [None]
            if rank == 0:
                try:
                    self._clear_way(step, step_dir)
                    if not is_remote(step_dir):
                        step_dir.mkdir(parents=True, exist_ok=True)
                except Exception as e:
                    prep[0] = one_line(e)
            self._broadcast(prep)
            if prep[0] is not None:
                failures = {0: prep[0]}
                return
            # 2. redistribute and write this rank's file.
            entry: dict[str, Any] | None = None
            error: str | None = None
            try:
                entry = self._shards.write_own_shard(step_dir, specs, staged)
            except Exception as e:
                error = one_line(e)
                logger.error("%s: rank %d could not write its weights shard: %s", step_dir, rank, error)
            outcomes: list[Any] = [None] * world
            if self._pg is not None:
                dist.all_gather_object(outcomes, (error, entry), group=self._pg)
            else:
                outcomes = [(error, entry)]
            failures = {r: err for r, (err, _) in enumerate(outcomes) if err is not None}
            if entry is not None:
                record.file_bytes = entry["size"]
            # 3. commit on rank 0, its outcome to everyone.
            done: list[Any] = [None]
            if rank == 0 and not failures:
                try:
                    assert self._files is not None
                    commit_weights_dir(step_dir, specs, [e for _, e in outcomes if e is not None], self._files)
                except Exception as e:
                    done[0] = one_line(e)
            if not failures:
                self._broadcast(done)
                if done[0] is not None:
                    failures = {0: done[0]}
        except Exception as e:  # a collective failed: a peer died or timed out
            failures = {**failures, rank: one_line(e)}
        finally:
            if failures:
                record.error = "; ".join(f"rank {r}: {m}" for r, m in sorted(failures.items()))
                record._failures = failures  # type: ignore[attr-defined]
            else:
                record.ready_s = time.perf_counter() - t_call

    def _clear_way(self, step: int, step_dir: AnyPath) -> None:
        """Rank 0: make ``weights/step_<step>`` free for this publish (see :meth:`_job`)."""
        # this step's directory only: a scan of every weights step per publish would grow with the run
        refresh(step_dir)
        if not step_dir.is_dir():
            return
        if (why := foreign_reason("weights", [p.name for p in step_dir.iterdir()])) is not None:
            raise StepExistsError(f"{step_dir}: not this project's weights directory ({why}); refusing to replace it")
        if weights_complete(step_dir):
            where = superseded_dir(self.layout.output_dir, f"republish-step_{step}") / WEIGHTS_DIR
            set_aside([step_dir], where)
            logger.warning("%s was already published (complete); set the earlier one aside into %s", step_dir, where)
        elif remove_tree(step_dir):
            logger.warning("%s: removed an unfinished earlier publish of this step", step_dir)

    def _broadcast(self, box: list[Any]) -> None:
        if self._pg is not None:
            dist.broadcast_object_list(box, src=0, group=self._pg)


__all__ = [  # the old import paths: re-exported names
    "EXPORT_DTYPES", "SAFETENSORS_DTYPES", "PublishRecord", "TensorSpec", "WeightsPublishError",
    "WeightsPublisher", "assign_owners", "chunk_bounds", "safetensors_header",
]
