"""prime-ckpt: checkpoints and weights for async-RL PyTorch training (DCP trainer state,
orchestrator progress, per-step weights publishing, retention, inspection).

The public API is what ``__all__`` names; import it from here
(``from prime_ckpt import Checkpointer, CheckpointConfig, TrainerState``). Names resolve on first
use (PEP 562), so ``import prime_ckpt`` stays cheap and torch-free: the CLI's read-only commands
never import torch.
"""

from __future__ import annotations

import importlib
from typing import Any

#: public name -> the module that defines it
_EXPORTS: dict[str, str] = {
    # the trainer side
    "Checkpointer": "prime_ckpt.checkpointer",
    "TrainerState": "prime_ckpt.state",
    "Progress": "prime_ckpt.state",
    "SaveRecord": "prime_ckpt.save_record",
    "CheckpointSaveError": "prime_ckpt.saving",
    "CheckpointConfig": "prime_ckpt.config",
    "WeightsConfig": "prime_ckpt.config",
    "WeightsPublisher": "prime_ckpt.publisher",
    "enter_run": "prime_ckpt.run",
    # the orchestrator side
    "OrchestratorProgress": "prime_ckpt.orchestrator",
    "save_orchestrator_checkpoint": "prime_ckpt.orchestrator",
    "load_orchestrator_checkpoint": "prime_ckpt.orchestrator",
    # layout, resumability, retention
    "RunLayout": "prime_ckpt.run_layout",
    "RUN_PARTS": "prime_ckpt.names",
    "resolve_resume_step": "prime_ckpt.layout",
    "latest_complete_step": "prime_ckpt.layout",
    "RetentionPolicy": "prime_ckpt.retention",
    "RetentionRule": "prime_ckpt.retention_rules",
    "StepView": "prime_ckpt.retention_rules",
    "plan_output_dir": "prime_ckpt.retention",
    "apply_plan": "prime_ckpt.prune",
    # inspection
    "describe": "prime_ckpt.inspection",
    "list_run": "prime_ckpt.run_table",
    "read_dcp_metadata": "prime_ckpt.dcp_metadata",
    # errors
    "PrimeCkptError": "prime_ckpt.errors",
    "RunLeaseError": "prime_ckpt.errors",
    "StepExistsError": "prime_ckpt.errors",
    "NotResumableError": "prime_ckpt.errors",
    "CheckpointLoadError": "prime_ckpt.errors",
    "IncompleteCheckpointError": "prime_ckpt.errors",
    "ProgressMismatchError": "prime_ckpt.errors",
    "PostCommitError": "prime_ckpt.errors",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'prime_ckpt' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # resolved once
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
