"""``prime-ckpt``: the command-line tool, thin over the library.

Each command is one function registered on :data:`app` that calls the library, then formats the
result (rich tables, or ``--json``). Errors the library raises for a bad path or a bad file
(:data:`USER_ERRORS`) become one line on stderr, ``error: <path>: <what is wrong>``, and exit
code 2; ``prime-ckpt --debug <command>`` shows the traceback instead. Adding a command
(``list``, ``plan``, ``prune``, ``verify``, ``convert``, ``diff``) means adding one function
decorated with ``@app.command("name")`` whose body runs inside ``with user_errors():``.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Annotated, Any, Optional

import typer
from rich.console import Console
from rich.table import Table

from prime_ckpt.dcp_metadata import MetadataError
from prime_ckpt.inspection import InspectError, describe, to_dict
from prime_ckpt.layout import CheckpointNotFoundError
from prime_ckpt.orchestrator import ProgressRecordError

#: Exit code for a bad path or an unreadable/unsafe file (same as click's usage errors).
EXIT_USER_ERROR = 2

#: Exceptions that mean "the path or file the user gave is wrong", not a bug.
USER_ERRORS: tuple[type[BaseException], ...] = (
    InspectError,
    MetadataError,
    ProgressRecordError,
    CheckpointNotFoundError,
    OSError,
)

app = typer.Typer(
    name="prime-ckpt",
    help="Inspect and manage prime-ckpt checkpoints (trainer DCP state, orchestrator progress, weights).",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
)

_state = {"debug": False}


@app.callback()
def _root(
    debug: Annotated[bool, typer.Option("--debug", help="Show tracebacks instead of one-line errors.")] = False,
) -> None:
    """Inspect and manage prime-ckpt checkpoints (trainer DCP state, orchestrator progress, weights)."""
    _state["debug"] = debug


def _one_line(exc: BaseException) -> str:
    if isinstance(exc, OSError) and not isinstance(exc, CheckpointNotFoundError) and exc.filename is not None:
        text = f"{exc.filename}: {exc.strerror or type(exc).__name__}"
    else:
        text = str(exc) or type(exc).__name__
    return " ".join(text.split())


@contextmanager
def user_errors() -> Iterator[None]:
    """Turn :data:`USER_ERRORS` into ``error: <path>: <what>`` on stderr and exit code 2."""
    try:
        yield
    except USER_ERRORS as e:
        if _state["debug"]:
            raise
        typer.echo(f"error: {_one_line(e)}", err=True)
        raise typer.Exit(EXIT_USER_ERROR) from None


def _console() -> Console:
    return Console(soft_wrap=False, highlight=False, width=max(Console().width, 120))


def _print_json(data: Any) -> None:
    typer.echo(json.dumps(data, indent=2))


def _fmt_bytes(n: int | None) -> str:
    if n is None:
        return "-"
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n} B" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024  # type: ignore[assignment]
    raise AssertionError


def _flag(ok: bool) -> str:
    return "[green]complete[/]" if ok else "[red]INCOMPLETE[/]"


# -- inspect rendering ------------------------------------------------------------------------
def _render_listing(d: dict[str, Any], con: Console) -> None:
    con.print(f"[bold]{d['path']}[/] ({d['kind']})")
    if d["checkpoints"] is not None:
        t = Table(title="checkpoint steps", title_justify="left")
        for col in ("step", "status", "trainer", "orchestrator", "path"):
            t.add_column(col, overflow="fold")
        for s in d["checkpoints"]:
            t.add_row(
                str(s["step"]), _flag(s["complete"]),
                "yes" if s["parts"]["trainer"] else ("partial" if "trainer" in s["present"] else "-"),
                "yes" if s["parts"]["orchestrator"] else "-", s["path"],
            )  # fmt: skip
        con.print(t)
        con.print(f"latest complete step: {d['latest_complete_step']}")
    if d["weights"] is not None:
        t = Table(title="weight steps", title_justify="left")
        for col in ("step", "status", "path"):
            t.add_column(col, overflow="fold")
        for w in d["weights"]:
            t.add_row(str(w["step"]), _flag(w["complete"]), w["path"])
        con.print(t)
    if d["ignored"]:
        con.print("not ours (ignored): " + ", ".join(d["ignored"]))


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


def _render_trainer(tr: dict[str, Any], con: Console) -> None:
    if not tr["complete"]:
        con.print(f"trainer: {_flag(False)} ({tr['path']}: no .metadata)")
        return
    files = ", ".join(f"{f['name']}" + ("" if f["exists"] else " [red](missing)[/]") for f in tr["storage_files"])
    con.print(f"trainer: {_flag(True)}  world size at save: {tr['world_size']}  files: {files}")
    con.print(_tensor_table(tr["tensors"], "tensors (from .metadata)", with_chunks=True))
    t = Table(title="totals per top-level key", title_justify="left")
    for col in ("key", "tensors", "sharded", "bytes", "non-tensor entries"):
        t.add_column(col, justify="left" if col == "key" else "right")
    for key, v in tr["totals"].items():
        t.add_row(key, str(v["tensors"]), str(v["sharded"]), f"{v['bytes']} ({_fmt_bytes(v['bytes'])})", str(v["non_tensors"]))
    t.add_row("[bold]total[/]", str(len(tr["tensors"])), "", f"{tr['total_bytes']} ({_fmt_bytes(tr['total_bytes'])})", str(len(tr["non_tensors"])))
    con.print(t)
    if tr["non_tensors"]:
        t = Table(title="non-tensor entries", title_justify="left")
        t.add_column("name", overflow="fold")
        t.add_column("stored bytes", justify="right")
        for b in tr["non_tensors"]:
            t.add_row(b["name"], "-" if b["stored_bytes"] is None else str(b["stored_bytes"]))
        con.print(t)


def _render_step(d: dict[str, Any], con: Console) -> None:
    con.print(f"[bold]{d['path']}[/]  step {d['step']}  {_flag(d['complete'])}")
    parts = "  ".join(f"{p}: {'complete' if ok else 'missing/incomplete'}" for p, ok in d["parts"].items())
    con.print(f"parts: {parts}")
    if d["orchestrator"] is not None:
        con.print("orchestrator: " + ", ".join(f"{k}={v}" for k, v in d["orchestrator"].items()))
    if d["save_info"] is not None:
        s = d["save_info"]
        con.print(
            "save record: "
            + ", ".join(
                f"{k}={round(s[k], 3) if isinstance(s[k], float) else s[k]}"
                for k in ("mode", "world_size", "blocking_s", "staging_s", "total_s", "bytes")
                if k in s
            )
        )
    if d["trainer"] is not None:
        _render_trainer(d["trainer"], con)


def _render_weights(d: dict[str, Any], con: Console) -> None:
    con.print(f"[bold]{d['path']}[/]  weights step {d['step']}  {_flag(d['complete'])}")
    con.print("files: " + ", ".join(f"{f['name']} ({_fmt_bytes(f['size'])})" for f in d["files"]))
    if d["config"] is not None:
        con.print("config: " + json.dumps(d["config"], sort_keys=True))
    if d["tensors"] is not None:
        con.print(_tensor_table(d["tensors"], "tensors (from the safetensors header)", with_chunks=False))
        con.print(f"total: {len(d['tensors'])} tensors, {d['total_bytes']} bytes ({_fmt_bytes(d['total_bytes'])})")


_RENDERERS = {
    "run": _render_listing,
    "checkpoints": _render_listing,
    "weights": _render_listing,
    "checkpoint_step": _render_step,
    "weights_step": _render_weights,
    "trainer": lambda d, con: (con.print(f"[bold]{d['path']}[/]  step {d['step']}"), _render_trainer(d["trainer"], con)),
}


@app.command("inspect")
def inspect_cmd(
    path: Annotated[str, typer.Argument(metavar="PATH", help="Run output dir, checkpoints/ or weights/ dir, step_<N> dir, or trainer/ DCP dir.")],
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON (schema below) instead of tables.")] = False,
    name_filter: Annotated[
        Optional[str], typer.Option("--filter", metavar="GLOB", help="Only tensors/entries whose name matches GLOB (fnmatch, case-sensitive).")
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
      latest_complete_step: int | null;  ignored: ["checkpoints/<name>" not ours]
    kind "checkpoint_step":
      step, complete (every part complete), parts, present,
      save_info: save_info.json object | null,
      orchestrator: {step, total_tokens, total_samples, total_problems, extra} | null,
      trainer: TRAINER, filter: GLOB | null
    kind "trainer" (a DCP dir): step (from a parent step_<N>) | null, trainer: TRAINER, filter
    TRAINER: {path, complete (has .metadata); when complete, else null:
      world_size (distinct ranks among __<rank>_<n>.distcp files the metadata references),
      storage_files: [{name, rank, exists, size}],
      tensors: [{name, shape: [int], dtype: "float32", bytes (global numel * element size),
                 chunks, sharded (chunks > 1)}],
      non_tensors: [{name, stored_bytes}],
      totals: {"<top-level key, e.g. app.model>": {tensors, bytes, sharded, non_tensors}},
      total_bytes}
    kind "weights_step":
      step, complete (COMPLETE marker), files: [{name, size}], config: config.json | null,
      tensors: [{name, shape, dtype, bytes, chunks: 1, sharded: false}] | null, total_bytes, filter

    Exit codes: 0 shown (incomplete steps are shown as INCOMPLETE); 2 missing path, not a
    checkpoint, unreadable or unsafe metadata (one line on stderr: "error: <path>: <what>").
    """
    with user_errors():
        result = to_dict(describe(path, name_filter))
    if as_json:
        _print_json(result)
        return
    con = _console()
    _RENDERERS[result["kind"]](result, con)
    for problem in result.get("problems", []):
        typer.echo(f"warning: {problem}", err=True)


