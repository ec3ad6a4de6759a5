"""The CLI's shared options and how a PATH argument becomes what the library takes.

``--storage.options`` is parsed by :func:`parse_storage_options` (validated as
:class:`prime_ckpt.config.StorageConfig` validates it); :func:`target` turns a command's PATH into
a local path or a UPath carrying those options. The retention options shared by ``plan`` and
``prune`` are added to a command by :func:`policy_options`.
"""

from __future__ import annotations

import functools
import inspect
import json
from dataclasses import dataclass
from typing import Annotated, Any

import typer

from prime_ckpt.cli.errors import STATE, print_traceback_if_debug, usage_error
from prime_ckpt.storage import is_remote, missing_reason, to_path

OPTIONS_FLAG = "--storage.options"

#: Shown after every PATH argument's help.
URL_HELP = " May be a URL (s3://bucket/run/..., any fsspec URL; see --storage.options)."


def parse_storage_options(text: str) -> dict[str, Any]:
    """``--storage.options`` validated as :class:`prime_ckpt.config.StorageConfig` validates it;
    a bad value is one line naming the flag (never echoing the value), exit 2."""
    try:
        value = json.loads(text)
    except ValueError as e:
        msg = f"not valid JSON ({e.msg}: line {e.lineno} column {e.colno})" if isinstance(e, json.JSONDecodeError) else "not valid JSON"
        usage_error(f"{OPTIONS_FLAG}: {msg}")
    if not isinstance(value, dict):
        usage_error(f"{OPTIONS_FLAG}: expected a JSON object of fsspec storage options, got a JSON {type(value).__name__}")
    from pydantic import ValidationError

    from prime_ckpt.config import StorageConfig, format_validation_error

    try:
        return StorageConfig(options=value).options
    except ValidationError as e:
        usage_error(format_validation_error(e).replace("--options", OPTIONS_FLAG))


def target(arg: str) -> Any:
    """A command's PATH as the library takes it. A local path stays the string it was; a URL
    becomes a UPath carrying ``--storage.options``, checked to exist (``no such bucket`` / ``no
    such file or directory``). Call inside :func:`~prime_ckpt.cli.errors.user_errors`."""
    if not is_remote(arg):
        return arg
    protocol = arg.split("://", 1)[0]
    try:
        import fsspec

        fsspec.get_filesystem_class(protocol)
    except ValueError:
        usage_error(f"{arg}: unknown URL protocol {protocol!r} (fsspec knows no file system of that name)")
    except ImportError as e:
        usage_error(f"{arg}: the {protocol!r} file system needs a package that is not installed ({' '.join(str(e).split())})")
    try:
        path = to_path(arg, STATE["options"])
        exists = path.exists()
    except (TypeError, ValueError, AttributeError, KeyError) as e:  # options the file system does not take
        print_traceback_if_debug()
        usage_error(f"{arg}: {OPTIONS_FLAG} not accepted by the file system ({type(e).__name__}: {' '.join(str(e).split())})")
    if not exists:
        raise FileNotFoundError(f"{path}: {missing_reason(path)}")
    return path


def refuse_remote(command: str, *paths: str) -> None:
    """Exit 2 with one line if any of ``paths`` is a URL (``command`` reads local paths only)."""
    for p in paths:
        if is_remote(p):
            usage_error(f"{p}: remote paths are not supported by {command} yet (copy the step to a local directory first)")


# -- options shared by several commands ----------------------------------------------------------
RunDir = Annotated[str, typer.Argument(metavar="OUTPUT_DIR", help="Run output dir (holds checkpoints/ and weights/)." + URL_HELP)]
Keep = Annotated[int | None, typer.Option("--keep", min=1, help="Keep the K newest complete checkpoint steps and the weights they pin (default: keep everything; nothing is deleted, as in the trainer without --ckpt.keep).")]
KeepInterval = Annotated[int | None, typer.Option("--keep-interval", min=1, help="Also keep checkpoint steps that are multiples of N.")]
CurrentStep = Annotated[
    int | None,
    typer.Option("--current-step", min=0, help="The trainer's current step; higher steps are kept (default: the highest step on disk: a run's entry sets an earlier run's steps aside, so what is on disk is the live run's, see run.json)."),
]
JsonFlag = Annotated[bool, typer.Option("--json", help="Print JSON instead of a table.")]
_AsyncLevel = Annotated[
    int | None,
    typer.Option(
        "--async-level", min=0,
        help="k: checkpoint step x pins weights [x-k, x] (the seed's rule). Default: the async level the run "
        "recorded in save_info.json; if the run recorded none and has weights, it must be given.",
    ),
]
_WeightsInterval = Annotated[int | None, typer.Option("--weights-interval", min=1, help="Also keep weights steps that are multiples of N.")]
_ConsumerStep = Annotated[int | None, typer.Option("--consumer-step", min=0, help="Last weights step the inference side acknowledged; steps >= it are kept.")]
_Rule = Annotated[
    list[str] | None,
    typer.Option("--rule", metavar="MODULE:NAME", help="Also keep what your retention rule says (repeatable): a callable "
                 "taking a prime_ckpt.retention.StepView and returning a reason (str) or None; imported from MODULE. "
                 "Rules only keep; their reasons show as 'rule NAME: ...'."),
]


@dataclass(frozen=True)
class PolicyArgs:
    """The retention options of ``plan`` and ``prune``, as given (None: not given)."""

    keep: int | None = None
    keep_interval: int | None = None
    async_level: int | None = None
    current_step: int | None = None
    weights_interval: int | None = None
    consumer_step: int | None = None
    rule: list[str] | None = None


_POLICY_OPTIONS = {
    "keep": Keep, "keep_interval": KeepInterval, "async_level": _AsyncLevel, "current_step": CurrentStep,
    "weights_interval": _WeightsInterval, "consumer_step": _ConsumerStep, "rule": _Rule,
}  # fmt: skip


def policy_options(fn: Any) -> Any:
    """Give the command ``fn(output_dir, policy: PolicyArgs, **rest)`` the options ``--keep``,
    ``--keep-interval``, ``--async-level``, ``--current-step``, ``--weights-interval``,
    ``--consumer-step`` and ``--rule`` after its first argument; it receives them as ``policy``."""
    params = list(inspect.signature(fn, eval_str=True).parameters.values())
    first, rest = params[0], [p for p in params[1:] if p.name != "policy"]
    added = [inspect.Parameter(n, inspect.Parameter.POSITIONAL_OR_KEYWORD, default=None, annotation=a) for n, a in _POLICY_OPTIONS.items()]

    @functools.wraps(fn)
    def command(*args: Any, **kwargs: Any) -> Any:
        bound = command.__signature__.bind(*args, **kwargs)
        values = dict(bound.arguments)
        policy = PolicyArgs(**{n: values.pop(n, None) for n in _POLICY_OPTIONS})
        return fn(**values, policy=policy)

    command.__signature__ = inspect.Signature([first, *added, *rest])
    command.__annotations__ = {p.name: p.annotation for p in command.__signature__.parameters.values()}
    return command
