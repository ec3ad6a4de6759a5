"""Bad input, one case each, for every command: exit code, one line naming the path, no
traceback, nothing executed, nothing modified.

Exit codes: 0 ok, 1 a check failed (verify found a problem), 2 bad path or unreadable input.
``list`` reads no DCP metadata, so a broken ``.metadata`` is not its concern (exit 0); ``inspect``
shows a missing shard / broken orchestrator.pt as a warning (exit 0); ``verify`` reports every
problem it can find and exits 1.
"""

from __future__ import annotations

import json
import os
import pickle
from pathlib import Path

import pytest
from dist_scripts.cli2_runs import copy_run, one_proc_run, snapshot
from typer.testing import CliRunner

from prime_ckpt.cli import app

runner = CliRunner()


class _Evil:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def _flip(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))


def _build(case: str, tmp: Path, good: Path) -> tuple[Path, Path]:
    """``(run root, target)``: ``list`` gets the run root, the other commands the target."""
    if case == "nonexistent":
        return tmp / "nope", tmp / "nope"
    if case == "empty_dir":
        (tmp / "empty").mkdir()
        return tmp / "empty", tmp / "empty"
    if case == "file":
        (tmp / "a_file").write_text("hello")
        return tmp / "a_file", tmp / "a_file"
    if case == "no_steps":
        (tmp / "run" / "checkpoints").mkdir(parents=True)
        return tmp / "run", tmp / "run"
    run = copy_run(good, tmp / "run")
    step = run / "checkpoints" / "step_4"
    meta = step / "trainer" / ".metadata"
    if case == "truncated_metadata":
        meta.write_bytes(meta.read_bytes()[:200])
    elif case == "metadata_not_pickle":
        meta.write_text("this is not a pickle\n")
    elif case == "malicious_metadata":
        meta.write_bytes(pickle.dumps(_Evil(tmp / "pwned")))
    elif case == "flipped_shard":
        _flip(step / "trainer" / "__0_0.distcp")
    elif case == "missing_shard":
        (step / "trainer" / "__0_0.distcp").unlink()
    elif case == "orchestrator_not_torch":
        (step / "orchestrator.pt").write_text("not a torch file")
    elif case == "no_trainer":
        import shutil

        shutil.rmtree(step / "trainer")
    return run, step


# case: {command: (exit code, words in the one error line / in the report)}
TABLE = {
    "nonexistent": {"inspect": (2, "no such file or directory"), "list": (2, "no such file or directory"), "verify": (2, "no such file or directory"), "diff": (2, "no such file or directory"), "convert": (2, "no such file or directory")},
    "empty_dir": {"inspect": (2, "not a checkpoint"), "list": (2, "not a run output dir"), "verify": (2, "not a checkpoint"), "diff": (2, "not a checkpoint"), "convert": (2, "not a checkpoint")},
    "file": {"inspect": (2, "not a directory"), "list": (2, "not a directory"), "verify": (2, "not a directory"), "diff": (2, "not a checkpoint (a file"), "convert": (2, "not a checkpoint (a file")},
    "no_steps": {"inspect": (0, None), "list": (0, "no checkpoint steps"), "verify": (2, "no step_<N> directories to verify"), "diff": (2, "not a checkpoint"), "convert": (2, "not a checkpoint")},
    "truncated_metadata": {"inspect": (2, "truncated"), "list": (0, None), "verify": (1, "truncated"), "diff": (2, "truncated"), "convert": (2, "truncated")},
    "metadata_not_pickle": {"inspect": (2, "not readable DCP metadata"), "list": (0, None), "verify": (1, "not readable DCP metadata"), "diff": (2, "not readable DCP metadata"), "convert": (2, "not readable DCP metadata")},
    "malicious_metadata": {"inspect": (2, "refused to load: references posix.system"), "list": (0, None), "verify": (1, "refused to load"), "diff": (2, "refused to load"), "convert": (2, "refused to load")},
    "flipped_shard": {"inspect": (0, None), "list": (0, None), "verify": (1, "__0_0.distcp: checksum mismatch"), "diff": (0, None), "convert": (None, None)},
    "missing_shard": {"inspect": (0, None), "list": (0, None), "verify": (1, "__0_0.distcp: missing"), "diff": (0, None), "convert": (2, "__0_0.distcp: No such file or directory")},
    "orchestrator_not_torch": {"inspect": (0, None), "list": (0, None), "verify": (1, "orchestrator.pt: not a torch file"), "diff": (0, None), "convert": (0, None)},
    "no_trainer": {"inspect": (2, "no trainer/ directory"), "list": (0, None), "verify": (1, "no trainer/ directory"), "diff": (2, "no trainer/ directory"), "convert": (2, "no trainer/ directory")},
}  # fmt: skip


