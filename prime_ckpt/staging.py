"""Staging for async saves: copy the state into CPU buffers that are reused across saves.

``dcp.async_save`` returns to the training loop once the state is *staged* (copied off the live
tensors); the write then runs in the background. DCP's own default allocates fresh CPU memory
on every save, and on CPU the page faults of touching that memory cost about as much as the
write. :class:`ReusedBufferStager` keeps one staging buffer per source storage (DCP's
``DefaultStager`` caches them by storage), so from the second save on the copy goes into memory
that is already allocated and touched. With CUDA the buffers are pinned.
"""

from __future__ import annotations

import time
from typing import Any

import torch


class ReusedBufferStager:
    """A DCP ``AsyncStager`` that stages into CPU buffers reused across saves, and times it.

    Wraps DCP's ``DefaultStager`` (synchronous staging; pinned memory only with CUDA). The
    stager keeps one staging buffer per source storage, so the second and later saves copy into
    memory that is already allocated and touched instead of faulting in fresh pages.
    """

    def __init__(self) -> None:
        from torch.distributed.checkpoint.staging import DefaultStager, StagingOptions

        cuda = torch.cuda.is_available()
        self._inner = DefaultStager(
            StagingOptions(
                use_pinned_memory=cuda,
                use_shared_memory=False,
                use_async_staging=False,
                use_non_blocking_copy=False,
            )
        )
        self.last_staging_s = 0.0

    @property
    def should_synchronize_after_execute(self) -> bool:
        return False

    def stage(self, state_dict: dict[str, Any]) -> dict[str, Any]:
        t0 = time.perf_counter()
        staged = self._inner.stage(state_dict)
        self.last_staging_s = time.perf_counter() - t0
        return staged

    def synchronize_staging(self) -> None:
        return None

    def close(self) -> None:
        self._inner.close()
