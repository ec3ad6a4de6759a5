"""Pruning: the executor of a retention plan (deletes what the plan says, decides nothing).

The planner (:func:`prime_ckpt.retention.plan`) decides; :func:`apply_plan` deletes. The trainer
runs it on rank 0's background thread after each committed save, ``prime-ckpt prune`` from the
command line.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from prime_ckpt.storage import AnyPath, remove_tree

if TYPE_CHECKING:
    from prime_ckpt.retention import Plan

# The executor logs as part of retention (stable logger name: users filter on it).
logger = logging.getLogger("prime_ckpt.retention")


@dataclass
class ApplyResult:
    """What :func:`apply_plan` did: paths deleted, already gone, and failures (path, error)."""

    deleted: list[AnyPath] = field(default_factory=list)
    already_gone: list[AnyPath] = field(default_factory=list)
    failed: list[tuple[AnyPath, str]] = field(default_factory=list)


def apply_plan(p: Plan, *, remove: Callable[[AnyPath], bool] = remove_tree) -> ApplyResult:
    """Delete every ``delete`` entry of ``p`` (checkpoints first, then weights).

    A path that is already gone is not an error; an ``OSError`` is logged and recorded in
    ``failed`` and the rest carries on. Decides nothing.
    """
    result = ApplyResult()
    for e in sorted(p.deletes, key=lambda e: (e.kind != "checkpoint", e.step)):
        try:
            if remove(e.path):
                result.deleted.append(e.path)
                logger.info("retention: deleted %s (%s)", e.path, "; ".join(e.reasons))
            else:
                result.already_gone.append(e.path)
        except OSError as err:
            logger.warning("retention: could not delete %s: %s", e.path, err)
            result.failed.append((e.path, f"{type(err).__name__}: {err}"))
    return result
