"""prime-ckpt list / verify / manifest / convert / diff through typer's runner on real runs
(a 2-rank FSDP2 run and a 1-process run); inspect reads no tensor data; read-only commands
change nothing."""

from __future__ import annotations

import json
import os
import sys
import time
from typing import ClassVar

import pytest
import torch
from dist_scripts.cli2_runs import (
    TWO_RANK_MODEL,
    copy_run,
    one_proc_run,
    snapshot,
    two_rank_run,
)
from safetensors.torch import load_file
from typer.testing import CliRunner

from prime_ckpt.cli import app
from prime_ckpt.storage import tree_size

runner = CliRunner()


@pytest.fixture
def two(run_ranks, tmp_path_factory):
    return two_rank_run(run_ranks, tmp_path_factory)


@pytest.fixture
def one(tmp_path_factory):
    return one_proc_run(tmp_path_factory)[0]


def _json(*args, code=0):
    r = runner.invoke(app, [*args, "--json"])
    assert r.exit_code == code, r.output
    return json.loads(r.stdout)


def test_list_json(two):
    run, _ = two
    d = _json("list", str(run))
    assert d["schema"] == "prime-ckpt.list/1" and d["parts"] == ["trainer", "orchestrator"]
    assert d["latest_complete_step"] == 4 and d["policy"] is None
    rows = {r["step"]: r for r in d["checkpoints"]}
    assert sorted(rows) == [2, 4, 6]
    assert [rows[s]["complete"] for s in (2, 4, 6)] == [True, True, False]
    assert rows[6]["parts"] == {"trainer": True, "orchestrator": False} and rows[6]["progress"] is None
    assert rows[4]["progress"] == {"step": 4, "total_samples": 20, "total_tokens": 160, "total_problems": 4}
    assert rows[2]["save_info"]["mode"] == "sync" and rows[4]["save_info"]["mode"] == "async"
    assert rows[4]["save_info"]["world_size"] == 2
    for s in (2, 4, 6):
        assert rows[s]["bytes"] == tree_size(run / "checkpoints" / f"step_{s}") and rows[s]["manifest"] is True
        assert rows[s]["retention"] is None and rows[s]["problems"] == []
    assert [(w["step"], w["complete"], w["manifest"], w["bytes"]) for w in d["weights"]] == [
        (s, True, True, tree_size(run / "weights" / f"step_{s}")) for s in (2, 3, 4)
    ]


def test_list_with_retention_policy(two):
    run, _ = two
    d = _json("list", str(run), "--keep", "1", "--async-level", "1")
    assert d["policy"]["keep"] == 1 and d["policy"]["async_level"] == 1
    ck = {r["step"]: r["retention"]["action"] for r in d["checkpoints"]}
    assert ck == {2: "delete", 4: "keep", 6: "keep"}
    w = {r["step"]: r["retention"] for r in d["weights"]}
    assert w[2]["action"] == "delete" and w[3]["action"] == "keep" and w[4]["action"] == "keep"
    assert "pinned by checkpoint step 4 (needs weights [3, 4])" in w[3]["reasons"]
    text = runner.invoke(app, ["list", str(run), "--keep", "1", "--async-level", "1"]).stdout
    assert "delete" in text and "4/20/160" in text and "INCOMPLETE" in text and "latest complete step: 4" in text


def test_list_text_without_policy(one):
    r = runner.invoke(app, ["list", str(one)])
    assert r.exit_code == 0
    assert "2/6/60" in r.stdout and "4/12/120" in r.stdout and "sync, 1 ranks" in r.stdout


def test_verify(two, tmp_path):
    run, _ = two
    r = runner.invoke(app, ["verify", str(run)])
    assert r.exit_code == 1 and "INCOMPLETE" in r.stdout and "6 steps, 5 ok, 1 not ok" in r.stdout
    assert f"{run / 'checkpoints' / 'step_6' / 'orchestrator.pt'}: missing" in r.stdout
    d = _json("verify", str(run), "--complete-only")
    assert d["schema"] == "prime-ckpt.verify/1" and d["ok"] is True
    assert [(s["kind"], s["step"], s["status"]) for s in d["steps"]] == [
        ("checkpoint", 2, "ok"), ("checkpoint", 4, "ok"), ("checkpoint", 6, "incomplete"),
        ("weights", 2, "ok"), ("weights", 3, "ok"), ("weights", 4, "ok"),
    ]  # fmt: skip
    assert d["steps"][1]["files_checked"] == 4
    for target in (run / "checkpoints" / "step_4", run / "checkpoints" / "step_4" / "trainer", run / "weights" / "step_3"):
        assert runner.invoke(app, ["verify", str(target)]).exit_code == 0


