"""Redistribution of a sharded model for publishing: every tensor gets one owner rank, the other
ranks send it their slices, and the owner assembles and streams its own safetensors file.

Every tensor has one owner (:func:`assign_owners`, balanced by bytes); the other mesh ranks send
it their slice point-to-point (``torch.chunk`` bounds: :func:`chunk_bounds`) on the publisher's
gloo group, and the owner assembles one tensor at a time in a scratch buffer (two, used in turn:
the next tensor's transfer overlaps this one's write). No rank ever holds the model: peak extra
memory is its staged shards plus twice its largest tensor. Each owner streams its file (header
first, then tensor bytes in file order) with an atomic, fsynced write and hashes it on the way.

Sharded parameters must be DTensors on a one-dimensional mesh (FSDP2's ``fully_shard``), placed
``Shard(d)`` (any ``d``) or ``Replicate()``; plain tensors are treated as replicated.
"""

from __future__ import annotations

from typing import Any, BinaryIO

import torch
import torch.distributed as dist
import xxhash
from torch.distributed.tensor import DTensor, Replicate, Shard

from prime_ckpt.hf_writer import TensorSpec, _bytes_of, safetensors_header
from prime_ckpt.layout import shard_file_name
from prime_ckpt.manifest import ALGORITHM
from prime_ckpt.state import current_rank as dist_rank
from prime_ckpt.state import current_world_size as dist_world_size
from prime_ckpt.storage import AnyPath, atomic_write_streamed


