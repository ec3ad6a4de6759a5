"""What a save and a publish share: the timings of a call that stages now and writes in the
background, and closing that waits for the background work before releasing resources.

Used by :class:`~prime_ckpt.save_record.SaveRecord` / :class:`~prime_ckpt.checkpointer.Checkpointer`
and :class:`~prime_ckpt.publisher.PublishRecord` / :class:`~prime_ckpt.publisher.WeightsPublisher`.
Imports nothing from the package.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass
class StageTimings:
    """The first fields of a save's or publish's record, on this rank (field order is the JSON's).

    Attributes:
        step: the step saved or published.
        mode: ``"sync"`` or ``"async"``.
        wait_previous_s: seconds waiting for the previous background write first (s).
        staging_s: seconds copying into the staging buffers (s; 0 for a sync save).
        blocking_s: seconds the call held the training loop in total (s).
    """

    step: int
    mode: str
    wait_previous_s: float = 0.0
    staging_s: float = 0.0
    blocking_s: float = 0.0


class WaitThenRelease:
    """Closing for an object with background work: ``close()`` waits for the last piece of work
    (``wait()``, which raises its error), then releases what the object holds (``_release()``),
    even if waiting raised; a second ``close()`` does nothing. ``with obj:`` closes on exit; an
    error of the last piece of work is raised, chained to the body's error if any.

    Subclasses set ``self._closed = False`` and define ``wait()`` and ``_release()``.
    """

    _closed: bool = False

    def wait(self) -> Any:  # pragma: no cover - defined by subclasses
        raise NotImplementedError

    def _release(self) -> None:  # pragma: no cover - defined by subclasses
        raise NotImplementedError

    def close(self) -> None:
        """Wait for the background work, then release; raises the last work's error. Safe to
        call twice."""
        if self._closed:
            return
        self._closed = True
        try:
            self.wait()
        finally:
            self._release()

    def __enter__(self) -> Any:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()
