"""prime_ckpt.manifest: manifest.json of real checkpoints; verify finds every changed, missing
and extra file; hashing reads in chunks."""

from __future__ import annotations

import json

import pytest
import xxhash
from dist_scripts.cli2_runs import copy_run, one_proc_run, snapshot, two_rank_run

import prime_ckpt.manifest as manifest_mod
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
    monkeypatch.setattr(manifest_mod, "CHUNK_BYTES", 1000)
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
