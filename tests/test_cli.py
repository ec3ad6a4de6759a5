"""prime_ckpt.cli (``prime-ckpt inspect``) over real checkpoints written by the real library."""

from __future__ import annotations

import json
import os
import pickle
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from prime_ckpt.cli import app, main
from prime_ckpt.config import CheckpointConfig
from prime_ckpt.orchestrator import OrchestratorProgress, save_orchestrator_checkpoint
from prime_ckpt.trainer import Checkpointer, Progress, TrainerState

ROOT = Path(__file__).resolve().parent.parent
runner = CliRunner()

# The 2-rank model of dist_scripts/cli_make_checkpoint.py: Linear(7, 16) -> Linear(16, 3), fp32.
TWO_RANK_MODEL = {"0.weight": [16, 7], "0.bias": [16], "1.weight": [3, 16], "1.bias": [3]}


def _numel(shape) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


def _tensor_bytes(obj) -> int:
    if isinstance(obj, torch.Tensor):
        return obj.numel() * obj.element_size()
    if isinstance(obj, dict):
        return sum(_tensor_bytes(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(_tensor_bytes(v) for v in obj)
    return 0


@pytest.fixture(scope="module")
def one_proc(tmp_path_factory):
    """A 1-process run: checkpoint step 2 (trainer + orchestrator), saved by Checkpointer."""
    out = tmp_path_factory.mktemp("one_proc") / "run"
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(5, 8), torch.nn.Linear(8, 2, bias=False))
    model[1].to(torch.bfloat16)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for _ in range(2):
        model[1](model[0](torch.randn(3, 5)).bfloat16()).float().sum().backward()
        opt.step()
        opt.zero_grad()
    ckpt = Checkpointer(out, CheckpointConfig(interval=1))
    ckpt.save(2, TrainerState(model, opt, None, Progress(2, 6, 60)))
    ckpt.close()
    save_orchestrator_checkpoint(out, OrchestratorProgress(step=2, total_tokens=60, total_samples=6, total_problems=2))
    (out / "checkpoints" / "notes").mkdir()  # not ours: ignored, never a step
    (out / "checkpoints" / "step_010").mkdir()
    expected = {
        "model": {k: (list(v.shape), str(v.dtype).removeprefix("torch.")) for k, v in model.state_dict().items()},
        "model_bytes": _tensor_bytes(model.state_dict()),
        "optimizer_state_bytes": _tensor_bytes(opt.state_dict()["state"]),
    }
    return out, expected


@pytest.fixture(scope="module")
def _two_rank_cache():
    return {}


@pytest.fixture
def two_rank(run_ranks, _two_rank_cache, tmp_path_factory):
    """A 2-rank FSDP2 run (made once per module): step 3 complete, step 6 trainer only,
    weights/step_3."""
    if "out" not in _two_rank_cache:
        out = tmp_path_factory.mktemp("two_rank") / "run"
        run_ranks("cli_make_checkpoint.py", str(out), nproc=2, timeout=120)
        _two_rank_cache["out"] = out
    return _two_rank_cache["out"]


def _inspect_json(*args: str) -> dict:
    result = runner.invoke(app, ["inspect", *args, "--json"])
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


def _by_name(rows) -> dict:
    return {r["name"]: r for r in rows}


def test_inspect_one_process_step(one_proc):
    out, exp = one_proc
    d = _inspect_json(str(out / "checkpoints" / "step_2"))
    assert d["schema"] == "prime-ckpt.inspect/1" and d["kind"] == "checkpoint_step"
    assert d["step"] == 2 and d["complete"] is True
    assert d["parts"] == {"trainer": True, "orchestrator": True}
    assert d["orchestrator"] == {"step": 2, "total_tokens": 60, "total_samples": 6, "total_problems": 2, "extra": {}}
    assert d["save_info"]["step"] == 2 and d["save_info"]["mode"] == "sync" and d["save_info"]["world_size"] == 1
    tr = d["trainer"]
    assert tr["complete"] is True and tr["world_size"] == 1
    assert [f["name"] for f in tr["storage_files"]] == ["__0_0.distcp"] and tr["storage_files"][0]["exists"]
    tensors = _by_name(tr["tensors"])
    for name, (shape, dtype) in exp["model"].items():
        row = tensors[f"app.model.{name}"]
        assert (row["shape"], row["dtype"]) == (shape, dtype)
        assert row["bytes"] == _numel(shape) * torch.empty(0, dtype=getattr(torch, dtype)).element_size()
        assert row["chunks"] == 1 and row["sharded"] is False
    assert tensors["app.model.1.weight"]["dtype"] == "bfloat16"
    assert tensors["app.optimizer.state.0.weight.exp_avg"]["shape"] == [8, 5]
    assert tr["totals"]["app.model"]["bytes"] == exp["model_bytes"]
    assert tr["totals"]["app.optimizer"]["bytes"] == exp["optimizer_state_bytes"]
    assert tr["total_bytes"] == sum(t["bytes"] for t in tr["tensors"])
    assert {"app.progress.step", "app.progress.total_tokens"} <= set(_by_name(tr["non_tensors"]))
    assert d["problems"] == []


def test_inspect_two_rank_fsdp_step(two_rank):
    d = _inspect_json(str(two_rank / "checkpoints" / "step_3"))
    assert d["step"] == 3 and d["complete"] is True and d["parts"] == {"trainer": True, "orchestrator": True}
    assert d["orchestrator"]["total_tokens"] == 300 and d["orchestrator"]["total_samples"] == 12
    assert d["save_info"]["world_size"] == 2 and d["save_info"]["async_level"] == 1  # recorded for plan/prune
    tr = d["trainer"]
    assert tr["world_size"] == 2
    assert sorted((f["name"], f["rank"]) for f in tr["storage_files"]) == [("__0_0.distcp", 0), ("__1_0.distcp", 1)]
    tensors = _by_name(tr["tensors"])
    for name, shape in TWO_RANK_MODEL.items():
        for fqn in (f"app.model.{name}", f"app.optimizer.state.{name}.exp_avg", f"app.optimizer.state.{name}.exp_avg_sq"):
            row = tensors[fqn]
            assert row["shape"] == shape and row["dtype"] == "float32", fqn
            assert row["bytes"] == _numel(shape) * 4
            assert row["chunks"] == 2 and row["sharded"] is True, fqn
        assert tensors[f"app.optimizer.state.{name}.step"]["shape"] == []
    model_bytes = sum(_numel(s) * 4 for s in TWO_RANK_MODEL.values())
    assert tr["totals"]["app.model"] == {"tensors": 4, "bytes": model_bytes, "sharded": 4, "non_tensors": 0}
    assert tr["totals"]["app.optimizer"]["bytes"] == 2 * model_bytes + 4 * 4  # exp_avg(_sq) + fp32 steps
    # per-rank state is keyed per rank: both ranks' RNG state is in the checkpoint
    assert "app.rank_state.rank_0.rng.torch_cpu" in tensors and "app.rank_state.rank_1.rng.torch_cpu" in tensors


def test_inspect_text_output(two_rank):
    result = runner.invoke(app, ["inspect", str(two_rank / "checkpoints" / "step_3")])
    assert result.exit_code == 0, result.output
    text = result.stdout
    assert "step 3" in text and "world size at save: 2" in text
    assert "app.model.0.weight" in text and "[16, 7]" in text and "float32" in text and "2 (sharded)" in text
    assert "app.optimizer" in text and "app.progress.step" in text


def test_inspect_listings(two_rank):
    d = _inspect_json(str(two_rank))
    assert d["kind"] == "run"
    steps = {s["step"]: s for s in d["checkpoints"]}
    assert sorted(steps) == [3, 6]
    assert steps[3]["complete"] is True
    assert steps[6]["complete"] is False and steps[6]["parts"] == {"trainer": True, "orchestrator": False}
    assert d["latest_complete_step"] == 3
    assert d["weights"] == [{"step": 3, "path": str(two_rank / "weights" / "step_3"), "complete": True}]
    c = _inspect_json(str(two_rank / "checkpoints"))
    assert c["kind"] == "checkpoints" and c["checkpoints"] == d["checkpoints"] and c["weights"] is None
    text = runner.invoke(app, ["inspect", str(two_rank)]).stdout
    assert "INCOMPLETE" in text and "latest complete step: 3" in text


def test_listing_ignores_foreign_dirs(one_proc):
    out, _ = one_proc
    d = _inspect_json(str(out))
    assert [s["step"] for s in d["checkpoints"]] == [2]
    assert d["ignored"] == ["checkpoints/notes", "checkpoints/step_010"]


def test_inspect_trainer_dir_and_weights(two_rank):
    t = _inspect_json(str(two_rank / "checkpoints" / "step_6" / "trainer"))
    assert t["kind"] == "trainer" and t["step"] == 6 and t["trainer"]["world_size"] == 2
    w = _inspect_json(str(two_rank / "weights" / "step_3"))
    assert w["kind"] == "weights_step" and w["step"] == 3 and w["complete"] is True
    assert w["config"] == {"hidden": 16, "step": 3}
    assert {f["name"] for f in w["files"]} == {"model.safetensors", "config.json", "manifest.json", "COMPLETE"}
    assert {r["name"]: (r["shape"], r["dtype"]) for r in w["tensors"]} == {
        k: (v, "float32") for k, v in TWO_RANK_MODEL.items()
    }
    assert w["total_bytes"] == sum(_numel(s) * 4 for s in TWO_RANK_MODEL.values())


def test_filter(two_rank):
    d = _inspect_json(str(two_rank / "checkpoints" / "step_3"), "--filter", "app.model.*")
    names = [t["name"] for t in d["trainer"]["tensors"]]
    assert sorted(names) == sorted(f"app.model.{k}" for k in TWO_RANK_MODEL)
    assert list(d["trainer"]["totals"]) == ["app.model"] and d["trainer"]["non_tensors"] == []
    assert d["filter"] == "app.model.*"
    text = runner.invoke(app, ["inspect", str(two_rank / "checkpoints" / "step_3"), "--filter", "*exp_avg_sq"]).stdout
    assert "app.optimizer.state.0.weight.exp_avg_sq" in text and "app.model.0.weight" not in text
    w = _inspect_json(str(two_rank / "weights" / "step_3"), "--filter", "*.bias")
    assert sorted(t["name"] for t in w["tensors"]) == ["0.bias", "1.bias"]


def test_incomplete_trainer_is_shown_incomplete(tmp_path, two_rank):
    step = tmp_path / "checkpoints" / "step_3"
    shutil.copytree(two_rank / "checkpoints" / "step_3", step)
    (step / "trainer" / ".metadata").unlink()  # a save that did not finish
    d = _inspect_json(str(step))
    assert d["complete"] is False and d["parts"]["trainer"] is False and d["trainer"]["complete"] is False
    assert d["trainer"]["tensors"] is None and any(".metadata missing" in p for p in d["problems"])
    assert _inspect_json(str(tmp_path))["latest_complete_step"] is None
    assert "INCOMPLETE" in runner.invoke(app, ["inspect", str(step)]).stdout


class _Evil:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def _error_cases(tmp_path: Path, two_rank: Path) -> dict[str, Path]:
    (tmp_path / "a_file").write_text("x")
    (tmp_path / "empty").mkdir()
    no_trainer = tmp_path / "checkpoints" / "step_4"
    no_trainer.mkdir(parents=True)
    bad = tmp_path / "bad" / "checkpoints" / "step_3"
    shutil.copytree(two_rank / "checkpoints" / "step_3", bad)
    (bad / "trainer" / ".metadata").write_bytes(pickle.dumps(_Evil(tmp_path / "pwned")))
    trunc = tmp_path / "trunc" / "checkpoints" / "step_3"
    shutil.copytree(two_rank / "checkpoints" / "step_3", trunc)
    data = (trunc / "trainer" / ".metadata").read_bytes()
    (trunc / "trainer" / ".metadata").write_bytes(data[:100])
    return {
        "missing": tmp_path / "does_not_exist",
        "file": tmp_path / "a_file",
        "empty": tmp_path / "empty",
        "no_trainer": no_trainer,
        "malicious": bad,
        "truncated": trunc,
    }


@pytest.mark.parametrize(
    "case, words",
    [
        ("missing", "no such file or directory"),
        ("file", "not a directory"),
        ("empty", "not a checkpoint"),
        ("no_trainer", "no trainer/"),
        ("malicious", "refused to load: references posix.system"),
        ("truncated", "truncated"),
    ],
)
def test_errors_exit_2_one_line(tmp_path, two_rank, case, words):
    path = _error_cases(tmp_path, two_rank)[case]
    for extra in ([], ["--json"]):
        result = runner.invoke(app, ["inspect", str(path), *extra])
        assert result.exit_code == 2, result.output
        assert result.stdout == ""
        lines = result.stderr.splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: ") and str(path) in lines[0], result.stderr
        assert words in lines[0]
        assert "Traceback" not in result.output
    assert not (tmp_path / "pwned").exists()


def test_debug_shows_the_exception(tmp_path):
    result = runner.invoke(app, ["--debug", "inspect", str(tmp_path / "nope")])
    assert result.exit_code == 2 and "Traceback (most recent call last)" in result.stderr
    assert "Error: " in result.stderr and str(tmp_path / "nope") in result.stderr


def _snapshot(root: Path) -> dict[str, tuple[int, int]]:
    snap = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            p = Path(dirpath) / name
            st = p.lstat()
            snap[str(p.relative_to(root))] = (st.st_mtime_ns, st.st_size if p.is_file() else 0)
    return snap


def test_inspect_modifies_nothing(one_proc, two_rank):
    for root in (one_proc[0], two_rank):
        before = _snapshot(root)
        targets = [root, root / "checkpoints"] + sorted((root / "checkpoints").glob("step_*/")) + sorted(
            (root / "checkpoints").glob("step_*/trainer")
        ) + sorted((root / "weights").glob("step_*"))  # fmt: skip
        for target in targets:
            for extra in ([], ["--json"], ["--filter", "app.*"]):
                runner.invoke(app, ["inspect", str(target), *extra])
        assert _snapshot(root) == before


def test_main_entry_point(two_rank, capsys):
    with pytest.raises(SystemExit) as info:
        main(["inspect", str(two_rank / "checkpoints" / "step_3"), "--json"])
    assert info.value.code in (0, None)
    assert json.loads(capsys.readouterr().out)["trainer"]["world_size"] == 2


def test_python_m_entry_point(two_rank):
    """``python -m prime_ckpt.cli`` runs the app: a real process, real stderr, exit code 2."""
    bad = subprocess.run(
        [sys.executable, "-m", "prime_ckpt.cli", "inspect", str(two_rank / "nope")],
        capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(ROOT)}, timeout=90,
    )  # fmt: skip
    assert bad.returncode == 2 and bad.stderr.strip() == f"error: {two_rank / 'nope'}: no such file or directory"
    assert bad.stdout == ""
