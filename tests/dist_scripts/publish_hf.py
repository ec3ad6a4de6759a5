"""Publish an FSDP2 Hugging Face Llama with WeightsPublisher; check what an inference side sees.

usage: publish_hf.py OUT sync|async float32|bfloat16 [tie]

Step 1 is published, then every parameter is changed at once (snapshot semantics: the change
must not reach step 1's files). Rank 0 loads step 1 with ``AutoModelForCausalLM.from_pretrained``
and compares every parameter bitwise with the trainer's full parameters in the export dtype;
checks file modes, the index, COMPLETE and ``verify``. Then step 2 fails on the last rank
(ENOSPC while writing its shard): every rank must get WeightsPublishError naming that rank and
step 2; step 2 has no COMPLETE, step 1 still verifies.
"""

import errno
import json
import os
import stat
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from _hf import shard, tiny_llama, tiny_tokenizer
from torch.distributed.tensor import DTensor

import prime_ckpt.redistribute as redistribute_mod
from prime_ckpt.layout import scan_weights
from prime_ckpt.publisher import WeightsPublisher, WeightsPublishError


def main() -> None:
    out, mode, dtype_name = Path(sys.argv[1]), sys.argv[2], sys.argv[3]
    tie = len(sys.argv) > 4 and sys.argv[4] == "tie"
    dist.init_process_group("gloo")
    torch.set_num_threads(1)
    rank, world = dist.get_rank(), dist.get_world_size()
    dtype = getattr(torch, dtype_name)
    model = shard(tiny_llama(seed=3, tie=tie))
    expected = {k: (v.full_tensor() if isinstance(v, DTensor) else v).detach().clone() for k, v in model.state_dict().items()}

    pub = WeightsPublisher(out, save_async=(mode == "async"), dtype=dtype, tokenizer=tiny_tokenizer(), timeout_s=60)
    rec = pub.publish(1, model)
    with torch.no_grad():  # snapshot semantics: not in step 1's files
        for p in model.parameters():
            p.add_(1.0)
    pub.wait()
    assert rec.error is None and rec.ready_s is not None, rec
    step_dir = out / "weights" / "step_1"
    if rank == 0:
        from transformers import AutoModelForCausalLM

        from prime_ckpt.manifest import verify_path

        files = sorted(p.name for p in step_dir.iterdir())
        print("files:", files, flush=True)
        shards = [f for f in files if f.startswith("model-")]
        n_owners = min(world, len(expected))
        assert len(shards) == n_owners and shards[0] == f"model-00001-of-{n_owners:05d}.safetensors", shards
        for f in ("config.json", "model.safetensors.index.json", "tokenizer.json", "manifest.json", "COMPLETE", "generation_config.json"):
            assert f in files, (f, files)
        for p in step_dir.iterdir():
            assert stat.S_IMODE(p.stat().st_mode) == 0o644, (p, oct(p.stat().st_mode))
        config = json.loads((step_dir / "config.json").read_text())
        assert config["architectures"] == ["LlamaForCausalLM"] and config["model_type"] == "llama", config
        index = json.loads((step_dir / "model.safetensors.index.json").read_text())
        loaded = AutoModelForCausalLM.from_pretrained(step_dir, dtype=dtype)
        got = loaded.state_dict()
        names = set(index["weight_map"])
        if tie:
            assert "lm_head.weight" not in names and "model.embed_tokens.weight" in names, names
        else:
            assert names == set(expected), names ^ set(expected)
        for k, v in expected.items():
            want = v.to(dtype) if v.is_floating_point() else v
            assert got[k].dtype == want.dtype and torch.equal(got[k], want), k
        from prime_ckpt.convert import open_source  # what convert / diff read
        from prime_ckpt.inspection import describe_weights_step

        src = open_source(step_dir)
        assert set(src.tensors) == names, set(src.tensors) ^ names
        for k, v in src.load(sorted(names)).items():
            assert torch.equal(v, got[k]), k
        info = describe_weights_step(step_dir)
        assert sorted(t.name for t in info.tensors) == sorted(names) and not info.problems, info.problems
        report = verify_path(out / "weights")
        print("verify:", [(r.path, r.status) for r in report], flush=True)
        assert all(r.status == "ok" for r in report), report
        print(f"rank 0: from_pretrained equals the trainer's parameters bitwise ({len(expected)} tensors, {dtype_name})", flush=True)
    dist.barrier()

    failing = world - 1
    if rank == failing:
        def no_space(path, write):
            raise OSError(errno.ENOSPC, "No space left on device", str(path))
        redistribute_mod.atomic_write_streamed = no_space  # where the shard write looks it up
    try:
        pub.publish(2, model)
        pub.close()
    except WeightsPublishError as e:
        err = e
    else:
        raise AssertionError("publish of step 2 did not fail")
    assert err.step == 2 and list(err.failures) == [failing], err.failures
    assert "No space left on device" in str(err) and "step_2" in str(err) and "\n" not in str(err), str(err)
    print(f"rank {rank}: WeightsPublishError: {err}", flush=True)
    dist.barrier()
    if rank == 0:
        assert {w.step: w.complete for w in scan_weights(out)} == {1: True, 2: False}
        assert not os.path.exists(out / "weights" / "step_2" / "COMPLETE")
        from prime_ckpt.manifest import verify_path

        assert verify_path(step_dir)[0].status == "ok"
        print("rank 0: step 2 incomplete, step 1 untouched", flush=True)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
