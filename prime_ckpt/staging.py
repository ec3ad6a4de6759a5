"""Staging for async saves: copy the state into CPU buffers that are reused across saves.

``dcp.async_save`` returns to the training loop once the state is *staged* (copied off the live
tensors); the write then runs in the background. DCP's own default allocates fresh CPU memory
on every save, and on CPU the page faults of touching that memory cost about as much as the
write. :class:`ReusedBufferStager` keeps one contiguous staging buffer per source tensor view,
allocated and touched on the first save; from the second save on, staging is one ``copy_`` per
tensor into memory that is already there, close to a plain memcpy of the same bytes.

DCP's ``DefaultStager`` also caches buffers (per source storage), but it rebuilds every tensor
through a generic deep copy (a new DTensor and a deep-copied sharding spec per leaf), which
costs about as much again as the copy itself for a state dict of ~1000 tensors; and because it
copies whole storages, FSDP2's padded shards reach the writer as views that the writer clones
once more. This stager copies exactly the bytes each tensor holds into a contiguous buffer and
rewraps DTensors with their existing spec.

With CUDA, buffers are pinned and the device-to-host copies are issued non-blocking and
synchronised once at the end of :meth:`ReusedBufferStager.stage`.
"""

from __future__ import annotations

import copy
import time
from typing import Any

import torch
from torch.distributed.tensor import DTensor
from torch.utils.weak import WeakIdKeyDictionary

_IMMUTABLE = (type(None), bool, int, float, complex, str, bytes, torch.dtype, torch.device, torch.Size)


class ReusedBufferStager:
    """A DCP ``AsyncStager`` that stages into CPU buffers reused across saves, and times it.

    Args:
        pin_memory: pin the staging buffers (faster device-to-host copies); default: only when
            CUDA is available.
        share_memory: allocate the buffers in shared memory (what a process-mode writer needs;
            otherwise torch moves them there on the first save, in the background).
        dtype: stage floating-point tensors in this dtype (the copy casts, rounding to nearest
            even as ``Tensor.to`` does: e.g. bf16 export weights from fp32 master weights, half
            the staged bytes); None keeps each tensor's dtype. Integer and bool tensors keep
            theirs.

    The buffers are keyed by the source tensor's storage (weakly: a storage that goes away
    takes its buffers with it) and by the view's offset, shape, stride and dtype; a view that
    changes shape gets a new buffer. Non-tensor leaves are deep-copied unless immutable, so the
    staged dict is a snapshot: mutating the live state after :meth:`stage` returns does not
    change it.

    The caller must not stage again while a write of the previous staged dict is still running
    (the buffers would be overwritten under it); :class:`prime_ckpt.checkpointer.Checkpointer` waits
    for the previous save first.
    """

    def __init__(self, pin_memory: bool | None = None, share_memory: bool = False, dtype: torch.dtype | None = None) -> None:
        self._pin = torch.cuda.is_available() if pin_memory is None else bool(pin_memory and torch.cuda.is_available())
        self._share = share_memory
        self._dtype = dtype
        # source storage -> {(offset, shape, stride, dtype): staging tensor}
        self._buffers: WeakIdKeyDictionary = WeakIdKeyDictionary()
        self._device_copies = False
        #: seconds the last :meth:`stage` took (s)
        self.last_staging_s = 0.0
        #: bytes the last :meth:`stage` copied (bytes)
        self.last_staged_bytes = 0
        #: bytes of staging buffers currently held (bytes)
        self.buffer_bytes = 0
        #: buffers allocated by the last :meth:`stage` (0 once every buffer is reused)
        self.last_new_buffers = 0

    # DCP's AsyncStager protocol --------------------------------------------------------------
    @property
    def should_synchronize_after_execute(self) -> bool:
        return False

    def synchronize_staging(self) -> None:
        return None

    def stage(self, state_dict: dict[str, Any]) -> dict[str, Any]:
        """Return a staged copy of ``state_dict`` (same nesting; tensors copied into reused CPU
        buffers, DTensors rewrapped around their staged local shard)."""
        t0 = time.perf_counter()
        self.last_staged_bytes = 0
        self.last_new_buffers = 0
        self._device_copies = False
        memo: dict[int, Any] = {}
        with torch.no_grad():
            staged = self._copy(state_dict, memo)
            if self._device_copies:
                torch.cuda.synchronize()
        self.last_staging_s = time.perf_counter() - t0
        return staged

    def close(self) -> None:
        """Release every staging buffer."""
        self._buffers.clear()
        self.buffer_bytes = 0

    # internals ------------------------------------------------------------------------------
    def _copy(self, x: Any, memo: dict[int, Any]) -> Any:
        if isinstance(x, _IMMUTABLE):
            return x
        key = id(x)
        if key in memo:
            return memo[key]
        if isinstance(x, DTensor):
            local = self._copy_tensor(x._local_tensor)
            # Same spec object: a spec is immutable metadata (mesh, placements, global shape).
            y: Any = DTensor(local, x._spec, requires_grad=False)
        elif isinstance(x, torch.Tensor):
            y = self._copy_tensor(x)
        elif isinstance(x, dict):
            y = type(x)() if type(x) is not dict else {}
            for k, v in x.items():
                y[k] = self._copy(v, memo)
        elif isinstance(x, list):
            y = [self._copy(v, memo) for v in x]
        elif isinstance(x, tuple) and type(x) is tuple:
            y = tuple(self._copy(v, memo) for v in x)
        else:
            y = copy.deepcopy(x)
        memo[key] = y
        return y

    def _copy_tensor(self, t: torch.Tensor) -> torch.Tensor:
        # no detach(): stage() runs under no_grad, and a detach per tensor is a dispatch on the
        # blocking path
        storage = t.untyped_storage()
        views = self._buffers.get(storage)
        if views is None:
            views = {}
            self._buffers[storage] = views
        dtype = self._dtype if self._dtype is not None and t.is_floating_point() else t.dtype
        vkey = (t.storage_offset(), tuple(t.shape), tuple(t.stride()), dtype)
        buf = views.get(vkey)
        if buf is None:
            buf = torch.empty(t.shape, dtype=dtype, device="cpu", pin_memory=self._pin)
            if self._share:
                buf.share_memory_()
            views[vkey] = buf
            self.buffer_bytes += buf.numel() * buf.element_size()
            self.last_new_buffers += 1
        non_blocking = self._pin and t.device.type == "cuda"
        self._device_copies |= non_blocking
        buf.copy_(t, non_blocking=non_blocking)
        self.last_staged_bytes += buf.numel() * buf.element_size()
        return buf
