"""Family ``titan``: torchtitan's ``CheckpointManager`` (0.3.0), the checkpointer most DCP users
run, as a peer of this project's Checkpointer: same model, same sizes, same launch, interleaved
with the other cases.

torchtitan comes from its own environment, ``.venv-titan`` (``make titan-env``; see
:mod:`ckpt_bench.titan_env`); ``--no-titan`` skips these cases, and so does a launch that finds
no such environment (with a note in the results). The manager is built as torchtitan's trainer
builds it: ``model_parts=[model]``, an ``OptimizersContainer`` (AdamW, torchtitan's FQN-keyed flat
optimizer state) whose state *is* the benchmark optimizer's (the same tensors, so nothing is
duplicated and the same bytes are saved), no dataloader or LR scheduler, ``interval=1``,
``keep_latest_k=0`` (the cleanup removes old steps, keeping the newest for ``titan_load``). It
writes ``<root>/<case>/step-N`` with DCP's ``FileSystemWriter`` (``sync_files=True``: every file
fsync'd).

* ``titan_sync`` (``async_mode="disabled"``): ``save()`` returns when ``dcp.save`` is done:
  blocking = durable.
* ``titan_async`` (``async_mode="async"``): ``dcp.async_save`` in a thread, staging into fresh
  memory every save; blocking = ``save()``, durable = until ``maybe_wait_for_saving()`` returns,
  i.e. the manager's ``save_future`` (DCP's upload future: every file written and fsync'd, and
  ``.metadata`` written by rank 0) is done.
* ``titan_async_pinned`` (``async_mode="async_with_pinned_mem"``): DCP's process-based async save
  with a pinned, shared-memory ``DefaultStager``; CUDA only (on CPU torch refuses its
  ``use_non_blocking_copy=True``: "Non-blocking copy requires that the current accelerator is available");
  ``staging_s`` = until ``maybe_wait_for_staging()`` returns.
* ``titan_load``: ``CheckpointManager.load(step)`` of the newest ``titan_sync`` step (page cache
  dropped): ``dcp.load`` into its flattened state, then the model's ``load_state_dict``.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from ckpt_bench.common import timed
from ckpt_bench.registry import Op, register
from ckpt_bench.storage import drop_tree_cache


def _titan_modules(ctx) -> tuple[Any, Any] | None:
    """torchtitan's checkpoint and optimizer modules from ``--titan-env``, or None when
    ``--no-titan``. Raises RuntimeError (one line) when the environment has no torchtitan."""
    if not ctx.settings.titan:
        return None
    from ckpt_bench.titan_env import activate

    activate(Path(ctx.settings.titan_env))
    import torchtitan.components.checkpoint as checkpoint
    import torchtitan.components.optimizer as optimizer

    return checkpoint, optimizer


def _optimizers(optimizer: Any, model: Any, opt: Any) -> Any:
    """torchtitan's ``OptimizersContainer`` (one AdamW over ``model``) sharing ``opt``'s state
    tensors: its ``state_dict()`` is torchtitan's flat FQN-keyed view of the benchmark's state."""
    cfg = optimizer.OptimizersContainer.Config(param_groups=optimizer.default_adamw(lr=1e-4).param_groups,
                                               implementation="for-loop")
    container = optimizer.OptimizersContainer(cfg, model_parts=[model])
    for o in container.optimizers:
        for group in o.param_groups:
            for p in group["params"]:
                o.state[p] = opt.state[p]
    return container


def manager(ctx, st, name: str, mode: str) -> Any:
    """A torchtitan ``CheckpointManager`` of ``ctx``'s model and optimizer writing
    ``<st.checkpointer_root>/<name>/step-N`` in ``async_mode`` ``mode`` (None: ``--no-titan``)."""
    mods = _titan_modules(ctx)
    if mods is None:
        return None
    checkpoint, optimizer = mods
    cfg = checkpoint.CheckpointManager.Config(enable=True, folder=name, interval=1, keep_latest_k=0, async_mode=mode,
                                              initial_load_model_only=False)
    mgr = checkpoint.CheckpointManager(cfg, dataloader=None, model_parts=[ctx.model],
                                       optimizers=_optimizers(optimizer, ctx.model, ctx.opt), lr_schedulers=None,
                                       states={}, sd_adapter=None, base_folder=st.checkpointer_root)
    ctx.closers.append(mgr.close)
    return mgr


def _failed(note: str, e: Exception) -> Op:
    """An Op that fails every run with ``e`` (one line): the record carries the error, the run goes on."""
    msg = f"{type(e).__name__}: {e}".splitlines()[0]

    def run(rep: int) -> tuple[float, float, dict[str, float]]:
        raise RuntimeError(msg)

    return Op(run, note=note)


def _save_op(ctx, st, name: str, mode: str, note: str) -> Op | None:
    try:
        mgr = manager(ctx, st, name, mode)
    except Exception as e:  # noqa: BLE001 - torchtitan missing or incompatible: recorded as the case's error
        return _failed(note, e)
    if mgr is None:
        return None
    pinned = mode == "async_with_pinned_mem"

    def run(rep: int) -> tuple[float, float, dict[str, float]]:
        t0 = time.perf_counter()
        mgr.save(rep + 1)
        t1 = time.perf_counter()
        mgr.maybe_wait_for_staging()
        t_staged = time.perf_counter()
        mgr.maybe_wait_for_saving()  # the save future: every file fsync'd, .metadata written
        return t1 - t0, time.perf_counter() - t0, {"staging_s": t_staged - t0} if pinned else {}

    def cleanup(rep: int) -> None:
        ctx.worker.barrier()
        if ctx.rank == 0 and rep > 0:  # keep the newest (step reps + 1) for titan_load
            st.remove(st.path(name, f"step-{rep}"))
        ctx.worker.barrier()

    return Op(run, cleanup=cleanup, note=note, handle=mgr)


@register("titan_sync", family="titan")
def titan_sync(ctx, st) -> Op | None:
    return _save_op(ctx, st, "titan_sync", "disabled", "torchtitan CheckpointManager, async_mode=disabled (dcp.save)")


@register("titan_async", family="titan")
def titan_async(ctx, st) -> Op | None:
    return _save_op(ctx, st, "titan_async", "async",
                    "torchtitan CheckpointManager, async_mode=async (dcp.async_save in a thread, fresh staging memory)")


@register("titan_async_pinned", family="titan")
def titan_async_pinned(ctx, st) -> Op | None:
    import torch

    if not torch.cuda.is_available():  # DefaultStager(use_non_blocking_copy=True) asserts an accelerator
        return None
    return _save_op(ctx, st, "titan_async_pinned", "async_with_pinned_mem",
                    "torchtitan CheckpointManager, async_mode=async_with_pinned_mem (process, pinned shared-memory stager)")


@register("titan_load", family="titan", phase="load")
def titan_load(ctx, st) -> Op | None:
    saved = [c for c in ctx.save_cases if c.name == "titan_sync" and c.storage == st.name and c.error is None]
    if not saved or saved[0].handle is None:
        return None
    mgr = saved[0].handle
    step = ctx.settings.reps + 1  # the newest save, which the cleanup kept

    def run(rep: int) -> tuple[float, float, dict[str, float]]:
        if ctx.rank == 0:
            drop_tree_cache(st.path("titan_sync", f"step-{step}"))
        ctx.worker.barrier()
        return timed(lambda: mgr.load(step))

    return Op(run, note="torchtitan CheckpointManager.load (dcp.load, then the model's load_state_dict; page cache dropped)")
