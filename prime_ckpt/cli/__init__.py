"""``prime-ckpt``: the command-line tool, thin over the library.

Each command is one function registered on :data:`app` that calls the library, then formats the
result (rich tables, or ``--json``). Errors the library raises for a bad path or a bad file
(:data:`USER_ERRORS`) become one line on stderr, ``error: <path>: <what is wrong>``, and exit
code 2; ``prime-ckpt --debug <command>`` shows the traceback instead. Exit codes of every
command: 0 ok, 1 a check failed (``verify`` found a problem, ``diff`` a difference), 2 usage
error or bad input.

Layout: :mod:`~prime_ckpt.cli.app` (the typer app, global options), :mod:`~prime_ckpt.cli.errors`
(one-line errors, secret masking), :mod:`~prime_ckpt.cli.render` (tables, JSON),
:mod:`~prime_ckpt.cli.options` (shared options, PATH handling), and one ``cmd_<family>.py`` per
command family, listed in :data:`COMMANDS`. Adding a command means adding one function decorated
with ``@app.command("name")`` in a ``cmd_*`` module (a new module: add its name to
:data:`COMMANDS`), whose body runs inside ``with user_errors(target=path):`` and takes its PATH
through :func:`~prime_ckpt.cli.options.target`.

The read-only commands (``inspect``, ``list``, ``verify``, ``plan``, ``--help``) never import
torch: importing it alone takes seconds, longer than the work itself. Modules that need torch
(``convert``, ``compare``, ``trainer`` ...) are imported inside the commands that use them, and
their error types are passed to :func:`user_errors` there
(``tests/test_inspect_torch_free.py`` checks this).

Every PATH may be an fsspec URL (``s3://bucket/run/...``) for ``inspect``, ``list``, ``verify``,
``manifest``, ``plan`` and ``prune``: :func:`~prime_ckpt.cli.options.target` turns it into a
UPath carrying the global ``--storage.options`` (credentials and the endpoint may also come from
the environment) and checks that it exists. A remote backend's own errors (botocore's, which are
not ``OSError``) are user errors too (exit 2, one line naming the URL). The options are never
printed: every error line has their string values masked
(:func:`~prime_ckpt.cli.errors.redact`). ``convert`` and ``diff`` take local paths only.
"""

from __future__ import annotations

import importlib

from prime_ckpt.async_level import AsyncLevelError
from prime_ckpt.cli.app import app, main
from prime_ckpt.cli.errors import EXIT_CHECK_FAILED, EXIT_USER_ERROR, USER_ERRORS, user_errors

#: The command modules, in the order their commands are listed by ``--help``; importing one
#: registers its commands on :data:`app`.
COMMANDS = ("cmd_inspect", "cmd_retention", "cmd_verify", "cmd_convert")

for _name in COMMANDS:
    importlib.import_module(f"{__name__}.{_name}")

__all__ = ["COMMANDS", "EXIT_CHECK_FAILED", "EXIT_USER_ERROR", "USER_ERRORS", "AsyncLevelError", "app", "main", "user_errors"]
