"""prime_ckpt.manifest: manifest.json of real checkpoints; verify finds every changed, missing
and extra file; hashing reads in chunks."""

from __future__ import annotations

import json
import os

import pytest
import xxhash
from dist_scripts.cli2_runs import copy_run, one_proc_run, snapshot, two_rank_run

import prime_ckpt.manifest as manifest_mod
import prime_ckpt.manifest_record as manifest_record_mod
import prime_ckpt.verify as verify_mod
from prime_ckpt.manifest import (
    MANIFEST_FILE,
    ManifestError,
    hash_file,
    read_manifest,
    verify_manifest,
    verify_path,
    verify_step,
    write_manifest,
)


@pytest.fixture
def two(run_ranks, tmp_path_factory):
    return two_rank_run(run_ranks, tmp_path_factory)[0]


@pytest.fixture
def one(tmp_path_factory):
    return one_proc_run(tmp_path_factory)[0]


def test_manifest_of_a_sharded_step_lists_every_file(two):
    step = two / "checkpoints" / "step_4"
    m = read_manifest(step)
    assert m["schema"] == "prime-ckpt.manifest/1" and m["algorithm"] == "xxh3_64"
    assert m["kind"] == "checkpoint" and m["step"] == 4 and m["parts"] == ["trainer", "orchestrator"]
    names = [f["path"] for f in m["files"]]
    assert names == ["trainer/.metadata", "trainer/__0_0.distcp", "trainer/__1_0.distcp", "orchestrator.pt"]
    for f in m["files"]:
        data = (step / f["path"]).read_bytes()
        assert f["size"] == len(data) and f["xxh3_64"] == xxhash.xxh3_64_hexdigest(data)
    assert m["total_bytes"] == sum(f["size"] for f in m["files"])
    # step 6 was committed without an orchestrator record: the manifest covers the trainer only
    assert read_manifest(two / "checkpoints" / "step_6")["parts"] == ["trainer"]


def test_manifest_of_weights_skips_the_marker(two):
    m = read_manifest(two / "weights" / "step_3")
    assert m["kind"] == "weights" and m["step"] == 3 and m["parts"] == ["weights"]
    assert [f["path"] for f in m["files"]] == ["config.json", "model.safetensors"]


def test_verify_ok_on_real_runs(two, one):
    for run, n in ((two, 6), (one, 3)):
        reports = verify_path(run)
        assert len(reports) == n
        assert {r.path: r.status for r in reports if r.status != "ok"} == (
            {str(two / "checkpoints" / "step_6"): "incomplete"} if run == two else {}
        )
    r = verify_step(two / "checkpoints" / "step_4")
    assert r.ok and r.files_checked == 4 and r.bytes_checked == read_manifest(two / "checkpoints" / "step_4")["total_bytes"]


def test_verify_reports_mismatch_missing_extra(tmp_path, one):
    run = copy_run(one, tmp_path / "run")
    step = run / "checkpoints" / "step_4"
    shard = step / "trainer" / "__0_0.distcp"
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0x40
    shard.write_bytes(bytes(data))
    (step / "trainer" / "__9_0.distcp").write_bytes(b"stale")
    r = verify_manifest(step)
    assert r.status == "failed"
    assert any(p.startswith(f"{shard}: checksum mismatch") for p in r.problems)
    assert any(p.startswith(f"{step / 'trainer' / '__9_0.distcp'}: extra file") for p in r.problems)
    (step / "orchestrator.pt").unlink()
    r = verify_manifest(step)
    assert any(p == f"{step / 'orchestrator.pt'}: missing (listed in manifest.json)" for p in r.problems)
    meta = step / "trainer" / ".metadata"
    meta.write_bytes(meta.read_bytes()[:-3])
    r = verify_manifest(step)
    assert any(p.startswith(f"{meta}: size ") and "truncated" in p for p in r.problems)
    assert len(r.problems) == 4


def test_part_written_after_the_manifest_is_unverified_not_failed(tmp_path, two):
    step = copy_run(two / "checkpoints" / "step_6", tmp_path / "checkpoints" / "step_6")
    from prime_ckpt.orchestrator import OrchestratorProgress, save_progress

    save_progress(step / "orchestrator.pt", OrchestratorProgress(step=6))
    r = verify_step(step)
    assert r.status == "ok" and r.unverified == [str(step / "orchestrator.pt")] and r.problems == []


