"""How the CLI shows results: rich tables on stdout, or exact JSON (``--json``).

Text that comes from a checkpoint (names, paths, reasons) goes through :func:`esc` /
:func:`safe_tree` before it reaches a rich table: control characters are made visible and rich
markup is escaped. JSON output prints the library's result as it is. Nothing here reads a file.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import typer
from rich.console import Console
from rich.markup import escape as rich_escape
from rich.table import Table

from prime_ckpt.cli.errors import visible


def esc(value: Any) -> str:
    """``value`` as text for a rich table or markup line: control characters made visible and rich
    markup escaped (``app.[bold]x[/bold]`` is shown as written, not styled)."""
    return rich_escape(visible(str(value)))


def safe_tree(value: Any) -> Any:
    """Every string (keys and values) of a JSON-like result escaped with :func:`esc`, for the
    table renderers; JSON output uses the result itself, exact."""
    if isinstance(value, str):
        return esc(value)
    if isinstance(value, dict):
        return {(esc(k) if isinstance(k, str) else k): safe_tree(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [safe_tree(v) for v in value]
    return value


def console() -> Console:
    """The stdout console: no soft wrap, no highlighting, at least 120 columns."""
    return Console(soft_wrap=False, highlight=False, width=max(Console().width, 120))


def print_json(data: Any) -> None:
    typer.echo(json.dumps(data, indent=2))


def quietly(fn: Any, *args: Any) -> Any:
    """``fn(*args)`` with the library's log warnings held back: the command reports each outcome
    itself, once."""
    lib = logging.getLogger("prime_ckpt")
    level = lib.level
    lib.setLevel(logging.ERROR)
    try:
        return fn(*args)
    finally:
        lib.setLevel(level)


def fmt_bytes(n: int | None) -> str:
    """``n`` bytes in binary units (``1.0 GiB``); ``-`` for None."""
    if n is None:
        return "-"
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n} B" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024  # type: ignore[assignment]
    raise AssertionError


def flag(ok: bool) -> str:
    return "[green]complete[/]" if ok else "[red]INCOMPLETE[/]"


def table(title: str, columns: tuple[str, ...], right: tuple[str, ...] = ()) -> Table:
    """A left-titled table whose ``columns`` fold long text (``right``: right-justified ones)."""
    t = Table(title=title, title_justify="left")
    for col in columns:
        t.add_column(col, overflow="fold", justify="right" if col in right else "left")
    return t


def render_ignored(d: dict[str, Any], con: Console) -> None:
    """One line per entry of checkpoints/ or weights/ that is not a step, with the reason."""
    reasons = d.get("ignored_reasons") or {}
    if d["ignored"]:
        con.print("not steps (never touched): " + "; ".join(f"{n} ({reasons.get(n, 'not ours')})" for n in d["ignored"]))


@contextmanager
def progress(total: float, description: str) -> Iterator[Any]:
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
