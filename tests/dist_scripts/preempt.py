"""Preemption: train until SIGTERM/SIGUSR1 (sent by the test to one or all ranks), then finish
the step, checkpoint it, exit 0. `preempt.py OUT run|resume`."""

import json
import os
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist
from _common import build, digest, full_state, init

from prime_ckpt.config import CheckpointConfig
from prime_ckpt.preemption import PreemptionHandler
from prime_ckpt.trainer import Checkpointer, TrainerState


def main() -> None:
    out, action = Path(sys.argv[1]), sys.argv[2]
    rank, world = init()
    model, opt, sched = build(seed=0)
    state = TrainerState(model, opt, sched)
    ck = Checkpointer(out, CheckpointConfig(interval=1000, save_async=True, resume_step=-1 if action == "resume" else None))
    if action == "resume":
        step = ck.resume_step()
        ck.load(step, state)
        d = digest(full_state(model, opt))
        if rank == 0:
            print(f"resumed at step {step} digest {d}", flush=True)
        ck.close()
        dist.destroy_process_group()
        return
    preempt = PreemptionHandler()  # its own group: never the Checkpointer's (async saves use it)
    (out / "pids").mkdir(parents=True, exist_ok=True)
    (out / "pids" / f"rank_{rank}").write_text(str(os.getpid()))
    for step in range(1, 100000):
        model(torch.randn(4, 8)).sum().backward()
        opt.step()
        sched.step()
        opt.zero_grad()
        state.progress.step = step
        if step == 3:
            (out / "pids" / f"ready_{rank}").write_text("")
        if step % 5 == 0:
            ck.save(step, state)  # an async save may be in flight when the signal comes
        time.sleep(0.02)
        if preempt.should_stop():
            ck.save(step, state)
            ck.close()
            d = digest(full_state(model, opt))
            if rank == 0:
                (out / "preempted.json").write_text(json.dumps({"step": step, "digest": d}))
            print(f"rank {rank}: preempted at step {step} (signal: {preempt.signal_received})", flush=True)
            break
    preempt.close()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
