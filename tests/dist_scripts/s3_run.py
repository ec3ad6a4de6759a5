"""A 2-rank run on S3 (a moto server): train, checkpoint (sync, async thread or async process),
inference weights and orchestrator records every step, retention; then resume with
``--ckpt.resume-step -1`` semantics into fresh objects and compare bitwise.

Flags as a real trainer takes them (``prime_ckpt.config.parse_cli``)::

    s3_run.py --output-dir s3://bucket/run --storage.options '{"client_kwargs": {...}}' \\
        --ckpt.interval 1 --ckpt.keep 2 [--ckpt.save-async] [--async-mode process]

With ``--gate-dir D`` the save of step 2 stops inside every rank's DCP ``write_data`` (after the
save's planning collective, before any data is uploaded): the rank touches ``D/writing.<rank>``
and waits for ``D/go``. The test kills the S3 server in between. A failed save prints
``rank <r>: CheckpointSaveError: <message>`` and exits 3.
"""

import logging
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist
from _common import build, full_state, init
from pydantic import Field

import prime_ckpt.saving as saving_mod
from prime_ckpt.config import CheckpointConfig, CliSettings, StorageConfig, parse_cli
from prime_ckpt.layout import RUN_PARTS
from prime_ckpt.orchestrator import OrchestratorProgress, load_orchestrator_checkpoint, save_orchestrator_checkpoint
from prime_ckpt.storage import to_path
from prime_ckpt.trainer import Checkpointer, CheckpointSaveError, Progress, TrainerState
from prime_ckpt.weights import load_weights, save_weights


class Args(CliSettings):
    """Test run on object storage."""

    output_dir: str
    """Run output dir (an s3:// URL)."""

    steps: int = Field(4, ge=1)
    """Training steps."""

    async_mode: str = "thread"
    """dcp.async_save mode: thread or process."""

    gate_dir: str | None = None
    """Hold the save of step 2 inside write_data until <gate_dir>/go exists."""

    ckpt: CheckpointConfig = CheckpointConfig()
    """Checkpointing."""

    storage: StorageConfig = StorageConfig()
    """Remote storage."""


def gate_step_2(gate: Path, rank: int) -> None:
    real_factory = saving_mod.dcp_writer

    def factory(path, storage_options=None, **kwargs):
        writer = real_factory(path, storage_options, **kwargs)
        if str(path).endswith("/step_2/trainer"):
            real_write = writer.write_data

            def write_data(plan, planner):
                (gate / f"writing.{rank}").touch()
                deadline = time.monotonic() + 120
                while not (gate / "go").exists():
                    if time.monotonic() > deadline:
                        raise TimeoutError(f"{gate}/go never appeared")
                    time.sleep(0.05)
                return real_write(plan, planner)

            writer.write_data = write_data
        return writer

    saving_mod.dcp_writer = factory


def train_step(model, opt, sched) -> None:
    model(torch.randn(4, 8)).sum().backward()
    opt.step()
    sched.step()
    opt.zero_grad()


def main() -> None:
    args = parse_cli(Args, sys.argv[1:])
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("prime_ckpt").info("config: %r / %s", args, args.model_dump())
    rank, world = init()
    options = args.storage.options
    out = to_path(args.output_dir, options)
    if args.gate_dir:
        gate_step_2(Path(args.gate_dir), rank)
    model, opt, sched = build(seed=0)
    state = TrainerState(model, opt, sched, Progress())
    ck = Checkpointer(args.output_dir, args.ckpt, async_level=1, parts=RUN_PARTS, async_mode=args.async_mode,
                      storage_options=options)
    saved: dict[int, dict[str, torch.Tensor]] = {}
    try:
        for step in range(1, args.steps + 1):
            train_step(model, opt, sched)
            state.progress.step = step
            save_weights(out, step, model, {"note": "s3"})
            if ck.should_save(step):
                saved[step] = full_state(model, opt)
                if rank == 0:  # the orchestrator's record (a separate process in a real run)
                    save_orchestrator_checkpoint(out, OrchestratorProgress(step=step, total_tokens=10 * step))
                ck.save(step, state)
                print(f"rank {rank}: save of step {step} returned", flush=True)
            if step == 1:
                ck.flush()  # step 1 fully committed (and its post-commit work done) before step 2
        ck.flush()
    except CheckpointSaveError as e:
        assert len(str(e).splitlines()) == 1, str(e)
        print(f"rank {rank}: CheckpointSaveError: {e}", flush=True)
        ck.close()
        dist.destroy_process_group()
        sys.exit(3)
    ck.close()
    last = max(saved)
    print(f"rank {rank}: committed up to step {last}", flush=True)

    # Resume into fresh objects: newest complete step, bitwise.
    model2, opt2, sched2 = build(seed=123)
    state2 = TrainerState(model2, opt2, sched2)
    ck2 = Checkpointer(args.output_dir, CheckpointConfig(resume_step=-1), parts=RUN_PARTS, storage_options=options)
    step = ck2.resume_step()
    assert step == last, (step, last)
    ck2.load(step, state2)
    got = full_state(model2, opt2)
    assert set(got) == set(saved[step])
    for k, v in saved[step].items():
        assert torch.equal(got[k], v) and got[k].dtype == v.dtype, k
    assert state2.progress.step == step, state2.progress
    assert load_orchestrator_checkpoint(out, step).total_tokens == 10 * step
    if rank == 0:
        weights, config = load_weights(out / "weights" / f"step_{step}")
        assert config == {"note": "s3", "step": step}, config
        for k, v in weights.items():
            assert torch.equal(v, saved[step][f"model.{k}"]), k
    ck2.close()
    print(f"rank {rank}: s3 resume ok (step {step}, {len(got)} tensors bitwise)", flush=True)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
