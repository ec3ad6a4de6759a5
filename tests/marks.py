"""Valid completion marks for hand-built run directories in tests.

A part counts as complete only when its mark parses (issue 15): ``trainer/.metadata`` must decode
as DCP metadata and ``orchestrator.pt`` as a progress record. These write the smallest valid ones.
"""

from __future__ import annotations

import pickle
from pathlib import Path

from torch.distributed.checkpoint.metadata import Metadata

from prime_ckpt.orchestrator import OrchestratorProgress, save_progress

#: A DCP ``.metadata`` of an empty state dict (no data files to check).
EMPTY_METADATA = pickle.dumps(Metadata(state_dict_metadata={}))


def write_trainer_mark(trainer_dir: Path) -> None:
    """``<trainer_dir>/.metadata``: a valid, empty DCP metadata file."""
    trainer_dir = Path(trainer_dir)
    trainer_dir.mkdir(parents=True, exist_ok=True)
    (trainer_dir / ".metadata").write_bytes(EMPTY_METADATA)


def write_orchestrator_mark(path: Path, step: int = 0) -> None:
    """``orchestrator.pt`` at ``path``: a valid progress record of ``step``."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    save_progress(path, OrchestratorProgress(step=step))