def chunk_bounds(size: int, parts: int, index: int) -> tuple[int, int]:
    """``[start, stop)`` of chunk ``index`` when ``size`` rows are split into ``parts`` chunks
    the way ``torch.chunk`` (and so DTensor's ``Shard`` and FSDP2) splits them: chunks of
    ``ceil(size / parts)``, the last ones shorter or empty."""
    chunk = -(-size // parts) if parts else 0
    start = min(index * chunk, size)
    return start, min(start + chunk, size)


def assign_owners(nbytes: list[int], world_size: int) -> list[int]:
    """Owner rank of each tensor, balancing bytes across ranks (pure, deterministic).

    Largest tensors first, each to the rank with the fewest bytes so far (ties: lowest rank);
    equal sizes keep their order. Args: ``nbytes`` per tensor (bytes), ``world_size`` (ranks).
    Returns one owner per tensor, in the input order.
    """
    load = [0] * world_size
    owners = [0] * len(nbytes)
    for i in sorted(range(len(nbytes)), key=lambda i: (-nbytes[i], i)):
        r = min(range(world_size), key=lambda r: (load[r], r))
        owners[i] = r
        load[r] += nbytes[i]
    return owners


def tensor_specs(tensors: list[tuple[str, torch.Tensor]], dtype: torch.dtype | None) -> list[TensorSpec]:
    """One :class:`TensorSpec` per ``(name, tensor)``: its export dtype (``dtype`` for floating
    tensors, None: its own), how it is sharded, and its owner (:func:`assign_owners` over the
    world).

    Raises:
        NotImplementedError: a DTensor on a mesh of more than one dimension, or placed other than
            ``Shard`` / ``Replicate``.
    """
    specs = []
    for name, t in tensors:
        export = dtype if dtype is not None and t.is_floating_point() else t.dtype
        shard_dim, mesh_ranks = None, ()
        if isinstance(t, DTensor):
            mesh = t.device_mesh
            if mesh.ndim != 1:
                raise NotImplementedError(f"{name}: DTensor on a {mesh.ndim}-D device mesh; publishing supports 1-D meshes (FSDP2)")
            placement = t.placements[0]
            if isinstance(placement, Shard):
                shard_dim = placement.dim % max(t.ndim, 1)
                mesh_ranks = tuple(int(r) for r in mesh.mesh.tolist())
            elif not isinstance(placement, Replicate):
                raise NotImplementedError(f"{name}: placement {placement} is not supported (Shard or Replicate)")
        specs.append(TensorSpec(name, tuple(t.shape), export, owner=0, shard_dim=shard_dim, mesh_ranks=mesh_ranks))
    owners = assign_owners([s.nbytes for s in specs], dist_world_size())
    return [TensorSpec(s.name, s.shape, s.dtype, o, s.shard_dim, s.mesh_ranks) for s, o in zip(specs, owners)]


class ShardWriter:
    """This rank's part of the redistribution, with its two scratch buffers (reused across
    publishes). ``pg``: the gloo group the slices travel on (None: not distributed)."""

    def __init__(self, pg: Any) -> None:
        self.pg = pg
        self.scratch = [torch.empty(0, dtype=torch.uint8), torch.empty(0, dtype=torch.uint8)]

    def release(self) -> None:
        """Free the scratch buffers (they grow again on the next use)."""
        self.scratch = [torch.empty(0, dtype=torch.uint8), torch.empty(0, dtype=torch.uint8)]

    def write_own_shard(self, step_dir: AnyPath, specs: list[TensorSpec], staged: dict[str, torch.Tensor]) -> dict[str, Any] | None:
        """Send this rank's slices of other ranks' tensors; receive, assemble and write its own.
        Returns its manifest entry ``{"path", "size", "xxh3_64", "tensors"}``, or None if it owns
        nothing. A write error is raised only after every receive completed (peers never hang).

        Receives run one tensor ahead of the write (two scratch buffers, used in turn): the
        transfer of tensor k+1 overlaps the write of tensor k."""
        rank = dist_rank()
        owners = sorted({s.owner for s in specs})
        sends = []
        for i, s in enumerate(specs):
            if s.owner != rank and s.shard_dim is not None and rank in s.mesh_ranks:
                buf = staged[s.name]
                if buf.numel():
                    sends.append(dist.isend(buf.contiguous(), dst=s.owner, group=self.pg, tag=i))
        mine = [(i, s) for i, s in enumerate(specs) if s.owner == rank]
        done = 0  # tensors of `mine` whose receives completed
        pending: tuple[int, Any] | None = None  # (k, posted receives of mine[k])
        entry = None
        try:
            if mine:
                name = shard_file_name(owners.index(rank) + 1, len(owners))
                hasher = xxhash.xxh3_64()
                size = [0]

                def write(f: BinaryIO) -> None:
                    nonlocal done, pending

                    def put(data: memoryview | bytes) -> None:
                        f.write(data)
                        hasher.update(data)
                        size[0] += len(data)

                    put(safetensors_header([s for _, s in mine]))
                    pending = (0, self.post(*mine[0], staged, slot=0))
                    for k in range(len(mine)):
                        current = pending
                        pending = (k + 1, self.post(*mine[k + 1], staged, slot=(k + 1) % 2)) if k + 1 < len(mine) else None
                        data = self.finish(current[1])
                        done = k + 1
                        put(data)

                atomic_write_streamed(step_dir / name, write)
                entry = {"path": name, "size": size[0], ALGORITHM: hasher.hexdigest(), "tensors": [s.name for _, s in mine]}
        finally:
            # On a write error, still take every slice the peers send (else they hang in wait()).
            rest = done
            if pending is not None and pending[0] >= done:
                self.finish(pending[1])
                rest = pending[0] + 1
            for i, s in mine[rest:]:
                self.finish(self.post(i, s, staged, slot=0))
            for w in sends:
                w.wait()
        return entry

    def post(self, index: int, spec: TensorSpec, staged: dict[str, torch.Tensor], slot: int) -> tuple:
        """Start assembling one whole tensor this rank owns in scratch buffer ``slot``: copy its
        own slice, post the receives of the other mesh ranks' slices. Replicated: its staged copy."""
        if spec.shard_dim is None:
            return staged[spec.name], []
        nbytes = spec.nbytes
        if self.scratch[slot].numel() < nbytes:
            self.scratch[slot] = torch.empty(nbytes, dtype=torch.uint8)
        full = self.scratch[slot][:nbytes].view(spec.dtype).view(spec.shape) if nbytes else torch.empty(spec.shape, dtype=spec.dtype)
        rank, d = dist_rank(), spec.shard_dim
        n = len(spec.mesh_ranks)
        recvs = []
        for j, src in enumerate(spec.mesh_ranks):
            start, stop = chunk_bounds(spec.shape[d], n, j)
            if stop <= start:
                continue
            part = full.narrow(d, start, stop - start)
            if src == rank:
                part.copy_(staged[spec.name])
            elif part.is_contiguous():
                recvs.append((None, dist.irecv(part, src=src, group=self.pg, tag=index)))
            else:
                tmp = torch.empty(part.shape, dtype=spec.dtype)
                recvs.append(((part, tmp), dist.irecv(tmp, src=src, group=self.pg, tag=index)))
        return full, recvs

    def finish(self, posted: tuple) -> memoryview:
        """Wait for a posted tensor's receives; its bytes (valid until its slot is reused)."""
        full, recvs = posted
        for pair, work in recvs:
            work.wait()
            if pair is not None:
                pair[0].copy_(pair[1])
        return _bytes_of(full)
