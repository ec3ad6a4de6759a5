"""Configuration: pydantic models for checkpointing and monitoring, and the command-line parser.

Flags follow the seed's spelling (``--ckpt.interval``, ``--ckpt.save-async``,
``--ckpt.resume-step``, ``--monitor.wandb.id``). Programs also take ``@ path/to/file.toml``
(a TOML config file, overridden by later flags). As in the seed, a run writes no checkpoints
unless checkpointing is asked for: a bare ``--ckpt``, any ``--ckpt.*`` flag, or a ``[ckpt]``
table in the TOML.

``--storage.options`` (:class:`StorageConfig`) takes a JSON object of fsspec storage options for
remote output directories (``s3://...``). It may hold secrets: it is left out of ``repr``,
``model_dump()`` shows it masked, and a validation error never echoes it.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any, Literal, TypeVar

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_serializer
from pydantic_settings import BaseSettings, SettingsConfigDict, SettingsError

from prime_ckpt.errors import PrimeCkptError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib


class ConfigError(PrimeCkptError, ValueError):
    """A bad flag or config file; the message is one line naming the flag or file."""


class CheckpointConfig(BaseModel):
    """Checkpointing (``--ckpt.*``). Present only when checkpointing is asked for."""

    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True)

    interval: int = Field(50, ge=1)
    """Save a checkpoint every N steps (steps)."""

    save_async: bool = False
    """Save with `dcp.async_save` on a dedicated gloo process group: the training loop only waits for staging."""

    keep: int | None = Field(None, ge=1)
    """Keep the K most recent complete checkpoint steps; None keeps all."""

    keep_interval: int | None = Field(None, ge=1)
    """Also keep checkpoint steps that are multiples of N; None disables."""

    resume_step: int | None = Field(None, ge=-1)
    """Resume from this checkpoint step; -1 picks the newest complete step; None starts fresh."""

    timeout: float = Field(300.0, gt=0)
    """Seconds a checkpoint collective waits for the other ranks; past it the save fails on every rank."""

    write_threads: int = Field(1, ge=1, le=64)
    """Writer threads per rank (1-64), each writing its own file (`__<rank>_<n>.distcp`); on a 2-CPU machine `dcp.save` of 1 GiB on one rank took 2.69 s with 1 thread, 1.21 s with 2 (benchmarks/)."""


class WeightsConfig(BaseModel):
    """Per-step weights publishing (``--weights.*``): ``weights/step_<N>/`` for the inference side."""

    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True)

    save_async: bool = True
    """Publish in the background on a dedicated gloo process group (the step pays only for staging the local shards); false writes before the step goes on (same files)."""

    dtype: Literal["float32", "bfloat16", "float16"] | None = None
    """Dtype of the published floating-point weights (e.g. bfloat16 from fp32 master weights); None keeps the parameters' dtype."""

    timeout: float = Field(300.0, gt=0)
    """Seconds a publish collective waits for the other ranks; past it the publish fails on every rank."""


class StorageConfig(BaseModel):
    """Remote storage (``--storage.*``): how fsspec reaches an ``s3://`` / ``gs://`` output dir."""

    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True)

    options: dict[str, Any] = Field(default_factory=dict, repr=False)
    """fsspec storage options as a JSON object, e.g. '{"client_kwargs": {"endpoint_url": "http://127.0.0.1:9000"}}'; empty: credentials and endpoint come from the environment (AWS_* variables, ~/.aws). Never printed or logged."""

    @field_serializer("options")
    def _mask_options(self, options: dict[str, Any]) -> Any:
        return MASK if options else {}


#: What a secret value shows as when a config is dumped.
MASK = "**********"

#: Field names whose input a validation error never echoes (they may hold secrets).
_SECRET_FIELDS = frozenset({"options"})


class WandbConfig(BaseModel):
    """Weights & Biases (``--monitor.wandb.*``)."""

    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True)

    project: str | None = None
    """W&B project; None disables W&B logging."""

    id: str | None = None
    """W&B run id; pass the id of an earlier run to resume that same run (resume='allow')."""

    name: str | None = None
    """W&B run name."""

    mode: str | None = Field(None, pattern="^(online|offline|disabled)$")
    """W&B mode (online / offline / disabled); None follows WANDB_MODE."""


class MonitorConfig(BaseModel):
    """Monitoring (``--monitor.*``)."""

    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True)

    wandb: WandbConfig = WandbConfig()
    """W&B settings."""


