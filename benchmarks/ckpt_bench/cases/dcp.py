"""Family ``dcp``: PyTorch DCP used directly (the peer this project is measured against):
``dcp.save`` with writer thread counts 1 and 2, and ``dcp.async_save`` with its defaults, with
DCP's ``DefaultStager`` reused across saves, and (CUDA only) with pinned staging memory."""

from __future__ import annotations

import time
from typing import Any

from ckpt_bench.common import timed
from ckpt_bench.model import full_state_dict
from ckpt_bench.registry import Op, register


def async_save_op(ctx, st, prefix: str, note: str, stager: Any = None, use_writer: bool = False,
                  record_staging: bool = False) -> Op:
    """``dcp.async_save`` of the state to ``<prefix>_<rep>`` on ``st``: blocking = the call,
    durable = until its upload completes. ``stager``: the ``async_stager`` (DCP's default if None);
    ``use_writer``: pass ``st.writer(...)`` as the ``storage_writer`` instead of a ``checkpoint_id``;
    ``record_staging``: record the stager's ``last_staging_s`` as ``staging_s``."""
    import torch.distributed.checkpoint as dcp

    def path(rep: int) -> str:
        return st.path(f"{prefix}_{rep}")

    def run(rep: int) -> tuple[float, float, dict[str, float]]:
        sd = full_state_dict(ctx.model, ctx.opt)
        kw: dict[str, Any] = {"storage_writer": st.writer(path(rep))} if use_writer else {"checkpoint_id": path(rep)}
        if stager is not None:
            kw["async_stager"] = stager
        t0 = time.perf_counter()
        res = dcp.async_save(sd, **kw)
        t1 = time.perf_counter()
        getattr(res, "upload_completion", res).result()
        extra = {"staging_s": stager.last_staging_s} if record_staging else {}
        return t1 - t0, time.perf_counter() - t0, extra

    return Op(run, cleanup=ctx.rm_rank0(path, st), note=note)


def _plain_save(ctx, st, prefix: str, writer_kw: dict[str, Any], note: str) -> Op:
    import torch.distributed.checkpoint as dcp

    def run(rep: int) -> tuple[float, float, dict[str, float]]:
        sd = full_state_dict(ctx.model, ctx.opt)
        return timed(lambda: dcp.save(sd, storage_writer=st.writer(st.path(f"{prefix}_{rep}"), **writer_kw)))

    return Op(run, cleanup=ctx.rm_rank0(lambda rep: st.path(f"{prefix}_{rep}"), st), note=note)


@register("dcp_save", family="dcp", storages=("local", "s3"))
def dcp_save(ctx, st) -> Op:
    return _plain_save(ctx, st, "dcp", {}, "dcp.save, default writer (thread_count=1)")


@register("dcp_save_t2", family="dcp")
def dcp_save_t2(ctx, st) -> Op:
    return _plain_save(ctx, st, "dcp_t2", {"thread_count": 2}, "dcp.save, writer thread_count=2")


@register("dcp_async_default", family="dcp")
def dcp_async_default(ctx, st) -> Op:
    return async_save_op(ctx, st, "dcpa", "dcp.async_save defaults: fresh staging memory every save")


def _default_stager(pinned: bool, non_blocking: bool):
    from torch.distributed.checkpoint.staging import DefaultStager, StagingOptions

    return DefaultStager(StagingOptions(use_pinned_memory=pinned, use_shared_memory=False,
                                        use_async_staging=False, use_non_blocking_copy=non_blocking))


@register("dcp_async_defaultstager", family="dcp")
def dcp_async_defaultstager(ctx, st) -> Op:
    import torch

    stager = _default_stager(pinned=torch.cuda.is_available(), non_blocking=False)
    ctx.closers.append(stager.close)
    return async_save_op(ctx, st, "dcpr", "dcp.async_save, DCP's DefaultStager reused across saves (caches per storage)", stager)


@register("dcp_async_pinned", family="dcp")
def dcp_async_pinned(ctx, st) -> Op | None:
    import torch

    if not torch.cuda.is_available():
        return None
    stager = _default_stager(pinned=True, non_blocking=True)
    ctx.closers.append(stager.close)
    return async_save_op(ctx, st, "dcpp", "dcp.async_save, DefaultStager with pinned memory (GPU->host)", stager)
