"""The plot of a result: grouped bars a reader can compare at a glance (issue 18).

At the reference size (1 GiB when measured, else the largest), one row per storage (local disk,
then S3) with three panels: the training-loop stall (blocking), the time to durable and the load
time. Each panel has a group of bars per world size, one bar per case (ours, the peers and the
baselines side by side, each labelled with its median) and the case's floor as a dashed line
across the group: the memcpy of the per-rank bytes for the stall, the raw write + fsync for
durable, the raw read for the load. When the result has weights publishing records, one more
row: the publish stall, the time until ``COMPLETE`` and rank 0's peak extra RSS over its share.

Colours follow the case's family, taken from its name: ``ckpt_*`` (ours) in blues, ``dcp_*``
(DCP used directly) in oranges, the baselines (``torch_*``, ``raw_*``, ``memcpy``, registry
family ``baselines``) in greys, and any other prefix (e.g. ``titan_*``) its own colour map, so
a new family of cases needs no change here. The full numbers stay in the markdown tables.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ckpt_bench import registry
from ckpt_bench.common import GiB, fmt_size

FLOORS = frozenset({"memcpy", "raw_write", "raw_read", "weights_memcpy", "weights_raw_write"})
_PREFIX_FAMILY = {"ckpt": "ours", "weights": "ours", "dcp": "DCP", "torch": "baseline", "raw": "baseline", "memcpy": "baseline"}
_FAMILY_CMAP = {"ours": "Blues", "DCP": "Oranges", "baseline": "Greys"}
_OTHER_CMAPS = ("Greens", "Purples", "Reds", "RdPu", "YlOrBr", "BuGn", "PuBu", "copper")
_STORAGE_LABEL = {"local": "local disk", "s3": "S3 (moto)"}


def _median(key: str) -> Callable[[dict], float | None]:
    return lambda r: r[key]["median"] if r.get(key) else None


def _rss_vs_share(r: dict) -> float | None:
    """Rank 0's highest extra RSS during a publish plus the buffers held across steps, over its share."""
    rss = r.get("peak_extra_rss_rank0_bytes")
    return (rss["max"] + r.get("held_bytes", 0)) / r["per_rank_bytes"] if rss and r.get("per_rank_bytes") else None


@dataclass(frozen=True)
class Panel:
    """One panel: bars of ``value`` for the records of ``kinds`` and a per-group reference line,
    the ``floor`` case's value (on ``floor_storage``; None = the row's storage) or a constant ``limit``."""

    title: str
    ylabel: str
    kinds: tuple[str, ...]
    value: Callable[[dict], float | None]
    floor: str | None = None
    floor_storage: str | None = None
    limit: float | None = None
    log_ok: bool = True  # a log axis when the bars differ 40-fold


CHECKPOINT_PANELS = (
    Panel("stall (blocking)", "training-loop stall, s (median)", ("save",), _median("blocking_s"), "memcpy", "memory"),
    Panel("time to durable", "until fsync'd / uploaded, s (median)", ("save",), _median("durable_s"), "raw_write"),
    Panel("load", "load, s (median)", ("load",), _median("durable_s"), "raw_read"),
)
WEIGHTS_PANELS = (
    Panel("publish stall", "publish() stall, s (median)", ("weights",), _median("blocking_s"), "weights_memcpy", "memory"),
    Panel("until COMPLETE", "until COMPLETE, s (median)", ("weights",), _median("durable_s"), "weights_raw_write"),
    Panel("rank-0 peak extra RSS", "(peak extra RSS + held buffers) / share", ("weights",), _rss_vs_share,
          limit=1.5, log_ok=False),
)


def family(case: str) -> str:
    """The colour family of ``case``: from its name's prefix (``ckpt_`` ours, ``dcp_`` DCP, any
    other prefix its own family), baselines by name or by registry family."""
    spec = registry.CASES.get(case)
    if spec is not None and spec.family == "baselines":
        return "baseline"
    prefix = case.split("_", 1)[0]
    return _PREFIX_FAMILY.get(prefix, prefix)


def _family_rank(fam: str) -> tuple[int, str]:
    """Ours first, then DCP, then other peers by name, the baselines last."""
    return ({"ours": 0, "DCP": 1, "baseline": 3}.get(fam, 2), fam)


def case_order(cases: set[str]) -> list[str]:
    """``cases`` by family (see :func:`_family_rank`), then in registry order, then by name."""
    reg = list(registry.CASES)
    return sorted(cases, key=lambda c: (_family_rank(family(c)), reg.index(c) if c in reg else len(reg), c))