def test_verify_without_manifest_and_manifest_command(one, tmp_path):
    run = copy_run(one, tmp_path / "run")
    for m in run.rglob("manifest.json"):
        m.unlink()
    r = runner.invoke(app, ["verify", str(run)])
    assert r.exit_code == 1 and r.stdout.count("NO MANIFEST") == 3
    assert runner.invoke(app, ["verify", str(run), "--allow-missing-manifest"]).exit_code == 0
    r = runner.invoke(app, ["manifest", str(run)])
    assert r.exit_code == 0 and r.stdout.count("wrote") == 3
    assert runner.invoke(app, ["verify", str(run)]).exit_code == 0
    # a broken step gets no manifest
    (run / "checkpoints" / "step_2" / "manifest.json").unlink()
    (run / "checkpoints" / "step_2" / "trainer" / "__0_0.distcp").unlink()
    r = runner.invoke(app, ["manifest", str(run)])
    assert r.exit_code == 1 and "skipped" in r.stdout
    assert not (run / "checkpoints" / "step_2" / "manifest.json").exists()


def test_convert_cli(two, tmp_path):
    run, ref = two
    expected = torch.load(ref / "step_2.pt", weights_only=True)
    out = tmp_path / "model.safetensors"
    d = _json("convert", str(run / "checkpoints" / "step_2"), str(out), "--to", "safetensors", "--dtype", "fp16")
    assert d["schema"] == "prime-ckpt.convert/1" and d["tensors"] == 4 and d["dtype"] == "fp16"
    got = load_file(str(out))
    assert {k: list(v.shape) for k, v in got.items()} == TWO_RANK_MODEL
    assert all(torch.equal(got[k], expected[f"model.{k}"].half()) for k in TWO_RANK_MODEL)
    r = runner.invoke(app, ["convert", str(run / "checkpoints" / "step_2"), str(out), "--to", "safetensors"])
    assert r.exit_code == 2 and r.stderr.strip() == f"error: {out}: already exists (use --force to overwrite)"
    pt = tmp_path / "full.pt"
    r = runner.invoke(app, ["convert", str(run / "checkpoints" / "step_2"), str(pt), "--to", "torch-save"])
    assert r.exit_code == 0 and "22 tensors" in r.stdout
    r = runner.invoke(app, ["convert", str(pt), str(tmp_path / "back"), "--from", "torch-save"])
    assert r.exit_code == 0 and (tmp_path / "back" / ".metadata").is_file()
    r = runner.invoke(app, ["diff", str(run / "checkpoints" / "step_2"), str(tmp_path / "back"), "--values"])
    assert r.exit_code == 0 and "identical" in r.stdout
    for args, words in (
        ([str(pt), str(tmp_path / "x"), "--from", "torch-save", "--to", "safetensors"], "converts to dcp only"),
        ([str(run / "checkpoints" / "step_2"), str(tmp_path / "y")], "--to is required"),
        ([str(run / "checkpoints" / "step_2"), str(tmp_path / "z.pt"), "--to", "torch-save", "--dtype", "bf16"], "--dtype applies"),
    ):
        r = runner.invoke(app, ["convert", *args])
        assert r.exit_code == 2 and words in r.stderr and len(r.stderr.splitlines()) == 1
    assert runner.invoke(app, ["convert", "a", "b", "--to", "onnx"]).exit_code == 2


def test_diff_cli(two):
    run, _ = two
    s2, s4 = run / "checkpoints" / "step_2", run / "checkpoints" / "step_4"
    assert runner.invoke(app, ["diff", str(s2), str(s4)]).exit_code == 0  # same layout
    r = runner.invoke(app, ["diff", str(s2), str(s4), "--values"])
    assert r.exit_code == 1 and "app.model.0.weight" in r.stdout and "non-tensor app.progress.step: 2 != 4" in r.stdout
    d = _json("diff", str(s2), str(s4), "--values", code=1)
    assert d["identical"] is False and d["same_layout"] == 22
    assert {v["name"] for v in d["values"] if not v["equal"]} >= {f"app.model.{k}" for k in TWO_RANK_MODEL}
    d = _json("diff", str(s4), str(run / "weights" / "step_4"), "--values")
    assert d["model_only"] is True and d["identical"] is True and len(d["values"]) == 4