@pytest.fixture
def good(tmp_path_factory):
    return one_proc_run(tmp_path_factory)[0]


def _args(cmd: str, run: Path, target: Path, good: Path, out: Path) -> list[str]:
    return {
        "inspect": ["inspect", str(target)],
        "list": ["list", str(run)],
        "verify": ["verify", str(target)],
        "diff": ["diff", str(target), str(good / "checkpoints" / "step_4")],
        "convert": ["convert", str(target), str(out), "--to", "safetensors"],
    }[cmd]


@pytest.mark.parametrize("case", list(TABLE))
def test_bad_input(case, tmp_path, good):
    run, target = _build(case, tmp_path, good)
    before = snapshot(run) if run.exists() else None
    for cmd, (code, words) in TABLE[case].items():
        out = tmp_path / "out" / f"{cmd}.safetensors"
        result = runner.invoke(app, _args(cmd, run, target, good, out))
        assert "Traceback" not in result.output, (cmd, result.output)
        if code is None:  # not this command's job to notice (convert does not verify checksums)
            assert result.exit_code in (0, 2), (cmd, result.output)
            continue
        assert result.exit_code == code, (cmd, result.output)
        if code == 2:
            lines = result.stderr.splitlines()
            assert len(lines) == 1 and lines[0].startswith("error: ") and words in lines[0], (cmd, result.stderr)
            assert str(target if cmd != "list" else run) in lines[0] or str(target) in lines[0], (cmd, lines)
            assert result.stdout == ""
        elif code == 1:
            assert words in result.stdout and str(target) in result.stdout, (cmd, result.stdout)
        elif words:
            assert words in result.stdout, (cmd, result.stdout)
    assert not (tmp_path / "pwned").exists()
    if before is not None:
        assert snapshot(run) == before


def test_malicious_metadata_executes_nothing_in_convert_to_torch_save(tmp_path, good):
    _run, step = _build("malicious_metadata", tmp_path, good)
    r = runner.invoke(app, ["convert", str(step), str(tmp_path / "x.pt"), "--to", "torch-save"])
    assert r.exit_code == 2 and "refused to load" in r.stderr
    assert not (tmp_path / "pwned").exists() and not (tmp_path / "x.pt").exists()


def test_debug_shows_traceback(tmp_path):
    r = runner.invoke(app, ["--debug", "verify", str(tmp_path / "nope")])
    # the traceback, and the same exit code (2: bad input) as without --debug
    assert r.exit_code == 2 and "Traceback (most recent call last)" in r.stderr and str(tmp_path / "nope") in r.stderr


