"""Family ``ours``: this project's :class:`prime_ckpt.checkpointer.Checkpointer`, sync, async in a
thread and async in a process (``--no-process`` skips it), locally and on S3. Each save's
cleanup keeps the newest step, which the ``ckpt_load`` case loads."""

from __future__ import annotations

import time

from ckpt_bench.registry import Op, register


def _checkpointer_op(ctx, st, name: str, is_async: bool, mode: str) -> Op:
    from prime_ckpt.config import CheckpointConfig
    from prime_ckpt.trainer import Checkpointer

    ck = Checkpointer(f"{st.checkpointer_root}/{name}", CheckpointConfig(save_async=is_async), async_mode=mode,
                      timeout_s=ctx.settings.timeout, storage_options=st.storage_options)
    ctx.closers.append(ck.close)

    def run(rep: int) -> tuple[float, float, dict[str, float]]:
        t0 = time.perf_counter()
        rec = ck.save(rep + 1, ctx.state)
        t1 = time.perf_counter()
        ck.wait()
        return t1 - t0, time.perf_counter() - t0, {"staging_s": rec.staging_s}

    def cleanup(rep: int) -> None:
        # untimed: rank 0's post-commit job (save record, manifest hashing, which on S3 reads the
        # step back) finishes here, so it never runs beside the next case's timed save
        ck.flush()
        ctx.worker.barrier()
        if ctx.rank == 0 and rep > 0:  # keep the newest for the load cases
            st.remove(str(ck.layout.step_dir(rep)))
        ctx.worker.barrier()

    return Op(run, cleanup=cleanup, note=f"Checkpointer {'async ' + mode if is_async else 'sync'}", handle=ck)


@register("ckpt_sync", family="ours", storages=("local", "s3"))
def ckpt_sync(ctx, st) -> Op:
    return _checkpointer_op(ctx, st, "ckpt_sync", False, "thread")


@register("ckpt_async_thread", family="ours", storages=("local", "s3"))
def ckpt_async_thread(ctx, st) -> Op:
    return _checkpointer_op(ctx, st, "ckpt_async_thread", True, "thread")


@register("ckpt_async_process", family="ours", storages=("local", "s3"))
def ckpt_async_process(ctx, st) -> Op | None:
    if not ctx.settings.process_mode:
        return None
    return _checkpointer_op(ctx, st, "ckpt_async_process", True, "process")
