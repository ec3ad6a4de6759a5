"""Save (or publish) step 5 as v1, then overwrite it with v2 while the parent SIGKILLs this process
at some instant (tests/test_trainer.py::test_kill_while_overwriting_a_step_loses_nothing).

usage: overwrite_kill.py OUT {save|publish}
Prints "v1 <sha>" once v1 is complete, "overwriting <sha of v2>" just before the overwrite and
"v2 done" after it.
"""

from __future__ import annotations

import hashlib
import inspect
import sys

import torch

from prime_ckpt.config import CheckpointConfig
from prime_ckpt.publisher import WeightsPublisher
from prime_ckpt.trainer import Checkpointer, TrainerState


def sha(t: torch.Tensor) -> str:
    return hashlib.sha256(t.detach().contiguous().numpy().tobytes()).hexdigest()


def main() -> None:
    out, what = sys.argv[1], sys.argv[2]
    torch.manual_seed(0)
    model = torch.nn.Linear(1024, 1024)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    if what == "save":
        ck = Checkpointer(out, CheckpointConfig(interval=1))
        state = TrainerState(model, opt)
        ck.save(5, state)
        print("v1", sha(model.weight), flush=True)
        with torch.no_grad():
            model.weight.add_(1.0)
        print("overwriting", sha(model.weight), flush=True)
        # (a Checkpointer without the overwrite flag replaced the step in place)
        kwargs = {"overwrite": True} if "overwrite" in inspect.signature(ck.save).parameters else {}
        ck.save(5, state, **kwargs)
        ck.close()
    else:
        pub = WeightsPublisher(out, save_async=False)
        pub.publish(5, model)
        print("v1", sha(model.weight), flush=True)
        with torch.no_grad():
            model.weight.add_(1.0)
        print("overwriting", sha(model.weight), flush=True)
        pub.publish(5, model)
        pub.close()
    print("v2 done", flush=True)


if __name__ == "__main__":
    main()
