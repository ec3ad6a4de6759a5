"""Resharding: `reshard.py save OUT REF` trains 2 steps and saves step 2 at this world size,
writing the full (unsharded) model/optimizer tensors and every rank's RNG state to REF;
`reshard.py load OUT REF` loads step 2 at this world size and checks everything bitwise,
including the per-rank rule (rank r takes saved rank r mod N)."""

import sys

import torch
import torch.distributed as dist
from _common import build, full_state, init

from prime_ckpt.config import CheckpointConfig
from prime_ckpt.trainer import Checkpointer, Progress, TrainerState


def main() -> None:
    action, out, ref_path = sys.argv[1], sys.argv[2], sys.argv[3]
    rank, world = init()
    if action == "save":
        model, opt, sched = build(seed=0)
        for _ in range(2):
            model(torch.randn(5, 8)).sum().backward()
            opt.step()
            sched.step()
            opt.zero_grad()
        torch.manual_seed(500 + rank)
        state = TrainerState(model, opt, sched, Progress(step=2, total_samples=10))
        ck = Checkpointer(out, CheckpointConfig(interval=1, save_async=True))
        expected = full_state(model, opt)
        rng = [None] * world
        dist.all_gather_object(rng, torch.get_rng_state())
        ck.save(2, state)
        ck.close()
        if rank == 0:
            torch.save({"tensors": expected, "rng": rng, "world": world}, ref_path)
    else:
        ref = torch.load(ref_path, weights_only=True)
        model, opt, sched = build(seed=99)
        model(torch.randn(5, 8)).sum().backward()  # materialise optimizer state to be overwritten
        opt.step()
        opt.zero_grad()
        state = TrainerState(model, opt, sched)
        ck = Checkpointer(out, CheckpointConfig(resume_step=-1))
        ck.load(ck.resume_step(), state)
        got = full_state(model, opt)
        assert set(got) == set(ref["tensors"]), sorted(set(got) ^ set(ref["tensors"]))
        for k, v in ref["tensors"].items():
            assert torch.equal(got[k], v), k
        assert state.progress == Progress(step=2, total_samples=10)
        src = rank % ref["world"]
        assert torch.equal(torch.get_rng_state(), ref["rng"][src]), (rank, src)
        assert state.remapped_rank_state == (rank >= ref["world"]), state.remapped_rank_state
        ck.close()
        print(f"rank {rank}/{world}: loaded a world-size-{ref['world']} checkpoint bitwise (rng from saved rank {src})")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