def case_colors(cases: set[str]) -> dict[str, Any]:
    """One colour per case: a shade of its family's colour map (up to eight peer families beside ours,
    DCP and the baselines each get a map of their own)."""
    import matplotlib

    others = sorted({family(c) for c in cases} - set(_FAMILY_CMAP))
    cmaps = {**_FAMILY_CMAP, **{f: _OTHER_CMAPS[i % len(_OTHER_CMAPS)] for i, f in enumerate(others)}}
    colors: dict[str, Any] = {}
    for fam in {family(c) for c in cases}:
        members = [c for c in case_order(cases) if family(c) == fam]
        cmap = matplotlib.colormaps[cmaps[fam]]
        for i, c in enumerate(members):
            colors[c] = cmap(0.85 - 0.45 * i / (len(members) - 1) if len(members) > 1 else 0.65)
    return colors


def _find(records: list[dict], case: str, ws: int, size: int, storage: str) -> dict | None:
    return next((r for r in records if r["case"] == case and r["world_size"] == ws and r["size_bytes"] == size
                 and r["storage"] == storage and r.get("durable_s")), None)


def _bar_cases(panel: Panel, records: list[dict], storage: str, size: int) -> list[str]:
    return case_order({r["case"] for r in records if r["kind"] in panel.kinds and r["storage"] == storage
                       and r["size_bytes"] == size and r["case"] not in FLOORS and r.get("durable_s")
                       and panel.value(r) is not None})


def _label(v: float) -> str:
    return f"{v:.3f}" if v < 1 else f"{v:.2f}" if v < 10 else f"{v:.1f}"


def draw_panel(ax: Any, panel: Panel, records: list[dict], storage: str, size: int, wss: list[int],
               colors: dict[str, Any], row_label: str = "") -> None:
    """One panel: a group of bars per world size that has any, the median on each bar, the floor
    (or limit) as a dashed line across each group with its name and value."""
    cases = _bar_cases(panel, records, storage, size)
    width = 0.84 / max(len(cases), 1)
    values: list[float] = []
    ticks: list[str] = []
    bar_x: list[float] = []
    bar_names: list[str] = []
    has = {ws: [c for c in cases if (r := _find(records, c, ws, size, storage)) and panel.value(r) is not None] for ws in wss}
    missing = [ws for ws in wss if not has[ws]]
    wss = [ws for ws in wss if has[ws]]
    for g, ws in enumerate(wss):
        drawn = 0
        for i, case in enumerate(cases):
            r = _find(records, case, ws, size, storage)
            v = panel.value(r) if r else None
            if v is None:
                continue
            x = g + (i - (len(cases) - 1) / 2) * width
            ax.bar(x, v, width * 0.9, color=colors[case], edgecolor="black", linewidth=0.4, label=case)
            ax.annotate(_label(v), (x, v), xytext=(0, 2), textcoords="offset points", rotation=90, ha="center",
                        va="bottom", fontsize=8, zorder=5,
                        bbox={"boxstyle": "square,pad=0.05", "facecolor": "white", "edgecolor": "none", "alpha": 0.7})
            values.append(v)
            bar_x.append(x)
            bar_names.append(case)
            drawn += 1
        f_rec = _find(records, panel.floor, ws, size, panel.floor_storage or storage) if panel.floor else None
        floor = panel.value(f_rec) if f_rec else panel.limit
        if floor is not None and drawn:
            ax.plot([g - 0.46, g + 0.46], [floor, floor], "--", color="black", linewidth=1.4, gid="floor")
            values.append(floor)
        floor_text = "" if floor is None else f"\n(- - {panel.floor.removeprefix('weights_') if f_rec else 'limit'} {_label(floor)})"
        ticks.append(f"world size {ws}{floor_text}")
    # each bar's case name under it, the world size (and its floor) under the names
    for x, name in zip(bar_x, bar_names):
        ax.annotate(name, (x, 0), xycoords=ax.get_xaxis_transform(), xytext=(0, -3), textcoords="offset points",
                    rotation=90, ha="center", va="top", fontsize=7)
    ax.set_xticks(range(len(wss)), ticks)
    ax.tick_params(axis="x", length=0, pad=6 + 4.4 * max(map(len, bar_names), default=0))
    ax.set_xlim(-0.5, max(len(wss), 1) - 0.5)
    if missing:
        ax.set_xlabel(f"not measured here: world size {', '.join(map(str, missing))}", fontsize=8, color="dimgray")
    ax.set_title(f"{panel.title}\n{row_label or _STORAGE_LABEL.get(storage, storage) + ', ' + fmt_size(size)}", fontsize=10)
    ax.set_ylabel(panel.ylabel, fontsize=8)
    ax.grid(True, axis="y", which="both", alpha=0.3)
    ax.set_axisbelow(True)
    pos = [v for v in values if v > 0]
    if pos and panel.log_ok and max(pos) / min(pos) > 40:  # bars that differ 40-fold: a log axis keeps the short ones readable
        ax.set_yscale("log")
        ax.set_ylim(min(pos) / 2, max(pos) * 4)
    elif pos:
        ax.set_ylim(0, max(pos) * 1.3)


