"""One torchrun of series 4 (run by :mod:`reshard_series`, never imported by it):

* ``save OUT SIZE``: an FSDP2 MLP + AdamW state of about SIZE bytes (``ckpt_bench.model``), saved
  as step 1 of the run in OUT by this project's ``Checkpointer`` (sync) at this world size;
* ``load OUT SIZE RESULT REPS``: the same model built afresh at this world size (other values),
  ``Checkpointer.load`` of step 1 timed REPS times (barrier before and after, the slowest rank's
  time), checked against the saved values' sums; rank 0 writes ``{"load_s": [...]}`` to RESULT.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

BENCH = Path(__file__).resolve().parents[2]  # benchmarks/
for _p in (str(BENCH.parent), str(BENCH)):
    if _p not in sys.path:
        sys.path.insert(0, _p)


def checksum(model) -> float:
    """Sum of every parameter's full value (collective)."""
    import torch
    from torch.distributed.tensor import DTensor

    total = torch.zeros((), dtype=torch.float64)
    for p in model.parameters():
        t = p.full_tensor() if isinstance(p, DTensor) else p
        total += t.detach().double().sum()
    return float(total)


def main() -> None:
    import torch
    import torch.distributed as dist

    from ckpt_bench.model import build_state
    from prime_ckpt.config import CheckpointConfig
    from prime_ckpt.trainer import Checkpointer, TrainerState

    action, out, size = sys.argv[1], sys.argv[2], int(sys.argv[3])
    dist.init_process_group("gloo")
    torch.set_num_threads(1)
    rank = dist.get_rank()
    if action == "save":
        model, opt = build_state(size, seed=0)
        ck = Checkpointer(out, CheckpointConfig(interval=1, save_async=False))
        ck.save(1, TrainerState(model, opt))
        ck.close()
        total = checksum(model)
        if rank == 0:
            Path(out, "expected.json").write_text(json.dumps({"sum": total}))
    else:
        result, reps = sys.argv[4], int(sys.argv[5])
        model, opt = build_state(size, seed=1)
        state = TrainerState(model, opt)
        ck = Checkpointer(out, CheckpointConfig(), enter=False)
        times = []
        for _ in range(reps):
            dist.barrier()
            t0 = time.perf_counter()
            ck.load(1, state, unused_rank_state="ignore")
            dt = torch.tensor(time.perf_counter() - t0, dtype=torch.float64)
            dist.all_reduce(dt, op=dist.ReduceOp.MAX)
            times.append(float(dt))
        ck.close()
        got = checksum(model)
        want = json.loads(Path(out, "expected.json").read_text())["sum"]
        assert abs(got - want) <= 1e-6 * max(1.0, abs(want)), (got, want)
        if rank == 0:
            Path(result).write_text(json.dumps({"load_s": times}))
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