def test_no_manifest(tmp_path, one):
    step = copy_run(one / "checkpoints" / "step_2", tmp_path / "checkpoints" / "step_2")
    (step / MANIFEST_FILE).unlink()
    r = verify_step(step)
    assert r.status == "no manifest" and not r.ok and "no manifest.json" in r.problems[0]
    r = verify_step(step, allow_missing_manifest=True)
    assert r.ok and r.problems == [] and r.manifest is False


def test_write_manifest_is_atomic_and_replaces(tmp_path, one):
    step = copy_run(one / "checkpoints" / "step_2", tmp_path / "checkpoints" / "step_2")
    before = read_manifest(step)
    (step / "trainer" / "__0_0.distcp").write_bytes(b"changed")
    path = write_manifest(step)
    assert path == step / MANIFEST_FILE
    after = read_manifest(step)
    assert after["files"][1]["size"] == 7 and after["files"][1] != before["files"][1]
    assert sorted(p.name for p in step.iterdir()) == ["manifest.json", "orchestrator.pt", "save_info.json", "trainer"]


def test_hashing_reads_in_bounded_chunks(tmp_path, monkeypatch):
    monkeypatch.setattr(manifest_record_mod, "CHUNK_BYTES", 1000)
    data = bytes(range(256)) * 40  # 10240 bytes
    f = tmp_path / "blob"
    f.write_bytes(data)
    seen = []
    assert hash_file(f, seen.append) == (len(data), xxhash.xxh3_64_hexdigest(data))
    assert max(seen) == 1000 and sum(seen) == len(data) and len(seen) == 11


def test_bad_manifests(tmp_path, one):
    step = copy_run(one / "checkpoints" / "step_2", tmp_path / "checkpoints" / "step_2")
    (step / MANIFEST_FILE).write_text("{not json")
    with pytest.raises(ManifestError, match="not a readable manifest"):
        read_manifest(step)
    (step / MANIFEST_FILE).write_text(json.dumps({"schema": "other"}))
    r = verify_step(step)
    assert r.status == "failed" and "not a prime-ckpt.manifest/1 manifest" in r.problems[0]
    with pytest.raises(FileNotFoundError):
        write_manifest(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ManifestError, match="nothing to record"):
        write_manifest(tmp_path / "empty")


def test_verify_reads_and_writes_nothing_else(one):
    before = snapshot(one)
    verify_path(one)
    assert snapshot(one) == before


def test_verify_reports_a_step_copied_under_another_name(tmp_path, one):
    """`cp -a step_4 step_60`: every checksum matches, but the manifest says step 4."""
    run = copy_run(one, tmp_path / "run")
    copied = copy_run(run / "checkpoints" / "step_4", run / "checkpoints" / "step_60")
    r = verify_step(copied)
    assert r.status == "failed"
    assert r.problems == [f"{copied / MANIFEST_FILE}: records step 4, but the directory is step_60 (copied or renamed?)"]
    assert verify_step(run / "checkpoints" / "step_4").ok


def _add_entries(step, entries):
    m = json.loads((step / MANIFEST_FILE).read_text())
    m["files"] += [{"path": rel, "size": size, "xxh3_64": digest} for rel, size, digest in entries]
    (step / MANIFEST_FILE).write_text(json.dumps(m))


def _record_opens(monkeypatch):
    opened = []
    real = verify_mod.hash_file

    def spy(path, on_bytes=None):
        opened.append(str(path))
        return real(path, on_bytes)

    monkeypatch.setattr(verify_mod, "hash_file", spy)
    return opened


