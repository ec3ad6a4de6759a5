"""What every ``inspect`` result shares: the JSON tag, the error, tensor rows, and the small
read-only helpers (names, globs, one remote listing, JSON files, ``save_info.json``).

Nothing here imports torch; nothing here writes.
"""

from __future__ import annotations

import fnmatch
import json
import posixpath
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

from prime_ckpt.errors import PrimeCkptError
from prime_ckpt.storage import AnyPath, refresh, remote_errors

if TYPE_CHECKING:
    from prime_ckpt.inspection import Description

#: Version tag of the JSON that :func:`prime_ckpt.inspection.describe` results serialise to
#: (``to_dict()``).
SCHEMA = "prime-ckpt.inspect/1"


class InspectError(PrimeCkptError, ValueError):
    """The path is missing or not something :func:`prime_ckpt.inspection.describe` knows (one line, names the path)."""


@dataclass
class TensorEntry:
    """One tensor: fully-qualified name, global shape, dtype (``"float32"``), bytes of the global
    tensor (numel * element size), number of stored chunks (``sharded`` iff > 1)."""

    name: str
    shape: list[int]
    dtype: str
    bytes: int
    chunks: int = 1
    sharded: bool = False


@dataclass
class StepInfo:
    """What every description of one step or directory starts with: its ``kind`` tag, path and
    step (N of ``step_<N>``, None if the name has none)."""

    kind: str
    path: str
    step: int | None


def to_dict(result: Description) -> dict[str, Any]:
    """The JSON-ready form of a :func:`prime_ckpt.inspection.describe` result, tagged with ``"schema": SCHEMA``."""
    return {"schema": SCHEMA, **asdict(result)}


# -- helpers --------------------------------------------------------------------------------
def dtype_name(dtype: Any) -> str:
    """``torch.float32`` (a ``torch.dtype`` or its stand-in ``dcp_metadata.DType``) -> ``"float32"``."""
    return str(dtype).removeprefix("torch.")


def numel(shape: list[int]) -> int:
    """Number of elements of a tensor of ``shape``."""
    n = 1
    for s in shape:
        n *= int(s)
    return n


def top_level_key(fqn: str) -> str:
    """The first two dotted components (``app.model.0.weight`` -> ``app.model``)."""
    return ".".join(fqn.split(".")[:2])


def matches(name: str, pattern: str | None) -> bool:
    """Whether ``name`` matches the glob ``pattern`` (``fnmatch``, case-sensitive); None matches all."""
    return pattern is None or fnmatch.fnmatchcase(name, pattern)


def remote_entries(directory: AnyPath) -> dict[str, int | None]:
    """The direct children of a remote directory from one uncached listing: name -> size of a
    file, ``None`` for a subdirectory (``{}`` if nothing is there)."""
    refresh(directory)
    base = directory.path.rstrip("/")
    with remote_errors(directory):
        try:
            found = directory.fs.ls(base, detail=True)
        except FileNotFoundError:
            return {}
    out: dict[str, int | None] = {}
    for info in found:
        name = str(info.get("name", "")).rstrip("/")
        if name == base or not name.startswith(base + "/"):
            continue
        out[posixpath.basename(name)] = None if info.get("type") == "directory" else int(info.get("size") or 0)
    return out


def read_json(path: AnyPath, problems: list[str]) -> dict[str, Any] | None:
    """The JSON object in ``path``; None when absent, or (with a problem recorded) unreadable or
    not an object."""
    if not path.is_file():
        return None
    try:
        value = json.loads(path.read_text())
    except (OSError, ValueError, RecursionError) as e:
        problems.append(f"{path}: not readable JSON ({type(e).__name__})")
        return None
    if not isinstance(value, dict):
        problems.append(f"{path}: not a JSON object")
        return None
    return value


def _is_int(v: Any, low: int) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= low


def _is_seconds(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and v >= 0 and v == v and v != float("inf")


#: The fields of the trainer's ``save_info.json`` (:class:`prime_ckpt.save_record.SaveRecord`) that
#: `inspect` and `list` show, with the rule each value must satisfy and its description.
_SAVE_INFO_RULES: dict[str, tuple[Any, str]] = {
    "step": (lambda v: _is_int(v, 0), "a step (int >= 0)"),
    "mode": (lambda v: v in ("sync", "async"), '"sync" or "async"'),
    "world_size": (lambda v: _is_int(v, 1), "a world size (int >= 1)"),
    "async_level": (lambda v: _is_int(v, 0), "an async level (int >= 0)"),
    "bytes": (lambda v: _is_int(v, 0), "bytes (int >= 0)"),
    "total_bytes": (lambda v: _is_int(v, 0), "bytes (int >= 0)"),
    **{k: (lambda v: v is None or _is_seconds(v), "seconds (a number >= 0)")
       for k in ("wait_previous_s", "staging_s", "blocking_s", "upload_s", "total_s")},
    "error": (lambda v: v is None or isinstance(v, str), "text or null"),
    "run_id": (lambda v: v is None or isinstance(v, str), "text or null"),
}  # fmt: skip


def save_info_problems(info: dict[str, Any], where: AnyPath | str) -> list[str]:
    """One line per field of a parsed ``save_info.json`` whose value has the wrong type or range
    (pure; unknown fields are not judged). The values are still shown, with these lines."""
    problems = []
    for name, (ok, expected) in _SAVE_INFO_RULES.items():
        if name in info and not ok(info[name]):
            problems.append(f"{where}: field {name!r} is {info[name]!r} ({type(info[name]).__name__}), expected {expected}")
    return problems


def read_save_info(path: AnyPath, problems: list[str]) -> dict[str, Any] | None:
    """A step's ``save_info.json`` (None when absent or unreadable, with a problem recorded), its
    field values checked by :func:`save_info_problems`."""
    info = read_json(path, problems)
    if info is not None:
        problems += save_info_problems(info, path)
    return info