# -- plan / prune ------------------------------------------------------------------------------
_RunDir = Annotated[str, typer.Argument(metavar="OUTPUT_DIR", help="Run output dir (holds checkpoints/ and weights/).")]
_Keep = Annotated[Optional[int], typer.Option("--keep", min=1, help="Keep the K newest complete checkpoint steps (default: keep all).")]
_KeepInterval = Annotated[Optional[int], typer.Option("--keep-interval", min=1, help="Also keep checkpoint steps that are multiples of N.")]
_AsyncLevel = Annotated[int, typer.Option("--async-level", min=0, help="k: checkpoint step x pins weights [x-k, x] (the seed's rule).")]
_CurrentStep = Annotated[
    Optional[int],
    typer.Option("--current-step", min=0, help="The trainer's current step; higher steps belong to another run and are kept (default: the highest step on disk)."),
]
_WeightsInterval = Annotated[Optional[int], typer.Option("--weights-interval", min=1, help="Also keep weights steps that are multiples of N.")]
_ConsumerStep = Annotated[Optional[int], typer.Option("--consumer-step", min=0, help="Last weights step the inference side acknowledged; steps >= it are kept.")]


def _plan_and_sizes(output_dir, keep, keep_interval, async_level, current_step, weights_interval, consumer_step):
    from prime_ckpt.retention import RetentionPolicy, plan_output_dir, plan_sizes

    policy = RetentionPolicy(
        keep=keep, keep_interval=keep_interval, async_level=async_level,
        weights_interval=weights_interval, consumer_step=consumer_step,
    )  # fmt: skip
    p = plan_output_dir(output_dir, policy, current_step=current_step)
    return p, plan_sizes(p)


