"""``prime-ckpt inspect`` and ``prime-ckpt list``: what is in a checkpoint, a step or a run, from
metadata only (never tensor data, never torch), as tables or JSON.

The library builds the result (:func:`prime_ckpt.inspection.describe`,
:func:`prime_ckpt.inspection.list_run`); this module renders it.
"""

from __future__ import annotations

import json
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.table import Table

from prime_ckpt.async_level import resolve_async_level
from prime_ckpt.cli.app import app
from prime_ckpt.cli.errors import redact, user_errors, warn
from prime_ckpt.cli.options import URL_HELP, CurrentStep, Keep, KeepInterval, RunDir, target
from prime_ckpt.cli.render import console, flag, fmt_bytes, print_json, render_ignored, safe_tree, table
from prime_ckpt.inspection import describe, to_dict


def _render_listing(d: dict[str, Any], con: Console) -> None:
    con.print(f"[bold]{d['path']}[/] ({d['kind']}" + (": another tool's checkpoint folder, step-<N> dirs; read-only here)" if d["kind"] == "torchtitan" else ")"))
    if d["checkpoints"] is not None:
        cols = ("step", "status", "trainer", "path") if d["kind"] == "torchtitan" else ("step", "status", "trainer", "orchestrator", "path")
        t = table("checkpoint steps", cols)
        for s in d["checkpoints"]:
            cells = {
                "step": str(s["step"]), "status": flag(s["complete"]), "path": s["path"],
                "trainer": "yes" if s["parts"]["trainer"] else ("partial" if "trainer" in s["present"] else "-"),
                "orchestrator": "yes" if s["parts"].get("orchestrator") else "-",
            }  # fmt: skip
            t.add_row(*(cells[c] for c in cols))
        con.print(t)
        con.print(f"latest complete step: {d['latest_complete_step']}")
    if d["weights"] is not None:
        t = table("weight steps", ("step", "status", "path"))
        for w in d["weights"]:
            t.add_row(str(w["step"]), flag(w["complete"]), w["path"])
        con.print(t)
    render_ignored(d, con)


def _tensor_table(tensors: list[dict[str, Any]], title: str, with_chunks: bool) -> Table:
    t = Table(title=title, title_justify="left")
    t.add_column("name", overflow="fold")
    t.add_column("shape", no_wrap=True)
    t.add_column("dtype", no_wrap=True)
    t.add_column("bytes", justify="right", no_wrap=True)
    if with_chunks:
        t.add_column("chunks", justify="right", no_wrap=True)
    for x in tensors:
        row = [x["name"], "[" + ", ".join(map(str, x["shape"])) + "]", x["dtype"], str(x["bytes"])]
        if with_chunks:
            row.append(f"{x['chunks']}" + (" (sharded)" if x["sharded"] else ""))
        t.add_row(*row)
    return t


def _render_trainer(tr: dict[str, Any], con: Console, ok: bool | None = None) -> None:
    """``ok``: the part's completeness as `list` and resume judge it (marks parse, data files hold
    their bytes); default: ``.metadata`` read."""
    if not tr["complete"]:
        con.print(f"trainer: {flag(False)} ({tr['path']}: no .metadata)")
        return
    files = ", ".join(f"{f['name']}" + ("" if f["exists"] else " [red](missing)[/]") for f in tr["storage_files"])
    con.print(f"trainer: {flag(tr['complete'] if ok is None else ok)}  world size at save: {tr['world_size']}  files: {files}")
    con.print(_tensor_table(tr["tensors"], "tensors (from .metadata)", with_chunks=True))
    t = Table(title="totals per top-level key", title_justify="left")
    for col in ("key", "tensors", "sharded", "bytes", "non-tensor entries"):
        t.add_column(col, justify="left" if col == "key" else "right")
    for key, v in tr["totals"].items():
        t.add_row(key, str(v["tensors"]), str(v["sharded"]), f"{v['bytes']} ({fmt_bytes(v['bytes'])})", str(v["non_tensors"]))
    t.add_row("[bold]total[/]", str(len(tr["tensors"])), "", f"{tr['total_bytes']} ({fmt_bytes(tr['total_bytes'])})", str(len(tr["non_tensors"])))
    con.print(t)
    if tr["non_tensors"]:
        t = Table(title="non-tensor entries", title_justify="left")
        t.add_column("name", overflow="fold")
        t.add_column("stored bytes", justify="right")
        for b in tr["non_tensors"]:
            t.add_row(b["name"], "-" if b["stored_bytes"] is None else str(b["stored_bytes"]))
        con.print(t)


