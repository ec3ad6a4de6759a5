"""Family ``loads``: load time per format, after the save cases of the same size: a raw read of
the per-rank bytes (page cache dropped), ``torch.load``, ``Checkpointer.load`` of the newest
``ckpt_sync`` save, and ``dcp.load`` with DCP's own reader, locally and on S3."""

from __future__ import annotations

from ckpt_bench.common import timed
from ckpt_bench.model import full_state_dict, local_state
from ckpt_bench.registry import Op, register
from ckpt_bench.storage import drop_file_cache, drop_tree_cache


@register("raw_read", family="loads", phase="load", storages=("local", "s3"))
def raw_read(ctx, st) -> Op:
    p = st.path(f"rawload_r{ctx.rank}.bin")
    st.write_bytes(p, ctx.flat_src)
    return Op(lambda rep: timed(lambda: st.read_into(p, ctx.flat_dst)),
              note="sequential read of the per-rank bytes into a warm buffer (page cache dropped)")


@register("torch_load", family="loads", phase="load")
def torch_load(ctx, st) -> Op:
    import torch

    tp = st.path(f"torchload_r{ctx.rank}.pt")
    with open(tp, "wb") as f:
        torch.save(local_state(ctx.model, ctx.opt), f)

    def run(rep: int) -> tuple[float, float, dict[str, float]]:
        drop_file_cache(tp)
        return timed(lambda: torch.load(tp, weights_only=True))

    return Op(run, note="torch.load of this rank's file (page cache dropped)")


@register("ckpt_load", family="loads", phase="load", storages=("local", "s3"))
def ckpt_load(ctx, st) -> Op | None:
    saved = [c for c in ctx.save_cases if c.name == "ckpt_sync" and c.storage == st.name and c.error is None]
    if not saved or saved[0].handle is None:
        return None
    ck = saved[0].handle
    step = ctx.settings.reps + 1  # the newest save, which the cleanup kept

    def run(rep: int) -> tuple[float, float, dict[str, float]]:
        if ctx.rank == 0:
            drop_tree_cache(str(ck.layout.step_dir(step)))
        ctx.worker.barrier()
        return timed(lambda: ck.load(step, ctx.state))

    return Op(run, note="Checkpointer.load (tensors read straight into the shards)")


@register("dcp_load", family="loads", phase="load", storages=("local", "s3"))
def dcp_load(ctx, st) -> Op:
    """DCP's own reader, as the baseline for ckpt_load."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint import FileSystemReader

    dcp.save(full_state_dict(ctx.model, ctx.opt), storage_writer=st.writer(st.path("dcpload")))
    reader_of = FileSystemReader if st.name == "local" else st.reader

    def run(rep: int) -> tuple[float, float, dict[str, float]]:
        sd = full_state_dict(ctx.model, ctx.opt)
        if ctx.rank == 0 and st.name == "local":
            drop_tree_cache(st.path("dcpload"))
        ctx.worker.barrier()
        return timed(lambda: dcp.load(sd, storage_reader=reader_of(st.path("dcpload"))))

    return Op(run, note="dcp.load, DCP's " + ("FileSystemReader (page cache dropped)" if st.name == "local" else "FsspecReader"))