def test_convert_force_never_writes_into_a_checkpoint(tmp_path, good):
    """``convert --force`` with OUT a part of another checkpoint (its orchestrator.pt, a file of
    its trainer/ DCP dir, a weights step's file, the same through a symlink, or trainer/ itself
    with --from torch-save): exit 2, one line naming OUT and the checkpoint, nothing changed."""
    run = copy_run(good, tmp_path / "run")
    src = run / "checkpoints" / "step_2"
    step4 = run / "checkpoints" / "step_4"
    weights = run / "weights" / "step_4"
    (tmp_path / "link").symlink_to(step4)
    pt = tmp_path / "x.pt"
    assert runner.invoke(app, ["convert", str(src), str(pt), "--to", "torch-save"]).exit_code == 0
    before = snapshot(run)
    cases = [
        ([str(src), str(step4 / "orchestrator.pt"), "--to", "torch-save", "--force"], step4),
        ([str(src), str(step4 / "trainer" / "__0_0.distcp"), "--to", "torch-save", "--force"], step4),
        ([str(src), str(weights / "model.safetensors"), "--to", "safetensors", "--force"], weights),
        ([str(src), str(tmp_path / "link" / "orchestrator.pt"), "--to", "safetensors", "--force"], step4),
        ([str(pt), str(step4 / "trainer"), "--from", "torch-save", "--force"], step4),
        ([str(src), str(step4 / "orchestrator.pt"), "--to", "torch-save"], step4),  # without --force too
    ]
    for args, inside in cases:
        r = runner.invoke(app, ["convert", *args])
        assert r.exit_code == 2, (args, r.output)
        lines = r.stderr.splitlines()
        assert len(lines) == 1 and lines[0].startswith(f"error: {args[1]}: inside the "), (args, r.stderr)
        assert str(inside) in lines[0] and "Traceback" not in r.output and r.stdout == "", (args, r.output)
    assert snapshot(run) == before


def test_verify_never_reads_a_manifest_entry_outside_the_step(tmp_path, good):
    """A manifest entry ``../../../../etc/passwd`` (or ``/etc/passwd``) is one problem line
    naming the manifest and the entry, exit 1; the file's size and hash are never printed."""
    import json

    run = copy_run(good, tmp_path / "run")
    step = run / "checkpoints" / "step_4"
    manifest = step / "manifest.json"
    m = json.loads(manifest.read_text())
    bad = ["../../../../../../../../../../etc/passwd", "/etc/passwd"]
    m["files"] += [{"path": rel, "size": 1, "xxh3_64": "0" * 16} for rel in bad]
    manifest.write_text(json.dumps(m))
    r = runner.invoke(app, ["verify", str(step)])
    assert r.exit_code == 1 and "Traceback" not in r.output, r.output
    for rel in bad:
        lines = [line for line in r.stdout.splitlines() if f"entry {rel!r}" in line]
        assert len(lines) == 1 and lines[0].strip().startswith(f"{manifest}: entry {rel!r} "), (rel, r.stdout)
    assert "etc/passwd: size" not in r.stdout and "checksum" not in r.stdout, r.stdout
    r = runner.invoke(app, ["verify", str(step), "--json"])
    problems = json.loads(r.stdout)["steps"][0]["problems"]
    assert r.exit_code == 1 and len(problems) == 2 and all("not read" in p for p in problems), problems


def test_names_and_paths_are_shown_literally(tmp_path):
    """Rich markup and control characters in tensor names and paths reach the terminal as written
    (escaped), never styled and never as raw escape sequences; JSON keeps them exact."""
    import torch
    import torch.distributed.checkpoint as dcp

    evil = "app.[bold red]EVIL[/bold red]"
    ansi = "app.\x1b[31mred\x1b[0m"
    run = tmp_path / "run[bold]x[/bold]"
    trainer = run / "checkpoints" / "step_1" / "trainer"
    dcp.save({evil: torch.ones(2), ansi: torch.zeros(3)}, checkpoint_id=str(trainer), no_dist=True)
    r = runner.invoke(app, ["inspect", str(trainer)])
    assert r.exit_code == 0, r.output
    assert evil in r.stdout and "app.\\x1b[31mred\\x1b[0m" in r.stdout and "\x1b" not in r.stdout
    r = runner.invoke(app, ["inspect", str(trainer), "--json"])
    assert {t["name"] for t in json.loads(r.stdout)["trainer"]["tensors"]} == {evil, ansi}
    r = runner.invoke(app, ["list", str(run)])
    assert r.exit_code == 0 and str(run) in r.stdout.replace("\n", ""), r.output
    r = runner.invoke(app, ["verify", str(tmp_path / "nope\x1b[2J")])
    assert r.exit_code == 2 and "\x1b" not in r.stderr and "nope\\x1b[2J" in r.stderr


