"""The async level a retention plan over an existing run uses: the one given, else the one the
run recorded (``save_info.json``), else 0 when the run has no weights to protect.

Async level k: checkpoint step x pins weights ``[x-k, x]`` (resuming at x needs them).
Reads only the run's save records and its weights listing; writes nothing.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from prime_ckpt.errors import PrimeCkptError
from prime_ckpt.layout import recorded_async_level, scan_weights

logger = logging.getLogger(__name__)


class AsyncLevelError(PrimeCkptError, ValueError):
    """``--async-level`` was not given and the run did not record one, but it has weights."""


def resolve_async_level(output_dir: Any, given: int | None, *, warn: Callable[[str], None] | None = None) -> int:
    """The async level to plan with over the run at ``output_dir`` (a local path or UPath):
    ``given``, else the run's recorded one, else 0 if the run has no weights steps.

    A ``given`` level below the recorded one is used, with a warning (one line, passed to
    ``warn``; default: logged on ``prime_ckpt.async_level``): such a plan may delete weights a
    resume needs.

    Raises:
        AsyncLevelError: neither given nor recorded, and the run has weights steps: with a
            default of 0 a plan would delete weights ``[x - k, x - 1]`` that resuming at a kept
            step x needs.
    """
    recorded = recorded_async_level(output_dir)
    if given is None:
        if recorded is not None:
            return recorded
        if scan_weights(output_dir):
            raise AsyncLevelError(
                f"--async-level: not given, and {output_dir} records none (no save_info.json with it); "
                "give the run's async level k (resuming at checkpoint step x needs weights [x-k, x])"
            )
        return 0
    if recorded is not None and given < recorded:
        (warn or logger.warning)(
            f"--async-level {given} is below the async level {recorded} this run recorded: "
            f"resuming at a kept step x needs weights [x-{recorded}, x], and this plan may delete some of them"
        )
    return given
