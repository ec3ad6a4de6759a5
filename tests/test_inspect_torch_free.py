"""The read-only CLI commands run without importing torch, and print what the torch path prints.

``prime-ckpt inspect`` / ``list`` / ``verify`` / ``plan`` read ``.metadata`` into torch-free
stand-ins (:mod:`prime_ckpt.dcp_metadata`), ``orchestrator.pt`` with a restricted zip+pickle
reader (:mod:`prime_ckpt.orchestrator`) and safetensors headers with ``framework="numpy"``.
Each check runs the CLI in a fresh interpreter twice over the same real checkpoints: once with
an import hook that refuses (and records) any ``torch`` import, once with DCP imported first (so
``.metadata`` is read into torch's own classes), and compares exit codes, stdout and stderr.
No test here asserts a timing.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
import torch.distributed.checkpoint as dcp
from safetensors.torch import save_file

from prime_ckpt.inspection import describe_weights_step
from prime_ckpt.orchestrator import OrchestratorProgress, save_orchestrator_checkpoint

ROOT = Path(__file__).resolve().parent.parent

# Runs prime_ckpt.cli.main over several argv lists in one fresh interpreter; prints JSON with
# each command's exit code / stdout / stderr, the torch imports attempted, and the torch
# modules loaded at the end. Mode "free": any torch import raises (and is recorded); mode
# "torch": torch.distributed.checkpoint is imported first (the torch-backed path).
_RUNNER = r"""
import contextlib, io, json, sys

mode, commands = sys.argv[1], json.loads(sys.argv[2])
attempts = []

class BlockTorch:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] == "torch":
            attempts.append(name)
            raise ImportError(f"torch import blocked by the test: {name}")
        return None

if mode == "torch":
    import torch.distributed.checkpoint
else:
    sys.meta_path.insert(0, BlockTorch())

from prime_ckpt.cli import main

