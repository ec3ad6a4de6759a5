"""Family ``checks``: measured once per world size, first, in a fresh worker process (after the
size cases glibc holds gigabytes of freed memory, which would hide what a save adds): RSS during
and over consecutive async saves (``rss``), and the step-time overhead of an async checkpoint
every 10 steps (``step_overhead``). Each writes its entry of ``worker.extras``."""

from __future__ import annotations

import gc
import shutil
import statistics
import time

from ckpt_bench.model import build_state, per_rank_state_bytes, train_step
from ckpt_bench.registry import register
from ckpt_bench.rss import RssSampler


@register("rss", family="checks", phase="check", storages=())
def rss_checks(w) -> None:
    """RSS in a fresh process, in three phases of ``rss_saves`` iterations each:

    1. training steps only, no Checkpointer yet: the training footprint (glibc keeps the
       step's freed buffers, so RSS climbs for a few steps and then plateaus);
    2. consecutive async saves (each waited for), no training: ``drift`` (the target);
    3. a training step, then an async save, each iteration.

    ``peak_extra_rss_vs_state`` = (highest RSS seen in phases 2-3, sampled every 5 ms during
    each save and after each iteration) - (highest RSS of phase 1), over the per-rank state:
    what checkpointing adds on top of training, staging buffers included."""
    from prime_ckpt.config import CheckpointConfig
    from prime_ckpt.trainer import Checkpointer, TrainerState

    model, opt = build_state(w.s.rss_size, seed=2)
    state = TrainerState(model, opt)
    per_rank = per_rank_state_bytes(model)
    n = w.s.rss_saves
    step = 0
    ck = None

    def drift(values: list[int]) -> float:
        return max(abs(a - values[0]) for a in values) / values[0]

    def run(train: bool, save: bool) -> tuple[list[int], list[int]]:
        nonlocal step
        after: list[int] = []
        peaks: list[int] = []
        for _ in range(n):
            if train:
                train_step(model, opt, batch=4)
            if save:
                step += 1
                with RssSampler() as rss:  # the save and its upload, nothing else
                    ck.save(step, state)
                    ck.wait()
                peaks.append(rss.peak_rss)
                if w.rank == 0 and step > 1:
                    shutil.rmtree(ck.layout.step_dir(step - 1), ignore_errors=True)
            gc.collect()
            after.append(RssSampler().rss())
        return after, peaks

    train_only, _ = run(train=True, save=False)
    ck = Checkpointer(w.root / "rss", CheckpointConfig(save_async=True), timeout_s=w.s.timeout)
    after, peaks = run(train=False, save=True)
    with_train, peaks_t = run(train=True, save=True)
    ck.close()
    base = max(train_only)
    top = max(peaks + peaks_t + after + with_train)
    vals = w.max_all([(top - base) / per_rank, drift(after), drift(with_train), drift(train_only)])
    w.extras["rss"] = {
        "world_size": w.ws,
        "per_rank_state_bytes": per_rank,
        "saves": n,
        "rss_train_only_bytes": train_only,
        "rss_before_bytes": base,
        "rss_after_each_save_bytes": after,
        "rss_after_train_and_save_bytes": with_train,
        "peak_rss_bytes": top,
        "peak_extra_rss_vs_state": vals[0],
        "drift": vals[1],
        "drift_train_and_save": vals[2],
        "drift_train_only": vals[3],
    }
    w.log(f"rss: peak extra {vals[0]:.2f}x state over training alone, drift {vals[1] * 100:.1f}% over {n} saves "
             f"({vals[2] * 100:.1f}% with a training step before each; training alone {vals[3] * 100:.1f}%)")



class _RawWriteEvery:
    """The floor of :func:`step_overhead`: ``save()`` writes this rank's state bytes (a warm
    buffer, ``nbytes``) to one file and fsyncs it, in a background thread that holds no
    interpreter lock while writing (``os.write`` of a memoryview), after waiting for the previous
    write. What merely writing the bytes costs the training loop on this machine, with no
    checkpointer, no planning and no serialisation."""

    def __init__(self, path, nbytes: int) -> None:
        import threading

        import torch

        self.path = path
        self.buf = torch.ones(nbytes, dtype=torch.uint8).numpy()  # touched: no page faults while timing
        self._thread: threading.Thread | None = None

    def _write(self) -> None:
        import os

        fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            view, chunk = memoryview(self.buf), 64 << 20
            for off in range(0, len(view), chunk):
                os.write(fd, view[off:off + chunk])
            os.fsync(fd)
        finally:
            os.close(fd)

    def save(self, step: int, state) -> None:
        import threading

        self.flush()
        self._thread = threading.Thread(target=self._write, daemon=True)
        self._thread.start()

    def flush(self) -> None:
        if self._thread is not None:
            self._thread.join()
            self._thread = None


