"""Series 2: retention planning time vs steps on disk, on synthetic inventories.

The inventory holds ``n`` complete checkpoint steps (``checkpoints/step_1..n``, trainer part) and
``n`` complete weights steps; :func:`prime_ckpt.retention.plan` (pure, no I/O) decides every one.
Two policies, side by side:

* ``keep3``: ``keep=3, async_level=2`` (a handful of kept checkpoints, whatever n is);
* ``keep3_every100``: also ``keep_interval=100`` (kept checkpoints grow as n/100, and every
  weights step is checked against the weights window of each kept checkpoint).

Each point is the median of a few runs (one when it takes over a second). A point predicted (from
the last two, by their local exponent) to take over ``max_point_s`` is skipped and listed.
"""

from __future__ import annotations

import math
import statistics
import time
from pathlib import PurePosixPath
from typing import Any

POLICIES = {"keep3": {"keep": 3, "async_level": 2}, "keep3_every100": {"keep": 3, "keep_interval": 100, "async_level": 2}}


def inventory(n: int):
    """``n`` complete checkpoint steps and ``n`` complete weights steps (steps 1..n)."""
    from prime_ckpt.layout import CheckpointStep, Inventory, WeightsStep

    root = PurePosixPath("/run")
    ckpts = tuple(CheckpointStep(s, root / "checkpoints" / f"step_{s}", {"trainer": True}, ("trainer",)) for s in range(1, n + 1))
    weights = tuple(WeightsStep(s, root / "weights" / f"step_{s}", True) for s in range(1, n + 1))
    return Inventory(ckpts, weights)


def time_plan(n: int, policy_kw: dict[str, Any]) -> dict[str, Any]:
    """Median seconds of ``plan`` over an ``n``-step inventory, and what it decided."""
    from prime_ckpt.retention import RetentionPolicy, plan

    inv = inventory(n)
    policy = RetentionPolicy(**policy_kw)
    times: list[float] = []
    result = None
    while len(times) < 5 and sum(times) < 1.0:
        t0 = time.perf_counter()
        result = plan(inv, policy)
        times.append(time.perf_counter() - t0)
    assert result is not None and len(result.entries) == 2 * n
    return {"steps": n, "plan_s": statistics.median(times), "runs": len(times), "deletes": len(result.deletes),
            "keeps": len(result.keeps)}


def run(quick: bool, max_point_s: float, log) -> dict[str, Any]:
    ladder = (10, 100, 1000) if quick else (10, 100, 1000, 10_000, 100_000)
    out: dict[str, Any] = {"points": {}, "skipped": []}
    for name, kw in POLICIES.items():
        rows: list[dict] = []
        for n in ladder:
            if len(rows) >= 2:
                (a, b) = rows[-2], rows[-1]
                k = max(1.0, math.log(b["plan_s"] / a["plan_s"]) / math.log(b["steps"] / a["steps"]))
                guess = b["plan_s"] * (n / b["steps"]) ** k
                if guess > max_point_s:
                    out["skipped"].append({"policy": name, "steps": n, "predicted_s": guess})
                    log(f"  retention {name}: skip {n} steps (predicted {guess:.0f} s > {max_point_s:.0f} s)")
                    continue
            row = time_plan(n, kw)
            log(f"  retention {name}: {n} steps: {row['plan_s'] * 1e3:.2f} ms ({row['keeps']} kept)")
            rows.append(row)
        out["points"][name] = rows
    return out
