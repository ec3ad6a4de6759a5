"""The one model of a run's steps (:class:`RunSteps`), scanned from disk, and its ``inspect``
view (:class:`RunListing`); ``list``'s view of the same model is :mod:`prime_ckpt.run_table`.

:func:`scan_run` scans a run output dir (this project's layout) and :func:`scan_titan` a
torchtitan checkpoint folder (read-only; nothing there is this project's) into a
:class:`RunSteps`: the checkpoint and weights steps as :mod:`prime_ckpt.layout` finds them, the
parts a step needs to be complete, and why each other entry is not a step. Completeness is
:mod:`prime_ckpt.layout`'s, so nothing incomplete is reported as complete. Read-only; no tensor
data is read.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

from prime_ckpt.foreign import titan_steps
from prime_ckpt.inspect_common import remote_entries
from prime_ckpt.layout import (
    CHECKPOINTS_DIR,
    TRAINER_PART,
    WEIGHTS_DIR,
    CheckpointStep,
    WeightsStep,
    detect_parts,
    parse_step,
    scan_checkpoints,
    scan_weights,
    trainer_part_problem,
)
from prime_ckpt.storage import AnyPath, is_leftover, is_remote, to_path

PRIME_CKPT_LAYOUT = "prime-ckpt"
TORCHTITAN_LAYOUT = "torchtitan"


# -- the model ------------------------------------------------------------------------------
@dataclass(frozen=True)
class RunSteps:
    """The steps of a run as found on disk (what ``inspect <run dir>`` and ``list`` show).

    Attributes:
        layout: ``"prime-ckpt"`` (a run output dir) or ``"torchtitan"`` (its checkpoint folder).
        root: the run output dir, or the torchtitan checkpoint folder.
        parts: the parts a checkpoint step needs to be complete
            (:func:`prime_ckpt.layout.detect_parts`; ``("trainer",)`` for torchtitan).
        checkpoints: the checkpoint steps in step order (None: not scanned).
        weights: the weights steps in step order (None: not scanned).
        ignored_reasons: ``{"<dir>/<entry>": why it is not a step}`` (:func:`ignored_reasons`).
    """

    layout: str
    root: AnyPath
    parts: tuple[str, ...]
    checkpoints: list[CheckpointStep] | None
    weights: list[WeightsStep] | None
    ignored_reasons: dict[str, str] = field(default_factory=dict)

    @property
    def latest_complete_step(self) -> int | None:
        """The highest complete checkpoint step, or None."""
        complete = [c.step for c in self.checkpoints or [] if c.complete(self.parts)]
        return max(complete) if complete else None

    def incomplete_lines(self, c: CheckpointStep) -> list[str]:
        """One line per part of ``c`` that is present but not complete, saying why."""
        if self.layout == TORCHTITAN_LAYOUT:
            return [f"{c.path}: not complete: {why}" for why in c.problems.values()]
        return [f"{c.path}: {part} is not complete: {why}" for part, why in c.problems.items()]


def scan_run(output_dir: AnyPath | str, *, checkpoints: bool = True, weights: bool = True) -> RunSteps:
    """Scan a run output dir's ``checkpoints/`` and/or ``weights/`` (the one scan behind
    ``inspect`` and ``list``)."""
    root = to_path(output_dir)
    scanned = scan_checkpoints(root) if checkpoints else []
    return RunSteps(
        layout=PRIME_CKPT_LAYOUT,
        root=root,
        parts=detect_parts(scanned),
        checkpoints=scanned if checkpoints else None,
        weights=scan_weights(root) if weights else None,
        ignored_reasons={**(ignored_reasons(root / CHECKPOINTS_DIR) if checkpoints else {}),
                         **(ignored_reasons(root / WEIGHTS_DIR) if weights else {})},
    )


def scan_titan(folder: AnyPath | str) -> RunSteps:
    """Scan a torchtitan checkpoint folder (``<dump>/checkpoint``): one checkpoint step per
    ``step-<N>`` (a DCP checkpoint; complete by :func:`prime_ckpt.layout.trainer_part_problem`,
    the rule for this project's own trainer part); no weights."""
    folder = to_path(folder)
    steps = []
    for n, p in titan_steps(folder):
        why = trainer_part_problem(p)
        steps.append(CheckpointStep(n, p, parts={TRAINER_PART: why is None}, present=(TRAINER_PART,),
                                    problems={TRAINER_PART: why} if why is not None else {}))
    return RunSteps(layout=TORCHTITAN_LAYOUT, root=folder, parts=(TRAINER_PART,), checkpoints=steps, weights=None)


def ignored_reasons(root: AnyPath) -> dict[str, str]:
    """``{"<root name>/<entry>": why it is not a step}`` for every entry of ``root``
    (``checkpoints/`` or ``weights/``) that is not a ``step_<int>`` directory: a crash leftover of
    this project (``.step_N.deleting.*``: a delete that did not finish; ``.<name>.tmp.*``), a
    symlink (never followed: what it points at is not this run's), a file, or another name."""
    def why(name: str, is_dir: bool, is_link: bool) -> str | None:
        if is_leftover(name):
            return "leftover of an interrupted delete" if ".deleting." in name else "leftover of an interrupted write"
        if is_link:
            return "a symlink (never followed)"
        if parse_step(name) is None:
            return "not a step_<N> name"
        if not is_dir:
            return "a file, not a step directory"
        return None

    out: dict[str, str] = {}
    if is_remote(root):
        for n, size in remote_entries(root).items():
            if (reason := why(n, size is None, False)) is not None:
                out[f"{root.name}/{n}"] = reason
        return dict(sorted(out.items()))
    if not root.is_dir():
        return {}
    for e in os.scandir(root):
        if (reason := why(e.name, e.is_dir(follow_symlinks=False), e.is_symlink())) is not None:
            out[f"{root.name}/{e.name}"] = reason
    return dict(sorted(out.items()))



# -- the inspect view -----------------------------------------------------------------------
@dataclass
class StepSummary:
    """One ``checkpoints/step_<N>`` in a listing; ``complete`` iff every part the run writes is
    (``layout.detect_parts``: a trainer-only run needs only ``trainer``)."""

    step: int
    path: str
    complete: bool
    parts: dict[str, bool]
    present: list[str]


@dataclass
class WeightsSummary:
    """One ``weights/step_<N>`` in a listing; ``complete`` iff its ``COMPLETE`` marker exists."""

    step: int
    path: str
    complete: bool


@dataclass
class RunListing:
    """kind ``run`` (output dir), ``checkpoints`` or ``weights`` (a listing; no tensor tables)."""

    kind: str
    path: str
    checkpoints: list[StepSummary] | None
    weights: list[WeightsSummary] | None
    latest_complete_step: int | None
    ignored: list[str] = field(default_factory=list)
    #: why each ignored entry is not a step (leftover, symlink, file, other name)
    ignored_reasons: dict[str, str] = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)



