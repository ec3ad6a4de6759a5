"""Redistribution for publishing (prime_ckpt.redistribute) in one process: tensor specs (export
dtype, owners) and a rank's own shard streamed to disk, read back by ``safetensors.safe_open``.
(chunk_bounds / assign_owners: tests/test_publisher.py; across ranks: its torchrun tests.)"""

from __future__ import annotations

import dataclasses

import torch
import xxhash
from safetensors import safe_open

from prime_ckpt.redistribute import ShardWriter, dist_rank, dist_world_size, tensor_specs


def test_not_distributed_is_rank_0_of_1():
    assert (dist_rank(), dist_world_size()) == (0, 1)


def test_tensor_specs_cast_floats_only_and_replicate_plain_tensors():
    tensors = [("w", torch.zeros(4, 3)), ("steps", torch.zeros(2, dtype=torch.int64))]
    specs = tensor_specs(tensors, torch.bfloat16)
    assert [(s.name, s.shape, s.dtype, s.owner, s.shard_dim, s.mesh_ranks) for s in specs] == [
        ("w", (4, 3), torch.bfloat16, 0, None, ()),
        ("steps", (2,), torch.int64, 0, None, ()),
    ]
    assert specs[0].nbytes == 4 * 3 * 2
    assert tensor_specs(tensors, None)[0].dtype == torch.float32


def test_own_shard_is_streamed_hashed_and_readable(tmp_path):
    tensors = {"a": torch.randn(3, 4), "b": torch.arange(7, dtype=torch.int32), "empty": torch.zeros(0, 2)}
    specs = tensor_specs(list(tensors.items()), None)
    writer = ShardWriter(None)
    entry = writer.write_own_shard(tmp_path, specs, dict(tensors))
    path = tmp_path / "model-00001-of-00001.safetensors"
    data = path.read_bytes()
    assert entry == {"path": path.name, "size": len(data), "xxh3_64": xxhash.xxh3_64_hexdigest(data), "tensors": ["a", "b", "empty"]}
    with safe_open(str(path), framework="pt") as f:
        for name, t in tensors.items():
            assert torch.equal(f.get_tensor(name), t), name
    writer.release()
    assert all(b.numel() == 0 for b in writer.scratch)


def test_a_rank_that_owns_nothing_writes_nothing(tmp_path):
    specs = [dataclasses.replace(s, owner=1) for s in tensor_specs([("w", torch.ones(2))], None)]
    assert ShardWriter(None).write_own_shard(tmp_path, specs, {"w": torch.ones(2)}) is None
    assert list(tmp_path.iterdir()) == []