results = []
for argv in commands:
    out, err = io.StringIO(), io.StringIO()
    code = 0
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            main(argv)
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    results.append({"argv": argv, "code": code, "stdout": out.getvalue(), "stderr": err.getvalue()})
torch_modules = sorted(m for m in sys.modules if m.split(".")[0] == "torch")
print(json.dumps({"results": results, "attempts": attempts, "torch_modules": torch_modules}))
"""


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    env["COLUMNS"] = "160"  # the same table width in both runs
    env.pop("PYTHONPROFILEIMPORTTIME", None)
    return env


def _run_cli(mode: str, commands: list[list[str]]) -> dict:
    proc = subprocess.run(
        [sys.executable, "-c", _RUNNER, mode, json.dumps(commands)],
        capture_output=True, text=True, env=_env(), cwd=ROOT, timeout=240,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def _two_rank_cache():
    return {}


@pytest.fixture
def two_rank(run_ranks, _two_rank_cache, tmp_path_factory) -> Path:
    """A real 2-rank FSDP2 run (dist_scripts/cli_make_checkpoint.py): checkpoints/step_3
    (trainer + orchestrator), step_6 (trainer only), weights/step_3."""
    if "out" not in _two_rank_cache:
        out = tmp_path_factory.mktemp("tf_two_rank") / "run"
        run_ranks("cli_make_checkpoint.py", str(out), nproc=2, timeout=180)
        _two_rank_cache["out"] = out
    return _two_rank_cache["out"]


@pytest.fixture(scope="module")
def dtypes_run(tmp_path_factory) -> Path:
    """A 1-process run with several dtypes: checkpoints/step_1 (dcp.save + orchestrator.pt)
    and weights/step_1 (safetensors written by torch)."""
    out = tmp_path_factory.mktemp("tf_dtypes") / "run"
    sd = {
        "app": {
            "model": {
                "w": torch.randn(4, 3),
                "h": torch.ones(5, dtype=torch.bfloat16),
                "f16": torch.ones(2, 2, dtype=torch.float16),
                "d": torch.ones(3, dtype=torch.float64),
                "n": torch.arange(6, dtype=torch.int64).reshape(2, 3),
                "b": torch.zeros(2, dtype=torch.uint8),
                "m": torch.zeros(2, dtype=torch.bool),
                "e": torch.empty(0, 7),
            },
            "progress": {"step": 1, "name": "x", "lrs": [0.1, 0.2]},
        }
    }
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dcp.save(sd, checkpoint_id=str(out / "checkpoints" / "step_1" / "trainer"), no_dist=True)
    save_orchestrator_checkpoint(out, OrchestratorProgress(step=1, total_tokens=9, total_samples=3, extra={"k": [1, 2.5, None, True]}))
    wdir = out / "weights" / "step_1"
    wdir.mkdir(parents=True)
    save_file(_weights_tensors(), str(wdir / "model.safetensors"))
    (wdir / "config.json").write_text(json.dumps({"hidden": 3}))
    (wdir / "COMPLETE").write_text("")
    return out


def _weights_tensors() -> dict[str, torch.Tensor]:
    return {
        "a.f32": torch.randn(3, 4),
        "a.bf16": torch.randn(5).bfloat16(),
        "a.f16": torch.randn(2, 2).half(),
        "b.i64": torch.arange(4),
        "b.u8": torch.zeros(3, dtype=torch.uint8),
        "c.f8": torch.zeros(6).to(torch.float8_e4m3fn),
        "c.bool": torch.zeros(2, dtype=torch.bool),
    }


def _commands(run: Path, dtypes: Path) -> list[list[str]]:
    c3 = str(run / "checkpoints" / "step_3")
    return [
        ["--help"],
        ["inspect", "--help"],
        ["inspect", c3],
        ["inspect", c3, "--json"],
        ["inspect", str(run / "checkpoints" / "step_6")],
        ["inspect", c3 + "/trainer", "--filter", "app.model.*"],
        ["inspect", str(run / "weights" / "step_3")],
        ["inspect", str(run / "weights" / "step_3"), "--json"],
        ["inspect", str(run), "--json"],
        ["inspect", str(run)],
        ["list", str(run)],
        ["list", str(run), "--json", "--keep", "1", "--async-level", "1"],
        ["verify", str(run), "--json", "--allow-missing-manifest"],
        ["verify", c3],
        ["plan", str(run), "--keep", "1"],
        ["plan", str(run), "--keep", "1", "--json"],
        ["inspect", str(dtypes / "checkpoints" / "step_1"), "--json"],
        ["inspect", str(dtypes / "checkpoints" / "step_1")],
        ["inspect", str(dtypes / "weights" / "step_1"), "--json"],
        ["list", str(dtypes), "--json"],
        ["verify", str(dtypes), "--allow-missing-manifest"],
        ["inspect", str(run / "checkpoints" / "nope")],  # an error: exit 2, one line on stderr
    ]


def test_read_only_commands_never_import_torch_and_match_the_torch_path(two_rank, dtypes_run):
    commands = _commands(two_rank, dtypes_run)
    free = _run_cli("free", commands)
    backed = _run_cli("torch", commands)
    assert free["attempts"] == [], f"torch import attempted: {free['attempts']}"
    assert free["torch_modules"] == []
    assert "torch.distributed.checkpoint.metadata" in backed["torch_modules"]  # really the torch path
    for a, b in zip(free["results"], backed["results"], strict=True):
        assert a == b, a["argv"]
    codes = {tuple(r["argv"]): r["code"] for r in free["results"]}
    assert codes[("verify", str(two_rank), "--json", "--allow-missing-manifest")] == 1  # step_6 incomplete
    assert codes[("inspect", str(two_rank / "checkpoints" / "nope"))] == 2
    assert sum(code == 0 for code in codes.values()) == len(commands) - 2

    by_argv = {tuple(r["argv"]): r for r in free["results"]}
    step = json.loads(by_argv[("inspect", str(two_rank / "checkpoints" / "step_3"), "--json")]["stdout"])
    assert step["complete"] and step["orchestrator"]["total_tokens"] == 300
    rows = {t["name"]: t for t in step["trainer"]["tensors"]}
    assert rows["app.model.0.weight"] == {"name": "app.model.0.weight", "shape": [16, 7], "dtype": "float32", "bytes": 448, "chunks": 2, "sharded": True}
    d = json.loads(by_argv[("inspect", str(dtypes_run / "checkpoints" / "step_1"), "--json")]["stdout"])
    got = {t["name"]: (t["dtype"], t["bytes"], t["sharded"]) for t in d["trainer"]["tensors"]}
    assert got["app.model.h"] == ("bfloat16", 10, False) and got["app.model.n"] == ("int64", 48, False)
    assert d["orchestrator"]["extra"] == {"k": [1, 2.5, None, True]}
    assert {b["name"] for b in d["trainer"]["non_tensors"]} == {"app.progress.step", "app.progress.name", "app.progress.lrs"}


def test_console_script_inspect_imports_no_torch(two_rank):
    """The installed ``prime-ckpt`` entry point itself, with Python's import-time log."""
    exe = shutil.which("prime-ckpt", path=str(Path(sys.executable).parent))
    if exe is None:
        pytest.skip("prime-ckpt console script not installed next to this interpreter")
    env = {**_env(), "PYTHONPROFILEIMPORTTIME": "1"}
    proc = subprocess.run([exe, "inspect", str(two_rank / "checkpoints" / "step_3")], capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "app.model.0.weight" in proc.stdout
    imported = [line.rsplit("|", 1)[-1].strip() for line in proc.stderr.splitlines() if line.startswith("import time:")]
    assert "prime_ckpt.inspection" in imported
    assert not [m for m in imported if m.split(".")[0] == "torch"]


def test_weights_header_dtypes_match_torch(dtypes_run):
    """safetensors read with framework="numpy": the same names, shapes, dtypes and bytes as the
    tensors torch wrote."""
    info = describe_weights_step(dtypes_run / "weights" / "step_1")
    expected = {
        name: (list(t.shape), str(t.dtype).removeprefix("torch."), t.numel() * t.element_size())
        for name, t in _weights_tensors().items()
    }
    assert [t.name for t in info.tensors] == sorted(expected)
    assert {t.name: (t.shape, t.dtype, t.bytes) for t in info.tensors} == expected
    assert info.total_bytes == sum(b for _, _, b in expected.values())


def test_the_library_never_imports_wandb():
    """#17: wandb is the example's dependency (the `hf` extra), not the library's: importing
    every prime_ckpt module leaves it unimported."""
    import pkgutil

    import prime_ckpt

    names = [f"prime_ckpt.{m.name}" for m in pkgutil.iter_modules(prime_ckpt.__path__)]
    code = f"import importlib, sys\nfor n in {names!r}: importlib.import_module(n)\nprint('wandb' in sys.modules)"
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parent.parent)}
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=180)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == ["False"] and len(names) > 15


def test_the_public_facade_is_lazy_and_complete():
    """#17: `prime_ckpt` exports its public API in __all__; importing the package imports no torch
    (the CLI's read-only commands stay fast); every exported name resolves to its module's object."""
    code = "import sys, prime_ckpt\nprint(any(m == 'torch' or m.startswith('torch.') for m in sys.modules))"
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parent.parent)}
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 0 and proc.stdout.split() == ["False"], proc.stderr
    import importlib

    import prime_ckpt

    assert "Checkpointer" in prime_ckpt.__all__ and "PrimeCkptError" in prime_ckpt.__all__
    for name in prime_ckpt.__all__:
        assert getattr(prime_ckpt, name) is getattr(importlib.import_module(prime_ckpt._EXPORTS[name]), name), name
    with pytest.raises(AttributeError):
        prime_ckpt.NoSuchName  # noqa: B018
