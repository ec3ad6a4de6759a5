"""Family ``weights``: publishing per-step ``weights/step_<N>/``, side by side.

For each size (bytes of fp32 model parameters, total over ranks; an FSDP2 MLP of
``Linear(1024, 1024)`` layers, no optimizer) and world size, one launch measures, interleaved
with the worker's ``run_cases`` (every repetition runs every case once, in a rotating order,
after one warm-up repetition):

* ``weights_gather``: :func:`prime_ckpt.weights.save_weights`, today's gather of the full model
  onto rank 0 (``get_model_state_dict(full_state_dict=True, cpu_offload=True)``) and one
  ``model.safetensors`` written there, synchronously: the approach most RL trainers use;
* ``weights_sync`` / ``weights_async``: :class:`prime_ckpt.publisher.WeightsPublisher` with
  ``save_async`` False / True (sharded: each rank writes one ``model-0000i-of-0000n.safetensors``);
* ``weights_raw_write``: every rank writes its share of the bytes (parameter bytes / world size)
  into a file of its own and fsyncs it, in parallel: the storage limit of the sharded layout;
* ``weights_memcpy``: a warm copy of the per-rank bytes: the staging limit.

Per repetition: blocking (the caller's stall: ``PublishRecord.blocking_s``; the whole call for
the gather), ready (``PublishRecord.ready_s`` after ``wait()``: from the call until
``COMPLETE``; the whole call for the gather) and the peak extra RSS of rank 0 (sampled every
5 ms from right before the call until it is ready, minus the RSS right before the call; after
the warm-up publish, so the publisher's reused staging buffers already exist and are part of
the baseline). Each publish writes a new step directory; it is deleted after the measurement,
outside the timed region, followed by :func:`ckpt_bench.common.settle` (``os.sync`` so the
delete's journal commit and TRIM do not land in the next case's fsync; ``malloc_trim`` so memory
glibc keeps from one case cannot hide the next one's peak). Targets, markdown and plot row:
:mod:`ckpt_bench.weights_report`.
"""

from __future__ import annotations

import gc
import os
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ckpt_bench import registry
from ckpt_bench.common import HIDDEN, MiB, fmt_size, settle, timed
from ckpt_bench.model import build_model
from ckpt_bench.registry import Op, register
from ckpt_bench.storage import LocalStorage, staging_floor, write_file_fsync


@dataclass
class WeightsContext:
    """What a weights builder gets, at one size: the worker, the model, this rank's parameter
    bytes, the directory of this size, the config written beside the weights, flat scratch
    tensors of the per-rank size and a list of closers run after the size."""

    worker: Any
    size: int
    model: Any
    per_rank: int
    root: Path
    config: dict[str, Any]
    flat_src: Any
    flat_dst: Any
    closers: list[Callable[[], None]] = field(default_factory=list)

    @property
    def rank(self) -> int:
        return self.worker.rank

    def remove_step(self, base: Path) -> Callable[[int], None]:
        """A cleanup: rank 0 removes ``base/weights/step_<rep + 1>`` between barriers, then :func:`settle`."""

        def cleanup(rep: int) -> None:
            self.worker.barrier()
            if self.rank == 0:
                shutil.rmtree(base / "weights" / f"step_{rep + 1}", ignore_errors=True)
            settle()
            self.worker.barrier()

        return cleanup


@register("weights_gather", family="weights", phase="weights")
def weights_gather(ctx: WeightsContext, st) -> Op:
    from prime_ckpt.weights import save_weights

    return Op(lambda rep: timed(lambda: save_weights(ctx.root / "gather", rep + 1, ctx.model, ctx.config)),
              cleanup=ctx.remove_step(ctx.root / "gather"),
              note="save_weights: full state dict gathered onto rank 0, one model.safetensors written there")


