"""A write error on rank 1 only (ENOSPC from the storage writer) during the save of step 2.

usage: save_failure.py OUT sync|async
Every rank must get CheckpointSaveError naming rank 1 and the path; step 1 must still load
bitwise; the error is then re-raised so the process exits non-zero."""

import errno
import sys

import torch
import torch.distributed as dist
from _common import build, full_state, init

from prime_ckpt.config import CheckpointConfig
from prime_ckpt.layout import scan_checkpoints
from prime_ckpt.trainer import Checkpointer, CheckpointSaveError, Progress, TrainerState
from prime_ckpt.writing import DirectFileSystemWriter as FileSystemWriter  # the writer a save uses


def main() -> None:
    out, mode = sys.argv[1], sys.argv[2]
    rank, world = init()
    model, opt, sched = build(seed=0)
    model(torch.randn(4, 8)).sum().backward()
    opt.step()
    state = TrainerState(model, opt, sched, Progress(step=1))
    ck = Checkpointer(out, CheckpointConfig(interval=1, save_async=(mode == "async"), timeout=60))
    ck.save(1, state)
    ck.wait()
    expected = full_state(model, opt)

    if rank == 1:
        def no_space(self, plan, planner):
            raise OSError(errno.ENOSPC, "No space left on device", str(self.path))
        FileSystemWriter.write_data = no_space
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    state.progress.step = 2
    try:
        ck.save(2, state)
        ck.close()  # async: the failure surfaces here at the latest
    except CheckpointSaveError as e:
        err = e
    else:
        raise AssertionError("save of step 2 did not fail")
    assert err.step == 2 and list(err.failures) == [1], err.failures
    assert "No space left on device" in str(err) and "step_2/trainer" in str(err), str(err)
    print(f"rank {rank}: CheckpointSaveError: {err}", flush=True)
    steps = {c.step: c.parts["trainer"] for c in scan_checkpoints(out)}
    assert steps == {1: True, 2: False}, steps

    model2, opt2, sched2 = build(seed=5)
    state2 = TrainerState(model2, opt2, sched2)
    ck2 = Checkpointer(out, CheckpointConfig(resume_step=-1))
    assert ck2.resume_step(parts=("trainer",)) == 1
    ck2.load(1, state2)
    got = full_state(model2, opt2)
    assert all(torch.equal(got[k], v) for k, v in expected.items())
    print(f"rank {rank}: step 1 still loads bitwise", flush=True)
    ck2.close()
    dist.barrier()
    raise err


if __name__ == "__main__":
    main()
