"""The orchestrator's progress record: ``checkpoints/step_<N>/orchestrator.pt``.

The record holds plain Python values only (ints, floats, str, bool, None, lists, dicts), so it
is written with ``torch.save`` and read back with ``torch.load(..., weights_only=True)``: a file
a user points the tool at is never unpickled with full pickle (DESIGN invariant 7).
"""

from __future__ import annotations

import io
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import torch

from prime_ckpt.layout import RunLayout
from prime_ckpt.storage import atomic_write_bytes

_PLAIN = (int, float, str, bool, type(None))


class ProgressRecordError(ValueError):
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
        extra = dict(known.pop("extra", {}) or {})
        extra.update({k: v for k, v in d.items() if k not in names})
        return cls(**known, extra=extra)


def save_progress(path: Path | str, progress: OrchestratorProgress) -> None:
    """Write the record atomically: tmp file -> fsync -> rename -> fsync(dir).

    Raises ``TypeError`` if ``progress.extra`` holds a non-plain value (nothing is written).
    """
    buf = io.BytesIO()
    torch.save(progress.to_dict(), buf)
    atomic_write_bytes(path, buf.getvalue())


def load_progress(path: Path | str) -> OrchestratorProgress:
    """Read a record with ``weights_only=True``.

    Raises:
        FileNotFoundError: ``path`` does not exist.
        ProgressRecordError: the file is not a torch file or not a progress record
            (message names the path).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: orchestrator progress record not found")
    try:
        data = torch.load(path, map_location="cpu", weights_only=True)
        return OrchestratorProgress.from_dict(data)
    except ProgressRecordError as e:
        raise ProgressRecordError(f"{path}: {e}") from None
    except Exception as e:  # torch raises many types for a corrupt/foreign file
        raise ProgressRecordError(f"{path}: not a readable orchestrator progress record ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})") from None


def save_orchestrator_checkpoint(output_dir: Path | str, progress: OrchestratorProgress) -> Path:
    """Write ``<output_dir>/checkpoints/step_<progress.step>/orchestrator.pt``; returns its path."""
    path = RunLayout(Path(output_dir)).orchestrator_path(progress.step)
    save_progress(path, progress)
    return path


def load_orchestrator_checkpoint(output_dir: Path | str, step: int) -> OrchestratorProgress:
    """Read ``<output_dir>/checkpoints/step_<step>/orchestrator.pt`` (see :func:`load_progress`)."""
    return load_progress(RunLayout(Path(output_dir)).orchestrator_path(step))
