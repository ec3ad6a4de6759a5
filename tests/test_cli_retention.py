"""`prime-ckpt plan` / `prime-ckpt prune` through typer's runner on a run directory on disk."""

import json
import os

from typer.testing import CliRunner

from prime_ckpt.cli import app
from tests.marks import write_orchestrator_mark, write_trainer_mark

runner = CliRunner()


def make_run(root, ck_steps, w_steps, orchestrator=True):
    for s in ck_steps:
        t = root / "checkpoints" / f"step_{s}" / "trainer"
        t.mkdir(parents=True)
        write_trainer_mark(t)
        (t / "__0_0.distcp").write_bytes(b"d" * 1000)
        if orchestrator:
            write_orchestrator_mark(t.parent / "orchestrator.pt", s)
    for s in w_steps:
        d = root / "weights" / f"step_{s}"
        d.mkdir(parents=True)
        (d / "model.safetensors").write_bytes(b"w" * 100)
        (d / "COMPLETE").write_bytes(b"")


def tree(root):
    return sorted(str(p.relative_to(root)) for p in root.rglob("*"))


def test_plan_json_is_a_dry_run(tmp_path):
    make_run(tmp_path, [5, 10, 15], range(8, 16))
    (tmp_path / "checkpoints" / "step_010.bak").mkdir()
    before = tree(tmp_path)
    r = runner.invoke(app, ["plan", str(tmp_path), "--keep", "1", "--async-level", "2", "--json"])
    assert r.exit_code == 0, r.output
    out = json.loads(r.stdout)
    got = {(e["kind"], e["step"]): e["action"] for e in out["entries"]}
    assert got == {
        ("checkpoint", 5): "delete", ("checkpoint", 10): "delete", ("checkpoint", 15): "keep",
        **{("weights", s): "delete" for s in range(8, 13)},
        **{("weights", s): "keep" for s in range(13, 16)},
    }  # fmt: skip
    mark = len((tmp_path / "checkpoints" / "step_15" / "trainer" / ".metadata").read_bytes())
    orch = (tmp_path / "checkpoints" / "step_15" / "orchestrator.pt").stat().st_size
    assert out["bytes_freed"] == 2 * (mark + 1000 + orch) + 5 * 100
    e15 = next(e for e in out["entries"] if e["kind"] == "checkpoint" and e["step"] == 15)
    assert e15["reasons"] == ["newest complete", "among the 1 newest complete"]
    assert set(e15) == {"path", "kind", "step", "action", "reasons", "bytes"}
    assert tree(tmp_path) == before  # nothing touched


def test_plan_table(tmp_path):
    make_run(tmp_path, [9, 10], [])
    r = runner.invoke(app, ["plan", str(tmp_path), "--keep", "1"])
    assert r.exit_code == 0, r.output
    assert "older than the 1 newest complete" in r.stdout and "1 to delete, 1 to keep" in r.stdout


def test_trainer_only_run_counts_as_complete(tmp_path):
    make_run(tmp_path, [1, 2, 3], [], orchestrator=False)
    r = runner.invoke(app, ["plan", str(tmp_path), "--keep", "2", "--json"])
    assert [e["action"] for e in json.loads(r.stdout)["entries"]] == ["delete", "keep", "keep"]


def test_prune_asks_then_deletes(tmp_path):
    make_run(tmp_path, [1, 2, 3], [0, 1, 2, 3])
    (tmp_path / "weights" / "notes.txt").write_text("mine")
    r = runner.invoke(app, ["prune", str(tmp_path), "--keep", "1", "--async-level", "1"], input="n\n")
    assert r.exit_code == 1 and "nothing deleted" in r.output
    assert len(list((tmp_path / "checkpoints").iterdir())) == 3
    r = runner.invoke(app, ["prune", str(tmp_path), "--keep", "1", "--async-level", "1", "--yes"])
    assert r.exit_code == 0, r.output
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["step_3"]
    assert sorted(p.name for p in (tmp_path / "weights").iterdir()) == ["notes.txt", "step_2", "step_3"]
    r = runner.invoke(app, ["prune", str(tmp_path), "--keep", "1", "--async-level", "1", "--yes"])
    assert r.exit_code == 0 and "nothing to delete" in r.stdout


