"""The outputs: markdown tables, the plot, the JSON / markdown / PNG files of a result, and
merging the results of launches over disjoint world sizes."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from ckpt_bench import weights_report
from ckpt_bench.common import MiB, fmt_s, fmt_size
from ckpt_bench.targets import compute_targets, explain


def markdown(result: dict[str, Any]) -> str:
    env = result["environment"]
    load_text = ""
    if env.get("loadavg"):  # 1/5/15-minute load average when the workers started and when the run ended
        load_text = "load average " + " / ".join(f"{x:.2f}" for x in env["loadavg"]) + " at the start"
        load_text += (", " + " / ".join(f"{x:.2f}" for x in env["loadavg_end"]) + " at the end") if env.get("loadavg_end") else ""
        load_text += " (1 / 5 / 15 min), "
    lines = [
        f"# Save latency: {result['name']}",
        "",
        (
            f"torch {env['torch']}, {env['cpu_count']} CPUs, device {env['device']}, "
            f"{load_text}"
            f"{result['settings']['reps']} reps after a warm-up (median (min–max), seconds; max over ranks). "
            + (
                f"Run at {result['created']} in {result['wall_s']:.0f} s."
                if "launches" not in result["settings"]
                else "Merged from launches over disjoint world sizes (every ratio compares cases measured side by side "
            "within one launch): "
            + "; ".join(
                f"world size {','.join(map(str, la['world_sizes']))}, finished at {la['created']} after {la['wall_s']:.0f} s "
                f"(sizes {', '.join(fmt_size(x) for x in la['sizes'])}, S3 up to "
                f"{fmt_size(la['s3_max_size']) if la.get('s3') else 'none'})"
                for la in result["settings"]["launches"]
            )
            + "."
            )
        ),
        "",
        *[f"Note: {n}\n" for n in result.get("notes", [])],
    ]
    if any(r["kind"] != "weights" for r in result["records"]):
        lines += checkpoint_markdown(result)
    lines += weights_report.markdown_lines(result)
    lines += ["## Targets", "", "| target | value | limit | holds | measured as |", "|---|---|---|---|---|"]
    for k, t in result["targets"].items():
        if k.startswith("_"):
            continue
        v = "—" if t["value"] is None else f"{t['value']:.3f}"
        lines.append(f"| {k} | {v} | {t['limit']} | {'yes' if t['holds'] else '**no**'} | {t['how']}{'. ' + t['why'] if t.get('why') else ''} |")
    return "\n".join(lines) + "\n"


def checkpoint_markdown(result: dict[str, Any]) -> list[str]:
    """The save, load, step-overhead and RSS sections of the checkpoint cases."""
    lines = [
        (
            "Blocking = the training loop's stall; durable = until the data is fsync'd / uploaded. "
            "Throughput = state bytes / median durable time (memcpy: per-rank bytes / copy time)."
        ),
        "",
        "## Save",
        "",
        "| world | size | storage | case | blocking s | durable s | GB/s | staging s | peak extra RSS MiB | note |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in result["records"]:
        if r["kind"] in ("load", "weights"):
            continue
        rss = r.get("peak_extra_rss_bytes")
        lines.append(
            f"| {r['world_size']} | {fmt_size(r['size_bytes'])} | {r['storage']} | {r['case']} | {fmt_s(r['blocking_s'])} | "
            f"{fmt_s(r['durable_s'])} | {r['throughput_gbps']:.2f} | {fmt_s(r.get('staging_s'))} | "
            f"{(rss['max'] / MiB if rss else 0):.0f} | {r['error'] or r['note']} |"
            if r.get("durable_s") else
            f"| {r['world_size']} | {fmt_size(r['size_bytes'])} | {r['storage']} | {r['case']} | — | — | — | — | — | {r['error'] or r['note']} |"
        )
    lines += ["", "## Load", "", "| world | size | storage | case | load s | GB/s | note |", "|---|---|---|---|---|---|---|"]
    for r in result["records"]:
        if r["kind"] != "load":
            continue
        lines.append(
            f"| {r['world_size']} | {fmt_size(r['size_bytes'])} | {r['storage']} | {r['case']} | {fmt_s(r['durable_s'])} | "
            f"{(r['throughput_gbps'] or 0):.2f} | {r['error'] or r['note']} |"
        )
    lines += ["", "## Step overhead and RSS", ""]
    for ws, ex in sorted(result["extras"].items(), key=lambda kv: int(kv[0])):
        so, rs = ex.get("step_overhead"), ex.get("rss")
        if so:
            lines.append(
                f"- world size {ws}: mean step {so['mean_step_s']['none'] * 1e3:.1f} ms without checkpoints, "
                f"{so['mean_step_s']['async_every_10'] * 1e3:.1f} ms with an async checkpoint every 10 steps "
                f"({(so['ratio'] - 1) * 100:+.1f}%; {fmt_size(so['state_bytes'])} state, {so['steps_per_mode']} steps each)"
                + (f"; in process mode {so['mean_step_s']['async_process_every_10'] * 1e3:.1f} ms "
                   f"({(so['ratio_process'] - 1) * 100:+.1f}%)" if so.get("ratio_process") else "")
                + (f"; the floor, the same bytes written + fsync'd in a background thread instead of a checkpoint: "
                   f"{so['mean_step_s']['raw_write_every_10'] * 1e3:.1f} ms ({(so['ratio_raw_write'] - 1) * 100:+.1f}%)"
                   if so.get("ratio_raw_write") else "")
            )
            if so.get("median_step_s_by_position"):
                pos = so["median_step_s_by_position"]
                lines.append(
                    "  - median step by position (ms; the save call is in the last, the steps after it first): "
                    + "; ".join(f"{k.replace('_every_10', '')} " + " ".join(f"{v * 1e3:.0f}" for v in vals)
                                for k, vals in pos.items())
                )
        if rs:
            lines.append(
                f"- world size {ws}: {rs['saves']} consecutive async saves of {fmt_size(rs['per_rank_state_bytes'])}/rank: "
                f"peak extra RSS {rs['peak_extra_rss_vs_state']:.2f}× the per-rank state, RSS drift {rs['drift'] * 100:.1f}%"
                + (f"; with a training step before each save {rs['drift_train_and_save'] * 100:.1f}% (training alone, "
                   f"measured first: {rs['drift_train_only'] * 100:.1f}%, highest {rs['rss_before_bytes'] / MiB:.0f} MiB on rank 0)"
                   if "drift_train_only" in rs else "")
            )
    return [*lines, ""]


def plot(result: dict[str, Any], path: Path) -> None:
    """Write the plot of ``result`` to ``path`` (grouped bars at 1 GiB; see :mod:`ckpt_bench.plot`)."""
    from ckpt_bench.plot import plot as draw

    draw(result, path)


def merge_results(paths: list[Path], name: str) -> dict[str, Any]:
    """One result from the result files of several launches that ran disjoint world sizes (e.g.
    world size 1 with S3 up to 1 GiB and world size 2 with S3 up to 256 MiB, which together would
    not fit one launch's time limit). Records and per-world-size extras are taken as they are;
    targets are recomputed from them. ``settings.launches`` lists every launch's settings,
    creation time and wall time.

    Raises:
        SystemExit: a file is not a result, or two files ran the same world size (one line).
    """
    parts = []
    for path in paths:
        try:
            part = json.loads(Path(path).read_text())
            part["settings"]["world_sizes"], part["records"], part["extras"]  # noqa: B018 - schema check
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise SystemExit(f"--merge {path}: not a results file ({type(e).__name__}: {e})") from e
        parts.append(part)
    seen: dict[int, Path] = {}
    for path, part in zip(paths, parts):
        for ws in part["settings"]["world_sizes"]:
            if ws in seen:
                raise SystemExit(f"--merge {path}: world size {ws} is also in {seen[ws]}; merge launches of disjoint world sizes")
            seen[ws] = path
    world_sizes = sorted(seen)
    records = [r for part in parts for r in part["records"]]
    extras = {int(k): v for part in parts for k, v in part["extras"].items()}
    sizes = sorted({sz for part in parts for sz in part["settings"]["sizes"]})
    first = parts[0]["settings"]
    result: dict[str, Any] = {
        "name": name,
        "created": max(part["created"] for part in parts),
        "wall_s": sum(part["wall_s"] for part in parts),
        "environment": parts[0]["environment"],
        "settings": {
            **first,
            "sizes": sizes,
            "world_sizes": world_sizes,
            "reps": min(part["settings"]["reps"] for part in parts),
            "launches": [
                {"file": Path(path).name, "created": part["created"], "wall_s": part["wall_s"], **part["settings"]}
                for path, part in zip(paths, parts)
            ],
        },
        "errors": [e for part in parts for e in part["errors"]],
        "notes": list(dict.fromkeys(n for part in parts for n in part.get("notes", []))),
        "records": records,
        "extras": {str(k): v for k, v in sorted(extras.items())},
        "targets": compute_targets(records, extras, world_sizes, sizes) if records else {},
    }
    explain(result)
    return result


def replot(path: Path) -> Path:
    """Redraw the plot of the results file ``path`` as ``path`` with suffix ``.png``, measuring and
    rewriting nothing else; returns the PNG's path.

    Raises:
        SystemExit: ``path`` is not a results file (one line).
    """
    try:
        result = json.loads(Path(path).read_text())
        result["records"]  # noqa: B018 - schema check
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise SystemExit(f"--replot {path}: not a results file ({type(e).__name__}: {e})") from e
    out = Path(path).with_suffix(".png")
    plot(result, out)
    return out


def write_outputs(result: dict[str, Any], results_dir: Path, name: str, with_plot: bool) -> Path:
    """Write ``<results_dir>/<name>.json`` and ``.md`` (and ``.png`` when ``with_plot`` and there
    are records), print the markdown; returns the path without suffix."""
    base = results_dir / name
    base.parent.mkdir(parents=True, exist_ok=True)
    base.with_suffix(".json").write_text(json.dumps(result, indent=1))
    base.with_suffix(".md").write_text(markdown(result))
    plotted = with_plot and bool(result["records"])
    if plotted:
        plot(result, base.with_suffix(".png"))
    print(markdown(result))
    return base