_SAVE_FIELDS = ("mode", "world_size", "async_level", "blocking_s", "staging_s", "total_s", "bytes", "total_bytes", "error")


def _save_field(key: str, value: Any) -> str:
    """``key=value`` of a save record, in units: seconds as ``1.234 s``, bytes as ``1.0 GiB``;
    a value of the wrong type is shown as it is (``inspect`` warns about it)."""
    number = isinstance(value, (int, float)) and not isinstance(value, bool)
    if key.endswith("_s") and number:
        return f"{key}={value:.3f} s"
    if key in ("bytes", "total_bytes") and isinstance(value, int) and not isinstance(value, bool):
        return f"{key}={fmt_bytes(value)}"
    return f"{key}={value}"


def _render_step(d: dict[str, Any], con: Console) -> None:
    con.print(f"[bold]{d['path']}[/]  step {d['step']}  {flag(d['complete'])}")
    parts = "  ".join(f"{p}: {'complete' if ok else 'missing/incomplete'}" for p, ok in d["parts"].items())
    con.print(f"parts: {parts}")
    if d["orchestrator"] is not None:
        con.print("orchestrator: " + ", ".join(f"{k}={v}" for k, v in d["orchestrator"].items()))
    if d["save_info"] is not None:
        s = d["save_info"]
        con.print("save record: " + ", ".join(_save_field(k, s[k]) for k in _SAVE_FIELDS if k in s))
    if d["trainer"] is not None:
        _render_trainer(d["trainer"], con, ok=d["parts"].get("trainer"))


def _render_weights(d: dict[str, Any], con: Console) -> None:
    what = f"weights step {d['step']}" if d["step"] is not None else d["kind"].replace("_", " ")
    con.print(f"[bold]{d['path']}[/]  {what}  {flag(d['complete'])}")
    con.print("files: " + ", ".join(f"{f['name']} ({fmt_bytes(f['size'])})" for f in d["files"]))
    if d["config"] is not None:
        con.print("config: " + json.dumps(d["config"], sort_keys=True))
    if d["tensors"] is not None:
        con.print(_tensor_table(d["tensors"], "tensors (from the safetensors header)", with_chunks=False))
        con.print(f"total: {len(d['tensors'])} tensors, {d['total_bytes']} bytes ({fmt_bytes(d['total_bytes'])})")


_RENDERERS = {
    "run": _render_listing,
    "checkpoints": _render_listing,
    "weights": _render_listing,
    "checkpoint_step": _render_step,
    "weights_step": _render_weights,
    "safetensors_file": _render_weights,
    "safetensors_dir": _render_weights,
    "torchtitan": _render_listing,
    "trainer": lambda d, con: (con.print(f"[bold]{d['path']}[/]  step {d['step']}"),
                               _render_trainer(d["trainer"], con, ok=d["trainer"]["complete"] and not d["problems"])),
}