def _plan_json(p, sizes) -> dict[str, Any]:
    return {
        "entries": [{**e.to_json(), "bytes": sizes[e.path]} for e in p.entries],
        "bytes_freed": sum(sizes[e.path] for e in p.deletes),
    }


def _render_plan(p, sizes, con: Console, title: str) -> None:
    t = Table(title=title, title_justify="left")
    for col in ("kind", "step", "action", "bytes", "reasons"):
        t.add_column(col, overflow="fold")
    for e in p.entries:
        action = "[red]delete[/]" if e.action == "delete" else "[green]keep[/]"
        t.add_row(e.kind, str(e.step), action, _fmt_bytes(sizes[e.path]), "; ".join(e.reasons))
    con.print(t)
    freed = sum(sizes[e.path] for e in p.deletes)
    con.print(f"{len(p.deletes)} to delete, {len(p.keeps)} to keep, {_fmt_bytes(freed)} freed")


@app.command("plan")
def plan_cmd(
    output_dir: _RunDir,
    keep: _Keep = None,
    keep_interval: _KeepInterval = None,
    async_level: _AsyncLevel = 0,
    current_step: _CurrentStep = None,
    weights_interval: _WeightsInterval = None,
    consumer_step: _ConsumerStep = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON instead of a table.")] = False,
) -> None:
    """Dry run of retention: every checkpoint and weights step with keep/delete and the reasons.

    \b
    Names that are not step_<int> are never listed and never deleted.
    JSON: {"entries": [{"path", "kind": "checkpoint"|"weights", "step", "action": "keep"|"delete",
           "reasons": [str], "bytes"}], "bytes_freed": int}
    Exit codes: 0 planned; 2 bad path or option.
    """
    with user_errors():
        p, sizes = _plan_and_sizes(output_dir, keep, keep_interval, async_level, current_step, weights_interval, consumer_step)
    if as_json:
        _print_json(_plan_json(p, sizes))
        return
    _render_plan(p, sizes, _console(), f"retention plan for {output_dir} (dry run)")


@app.command("prune")
def prune_cmd(
    output_dir: _RunDir,
    keep: _Keep = None,
    keep_interval: _KeepInterval = None,
    async_level: _AsyncLevel = 0,
    current_step: _CurrentStep = None,
    weights_interval: _WeightsInterval = None,
    consumer_step: _ConsumerStep = None,
    yes: Annotated[bool, typer.Option("--yes", "-y", help="Do not ask for confirmation.")] = False,
) -> None:
    """Apply the retention plan that `plan` shows (asks for confirmation unless --yes).

    Do not run it on a directory a live run is writing with another policy. Deleting a path
    that is already gone is not an error; a path that cannot be deleted is reported and the
    rest carries on (exit 1).
    """
    from prime_ckpt.retention import apply_plan

    with user_errors():
        p, sizes = _plan_and_sizes(output_dir, keep, keep_interval, async_level, current_step, weights_interval, consumer_step)
    con = _console()
    _render_plan(p, sizes, con, f"retention plan for {output_dir}")
    if not p.deletes:
        con.print("nothing to delete")
        return
    if not yes and not typer.confirm(f"delete {len(p.deletes)} step directories?", default=False):
        typer.echo("aborted; nothing deleted", err=True)
        raise typer.Exit(1)
    result = apply_plan(p)
    con.print(f"deleted {len(result.deleted)}, already gone {len(result.already_gone)}, failed {len(result.failed)}")
    for path, err in result.failed:
        typer.echo(f"error: {path}: {err}", err=True)
    if result.failed:
        raise typer.Exit(1)


def main(argv: list[str] | None = None) -> None:
    """Console-script entry point (``prime-ckpt``)."""
    app(args=argv if argv is not None else sys.argv[1:], prog_name="prime-ckpt")


if __name__ == "__main__":
    main()
