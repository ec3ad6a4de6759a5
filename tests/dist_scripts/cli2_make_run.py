"""Write a real 2-rank FSDP2 run for the CLI command tests (list / verify / convert / diff).

Usage: ``torchrun --nproc-per-node=2 cli2_make_run.py OUTPUT_DIR REFERENCE_DIR``

Model: ``_common.build()`` (Linear(8, 33) -> ReLU -> Dropout -> Linear(33, 4), FSDP2; the 33-row
layer makes the shard split uneven), AdamW, LambdaLR; 6 steps, checkpoint interval 2.

Writes, under OUTPUT_DIR:

* ``checkpoints/step_2``: sync save + ``orchestrator.pt`` -> complete;
* ``checkpoints/step_4``: async save (thread) + ``orchestrator.pt`` -> complete;
* ``checkpoints/step_6``: sync save, no orchestrator record -> incomplete;
* ``weights/step_2``, ``weights/step_3``, ``weights/step_4``;
* ``manifest.json`` in every step dir, written by rank 0 right after the step is committed (what
  the trainer's commit path does) — for step 2 and 4 after the orchestrator record, so it covers
  both parts; step 6's covers ``trainer`` only.

Under REFERENCE_DIR (rank 0): ``step_<N>.pt`` for N in 2, 4, 6: every model parameter and
optimizer state tensor, unsharded (``_common.full_state``: keys ``model.<name>`` and
``optim.<param>.<state>``), taken right after ``save()`` returned.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import build, full_state, init

from prime_ckpt.config import CheckpointConfig
from prime_ckpt.layout import RunLayout
from prime_ckpt.manifest import write_manifest
from prime_ckpt.orchestrator import OrchestratorProgress, save_orchestrator_checkpoint
from prime_ckpt.trainer import Checkpointer, Progress, TrainerState
from prime_ckpt.weights import save_weights


def main() -> None:
    out, ref = Path(sys.argv[1]), Path(sys.argv[2])
    rank, _ = init()
    layout = RunLayout(out)
    model, opt, sched = build(seed=0)
    progress = Progress()
    sync = Checkpointer(out, CheckpointConfig(interval=2))
    asyn = Checkpointer(out, CheckpointConfig(interval=2, save_async=True))
    g = torch.Generator().manual_seed(1)
    for step in range(1, 7):
        model(torch.randn(5, 8, generator=g)).pow(2).mean().backward()
        opt.step()
        sched.step()
        opt.zero_grad()
        progress.step, progress.total_samples, progress.total_tokens = step, 5 * step, 40 * step
        if step in (2, 3, 4):
            save_weights(out, step, model, {"hidden": 33})
            if rank == 0:
                write_manifest(layout.weights_step_dir(step))
        if step % 2:
            continue
        ckpt = asyn if step == 4 else sync
        ckpt.save(step, TrainerState(model, opt, sched, progress))
        ref_state = full_state(model, opt)  # collective; the state as of save()
        if rank == 0:
            ref.mkdir(parents=True, exist_ok=True)
            torch.save(ref_state, ref / f"step_{step}.pt")
        ckpt.flush()  # durable, and rank 0's own manifest written: ours below must come last
        dist.barrier()
        if rank == 0:
            if step != 6:
                save_orchestrator_checkpoint(
                    out, OrchestratorProgress(step=step, total_tokens=40 * step, total_samples=5 * step, total_problems=step)
                )
            write_manifest(layout.step_dir(step))
    sync.close()
    asyn.close()
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
