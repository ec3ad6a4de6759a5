"""``prime-ckpt plan`` and ``prime-ckpt prune``: the retention plan over a run's steps (dry run),
and applying it.

The library plans (:func:`prime_ckpt.retention.plan_output_dir`, pure over a listing) and
deletes (:func:`prime_ckpt.retention.apply_plan`); this module renders the plan, asks, and
reports each outcome once.
"""

from __future__ import annotations

from typing import Annotated, Any

import typer
from rich.console import Console

from prime_ckpt.async_level import resolve_async_level
from prime_ckpt.cli.app import app
from prime_ckpt.cli.errors import redact, user_errors, warn
from prime_ckpt.cli.options import JsonFlag, PolicyArgs, RunDir, policy_options, target
from prime_ckpt.cli.render import console, esc, fmt_bytes, print_json, quietly, table


def _plan_and_sizes(output_dir: Any, args: PolicyArgs) -> tuple[Any, dict[Any, int]]:
    """The retention plan the options ask for over the run at ``output_dir``, and the bytes of
    every step it names."""
    from prime_ckpt.retention import RetentionPolicy, load_rule, plan_output_dir, plan_sizes

    policy = RetentionPolicy(
        keep=args.keep, keep_interval=args.keep_interval, async_level=resolve_async_level(output_dir, args.async_level, warn=warn),
        weights_interval=args.weights_interval, consumer_step=args.consumer_step,
        rules=tuple(load_rule(r) for r in args.rule or ()),
    )  # fmt: skip
    p = plan_output_dir(output_dir, policy, current_step=args.current_step)
    return p, plan_sizes(p)


def _plan_json(p: Any, sizes: dict[Any, int]) -> dict[str, Any]:
    return {
        "entries": [{**e.to_json(), "bytes": sizes[e.path]} for e in p.entries],
        "bytes_freed": sum(sizes[e.path] for e in p.deletes),
    }


def _render_plan(p: Any, sizes: dict[Any, int], con: Console, title: str) -> None:
    t = table(title, ("kind", "step", "action", "bytes", "reasons"))
    for e in p.entries:
        action = "[red]delete[/]" if e.action == "delete" else "[green]keep[/]"
        t.add_row(e.kind, str(e.step), action, fmt_bytes(sizes[e.path]), esc("; ".join(e.reasons)))
    con.print(t)
    freed = sum(sizes[e.path] for e in p.deletes)
    con.print(f"{len(p.deletes)} to delete, {len(p.keeps)} to keep, {fmt_bytes(freed)} freed")


@app.command("plan")
@policy_options
def plan_cmd(output_dir: RunDir, policy: PolicyArgs, as_json: JsonFlag = False) -> None:
    """Dry run of retention: every checkpoint and weights step with keep/delete and the reasons.

    \b
    Names that are not step_<int> are never listed and never deleted.
    JSON: {"entries": [{"path", "kind": "checkpoint"|"weights", "step", "action": "keep"|"delete",
           "reasons": [str], "bytes"}], "bytes_freed": int}
    Exit codes: 0 planned; 2 bad path or option.
    """
    with user_errors(target=output_dir):
        p, sizes = _plan_and_sizes(target(output_dir), policy)
    if as_json:
        print_json(_plan_json(p, sizes))
        return
    _render_plan(p, sizes, console(), f"retention plan for {esc(output_dir)} (dry run)")


def _warn_if_held(output_dir: str) -> None:
    """One warning line when a live run holds the directory's lease (``run.lock``): its own
    retention runs after each of its saves, with its own policy."""
    from prime_ckpt.run import RunLease, lease_holder

    root = target(output_dir)
    holder = lease_holder(root)
    if holder and RunLease(root, "").stale(holder) is None:
        warn(f"{root}: a live run holds this directory (run {holder.get('run_id')}, pid "
             f"{holder.get('pid')} on host {holder.get('host')}); its own retention also runs after each save")


def _clean_leftovers(output_dir: str) -> None:
    """After ``prune``: a delete renames the step to a hidden ``.step_N.deleting.*`` name first;
    remove what interrupted or failed deletes left (as the trainer does on start-up) and name
    what stays."""
    from prime_ckpt.inspection import ignored_reasons
    from prime_ckpt.layout import CHECKPOINTS_DIR, WEIGHTS_DIR
    from prime_ckpt.storage import clean_leftovers, to_path

    root = to_path(target(output_dir))
    for d in (root / CHECKPOINTS_DIR, root / WEIGHTS_DIR):
        quietly(clean_leftovers, d)
        for name, why in ignored_reasons(d).items():
            if why.startswith("leftover of an interrupted delete"):
                warn(f"{root}/{name}: {why} could not be removed; delete it by hand")


@app.command("prune")
@policy_options
def prune_cmd(
    output_dir: RunDir,
    policy: PolicyArgs,
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
        p, sizes = _plan_and_sizes(target(output_dir), policy)
    con = console()
    _render_plan(p, sizes, con, f"retention plan for {esc(output_dir)}")
    _warn_if_held(output_dir)
    if not p.deletes:
        con.print("nothing to delete")
        _clean_leftovers(output_dir)
        return
    if not yes and not typer.confirm(f"delete {len(p.deletes)} step directories?", default=False):
        typer.echo("aborted; nothing deleted", err=True)
        raise typer.Exit(1)
    result = quietly(apply_plan, p)  # errors are reported below, once each
    con.print(f"deleted {len(result.deleted)}, already gone {len(result.already_gone)}, failed {len(result.failed)}")
    for path, err in result.failed:
        typer.echo(redact(f"error: {path}: {err}"), err=True)
    _clean_leftovers(output_dir)
    if result.failed:
        raise typer.Exit(1)
