"""``scaling.json`` / ``scaling.md`` / ``scaling.png`` from one run's result."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from ckpt_bench.scaling.growth import fit_growth, predict


def _num(v: float, unit: str = "") -> str:
    if unit == "B":
        for u, s in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
            if v >= s:
                return f"{v / s:.3g} {u}"
        return f"{v:.0f} B"
    if unit == "s":
        return f"{v * 1e3:.3g} ms" if v < 1 else f"{v:.3g} s"
    return f"{v:.4g}"


def _table(head: list[str], rows: list[list[Any]]) -> list[str]:
    return ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)] + ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]


def markdown(result: dict[str, Any]) -> str:
    s = result["settings"]
    lines = [f"# How cost grows (`benchmarks/scaling.py`{' --quick' if s['quick'] else ''})", "",
             f"Run {result['created']} on {result['environment'].get('cpu_count')} CPUs, torch {result['environment'].get('torch')}; "
             f"wall {result['wall_s']:.0f} s. Series: {', '.join(s['series'])}.", ""]
    g = result.get("growth", [])
    if g:
        lines += ["## Growth", "", "Fit: `y = a + c·f(n)` (a, c ≥ 0) by relative residual; exponent = log-log slope over all "
                  "points (last: between the two largest n).", ""]
        lines += _table(["quantity", "n", "first → last", "law", "exponent (last)"],
                        [[r["label"], f"{r['n'][0]:g} → {r['n'][1]:g}", f"{_num(r['y'][0], r['unit'])} → {_num(r['y'][1], r['unit'])}",
                          r["law"], f"{r['exponent']:.2f} ({r['exponent_last']:.2f})"] for r in g])
        lines.append("")
    dcp = result.get("dcp")
    if dcp:
        lines += ["## DCP save planning and `.metadata` (simulated ranks)", ""]
        for sweep, pts in dcp["points"].items():
            lines += [f"Sweep over {sweep}:", ""]
            lines += _table(["tensors", "ranks", "chunks", "plan (coordinator)", ".metadata", "gathered plans", "safe decode",
                             "pickle.loads", "load plan (1 rank)"],
                            [[p["tensors"], p["ranks"], p["chunks"], _num(p["plan_s"], "s"), _num(p["metadata_bytes"], "B"),
                              _num(p["plans_bytes"], "B"), _num(p["decode_s"], "s"), _num(p["pickle_loads_s"], "s"),
                              _num(p["load_plan_rank_s"], "s")] for p in pts])
            lines.append("")
        for sk in dcp.get("skipped", []):
            lines.append(f"- skipped {sk['tensors']} tensors x {sk['ranks']} ranks: predicted {sk['predicted_s']:.0f} s")
    ret = result.get("retention")
    if ret:
        lines += ["## Retention planning (pure `plan`, synthetic inventories)", ""]
        rows = [[name, p["steps"], _num(p["plan_s"], "s"), p["keeps"], p["deletes"]] for name, pts in ret["points"].items() for p in pts]
        lines += _table(["policy", "steps (ckpt + weights each)", "plan", "kept", "deleted"], rows) + [""]
        for sk in ret.get("skipped", []):
            lines.append(f"- skipped {sk['policy']} at {sk['steps']} steps: predicted {sk['predicted_s']:.0f} s")
    s3 = result.get("s3")
    if s3:
        lines += ["## `prime-ckpt list` / `verify` on S3 (moto)", "",
                  f"Each a fresh process (import alone: {_num(s3.get('cli_startup_s', 0), 's')}); requests counted at the server.", ""]
        lines += _table(["steps", "objects", "list", "list requests", "verify", "verify requests", "verify by kind"],
                        [[p["steps"], p["objects"], _num(p["list_s"], "s") if p.get("list_s") else "skipped", p.get("list_requests", "—"),
                          _num(p["verify_s"], "s") if p.get("verify_s") else "skipped", p.get("verify_requests", "—"),
                          ", ".join(f"{k} {v}" for k, v in sorted(p.get("verify_by_kind", {}).items()))] for p in s3["points"]["s3"]])
        lines.append("")
        for sk in s3.get("skipped", []):
            lines.append(f"- skipped `{sk['command']}` at {sk['steps']} steps: predicted {sk['predicted_s']:.0f} s")
    rs = result.get("reshard")
    if rs:
        lines += ["## Load time vs world-size change (save N ranks, load M)", "",
                  f"CPU/gloo ranks on {rs.get('cpu_cores')} cores; `vs same` = load N→M over load M→M.", ""]
        lines += _table(["size", "N → M", "load (median)", "min–max", "vs same"],
                        [[_num(p["size_bytes"], "B"), f"{p['save_ranks']} → {p['load_ranks']}", _num(p["load_s"], "s"),
                          f"{p['load_min_s']:.3f}–{p['load_max_s']:.3f}", f"{p['vs_same']:.2f}"] for p in rs["points"]["reshard"]])
        lines.append("")
    ex = result.get("extrapolation", {})
    if ex.get("dcp"):
        lines += ["## Extrapolated to large jobs (fits on chunks = tensors x ranks)", ""]
        lines += _table(["job", "chunks", ".metadata", "plan (coordinator)", "safe decode", "gathered plans", "load plan (1 rank)"],
                        [[j["job"], f"{j['chunks']:.3g}", _num(j["metadata_bytes_pred"], "B"), _num(j["plan_s_pred"], "s"),
                          _num(j["decode_s_pred"], "s"), _num(j["plans_bytes_pred"], "B"), _num(j["load_plan_rank_s_pred"], "s")]
                         for j in ex["dcp"]])
        lines.append("")
    if result.get("errors"):
        lines += ["## Errors", ""] + [f"- {e}" for e in result["errors"]]
    return "\n".join(lines) + "\n"


def _panel(ax, title: str, xlabel: str, ylabel: str, curves: list[tuple[str, list[float], list[float]]]) -> None:
    """Measured points (solid, markers) and each one's fitted law (dashed, same colour)."""
    import numpy as np

    for i, (name, xs, ys) in enumerate(curves):
        pts = [(x, y) for x, y in zip(xs, ys) if y > 0]
        if not pts:
            continue
        colour = f"C{i}"
        ax.plot([p[0] for p in pts], [p[1] for p in pts], "o-", color=colour, label=name, lw=1.5)
        if len({p[0] for p in pts}) >= 2:
            fit = fit_growth([p[0] for p in pts], [p[1] for p in pts])
            grid = np.geomspace(min(p[0] for p in pts), max(p[0] for p in pts), 50)
            ax.plot(grid, [max(predict(fit, g), 1e-12) for g in grid], "--", color=colour, alpha=0.6,
                    label=f"fit: {fit['law']} (slope {fit['exponent']:.2f})")
    from matplotlib.ticker import NullFormatter

    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.xaxis.set_minor_formatter(NullFormatter())
    xs_all = sorted({x for _, xs, _ in curves for x in xs})
    if xs_all:  # the measured n as the ticks: short ranges (1-4 ranks, 3-60 steps) stay legible
        ax.set_xticks(xs_all, [f"{x:g}" for x in xs_all])
    ax.set_title(title, fontsize=10)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.grid(True, which="both", alpha=0.25)
    ax.legend(fontsize=7, loc="upper left")