@register("step_overhead", family="checks", phase="check", storages=())
def step_overhead(w) -> None:
    """The mean step time of a small FSDP2 MLP loop with an async checkpoint every 10 steps vs none,
    in thread mode (the default, the target) and process mode, and with the floor instead of a
    checkpoint (:class:`_RawWriteEvery`: the same bytes per rank written and fsync'd in a
    background thread), interleaved in blocks none, thread, process, raw, raw, process, thread,
    none (no drift bias), into ``w.extras["step_overhead"]``; also the median step time at each
    position after a save (where the overhead lands: the save call itself, or the steps that run
    beside its background write)."""
    from prime_ckpt.config import CheckpointConfig
    from prime_ckpt.trainer import Checkpointer, TrainerState

    size = w.s.step_size
    model, opt = build_state(size, seed=1)
    state = TrainerState(model, opt)
    modes = ("thread", "process") if w.s.process_mode else ("thread",)  # --no-process: thread mode only
    cks = {mode: Checkpointer(w.root / f"steps_{mode}", CheckpointConfig(save_async=True, interval=10), async_mode=mode,
                              timeout_s=w.s.timeout) for mode in modes}
    names = {"thread": "async_every_10", "process": "async_process_every_10", "raw": "raw_write_every_10"}
    floor = _RawWriteEvery(w.root / f"raw_write_floor_{w.rank}.bin", per_rank_state_bytes(model))
    modes = (*modes, "raw")
    times: dict[str, list[float]] = {"none": [], **{names[m]: [] for m in modes}}
    by_position: dict[str, list[list[float]]] = {k: [[] for _ in range(10)] for k in times}
    step = 0
    per_block = max(10, w.s.steps // 2)
    for _ in range(3):  # warm-up (and the first save allocates the staging buffers / starts the writer process)
        train_step(model, opt, batch=32)
    for ck in cks.values():
        ck.save(10_000, state)
        ck.wait()
    writers = {**cks, "raw": floor}
    for mode in ("none", *modes, *reversed(modes), "none"):
        name = names.get(mode, "none")
        ck = writers.get(mode)
        for i in range(per_block):
            w.barrier()
            t0 = time.perf_counter()
            train_step(model, opt, batch=32)
            step += 1
            if ck is not None and (i + 1) % 10 == 0:
                ck.save(step, state)
            dt = w.max_all([time.perf_counter() - t0])[0]
            times[name].append(dt)
            by_position[name][i % 10].append(dt)
        if ck is floor:
            floor.flush()
        elif ck is not None:
            ck.flush()  # also rank 0's save record and manifest, before the directory goes
            if w.rank == 0:
                shutil.rmtree(ck.layout.output_dir / "checkpoints", ignore_errors=True)
        w.barrier()
    for ck in cks.values():
        ck.close()
    floor.path.unlink(missing_ok=True)
    mean = {k: statistics.fmean(v) for k, v in times.items()}
    w.extras["step_overhead"] = {
        "world_size": w.ws,
        "state_bytes": w.sum_all(per_rank_state_bytes(model)),
        "steps_per_mode": len(times["none"]),
        "mean_step_s": mean,
        "median_step_s": {k: statistics.median(v) for k, v in times.items()},
        # position 9 holds the save call; 0, 1, ... the steps after it
        "median_step_s_by_position": {k: [statistics.median(p) for p in v] for k, v in by_position.items()},
        "ratio": mean["async_every_10"] / mean["none"],
        "ratio_process": mean["async_process_every_10"] / mean["none"] if "process" in modes else None,
        # the floor: the same bytes written + fsync'd in a background thread instead of a checkpoint
        "ratio_raw_write": mean["raw_write_every_10"] / mean["none"],
    }
    w.log(f"step overhead: {w.extras['step_overhead']['ratio']:.3f}x mean step")
    del model, opt

