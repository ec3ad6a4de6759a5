"""Family ``s3``: the S3-only case, DCP's ``async_save`` through its ``FsspecWriter`` with this
project's :class:`prime_ckpt.staging.ReusedBufferStager` and no Checkpointer around it. (The
baselines, DCP and ours cases that list ``"s3"`` in their storages run on S3 too: a ``moto``
server on 127.0.0.1, see :mod:`ckpt_bench.launch`.)"""

from __future__ import annotations

from ckpt_bench.cases.dcp import async_save_op
from ckpt_bench.registry import Op, register


@register("dcp_async_reused", family="s3", storages=("s3",))
def dcp_async_reused(ctx, st) -> Op:
    from prime_ckpt.staging import ReusedBufferStager

    stager = ReusedBufferStager()
    ctx.closers.append(stager.close)
    return async_save_op(ctx, st, "dcpa", "dcp.async_save, FsspecWriter + ReusedBufferStager", stager,
                         use_writer=True, record_staging=True)