@app.command("inspect")
def inspect_cmd(
    path: Annotated[str, typer.Argument(metavar="PATH", help="Run output dir, checkpoints/ or weights/ dir, step_<N> dir, trainer/ or any DCP dir, "
                                        "a torchtitan checkpoint folder, a safetensors file or directory." + URL_HELP)],
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON (schema below) instead of tables.")] = False,
    name_filter: Annotated[
        str | None, typer.Option("--filter", metavar="GLOB", help="Only tensors/entries whose name matches GLOB (fnmatch, case-sensitive).")
    ] = None,
) -> None:
    """Show what is in a checkpoint, from metadata only (never reads tensor data, writes nothing).

    \b
    JSON schema ("schema": "prime-ckpt.inspect/1"); every object has "schema", "kind", "path";
    "problems" is a list of one-line strings (e.g. a referenced data file is missing).
    kind "run" | "checkpoints" | "weights" (listings):
      checkpoints: [{step, path, complete, parts: {trainer: bool, orchestrator: bool},
                     present: [part]}] | null (null for kind "weights")
      weights: [{step, path, complete}] | null (null for kind "checkpoints")
      latest_complete_step: int | null;  ignored: ["checkpoints/<name>" not ours];
      ignored_reasons: {"checkpoints/<name>": why it is not a step}
    kind "checkpoint_step":
      step, complete (every part complete), parts, present,
      save_info: save_info.json object | null,
      orchestrator: {step, total_tokens, total_samples, total_problems, extra} | null,
      trainer: TRAINER, filter: GLOB | null
    kind "trainer" (a DCP dir): step (from a parent step_<N>) | null, trainer: TRAINER, filter
    TRAINER: {path, complete (has .metadata, or per-rank __<rank>.metadata files: a save with
      use_collectives=False, merged), metadata_files: [".metadata"] | ["__0.metadata", ...];
      when complete, else null:
      world_size (distinct ranks among __<rank>_<n>.distcp files the metadata references),
      storage_files: [{name, rank, exists, size}],
      tensors: [{name, shape: [int], dtype: "float32", bytes (global numel * element size),
                 chunks, sharded (chunks > 1)}],
      non_tensors: [{name, stored_bytes}],
      totals: {"<top-level key, e.g. app.model>": {tensors, bytes, sharded, non_tensors}},
      total_bytes}
    kind "torchtitan" (torchtitan's checkpoint folder, or its dump folder): a listing as above,
      one checkpoints row per step-<N> (parts: {trainer}); weights null; read-only
    kind "weights_step" (and "safetensors_file": a bare .safetensors file; "safetensors_dir":
    any directory of safetensors files, e.g. DCP's HuggingFace writer output, whose unconsolidated
    per-rank shards show assembled shapes and a problem; step null, complete = every header reads
    and matches its file's size):
      step, complete (COMPLETE marker), files: [{name, size}], config: config.json | null,
      tensors: [{name, shape, dtype, bytes, chunks: 1, sharded: false}] | null, total_bytes, filter

    Exit codes: 0 shown (a step whose trainer/ has no .metadata yet is shown as INCOMPLETE);
    2 missing path, not a checkpoint (a step dir without trainer/ at all: `list` shows it as an
    incomplete step), unreadable or unsafe metadata (one line on stderr: "error: <path>: <what>").
    Does not import torch (.metadata is read into torch-free stand-ins), so it starts fast.
    """
    with user_errors(target=path):
        result = to_dict(describe(target(path), name_filter))
    if as_json:
        print_json(result)
        return
    con = console()
    _RENDERERS[result["kind"]](safe_tree(result), con)
    for problem in result.get("problems", []):
        warn(problem)



# -- list ----------------------------------------------------------------------------------------
_ListAsyncLevel = Annotated[
    int | None, typer.Option("--async-level", min=0, help="k: checkpoint step x pins weights [x-k, x]. Giving any retention option shows the plan's keep/delete per step.")
]


def _parts_cell(parts: dict[str, bool], present: list[str]) -> str:
    cells = [p if ok else f"{p} (partial)" for p, ok in parts.items() if ok or p in present]
    return "+".join(cells) if cells else "-"


def _retention_cell(r: dict[str, Any] | None) -> str:
    if r is None:
        return "-"
    colour = "red" if r["action"] == "delete" else "green"
    return f"[{colour}]{r['action']}[/]: " + "; ".join(r["reasons"])


