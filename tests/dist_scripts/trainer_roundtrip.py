"""Round trip: train 2 steps, save step 2 (sync or async), mutate, reload into fresh objects,
compare bitwise. Exits non-zero on any mismatch."""

import sys

import torch
import torch.distributed as dist
from _common import build, full_state, init

from prime_ckpt.config import CheckpointConfig
from prime_ckpt.trainer import Checkpointer, Progress, TrainerState, get_rng_state


def main() -> None:
    out, mode = sys.argv[1], sys.argv[2]
    rank, world = init()
    model, opt, sched = build(seed=0)
    for _ in range(2):
        model(torch.randn(4, 8)).sum().backward()
        opt.step()
        sched.step()
        opt.zero_grad()
    torch.manual_seed(1000 + rank)  # per-rank RNG that must come back per rank
    state = TrainerState(model, opt, sched, Progress(step=2, total_samples=8, total_tokens=99))
    ck = Checkpointer(out, CheckpointConfig(interval=1, save_async=(mode == "async")))
    expected = full_state(model, opt)
    expected_rng = get_rng_state()["torch_cpu"].clone()
    expected_lr = sched.get_last_lr()
    record = ck.save(2, state)
    # Snapshot semantics: everything changed after save() returns must not reach the checkpoint.
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
        for st in opt.state.values():
            st["exp_avg"].add_(5.0)
    torch.rand(10)
    ck.close()
    assert record.error is None and record.bytes > 0, record
    assert record.upload_s is not None and record.blocking_s >= record.staging_s

    model2, opt2, sched2 = build(seed=123)
    state2 = TrainerState(model2, opt2, sched2)
    ck2 = Checkpointer(out, CheckpointConfig(resume_step=-1))
    step = ck2.resume_step()
    assert step == 2, step
    ck2.load(step, state2)
    got = full_state(model2, opt2)
    assert set(got) == set(expected), (sorted(got), sorted(expected))
    for k in expected:
        assert torch.equal(got[k], expected[k]), k
        assert got[k].dtype == expected[k].dtype, k
    assert state2.progress == Progress(step=2, total_samples=8, total_tokens=99), state2.progress
    assert sched2.get_last_lr() == expected_lr, (sched2.get_last_lr(), expected_lr)
    assert opt2.param_groups[0]["lr"] == expected_lr[0]
    assert torch.equal(torch.get_rng_state(), expected_rng), "per-rank RNG state not restored"
    # the two ranks' RNG states differ, so restoring rank 0's on rank 1 would have failed above
    gathered = [None] * world
    dist.all_gather_object(gathered, expected_rng.sum().item())
    assert len(set(gathered)) == world, gathered
    print(f"rank {rank}: roundtrip {mode} ok ({len(expected)} tensors)")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
