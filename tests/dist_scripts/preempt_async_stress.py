"""Regression for a hang: an async save's collectives (background thread) and the per-step
preemption check (main thread) must not share one gloo group, or the two threads' collectives
interleave differently on each rank and deadlock.

`preempt_async_stress.py OUT STEPS GROUP` saves asynchronously at every step and calls
``should_stop()`` at every step, so the two overlap on nearly every step. GROUP is ``own`` (the
handler's default: its own group) or ``shared`` (the handler is given the Checkpointer's group:
the bug; kept so the test's power can be checked by hand — it hangs).
"""

import sys
from pathlib import Path

import torch
import torch.distributed as dist
from _common import build, digest, full_state, init

from prime_ckpt.config import CheckpointConfig
from prime_ckpt.preemption import PreemptionHandler
from prime_ckpt.trainer import Checkpointer, TrainerState


def main() -> None:
    out, steps, group = Path(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
    rank, _ = init()
    model, opt, sched = build(seed=0)
    state = TrainerState(model, opt, sched)
    ck = Checkpointer(out, CheckpointConfig(interval=1, save_async=True, keep=2))
    preempt = PreemptionHandler(process_group=ck.process_group if group == "shared" else None)
    for step in range(1, steps + 1):
        model(torch.randn(4, 8)).sum().backward()
        opt.step()
        sched.step()
        opt.zero_grad()
        state.progress.step = step
        ck.save(step, state)  # waits for the previous upload, stages, starts the next upload
        assert not preempt.should_stop()  # a collective while that upload's collectives run
    ck.close()
    d = digest(full_state(model, opt))
    preempt.close()
    if rank == 0:
        print(f"done {steps} steps digest {d}", flush=True)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
