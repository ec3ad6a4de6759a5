"""One worker per rank under torchrun: builds the registered cases for each size, runs them
interleaved (every repetition runs every case once, in a rotating order, after a warm-up), and
measures blocking time, time to durable and RSS (sampled every 5 ms), max over ranks."""

from __future__ import annotations

import gc
import json
import os
import shutil
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ckpt_bench import registry
from ckpt_bench.cases.weights import run_weights
from ckpt_bench.common import S3_BUCKET, MiB, environment, fmt_size, summary
from ckpt_bench.model import build_state, per_rank_state_bytes
from ckpt_bench.registry import Case
from ckpt_bench.rss import RssSampler
from ckpt_bench.settings import Settings
from ckpt_bench.storage import LocalStorage, S3Storage


@dataclass
class SizeContext:
    """What a save or load builder gets, at one state size: the state, this rank's bytes, the
    worker, flat scratch tensors of the per-rank size, and a list of closers run after the size."""

    worker: Worker
    size: int
    model: Any
    opt: Any
    per_rank: int
    local: LocalStorage
    storages: list[Any]
    flat_src: Any
    flat_dst: Any
    state: Any  # prime_ckpt.state.TrainerState of model and opt
    closers: list[Callable[[], None]] = field(default_factory=list)
    save_cases: list[Case] = field(default_factory=list)

    @property
    def rank(self) -> int:
        return self.worker.rank

    @property
    def settings(self) -> Settings:
        return self.worker.s

    def rm_rank0(self, path_of: Callable[[int], str], st) -> Callable[[int], None]:
        """A cleanup: between barriers, rank 0 removes ``path_of(rep)`` from ``st``."""

        def cleanup(rep: int) -> None:
            self.worker.barrier()
            if self.rank == 0:
                st.remove(path_of(rep))
            self.worker.barrier()

        return cleanup


