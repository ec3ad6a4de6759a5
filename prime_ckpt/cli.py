"""``prime-ckpt``: the command-line tool, thin over the library.

Each command is one function registered on :data:`app` that calls the library, then formats the
result (rich tables, or ``--json``). Errors the library raises for a bad path or a bad file
(:data:`USER_ERRORS`) become one line on stderr, ``error: <path>: <what is wrong>``, and exit
code 2; ``prime-ckpt --debug <command>`` shows the traceback instead. Exit codes of every
command: 0 ok, 1 a check failed (``verify`` found a problem, ``diff`` a difference), 2 usage
error or bad input. Adding a command
(``list``, ``plan``, ``prune``, ``verify``, ``convert``, ``diff``) means adding one function
decorated with ``@app.command("name")`` whose body runs inside ``with user_errors(target=path):``
and takes its PATH through ``_target(path)``.

The read-only commands (``inspect``, ``list``, ``verify``, ``plan``, ``--help``) never import
torch: importing it alone takes seconds, longer than the work itself. Modules that need torch
(``convert``, ``compare``, ``trainer`` ...) are imported inside the commands that use them, and
their error types are passed to :func:`user_errors` there
(``tests/test_inspect_torch_free.py`` checks this).

Every PATH may be an fsspec URL (``s3://bucket/run/...``) for ``inspect``, ``list``, ``verify``,
``manifest``, ``plan`` and ``prune``: :func:`_target` turns it into a UPath carrying the global
``--storage.options`` (credentials and the endpoint may also come from the environment) and
checks that it exists. A remote backend's own errors (botocore's, which are not ``OSError``)
are user errors too (exit 2, one line naming the URL). The options are never printed: every
error line has their string values masked (:func:`_redact`). ``convert`` and ``diff`` take
local paths only.
"""

from __future__ import annotations

import json
import logging
import re
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from enum import Enum
from typing import Annotated, Any, NoReturn

import typer
from rich.console import Console
from rich.markup import escape as rich_escape
from rich.table import Table

from prime_ckpt.dcp_metadata import MetadataError
from prime_ckpt.errors import PrimeCkptError
from prime_ckpt.inspection import InspectError, describe, to_dict
from prime_ckpt.layout import CheckpointNotFoundError
from prime_ckpt.manifest import ManifestError, VerifyTargetError
from prime_ckpt.orchestrator import ProgressRecordError
from prime_ckpt.storage import is_remote, missing_reason, to_path

#: Exit code when a check (``verify``, ``diff``) found a problem or a difference.
EXIT_CHECK_FAILED = 1

#: Exit code for a bad path or an unreadable/unsafe file (same as click's usage errors).
EXIT_USER_ERROR = 2

class AsyncLevelError(PrimeCkptError, ValueError):
    """``--async-level`` was not given and the run did not record one, but it has weights."""