def test_verify_never_reads_manifest_entries_outside_the_step(tmp_path, one, monkeypatch):
    """A manifest naming ``../../etc/passwd``, ``/etc/passwd`` or a symlink out of the step dir
    (with a matching checksum) is a problem, one line naming the manifest and the entry; the file
    is never opened. (Before: every one was hashed, the symlink even passed.)"""
    step = copy_run(one / "checkpoints" / "step_2", tmp_path / "run" / "checkpoints" / "step_2")
    secret = tmp_path / "secret"
    secret.write_bytes(b"top secret")
    (tmp_path / "secret_dir").mkdir()
    (tmp_path / "secret_dir" / "key").write_bytes(b"key")
    (step / "trainer" / "link").symlink_to(secret)
    (step / "trainer" / "dirlink").symlink_to(tmp_path / "secret_dir")
    (step / "inner").symlink_to(step / "trainer" / ".metadata")  # a symlink that stays inside: fine
    meta = (step / "trainer" / ".metadata").read_bytes()
    digest = xxhash.xxh3_64_hexdigest(b"top secret")
    bad = ["../../../../../../../../etc/passwd", "/etc/passwd", "trainer/../../secret", "trainer/link", "trainer/dirlink/key"]
    _add_entries(step, [(rel, 10, digest) for rel in bad] + [("inner", len(meta), xxhash.xxh3_64_hexdigest(meta))])
    opened = _record_opens(monkeypatch)
    r = verify_manifest(step)
    assert r.status == "failed"
    manifest = step / MANIFEST_FILE
    for rel in bad:
        lines = [p for p in r.problems if p.startswith(f"{manifest}: entry {rel!r} ")]
        assert len(lines) == 1 and "not read" in lines[0], (rel, r.problems)
    assert len(r.problems) == len(bad) and all("\n" not in p for p in r.problems)
    assert opened == [str(step / f["path"]) for f in read_manifest(one / "checkpoints" / "step_2")["files"]] + [str(step / "inner")]
    with pytest.raises(ManifestError, match="absolute path"):
        manifest_mod.manifest_entry_path(step, "/etc/shadow")
    with pytest.raises(ManifestError, match=r"'\.\.' component"):
        manifest_mod.manifest_entry_path(step, "trainer/../../x")
    with pytest.raises(ManifestError, match="symlink"):
        manifest_mod.manifest_entry_path(step, "trainer/link")
    assert manifest_mod.manifest_entry_path(step, "trainer/.metadata") == step / "trainer" / ".metadata"


def test_verify_never_reads_remote_manifest_entries_outside_the_step(one, monkeypatch):
    """On an fsspec path ``/etc/shadow`` would name another bucket (``memory://etc/shadow``) and
    ``..`` another prefix: both refused, never read."""
    import uuid

    import fsspec

    fs = fsspec.filesystem("memory")
    bucket = f"prime-ckpt-manifest-{uuid.uuid4().hex}"
    local = one / "checkpoints" / "step_2"
    base = f"/{bucket}/run/checkpoints/step_2"
    try:
        for p in sorted(local.rglob("*")):
            if p.is_file():
                fs.pipe_file(f"{base}/{p.relative_to(local).as_posix()}", p.read_bytes())
        fs.pipe_file(f"/{bucket}/secret", b"top secret")
        fs.pipe_file("/etc/shadow", b"root:x")
        m = json.loads((local / MANIFEST_FILE).read_bytes())
        bad = ["/etc/shadow", "../../../secret", "trainer/../../../../secret", f"memory://{bucket}/secret", "s3://other/secret"]
        m["files"] += [{"path": rel, "size": 10, "xxh3_64": xxhash.xxh3_64_hexdigest(b"top secret")} for rel in bad]
        fs.pipe_file(f"{base}/{MANIFEST_FILE}", json.dumps(m).encode())
        opened = _record_opens(monkeypatch)
        step = f"memory:/{base}"
        r = verify_manifest(step)
        assert r.status == "failed" and len(r.problems) == len(bad), r.problems
        for rel, line in zip(bad, r.problems):
            assert line.startswith(f"{step}/{MANIFEST_FILE}: entry {rel!r} ") and "not read" in line, (rel, line)
        assert len(opened) == len(m["files"]) - len(bad)
        assert not any("secret" in p or "shadow" in p for p in opened)
    finally:
        fs.rm(f"/{bucket}", recursive=True)
        fs.rm("/etc/shadow")