def test_a_symlink_loop_and_a_dangling_symlink_are_named(tmp_path):
    loop = tmp_path / "loop"
    loop.symlink_to(loop)
    dangling = tmp_path / "dangling"
    dangling.symlink_to(tmp_path / "gone")
    for cmd in ("inspect", "verify", "list"):
        r = runner.invoke(app, [cmd, str(loop)])
        assert r.exit_code == 2 and r.stderr.splitlines() == [f"error: {loop}: too many levels of symbolic links (a symlink loop)"], (cmd, r.output)
        r = runner.invoke(app, [cmd, str(dangling)])
        assert r.exit_code == 2 and r.stderr.splitlines() == [f"error: {dangling}: a dangling symlink (to {tmp_path / 'gone'})"], (cmd, r.output)
    r = runner.invoke(app, ["convert", str(loop), str(tmp_path / "o.pt"), "--to", "torch-save"])
    assert r.exit_code == 2 and "symlink loop" in r.stderr, r.output


def test_an_unknown_url_protocol_is_named_not_blamed_on_the_options(tmp_path):
    r = runner.invoke(app, ["inspect", "nosuchfs://bucket/run"])
    assert r.exit_code == 2 and r.stderr.splitlines() == [
        "error: nosuchfs://bucket/run: unknown URL protocol 'nosuchfs' (fsspec knows no file system of that name)"], r.output


def test_inspect_reads_a_bare_safetensors_file(tmp_path):
    import torch
    from safetensors.torch import save_file

    f = tmp_path / "adapter.safetensors"
    save_file({"b": torch.zeros(2, 3), "a": torch.ones(4, dtype=torch.bfloat16)}, str(f))
    d = json.loads(runner.invoke(app, ["inspect", str(f), "--json"]).stdout)
    assert d["kind"] == "safetensors_file" and d["complete"] and d["problems"] == []
    assert [(t["name"], t["shape"], t["dtype"]) for t in d["tensors"]] == [("a", [4], "bfloat16"), ("b", [2, 3], "float32")]
    r = runner.invoke(app, ["inspect", str(f)])
    assert r.exit_code == 0 and "safetensors file" in r.stdout
    f.write_bytes(f.read_bytes()[:-4])  # truncated
    r = runner.invoke(app, ["inspect", str(f), "--json"])
    assert r.exit_code == 0 and json.loads(r.stdout)["complete"] is False and "truncated" in json.loads(r.stdout)["problems"][0]


def test_a_path_with_a_closing_markup_tag_is_no_traceback(tmp_path):
    from tests.marks import write_orchestrator_mark, write_trainer_mark

    root = tmp_path / "a[/red]b"
    write_trainer_mark(root / "checkpoints" / "step_2" / "trainer")
    write_orchestrator_mark(root / "checkpoints" / "step_2" / "orchestrator.pt", 2)
    for args in (["verify", str(root)], ["list", str(root)], ["inspect", str(root / "checkpoints" / "step_2")],
                 ["plan", str(root), "--keep", "1", "--async-level", "0"], ["prune", str(root), "--keep", "1", "--async-level", "0", "--yes"]):
        r = runner.invoke(app, args)
        assert r.exception is None or isinstance(r.exception, SystemExit), (args, r.output)
        assert "a[/red]b" in r.stdout.replace("\n", ""), (args, r.output)


