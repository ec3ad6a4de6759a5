"""Write a real 2-rank FSDP2 run directory for the CLI tests (``tests/test_cli.py``).

Usage: ``torchrun --nproc-per-node=2 cli_make_checkpoint.py OUTPUT_DIR``

Writes, under OUTPUT_DIR:

* ``checkpoints/step_3``: trainer (sync save via :class:`prime_ckpt.checkpointer.Checkpointer`) and
  ``orchestrator.pt`` -> a complete step;
* ``checkpoints/step_6``: trainer only (no orchestrator record) -> an incomplete step;
* ``weights/step_3``: inference weights (``model.safetensors`` + ``config.json`` + ``COMPLETE``).
"""

from __future__ import annotations

import sys

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard

from prime_ckpt.config import CheckpointConfig
from prime_ckpt.orchestrator import OrchestratorProgress, save_orchestrator_checkpoint
from prime_ckpt.trainer import Checkpointer, Progress, TrainerState
from prime_ckpt.weights import save_weights


def main() -> None:
    out = sys.argv[1]
    dist.init_process_group("gloo")
    mesh = init_device_mesh("cpu", (dist.get_world_size(),))
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(7, 16), torch.nn.Linear(16, 3))
    for layer in model:
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 / (1 + s))
    progress = Progress()
    ckpt = Checkpointer(out, CheckpointConfig(interval=3), async_level=1)
    for step in range(1, 7):
        model(torch.randn(4, 7)).sum().backward()
        opt.step()
        sched.step()
        opt.zero_grad()
        progress.step, progress.total_samples, progress.total_tokens = step, 4 * step, 100 * step
        if ckpt.should_save(step):
            ckpt.save(step, TrainerState(model, opt, sched, progress))
            if step == 3:
                save_weights(out, step, model, {"hidden": 16})
                if dist.get_rank() == 0:
                    save_orchestrator_checkpoint(
                        out, OrchestratorProgress(step=3, total_tokens=300, total_samples=12, total_problems=3)
                    )
    ckpt.close()
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
