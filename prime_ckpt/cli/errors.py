"""How the CLI fails: one line on stderr, secrets masked, and its exit codes.

Errors the library raises for a bad path or a bad file (:data:`USER_ERRORS`) become one line,
``error: <path>: <what is wrong>``, and exit code 2 (:func:`user_errors`); ``--debug`` prints the
traceback first. Every line the CLI prints from an error or a warning goes through
:func:`redact`: the string values of ``--storage.options`` are masked and control characters
made visible. :data:`STATE` holds the global options (``--debug``, ``--storage.options``) the
root callback sets.
"""

from __future__ import annotations

import re
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, NoReturn

import typer

from prime_ckpt.async_level import AsyncLevelError
from prime_ckpt.dcp_metadata import MetadataError
from prime_ckpt.errors import PrimeCkptError
from prime_ckpt.inspection import InspectError
from prime_ckpt.layout import CheckpointNotFoundError
from prime_ckpt.manifest import ManifestError, VerifyTargetError
from prime_ckpt.orchestrator import ProgressRecordError
from prime_ckpt.storage import is_remote
from prime_ckpt.storage.paths import URL_RE

#: Exit code when a check (``verify``, ``diff``) found a problem or a difference.
EXIT_CHECK_FAILED = 1

#: Exit code for a bad path or an unreadable/unsafe file (same as click's usage errors).
EXIT_USER_ERROR = 2

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

#: The global options of this invocation: ``debug`` (bool), ``options`` (the parsed
#: ``--storage.options``, whose string values are secrets).
STATE: dict[str, Any] = {"debug": False, "options": {}}

#: What a secret shows as (``prime_ckpt.config.MASK``; config is not imported: pydantic is slow).
MASK = "**********"

# C0 and C1 control characters (ESC starts ANSI sequences), DEL: shown as \xNN, never sent raw.
_CONTROL_RE = re.compile(r"[\x00-\x1f\x7f-\x9f]")


def visible(text: str) -> str:
    """``text`` with every control character (ESC, newline, tab ...) written as ``\\xNN``: names
    and paths from a checkpoint reach the terminal literally, one line each."""
    return _CONTROL_RE.sub(lambda m: f"\\x{ord(m.group()):02x}", text)


def _secrets(value: Any) -> list[str]:
    """Every string value inside the storage options (longest first), to be masked in output."""
    if isinstance(value, dict):
        return sorted({s for v in value.values() for s in _secrets(v)}, key=len, reverse=True)
    if isinstance(value, (list, tuple)):
        return sorted({s for v in value for s in _secrets(v)}, key=len, reverse=True)
    return [value] if isinstance(value, str) and len(value) >= 4 else []


def redact(text: str) -> str:
    """``text`` with every string value of ``--storage.options`` replaced by :data:`MASK`, and
    control characters made visible (one plain line, never an ANSI sequence)."""
    for secret in _secrets(STATE["options"]):
        text = text.replace(secret, MASK)
    return visible(text)


def warn(message: str) -> None:
    """``warning: <message>`` on stderr, redacted."""
    typer.echo(f"warning: {redact(message)}", err=True)


def usage_error(message: str) -> NoReturn:
    """``error: <message>`` on stderr (redacted), exit 2."""
    typer.echo(f"error: {redact(message)}", err=True)
    raise typer.Exit(EXIT_USER_ERROR)


def print_traceback_if_debug() -> None:
    """With ``--debug``: the traceback of the exception being handled, on stderr."""
    if STATE["debug"]:
        import traceback

        traceback.print_exc()


def _backend_errors() -> tuple[type[BaseException], ...]:
    """Error types of remote storage backends that are not ``OSError`` (botocore's
    ``NoCredentialsError``, ``EndpointConnectionError``, ``ClientError`` ...), from the modules
    already imported (none is imported for a local path)."""
    found: list[type[BaseException]] = []
    for module, names in (("botocore.exceptions", ("BotoCoreError", "ClientError")), ("aiohttp", ("ClientError",))):
        mod = sys.modules.get(module)
        found += [c for c in (getattr(mod, n, None) for n in names) if isinstance(c, type) and issubclass(c, BaseException)]
    return tuple(found)


def one_line(exc: BaseException, target: Any = None) -> str:
    """The error line for ``exc`` (without ``error: ``): ``<file>: <strerror>`` for an ``OSError``
    naming its file, else its message, whitespace runs collapsed; a remote backend's message that
    names no URL is prefixed with ``target`` and the exception type."""
    if isinstance(exc, OSError) and not isinstance(exc, CheckpointNotFoundError) and exc.filename is not None:
        text = f"{exc.filename}: {exc.strerror or type(exc).__name__}"
    else:
        text = str(exc) or type(exc).__name__
    text = " ".join(text.split())
    if target is not None and is_remote(target) and not URL_RE.match(text):
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
        print_traceback_if_debug()  # the traceback, and the same exit code as without --debug
        usage_error(one_line(e, target))
