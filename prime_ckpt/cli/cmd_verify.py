"""``prime-ckpt verify`` and ``prime-ckpt manifest``: checking steps against their
``manifest.json``, and writing one for steps saved without it.

The library checks (:func:`prime_ckpt.manifest.verify_step`) and decides which steps may get a
manifest (:func:`prime_ckpt.manifest_backfill.backfill_manifests`); this module reports.
"""

from __future__ import annotations

from typing import Annotated

import typer

from prime_ckpt.cli.app import app
from prime_ckpt.cli.errors import EXIT_CHECK_FAILED, user_errors, visible
from prime_ckpt.cli.options import URL_HELP, target
from prime_ckpt.cli.render import console, esc, fmt_bytes, print_json, progress
from prime_ckpt.manifest_backfill import backfill_manifests

_STATUS_STYLE = {"ok": "[green]ok[/]", "failed": "[red]FAILED[/]", "no manifest": "[yellow]NO MANIFEST[/]", "incomplete": "[red]INCOMPLETE[/]"}


@app.command("verify")
def verify_cmd(
    path: Annotated[str, typer.Argument(metavar="PATH", help="Run output dir (every step), checkpoints/ or weights/ dir, or one step_<N> dir." + URL_HELP)],
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
    from prime_ckpt.manifest import VERIFY_SCHEMA, all_ok, manifest_bytes, verify_targets
    from prime_ckpt.verify import verify_steps

    with user_errors(target=path):
        targets = verify_targets(target(path))
        total = sum(manifest_bytes(t) for t in targets)
        with progress(total, "hashing") as advance:
            reports = verify_steps(targets, allow_missing_manifest=allow_missing_manifest, on_bytes=advance)
    ok = all_ok(reports, complete_only)
    if as_json:
        print_json({
            "schema": VERIFY_SCHEMA, "path": path, "ok": ok, "allow_missing_manifest": allow_missing_manifest,
            "complete_only": complete_only, "steps": [r.to_dict() for r in reports],
        })  # fmt: skip
    else:
        con = console()
        for r in reports:
            checked = f"{r.files_checked} files, {fmt_bytes(r.bytes_checked)} checked" if r.manifest else "no checksums"
            con.print(f"{_STATUS_STYLE.get(r.status, r.status)}  {r.kind} step {r.step}  {esc(r.path)}  ({checked})", soft_wrap=True)
            for problem in r.problems:
                con.print(f"    {visible(problem)}", markup=False, soft_wrap=True)
            for u in r.unverified:
                con.print(f"    {visible(str(u))}: not covered by manifest.json (written after it); checked, not hashed", markup=False, soft_wrap=True)
        bad = sum(1 for r in reports if not r.ok)
        con.print(f"{len(reports)} steps, {len(reports) - bad} ok, {bad} not ok" + (" (incomplete tolerated)" if complete_only else ""))
    if not ok:
        raise typer.Exit(EXIT_CHECK_FAILED)



@app.command("manifest")
def manifest_cmd(
    path: Annotated[str, typer.Argument(metavar="PATH", help="Run output dir, checkpoints/ or weights/ dir, or one step_<N> dir." + URL_HELP)],
    force: Annotated[bool, typer.Option("--force", help="Rewrite existing manifests (accepts the files as they are now, even if they no longer match).")] = False,
) -> None:
    """Write manifest.json for steps that lack one (checkpoints saved before manifests existed).

    \b
    Only complete, structurally sound steps get a manifest (a manifest must not bless a broken
    checkpoint); others are reported and skipped. The trainer writes manifests itself after each
    committed save. This is the one command besides `prune` that writes into a checkpoint.
    Exit codes: 0 every step has a manifest now; 1 a step was skipped; 2 bad path.
    """
    con = console()
    skipped = 0
    with user_errors(target=path):
        for outcome in backfill_manifests(target(path), force=force):
            if outcome.action == "exists":
                con.print(f"exists   {outcome.path}")
            elif outcome.action == "skipped":
                skipped += 1
                con.print(f"[red]skipped[/]  {outcome.path}: {outcome.detail}", soft_wrap=True)
            else:
                con.print(f"wrote    {outcome.path}")
    if skipped:
        raise typer.Exit(EXIT_CHECK_FAILED)