def reference_size(records: list[dict]) -> int | None:
    """1 GiB when some record measured it, else the largest size measured (None: no records)."""
    sizes = {r["size_bytes"] for r in records if r.get("durable_s")}
    return (GiB if GiB in sizes else max(sizes)) if sizes else None


@dataclass(frozen=True)
class Row:
    """One row of three panels: ``records`` on ``storage`` at ``size``, titled ``label``."""

    label: str
    storage: str
    size: int
    panels: tuple[Panel, ...]
    records: list[dict]

    def cases(self, panel: Panel) -> list[str]:
        return _bar_cases(panel, self.records, self.storage, self.size)


def rows(result: dict[str, Any]) -> list[Row]:
    """The figure's rows: a checkpoint row per storage (local, then S3) at the checkpoint
    reference size, then a weights row at the weights reference size."""
    ckpt = [r for r in result["records"] if r["kind"] != "weights"]
    weights = [r for r in result["records"] if r["kind"] == "weights"]
    out: list[Row] = []
    size = reference_size([r for r in ckpt if r["kind"] in ("save", "load")])
    if size is not None:
        storages = {r["storage"] for r in ckpt if r["size_bytes"] == size and r["kind"] in ("save", "load") and r.get("durable_s")}
        for st in sorted(storages, key=lambda s: (list(_STORAGE_LABEL).index(s) if s in _STORAGE_LABEL else 9, s)):
            out.append(Row(f"{_STORAGE_LABEL.get(st, st)}, {fmt_size(size)} state", st, size, CHECKPOINT_PANELS, ckpt))
    wsize = reference_size([r for r in weights if r["case"] not in FLOORS])
    if wsize is not None:
        out.append(Row(f"weights, {fmt_size(wsize)} fp32 params", "local", wsize, WEIGHTS_PANELS, weights))
    return out


def figure(result: dict[str, Any]) -> Any:
    """The matplotlib figure of ``result``: three panels per row (see the module docstring), the
    legend (case and family) to the right of the panels."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.lines import Line2D

    spec = rows(result)
    wss = sorted({r["world_size"] for r in result["records"]})
    colors: dict[str, Any] = {}  # the shades of a family spread over the cases of one kind of row
    order: list[str] = []  # the legend: checkpoint cases, then weights cases
    for panels in dict.fromkeys(row.panels for row in spec):
        group = {c for row in spec if row.panels == panels for p in panels for c in row.cases(p)}
        colors.update(case_colors(group))
        order += [c for c in case_order(group) if c not in order]
    # a column's width follows its widest panel's bar count
    widths = [max([len(row.cases(row.panels[j])) for row in spec] or [1]) * len(wss) + 2 for j in range(3)]
    fig, axes = plt.subplots(max(len(spec), 1), 3, squeeze=False, gridspec_kw={"width_ratios": widths},
                             figsize=(max(14.0, 0.42 * sum(widths)), 5.6 * max(len(spec), 1)))
    for i, row in enumerate(spec):
        for j, panel in enumerate(row.panels):
            draw_panel(axes[i][j], panel, row.records, row.storage, row.size, wss, colors, row.label)
    handles: list[Any] = [plt.Rectangle((0, 0), 1, 1, facecolor=colors[c], edgecolor="black", linewidth=0.4) for c in order]
    labels = [f"{c} ({family(c)})" for c in order]
    handles.append(Line2D([], [], linestyle="--", color="black"))
    labels.append("floor or limit (named under each group)")
    fig.legend(handles, labels, loc="upper left", bbox_to_anchor=(1.0, 0.97), fontsize=9, title="case (family)",
               frameon=False)
    fig.suptitle(f"{result.get('name', '')}: median per case, lower is better; the floor dashed "
                 f"(full tables in the markdown)", fontsize=12)
    fig.tight_layout(rect=(0, 0, 1, 1 - 0.4 / fig.get_figheight()))  # room for the title
    return fig


def plot(result: dict[str, Any], path: Path) -> None:
    """Write the figure of ``result`` to ``path`` (PNG)."""
    import matplotlib.pyplot as plt

    fig = figure(result)
    fig.savefig(path, dpi=100, bbox_inches="tight")
    plt.close(fig)
