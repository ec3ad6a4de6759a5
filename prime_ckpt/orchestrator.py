"""The orchestrator's progress record: ``checkpoints/step_<N>/orchestrator.pt``.

The record holds plain Python values only (ints, floats, str, bool, None, lists, dicts), so it
is written with ``torch.save``, and a file a user points the tool at is never unpickled with full
pickle (DESIGN invariant 7). :func:`load_progress` reads it without torch: a ``torch.save`` file
is a zip whose ``<name>/data.pkl`` is a pickle; for plain values that pickle references no
global except ``collections.OrderedDict`` and no persistent id, and the restricted unpickler
admits nothing else. So the read-only CLI commands need not import torch, whose import alone
takes seconds. A record holding a tensor (a ``torch.*`` global or a persistent id) is refused
with a :class:`ProgressRecordError` that says so; a file that is not such a zip (legacy
``torch.save`` format) or references another global is handed to
``torch.load(..., weights_only=True)``, which accepts or refuses it as before.
"""

from __future__ import annotations

import collections
import io
import pickle
import zipfile
from dataclasses import asdict, dataclass, field, fields
from typing import Any

from prime_ckpt.errors import PrimeCkptError
from prime_ckpt.names import CONSUMER_ACK_FILE
from prime_ckpt.run_layout import RunLayout
from prime_ckpt.storage import AnyPath, atomic_write_bytes, is_remote, to_path

_PLAIN = (int, float, str, bool, type(None))


class ProgressRecordError(PrimeCkptError, ValueError):
    """``orchestrator.pt`` is unreadable or does not hold a progress record."""


def _check_plain(value: Any, where: str) -> None:
    if isinstance(value, _PLAIN):
        return
    if isinstance(value, (list, tuple)):
        for i, v in enumerate(value):
            _check_plain(v, f"{where}[{i}]")
        return
    if isinstance(value, dict):
        for k, v in value.items():
            if not isinstance(k, str):
                raise TypeError(f"{where}: dict keys must be str, got {type(k).__name__}")
            _check_plain(v, f"{where}.{k}")
        return
    raise TypeError(f"{where}: only plain values (int, float, str, bool, None, list, dict) are allowed, got {type(value).__name__}")


@dataclass
class OrchestratorProgress:
    """Progress of the orchestrator at a checkpoint step.

    Attributes:
        step: the last step whose rollouts the orchestrator produced (steps).
        total_tokens: tokens generated so far (tokens).
        total_samples: rollouts generated so far (samples).
        total_problems: prompts/problems drawn so far (problems).
        extra: any further plain values (JSON-like) a caller wants to keep.
    """

    step: int
    total_tokens: int = 0
    total_samples: int = 0
    total_problems: int = 0
    extra: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        _check_plain(d, "progress")
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> OrchestratorProgress:
        names = {f.name for f in fields(cls)}
        if not isinstance(d, dict) or "step" not in d:
            raise ProgressRecordError("not a progress record (no 'step' field)")
        known = {k: v for k, v in d.items() if k in names}
        for name in ("step", "total_tokens", "total_samples", "total_problems"):
            value = known.get(name, 0)
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise ProgressRecordError(f"field {name!r} is {value!r} ({type(value).__name__}), not an int >= 0")
        if not isinstance(known.get("extra", {}) or {}, dict):
            raise ProgressRecordError(f"field 'extra' is a {type(known['extra']).__name__}, not a dict")
        extra = dict(known.pop("extra", {}) or {})
        extra.update({k: v for k, v in d.items() if k not in names})
        return cls(**known, extra=extra)


def save_progress(path: AnyPath | str, progress: OrchestratorProgress) -> None:
    """Write the record atomically: tmp file -> fsync -> rename -> fsync(dir) (on object
    storage: one PUT). ``path`` may be an fsspec URL.

    Raises ``TypeError`` if ``progress.extra`` holds a non-plain value (nothing is written).
    """
    import torch

    buf = io.BytesIO()
    torch.save(progress.to_dict(), buf)
    atomic_write_bytes(path, buf.getvalue())


class _NeedsTorch(Exception):
    """The torch-free reader cannot read this file; ``torch.load(weights_only=True)`` decides."""


class _PlainUnpickler(pickle.Unpickler):
    """Unpickles plain values only: no global but ``OrderedDict``, no persistent id (tensor)."""

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) == ("collections", "OrderedDict"):
            return collections.OrderedDict
        if module == "torch" or module.startswith("torch."):  # a tensor is rebuilt by torch._utils._rebuild_*
            raise ProgressRecordError(
                f"holds a tensor or another torch object (references {module}.{name}), not a progress "
                "record (plain values only); nothing was loaded"
            )
        raise _NeedsTorch(f"references {module}.{name}")  # refused unresolved; weights_only decides

    def persistent_load(self, pid: Any) -> Any:
        raise ProgressRecordError("holds a tensor, not a progress record (plain values only); nothing was loaded")


