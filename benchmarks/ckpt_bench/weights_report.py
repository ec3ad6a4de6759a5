"""The weights publishing cases on the launcher side: their four targets, the explanation of a
target that does not hold and the markdown section (all from the result dict); their plot row is
drawn by :mod:`ckpt_bench.plot`."""

from __future__ import annotations

from typing import Any

from ckpt_bench.common import GiB, MiB, find_record, fmt_s, fmt_size, median_of, target

CASES = ("weights_gather", "weights_sync", "weights_async", "weights_raw_write", "weights_memcpy")
TARGET_NAMES = ("weights_blocking_vs_memcpy", "weights_ready_vs_raw_write", "weights_peak_rss_vs_share", "weights_vs_gather_blocking")


def _records(records: list[dict]) -> list[dict]:
    return [r for r in records if r["kind"] == "weights" and r.get("durable_s")]


def _rss(r: dict | None) -> float | None:
    """Rank 0's highest extra RSS over the repetitions (bytes)."""
    x = r.get("peak_extra_rss_rank0_bytes") if r else None
    return x["max"] if x else None


def ratios(records: list[dict], ws: int, size: int) -> dict[str, float | None]:
    """The four target ratios at one world size and size (None where a case is missing)."""
    a, g = find_record(records, "weights_async", ws, size), find_record(records, "weights_gather", ws, size)
    blk, ready = median_of(a, "blocking_s"), median_of(a, "durable_s")
    mem = median_of(find_record(records, "weights_memcpy", ws, size), "durable_s")
    raw = median_of(find_record(records, "weights_raw_write", ws, size), "durable_s")
    gb = median_of(g, "blocking_s")
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
    ref = f"world size {ws}, {fmt_size(size)} of fp32 parameters"
    how = {
        "weights_blocking_vs_memcpy": f"WeightsPublisher async blocking (publish() stall) / warm memcpy of the per-rank bytes, median, {ref}",
        "weights_ready_vs_raw_write": f"raw write+fsync of the per-rank bytes (all ranks in parallel) / async publish time until COMPLETE, median, {ref}",
        "weights_peak_rss_vs_share": f"(rank 0's highest extra RSS during an async publish, from right before the call until COMPLETE, "
                                     f"after a warm-up publish; plus the buffers the publisher holds across steps: reused staging "
                                     f"buffers and two scratch buffers) / rank 0's share of the bytes, {ref}",
        "weights_vs_gather_blocking": f"WeightsPublisher async blocking / save_weights (gather to rank 0, one file) blocking, median, {ref}",
    }
    targets: dict[str, Any] = {name: target(value, *LIMITS[name], how[name]) for name, value in ratios(records, ws, size).items()}
    targets["_weights_reference"] = {"world_size": ws, "size_bytes": size}
    return targets


def explain(result: dict[str, Any]) -> None:
    """Attach the measurement behind each weights target that does not hold, as ``why``."""
    t = result["targets"]
    ref = t.get("_weights_reference")
    if not ref:
        return
    recs, ws, size = result["records"], ref["world_size"], ref["size_bytes"]
    a, s = find_record(recs, "weights_async", ws, size), find_record(recs, "weights_sync", ws, size)
    g = find_record(recs, "weights_gather", ws, size)
    raw, mem = find_record(recs, "weights_raw_write", ws, size), find_record(recs, "weights_memcpy", ws, size)
    load = f"; 1-min load average {a['loadavg'][0]:.1f} at the end of this size" if a and a.get("loadavg") else ""

    def rounds(num: dict | None, nkey: str, den: dict | None, dkey: str) -> str:
        """The ratio within each repetition (the cases of one repetition ran back to back)."""
        pairs = zip((num or {}).get("samples", {}).get(nkey, []), (den or {}).get("samples", {}).get(dkey, []))
        return ", ".join(f"{x / y:.2f}" for x, y in pairs if y)

    why = {
        "weights_blocking_vs_memcpy": lambda: (f"async blocking {median_of(a, 'blocking_s'):.3f} s of which staging copy "
                                               f"{median_of(a, 'staging_s') or 0:.3f} s; memcpy {median_of(mem, 'durable_s'):.3f} s; "
                                               f"per repetition {rounds(a, 'blocking_s', mem, 'durable_s')}{load}"),
        "weights_ready_vs_raw_write": lambda: (f"async ready {median_of(a, 'durable_s'):.3f} s (sync {median_of(s, 'durable_s') or float('nan'):.3f} s) "
                                               f"vs raw write+fsync {median_of(raw, 'durable_s'):.3f} s; per repetition "
                                               f"{rounds(raw, 'durable_s', a, 'durable_s')}{load}"),
        "weights_peak_rss_vs_share": lambda: (f"rank 0 peak extra {(_rss(a) or 0) / MiB:.0f} MiB + held buffers {a.get('held_bytes', 0) / MiB:.0f} MiB "
                                              f"vs share {a['per_rank_bytes'] / MiB:.0f} MiB"),
        "weights_vs_gather_blocking": lambda: (f"async blocking {median_of(a, 'blocking_s'):.3f} s vs gather {median_of(g, 'blocking_s'):.3f} s"),
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
            f"| {r['world_size']} | {fmt_size(r['size_bytes'])} | {r['case']} | {fmt_s(r.get('blocking_s'))} | "
            f"{fmt_s(r.get('durable_s'))} | {fmt_s(r.get('staging_s'))} | {mib} | {share} | {load} | {r['error'] or r['note']} |"
        )
    configs = sorted({(r["world_size"], r["size_bytes"]) for r in _records(result["records"])})
    lines += ["", "Target ratios at every measured configuration (the targets below take the reference one):", "",
              "| world | params | " + " | ".join(TARGET_NAMES) + " |", "|---|---|" + "---|" * len(TARGET_NAMES)]
    for ws, size in configs:
        vals = ratios(result["records"], ws, size)
        lines.append(f"| {ws} | {fmt_size(size)} | " + " | ".join("—" if vals[n] is None else f"{vals[n]:.3f}" for n in TARGET_NAMES) + " |")
    return [*lines, ""]

