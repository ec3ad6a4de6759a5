"""Helpers shared by the distributed test scripts (imported by path-relative import)."""

from __future__ import annotations

import hashlib

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor


def init() -> tuple[int, int]:
    dist.init_process_group("gloo")
    torch.set_num_threads(1)
    return dist.get_rank(), dist.get_world_size()


def build(seed: int = 0, dropout: float = 0.0):
    """A small FSDP2 MLP (a 33-row layer so the shard split is uneven), AdamW and an LR schedule."""
    mesh = init_device_mesh("cpu", (dist.get_world_size(),))
    torch.manual_seed(seed)
    model = torch.nn.Sequential(
        torch.nn.Linear(8, 33), torch.nn.ReLU(), torch.nn.Dropout(dropout), torch.nn.Linear(33, 4)
    )
    for layer in (model[0], model[3]):
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 / (1.0 + 0.1 * s))
    return model, opt, sched


def full(t):
    return t.full_tensor() if isinstance(t, DTensor) else t


def full_state(model, opt) -> dict[str, torch.Tensor]:
    """Every model parameter and optimizer state tensor, unsharded, keyed by name (collective)."""
    out = {f"model.{k}": full(v).detach().clone() for k, v in model.state_dict().items()}
    names = {id(p): n for n, p in model.named_parameters()}
    for p, st in opt.state.items():
        for k, v in st.items():
            if torch.is_tensor(v):
                out[f"optim.{names[id(p)]}.{k}"] = full(v).detach().clone()
    return out


def digest(tensors: dict[str, torch.Tensor]) -> str:
    h = hashlib.sha256()
    for k in sorted(tensors):
        h.update(k.encode())
        h.update(tensors[k].reshape(-1).contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()