def test_crash_leftovers_are_never_hashed_nor_reported(tmp_path, one):
    """The temp names storage writes (``tmp_path_for``: ``.<name>.tmp.<pid>.<n>``) and
    ``.deleting.`` trees are neither listed in a manifest nor reported as extra files.
    (Before: the old pattern missed the ``.<n>`` suffix.)"""
    from prime_ckpt.storage import is_leftover, tmp_path_for

    run = copy_run(one, tmp_path / "run")
    step = run / "checkpoints" / "step_4"
    weights = run / "weights" / "step_4"
    leftovers = [tmp_path_for(step / "trainer" / "__0_0.distcp"), tmp_path_for(weights / "model.safetensors")]
    doomed = step / "trainer" / f".old.deleting.{os.getpid()}.7"
    doomed.mkdir()
    leftovers.append(doomed / "__0_0.distcp")
    for p in leftovers:
        assert is_leftover(p.name) or is_leftover(p.parent.name)
        p.write_bytes(b"half written")
    for d in (step, weights):
        assert verify_step(d).ok, verify_step(d).problems  # not reported as extra files
        write_manifest(d)
        names = [f["path"] for f in read_manifest(d)["files"]]
        assert not any(".tmp." in n or ".deleting." in n for n in names), names
        assert verify_step(d).ok


def test_a_deeply_nested_manifest_is_one_line_not_a_recursion_error(tmp_path):
    from typer.testing import CliRunner

    from prime_ckpt.cli import app
    from tests.marks import write_trainer_mark

    step = tmp_path / "checkpoints" / "step_1"
    write_trainer_mark(step / "trainer")
    (step / "manifest.json").write_text("[" * 100_000 + "]" * 100_000)
    r = CliRunner().invoke(app, ["verify", str(tmp_path)])
    assert r.exit_code == 1 and "RecursionError" in r.stdout and "Traceback" not in r.output, r.output
    assert f"{step / 'manifest.json'}: not a readable manifest (RecursionError)" in r.stdout.replace("\n", "")


def test_verifying_a_run_scans_it_once_for_the_parts_not_once_per_step(tmp_path, monkeypatch):
    """`verify` of a run with N checkpoint steps judges the parts a step needs from one scan of
    the run (before: one scan per step, N listings of the whole run on S3: requests per step grew
    with N in benchmarks/scaling.py). The reports are the same."""
    from tests.marks import write_orchestrator_mark, write_trainer_mark

    for s in range(1, 7):
        write_trainer_mark(tmp_path / "checkpoints" / f"step_{s}" / "trainer")
        if s != 3:
            write_orchestrator_mark(tmp_path / "checkpoints" / f"step_{s}" / "orchestrator.pt", s)
    calls = []
    real = verify_mod.scan_checkpoints
    monkeypatch.setattr(verify_mod, "scan_checkpoints", lambda root: calls.append(root) or real(root))
    reports = verify_path(tmp_path, allow_missing_manifest=True)
    assert len(calls) == 2, calls  # the targets, then the parts: not 1 + 6
    one_by_one = [verify_step(tmp_path / "checkpoints" / f"step_{s}", allow_missing_manifest=True) for s in range(1, 7)]
    assert [r.to_dict() for r in reports] == [r.to_dict() for r in one_by_one]
    assert [r.status for r in reports] == ["ok", "ok", "incomplete", "ok", "ok", "ok"]


def test_write_manifest_trusts_a_known_digest_only_at_the_files_size(tmp_path, monkeypatch, caplog):
    step = tmp_path / "checkpoints" / "step_2"
    (step / "trainer").mkdir(parents=True)
    (step / "trainer" / "__0_0.distcp").write_bytes(b"x" * 100)
    (step / "trainer" / ".metadata").write_bytes(b"m" * 10)
    hashed: list[str] = []
    real = manifest_record_mod.hash_file
    monkeypatch.setattr(manifest_record_mod, "hash_file", lambda p, *a, **k: hashed.append(p.name) or real(p, *a, **k))
    write_manifest(step, known={"trainer/__0_0.distcp": (100, "0123456789abcdef")})
    entries = {f["path"]: f for f in read_manifest(step)["files"]}
    assert hashed == [".metadata"] and entries["trainer/__0_0.distcp"]["xxh3_64"] == "0123456789abcdef"
    # a known size that is not the file's: read and hashed, the real digest recorded
    hashed.clear()
    caplog.set_level("WARNING", logger="prime_ckpt.manifest_record")
    write_manifest(step, known={"trainer/__0_0.distcp": (99, "0123456789abcdef")})
    assert "100 bytes on storage, 99 written" in caplog.text
    entries = {f["path"]: f for f in read_manifest(step)["files"]}
    assert sorted(hashed) == [".metadata", "__0_0.distcp"]
    assert entries["trainer/__0_0.distcp"]["xxh3_64"] == xxhash.xxh3_64_hexdigest(b"x" * 100)
