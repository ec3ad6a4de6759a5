"""Per-step weights publishing: ``weights/step_<N>/`` as a Hugging Face model directory.

In async RL the trainer hands new weights to the inference side every step, so this is the hot
path. :class:`WeightsPublisher` makes a publish cost the training loop only the staging copy:

1. **stage** (the caller's thread, the only part the loop pays for): every rank copies its local
   shards into CPU buffers reused across steps (:class:`prime_ckpt.staging.ReusedBufferStager`,
   cast to the export dtype on the way). A replicated tensor is staged by its owner only.
2. **redistribute** (background thread, a dedicated gloo process group): every tensor has one
   owner rank (:func:`assign_owners`, balanced by bytes); the other ranks send it their slice
   point-to-point, and the owner assembles one tensor at a time in a scratch buffer (two, used
   in turn: the next tensor's transfer overlaps this one's write). No rank ever holds the model:
   peak extra memory is its staged shards plus twice its largest tensor.
3. **write**: each owner streams its own ``model-0000i-of-0000n.safetensors`` (header first, then
   tensor bytes in file order), fsyncs it, and hashes it while writing.
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

The safetensors files are written here rather than with ``safetensors.torch.save_file``: that
needs every tensor of a file in memory at once (here: one at a time, as it arrives) and creates
files with mode 0600, which an inference server running as another user cannot read. The format
(8-byte little-endian header length, JSON header, raw little-endian tensor bytes) is checked
against ``safetensors`` and ``transformers.AutoModelForCausalLM.from_pretrained`` in the tests.

Sharded parameters must be DTensors on a one-dimensional mesh (FSDP2's ``fully_shard``), placed
``Shard(d)`` (any ``d``) or ``Replicate()``; plain tensors are treated as replicated.
"""

from __future__ import annotations

import json
import logging
import struct
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, BinaryIO

import torch
import torch.distributed as dist
import xxhash
from torch import nn
from torch.distributed.tensor import DTensor, Replicate, Shard

from prime_ckpt.errors import PrimeCkptError, StepExistsError
from prime_ckpt.layout import (
    CONFIG_FILE,
    GENERATION_CONFIG_FILE,
    MANIFEST_FILE,
    SAFETENSORS_INDEX_FILE,
    WEIGHTS_DIR,
    WEIGHTS_MARKER,
    RunLayout,
    foreign_reason,
    shard_file_name,
    weights_complete,
)
from prime_ckpt.manifest import ALGORITHM, build_manifest
from prime_ckpt.run import superseded_dir
from prime_ckpt.staging import ReusedBufferStager
from prime_ckpt.storage import (
    AnyPath,
    atomic_write_bytes,
    atomic_write_streamed,
    fsync_dir,
    is_remote,
    one_line,
    refresh,
    remove_tree,
    set_aside,
)

logger = logging.getLogger(__name__)

#: torch dtype -> safetensors dtype name (the format's spelling).
SAFETENSORS_DTYPES: dict[torch.dtype, str] = {
    torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
    torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
    torch.bool: "BOOL", torch.float8_e4m3fn: "F8_E4M3", torch.float8_e5m2: "F8_E5M2",
}

#: ``--weights.dtype`` spellings -> torch dtypes.
EXPORT_DTYPES: dict[str, torch.dtype] = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}

# Wrapper tokens that torch.compile / activation checkpointing put into parameter names; the
# published names are the model's own (Hugging Face) names.
_WRAPPER_TOKENS = ("_orig_mod.", "_checkpoint_wrapped_module.", "_fsdp_wrapped_module.")


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
class PublishRecord:
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

    step: int
    mode: str
    wait_previous_s: float = 0.0
    staging_s: float = 0.0
    blocking_s: float = 0.0
    ready_s: float | None = None
    staged_bytes: int = 0
    file_bytes: int = 0
    world_size: int = 1
    error: str | None = None


