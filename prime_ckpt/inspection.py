"""What is on disk at a path, read-only: the library behind ``prime-ckpt inspect``.

:func:`describe` identifies what a path is and dispatches to the module that describes it,
returning a structured, JSON-ready result (:func:`to_dict`):

* a run output dir (has ``checkpoints/`` or ``weights/``), a ``checkpoints/`` dir or a
  ``weights/`` dir -> :class:`RunListing` (steps and completeness; no tensor tables), the
  ``inspect`` view of the run model of :mod:`prime_ckpt.inspect_listing` (``list``'s view of the
  same model is :func:`list_run`, :mod:`prime_ckpt.run_table`); a torchtitan checkpoint folder
  likewise;
* ``checkpoints/step_<N>`` -> :class:`CheckpointStepInfo` (parts, orchestrator progress record,
  ``save_info.json``, and the trainer's tensor table) and ``checkpoints/step_<N>/trainer`` (any
  DCP dir) -> :class:`TrainerDirInfo` (:mod:`prime_ckpt.inspect_dcp`);
* ``weights/step_<N>`` -> :class:`WeightsStepInfo` (files, ``config.json``, marker, tensors from
  the safetensors header), a bare ``.safetensors`` file or a directory of them
  (:mod:`prime_ckpt.inspect_safetensors`).

Tensor tables come from metadata only: DCP's ``.metadata`` (read through
:func:`prime_ckpt.dcp_metadata.read_dcp_metadata`, never plain pickle) and the safetensors
header. No tensor data is read and nothing is written. Completeness is
:mod:`prime_ckpt.layout`'s, so nothing incomplete is reported as complete.

Every path may be a local path, an fsspec URL (``s3://bucket/run/checkpoints/step_10``) or a
UPath carrying storage options (:func:`prime_ckpt.storage.to_path`): every read goes through the
path API, the inventory scans of :mod:`prime_ckpt.layout` or one uncached directory listing
(remote), never through local-only calls.

This module does not import torch (nor does anything it calls, unless torch is already
imported): ``.metadata`` is read into torch-free stand-ins, the safetensors header is parsed
from its JSON (:func:`prime_ckpt.safetensors_io.safetensors_header`) and ``orchestrator.pt`` with
:func:`prime_ckpt.orchestrator.load_progress`'s torch-free reader, so ``prime-ckpt inspect`` /
``list`` start in a fraction of a second. The same code works on DCP's own metadata classes, for
callers that have torch imported.

The names of the modules above stay importable from here.
"""

from __future__ import annotations

from prime_ckpt.foreign import titan_folder
from prime_ckpt.inspect_common import (
    SCHEMA,
    InspectError,
    StepInfo,
    TensorEntry,
    dtype_name,
    read_save_info,
    save_info_problems,
    to_dict,
    top_level_key,
)
from prime_ckpt.inspect_dcp import (
    BytesEntry,
    CheckpointStepInfo,
    KeyTotals,
    StorageFile,
    TrainerDirInfo,
    TrainerPartInfo,
    describe_checkpoint_step,
    describe_trainer_dir,
    describe_trainer_part,
    is_trainer_dir,
)
from prime_ckpt.inspect_listing import (
    RunListing,
    RunSteps,
    StepSummary,
    WeightsSummary,
    describe_titan_folder,
    ignored_reasons,
    run_listing,
    scan_run,
    scan_titan,
)
from prime_ckpt.inspect_safetensors import (
    WeightsStepInfo,
    describe_safetensors_dir,
    describe_safetensors_file,
    describe_weights_step,
)
from prime_ckpt.layout import (
    CHECKPOINTS_DIR,
    SAFETENSORS_INDEX_FILE,
    WEIGHTS_DIR,
    WEIGHTS_MARKER,
    parse_step,
)
from prime_ckpt.run_table import LIST_SCHEMA, ListedCheckpoint, ListedWeights, RunTable, list_run
from prime_ckpt.safetensors_io import SAFETENSORS_DTYPES
from prime_ckpt.storage import AnyPath, missing_reason, to_path