@app.command("list")
def list_cmd(
    output_dir: RunDir,
    keep: Keep = None,
    keep_interval: KeepInterval = None,
    async_level: _ListAsyncLevel = None,
    current_step: CurrentStep = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON (schema below) instead of tables.")] = False,
) -> None:
    """One row per checkpoint step and weights step: complete?, parts, bytes, progress, retention.

    \b
    Reads directory listings, orchestrator.pt (plain values only), save_info.json and manifest
    presence; never tensor data; writes nothing; does not import torch. With --keep/--keep-interval/--async-level the
    retention plan's decision is shown per step (as `plan` would make it); without them "-".
    JSON ("schema": "prime-ckpt.list/1"):
      {path, layout: "prime-ckpt" | "torchtitan" (a checkpoint/step-<N> folder, listed read-only),
       parts: ["trainer", "orchestrator"?] (what this run writes),
       latest_complete_step: int | null,
       policy: {keep, keep_interval, async_level, weights_interval, consumer_step} | null,
       latest_resumable_step: int | null (what --ckpt.resume-step -1 loads),
       run: {run_id, start_step, ...} | null (run.json: the last run to enter the directory),
       superseded: ["superseded/<time>-<run id>"] (earlier runs' steps set aside, never deleted),
       checkpoints: [{step, path, complete, resumable, foreign: str | null,
                      parts: {trainer: bool, orchestrator: bool},
                      present: [part], bytes (on disk), manifest: bool,
                      progress: {step, total_samples, total_tokens, total_problems} | null
                                (from orchestrator.pt),
                      save_info: {mode, world_size, blocking_s, total_s, total_bytes} | null
                                 (from the trainer's save_info.json),
                      retention: {action: "keep"|"delete", reasons: [str]} | null,
                      problems: [str]}],
       weights: [{step, path, complete, bytes, manifest, retention, foreign, problem}],
       ignored: ["checkpoints/<name>" not ours],
       ignored_reasons: {"checkpoints/<name>": "leftover of an interrupted delete" | "a symlink (never followed)" | ...}}
    Exit codes: 0 listed (also when there are no steps); 2 bad path or option.
    """
    from prime_ckpt.inspection import list_run
    from prime_ckpt.retention import RetentionPolicy

    with user_errors(target=output_dir):
        root = target(output_dir)
        policy = None
        if keep is not None or keep_interval is not None or async_level is not None:
            policy = RetentionPolicy(keep=keep, keep_interval=keep_interval, async_level=resolve_async_level(root, async_level, warn=warn))
        raw = list_run(root, policy, current_step).to_dict()
    if as_json:
        print_json(raw)
        return
    d = safe_tree(raw)
    con = console()
    con.print(f"[bold]{d['path']}[/]  parts per step: {'+'.join(d['parts'])}"
              + ("  (torchtitan's checkpoint folder, step-<N> dirs: another tool's, listed read-only)" if d["layout"] == "torchtitan" else ""))
    t = table("checkpoint steps", ("step", "status", "resumable", "parts", "bytes", "manifest", "progress (step/samples/tokens)", "save", "retention"),
              right=("step", "bytes"))
    for r in d["checkpoints"]:
        pr = r["progress"]
        si = r["save_info"]
        t.add_row(
            str(r["step"]), "[yellow]not ours[/]" if r["foreign"] else flag(r["complete"]),
            "yes" if r["resumable"] else "[red]no[/]", _parts_cell(r["parts"], r["present"]), fmt_bytes(r["bytes"]),
            "yes" if r["manifest"] else "-",
            f"{pr['step']}/{pr['total_samples']}/{pr['total_tokens']}" if pr else "-",
            f"{si.get('mode', '?')}, {si.get('world_size', '?')} ranks" if si else "-",
            _retention_cell(r["retention"]),
        )  # fmt: skip
    con.print(t if d["checkpoints"] else "no checkpoint steps")
    w = table("weight steps", ("step", "status", "bytes", "manifest", "retention"), right=("step", "bytes"))
    for r in d["weights"]:
        w.add_row(str(r["step"]), "[yellow]not ours[/]" if r["foreign"] else flag(r["complete"]), fmt_bytes(r["bytes"]),
                  "yes" if r["manifest"] else "-", _retention_cell(r["retention"]))
    con.print(w if d["weights"] else "no weight steps")
    con.print(f"latest complete step: {d['latest_complete_step']}; latest resumable step: {d['latest_resumable_step']}")
    if d["run"]:
        run = d["run"]
        con.print(f"last run to enter: {run.get('run_id')} (started from {'checkpoint step ' + str(run['start_step']) if run.get('start_step') is not None else 'scratch'})")
    if d["superseded"]:
        con.print("set aside by a later run (never deleted): " + ", ".join(d["superseded"]))
    render_ignored(d, con)
    for r in raw["checkpoints"]:
        for problem in r["problems"]:
            warn(problem)
    for r in raw["weights"]:
        if r["foreign"] or r["problem"]:
            why = f"not this project's ({r['foreign']}); kept" if r["foreign"] else f"not complete: {r['problem']}"
            typer.echo(f"warning: {redact(r['path'])}: {why}", err=True)