def plot(result: dict[str, Any], path: Path) -> bool:
    """One log-log panel per series; False when there is nothing to draw."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = []
    dcp = result.get("dcp", {}).get("points", {})
    for sweep, xl in (("tensors", "tensors (8 ranks)"), ("ranks", "ranks (1e3 tensors)")):
        pts = dcp.get(sweep, [])
        if pts:
            xs = [p[sweep] for p in pts]
            panels.append((f"DCP .metadata and gathered plans vs {sweep}", xl, "bytes",
                           [(".metadata", xs, [p["metadata_bytes"] for p in pts]), ("gathered plans", xs, [p["plans_bytes"] for p in pts])]))
            panels.append((f"DCP planning and safe decode vs {sweep}", xl, "seconds",
                           [("create_global_plan (coordinator)", xs, [p["plan_s"] for p in pts]),
                            ("decode_dcp_metadata (safe)", xs, [p["decode_s"] for p in pts]),
                            ("load plan, one rank", xs, [p["load_plan_rank_s"] for p in pts])]))
    ret = result.get("retention", {}).get("points", {})
    if ret:
        panels.append(("retention plan vs steps on disk", "steps (checkpoints; as many weights)", "seconds",
                       [(name, [p["steps"] for p in pts], [p["plan_s"] for p in pts]) for name, pts in ret.items() if pts]))
    s3 = result.get("s3", {}).get("points", {}).get("s3", [])
    if s3:
        def cmd(c: str, f: str):
            pts = [p for p in s3 if p.get(f"{c}_{f}")]
            return (c, [p["steps"] for p in pts], [p[f"{c}_{f}"] for p in pts])

        panels.append(("S3 requests vs steps (moto)", "checkpoint steps in the bucket", "requests",
                       [cmd("list", "requests"), cmd("verify", "requests")]))
        panels.append(("CLI time vs steps on S3 (fresh process)", "checkpoint steps in the bucket", "seconds",
                       [cmd("list", "s"), cmd("verify", "s")]))
    rs = result.get("reshard", {}).get("points", {}).get("reshard", [])
    if rs:
        size = max(p["size_bytes"] for p in rs)
        curves = []
        for n in sorted({p["save_ranks"] for p in rs}):
            pts = sorted((p["load_ranks"], p["load_s"]) for p in rs if p["size_bytes"] == size and p["save_ranks"] == n)
            curves.append((f"saved at {n}", [p[0] for p in pts], [p[1] for p in pts]))
        panels.append((f"load time vs load ranks ({size >> 20} MiB)", "ranks loading (M)", "seconds", curves))
    if not panels:
        return False
    cols = 3
    rows = (len(panels) + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(5.2 * cols, 4.2 * rows), squeeze=False)
    for ax, p in zip(axes.flat, panels):
        _panel(ax, *p)
    for ax in list(axes.flat)[len(panels):]:
        ax.axis("off")
    fig.suptitle("How cost grows (log-log; dashed: fitted law)", fontsize=12)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def write_outputs(result: dict[str, Any], results_dir: Path, name: str, with_plot: bool) -> Path:
    results_dir.mkdir(parents=True, exist_ok=True)
    base = results_dir / name
    base.with_suffix(".json").write_text(json.dumps(result, indent=1, sort_keys=False) + "\n")
    base.with_suffix(".md").write_text(markdown(result))
    if with_plot:
        plot(result, base.with_suffix(".png"))
    return base