def test_bad_input(tmp_path):
    r = runner.invoke(app, ["plan", str(tmp_path / "nope")])
    assert r.exit_code == 2 and "nope: no such directory" in r.output
    (tmp_path / "a_file").write_text("x")
    r = runner.invoke(app, ["plan", str(tmp_path / "a_file")])
    assert r.exit_code == 2 and "a_file: a file, not a run output dir" in r.output
    r = runner.invoke(app, ["plan", str(tmp_path)])
    assert r.exit_code == 2 and "not a run output dir" in r.output
    make_run(tmp_path, [1], [])
    r = runner.invoke(app, ["plan", str(tmp_path), "--keep", "0"])
    assert r.exit_code == 2 and "--keep" in r.output
    r = runner.invoke(app, ["prune", str(tmp_path), "--async-level", "-1", "--yes"])
    assert r.exit_code == 2 and "--async-level" in r.output
    assert (tmp_path / "checkpoints" / "step_1").is_dir()


def _record_async_level(root, step, level):
    (root / "checkpoints" / f"step_{step}" / "save_info.json").write_text(json.dumps({"step": step, "async_level": level}))


def test_async_level_must_be_given_when_the_run_records_none_and_has_weights(tmp_path):
    """A default of 0 would delete weights [x-k, x-1] that resuming at a kept step x needs."""
    make_run(tmp_path, [5, 10], range(3, 11))
    before = tree(tmp_path)
    for cmd in (["plan"], ["prune", "--yes"], ["list", "--keep", "1"]):
        r = runner.invoke(app, [*cmd, str(tmp_path), "--keep", "1"] if cmd[0] != "list" else [*cmd, str(tmp_path)])
        assert r.exit_code == 2, (cmd, r.output)
        [line] = r.stderr.strip().splitlines()
        assert line.startswith("error: --async-level: not given") and "[x-k, x]" in line, line
    assert tree(tmp_path) == before


def test_recorded_async_level_is_the_default(tmp_path):
    """The Checkpointer records its async level in save_info.json; a bare prune applies it."""
    make_run(tmp_path, [5, 10], range(3, 11))
    _record_async_level(tmp_path, 5, 1)
    _record_async_level(tmp_path, 10, 2)  # the newest record wins
    r = runner.invoke(app, ["prune", str(tmp_path), "--keep", "1", "--yes"])
    assert r.exit_code == 0, r.output
    assert sorted(p.name for p in (tmp_path / "weights").iterdir()) == ["step_10", "step_8", "step_9"]
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["step_10"]


def test_async_level_below_the_recorded_one_warns(tmp_path):
    make_run(tmp_path, [10], range(8, 11))
    _record_async_level(tmp_path, 10, 2)
    r = runner.invoke(app, ["plan", str(tmp_path), "--keep", "1", "--async-level", "0", "--json"])
    assert r.exit_code == 0, r.output
    assert "warning: --async-level 0 is below the async level 2 this run recorded" in r.stderr
    got = {(e["kind"], e["step"]): e["action"] for e in json.loads(r.stdout)["entries"]}
    assert got[("weights", 8)] == got[("weights", 9)] == "delete"  # as asked, but warned


def test_a_failed_delete_is_reported_once_and_its_leftover_named_then_cleaned(tmp_path, monkeypatch):
    import shutil

    import prime_ckpt.storage.deletes as storage

    make_run(tmp_path, [5, 10], [])
    real = shutil.rmtree

    def failing(path, *a, **k):
        raise PermissionError(13, "Permission denied", str(path))

    monkeypatch.setattr(storage.shutil, "rmtree", failing)
    r = runner.invoke(app, ["prune", str(tmp_path), "--keep", "1", "--yes"])
    assert r.exit_code == 1, r.output
    assert r.stderr.count("Permission denied") == 1 and r.stderr.count("error: ") == 1, r.stderr
    [leftover] = [n for n in os.listdir(tmp_path / "checkpoints") if n.startswith(".step_5.deleting.")]
    assert f"checkpoints/{leftover}: leftover of an interrupted delete could not be removed" in r.stderr
    r = runner.invoke(app, ["list", str(tmp_path)])
    assert f"checkpoints/{leftover} (leftover of an interrupted delete)" in r.stdout.replace("\n", "")
    assert json.loads(runner.invoke(app, ["list", str(tmp_path), "--json"]).stdout)["ignored_reasons"] == {
        f"checkpoints/{leftover}": "leftover of an interrupted delete"}
    monkeypatch.setattr(storage.shutil, "rmtree", real)
    r = runner.invoke(app, ["prune", str(tmp_path), "--keep", "1", "--yes"])
    assert r.exit_code == 0 and sorted(os.listdir(tmp_path / "checkpoints")) == ["step_10"], r.output


