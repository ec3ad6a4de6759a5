"""The states the cases save: FSDP2-sharded MLPs of ``Linear(HIDDEN, HIDDEN)`` layers (CPU/gloo,
or CUDA when present), with AdamW state for checkpoints, parameters alone for weights."""

from __future__ import annotations

from typing import Any

from ckpt_bench.common import HIDDEN


def _layers_for(size: int) -> int:
    """Linear(HIDDEN, HIDDEN) layers whose params + AdamW exp_avg + exp_avg_sq total ``size``."""
    per_layer = 3 * (HIDDEN * HIDDEN + HIDDEN) * 4
    return max(1, round(size / per_layer))


def _sharded_mlp(n_layers: int, relu: bool, seed: int):
    """``n_layers`` Linear layers (each followed by a ReLU when ``relu``), each Linear and the
    whole model ``fully_shard``-ed over every rank."""
    import torch
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    dev = "cuda" if torch.cuda.is_available() else "cpu"
    mesh = init_device_mesh(dev, (dist.get_world_size(),))
    torch.manual_seed(seed)
    with torch.device(dev):
        layers: list[torch.nn.Module] = []
        for _ in range(n_layers):
            layers += [torch.nn.Linear(HIDDEN, HIDDEN), *([torch.nn.ReLU()] if relu else [])]
        model = torch.nn.Sequential(*layers)
    for m in model:
        if isinstance(m, torch.nn.Linear):
            fully_shard(m, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model


def build_state(size: int, seed: int = 0):
    """An FSDP2-sharded MLP and AdamW with state (one step taken), about ``size`` bytes in all."""
    import torch

    model = _sharded_mlp(_layers_for(size), relu=True, seed=seed)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    train_step(model, opt, batch=4)
    return model, opt


def build_model(param_bytes: int, seed: int = 0):
    """An FSDP2-sharded MLP with about ``param_bytes`` bytes of fp32 parameters (in all ranks)."""
    return _sharded_mlp(max(1, round(param_bytes / ((HIDDEN * HIDDEN + HIDDEN) * 4))), relu=False, seed=seed)


def per_rank_state_bytes(model) -> int:
    """This rank's bytes of parameters + AdamW exp_avg + exp_avg_sq (fp32)."""
    return sum(p.to_local().numel() * 4 * 3 for p in model.parameters())


def train_step(model, opt, batch: int) -> None:
    """One forward / backward / optimizer step on a random batch."""
    import torch

    dev = next(model.parameters()).device
    x = torch.randn(batch, HIDDEN, device=dev.type if dev.type != "cpu" else "cpu")
    loss = model(x).float().pow(2).mean()
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)


def local_state(model, opt) -> dict[str, Any]:
    """This rank's model + optimizer tensors as plain local tensors (what torch.save writes)."""
    from torch.distributed.checkpoint.state_dict import get_state_dict
    from torch.distributed.tensor import DTensor

    def loc(x):
        if isinstance(x, DTensor):
            return x.to_local()
        if isinstance(x, dict):
            return {k: loc(v) for k, v in x.items()}
        if isinstance(x, list):
            return [loc(v) for v in x]
        return x

    m, o = get_state_dict(model, opt)
    return {"model": loc(m), "optimizer": loc(o)}


def full_state_dict(model, opt) -> dict[str, Any]:
    """``{"app": {"model", "optimizer"}}`` from ``get_state_dict``: what the plain DCP cases save and load."""
    from torch.distributed.checkpoint.state_dict import get_state_dict

    m, o = get_state_dict(model, opt)
    return {"app": {"model": m, "optimizer": o}}
