"""Other tools' layouts (#16 items 3-4): `dcp.save(use_collectives=False)`, DCP's HuggingFace
writer (distributed shards, consolidated), torchtitan's `checkpoint/step-<N>` folder. Each is
written for real under 2-rank torchrun (tests/dist_scripts/foreign_layouts.py) and read back by
inspect / list / convert / diff, bitwise against the tensors that were saved."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

from prime_ckpt.cli import app
from prime_ckpt.dcp_metadata import read_dcp_metadata
from prime_ckpt.foreign import assembled_shapes, sharding_info, titan_folder, titan_step

runner = CliRunner()


@pytest.fixture(scope="module")
def layouts(tmp_path_factory) -> Path:
    from conftest import torchrun

    out = tmp_path_factory.mktemp("foreign")
    torchrun("foreign_layouts.py", str(out), timeout=240)
    return out


def _cli(*args: str):
    return runner.invoke(app, list(args))


def _inspect(path: Path) -> dict:
    r = _cli("inspect", str(path), "--json")
    assert r.exit_code == 0, r.output
    return json.loads(r.stdout)


def _bitwise_equal(got: dict[str, torch.Tensor], ref: dict[str, torch.Tensor]) -> None:
    assert set(got) == set(ref)
    for k in ref:
        assert got[k].dtype == ref[k].dtype and got[k].shape == ref[k].shape, k
        assert torch.equal(got[k].view(torch.uint8), ref[k].view(torch.uint8)), k


def _reference(layouts: Path) -> dict[str, torch.Tensor]:
    return torch.load(layouts / "reference.pt", weights_only=True)


# -- dcp.save(use_collectives=False): per-rank metadata ------------------------------------------
def test_per_rank_metadata_is_merged(layouts):
    d = layouts / "no_collectives"
    assert not (d / ".metadata").exists() and (d / "__0.metadata").is_file() and (d / "__1.metadata").is_file()
    got = _inspect(d)
    assert got["kind"] == "trainer" and not got["problems"]
    tr = got["trainer"]
    assert tr["complete"] and tr["metadata_files"] == ["__0.metadata", "__1.metadata"] and tr["world_size"] == 2
    rows = {t["name"]: (t["shape"], t["dtype"], t["chunks"]) for t in tr["tensors"]}
    assert rows == {
        "model.layers.0.weight": ([33, 4], "float32", 2),  # one chunk per rank, merged
        "model.layers.0.bias": ([4], "float32", 1),  # replicated: both ranks saved it, kept once
        "model.tok_embeddings.weight": ([10, 6], "bfloat16", 2),
    }
    assert [n["name"] for n in tr["non_tensors"]] == ["step"]
    # torch-free and torch modes merge to the same table
    free, backed = read_dcp_metadata(d, torch_free=True), read_dcp_metadata(d, torch_free=False)
    assert {k: [tuple(c.offsets) for c in v.chunks] for k, v in free.state_dict_metadata.items() if hasattr(v, "chunks")} == {
        k: [tuple(c.offsets) for c in v.chunks] for k, v in backed.state_dict_metadata.items() if hasattr(v, "chunks")
    }


def test_per_rank_metadata_converts_bitwise(layouts, tmp_path):
    r = _cli("convert", str(layouts / "no_collectives"), str(tmp_path / "m.safetensors"), "--to", "safetensors")
    assert r.exit_code == 0, r.output
    _bitwise_equal(load_file(tmp_path / "m.safetensors"), _reference(layouts))
    r = _cli("convert", str(layouts / "no_collectives"), str(tmp_path / "all.pt"), "--to", "torch-save")
    assert r.exit_code == 0, r.output
    assert torch.load(tmp_path / "all.pt", weights_only=True)["step"] == 3


# -- DCP's HuggingFace writer ----------------------------------------------------------------------
def test_hf_writer_shards_are_assembled_and_named(layouts):
    d = layouts / "hf_sharded"
    got = _inspect(d)
    assert got["kind"] == "safetensors_dir"
    ref = _reference(layouts)
    assert {t["name"]: t["shape"] for t in got["tensors"]} == {k: list(v.shape) for k, v in ref.items()}
    assert "not consolidated" in got["problems"][0]
    one = _inspect(next(d.glob("shard-00002-*.safetensors")))
    assert one["kind"] == "safetensors_file" and not one["complete"]
    assert any("one rank's shard" in p for p in one["problems"])
    assert {t["name"]: t["shape"] for t in one["tensors"]}["layers.0.weight"] == [16, 4]  # rank 1's rows


@pytest.mark.parametrize("which", ["dir", "file"])
def test_hf_writer_shards_are_refused_by_convert_and_diff(layouts, tmp_path, which):
    d = layouts / "hf_sharded"
    src = d if which == "dir" else next(d.glob("shard-00001-*.safetensors"))
    r = _cli("convert", str(src), str(tmp_path / "x.safetensors"), "--to", "safetensors")
    assert r.exit_code == 2 and "one rank's shard" in r.output and "consolidate" in r.output, r.output
    assert len(r.output.strip().splitlines()) == 1 and not (tmp_path / "x.safetensors").exists()
    r = _cli("diff", str(src), str(layouts / "hf_consolidated"))
    assert r.exit_code == 2 and "one rank's shard" in r.output, r.output


def test_hf_writer_consolidated_is_a_model(layouts, tmp_path):
    d = layouts / "hf_consolidated"
    got = _inspect(d)
    assert got["kind"] == "safetensors_dir" and got["complete"] and not got["problems"]
    r = _cli("convert", str(d), str(tmp_path / "c.safetensors"), "--to", "safetensors")
    assert r.exit_code == 0, r.output
    _bitwise_equal(load_file(tmp_path / "c.safetensors"), _reference(layouts))


# -- torchtitan's run folder -----------------------------------------------------------------------
def test_torchtitan_folder_is_listed(layouts):
    dump = layouts / "titan"
    assert titan_folder(dump) == dump / "checkpoint"
    for target in (dump, dump / "checkpoint"):
        got = _inspect(target)
        assert got["kind"] == "torchtitan" and got["path"] == str(dump / "checkpoint")
        assert [(s["step"], s["complete"]) for s in got["checkpoints"]] == [(10, True), (20, True), (30, False)]
        assert got["latest_complete_step"] == 20 and "no .metadata" in got["problems"][0]
    r = _cli("list", str(dump), "--json")
    assert r.exit_code == 0, r.output
    table = json.loads(r.stdout)
    assert table["layout"] == "torchtitan" and table["latest_resumable_step"] == 20
    assert [(c["step"], c["complete"], c["resumable"]) for c in table["checkpoints"]] == [(10, True, True), (20, True, True), (30, False, False)]
    step = _inspect(dump / "checkpoint" / "step-20")
    assert step["kind"] == "trainer" and step["step"] == 20 and not step["problems"]


def test_torchtitan_folder_is_never_planned_or_pruned(layouts):
    before = sorted(p.relative_to(layouts) for p in (layouts / "titan").rglob("*"))
    for cmd in ("plan", "prune"):
        r = _cli(cmd, str(layouts / "titan" / "checkpoint"), "--keep", "1")
        assert r.exit_code == 2 and "torchtitan checkpoint folder" in r.output, r.output
    assert sorted(p.relative_to(layouts) for p in (layouts / "titan").rglob("*")) == before


def test_torchtitan_step_converts_and_diffs_bitwise(layouts, tmp_path):
    step = layouts / "titan" / "checkpoint" / "step-20"
    r = _cli("convert", str(step), str(tmp_path / "out"), "--to", "safetensors")
    assert r.exit_code == 0, r.output
    _bitwise_equal(load_file(tmp_path / "out" / "model.safetensors"), _reference(layouts))  # optimizer etc. left out
    r = _cli("diff", str(step), str(layouts / "hf_consolidated"), "--values")
    assert r.exit_code == 0 and "3 of 3 tensors equal (bitwise)" in r.output, r.output


# -- pure helpers ----------------------------------------------------------------------------------
def test_pure_helpers():
    assert titan_step("step-12") == 12 and titan_step("step_12") is None and titan_step("step-1a") is None
    plain = {"w": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}
    assert sharding_info(plain) is None and sharding_info({**plain, "__metadata__": {"format": "pt"}}) is None
    info = json.dumps({"w": {"saved_offsets": [2]}})
    shard = {**plain, "__metadata__": {"DCP_SHARDING_INFO": info}}
    assert sharding_info(shard) == {"w": [2]}
    with pytest.raises(ValueError, match="unreadable DCP_SHARDING_INFO"):
        sharding_info({**plain, "__metadata__": {"DCP_SHARDING_INFO": "{not json"}})
    first = {**plain, "__metadata__": {"DCP_SHARDING_INFO": json.dumps({"w": {"saved_offsets": [0]}})}}
    assert assembled_shapes([first, shard]) == {"w": [4]}


# -- review fixes: what a new user hit -------------------------------------------------------------
def test_hf_writer_rank0_save_is_a_model_not_shards(layouts, tmp_path):
    """A rank-0 HuggingFaceStorageWriter save records DCP_SHARDING_INFO too (offsets 0): it is a
    model (only shard-* files are rank shards)."""
    d = layouts / "hf_rank0"
    header_meta = json.loads(__import__("prime_ckpt.manifest", fromlist=["x"]).safetensors_header(next(d.glob("model-*.safetensors")))[0]["__metadata__"]["DCP_SHARDING_INFO"])
    assert header_meta  # the writer did record it
    got = _inspect(d)
    assert got["kind"] == "safetensors_dir" and got["complete"] and not got["problems"]
    r = _cli("convert", str(d), str(tmp_path / "r0.safetensors"), "--to", "safetensors")
    assert r.exit_code == 0, r.output
    _bitwise_equal(load_file(tmp_path / "r0.safetensors"), _reference(layouts))


def test_convert_never_writes_into_another_tools_checkpoint(layouts, tmp_path):
    src = layouts / "hf_rank0"
    in_progress = tmp_path / "dcp_in_progress"
    in_progress.mkdir()
    (in_progress / "__0_0.distcp").write_bytes(b"partial")
    targets = [layouts / "titan" / "checkpoint" / "step-30" / "x.safetensors", layouts / "titan" / "checkpoint" / "x.safetensors",
               in_progress / "x.safetensors", layouts / "hf_sharded" / "model.safetensors",
               layouts / "hf_consolidated" / "sharded" / "x.safetensors", layouts / "no_collectives" / "x.safetensors"]  # fmt: skip
    for out in targets:
        r = _cli("convert", str(src), str(out), "--to", "safetensors", "--force")
        assert r.exit_code == 2 and ": inside the " in r.output and "convert never writes into a checkpoint" in r.output, (out, r.output)
        assert not out.exists()


def test_convert_force_never_replaces_a_fifo_and_wants_the_suffix(layouts, tmp_path):
    import os

    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    r = _cli("convert", str(layouts / "hf_consolidated"), str(fifo), "--to", "safetensors", "--force")
    assert r.exit_code == 2 and "not a regular file" in r.output and fifo.is_fifo(), r.output
    r = _cli("convert", str(layouts / "hf_consolidated"), str(tmp_path / "m.st"), "--to", "safetensors")
    assert r.exit_code == 2 and "ends with .safetensors" in r.output and not (tmp_path / "m.st").exists(), r.output


def test_torchtitan_step_in_progress_and_list_options(layouts):
    got = _inspect(layouts / "titan" / "checkpoint" / "step-30")
    assert got["kind"] == "trainer" and got["step"] == 30 and not got["trainer"]["complete"] and got["problems"]
    r = _cli("list", str(layouts / "titan"), "--keep", "1")
    assert r.exit_code == 2 and "retention options do not apply" in r.output, r.output


def test_an_unknown_safetensors_dtype_is_a_problem(tmp_path):
    import struct

    text = json.dumps({"w": {"dtype": "F99", "shape": [2], "data_offsets": [0, 8]}}).encode()
    f = tmp_path / "odd.safetensors"
    f.write_bytes(struct.pack("<Q", len(text)) + text + bytes(8))
    got = _inspect(f)
    assert any("unknown dtype 'F99'" in p for p in got["problems"]) and not got["complete"]