__all__ = [
    "LIST_SCHEMA",
    "SAFETENSORS_DTYPES",
    "SCHEMA",
    "BytesEntry",
    "CheckpointStepInfo",
    "Description",
    "InspectError",
    "KeyTotals",
    "ListedCheckpoint",
    "ListedWeights",
    "RunListing",
    "RunSteps",
    "RunTable",
    "StepInfo",
    "StepSummary",
    "StorageFile",
    "TensorEntry",
    "TrainerDirInfo",
    "TrainerPartInfo",
    "WeightsStepInfo",
    "WeightsSummary",
    "describe",
    "describe_checkpoint_step",
    "describe_safetensors_dir",
    "describe_safetensors_file",
    "describe_titan_folder",
    "describe_trainer_dir",
    "describe_trainer_part",
    "describe_weights_step",
    "dtype_name",
    "ignored_reasons",
    "list_run",
    "read_save_info",
    "run_listing",
    "save_info_problems",
    "scan_run",
    "scan_titan",
    "to_dict",
    "top_level_key",
]

_EXPECTED = (
    "expected a run output dir (with checkpoints/ or weights/), a checkpoints/ or weights/ dir, "
    "a step_<N> dir, a trainer/ or other DCP dir, a torchtitan checkpoint folder, or safetensors"
)

Description = RunListing | CheckpointStepInfo | TrainerDirInfo | WeightsStepInfo


def describe(path: AnyPath | str, name_filter: str | None = None) -> Description:
    """Identify what ``path`` is and describe it (read-only; reads metadata, never tensor data).

    Args:
        path: a run output dir, ``checkpoints/``, ``weights/``, ``checkpoints/step_<N>``,
            ``checkpoints/step_<N>/trainer`` (or any DCP dir) or ``weights/step_<N>``; local,
            an fsspec URL or a UPath carrying storage options.
        name_filter: a glob (``fnmatch``, case-sensitive) on tensor/entry names; only matching
            entries are listed and totalled. Ignored for listings.
    Raises:
        InspectError: ``path`` is missing, not a directory, or none of the above.
        MetadataError: a DCP ``.metadata`` exists but cannot be read safely (its subclass
            ``UnsafeMetadataError`` when it references a global DCP metadata never needs).
    """
    path = to_path(path)
    if not path.exists():
        raise InspectError(f"{path}: {missing_reason(path)}")
    if not path.is_dir():
        if path.name.endswith(".safetensors"):
            return describe_safetensors_file(path, name_filter)
        raise InspectError(f"{path}: not a directory ({_EXPECTED})")
    if is_trainer_dir(path):
        return describe_trainer_dir(path, name_filter)
    step = parse_step(path.name)
    parent = path.parent.name
    if step is not None:
        if parent == WEIGHTS_DIR or (parent != CHECKPOINTS_DIR and (path / WEIGHTS_MARKER).exists()):
            return describe_weights_step(path, name_filter)
        return describe_checkpoint_step(path, name_filter)
    if path.name == CHECKPOINTS_DIR:
        return run_listing("checkpoints", path, scan_run(path.parent, weights=False))
    if path.name == WEIGHTS_DIR:
        return run_listing("weights", path, scan_run(path.parent, checkpoints=False))
    if (path / CHECKPOINTS_DIR).is_dir() or (path / WEIGHTS_DIR).is_dir():
        return run_listing("run", path, scan_run(path))
    if (folder := titan_folder(path)) is not None:
        return describe_titan_folder(folder)
    if (path / SAFETENSORS_INDEX_FILE).is_file() or any(path.glob("*.safetensors")):
        return describe_safetensors_dir(path, name_filter)
    raise InspectError(f"{path}: not a checkpoint ({_EXPECTED})")