class _OpenTracer:
    """Records every path opened (``open`` audit event: builtins.open, io.open, os.open)."""

    active: ClassVar[bool] = False
    paths: ClassVar[list[str]] = []
    installed: ClassVar[bool] = False

    @classmethod
    def install(cls):
        if not cls.installed:
            def hook(event, args):
                if cls.active and event == "open" and args and isinstance(args[0], (str, bytes, os.PathLike)):
                    cls.paths.append(os.fsdecode(args[0]))
            sys.addaudithook(hook)
            cls.installed = True


def _make_big(tmp_path):
    """A ~24 MB 1-process DCP checkpoint (many tensors)."""
    from prime_ckpt.config import CheckpointConfig
    from prime_ckpt.trainer import Checkpointer, Progress, TrainerState

    out = tmp_path / "big"
    model = torch.nn.Sequential(*[torch.nn.Linear(512, 512) for _ in range(8)])
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    ckpt = Checkpointer(out, CheckpointConfig(interval=1))
    ckpt.save(1, TrainerState(model, opt, None, Progress(1, 1, 1)))
    ckpt.close()
    return out


def test_inspect_reads_no_tensor_data(tmp_path):
    out = _make_big(tmp_path)
    step = out / "checkpoints" / "step_1"
    shard = step / "trainer" / "__0_0.distcp"
    assert shard.stat().st_size > 8_000_000
    _OpenTracer.install()
    outputs = {}
    for label in ("real", "garbage"):
        if label == "garbage":  # same size, no tensor in it any more
            size = shard.stat().st_size
            shard.write_bytes(b"\xde\xad\xbe\xef" * (size // 4) + b"\x00" * (size % 4))
        _OpenTracer.paths.clear()
        _OpenTracer.active = True
        t0 = time.perf_counter()
        try:
            outputs[label] = [runner.invoke(app, ["inspect", str(p), "--json"]) for p in (step, out)]
            outputs[label].append(runner.invoke(app, ["list", str(out), "--json"]))
            outputs[label].append(runner.invoke(app, ["diff", str(step), str(step)]))
        finally:
            _OpenTracer.active = False
        print(f"inspect/list/diff on {shard.stat().st_size} bytes ({label}): {time.perf_counter() - t0:.2f} s")
        assert all(r.exit_code == 0 for r in outputs[label]), [r.output for r in outputs[label]]
        assert str(step / "trainer" / ".metadata") in _OpenTracer.paths  # the tracer sees opens
        assert not [p for p in _OpenTracer.paths if p.endswith(".distcp")], _OpenTracer.paths
    assert [r.stdout for r in outputs["real"]] == [r.stdout for r in outputs["garbage"]]
    # and the data really is unreadable now: loading values fails with one line naming the dir
    r = runner.invoke(app, ["diff", str(step), str(step), "--values"])
    assert r.exit_code == 2 and r.stderr.startswith(f"error: {step / 'trainer'}: cannot load tensor data")


def test_read_only_commands_modify_nothing(two, one, tmp_path):
    run, _ = two
    for root in (run, one):
        before = snapshot(root)
        steps = sorted((root / "checkpoints").glob("step_*")) + sorted((root / "weights").glob("step_*"))
        for args in (
            ["inspect", str(root)], ["list", str(root)], ["list", str(root), "--keep", "1", "--json"],
            ["verify", str(root)], ["verify", str(root), "--json", "--allow-missing-manifest"],
            *(["inspect", str(s), "--json"] for s in steps), *(["verify", str(s)] for s in steps),
            ["diff", str(steps[0]), str(steps[1]), "--values"], ["diff", str(steps[0]), str(steps[-1]), "--values", "--json"],
            ["convert", str(steps[1]), str(tmp_path / f"{root.parent.name}.pt"), "--to", "torch-save"],
            ["convert", str(steps[-1]), str(tmp_path / f"{root.parent.name}.safetensors"), "--to", "safetensors"],
            ["plan", str(root), "--keep", "1"],
        ):  # fmt: skip
            r = runner.invoke(app, args)
            assert r.exit_code in (0, 1), (args, r.output)
        assert snapshot(root) == before