def run_listing(kind: str, path: AnyPath | str, steps: RunSteps) -> RunListing:
    """The ``inspect`` view of ``steps`` (``kind`` ``run``, ``checkpoints``, ``weights`` or
    ``torchtitan``; ``path`` the path asked about)."""
    checkpoints, weights = steps.checkpoints, steps.weights
    return RunListing(
        kind=kind,
        path=str(path),
        checkpoints=None if checkpoints is None else [
            StepSummary(c.step, str(c.path), c.complete(steps.parts), dict(c.parts), list(c.present)) for c in checkpoints
        ],
        weights=None if weights is None else [WeightsSummary(w.step, str(w.path), w.complete) for w in weights],
        latest_complete_step=steps.latest_complete_step,
        ignored=list(steps.ignored_reasons),
        ignored_reasons=dict(steps.ignored_reasons),
        # a torchtitan folder says why each step is incomplete (a run dir's steps are `list`'s to judge)
        problems=[line for c in checkpoints or [] for line in steps.incomplete_lines(c)]
        if steps.layout == TORCHTITAN_LAYOUT else [],
    )


def describe_titan_folder(folder: AnyPath | str) -> RunListing:
    """kind ``"torchtitan"``: a torchtitan checkpoint folder (``<dump>/checkpoint``), one row per
    ``step-<N>`` (a DCP checkpoint; ``complete`` by :func:`prime_ckpt.layout.trainer_part_problem`,
    the rule for this project's own trainer part). Read-only; nothing here is this project's."""
    folder = to_path(folder)
    return run_listing(TORCHTITAN_LAYOUT, folder, scan_titan(folder))