@dataclass(frozen=True)
class TensorSpec:
    """One published tensor: its name, global shape, export dtype and where its data lives.

    ``shard_dim`` is the dimension split across ``mesh_ranks`` (global ranks, in mesh order;
    torch.chunk sizes, as DTensor's ``Shard``), or ``None`` for a replicated tensor (every rank
    holds all of it; only the owner reads it).
    """

    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype
    owner: int
    shard_dim: int | None = None
    mesh_ranks: tuple[int, ...] = ()

    @property
    def nbytes(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n * _itemsize(self.dtype)


def _itemsize(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


def chunk_bounds(size: int, parts: int, index: int) -> tuple[int, int]:
    """``[start, stop)`` of chunk ``index`` when ``size`` rows are split into ``parts`` chunks
    the way ``torch.chunk`` (and so DTensor's ``Shard`` and FSDP2) splits them: chunks of
    ``ceil(size / parts)``, the last ones shorter or empty."""
    chunk = -(-size // parts) if parts else 0
    start = min(index * chunk, size)
    return start, min(start + chunk, size)


def assign_owners(nbytes: list[int], world_size: int) -> list[int]:
    """Owner rank of each tensor, balancing bytes across ranks (pure, deterministic).

    Largest tensors first, each to the rank with the fewest bytes so far (ties: lowest rank);
    equal sizes keep their order. Args: ``nbytes`` per tensor (bytes), ``world_size`` (ranks).
    Returns one owner per tensor, in the input order.
    """
    load = [0] * world_size
    owners = [0] * len(nbytes)
    for i in sorted(range(len(nbytes)), key=lambda i: (-nbytes[i], i)):
        r = min(range(world_size), key=lambda r: (load[r], r))
        owners[i] = r
        load[r] += nbytes[i]
    return owners


def safetensors_header(specs: list[TensorSpec], metadata: dict[str, str] | None = None) -> bytes:
    """The 8-byte length plus JSON header of a safetensors file holding ``specs`` in order
    (data offsets back to back), padded with spaces to a multiple of 8 bytes as the
    ``safetensors`` library does."""
    header: dict[str, Any] = {"__metadata__": metadata or {"format": "pt"}}
    offset = 0
    for s in specs:
        if s.dtype not in SAFETENSORS_DTYPES:
            raise TypeError(f"{s.name}: dtype {s.dtype} has no safetensors spelling")
        header[s.name] = {"dtype": SAFETENSORS_DTYPES[s.dtype], "shape": list(s.shape), "data_offsets": [offset, offset + s.nbytes]}
        offset += s.nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-(8 + len(raw)) % 8)
    return struct.pack("<Q", len(raw)) + raw


def _rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def _world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def _clean_name(name: str) -> str:
    for token in _WRAPPER_TOKENS:
        name = name.replace(token, "")
    return name


def _model_class_name(model: nn.Module) -> str:
    """The model's own class name (FSDP2's ``fully_shard`` swaps in a subclass ``FSDP<Name>``)."""
    for cls in type(model).__mro__:
        if not cls.__name__.startswith("FSDP") and issubclass(cls, nn.Module):
            return cls.__name__
    return type(model).__name__


def hf_files(model: nn.Module, dtype: torch.dtype | None, config: dict[str, Any] | None, tokenizer: Any) -> dict[str, bytes]:
    """The small files of a weights directory, as bytes, computed once per publisher.

    ``config.json``: ``config`` if given, else the model's Hugging Face config (``model.config``
    with ``architectures`` and ``dtype`` set as ``save_pretrained`` sets them), else ``{}``.
    ``generation_config.json`` when the model has a generation config; the files
    ``tokenizer.save_pretrained`` writes when a tokenizer is given.
    """
    import copy
    import os
    import tempfile

    files: dict[str, bytes] = {}
    hf_config = getattr(model, "config", None)
    if config is not None:
        files[CONFIG_FILE] = json.dumps(config, indent=2, sort_keys=True).encode()
    elif hf_config is not None and hasattr(hf_config, "to_json_string"):
        cfg = copy.deepcopy(hf_config)
        cfg.architectures = [_model_class_name(model)]
        if dtype is not None or getattr(cfg, "dtype", None) is None:
            params = [p for p in model.parameters() if p.is_floating_point()]
            export = dtype or (params[0].dtype if params else torch.float32)
            cfg.dtype = export
        files[CONFIG_FILE] = cfg.to_json_string(use_diff=False).encode()
        gen = getattr(model, "generation_config", None)
        if gen is not None and hasattr(gen, "to_json_string"):
            files[GENERATION_CONFIG_FILE] = gen.to_json_string(use_diff=True).encode()
    else:
        files[CONFIG_FILE] = b"{}"
    if tokenizer is not None:
        with tempfile.TemporaryDirectory() as tmp:
            tokenizer.save_pretrained(tmp)
            for root, _, names in os.walk(tmp):
                for n in names:
                    rel = os.path.relpath(os.path.join(root, n), tmp)
                    with open(os.path.join(tmp, rel), "rb") as f:
                        files[rel] = f.read()
    return files


class WeightsPublisher:
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
        self._scratch = [torch.empty(0, dtype=torch.uint8), torch.empty(0, dtype=torch.uint8)]
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

    @property
    def process_group(self):
        """The publisher's dedicated gloo group (None when not distributed)."""
        return self._pg

    # -- plan ---------------------------------------------------------------------------------
    def _tensors(self, model: nn.Module) -> list[tuple[str, torch.Tensor]]:
        """``(published name, live tensor)`` in state-dict order; tied weights once (first name)."""
        seen: set[int] = set()
        out = []
        for name, value in model.state_dict(keep_vars=True).items():
            if id(value) in seen:
                continue
            seen.add(id(value))
            out.append((_clean_name(name), value))
        return out

    def _plan(self, tensors: list[tuple[str, torch.Tensor]]) -> list[TensorSpec]:
        key = tuple((n, tuple(t.shape), t.dtype) for n, t in tensors)
        if self._specs is not None and key == self._specs_key:
            return self._specs
        specs = []
        for name, t in tensors:
            dtype = self.dtype if self.dtype is not None and t.is_floating_point() else t.dtype
            shard_dim, mesh_ranks = None, ()
            if isinstance(t, DTensor):
                mesh = t.device_mesh
                if mesh.ndim != 1:
                    raise NotImplementedError(f"{name}: DTensor on a {mesh.ndim}-D device mesh; publishing supports 1-D meshes (FSDP2)")
                placement = t.placements[0]
                if isinstance(placement, Shard):
                    shard_dim = placement.dim % max(t.ndim, 1)
                    mesh_ranks = tuple(int(r) for r in mesh.mesh.tolist())
                elif not isinstance(placement, Replicate):
                    raise NotImplementedError(f"{name}: placement {placement} is not supported (Shard or Replicate)")
            specs.append(TensorSpec(name, tuple(t.shape), dtype, owner=0, shard_dim=shard_dim, mesh_ranks=mesh_ranks))
        owners = assign_owners([s.nbytes for s in specs], _world_size())
        specs = [TensorSpec(s.name, s.shape, s.dtype, o, s.shard_dim, s.mesh_ranks) for s, o in zip(specs, owners)]
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
        record = PublishRecord(step=step, mode="async" if self.save_async else "sync", world_size=_world_size())
        record.wait_previous_s = time.perf_counter() - t_call
        if self._files is None:
            self._files = hf_files(model, self.dtype, self._config, self._tokenizer) if _rank() == 0 else {}
        tensors = self._tensors(model)
        specs = self._plan(tensors)
        rank = _rank()
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
        thread; raises the last publish's error. Safe to call twice. The process group is
        released with the others by ``destroy_process_group()``."""
        if self._closed:
            return
        self._closed = True
        try:
            self.wait()
        finally:
            if self._executor is not None:
                self._executor.shutdown(wait=True)
                self._executor = None
            self._stager.close()
            self._scratch = [torch.empty(0, dtype=torch.uint8), torch.empty(0, dtype=torch.uint8)]

    def __enter__(self) -> WeightsPublisher:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def _raise_if_failed(self, record: PublishRecord) -> None:
        failures = getattr(record, "_failures", None)
        if failures:
            raise WeightsPublishError(record.step, self.layout.weights_step_dir(record.step), failures)

    # -- background job -----------------------------------------------------------------------
    def _job(self, step: int, specs: list[TensorSpec], staged: dict[str, torch.Tensor], record: PublishRecord, t_call: float) -> None:
        """Prepare, redistribute + write, commit; records failures in ``record`` (all ranks
        agree on them) instead of raising."""
        step_dir = self.layout.weights_step_dir(step)
        rank, world = _rank(), _world_size()
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
                entry = self._write_own_shard(step_dir, specs, staged)
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
                    self._commit(step_dir, specs, [e for _, e in outcomes if e is not None])
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

    def _write_own_shard(self, step_dir: AnyPath, specs: list[TensorSpec], staged: dict[str, torch.Tensor]) -> dict[str, Any] | None:
        """Send this rank's slices of other ranks' tensors; receive, assemble and write its own.
        Returns its manifest entry ``{"path", "size", "xxh3_64", "tensors"}``, or None if it owns
        nothing. A write error is raised only after every receive completed (peers never hang).

        Receives run one tensor ahead of the write (two scratch buffers, used in turn): the
        transfer of tensor k+1 overlaps the write of tensor k."""
        rank = _rank()
        owners = sorted({s.owner for s in specs})
        sends = []
        for i, s in enumerate(specs):
            if s.owner != rank and s.shard_dim is not None and rank in s.mesh_ranks:
                buf = staged[s.name]
                if buf.numel():
                    sends.append(dist.isend(buf.contiguous(), dst=s.owner, group=self._pg, tag=i))
        mine = [(i, s) for i, s in enumerate(specs) if s.owner == rank]
        done = 0  # tensors of `mine` whose receives completed
        pending: tuple[int, Any] | None = None  # (k, posted receives of mine[k])
        entry = None
        try:
            if mine:
                name = shard_file_name(owners.index(rank) + 1, len(owners))
                hasher = xxhash.xxh3_64()
                size = [0]

                def write(f: BinaryIO) -> None:
                    nonlocal done, pending

                    def put(data: memoryview | bytes) -> None:
                        f.write(data)
                        hasher.update(data)
                        size[0] += len(data)

                    put(safetensors_header([s for _, s in mine]))
                    pending = (0, self._post(*mine[0], staged, slot=0))
                    for k in range(len(mine)):
                        current = pending
                        pending = (k + 1, self._post(*mine[k + 1], staged, slot=(k + 1) % 2)) if k + 1 < len(mine) else None
                        data = self._finish(current[1])
                        done = k + 1
                        put(data)

                atomic_write_streamed(step_dir / name, write)
                entry = {"path": name, "size": size[0], ALGORITHM: hasher.hexdigest(), "tensors": [s.name for _, s in mine]}
        finally:
            # On a write error, still take every slice the peers send (else they hang in wait()).
            rest = done
            if pending is not None and pending[0] >= done:
                self._finish(pending[1])
                rest = pending[0] + 1
            for i, s in mine[rest:]:
                self._finish(self._post(i, s, staged, slot=0))
            for w in sends:
                w.wait()
        return entry

    def _post(self, index: int, spec: TensorSpec, staged: dict[str, torch.Tensor], slot: int) -> tuple:
        """Start assembling one whole tensor this rank owns in scratch buffer ``slot``: copy its
        own slice, post the receives of the other mesh ranks' slices. Replicated: its staged copy."""
        if spec.shard_dim is None:
            return staged[spec.name], []
        nbytes = spec.nbytes
        if self._scratch[slot].numel() < nbytes:
            self._scratch[slot] = torch.empty(nbytes, dtype=torch.uint8)
        full = self._scratch[slot][:nbytes].view(spec.dtype).view(spec.shape) if nbytes else torch.empty(spec.shape, dtype=spec.dtype)
        rank, d = _rank(), spec.shard_dim
        n = len(spec.mesh_ranks)
        recvs = []
        for j, src in enumerate(spec.mesh_ranks):
            start, stop = chunk_bounds(spec.shape[d], n, j)
            if stop <= start:
                continue
            part = full.narrow(d, start, stop - start)
            if src == rank:
                part.copy_(staged[spec.name])
            elif part.is_contiguous():
                recvs.append((None, dist.irecv(part, src=src, group=self._pg, tag=index)))
            else:
                tmp = torch.empty(part.shape, dtype=spec.dtype)
                recvs.append(((part, tmp), dist.irecv(tmp, src=src, group=self._pg, tag=index)))
        return full, recvs

    def _finish(self, posted: tuple) -> memoryview:
        """Wait for a posted tensor's receives; its bytes (valid until its slot is reused)."""
        full, recvs = posted
        for pair, work in recvs:
            work.wait()
            if pair is not None:
                pair[0].copy_(pair[1])
        return _bytes_of(full)

    def _commit(self, step_dir: AnyPath, specs: list[TensorSpec], entries: list[dict[str, Any]]) -> None:
        """Rank 0, after every shard is durable: index, configs, tokenizer, manifest, then
        ``COMPLETE``."""
        assert self._files is not None
        weight_map = {name: e["path"] for e in sorted(entries, key=lambda e: e["path"]) for name in e["tensors"]}
        index = {"metadata": {"total_size": sum(s.nbytes for s in specs)}, "weight_map": dict(sorted(weight_map.items()))}
        small = {SAFETENSORS_INDEX_FILE: json.dumps(index, indent=2).encode() + b"\n", **self._files}
        manifest_files = [{k: v for k, v in e.items() if k != "tensors"} for e in entries]
        for rel, data in small.items():
            atomic_write_bytes(step_dir / rel, data)
            manifest_files.append({"path": rel, "size": len(data), ALGORITHM: xxhash.xxh3_64_hexdigest(data)})
        manifest = build_manifest("weights", step_dir, sorted(manifest_files, key=lambda e: e["path"]))
        atomic_write_bytes(step_dir / MANIFEST_FILE, manifest)
        fsync_dir(step_dir)
        atomic_write_bytes(step_dir / WEIGHTS_MARKER, b"")


def _bytes_of(t: torch.Tensor) -> memoryview:
    """A zero-copy byte view of a contiguous CPU tensor (any dtype, bf16 included)."""
    flat = t.reshape(-1)
    if not flat.numel():
        return memoryview(b"")
    return memoryview(flat.view(torch.uint8).numpy()).cast("B")


__all__ = [
    "EXPORT_DTYPES",
    "PublishRecord",
    "TensorSpec",
    "WeightsPublishError",
    "WeightsPublisher",
    "assign_owners",
    "chunk_bounds",
    "safetensors_header",
]
