"""Run directories shared by the CLI command tests (test_cli_commands, test_manifest,
test_convert, test_compare, test_cli_bad_input); each is made once per test session.

* :func:`two_rank_run`: ``cli2_make_run.py`` under torchrun (2 gloo ranks, FSDP2), see there.
* :func:`one_proc_run`: a 1-process run made in-process with the real ``Checkpointer``:
  ``checkpoints/step_2`` and ``step_4`` (trainer + orchestrator + manifest; the model's second
  layer is bf16), ``weights/step_4``.

Tests that change files copy the run first (:func:`copy_run`). :func:`snapshot` records names,
sizes, mtimes and content hashes to prove a command changed nothing.
"""

from __future__ import annotations

import hashlib
import os
import shutil
from pathlib import Path

import torch

_CACHE: dict[str, object] = {}

#: Model of the 2-rank run (``_common.build``): name -> shape, all float32.
TWO_RANK_MODEL = {"0.weight": [33, 8], "0.bias": [33], "3.weight": [4, 33], "3.bias": [4]}


def two_rank_run(run_ranks, tmp_path_factory) -> tuple[Path, Path]:
    """``(output_dir, reference_dir)`` of the 2-rank run (see ``cli2_make_run.py``)."""
    if "two" not in _CACHE:
        base = tmp_path_factory.mktemp("cli2_two_rank")
        run_ranks("cli2_make_run.py", str(base / "run"), str(base / "ref"), nproc=2, timeout=150)
        _CACHE["two"] = (base / "run", base / "ref")
    return _CACHE["two"]  # type: ignore[return-value]


def one_proc_run(tmp_path_factory) -> tuple[Path, dict[str, torch.Tensor]]:
    """``(output_dir, model state dict at step 4)`` of the in-process 1-rank run."""
    if "one" not in _CACHE:
        from prime_ckpt.config import CheckpointConfig
        from prime_ckpt.layout import RunLayout
        from prime_ckpt.manifest import write_manifest
        from prime_ckpt.orchestrator import (
            OrchestratorProgress,
            save_orchestrator_checkpoint,
        )
        from prime_ckpt.trainer import Checkpointer, Progress, TrainerState
        from prime_ckpt.weights import write_weights

        out = tmp_path_factory.mktemp("cli2_one_proc") / "run"
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(5, 8), torch.nn.Linear(8, 2, bias=False))
        model[1].to(torch.bfloat16)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
        ckpt = Checkpointer(out, CheckpointConfig(interval=2))
        for step in range(1, 5):
            model[1](model[0](torch.randn(3, 5)).bfloat16()).float().sum().backward()
            opt.step()
            opt.zero_grad()
            if step % 2 == 0:
                ckpt.save(step, TrainerState(model, opt, None, Progress(step, 3 * step, 30 * step)))
                ckpt.flush()  # the Checkpointer's own manifest is written: ours below comes last
                save_orchestrator_checkpoint(out, OrchestratorProgress(step=step, total_tokens=30 * step, total_samples=3 * step))
                write_manifest(RunLayout(out).step_dir(step))
        ckpt.close()
        sd = {k: v.detach().clone() for k, v in model.state_dict().items()}
        write_weights(RunLayout(out).weights_step_dir(4), sd, {"step": 4})
        write_manifest(RunLayout(out).weights_step_dir(4))
        _CACHE["one"] = (out, sd)
    return _CACHE["one"]  # type: ignore[return-value]


def copy_run(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst, symlinks=True)
    return dst


def snapshot(root: Path) -> dict[str, tuple]:
    """``{relative path: (kind, size, mtime_ns, sha256)}`` of everything under ``root``."""
    snap: dict[str, tuple] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            p = Path(dirpath) / name
            st = p.lstat()
            digest = hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else ""
            snap[str(p.relative_to(root))] = ("d" if p.is_dir() else "f", st.st_size if p.is_file() else 0, st.st_mtime_ns, digest)
    return snap