def _read_plain(path: AnyPath) -> Any:
    """The value of a ``torch.save`` zip of plain values, read without torch.

    Raises ``_NeedsTorch`` when the file is not such a zip, and :class:`ProgressRecordError`
    when it holds a tensor."""
    with path.open("rb") as f:
        try:
            with zipfile.ZipFile(f) as zf:
                pickles = [n for n in zf.namelist() if n.count("/") == 1 and n.endswith("/data.pkl")]
                if len(pickles) != 1:
                    raise _NeedsTorch(f"{len(pickles)} data.pkl entries")
                data = zf.read(pickles[0])
        except zipfile.BadZipFile as e:
            f.seek(0)
            head = f.read(2)
            if not head:
                raise ProgressRecordError("empty file, not a torch file") from None
            if head[:1] != b"\x80":  # neither a torch.save zip nor torch's legacy (pickle) format
                raise ProgressRecordError("not a torch file (neither a torch.save zip nor a legacy torch pickle)") from None
            raise _NeedsTorch(str(e)) from None
    try:
        return _PlainUnpickler(io.BytesIO(data)).load()
    except (ProgressRecordError, _NeedsTorch):
        raise
    except Exception as e:  # corrupt pickle: many types
        raise _NeedsTorch(f"{type(e).__name__}: {e}") from None


def load_progress(path: AnyPath | str) -> OrchestratorProgress:
    """Read a record (``path`` may be an fsspec URL): torch-free when it holds plain values (see
    the module docstring), else with ``torch.load(..., weights_only=True)``.

    Raises:
        FileNotFoundError: ``path`` does not exist.
        ProgressRecordError: the file is not a torch file, holds a tensor, or is not a progress
            record (message names the path).
    """
    path = to_path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: orchestrator progress record not found")
    try:
        try:
            data = _read_plain(path)
        except _NeedsTorch:
            import torch

            data = torch.load(io.BytesIO(path.read_bytes()) if is_remote(path) else path, map_location="cpu", weights_only=True)
        return OrchestratorProgress.from_dict(data)
    except ProgressRecordError as e:
        raise ProgressRecordError(f"{path}: {e}") from None
    except Exception as e:  # torch raises many types for a corrupt/foreign file
        raise ProgressRecordError(f"{path}: not a readable orchestrator progress record ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})") from None


def save_orchestrator_checkpoint(output_dir: AnyPath | str, progress: OrchestratorProgress) -> AnyPath:
    """Write ``<output_dir>/checkpoints/step_<progress.step>/orchestrator.pt``; returns its path.
    ``output_dir`` may be an fsspec URL or a UPath carrying storage options."""
    path = RunLayout(output_dir).orchestrator_path(progress.step)
    save_progress(path, progress)
    return path


def load_orchestrator_checkpoint(output_dir: AnyPath | str, step: int) -> OrchestratorProgress:
    """Read ``<output_dir>/checkpoints/step_<step>/orchestrator.pt`` (see :func:`load_progress`)."""
    return load_progress(RunLayout(output_dir).orchestrator_path(step))


# -- the consumer acknowledgement -------------------------------------------------------------
def write_consumer_ack(output_dir: AnyPath | str, step: int, *, consumer: str = "inference") -> AnyPath:
    """Record that the inference side has loaded ``weights/step_<step>`` (the *consumer
    acknowledgement*): ``<output_dir>/consumer_ack.json`` = ``{"step", "consumer", "time"}``,
    written atomically (one PUT on object storage).

    Write it only after the server reported that it serves that step. The trainer's retention
    (:class:`prime_ckpt.checkpointer.Checkpointer` with ``keep``) reads it before each plan and never
    deletes weights at or after the acknowledged step (``RetentionPolicy.consumer_step``): a slow
    consumer keeps the weights it has not loaded yet. A resume from an older step may move the
    acknowledgement back (the server is told to load older weights): the last write wins.

    Raises:
        ValueError: ``step`` is not an int >= 0.
    """
    import json
    import time

    if isinstance(step, bool) or not isinstance(step, int) or step < 0:
        raise ValueError(f"consumer acknowledgement: step must be an int >= 0, got {step!r}")
    path = to_path(output_dir) / CONSUMER_ACK_FILE
    atomic_write_bytes(path, json.dumps({"step": int(step), "consumer": consumer, "time": time.time()}).encode())
    return path


def read_consumer_ack(output_dir: AnyPath | str) -> int | None:
    """The weights step the consumer last acknowledged (:func:`write_consumer_ack`), or None if
    there is none. An unreadable record counts as none for reading but is logged; callers that
    delete (retention) must treat None as "no acknowledgement", which pins nothing extra."""
    import json
    import logging

    path = to_path(output_dir) / CONSUMER_ACK_FILE
    try:
        data = json.loads(path.read_bytes())
    except FileNotFoundError:
        return None
    except (OSError, ValueError, RecursionError) as e:
        logging.getLogger(__name__).warning("%s: unreadable consumer acknowledgement (%s); ignored", path, type(e).__name__)
        return None
    step = data.get("step") if isinstance(data, dict) else None
    return step if isinstance(step, int) and not isinstance(step, bool) and step >= 0 else None