class CliSettings(BaseSettings):
    """Base for program configs parsed from the command line (kebab-case flags, TOML files)."""

    model_config = SettingsConfigDict(
        cli_kebab_case=True,
        cli_implicit_flags=True,
        cli_exit_on_error=False,
        nested_model_default_partial_update=True,
        use_attribute_docstrings=True,
        extra="forbid",
    )

    @classmethod
    def settings_customise_sources(cls, settings_cls, init_settings, env_settings, dotenv_settings, file_secret_settings):
        """Flags and TOML files only: environment variables and dotenv files are not read."""
        return (init_settings,)


S = TypeVar("S", bound=CliSettings)


def _snake_keys(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(k).replace("-", "_"): _snake_keys(v) for k, v in value.items()}
    return value


def _deep_merge(base: dict[str, Any], top: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in top.items():
        out[k] = _deep_merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def load_toml(path: Path | str) -> dict[str, Any]:
    """Read a TOML config file; keys may be kebab- or snake-case.

    Raises ``ConfigError`` naming the file if it is missing or not valid TOML.
    """
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: config file not found")
    try:
        return _snake_keys(tomllib.loads(path.read_text()))
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{path}: invalid TOML ({e})") from None


def split_config_files(argv: list[str]) -> tuple[list[Path], list[str]]:
    """Split ``@ file.toml`` / ``@file.toml`` tokens from the other arguments (order kept)."""
    files: list[Path] = []
    rest: list[str] = []
    i = 0
    while i < len(argv):
        tok = argv[i]
        if tok == "@":
            if i + 1 >= len(argv):
                raise ConfigError("'@' must be followed by a TOML config file path")
            files.append(Path(argv[i + 1]))
            i += 2
            continue
        if tok.startswith("@") and len(tok) > 1:
            files.append(Path(tok[1:]))
        else:
            rest.append(tok)
        i += 1
    return files, rest


def _flag_name(loc: tuple[Any, ...]) -> str:
    return "--" + ".".join(str(p).replace("_", "-") for p in loc if not isinstance(p, int))


def format_validation_error(err: ValidationError) -> str:
    """One line per problem: ``--ckpt.interval: Input should be greater than or equal to 1 (got '0')``."""
    lines = []
    for e in err.errors():
        got = e.get("input")
        secret = any(str(p) in _SECRET_FIELDS for p in e["loc"])
        suffix = f" (got {got!r})" if not isinstance(got, dict) and e.get("type") != "missing" and not secret else ""
        lines.append(f"{_flag_name(tuple(e['loc']))}: {e['msg']}{suffix}")
    return "; ".join(lines)


def parse_cli(settings_cls: type[S], argv: list[str] | None = None, *, prog: str | None = None) -> S:
    """Parse ``argv`` into ``settings_cls``: TOML files first (in order), then flags.

    Handles ``@ file.toml`` and a bare ``--ckpt`` (turns checkpointing on with defaults).
    ``--help`` prints the generated help (every field's docstring) and exits 0.

    Raises:
        ConfigError: unknown flag, invalid value (message names the flag), bad TOML file.
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    files, rest = split_config_files(argv)
    values: dict[str, Any] = {}
    for f in files:
        values = _deep_merge(values, load_toml(f))
    # A bare `--ckpt` (no value) asks for checkpointing with the defaults.
    cleaned = []
    for i, tok in enumerate(rest):
        nxt = rest[i + 1] if i + 1 < len(rest) else None
        if tok == "--ckpt" and (nxt is None or nxt.startswith("--")):
            values.setdefault("ckpt", {})
            continue
        cleaned.append(tok)
    try:
        return settings_cls(_cli_parse_args=cleaned, _cli_prog_name=prog, **values)
    except ValidationError as e:
        raise ConfigError(format_validation_error(e)) from None
    except SettingsError as e:
        raise ConfigError(str(e).replace("error parsing CLI: ", "")) from None


def cli_entry(settings_cls: type[S], argv: list[str] | None = None, *, prog: str | None = None) -> S:
    """:func:`parse_cli` for a program's ``main``: on ``ConfigError`` prints ``prog: error: ...``
    to stderr and exits 2 before any work is done."""
    try:
        return parse_cli(settings_cls, argv, prog=prog)
    except ConfigError as e:
        print(f"{prog or Path(sys.argv[0]).name}: error: {e}", file=sys.stderr)
        raise SystemExit(2) from None