def test_a_symlinked_step_dir_is_listed_as_ignored_and_never_followed(tmp_path):
    make_run(tmp_path, [5, 10], [])
    elsewhere = tmp_path.parent / f"{tmp_path.name}-elsewhere"
    make_run(elsewhere, [7], [])
    (tmp_path / "checkpoints" / "step_7").symlink_to(elsewhere / "checkpoints" / "step_7")
    d = json.loads(runner.invoke(app, ["list", str(tmp_path), "--json"]).stdout)
    assert [c["step"] for c in d["checkpoints"]] == [5, 10]
    assert d["ignored_reasons"] == {"checkpoints/step_7": "a symlink (never followed)"}
    r = runner.invoke(app, ["prune", str(tmp_path), "--keep", "1", "--yes"])
    assert r.exit_code == 0
    assert (elsewhere / "checkpoints" / "step_7" / "trainer" / ".metadata").is_file()
    assert (tmp_path / "checkpoints" / "step_7").is_symlink()


def test_prune_warns_when_a_live_run_holds_the_directory(tmp_path):
    from prime_ckpt.run import RunLease

    make_run(tmp_path, [5, 10], [])
    lease = RunLease(tmp_path, "live1").acquire()
    try:
        r = runner.invoke(app, ["prune", str(tmp_path), "--keep", "1", "--yes"])
        assert r.exit_code == 0 and f"warning: {tmp_path}: a live run holds this directory (run live1, pid {os.getpid()}" in r.stderr, r.output
    finally:
        lease.release()
    r = runner.invoke(app, ["prune", str(tmp_path), "--keep", "1", "--yes"])
    assert r.exit_code == 0 and "live run" not in r.stderr


def test_a_rule_module_in_the_current_directory_or_one_that_fails_to_import(tmp_path):
    """`--rule MODULE:NAME` from the installed `prime-ckpt` script: a module in the current
    directory is found (as `python -m` finds it; before: ModuleNotFoundError), and a module that
    raises while importing (a syntax error, an exception) is one line, exit 2 (before: a
    traceback, exit 1). Nothing is deleted either way."""
    import subprocess
    import sys
    from pathlib import Path

    run = tmp_path / "run"
    make_run(run, [5, 10, 15], range(3, 16))
    rules = tmp_path / "rules"
    rules.mkdir()
    (rules / "myrules.py").write_text("def keep_five(view):\n    return 'five stays' if view.step == 5 else None\n")
    (rules / "badsyntax.py").write_text("def keep(view) return None\n")
    (rules / "raises.py").write_text("raise ValueError('no eval db\\nconfigured')\n")
    script = Path(sys.executable).parent / "prime-ckpt"
    before = tree(run)

    def plan(spec):
        return subprocess.run([str(script), "plan", str(run), "--keep", "1", "--async-level", "0", "--json", "--rule", spec],
                              cwd=rules, capture_output=True, text=True, timeout=120,
                              env={k: v for k, v in os.environ.items() if k != "PYTHONPATH"})

    r = plan("myrules:keep_five")
    assert r.returncode == 0, r.stderr
    got = {(e["kind"], e["step"]): (e["action"], e["reasons"]) for e in json.loads(r.stdout)["entries"]}
    assert got[("checkpoint", 5)] == ("keep", ["rule keep_five: five stays"]) and got[("checkpoint", 10)][0] == "delete"
    for spec, words in (("badsyntax:keep", "error: --rule badsyntax:keep: SyntaxError: "),
                        ("raises:keep", "error: --rule raises:keep: ValueError: no eval db configured")):  # fmt: skip
        r = plan(spec)
        assert r.returncode == 2 and len(r.stderr.splitlines()) == 1 and r.stderr.startswith(words), r.stderr
    assert tree(run) == before
