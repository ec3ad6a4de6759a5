"""Write other tools' DCP layouts under 2-rank torchrun (gloo), for the inspection / convert tests.

Usage: foreign_layouts.py OUT_DIR. Writes, from one model state dict (a 33x4 weight sharded
unevenly across ranks as a DTensor, a replicated bias, a bf16 embedding):
  OUT/no_collectives/        dcp.save(..., use_collectives=False): __<rank>.metadata, no .metadata
  OUT/hf_sharded/            DCP's HuggingFaceStorageWriter(save_distributed=True): one
                             shard-<rank>-model-*.safetensors per rank, not consolidated
  OUT/hf_consolidated/       the same with enable_consolidation=True (model-*.safetensors)
  OUT/hf_rank0/              HuggingFaceStorageWriter on rank 0 alone (full tensors; its header
                             still carries DCP_SHARDING_INFO, every offset 0)
  OUT/titan/checkpoint/step-<N>  torchtitan's CheckpointManager layout (model keys flattened to
                             the root beside optimizer/train_state), N = 10, 20; step-30 unfinished
  OUT/reference.pt           the full tensors (rank 0)
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import HuggingFaceStorageWriter
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import Replicate, Shard, distribute_tensor


def main() -> None:
    out = Path(sys.argv[1])
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    mesh = init_device_mesh("cpu", (dist.get_world_size(),))
    g = torch.Generator().manual_seed(0)
    full = {
        "layers.0.weight": torch.randn(33, 4, generator=g),
        "layers.0.bias": torch.randn(4, generator=g),
        "tok_embeddings.weight": torch.randn(10, 6, generator=g).to(torch.bfloat16),
    }
    model = {
        "layers.0.weight": distribute_tensor(full["layers.0.weight"], mesh, [Shard(0)]),
        "layers.0.bias": distribute_tensor(full["layers.0.bias"], mesh, [Replicate()]),
        "tok_embeddings.weight": distribute_tensor(full["tok_embeddings.weight"], mesh, [Shard(1)]),
    }
    dcp.save({"model": dict(model), "step": 3}, checkpoint_id=str(out / "no_collectives"), use_collectives=False)
    dcp.save(dict(model), storage_writer=HuggingFaceStorageWriter(str(out / "hf_sharded"), save_distributed=True))
    dcp.save(
        dict(model),
        storage_writer=HuggingFaceStorageWriter(str(out / "hf_consolidated"), save_distributed=True, enable_consolidation=True),
    )
    for step in (10, 20):
        state = {**model, "optimizer": {"state": {"layers.0.bias": {"exp_avg": model["layers.0.bias"] * 0}}},
                 "train_state": {"step": step}, "lr_scheduler": {"last_epoch": step}}  # fmt: skip
        dcp.save(state, checkpoint_id=str(out / "titan" / "checkpoint" / f"step-{step}"))
    if rank == 0:  # a rank-0 HF-writer save of the full tensors (DCP_SHARDING_INFO, all offsets 0)
        dcp.save(dict(full), storage_writer=HuggingFaceStorageWriter(str(out / "hf_rank0")), no_dist=True)
        (out / "titan" / "checkpoint" / "step-30").mkdir()
        (out / "titan" / "checkpoint" / "step-30" / "__0_0.distcp").write_bytes(b"partial")
        torch.save(full, out / "reference.pt")
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
