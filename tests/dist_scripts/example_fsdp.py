"""The reverse-text example's policy under the trainer's FSDP2 setup
(:func:`examples.reverse_text.model.shard_model`): one policy-gradient forward/backward on each
rank's rows with every warning recorded, and the gradients compared with the same step on an
unsharded copy over the whole batch.

Then the same with a probe that makes the root module return a view (``lm_head`` with a bias:
``F.linear`` of a 3-D input then returns a view of its 2-D result), to show the recording sees
FSDP2's "returned a view tensor" warning when there is one.

Rank 0 prints one line ``RESULT {json}``: ``{"example": [warning, ...], "probe": [...],
"max_grad_diff": float}``; warnings of every rank, as ``"rank r: Category: message"``.
"""

import gc
import json
import warnings

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh

from examples.reverse_text.model import ModelConfig, build_model, completion_logprobs, left_pad, right_pad, shard_model
from examples.reverse_text.task import EOS, encode, prompt_tokens, sample_problems


def batch(n: int = 8):
    """Prompts and their correct completions (the warm start's batch shape)."""
    problems = sample_problems(n, torch.Generator().manual_seed(0), 3, 6)
    prompt, prompt_mask = left_pad([prompt_tokens(s) for s in problems])
    targets = [encode(s[::-1]) + [EOS] for s in problems]
    completion, completion_mask = right_pad(targets, max(map(len, targets)))
    return prompt, prompt_mask, completion, completion_mask


def sharded_step(model: torch.nn.Module, mesh, rank: int, world: int) -> list[str]:
    """Shard ``model`` as the trainer does and run one step on this rank's rows; the warnings."""
    rows = slice(rank, None, world)
    tensors = [t[rows] for t in batch()]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        shard_model(model, mesh)
        lp = completion_logprobs(model, *tensors)
        (lp.sum() * world).backward()  # FSDP averages over ranks: the whole batch's sum
    return [f"rank {rank}: {w.category.__name__}: {w.message}" for w in caught]


def main() -> None:
    dist.init_process_group("gloo")
    torch.set_num_threads(1)
    rank, world = dist.get_rank(), dist.get_world_size()
    cfg = ModelConfig(max_seq_len=16)  # examples/configs/reverse_text/train.toml's shape
    mesh = init_device_mesh("cpu", (world,))

    reference = build_model(cfg, seed=0)
    completion_logprobs(reference, *batch()).sum().backward()
    model = build_model(cfg, seed=0)
    example = sharded_step(model, mesh, rank, world)
    diff = max(
        (p.grad.full_tensor() - q.grad).abs().max().item()
        for p, q in zip(model.parameters(), reference.parameters())
    )

    probe_model = build_model(cfg, seed=0)
    head = probe_model.lm_head
    probe_model.lm_head = torch.nn.Linear(head.in_features, head.out_features, bias=True)
    probe = sharded_step(probe_model, mesh, rank, world)

    found = [None] * world
    dist.all_gather_object(found, (example, probe))
    if rank == 0:
        result = {"example": [w for e, _ in found for w in e], "probe": [w for _, p in found for w in p], "max_grad_diff": diff}
        print("RESULT " + json.dumps(result), flush=True)
    # Free the sharded models (with their gradients) before the group goes: left to interpreter
    # exit, after destroy_process_group, about 1 run in 4 aborted there ("terminate called
    # without an active exception").
    del model, probe_model
    gc.collect()
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