#: Exceptions that mean "the path or file the user gave is wrong", not a bug (commands that import
#: a torch module add its errors: ``user_errors(ConvertError)``).
USER_ERRORS: tuple[type[BaseException], ...] = (
    AsyncLevelError,
    InspectError,
    MetadataError,
    ProgressRecordError,
    CheckpointNotFoundError,
    VerifyTargetError,
    ManifestError,
    PrimeCkptError,
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

_state: dict[str, Any] = {"debug": False, "options": {}}

_OPTIONS_FLAG = "--storage.options"
_URL_RE = re.compile(r"^[A-Za-z][A-Za-z0-9+.\-]*://")

#: Shown after every PATH argument's help.
_URL_HELP = " May be a URL (s3://bucket/run/..., any fsspec URL; see --storage.options)."


@app.callback()
def _root(
    debug: Annotated[bool, typer.Option("--debug", help="Show tracebacks instead of one-line errors.")] = False,
    storage_options: Annotated[
        str | None,
        typer.Option(
            _OPTIONS_FLAG, "--storage-options", metavar="JSON",
            help="fsspec storage options for URL paths, a JSON object (for s3:// e.g. "
            '\'{"client_kwargs": {"endpoint_url": "http://127.0.0.1:9000"}}\', key, secret). Without it, '
            "credentials and the endpoint come from the environment (AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, "
            "AWS_ENDPOINT_URL ...) or ~/.aws. Never printed. Give it before the command.",
        ),
    ] = None,
) -> None:
    """Inspect and manage prime-ckpt checkpoints (trainer DCP state, orchestrator progress, weights).

    Paths may be local or fsspec URLs (s3://bucket/run/checkpoints/step_10) for inspect, list,
    verify, manifest, plan and prune.
    """
    _state["debug"] = debug
    _state["options"] = {}
    if storage_options is not None:
        _state["options"] = _parse_storage_options(storage_options)


def _parse_storage_options(text: str) -> dict[str, Any]:
    """``--storage.options`` validated as :class:`prime_ckpt.config.StorageConfig` validates it;
    a bad value is one line naming the flag (never echoing the value), exit 2."""
    try:
        value = json.loads(text)
    except ValueError as e:
        msg = f"not valid JSON ({e.msg}: line {e.lineno} column {e.colno})" if isinstance(e, json.JSONDecodeError) else "not valid JSON"
        _usage_error(f"{_OPTIONS_FLAG}: {msg}")
    if not isinstance(value, dict):
        _usage_error(f"{_OPTIONS_FLAG}: expected a JSON object of fsspec storage options, got a JSON {type(value).__name__}")
    from pydantic import ValidationError

    from prime_ckpt.config import StorageConfig, format_validation_error

    try:
        return StorageConfig(options=value).options
    except ValidationError as e:
        _usage_error(format_validation_error(e).replace("--options", _OPTIONS_FLAG))


def _usage_error(message: str) -> NoReturn:
    typer.echo(f"error: {_redact(message)}", err=True)
    raise typer.Exit(EXIT_USER_ERROR)


def _secrets(value: Any) -> list[str]:
    """Every string value inside the storage options (longest first), to be masked in output."""
    if isinstance(value, dict):
        return sorted({s for v in value.values() for s in _secrets(v)}, key=len, reverse=True)
    if isinstance(value, (list, tuple)):
        return sorted({s for v in value for s in _secrets(v)}, key=len, reverse=True)
    return [value] if isinstance(value, str) and len(value) >= 4 else []


# C0 and C1 control characters (ESC starts ANSI sequences), DEL: shown as \xNN, never sent raw.
_CONTROL_RE = re.compile(r"[\x00-\x1f\x7f-\x9f]")


def _visible(text: str) -> str:
    """``text`` with every control character (ESC, newline, tab ...) written as ``\\xNN``: names
    and paths from a checkpoint reach the terminal literally, one line each."""
    return _CONTROL_RE.sub(lambda m: f"\\x{ord(m.group()):02x}", text)


def _esc(value: Any) -> str:
    """``value`` as text for a rich table or markup line: control characters made visible and rich
    markup escaped (``app.[bold]x[/bold]`` is shown as written, not styled)."""
    return rich_escape(_visible(str(value)))


def _safe_tree(value: Any) -> Any:
    """Every string (keys and values) of a JSON-like result escaped with :func:`_esc`, for the
    table renderers; JSON output uses the result itself, exact."""
    if isinstance(value, str):
        return _esc(value)
    if isinstance(value, dict):
        return {(_esc(k) if isinstance(k, str) else k): _safe_tree(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_safe_tree(v) for v in value]
    return value


def _redact(text: str) -> str:
    """``text`` with every string value of ``--storage.options`` replaced by ``**********``, and
    control characters made visible (one plain line, never an ANSI sequence)."""
    for secret in _secrets(_state["options"]):
        text = text.replace(secret, "**********")
    return _visible(text)


def _backend_errors() -> tuple[type[BaseException], ...]:
    """Error types of remote storage backends that are not ``OSError`` (botocore's
    ``NoCredentialsError``, ``EndpointConnectionError``, ``ClientError`` ...), from the modules
    already imported (none is imported for a local path)."""
    found: list[type[BaseException]] = []
    for module, names in (("botocore.exceptions", ("BotoCoreError", "ClientError")), ("aiohttp", ("ClientError",))):
        mod = sys.modules.get(module)
        found += [c for c in (getattr(mod, n, None) for n in names) if isinstance(c, type) and issubclass(c, BaseException)]
    return tuple(found)


def _one_line(exc: BaseException, target: Any = None) -> str:
    if isinstance(exc, OSError) and not isinstance(exc, CheckpointNotFoundError) and exc.filename is not None:
        text = f"{exc.filename}: {exc.strerror or type(exc).__name__}"
    else:
        text = str(exc) or type(exc).__name__
    text = " ".join(text.split())
    if target is not None and is_remote(target) and not _URL_RE.match(text):
        # a remote backend's own message (botocore, s3fs), which does not name the URL
        text = f"{target}: {type(exc).__name__}: {text}"
    return text


@contextmanager
def user_errors(*extra: type[BaseException], target: Any = None) -> Iterator[None]:
    """Turn :data:`USER_ERRORS` (and ``extra``, and a remote backend's errors) into
    ``error: <path>: <what>`` on stderr and exit code 2. ``target``: the command's PATH, named
    in a remote backend's messages that do not name it themselves."""
    try:
        yield
    except USER_ERRORS + extra + _backend_errors() as e:
        if _state["debug"]:  # the traceback, and the same exit code as without --debug
            import traceback

            traceback.print_exc()
        typer.echo(f"error: {_redact(_one_line(e, target))}", err=True)
        raise typer.Exit(EXIT_USER_ERROR) from None


def _target(arg: str) -> Any:
    """A command's PATH as the library takes it. A local path stays the string it was; a URL
    becomes a UPath carrying ``--storage.options``, checked to exist (``no such bucket`` / ``no
    such file or directory``). Call inside :func:`user_errors`."""
    if not is_remote(arg):
        return arg
    protocol = arg.split("://", 1)[0]
    try:
        import fsspec

        fsspec.get_filesystem_class(protocol)
    except ValueError:
        _usage_error(f"{arg}: unknown URL protocol {protocol!r} (fsspec knows no file system of that name)")
    except ImportError as e:
        _usage_error(f"{arg}: the {protocol!r} file system needs a package that is not installed ({' '.join(str(e).split())})")
    try:
        path = to_path(arg, _state["options"])
        exists = path.exists()
    except (TypeError, ValueError, AttributeError, KeyError) as e:  # options the file system does not take
        if _state["debug"]:
            import traceback

            traceback.print_exc()
        _usage_error(f"{arg}: {_OPTIONS_FLAG} not accepted by the file system ({type(e).__name__}: {' '.join(str(e).split())})")
    if not exists:
        raise FileNotFoundError(f"{path}: {missing_reason(path)}")
    return path


def _refuse_remote(command: str, *paths: str) -> None:
    """Exit 2 with one line if any of ``paths`` is a URL (``command`` reads local paths only)."""
    for p in paths:
        if is_remote(p):
            _usage_error(f"{p}: remote paths are not supported by {command} yet (copy the step to a local directory first)")


def _console() -> Console:
    return Console(soft_wrap=False, highlight=False, width=max(Console().width, 120))


def _quietly(fn: Any, *args: Any) -> Any:
    """``fn(*args)`` with the library's log warnings held back: the command reports each outcome
    itself, once."""
    lib = logging.getLogger("prime_ckpt")
    level = lib.level
    lib.setLevel(logging.ERROR)
    try:
        return fn(*args)
    finally:
        lib.setLevel(level)


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
def _render_ignored(d: dict[str, Any], con: Console) -> None:
    """One line per entry of checkpoints/ or weights/ that is not a step, with the reason."""
    reasons = d.get("ignored_reasons") or {}
    if d["ignored"]:
        con.print("not steps (never touched): " + "; ".join(f"{n} ({reasons.get(n, 'not ours')})" for n in d["ignored"]))


def _render_listing(d: dict[str, Any], con: Console) -> None:
    con.print(f"[bold]{d['path']}[/] ({d['kind']}" + (": another tool's checkpoint folder, step-<N> dirs; read-only here)" if d["kind"] == "torchtitan" else ")"))
    if d["checkpoints"] is not None:
        t = Table(title="checkpoint steps", title_justify="left")
        cols = ("step", "status", "trainer", "path") if d["kind"] == "torchtitan" else ("step", "status", "trainer", "orchestrator", "path")
        for col in cols:
            t.add_column(col, overflow="fold")
        for s in d["checkpoints"]:
            cells = {
                "step": str(s["step"]), "status": _flag(s["complete"]), "path": s["path"],
                "trainer": "yes" if s["parts"]["trainer"] else ("partial" if "trainer" in s["present"] else "-"),
                "orchestrator": "yes" if s["parts"].get("orchestrator") else "-",
            }  # fmt: skip
            t.add_row(*(cells[c] for c in cols))
        con.print(t)
        con.print(f"latest complete step: {d['latest_complete_step']}")
    if d["weights"] is not None:
        t = Table(title="weight steps", title_justify="left")
        for col in ("step", "status", "path"):
            t.add_column(col, overflow="fold")
        for w in d["weights"]:
            t.add_row(str(w["step"]), _flag(w["complete"]), w["path"])
        con.print(t)
    _render_ignored(d, con)


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
        con.print(f"trainer: {_flag(False)} ({tr['path']}: no .metadata)")
        return
    files = ", ".join(f"{f['name']}" + ("" if f["exists"] else " [red](missing)[/]") for f in tr["storage_files"])
    con.print(f"trainer: {_flag(tr['complete'] if ok is None else ok)}  world size at save: {tr['world_size']}  files: {files}")
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


_SAVE_FIELDS = ("mode", "world_size", "async_level", "blocking_s", "staging_s", "total_s", "bytes", "total_bytes", "error")


def _save_field(key: str, value: Any) -> str:
    """``key=value`` of a save record, in units: seconds as ``1.234 s``, bytes as ``1.0 GiB``;
    a value of the wrong type is shown as it is (``inspect`` warns about it)."""
    number = isinstance(value, (int, float)) and not isinstance(value, bool)
    if key.endswith("_s") and number:
        return f"{key}={value:.3f} s"
    if key in ("bytes", "total_bytes") and isinstance(value, int) and not isinstance(value, bool):
        return f"{key}={_fmt_bytes(value)}"
    return f"{key}={value}"


def _render_step(d: dict[str, Any], con: Console) -> None:
    con.print(f"[bold]{d['path']}[/]  step {d['step']}  {_flag(d['complete'])}")
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
    con.print(f"[bold]{d['path']}[/]  {what}  {_flag(d['complete'])}")
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
    "safetensors_file": _render_weights,
    "safetensors_dir": _render_weights,
    "torchtitan": _render_listing,
    "trainer": lambda d, con: (con.print(f"[bold]{d['path']}[/]  step {d['step']}"),
                               _render_trainer(d["trainer"], con, ok=d["trainer"]["complete"] and not d["problems"])),
}


@app.command("inspect")
def inspect_cmd(
    path: Annotated[str, typer.Argument(metavar="PATH", help="Run output dir, checkpoints/ or weights/ dir, step_<N> dir, trainer/ or any DCP dir, "
                                        "a torchtitan checkpoint folder, a safetensors file or directory." + _URL_HELP)],
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
        result = to_dict(describe(_target(path), name_filter))
    if as_json:
        _print_json(result)
        return
    con = _console()
    _RENDERERS[result["kind"]](_safe_tree(result), con)
    for problem in result.get("problems", []):
        typer.echo(f"warning: {_redact(problem)}", err=True)


# -- plan / prune ------------------------------------------------------------------------------
_RunDir = Annotated[str, typer.Argument(metavar="OUTPUT_DIR", help="Run output dir (holds checkpoints/ and weights/)." + _URL_HELP)]
_Keep = Annotated[int | None, typer.Option("--keep", min=1, help="Keep the K newest complete checkpoint steps and the weights they pin (default: keep everything; nothing is deleted, as in the trainer without --ckpt.keep).")]
_KeepInterval = Annotated[int | None, typer.Option("--keep-interval", min=1, help="Also keep checkpoint steps that are multiples of N.")]
_AsyncLevel = Annotated[
    int | None,
    typer.Option(
        "--async-level", min=0,
        help="k: checkpoint step x pins weights [x-k, x] (the seed's rule). Default: the async level the run "
        "recorded in save_info.json; if the run recorded none and has weights, it must be given.",
    ),
]
_CurrentStep = Annotated[
    int | None,
    typer.Option("--current-step", min=0, help="The trainer's current step; higher steps are kept (default: the highest step on disk: a run's entry sets an earlier run's steps aside, so what is on disk is the live run's, see run.json)."),
]
_WeightsInterval = Annotated[int | None, typer.Option("--weights-interval", min=1, help="Also keep weights steps that are multiples of N.")]
_Rule = Annotated[
    list[str] | None,
    typer.Option("--rule", metavar="MODULE:NAME", help="Also keep what your retention rule says (repeatable): a callable "
                 "taking a prime_ckpt.retention.StepView and returning a reason (str) or None; imported from MODULE. "
                 "Rules only keep; their reasons show as 'rule NAME: ...'."),
]
_ConsumerStep = Annotated[int | None, typer.Option("--consumer-step", min=0, help="Last weights step the inference side acknowledged; steps >= it are kept.")]


def _resolve_async_level(output_dir, given: int | None) -> int:
    """The async level to plan with: ``given``, else the run's recorded one (save_info.json).

    Raises:
        AsyncLevelError: neither, and the run has weights steps: with a default of 0 a plan
            would delete weights ``[x - k, x - 1]`` that resuming at a kept step x needs.
    """
    from prime_ckpt.layout import recorded_async_level, scan_weights

    recorded = recorded_async_level(output_dir)
    if given is None:
        if recorded is not None:
            return recorded
        if scan_weights(output_dir):
            raise AsyncLevelError(
                f"--async-level: not given, and {output_dir} records none (no save_info.json with it); "
                "give the run's async level k (resuming at checkpoint step x needs weights [x-k, x])"
            )
        return 0
    if recorded is not None and given < recorded:
        typer.echo(
            f"warning: --async-level {given} is below the async level {recorded} this run recorded: "
            f"resuming at a kept step x needs weights [x-{recorded}, x], and this plan may delete some of them",
            err=True,
        )
    return given


def _plan_and_sizes(output_dir, keep, keep_interval, async_level, current_step, weights_interval, consumer_step, rules=()):
    from prime_ckpt.retention import RetentionPolicy, load_rule, plan_output_dir, plan_sizes

    async_level = _resolve_async_level(output_dir, async_level)
    policy = RetentionPolicy(
        keep=keep, keep_interval=keep_interval, async_level=async_level,
        weights_interval=weights_interval, consumer_step=consumer_step,
        rules=tuple(load_rule(r) for r in rules or ()),
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
        t.add_row(e.kind, str(e.step), action, _fmt_bytes(sizes[e.path]), _esc("; ".join(e.reasons)))
    con.print(t)
    freed = sum(sizes[e.path] for e in p.deletes)
    con.print(f"{len(p.deletes)} to delete, {len(p.keeps)} to keep, {_fmt_bytes(freed)} freed")


@app.command("plan")
def plan_cmd(
    output_dir: _RunDir,
    keep: _Keep = None,
    keep_interval: _KeepInterval = None,
    async_level: _AsyncLevel = None,
    current_step: _CurrentStep = None,
    weights_interval: _WeightsInterval = None,
    consumer_step: _ConsumerStep = None,
    rule: _Rule = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON instead of a table.")] = False,
) -> None:
    """Dry run of retention: every checkpoint and weights step with keep/delete and the reasons.

    \b
    Names that are not step_<int> are never listed and never deleted.
    JSON: {"entries": [{"path", "kind": "checkpoint"|"weights", "step", "action": "keep"|"delete",
           "reasons": [str], "bytes"}], "bytes_freed": int}
    Exit codes: 0 planned; 2 bad path or option.
    """
    with user_errors(target=output_dir):
        p, sizes = _plan_and_sizes(_target(output_dir), keep, keep_interval, async_level, current_step, weights_interval, consumer_step, rule)
    if as_json:
        _print_json(_plan_json(p, sizes))
        return
    _render_plan(p, sizes, _console(), f"retention plan for {_esc(output_dir)} (dry run)")


def _warn_if_held(output_dir: str) -> None:
    """One warning line when a live run holds the directory's lease (``run.lock``): its own
    retention runs after each of its saves, with its own policy."""
    from prime_ckpt.run import RunLease, lease_holder

    root = _target(output_dir)
    holder = lease_holder(root)
    if holder and RunLease(root, "").stale(holder) is None:
        typer.echo(_redact(f"warning: {root}: a live run holds this directory (run {holder.get('run_id')}, pid "
                           f"{holder.get('pid')} on host {holder.get('host')}); its own retention also runs after each save"), err=True)


def _clean_leftovers(output_dir: str) -> None:
    """After ``prune``: a delete renames the step to a hidden ``.step_N.deleting.*`` name first;
    remove what interrupted or failed deletes left (as the trainer does on start-up) and name
    what stays."""
    from prime_ckpt.inspection import ignored_reasons
    from prime_ckpt.layout import CHECKPOINTS_DIR, WEIGHTS_DIR
    from prime_ckpt.storage import clean_leftovers, to_path

    root = to_path(_target(output_dir))
    for d in (root / CHECKPOINTS_DIR, root / WEIGHTS_DIR):
        _quietly(clean_leftovers, d)
        for name, why in ignored_reasons(d).items():
            if why.startswith("leftover of an interrupted delete"):
                typer.echo(_redact(f"warning: {root}/{name}: {why} could not be removed; delete it by hand"), err=True)


@app.command("prune")
def prune_cmd(
    output_dir: _RunDir,
    keep: _Keep = None,
    keep_interval: _KeepInterval = None,
    async_level: _AsyncLevel = None,
    current_step: _CurrentStep = None,
    weights_interval: _WeightsInterval = None,
    consumer_step: _ConsumerStep = None,
    rule: _Rule = None,
    yes: Annotated[bool, typer.Option("--yes", "-y", help="Do not ask for confirmation.")] = False,
) -> None:
    """Apply the retention plan that `plan` shows (asks for confirmation unless --yes).

    Do not run it on a directory a live run is writing with another policy. Deleting a path
    that is already gone is not an error; a path that cannot be deleted is reported once and the
    rest carries on (exit 1). Leftovers of interrupted deletes (.step_N.deleting.*) are removed
    afterwards; any that cannot be are named. Without --keep nothing is deleted.
    """
    from prime_ckpt.retention import apply_plan

    with user_errors(target=output_dir):
        p, sizes = _plan_and_sizes(_target(output_dir), keep, keep_interval, async_level, current_step, weights_interval, consumer_step, rule)
    con = _console()
    _render_plan(p, sizes, con, f"retention plan for {_esc(output_dir)}")
    _warn_if_held(output_dir)
    if not p.deletes:
        con.print("nothing to delete")
        _clean_leftovers(output_dir)
        return
    if not yes and not typer.confirm(f"delete {len(p.deletes)} step directories?", default=False):
        typer.echo("aborted; nothing deleted", err=True)
        raise typer.Exit(1)
    result = _quietly(apply_plan, p)  # errors are reported below, once each
    con.print(f"deleted {len(result.deleted)}, already gone {len(result.already_gone)}, failed {len(result.failed)}")
    for path, err in result.failed:
        typer.echo(_redact(f"error: {path}: {err}"), err=True)
    _clean_leftovers(output_dir)
    if result.failed:
        raise typer.Exit(1)



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
    output_dir: _RunDir,
    keep: _Keep = None,
    keep_interval: _KeepInterval = None,
    async_level: _ListAsyncLevel = None,
    current_step: _CurrentStep = None,
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
       run: {run_id, start_step, ...} | null (run.json: the live run),
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
        target = _target(output_dir)
        policy = None
        if keep is not None or keep_interval is not None or async_level is not None:
            policy = RetentionPolicy(keep=keep, keep_interval=keep_interval, async_level=_resolve_async_level(target, async_level))
        table = list_run(target, policy, current_step).to_dict()
    if as_json:
        _print_json(table)
        return
    raw, table = table, _safe_tree(table)
    con = _console()
    con.print(f"[bold]{table['path']}[/]  parts per step: {'+'.join(table['parts'])}"
              + ("  (torchtitan's checkpoint folder, step-<N> dirs: another tool's, listed read-only)" if table["layout"] == "torchtitan" else ""))
    t = Table(title="checkpoint steps", title_justify="left")
    for col in ("step", "status", "resumable", "parts", "bytes", "manifest", "progress (step/samples/tokens)", "save", "retention"):
        t.add_column(col, overflow="fold", justify="right" if col in ("step", "bytes") else "left")
    for r in table["checkpoints"]:
        pr = r["progress"]
        si = r["save_info"]
        t.add_row(
            str(r["step"]), "[yellow]not ours[/]" if r["foreign"] else _flag(r["complete"]),
            "yes" if r["resumable"] else "[red]no[/]", _parts_cell(r["parts"], r["present"]), _fmt_bytes(r["bytes"]),
            "yes" if r["manifest"] else "-",
            f"{pr['step']}/{pr['total_samples']}/{pr['total_tokens']}" if pr else "-",
            f"{si.get('mode', '?')}, {si.get('world_size', '?')} ranks" if si else "-",
            _retention_cell(r["retention"]),
        )  # fmt: skip
    con.print(t if table["checkpoints"] else "no checkpoint steps")
    w = Table(title="weight steps", title_justify="left")
    for col in ("step", "status", "bytes", "manifest", "retention"):
        w.add_column(col, overflow="fold", justify="right" if col in ("step", "bytes") else "left")
    for r in table["weights"]:
        w.add_row(str(r["step"]), "[yellow]not ours[/]" if r["foreign"] else _flag(r["complete"]), _fmt_bytes(r["bytes"]),
                  "yes" if r["manifest"] else "-", _retention_cell(r["retention"]))
    con.print(w if table["weights"] else "no weight steps")
    con.print(f"latest complete step: {table['latest_complete_step']}; latest resumable step: {table['latest_resumable_step']}")
    if table["run"]:
        run = table["run"]
        con.print(f"live run: {run.get('run_id')} (started from {'checkpoint step ' + str(run['start_step']) if run.get('start_step') is not None else 'scratch'})")
    if table["superseded"]:
        con.print("set aside by a later run (never deleted): " + ", ".join(table["superseded"]))
    _render_ignored(table, con)
    for r in raw["checkpoints"]:
        for problem in r["problems"]:
            typer.echo(f"warning: {_redact(problem)}", err=True)
    for r in raw["weights"]:
        if r["foreign"] or r["problem"]:
            why = f"not this project's ({r['foreign']}); kept" if r["foreign"] else f"not complete: {r['problem']}"
            typer.echo(f"warning: {_redact(r['path'])}: {why}", err=True)


# -- verify / manifest --------------------------------------------------------------------------
@contextmanager
def _progress(total: float, description: str) -> Iterator[Any]:
    """A rich progress bar on stderr (only when stderr is a terminal); yields ``advance(n)``."""
    from rich.progress import (
        BarColumn,
        DownloadColumn,
        Progress,
        TextColumn,
        TimeRemainingColumn,
    )

    err = Console(stderr=True)
    columns = [TextColumn("{task.description}"), BarColumn(), DownloadColumn() if description == "hashing" else TextColumn("{task.completed:.0f}/{task.total:.0f}"), TimeRemainingColumn()]
    with Progress(*columns, console=err, transient=True, disable=not err.is_terminal) as bar:
        task = bar.add_task(description, total=total)
        yield lambda n: bar.advance(task, n)


_STATUS_STYLE = {"ok": "[green]ok[/]", "failed": "[red]FAILED[/]", "no manifest": "[yellow]NO MANIFEST[/]", "incomplete": "[red]INCOMPLETE[/]"}


@app.command("verify")
def verify_cmd(
    path: Annotated[str, typer.Argument(metavar="PATH", help="Run output dir (every step), checkpoints/ or weights/ dir, or one step_<N> dir." + _URL_HELP)],
    allow_missing_manifest: Annotated[
        bool, typer.Option("--allow-missing-manifest", help="A step without manifest.json passes if its structure is sound (checksums cannot be checked).")
    ] = False,
    complete_only: Annotated[
        bool, typer.Option("--complete-only", help="Incomplete steps (e.g. a save in progress) are reported but do not fail the check.")
    ] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON (schema below) instead of text.")] = False,
) -> None:
    """Check the integrity of checkpoint and weights steps against their manifest.json.

    \b
    Per step: every file the manifest lists is re-hashed (xxh3_64, read in chunks) and compared
    (size and checksum); files missing from disk and extra files in a covered part are reported.
    Also, without reading tensor data: .metadata reads safely, every data file it references
    exists and is long enough, no unreferenced files in trainer/, orchestrator.pt reads as a
    progress record, a weights dir has COMPLETE and a safetensors header that matches its size.
    A step without manifest.json fails ("no manifest") unless --allow-missing-manifest;
    `prime-ckpt manifest PATH` writes one for checkpoints saved before manifests existed.
    A part written after the manifest (orchestrator.pt) is "unverified": checked, not hashed.
    A manifest entry outside the step dir (absolute, "..", or a symlink out of it) is a problem
    and is never read. Writes nothing. A progress bar is shown on stderr when it is a terminal.
    JSON ("schema": "prime-ckpt.verify/1"):
      {path, ok: bool, allow_missing_manifest, complete_only,
       steps: [{path, kind: "checkpoint"|"weights", step, status: "ok"|"failed"|"no manifest"|
                "incomplete", manifest: bool, files_checked, bytes_checked,
                problems: ["<path>: <what>"], unverified: [path]}]}
    Exit codes: 0 every step ok; 1 a problem found (each named with its file); 2 bad path.
    """
    from prime_ckpt.manifest import (
        VERIFY_SCHEMA,
        all_ok,
        manifest_bytes,
        verify_step,
        verify_targets,
    )

    with user_errors(target=path):
        targets = verify_targets(_target(path))
        total = sum(manifest_bytes(t) for t in targets)
        with _progress(total, "hashing") as advance:
            reports = [verify_step(t, allow_missing_manifest=allow_missing_manifest, on_bytes=advance) for t in targets]
    ok = all_ok(reports, complete_only)
    if as_json:
        _print_json({
            "schema": VERIFY_SCHEMA, "path": path, "ok": ok, "allow_missing_manifest": allow_missing_manifest,
            "complete_only": complete_only, "steps": [r.to_dict() for r in reports],
        })  # fmt: skip
    else:
        con = _console()
        for r in reports:
            checked = f"{r.files_checked} files, {_fmt_bytes(r.bytes_checked)} checked" if r.manifest else "no checksums"
            con.print(f"{_STATUS_STYLE.get(r.status, r.status)}  {r.kind} step {r.step}  {_esc(r.path)}  ({checked})", soft_wrap=True)
            for problem in r.problems:
                con.print(f"    {_visible(problem)}", markup=False, soft_wrap=True)
            for u in r.unverified:
                con.print(f"    {_visible(str(u))}: not covered by manifest.json (written after it); checked, not hashed", markup=False, soft_wrap=True)
        bad = sum(1 for r in reports if not r.ok)
        con.print(f"{len(reports)} steps, {len(reports) - bad} ok, {bad} not ok" + (" (incomplete tolerated)" if complete_only else ""))
    if not ok:
        raise typer.Exit(EXIT_CHECK_FAILED)


@app.command("manifest")
def manifest_cmd(
    path: Annotated[str, typer.Argument(metavar="PATH", help="Run output dir, checkpoints/ or weights/ dir, or one step_<N> dir." + _URL_HELP)],
    force: Annotated[bool, typer.Option("--force", help="Rewrite existing manifests (accepts the files as they are now, even if they no longer match).")] = False,
) -> None:
    """Write manifest.json for steps that lack one (checkpoints saved before manifests existed).

    \b
    Only complete, structurally sound steps get a manifest (a manifest must not bless a broken
    checkpoint); others are reported and skipped. The trainer writes manifests itself after each
    committed save. This is the one command besides `prune` that writes into a checkpoint.
    Exit codes: 0 every step has a manifest now; 1 a step was skipped; 2 bad path.
    """
    from prime_ckpt.manifest import (
        MANIFEST_FILE,
        verify_step,
        verify_targets,
        write_manifest,
    )

    con = _console()
    skipped = 0
    with user_errors(target=path):
        targets = verify_targets(_target(path))
        for t in targets:
            if (t / MANIFEST_FILE).is_file() and not force:
                con.print(f"exists   {t}")
                continue
            r = verify_step(t, allow_missing_manifest=True) if not force else None
            if r is not None and not r.ok:
                skipped += 1
                con.print(f"[red]skipped[/]  {t}: {r.status}: {r.problems[0] if r.problems else ''}", soft_wrap=True)
                continue
            written = write_manifest(t)
            con.print(f"wrote    {written}")
    if skipped:
        raise typer.Exit(EXIT_CHECK_FAILED)


# -- convert ---------------------------------------------------------------------------------------
class _To(str, Enum):
    torch_save = "torch-save"
    safetensors = "safetensors"
    dcp = "dcp"


class _From(str, Enum):
    auto = "auto"
    torch_save = "torch-save"


class _DType(str, Enum):
    bf16 = "bf16"
    fp16 = "fp16"
    fp32 = "fp32"


@app.command("convert")
def convert_cmd(
    src: Annotated[str, typer.Argument(metavar="PATH", help="Checkpoint step_<N> dir or trainer/ DCP dir; a weights step dir (for safetensors); a torch.save file (with --from torch-save).")],
    out: Annotated[str, typer.Argument(metavar="OUT", help="Output file (torch-save, safetensors) or directory (dcp).")],
    to: Annotated[_To | None, typer.Option("--to", help="Output format (default: dcp with --from torch-save; required otherwise).")] = None,
    from_: Annotated[_From, typer.Option("--from", help="Input format: auto (DCP or weights dir) or torch-save (a torch.save file).")] = _From.auto,
    dtype: Annotated[_DType | None, typer.Option("--dtype", help="safetensors only: cast floating-point tensors to this dtype.")] = None,
    force: Annotated[bool, typer.Option("--force", help="Replace OUT if it is an existing regular file (never a device, FIFO, non-empty directory, a DCP checkpoint or a part of one).")] = False,
    key: Annotated[str | None, typer.Option("--key", metavar="PREFIX", help="safetensors from DCP: the prefix of the model's tensors (e.g. app.model, model; '' = the root). Default: detected.")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print what was written as JSON.")] = False,
) -> None:
    """Convert a checkpoint: DCP -> torch.save file or model.safetensors; torch.save -> DCP.

    \b
    --to torch-save   DCP -> one torch.save file of the nested state dict {"app": {...}}
                      (model, optimizer, scheduler, progress, rank state; all in memory).
    --to safetensors  DCP or weights dir -> HF-style model.safetensors with the model tensors
                      only, named without their prefix, optionally --dtype bf16|fp16|fp32. The
                      model's prefix is detected: app.model. (prime-ckpt), model. ({"model": ...},
                      accelerate), else the root minus optimizer/lr_scheduler/dataloader/
                      train_state (torchtitan, a plain dcp.save of a model); --key PREFIX chooses.
                      OUT is the file, or a directory receiving model.safetensors when it exists,
                      ends in "/" or has no suffix. Files are written 0644.
    --from torch-save PATH.pt OUT   torch.save file (e.g. the seed's single-file trainer.pt),
                      loaded with weights_only=True -> DCP dir; a dict without a top-level
                      "app" key is stored under "app" (keys app.model.* like the trainer's).
    .metadata is read through the restricted unpickler and non-tensor values with
    weights_only=True. The input is never modified; OUT is written under a temp name and
    renamed into place; an existing OUT is refused without --force; OUT inside the input, or
    inside any checkpoint or weights step (checkpoints/step_<N>, weights/step_<N>, a DCP dir,
    also one still being written or saved per rank, torchtitan's checkpoint/step-<N>, DCP
    HuggingFace-writer shards; symlinks resolved), is refused even with --force. A safetensors
    OUT ends with .safetensors, or names a directory that receives model.safetensors.
    JSON: {"schema": "prime-ckpt.convert/1", source, source_kind: "dcp"|"weights"|"torch-save",
           output, format, tensors, bytes, dtype, wrapped_in_app}
    Local paths only for now (a URL is refused, exit 2).
    Exit codes: 0 written; 2 bad input, bad option or existing output.
    """
    _refuse_remote("convert", src, out)
    from dataclasses import asdict

    from prime_ckpt.convert import ConvertError, dcp_to_torch_save, to_safetensors, torch_save_to_dcp

    with user_errors(ConvertError):
        if from_ is _From.torch_save:
            if to not in (None, _To.dcp):
                raise ConvertError(f"{src}: --from torch-save converts to dcp only (got --to {to.value})")
            if dtype is not None:
                raise ConvertError(f"{src}: --dtype applies to --to safetensors only")
            result = torch_save_to_dcp(src, out, force=force)
        elif to is None:
            raise ConvertError(f"{src}: --to is required (torch-save or safetensors), or --from torch-save")
        elif to is _To.dcp:
            raise ConvertError(f"{src}: --to dcp needs --from torch-save (the input is already DCP or safetensors)")
        elif to is _To.torch_save:
            if key is not None:
                raise ConvertError(f"{src}: --key applies to --to safetensors only")
            if dtype is not None:
                raise ConvertError(f"{src}: --dtype applies to --to safetensors only")
            result = dcp_to_torch_save(src, out, force=force)
        else:
            result = to_safetensors(src, out, dtype=dtype.value if dtype else None, force=force, key=key)
    if as_json:
        _print_json({"schema": "prime-ckpt.convert/1", **asdict(result)})
        return
    note = " (stored under top-level key 'app')" if result.wrapped_in_app else ""
    _console().print(
        f"wrote {result.output} ({result.format}): {result.tensors} tensors, {result.bytes} bytes "
        f"({_fmt_bytes(result.bytes)}) from {result.source} ({result.source_kind}){note}",
        markup=False,
        soft_wrap=True,
    )


# -- diff -----------------------------------------------------------------------------------------
@app.command("diff")
def diff_cmd(
    a: Annotated[str, typer.Argument(metavar="A", help="Checkpoint step_<N> dir / trainer/ DCP dir, weights step dir or .safetensors file.")],
    b: Annotated[str, typer.Argument(metavar="B", help="The same kinds as A.")],
    values: Annotated[bool, typer.Option("--values", help="Also load and compare tensor values (one tensor per side at a time).")] = False,
    atol: Annotated[float, typer.Option("--atol", min=0.0, help="With --values: a max abs difference <= ATOL counts as equal (default 0: bitwise).")] = 0.0,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON (schema below) instead of tables.")] = False,
) -> None:
    """Compare two checkpoints: tensors added, removed, changed shape/dtype; with --values, values.

    \b
    Without --values only metadata is read (.metadata through the restricted unpickler,
    safetensors headers). A DCP checkpoint against weights compares the model only
    (app.model.* without the prefix). Non-tensor DCP entries are compared by name.
    JSON ("schema": "prime-ckpt.diff/1"):
      {a, b, a_kind, b_kind: "dcp"|"weights", model_only: bool,
       added / removed: [{name, shape, dtype}], changed: [{name, a: {..}, b: {..}}],
       same_layout: int (same name, shape, dtype), non_tensors_added / _removed: [name],
       values: [{name, equal (bitwise), max_abs_diff (float, or "inf"/"nan")}] | null,
       non_tensor_values: [{name, equal, a?, b? (reprs when different)}] | null,
       atol, values_compared: bool,
       identical: bool (without --values: the layout only, values_compared false)}
    Local paths only for now (a URL is refused, exit 2).
    Exit codes: 0 identical (without --values: same layout; values not compared); 1 different;
    2 bad path or unreadable/unsafe metadata.
    """
    _refuse_remote("diff", a, b)
    from prime_ckpt.compare import diff
    from prime_ckpt.convert import ConvertError

    with user_errors(ConvertError):
        if values:
            from prime_ckpt.convert import open_source

            n = len(open_source(a).tensors)
            with _progress(n, "comparing") as advance:
                result = diff(a, b, values=True, atol=atol, on_tensor=lambda _name: advance(1))
        else:
            result = diff(a, b)
    d = result.to_dict()
    if as_json:
        _print_json(d)
    else:
        raw, d = d, _safe_tree(d)
        con = _console()
        con.print(f"A: {d['a']} ({d['a_kind']})\nB: {d['b']} ({d['b_kind']})" + ("\n(model tensors only)" if d["model_only"] else ""))
        for key, title in (("added", "only in B (added)"), ("removed", "only in A (removed)")):
            if d[key]:
                t = Table(title=title, title_justify="left")
                for col in ("name", "shape", "dtype"):
                    t.add_column(col, overflow="fold")
                for x in d[key]:
                    t.add_row(x["name"], str(x["shape"]), x["dtype"])
                con.print(t)
        if d["changed"]:
            t = Table(title="changed shape or dtype", title_justify="left")
            for col in ("name", "A", "B"):
                t.add_column(col, overflow="fold")
            for x in d["changed"]:
                t.add_row(x["name"], f"{x['a']['shape']} {x['a']['dtype']}", f"{x['b']['shape']} {x['b']['dtype']}")
            con.print(t)
        for key, title in (("non_tensors_added", "non-tensor entries only in B"), ("non_tensors_removed", "non-tensor entries only in A")):
            if d[key]:
                con.print(f"{title}: " + ", ".join(d[key]))
        if values:
            differ = result.values_differ
            if differ:
                t = Table(title="values differ", title_justify="left")
                t.add_column("name", overflow="fold")
                t.add_column("max abs diff", justify="right")
                for v in differ:
                    t.add_row(_esc(v.name), f"{v.max_abs_diff:.6g}")
                con.print(t)
            con.print(f"values: {len(result.values or []) - len(differ)} of {len(result.values or [])} tensors equal" + (f" (atol {atol:g})" if atol else " (bitwise)"))
            for v in raw["non_tensor_values"] or []:
                if not v["equal"]:
                    con.print(f"non-tensor {_esc(v['name'])}: {_esc(v['a'])} != {_esc(v['b'])}", soft_wrap=True)
        summary = (
            f"{len(d['added'])} added, {len(d['removed'])} removed, {len(d['changed'])} changed, {d['same_layout']} same layout"
        )
        if not result.identical:
            verdict = "different: "
        elif values:
            verdict = "identical: "
        else:  # only names, shapes and dtypes were compared
            verdict = "same layout (values not compared; --values compares them): "
        con.print(verdict + summary)
    if not result.identical:
        raise typer.Exit(EXIT_CHECK_FAILED)


def main(argv: list[str] | None = None) -> None:
    """Console-script entry point (``prime-ckpt``)."""
    app(args=argv if argv is not None else sys.argv[1:], prog_name="prime-ckpt")


if __name__ == "__main__":
    main()
