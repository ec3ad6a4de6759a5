"""Family ``baselines``: the limits a save is measured against, at each state size: a warm copy
of the per-rank bytes (the staging floor), a raw sequential write + fsync of them (the storage
limit, locally and on S3) and ``torch.save`` of each rank's local shards."""

from __future__ import annotations

import os
import time

from ckpt_bench.common import timed
from ckpt_bench.model import local_state
from ckpt_bench.registry import Op, register
from ckpt_bench.storage import staging_floor


@register("memcpy", family="baselines", kind="baseline", storages=("memory",))
def memcpy(ctx, st) -> Op:
    copy_floor, note = staging_floor(ctx.flat_src, ctx.flat_dst)
    return Op(lambda rep: timed(copy_floor), note=note)


@register("raw_write", family="baselines", kind="baseline", storages=("local", "s3"))
def raw_write(ctx, st) -> Op:
    def raw(rep: int) -> str:
        return st.path(f"raw_{rep}_r{ctx.rank}.bin")

    return Op(lambda rep: timed(lambda: st.write_bytes(raw(rep), ctx.flat_src)), cleanup=lambda rep: st.remove(raw(rep)),
              note="sequential write (+fsync) of the per-rank bytes (storage limit)")


@register("torch_save", family="baselines")
def torch_save(ctx, st) -> Op:
    import torch

    def path(rep: int) -> str:
        return st.path(f"torch_{rep}_r{ctx.rank}.pt")

    def run(rep: int) -> tuple[float, float, dict[str, float]]:
        sd = local_state(ctx.model, ctx.opt)
        t0 = time.perf_counter()
        with open(path(rep), "wb") as f:
            torch.save(sd, f)
            f.flush()
            os.fsync(f.fileno())
        dt = time.perf_counter() - t0
        return dt, dt, {}

    return Op(run, cleanup=lambda rep: st.remove(path(rep)), note="torch.save of this rank's local shards + fsync")
