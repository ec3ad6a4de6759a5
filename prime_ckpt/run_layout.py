"""The paths of one run's output directory (:class:`RunLayout`): pure path building, no I/O.

Names come from :mod:`prime_ckpt.names`; a path may be local or an fsspec URL
(:func:`prime_ckpt.storage.to_path`).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from prime_ckpt.names import CHECKPOINTS_DIR, ORCHESTRATOR_FILE, TRAINER_PART, WEIGHTS_DIR, step_dirname
from prime_ckpt.storage import AnyPath, to_path


@dataclass(frozen=True)
class RunLayout:
    """Paths of one run's output directory (pure: builds paths, touches nothing)."""

    output_dir: AnyPath

    def __post_init__(self) -> None:
        object.__setattr__(self, "output_dir", to_path(self.output_dir))

    @property
    def checkpoints_dir(self) -> Path:
        return self.output_dir / CHECKPOINTS_DIR

    @property
    def weights_dir(self) -> Path:
        return self.output_dir / WEIGHTS_DIR

    def step_dir(self, step: int) -> Path:
        """``checkpoints/step_<step>``."""
        return self.checkpoints_dir / step_dirname(step)

    def trainer_dir(self, step: int) -> Path:
        """``checkpoints/step_<step>/trainer`` (a DCP checkpoint directory)."""
        return self.step_dir(step) / TRAINER_PART

    def orchestrator_path(self, step: int) -> Path:
        """``checkpoints/step_<step>/orchestrator.pt``."""
        return self.step_dir(step) / ORCHESTRATOR_FILE

    def weights_step_dir(self, step: int) -> Path:
        """``weights/step_<step>``."""
        return self.weights_dir / step_dirname(step)
