"""Weights publishing cases of ``save_latency.py``: per-step ``weights/step_<N>/``, side by side.

For each size (bytes of fp32 model parameters, total over ranks; an FSDP2 MLP of
``Linear(1024, 1024)`` layers, no optimizer) and world size, one launch measures, interleaved
with the script's ``Worker.run_cases`` (every repetition runs every case once, in a rotating
order, after one warm-up repetition):

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
outside the timed region, followed by :func:`settle` (``os.sync`` so the delete's journal commit
and TRIM do not land in the next case's fsync; ``malloc_trim`` so memory glibc keeps from one
case cannot hide the next one's peak).

The script runs as ``__main__`` and this module does not import it: the worker passes itself,
its ``Case`` class and its raw-write helper to :func:`run`. Targets (:func:`compute_targets`),
the markdown section (:func:`markdown_lines`) and the plot row (:func:`plot_row`) take the
script's result dict.
"""

from __future__ import annotations

import ctypes
import gc
import os
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

MiB = 1 << 20
GiB = 1 << 30
HIDDEN = 1024  # as save_latency.py: Linear(HIDDEN, HIDDEN) layers, 4 MiB of fp32 weights + bias each

CASES = ("weights_gather", "weights_sync", "weights_async", "weights_raw_write", "weights_memcpy")
TARGET_NAMES = ("weights_blocking_vs_memcpy", "weights_ready_vs_raw_write", "weights_peak_rss_vs_share", "weights_vs_gather_blocking")


def _fmt_size(n: int) -> str:
    return f"{n / GiB:g} GiB" if n >= GiB else f"{n / MiB:g} MiB"


def _fmt_s(x: dict | None) -> str:
    return f"{x['median']:.3f} ({x['min']:.3f}–{x['max']:.3f})" if x else "—"


def settle() -> None:
    """After a cleanup, outside the timed region: commit the deletes to disk (``os.sync``: on a
    file system mounted with ``discard``, such as this machine's root, the TRIM of a deleted GiB
    otherwise lands in the next case's fsync) and return freed heap memory to the OS
    (``malloc_trim``, glibc; skipped elsewhere)."""
    os.sync()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