def test_inspect_of_a_step_agrees_with_list_on_completeness(tmp_path, good):
    run = copy_run(good, tmp_path / "run")
    step = run / "checkpoints" / "step_4"
    (step / "orchestrator.pt").write_bytes((step / "orchestrator.pt").read_bytes()[:50])
    d = json.loads(runner.invoke(app, ["inspect", str(step), "--json"]).stdout)
    listed = {c["step"]: c for c in json.loads(runner.invoke(app, ["list", str(run), "--json"]).stdout)["checkpoints"]}
    assert d["complete"] is False and listed[4]["complete"] is False and d["parts"]["orchestrator"] is False
    shard = step / "trainer" / "__0_0.distcp"
    shard.write_bytes(shard.read_bytes()[:50])
    r = runner.invoke(app, ["inspect", str(step / "trainer")])
    assert "INCOMPLETE" in r.stdout and "truncated" in r.stderr, r.output
    assert json.loads(runner.invoke(app, ["inspect", str(step), "--json"]).stdout)["parts"]["trainer"] is False


def _crafted_safetensors(path: Path, header: dict, data: bytes) -> Path:
    import struct

    text = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(text)) + text + data)
    return path


_F32x4 = {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}


@pytest.mark.parametrize(
    "header, words",
    [
        ({"w": {**_F32x4, "data_offsets": [0, 64]}}, "hold 64 bytes, but shape [4] F32 needs 16"),  # offsets past the end
        ({"w": {**_F32x4, "shape": [40]}}, "needs 160"),  # shape larger than its bytes
        ({"w": _F32x4, "v": _F32x4}, "(overlap)"),
        ({"w": {**_F32x4, "shape": [-4]}}, "not a list of non-negative ints"),
        ({"w": {**_F32x4, "data_offsets": [4, 20]}}, "(gap)"),
    ],
)
def test_an_inconsistent_safetensors_header_is_one_line_everywhere(tmp_path, header, words):
    """#16 item 7: data_offsets / shapes that do not match are named (tensor and rule), exit 2,
    for convert, diff --values and inspect, before the safetensors library sees the file."""
    import torch
    from safetensors.torch import save_file

    bad = _crafted_safetensors(tmp_path / "bad.safetensors", header, bytes(16))
    good = tmp_path / "good.safetensors"
    save_file({"w": torch.arange(4.0)}, str(good))
    for args in (["convert", str(bad), str(tmp_path / "out.safetensors"), "--to", "safetensors"],
                 ["diff", str(bad), str(good), "--values"], ["diff", str(good), str(bad), "--values"],
                 ["inspect", str(bad)]):  # fmt: skip
        r = runner.invoke(app, args)
        assert r.exit_code == 2, (args, r.output)
        assert len(r.stderr.splitlines()) == 1 and r.stderr.startswith(f"error: {bad}: not a valid safetensors file (tensor '"), r.output
        assert words in r.stderr and "Traceback" not in r.output, r.output
    assert not (tmp_path / "out.safetensors").exists()


def test_convert_output_under_a_file_or_unwritable_dir_is_one_line(tmp_path, monkeypatch):
    """#16 item 7: an OUT below a file, or in a directory this process may not write, is named
    in one line (exit 2) before anything is read or written (not 'File exists' / a temp name)."""
    import torch
    from safetensors.torch import save_file

    from prime_ckpt import convert_output

    src = tmp_path / "m.safetensors"
    save_file({"w": torch.arange(4.0)}, str(src))
    (tmp_path / "afile").write_text("x")
    for out, args in ((tmp_path / "afile" / "x.safetensors", ["--to", "safetensors"]), (tmp_path / "afile" / "out", ["--to", "safetensors"])):
        r = runner.invoke(app, ["convert", str(src), str(out), *args])
        assert r.exit_code == 2 and r.stderr.splitlines() == [f"error: {out}{'/model.safetensors' if out.name == 'out' else ''}: {tmp_path / 'afile'} is a file, not a directory"], r.output
    r = runner.invoke(app, ["convert", str(src), str(tmp_path / "afile"), "--to", "safetensors"])  # an existing file is a file
    assert r.exit_code == 2 and "already exists (use --force" in r.stderr, r.output
    ro = tmp_path / "ro"
    ro.mkdir()
    real_access = os.access
    monkeypatch.setattr(convert_output.os, "access", lambda p, mode: False if Path(p) == ro else real_access(p, mode))  # root ignores 0555
    r = runner.invoke(app, ["convert", str(src), str(ro / "x.safetensors"), "--to", "safetensors"])
    assert r.exit_code == 2 and r.stderr.splitlines() == [f"error: {ro / 'x.safetensors'}: {ro} is not writable (permission denied); choose another OUT"], r.output
    assert list(ro.iterdir()) == [] and (tmp_path / "afile").read_text() == "x"


