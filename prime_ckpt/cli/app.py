"""The ``prime-ckpt`` typer app and its root callback (the global ``--debug`` and
``--storage.options``). Commands register themselves on :data:`app` in the ``cmd_*`` modules."""

from __future__ import annotations

import sys
from typing import Annotated

import typer

from prime_ckpt.cli.errors import STATE, redact
from prime_ckpt.cli.options import OPTIONS_FLAG, parse_storage_options

app = typer.Typer(
    name="prime-ckpt",
    help="Inspect and manage prime-ckpt checkpoints (trainer DCP state, orchestrator progress, weights).",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
)


@app.callback()
def _root(
    debug: Annotated[bool, typer.Option("--debug", help="Show tracebacks instead of one-line errors.")] = False,
    storage_options: Annotated[
        str | None,
        typer.Option(
            OPTIONS_FLAG, "--storage-options", metavar="JSON",
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
    STATE["debug"] = debug
    STATE["options"] = {}
    if storage_options is not None:
        STATE["options"] = parse_storage_options(storage_options)


# click's error types, wherever this typer takes click from (its own vendored copy in recent
# releases, the click package before): found from the public typer.BadParameter.
_USAGE_ERROR = next(c for c in typer.BadParameter.__mro__ if c.__name__ == "UsageError")
_CLICK_ERROR = next(c for c in typer.BadParameter.__mro__ if c.__name__ == "ClickException")


def main(argv: list[str] | None = None) -> None:
    """Console-script entry point (``prime-ckpt``). Exits 0, 1 (a check failed) or 2 (usage
    error or bad input). A usage error (an unknown flag, a flag value out of range, a missing
    argument) is one line like every other error: ``error: prime-ckpt plan: Invalid value for
    '--keep': ... (see prime-ckpt plan --help)``, instead of click's four-line usage block."""
    try:
        rv = app(args=argv if argv is not None else sys.argv[1:], prog_name="prime-ckpt", standalone_mode=False)
    except _USAGE_ERROR as e:
        if type(e).__name__ == "NoArgsIsHelpError":  # `prime-ckpt` / `prime-ckpt plan` alone: the help
            e.show()
            sys.exit(e.exit_code)
        where = e.ctx.command_path if e.ctx is not None else "prime-ckpt"
        message = " ".join(e.format_message().split())
        sys.stderr.write(f"error: {where}: {redact(message)} (see {where} --help)\n")
        sys.exit(2)
    except _CLICK_ERROR as e:
        sys.stderr.write(f"error: {redact(' '.join(e.format_message().split()))}\n")
        sys.exit(e.exit_code)
    except typer.Abort:
        sys.stderr.write("aborted\n")
        sys.exit(1)
    sys.exit(rv if isinstance(rv, int) else 0)
