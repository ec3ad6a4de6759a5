"""A tiny 2-rank training run that uses every RNG (dropout, Python random, NumPy) and a shuffling
per-rank dataloader, so that a resume only matches an uninterrupted run if all of that state is
restored per rank.

usage: train_tiny.py OUT RESULT_JSON --steps N [--save-every K] [--async] [--resume-step S]
"""

import argparse
import json
import random

import numpy as np
import torch
import torch.distributed as dist
from _common import build, digest, full_state, init

from prime_ckpt.config import CheckpointConfig
from prime_ckpt.trainer import Checkpointer, TrainerState


class ShuffledLoader:
    """Per-rank epoch-shuffled batches of a fixed dataset; resumable (Stateful)."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor, batch: int, seed: int) -> None:
        self.x, self.y, self.batch = x, y, batch
        self.gen = torch.Generator().manual_seed(seed)
        self.epoch, self.pos = 0, 0
        self.perm = torch.randperm(len(x), generator=self.gen)

    def next(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self.pos + self.batch > len(self.x):
            self.epoch, self.pos = self.epoch + 1, 0
            self.perm = torch.randperm(len(self.x), generator=self.gen)
        idx = self.perm[self.pos : self.pos + self.batch]
        self.pos += self.batch
        return self.x[idx], self.y[idx]

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "pos": self.pos, "perm": self.perm.clone(), "gen": self.gen.get_state()}

    def load_state_dict(self, sd: dict) -> None:
        self.epoch, self.pos = int(sd["epoch"]), int(sd["pos"])
        self.perm = sd["perm"].clone()
        self.gen.set_state(sd["gen"])


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("out")
    p.add_argument("result")
    p.add_argument("--steps", type=int, required=True)
    p.add_argument("--save-every", type=int, default=0)
    p.add_argument("--async", dest="save_async", action="store_true")
    p.add_argument("--resume-step", type=int, default=None)
    a = p.parse_args()

    rank, world = init()
    model, opt, sched = build(seed=0, dropout=0.3)
    data = torch.Generator().manual_seed(7)
    x = torch.randn(40, 8, generator=data)
    y = torch.randn(40, 4, generator=data)
    loader = ShuffledLoader(x, y, batch=6, seed=100 + rank)
    torch.manual_seed(1000 + rank)
    random.seed(2000 + rank)
    np.random.seed(3000 + rank)

    state = TrainerState(model, opt, sched, dataloader=loader)
    cfg = CheckpointConfig(interval=max(a.save_every, 1), save_async=a.save_async, resume_step=a.resume_step)
    ck = Checkpointer(a.out, cfg)
    start = ck.resume_step()
    if start is not None:
        ck.load(start, state)
    losses = {}
    for step in range((start or 0) + 1, a.steps + 1):
        xb, yb = loader.next()
        noise = random.random() * 0.01 + float(np.random.rand()) * 0.01
        loss = torch.nn.functional.mse_loss(model(xb + noise), yb)
        loss.backward()
        opt.step()
        sched.step()
        opt.zero_grad()
        state.progress.step = step
        state.progress.total_samples += xb.shape[0] * world
        reduced = loss.detach().clone()
        dist.all_reduce(reduced)
        losses[step] = reduced.item() / world
        if a.save_every and ck.should_save(step):
            ck.save(step, state)
    ck.close()
    final = digest(full_state(model, opt))
    if rank == 0:
        with open(a.result, "w") as f:
            json.dump({"start": start, "losses": losses, "final": final, "progress": vars(state.progress)}, f)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