# ----------------------------------------------------------------------------------------------
# worker side (one per rank, under torchrun)
# ----------------------------------------------------------------------------------------------
def build_model(param_bytes: int, seed: int = 0):
    """An FSDP2-sharded MLP with about ``param_bytes`` bytes of fp32 parameters (in all ranks)."""
    import torch
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    dev = "cuda" if torch.cuda.is_available() else "cpu"
    mesh = init_device_mesh(dev, (dist.get_world_size(),))
    torch.manual_seed(seed)
    n = max(1, round(param_bytes / ((HIDDEN * HIDDEN + HIDDEN) * 4)))
    with torch.device(dev):
        model = torch.nn.Sequential(*[torch.nn.Linear(HIDDEN, HIDDEN) for _ in range(n)])
    for m in model:
        fully_shard(m, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model


def cases(w: Any, make_case: Callable[..., Any], write_fsync: Callable[[str, Any], None], floor: Callable[..., Any], size: int, model,
          per_rank: int) -> tuple[list[Any], Callable[[], None]]:
    """The five cases at one size, and a function that closes the publishers.

    ``w`` is the script's ``Worker`` (``rank``, ``ws``, ``root``, ``barrier()``, ``s.timeout``);
    ``make_case`` its ``Case`` class; ``write_fsync(path, flat_tensor)`` its raw write + fsync;
    ``floor(flat_src, flat_dst)`` its staging floor (``staging_floor``: the copy and its note).
    """
    import torch

    from prime_ckpt.publisher import WeightsPublisher
    from prime_ckpt.weights import save_weights

    rank = w.rank
    root = w.root / f"weights{size}"
    if rank == 0:
        root.mkdir(parents=True, exist_ok=True)
    w.barrier()
    config = {"architectures": ["Sequential"], "hidden_size": HIDDEN, "num_layers": len(model)}
    flat_src = torch.empty(per_rank // 4, dtype=torch.float32).fill_(1.0)
    flat_dst = torch.empty_like(flat_src).fill_(0.0)
    out: list[Any] = []

    def remove_step(base: Path) -> Callable[[int], None]:
        def cleanup(rep: int) -> None:
            w.barrier()
            if rank == 0:
                shutil.rmtree(base / "weights" / f"step_{rep + 1}", ignore_errors=True)
            settle()
            w.barrier()

        return cleanup

    def gather(rep: int) -> tuple[float, float, dict[str, float]]:
        t0 = time.perf_counter()
        save_weights(root / "gather", rep + 1, model, config)
        dt = time.perf_counter() - t0
        return dt, dt, {}

    out.append(make_case("weights_gather", "local", "weights", gather, cleanup=remove_step(root / "gather"),
                         note="save_weights: full state dict gathered onto rank 0, one model.safetensors written there"))
    publishers = []
    for name, is_async in (("weights_sync", False), ("weights_async", True)):
        pub = WeightsPublisher(root / name, save_async=is_async, config=config, timeout_s=w.s.timeout)
        publishers.append(pub)

        def publish(rep: int, pub=pub) -> tuple[float, float, dict[str, float]]:
            rec = pub.publish(rep + 1, model)
            pub.wait()
            return rec.blocking_s, rec.ready_s, {"staging_s": rec.staging_s}

        out.append(make_case(name, "local", "weights", publish, cleanup=remove_step(root / name),
                             note=f"WeightsPublisher {'async' if is_async else 'sync'}: sharded, one file per rank"))
        out[-1].publisher = pub

    copy_floor, _ = floor(flat_src, flat_dst)

    def timed(fn: Callable[[], Any]) -> tuple[float, float, dict[str, float]]:
        t0 = time.perf_counter()
        fn()
        dt = time.perf_counter() - t0
        return dt, dt, {}

    def raw_path(rep: int) -> str:
        return str(root / f"raw_{rep}_r{rank}.bin")

    def raw_cleanup(rep: int) -> None:
        Path(raw_path(rep)).unlink(missing_ok=True)
        settle()

    out.append(make_case("weights_raw_write", "local", "weights", lambda rep: timed(lambda: write_fsync(raw_path(rep), flat_src)),
                         cleanup=raw_cleanup, note="each rank writes its share (param bytes / world size) to its own file + fsync"))
    out.append(make_case("weights_memcpy", "memory", "weights", lambda rep: timed(copy_floor), cleanup=lambda rep: settle(),
                         note="warm copy of the per-rank bytes (staging limit)"))

    def close() -> None:
        for pub in publishers:
            pub.close()
        w.barrier()
        if rank == 0:
            shutil.rmtree(root, ignore_errors=True)
        w.barrier()

    return out, close


def run(w: Any, make_case: Callable[..., Any], write_fsync: Callable[[str, Any], None], floor: Callable[..., Any]) -> None:
    """Every weights size of ``w.s.weights_sizes``: build the model, run the cases with
    ``w.run_cases`` (which appends one record per case to ``w.records``), add rank 0's publish
    sizes and the load average to those records."""
    for size in w.s.weights_sizes:
        t0 = time.perf_counter()
        model = build_model(size)
        per_rank = sum(p.to_local().numel() * p.element_size() for p in model.parameters())
        total = w.sum_all(per_rank)
        w.log(f"weights {_fmt_size(size)}: {total / MiB:.0f} MiB of parameters, {per_rank / MiB:.0f} MiB/rank")
        cs, close = cases(w, make_case, write_fsync, floor, size, model, per_rank)
        gc.collect()
        settle()
        w.run_cases(cs, w.s.reps, total, per_rank, size)
        for c, rec in zip(cs, w.records[-len(cs):]):
            rec["param_bytes"] = total
            rec["loadavg"] = list(os.getloadavg())
            pub = getattr(c, "publisher", None)
            if pub is not None and pub.records:
                last = pub.records[-1]
                rec["staged_bytes"], rec["file_bytes"] = last.staged_bytes, last.file_bytes
                # memory the publisher keeps between publishes (reused staging buffers, the two
                # scratch buffers): in the RSS baseline, so the peak adds it back
                rec["held_bytes"] = pub._stager.buffer_bytes + sum(t.numel() for t in pub._scratch)
        close()
        del model, cs
        gc.collect()
        settle()
        w.log(f"weights {_fmt_size(size)} done in {time.perf_counter() - t0:.0f} s")


# ----------------------------------------------------------------------------------------------
# launcher side: targets, explanations, markdown, plot
# ----------------------------------------------------------------------------------------------
def _records(records: list[dict]) -> list[dict]:
    return [r for r in records if r["kind"] == "weights" and r.get("durable_s")]


def _find(records: list[dict], case: str, ws: int, size: int) -> dict | None:
    return next((r for r in _records(records) if r["case"] == case and r["world_size"] == ws and r["size_bytes"] == size), None)


def _med(r: dict | None, key: str) -> float | None:
    return r[key]["median"] if r and r.get(key) else None


def _rss(r: dict | None) -> float | None:
    """Rank 0's highest extra RSS over the repetitions (bytes)."""
    x = r.get("peak_extra_rss_rank0_bytes") if r else None
    return x["max"] if x else None


def ratios(records: list[dict], ws: int, size: int) -> dict[str, float | None]:
    """The four target ratios at one world size and size (None where a case is missing)."""
    a, g = _find(records, "weights_async", ws, size), _find(records, "weights_gather", ws, size)
    blk, ready = _med(a, "blocking_s"), _med(a, "durable_s")
    mem = _med(_find(records, "weights_memcpy", ws, size), "durable_s")
    raw = _med(_find(records, "weights_raw_write", ws, size), "durable_s")
    gb = _med(g, "blocking_s")
    rss, share = _rss(a), (a["per_rank_bytes"] if a else None)
    if rss is not None:
        rss += a.get("held_bytes", 0)  # the buffers a publisher holds across steps count too
    return {
        "weights_blocking_vs_memcpy": blk / mem if blk and mem else None,
        "weights_ready_vs_raw_write": raw / ready if raw and ready else None,
        "weights_peak_rss_vs_share": rss / share if rss is not None and share else None,
        "weights_vs_gather_blocking": blk / gb if blk and gb else None,
    }


LIMITS = {  # name: (limit, smaller is better)
    "weights_blocking_vs_memcpy": (1.5, True),
    "weights_ready_vs_raw_write": (0.8, False),
    "weights_peak_rss_vs_share": (1.5, True),
    "weights_vs_gather_blocking": (0.1, True),
}


def compute_targets(records: list[dict]) -> dict[str, Any]:
    """The four weights targets at the reference configuration: the largest world size that
    measured weights, at 1 GiB of parameters if measured, else the largest size."""
    recs = _records(records)
    if not recs:
        return {}
    ws = max(r["world_size"] for r in recs)
    sizes = {r["size_bytes"] for r in recs if r["world_size"] == ws}
    size = GiB if GiB in sizes else max(sizes)
    ref = f"world size {ws}, {_fmt_size(size)} of fp32 parameters"
    how = {
        "weights_blocking_vs_memcpy": f"WeightsPublisher async blocking (publish() stall) / warm memcpy of the per-rank bytes, median, {ref}",
        "weights_ready_vs_raw_write": f"raw write+fsync of the per-rank bytes (all ranks in parallel) / async publish time until COMPLETE, median, {ref}",
        "weights_peak_rss_vs_share": f"(rank 0's highest extra RSS during an async publish, from right before the call until COMPLETE, "
                                     f"after a warm-up publish; plus the buffers the publisher holds across steps: reused staging "
                                     f"buffers and two scratch buffers) / rank 0's share of the bytes, {ref}",
        "weights_vs_gather_blocking": f"WeightsPublisher async blocking / save_weights (gather to rank 0, one file) blocking, median, {ref}",
    }
    targets: dict[str, Any] = {}
    for name, value in ratios(records, ws, size).items():
        limit, smaller = LIMITS[name]
        holds = value is not None and (value <= limit if smaller else value >= limit)
        targets[name] = {"value": value, "limit": limit, "holds": bool(holds), "how": how[name]}
    targets["_weights_reference"] = {"world_size": ws, "size_bytes": size}
    return targets


def explain(result: dict[str, Any]) -> None:
    """Attach the measurement behind each weights target that does not hold, as ``why``."""
    t = result["targets"]
    ref = t.get("_weights_reference")
    if not ref:
        return
    recs, ws, size = result["records"], ref["world_size"], ref["size_bytes"]
    a, s = _find(recs, "weights_async", ws, size), _find(recs, "weights_sync", ws, size)
    g = _find(recs, "weights_gather", ws, size)
    raw, mem = _find(recs, "weights_raw_write", ws, size), _find(recs, "weights_memcpy", ws, size)
    load = f"; 1-min load average {a['loadavg'][0]:.1f} at the end of this size" if a and a.get("loadavg") else ""

    def rounds(num: dict | None, nkey: str, den: dict | None, dkey: str) -> str:
        """The ratio within each repetition (the cases of one repetition ran back to back)."""
        pairs = zip((num or {}).get("samples", {}).get(nkey, []), (den or {}).get("samples", {}).get(dkey, []))
        return ", ".join(f"{x / y:.2f}" for x, y in pairs if y)

    why = {
        "weights_blocking_vs_memcpy": lambda: (f"async blocking {_med(a, 'blocking_s'):.3f} s of which staging copy "
                                               f"{_med(a, 'staging_s') or 0:.3f} s; memcpy {_med(mem, 'durable_s'):.3f} s; "
                                               f"per repetition {rounds(a, 'blocking_s', mem, 'durable_s')}{load}"),
        "weights_ready_vs_raw_write": lambda: (f"async ready {_med(a, 'durable_s'):.3f} s (sync {_med(s, 'durable_s') or float('nan'):.3f} s) "
                                               f"vs raw write+fsync {_med(raw, 'durable_s'):.3f} s; per repetition "
                                               f"{rounds(raw, 'durable_s', a, 'durable_s')}{load}"),
        "weights_peak_rss_vs_share": lambda: (f"rank 0 peak extra {(_rss(a) or 0) / MiB:.0f} MiB + held buffers {a.get('held_bytes', 0) / MiB:.0f} MiB "
                                              f"vs share {a['per_rank_bytes'] / MiB:.0f} MiB"),
        "weights_vs_gather_blocking": lambda: (f"async blocking {_med(a, 'blocking_s'):.3f} s vs gather {_med(g, 'blocking_s'):.3f} s"),
    }
    for name in TARGET_NAMES:
        if name in t and not t[name]["holds"] and t[name]["value"] is not None:
            t[name]["why"] = why[name]()


def markdown_lines(result: dict[str, Any]) -> list[str]:
    """The markdown section of the weights cases (empty when none ran)."""
    recs = _records(result["records"]) + [r for r in result["records"] if r["kind"] == "weights" and not r.get("durable_s")]
    if not recs:
        return []
    lines = [
        "## Weights publish",
        "",
        "Size = bytes of fp32 model parameters, total over ranks. Blocking = the caller's stall; ready = from the call "
        "until `COMPLETE` (the gather: the whole call); rank-0 RSS = rank 0's highest RSS during the publish minus its RSS "
        "right before the call, after a warm-up publish (the staging buffers exist already), max over the repetitions; "
        "share = rank 0's bytes (parameter bytes / world size).",
        "",
        "| world | params | case | blocking s | ready s | staging s | rank-0 peak extra RSS MiB | ÷ share | load avg (1 min, end of size) | note |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in recs:
        rss = _rss(r)
        mib, share = ("—", "—") if rss is None else (f"{rss / MiB:.0f}", f"{rss / r['per_rank_bytes']:.3f}")
        load = f"{r['loadavg'][0]:.2f}" if r.get("loadavg") else "—"
        lines.append(
            f"| {r['world_size']} | {_fmt_size(r['size_bytes'])} | {r['case']} | {_fmt_s(r.get('blocking_s'))} | "
            f"{_fmt_s(r.get('durable_s'))} | {_fmt_s(r.get('staging_s'))} | {mib} | {share} | {load} | {r['error'] or r['note']} |"
        )
    configs = sorted({(r["world_size"], r["size_bytes"]) for r in _records(result["records"])})
    lines += ["", "Target ratios at every measured configuration (the targets below take the reference one):", "",
              "| world | params | " + " | ".join(TARGET_NAMES) + " |", "|---|---|" + "---|" * len(TARGET_NAMES)]
    for ws, size in configs:
        vals = ratios(result["records"], ws, size)
        lines.append(f"| {ws} | {_fmt_size(size)} | " + " | ".join("—" if vals[n] is None else f"{vals[n]:.3f}" for n in TARGET_NAMES) + " |")
    return [*lines, ""]


def plot_row(axes: list[Any], records: list[dict], world_sizes: list[int]) -> None:
    """One axis per world size: blocking (solid) and ready (dashed) of each weights case vs size."""
    recs = _records(records)
    for ax, ws in zip(axes, world_sizes):
        for i, case in enumerate(CASES):
            pts = sorted((r["size_bytes"], r["blocking_s"]["median"], r["durable_s"]["median"])
                         for r in recs if r["world_size"] == ws and r["case"] == case)
            if not pts:
                continue
            color = f"C{i}"
            ax.plot([p[0] / GiB for p in pts], [p[1] for p in pts], "-", marker="o", color=color, label=f"{case} blocking")
            if case in ("weights_sync", "weights_async"):
                ax.plot([p[0] / GiB for p in pts], [p[2] for p in pts], "--", marker="x", color=color, label=f"{case} ready")
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("fp32 parameters (GiB, total)")
        ax.set_ylabel("s, median")
        ax.set_title(f"world size {ws}: weights publish (solid: blocking, dashed: until COMPLETE)")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7)