class Worker:
    """This rank: the process group, collectives, and the cases of every phase."""

    def __init__(self, s: Settings) -> None:
        import torch
        import torch.distributed as dist

        self.s = s
        dist.init_process_group("gloo" if not torch.cuda.is_available() else "cpu:gloo,cuda:nccl")
        if torch.cuda.is_available():
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        torch.set_num_threads(1)
        self.rank, self.ws = dist.get_rank(), dist.get_world_size()
        self.root = Path(s.workdir) / f"ws{self.ws}"
        self.records: list[dict[str, Any]] = []
        self.extras: dict[str, Any] = {}
        self.env: dict[str, Any] = {}
        self.s3: S3Storage | None = None
        if s.s3_endpoint:
            self.s3 = S3Storage(s.s3_endpoint, f"ws{self.ws}")

    # -- collectives helpers ---------------------------------------------------------------------
    def barrier(self) -> None:
        import torch.distributed as dist

        dist.barrier()

    def max_all(self, values: list[float]) -> list[float]:
        import torch
        import torch.distributed as dist

        t = torch.tensor(values, dtype=torch.float64)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return t.tolist()

    def sum_all(self, value: int) -> int:
        import torch
        import torch.distributed as dist

        t = torch.tensor([value], dtype=torch.int64)
        dist.all_reduce(t)
        return int(t.item())

    def log(self, msg: str) -> None:
        if self.rank == 0:
            print(f"[ws={self.ws}] {msg}", flush=True)

    def closer(self, closers: list[Callable[[], None]]) -> Callable[[], None]:
        """One function that calls each of ``closers``, logging (not raising) failures."""

        def close_all() -> None:
            for c in closers:
                try:
                    c()
                except Exception as e:  # noqa: BLE001
                    self.log(f"close failed: {e}")

        return close_all

    # -- running cases -------------------------------------------------------------------------
    def run_cases(self, cases: list[Case], reps: int, nbytes_total: int, per_rank: int, size: int) -> None:
        """Warm-up + ``reps`` rounds; each round runs every case once, in a rotating order; then one
        record per case appended to ``self.records``."""
        if not cases:
            return
        for rep in range(reps + 1):
            order = cases[rep % len(cases):] + cases[: rep % len(cases)]
            for c in order:
                if c.error is not None:
                    continue
                gc.collect()
                self.barrier()
                err = ""
                with RssSampler() as rss:
                    try:
                        blocking, durable, extra = c.run(rep)
                    except Exception as e:  # noqa: BLE001 - recorded, the run goes on
                        blocking, durable, extra = float("nan"), float("nan"), {}
                        err = f"{type(e).__name__}: {e}"
                failed = self.max_all([1.0 if err else 0.0])[0]
                if failed:
                    c.error = err or "failed on another rank"
                    self.log(f"{c.name} ({c.storage}) failed: {c.error}")
                    continue
                vals = self.max_all([blocking, durable, rss.peak_rss - rss.start_rss, rss.peak_rss,
                                     rss.peak_tree_rss - rss.start_rss, extra.get("staging_s", 0.0),
                                     rss.peak_rss - rss.start_rss if self.rank == 0 else 0.0])
                try:
                    c.cleanup(rep)
                except Exception as e:  # noqa: BLE001
                    self.log(f"cleanup of {c.name} failed: {e}")
                if rep == 0:
                    continue  # warm-up
                for key, v in zip(("blocking_s", "durable_s", "peak_extra_rss", "peak_rss", "peak_extra_rss_tree", "staging_s",
                                   "peak_extra_rss_rank0"), vals):
                    c.samples.setdefault(key, []).append(v)
        for c in cases:
            self.records.append(self.record(c, size, nbytes_total, per_rank))

    def record(self, c: Case, size: int, total: int, per_rank: int, kind: str | None = None) -> dict[str, Any]:
        """The JSON record of case ``c``: summaries over its repetitions, its note and error, the environment."""
        d = c.samples.get("durable_s", [])
        rec = {
            "case": c.name,
            "kind": kind or c.kind,
            "storage": c.storage,
            "world_size": self.ws,
            "size_bytes": size,
            "state_bytes": total,
            "per_rank_bytes": per_rank,
            "reps": len(d),
            "blocking_s": summary(c.samples.get("blocking_s", [])),
            "durable_s": summary(d),
            "throughput_gbps": (total / statistics.median(d) / 1e9) if d else None,
            "staging_s": summary(c.samples.get("staging_s", [])) if any(c.samples.get("staging_s", [])) else None,
            "peak_rss_bytes": max(c.samples["peak_rss"]) if c.samples.get("peak_rss") else None,
            "peak_extra_rss_bytes": summary(c.samples.get("peak_extra_rss", [])),
            "peak_extra_rss_with_children_bytes": summary(c.samples.get("peak_extra_rss_tree", [])),
            "peak_extra_rss_rank0_bytes": summary(c.samples.get("peak_extra_rss_rank0", [])),
            "note": c.note,
            "error": c.error,
            **{k: self.env[k] for k in ("torch", "cpu_count", "device")},
            "samples": {k: v for k, v in c.samples.items() if k in ("blocking_s", "durable_s")},
        }
        if c.storage == "memory":  # a memcpy's "throughput" is per-rank bytes over the copy time
            rec["throughput_gbps"] = (per_rank / statistics.median(d) / 1e9) if d else None
        return rec


    # -- one state size: its save cases, then its load cases ----------------------------------
    def run_size(self, size: int) -> None:
        """Build the state, run the registered save cases and then the load cases at ``size``,
        close what they opened and remove their files."""
        import torch

        from prime_ckpt.trainer import TrainerState

        save_specs, load_specs = registry.selected("save", self.s.cases), registry.selected("load", self.s.cases)
        if not save_specs and not load_specs:
            return
        t_size = time.perf_counter()
        model, opt = build_state(size)
        per_rank = per_rank_state_bytes(model)
        total = self.sum_all(per_rank)
        self.log(f"size {fmt_size(size)}: {total / MiB:.0f} MiB state, {per_rank / MiB:.0f} MiB/rank")
        local = LocalStorage(self.root / f"size{size}")
        storages: dict[str, Any] = {"memory": None, "local": local}
        if self.s3 is not None and size <= self.s.s3_max_size:
            storages["s3"] = self.s3
        flat_src = torch.empty(per_rank // 4, dtype=torch.float32).fill_(1.0)
        ctx = SizeContext(self, size, model, opt, per_rank, local, list(storages.values())[1:], flat_src,
                          torch.empty_like(flat_src).fill_(0.0), TrainerState(model, opt))
        ctx.save_cases = registry.build_cases(save_specs, ctx, storages)
        self.run_cases(ctx.save_cases, self.s.reps, total, per_rank, size)
        load_cases = registry.build_cases(load_specs, ctx, storages)
        self.run_cases(load_cases, self.s.reps, total, per_rank, size)
        self.closer(ctx.closers)()
        self.barrier()
        if self.rank == 0:
            shutil.rmtree(self.root / f"size{size}", ignore_errors=True)
            if self.s3 is not None:
                self.s3.remove(self.s3.url)
        self.barrier()
        del model, opt, ctx, load_cases
        gc.collect()
        self.log(f"size {fmt_size(size)} done in {time.perf_counter() - t_size:.0f} s")

    # -- main ------------------------------------------------------------------------------------
    def main(self) -> None:
        """Every phase in order, then rank 0 writes ``--worker-out`` (records, extras, environment)."""
        import torch.distributed as dist

        self.env = environment()
        if self.s3 is not None and self.rank == 0:
            self.s3.fs.makedirs(S3_BUCKET, exist_ok=True)
        self.barrier()
        # RSS and step time first, in a fresh process: after the size cases glibc keeps gigabytes
        # of freed memory, which would hide what checkpointing adds
        if not self.s.weights_only:
            for spec in registry.selected("check", self.s.cases):
                spec.build(self)
                gc.collect()
        if self.s.weights_sizes and registry.selected("weights", self.s.cases):
            run_weights(self)
            gc.collect()
        for size in [] if self.s.weights_only else self.s.sizes:
            self.run_size(size)
        if self.rank == 0 and self.s.worker_out:
            Path(self.s.worker_out).write_text(json.dumps({"records": self.records, "extras": self.extras, "env": self.env}))
        self.barrier()
        dist.destroy_process_group()