def test_save_info_values_are_checked_and_shown_in_units(tmp_path):
    """#16 item 7: save_info.json values of the wrong type are named (field, value, expected) by
    inspect and list, not shown raw without comment; good values are shown in units."""
    from tests.marks import write_orchestrator_mark, write_trainer_mark

    step = tmp_path / "run" / "checkpoints" / "step_2"
    write_trainer_mark(step / "trainer")
    write_orchestrator_mark(step / "orchestrator.pt", 2)
    (step / "save_info.json").write_text(json.dumps(
        {"step": 2, "mode": "async", "world_size": "lots", "blocking_s": -1, "total_s": 1.23456, "total_bytes": 3 * 2**20}))
    r = runner.invoke(app, ["inspect", str(step)])
    assert r.exit_code == 0, r.output
    warnings = [line for line in r.stderr.splitlines() if "save_info.json" in line]
    assert warnings == [
        f"warning: {step / 'save_info.json'}: field 'world_size' is 'lots' (str), expected a world size (int >= 1)",
        f"warning: {step / 'save_info.json'}: field 'blocking_s' is -1 (int), expected seconds (a number >= 0)",
    ], r.output
    assert "total_s=1.235 s" in r.stdout and "total_bytes=3.0 MiB" in r.stdout, r.stdout
    table = json.loads(runner.invoke(app, ["list", str(tmp_path / "run"), "--json"]).stdout)
    assert any("'world_size' is 'lots'" in p for p in table["checkpoints"][0]["problems"])
    (step / "save_info.json").write_text(json.dumps({"step": 2, "mode": "sync", "world_size": 2, "blocking_s": 0.5}))
    r = runner.invoke(app, ["inspect", str(step)])
    assert r.exit_code == 0 and "save_info.json" not in r.stderr and "blocking_s=0.500 s" in r.stdout, r.output


@pytest.mark.parametrize(
    "argv, words",
    [
        (["plan", "RUN", "--keep", "0"], "error: prime-ckpt plan: Invalid value for '--keep': "),
        (["plan", "RUN", "--keep", "abc"], "error: prime-ckpt plan: Invalid value for '--keep': "),
        (["list", "RUN", "--bogus"], "error: prime-ckpt list: No such option: --bogus"),
        (["plan"], "error: prime-ckpt plan: Missing argument 'OUTPUT_DIR'"),
        (["nosuchcmd"], "error: prime-ckpt: No such command 'nosuchcmd'"),
    ],
)
def test_usage_errors_of_the_installed_tool_are_one_line_exit_2(tmp_path, capsys, argv, words):
    """The `prime-ckpt` entry point (`main`): a bad flag value, an unknown flag or command, a
    missing argument is one `error:` line naming the command, exit 2 (before: click's four-line
    usage block with `Error:`), and nothing in the run changes."""
    from prime_ckpt.cli import main

    (tmp_path / "checkpoints" / "step_1").mkdir(parents=True)
    with pytest.raises(SystemExit) as exit_info:
        main([str(tmp_path) if a == "RUN" else a for a in argv])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and len(err.splitlines()) == 1 and err.startswith(words), err
    assert sorted(p.name for p in tmp_path.rglob("*")) == ["checkpoints", "step_1"]