def _publisher_op(ctx: WeightsContext, name: str, is_async: bool) -> Op:
    from prime_ckpt.publisher import WeightsPublisher

    pub = WeightsPublisher(ctx.root / name, save_async=is_async, config=ctx.config, timeout_s=ctx.worker.s.timeout)
    ctx.closers.append(pub.close)

    def run(rep: int) -> tuple[float, float, dict[str, float]]:
        rec = pub.publish(rep + 1, ctx.model)
        pub.wait()
        return rec.blocking_s, rec.ready_s, {"staging_s": rec.staging_s}

    return Op(run, cleanup=ctx.remove_step(ctx.root / name), handle=pub,
              note=f"WeightsPublisher {'async' if is_async else 'sync'}: sharded, one file per rank")


@register("weights_sync", family="weights", phase="weights")
def weights_sync(ctx: WeightsContext, st) -> Op:
    return _publisher_op(ctx, "weights_sync", False)


@register("weights_async", family="weights", phase="weights")
def weights_async(ctx: WeightsContext, st) -> Op:
    return _publisher_op(ctx, "weights_async", True)


@register("weights_raw_write", family="weights", phase="weights")
def weights_raw_write(ctx: WeightsContext, st) -> Op:
    def raw_path(rep: int) -> str:
        return str(ctx.root / f"raw_{rep}_r{ctx.rank}.bin")

    def cleanup(rep: int) -> None:
        Path(raw_path(rep)).unlink(missing_ok=True)
        settle()

    return Op(lambda rep: timed(lambda: write_file_fsync(raw_path(rep), ctx.flat_src)), cleanup=cleanup,
              note="each rank writes its share (param bytes / world size) to its own file + fsync")


@register("weights_memcpy", family="weights", phase="weights", storages=("memory",))
def weights_memcpy(ctx: WeightsContext, st) -> Op:
    copy_floor, _ = staging_floor(ctx.flat_src, ctx.flat_dst)
    return Op(lambda rep: timed(copy_floor), cleanup=lambda rep: settle(), note="warm copy of the per-rank bytes (staging limit)")


def run_weights(w: Any) -> None:
    """Every weights size of ``w.s.weights_sizes``: build the model, run the selected weights
    cases with ``w.run_cases`` (which appends one record per case to ``w.records``), add rank 0's
    publish sizes and the load average to those records."""
    import torch

    specs = registry.selected("weights", w.s.cases)
    for size in w.s.weights_sizes:
        t0 = time.perf_counter()
        model = build_model(size)
        per_rank = sum(p.to_local().numel() * p.element_size() for p in model.parameters())
        total = w.sum_all(per_rank)
        w.log(f"weights {fmt_size(size)}: {total / MiB:.0f} MiB of parameters, {per_rank / MiB:.0f} MiB/rank")
        root = w.root / f"weights{size}"
        if w.rank == 0:
            root.mkdir(parents=True, exist_ok=True)
        w.barrier()
        flat_src = torch.empty(per_rank // 4, dtype=torch.float32).fill_(1.0)
        ctx = WeightsContext(w, size, model, per_rank, root, {"architectures": ["Sequential"], "hidden_size": HIDDEN,
                             "num_layers": len(model)}, flat_src, torch.empty_like(flat_src).fill_(0.0))
        cs = registry.build_cases(specs, ctx, {"memory": None, "local": LocalStorage(root)})
        gc.collect()
        settle()
        w.run_cases(cs, w.s.reps, total, per_rank, size)
        for c, rec in zip(cs, w.records[-len(cs):]):
            rec["param_bytes"] = total
            rec["loadavg"] = list(os.getloadavg())
            pub = c.handle
            if pub is not None and pub.records:
                last = pub.records[-1]
                rec["staged_bytes"], rec["file_bytes"] = last.staged_bytes, last.file_bytes
                # memory the publisher keeps between publishes (reused staging buffers, the two
                # scratch buffers): in the RSS baseline, so the peak adds it back
                rec["held_bytes"] = pub.held_bytes
        w.closer(ctx.closers)()
        w.barrier()
        if w.rank == 0:
            shutil.rmtree(root, ignore_errors=True)
        w.barrier()
        del model, cs, ctx
        gc.collect()
        settle()
        w.log(f"weights {fmt_size(size)} done in {time.perf_counter() - t0:.0f} s")
