"""Load/save failures that start on one rank must reach every rank, at once, with one message.

usage: load_agreement.py OUT REF

Saves step 2 at this world size (FSDP2 model, AdamW, an LR scheduler, a per-rank dataloader,
per-rank RNG) and writes the reference values to REF (rank 0): the full tensors, every rank's RNG
and dataloader state, and the param groups. Then, on every rank, each of these must raise the
same error, with the same message on every rank, within seconds (the checkpoint group's
timeout is 120 s, so a rank left waiting inside DCP would show as a hang):

* save of step 3 with ``Progress.total_tokens`` differing per rank: ProgressMismatchError,
  nothing written;
* load of a missing step 7: IncompleteCheckpointError (also a FileNotFoundError);
* load of step 2 where rank 1 alone cannot read ``.metadata`` (a stale view of shared storage):
  CheckpointLoadError naming rank 1;
* load of step 2 where rank 1's data read fails inside DCP: CheckpointLoadError naming rank 1;
* load of step 2 into a model whose keys differ (on both ranks): CheckpointLoadError.

Finally step 2 loads bitwise into fresh objects (the checkpoint group still works). Prints
``rank <r>: <case>: <ErrorType> after <t> s: <message>`` per case and exits non-zero on any
failed expectation.
"""

import errno
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist
from _common import build, full_state, init

import prime_ckpt.loading
import prime_ckpt.restore
from prime_ckpt.config import CheckpointConfig
from prime_ckpt.dcp_metadata import MetadataError
from prime_ckpt.errors import CheckpointLoadError, IncompleteCheckpointError, ProgressMismatchError
from prime_ckpt.trainer import Checkpointer, Progress, TrainerState


class Loader:
    """A per-rank resumable data position."""

    def __init__(self, pos: int) -> None:
        self.pos = pos
        self.order = torch.randperm(16, generator=torch.Generator().manual_seed(pos))

    def state_dict(self) -> dict:
        return {"pos": self.pos, "order": self.order.clone()}

    def load_state_dict(self, sd: dict) -> None:
        self.pos, self.order = int(sd["pos"]), sd["order"].clone()


def say(rank: int, world: int, text: str) -> None:
    """Print one line per rank, rank by rank, each in one write: the ranks share the output
    pipe, and unbuffered ``print`` writes the text and the newline separately (lines would mix)."""
    for r in range(world):
        if r == rank:
            sys.stdout.write(text + "\n")
            sys.stdout.flush()
        dist.barrier()


def expect_error(rank: int, world: int, case: str, exc_type: type, fn) -> BaseException:
    t0 = time.monotonic()
    try:
        fn()
    except exc_type as e:
        err = e
    else:
        raise AssertionError(f"{case}: no {exc_type.__name__}")
    elapsed = time.monotonic() - t0
    messages: list = [None] * world
    dist.all_gather_object(messages, str(err))
    assert len(set(messages)) == 1, messages
    assert "\n" not in str(err), str(err)
    say(rank, world, f"rank {rank}: {case}: {type(err).__name__} after {elapsed:.1f} s: {err}")
    return err


def main() -> None:
    out, ref_path = sys.argv[1], sys.argv[2]
    rank, world = init()
    model, opt, sched = build(seed=0)
    for _ in range(2):
        model(torch.randn(4, 8)).sum().backward()
        opt.step()
        sched.step()
        opt.zero_grad()
    torch.manual_seed(700 + rank)
    loader = Loader(pos=10 * rank + 3)
    state = TrainerState(model, opt, sched, Progress(step=2, total_samples=8, total_tokens=100), dataloader=loader)
    ck = Checkpointer(out, CheckpointConfig(interval=1), timeout_s=120)
    expected = full_state(model, opt)
    rank_state: list = [None] * world
    dist.all_gather_object(rank_state, {"rng": torch.get_rng_state(), "loader": loader.state_dict()})
    ck.save(2, state)
    ck.flush()
    if rank == 0:
        groups = [{k: v for k, v in g.items() if k != "params"} for g in opt.param_groups]
        torch.save({"tensors": expected, "rank_state": rank_state, "param_groups": groups}, ref_path)
    trainer_dir = ck.layout.trainer_dir(2)

    # 13a: per-rank progress at save
    state.progress.total_tokens = 100 + rank
    err = expect_error(rank, world, "progress", ProgressMismatchError, lambda: ck.save(3, state))
    assert err.field == "total_tokens" and err.values == {r: 100 + r for r in range(world)}, (err.field, err.values)
    assert not (Path(out) / "checkpoints" / "step_3").exists()
    state.progress.total_tokens = 100

    # 12: a missing step, decided by rank 0
    err = expect_error(rank, world, "missing", IncompleteCheckpointError, lambda: ck.load(7, state))
    assert isinstance(err, FileNotFoundError) and isinstance(err, CheckpointLoadError)

    # 12: rank 1 alone cannot read .metadata
    real_read = prime_ckpt.restore.read_dcp_metadata
    if rank == 1:
        def stale(path, **kw):
            raise MetadataError(f"{path}/.metadata: cannot read (Stale file handle)")
        prime_ckpt.restore.read_dcp_metadata = stale
    err = expect_error(rank, world, "metadata", CheckpointLoadError, lambda: ck.load(2, state))
    assert err.failures == {1: f"MetadataError: {trainer_dir}/.metadata: cannot read (Stale file handle)"}, err.failures
    assert isinstance(err.__cause__, MetadataError) == (rank == 1), repr(err.__cause__)
    prime_ckpt.restore.read_dcp_metadata = real_read

    # 12: rank 1's data read fails inside DCP
    real_read_data = prime_ckpt.loading.DirectReadMixin.read_data
    if rank == 1:
        def eio(self, plan, planner):
            raise OSError(errno.EIO, "Input/output error")
        prime_ckpt.loading.DirectReadMixin.read_data = eio
    err = expect_error(rank, world, "read", CheckpointLoadError, lambda: ck.load(2, state))
    # the failing rank's error is chained to DCP's; the others read their part and learn of it
    # from the exchange after the read
    assert type(err.__cause__).__name__ == ("CheckpointException" if rank == 1 else "NoneType"), repr(err.__cause__)
    prime_ckpt.loading.DirectReadMixin.read_data = real_read_data

    # 11: keys differ on every rank (a plain, differently named model)
    other = torch.nn.Linear(8, 4)
    expect_error(rank, world, "keys", CheckpointLoadError, lambda: ck.load(2, TrainerState(other, torch.optim.AdamW(other.parameters()))))

    # the group still works: a full load into fresh objects, bitwise
    model2, opt2, sched2 = build(seed=123)
    loader2 = Loader(pos=99)
    state2 = TrainerState(model2, opt2, sched2, dataloader=loader2)
    ck.load(2, state2)
    got = full_state(model2, opt2)
    assert set(got) == set(expected) and all(torch.equal(got[k], v) for k, v in expected.items())
    assert torch.equal(torch.get_rng_state(), rank_state[rank]["rng"])
    assert loader2.pos == 10 * rank + 3 and torch.equal(loader2.order, loader.order)
    assert state2.progress == Progress(step=2, total_samples=8, total_tokens=100), state2.progress
    ck.close()
    say(rank, world, f"rank {rank}: step 2 loads bitwise after the failures")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
