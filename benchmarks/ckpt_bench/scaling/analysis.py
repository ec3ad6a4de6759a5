"""The growth table and the extrapolations to 1,000+ ranks, from the measured series.

:func:`growth_rows` fits every measured quantity (:mod:`growth`) against what it grows with;
:func:`extrapolate` uses the fits on DCP chunks (tensors x ranks) and on steps to say what each
cost would be at the sizes of a large job.
"""

from __future__ import annotations

from typing import Any

from ckpt_bench.scaling.growth import fit_growth, predict

#: (series key, sweep key, x field, y field, label, unit) of every fitted quantity.
QUANTITIES = [
    ("dcp", "tensors", "tensors", "metadata_bytes", ".metadata size vs tensors (8 ranks)", "B"),
    ("dcp", "tensors", "tensors", "plan_s", "coordinator planning vs tensors (8 ranks)", "s"),
    ("dcp", "tensors", "tensors", "decode_s", "safe .metadata decode vs tensors (8 ranks)", "s"),
    ("dcp", "ranks", "ranks", "metadata_bytes", ".metadata size vs ranks (1e3 tensors)", "B"),
    ("dcp", "ranks", "ranks", "plan_s", "coordinator planning vs ranks (1e3 tensors)", "s"),
    ("dcp", "ranks", "ranks", "plans_bytes", "gathered local plans vs ranks (1e3 tensors)", "B"),
    ("dcp", "ranks", "ranks", "decode_s", "safe .metadata decode vs ranks (1e3 tensors)", "s"),
    ("dcp", "ranks", "ranks", "load_plan_rank_s", "one rank's load planning vs ranks (1e3 tensors)", "s"),
    ("retention", "keep3", "steps", "plan_s", "retention plan vs steps (keep=3)", "s"),
    ("retention", "keep3_every100", "steps", "plan_s", "retention plan vs steps (keep=3, keep_interval=100)", "s"),
    ("s3", "s3", "steps", "list_requests", "`list` S3 requests vs steps", "req"),
    ("s3", "s3", "steps", "list_s", "`list` time vs steps (S3, moto)", "s"),
    ("s3", "s3", "steps", "verify_requests", "`verify` S3 requests vs steps", "req"),
    ("s3", "s3", "steps", "verify_s", "`verify` time vs steps (S3, moto)", "s"),
]


def _reshard_quantities(result: dict[str, Any]) -> list[tuple[str, list[float], list[float], str, str]]:
    """Load time vs load ranks at the same world size (N = M), per state size."""
    rows = result.get("reshard", {}).get("points", {}).get("reshard", [])
    out = []
    for size in sorted({r["size_bytes"] for r in rows}):
        diag = sorted((r["load_ranks"], r["load_s"]) for r in rows if r["size_bytes"] == size and r["save_ranks"] == r["load_ranks"])
        if len(diag) >= 2:
            out.append((f"load time vs ranks, N = M ({size >> 20} MiB)", [d[0] for d in diag], [d[1] for d in diag], "s",
                        "reshard"))
    return out


def growth_rows(result: dict[str, Any]) -> list[dict[str, Any]]:
    """One row per fitted quantity: label, unit, n range, first/last value, the fit."""
    rows = []
    series: list[tuple[str, list[float], list[float], str, str]] = []
    for key, sweep, xf, yf, label, unit in QUANTITIES:
        pts = [p for p in result.get(key, {}).get("points", {}).get(sweep, []) if p.get(yf) is not None]
        if len(pts) >= 2:
            series.append((label, [p[xf] for p in pts], [p[yf] for p in pts], unit, key))
    series += _reshard_quantities(result)
    for label, xs, ys, unit, key in series:
        if min(ys) <= 0 or len(set(xs)) < 2:
            continue
        fit = fit_growth(xs, ys)
        rows.append({"label": label, "series": key, "unit": unit, "n": [min(xs), max(xs)], "y": [ys[0], ys[-1]], **fit})
    return rows


#: Sizes of a large job the extrapolations are made at: (label, ranks, tensors).
JOBS = [("1024 ranks x 3e3 tensors (a 70B model's params + AdamW)", 1024, 3000),
        ("4096 ranks x 3e3 tensors", 4096, 3000),
        ("1024 ranks x 1e5 tensors", 1024, 100_000)]


def extrapolate(result: dict[str, Any]) -> dict[str, Any]:
    """Fits on chunks (every DCP point, both sweeps) predicted at :data:`JOBS`, and the per-step
    and per-object costs of retention and S3 at 10^4 / 10^5 steps."""
    out: dict[str, Any] = {"dcp": [], "retention": {}, "s3": {}}
    pts = [p for sweep in result.get("dcp", {}).get("points", {}).values() for p in sweep]
    if len({p["chunks"] for p in pts}) >= 2:
        fits = {f: fit_growth([p["chunks"] for p in pts], [p[f] for p in pts])
                for f in ("metadata_bytes", "plan_s", "decode_s", "pickle_loads_s", "plans_bytes", "load_plan_rank_s")}
        out["dcp_fits_on_chunks"] = {f: {k: v for k, v in fit.items() if k != "residuals"} for f, fit in fits.items()}
        biggest = max(pts, key=lambda p: p["chunks"])
        out["bytes_per_chunk"] = biggest["metadata_bytes"] / biggest["chunks"]
        out["plan_s_per_chunk"] = biggest["plan_s"] / biggest["chunks"]
        for label, ranks, tensors in JOBS:
            c = ranks * tensors
            out["dcp"].append({"job": label, "ranks": ranks, "tensors": tensors, "chunks": c,
                               **{f"{f}_pred": predict(fit, c) for f, fit in fits.items()}})
    for name, rows in result.get("retention", {}).get("points", {}).items():
        if len(rows) >= 2:
            fit = fit_growth([r["steps"] for r in rows], [r["plan_s"] for r in rows])
            out["retention"][name] = {"law": fit["law"], "plan_s_at_1e5": predict(fit, 1e5), "plan_s_at_1e6": predict(fit, 1e6),
                                      "measured_max_steps": rows[-1]["steps"]}
    s3 = result.get("s3", {}).get("points", {}).get("s3", [])
    for cmd in ("list", "verify"):
        rows = [r for r in s3 if r.get(f"{cmd}_s")]
        if rows:
            last = rows[-1]
            out["s3"][cmd] = {"steps": last["steps"], "requests_per_step": last[f"{cmd}_requests"] / last["steps"],
                              "s_per_step": last[f"{cmd}_s"] / last["steps"]}
        if len(rows) >= 2:
            for f in ("requests", "s"):
                fit = fit_growth([r["steps"] for r in rows], [r[f"{cmd}_{f}"] for r in rows])
                out["s3"][cmd][f"{f}_law"] = fit["law"]
                out["s3"][cmd][f"{f}_at_1e3"] = predict(fit, 1e3)
                out["s3"][cmd][f"{f}_at_1e4"] = predict(fit, 1e4)
    return out
