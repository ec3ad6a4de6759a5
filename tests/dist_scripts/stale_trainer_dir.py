"""Rank 0 replaces a trainer dir holding files from an earlier save, and leaves an empty one
(what a faster rank's planning step creates for this very save) alone.
`stale_trainer_dir.py OUT`; prints `removed: [...]` and `step 1 files: [...]` on rank 0."""

import sys
from pathlib import Path

import torch.distributed as dist
from _common import build, init

import prime_ckpt.saving as saving_mod
from prime_ckpt.config import CheckpointConfig
from prime_ckpt.trainer import Checkpointer, TrainerState

removed: list[str] = []
_remove_tree = saving_mod.remove_tree


def recording_remove_tree(path):
    removed.append(Path(path).parent.name)
    return _remove_tree(path)


def main() -> None:
    out = Path(sys.argv[1])
    rank, _ = init()
    saving_mod.remove_tree = recording_remove_tree
    model, opt, sched = build(seed=0)
    state = TrainerState(model, opt, sched)
    ck = Checkpointer(out, CheckpointConfig(interval=1))
    if rank == 0:
        stale = ck.layout.trainer_dir(1)
        stale.mkdir(parents=True)
        (stale / "__7_0.distcp").write_bytes(b"from an earlier run")
        ck.layout.trainer_dir(2).mkdir(parents=True)  # empty: as if another rank just created it
    dist.barrier()
    for step in (1, 2):
        state.progress.step = step
        ck.save(step, state)
    ck.close()
    if rank == 0:
        print(f"removed: {removed}", flush=True)
        print(f"step 1 files: {sorted(p.name for p in ck.layout.trainer_dir(1).iterdir())}", flush=True)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
