"""WeightsPublisher: sharded, asynchronous, Hugging Face layout, COMPLETE last."""

from __future__ import annotations

import json
import stat
import struct

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.torch import load as st_load
from typer.testing import CliRunner

from prime_ckpt.cli import app
from prime_ckpt.layout import SAFETENSORS_INDEX_FILE, WEIGHTS_MARKER, RunLayout, scan_weights, weights_files
from prime_ckpt.manifest import verify_path
from prime_ckpt.publisher import (
    TensorSpec,
    WeightsPublisher,
    WeightsPublishError,
    assign_owners,
    chunk_bounds,
    safetensors_header,
)
from prime_ckpt.weights import load_weights, wait_for_weights


# -- pure parts ---------------------------------------------------------------------------------
@given(size=st.integers(0, 300), parts=st.integers(1, 9))
def test_chunk_bounds_match_torch_chunk(size, parts):
    """The owner places each rank's slice where DTensor's Shard (torch.chunk) put it."""
    chunks = torch.arange(size).chunk(parts) if size else ()
    for i in range(parts):
        start, stop = chunk_bounds(size, parts, i)
        want = chunks[i].tolist() if i < len(chunks) else []
        assert list(range(start, stop)) == want


@given(sizes=st.lists(st.integers(0, 10_000), max_size=40), world=st.integers(1, 8))
def test_assign_owners_balances_bytes(sizes, world):
    owners = assign_owners(sizes, world)
    assert owners == assign_owners(list(sizes), world)  # deterministic
    assert all(0 <= o < world for o in owners) and len(owners) == len(sizes)
    load = [sum(s for s, o in zip(sizes, owners) if o == r) for r in range(world)]
    # greedy largest-first: no rank exceeds another by more than the largest tensor
    assert max(load) - min(load) <= max(sizes, default=0)


DTYPES = [torch.float32, torch.bfloat16, torch.float16, torch.int64, torch.int8, torch.bool, torch.float64]


@settings(max_examples=60, deadline=None)
@given(
    shapes=st.lists(st.lists(st.integers(0, 5), max_size=3), min_size=1, max_size=5),
    dtypes=st.lists(st.sampled_from(DTYPES), min_size=5, max_size=5),
)
def test_safetensors_header_is_read_by_safetensors(shapes, dtypes):
    """Our streamed header + raw bytes is a file the safetensors library reads back exactly."""
    tensors = {}
    for i, shape in enumerate(shapes):
        t = (torch.randn(shape) * 100).to(dtypes[i]) if dtypes[i] != torch.bool else torch.randn(shape) > 0
        tensors[f"layer.{i}.w"] = t
    specs = [TensorSpec(n, tuple(t.shape), t.dtype, owner=0) for n, t in tensors.items()]
    blob = safetensors_header(specs) + b"".join(t.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes() for t in tensors.values())
    (n,) = struct.unpack("<Q", blob[:8])
    assert (8 + n) % 8 == 0  # data aligned as the library aligns it
    got = st_load(blob)
    assert set(got) == set(tensors)
    for k, t in tensors.items():
        assert got[k].dtype == t.dtype and got[k].shape == t.shape and torch.equal(got[k], t), k


# -- one process --------------------------------------------------------------------------------
class Small(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.emb = torch.nn.Embedding(33, 8)
        self.proj = torch.nn.Linear(8, 5)
        self.register_buffer("steps", torch.tensor([3], dtype=torch.int64))
        self.register_buffer("scratch", torch.zeros(2), persistent=False)


@pytest.mark.parametrize("save_async", [True, False])
def test_publish_single_process_roundtrip(tmp_path, save_async):
    model = Small()
    want = {k: v.detach().clone() for k, v in model.state_dict().items()}
    with WeightsPublisher(tmp_path, save_async=save_async, config={"hidden": 8}) as pub:
        rec = pub.publish(4, model)
        with torch.no_grad():  # snapshot semantics: after publish() returns
            for p in model.parameters():
                p.mul_(-2.0)
        done = pub.wait() if save_async else rec
    assert done is rec and rec.error is None and rec.ready_s is not None and rec.staged_bytes > 0
    step_dir = RunLayout(tmp_path).weights_step_dir(4)
    sd, config = load_weights(step_dir)
    assert config == {"hidden": 8}
    assert set(sd) == set(want) == {"emb.weight", "proj.weight", "proj.bias", "steps"}  # no non-persistent buffer
    for k, v in want.items():
        assert torch.equal(sd[k], v), k
    names = sorted(p.name for p in step_dir.iterdir())
    assert names == ["COMPLETE", "config.json", "manifest.json", "model-00001-of-00001.safetensors", SAFETENSORS_INDEX_FILE]
    assert all(stat.S_IMODE(p.stat().st_mode) == 0o644 for p in step_dir.iterdir())
    index = json.loads((step_dir / SAFETENSORS_INDEX_FILE).read_text())
    assert index["metadata"]["total_size"] == sum(v.numel() * v.element_size() for v in want.values())
    assert set(index["weight_map"].values()) == {"model-00001-of-00001.safetensors"}


def test_publish_export_dtype_casts_floats_only(tmp_path):
    model = Small()
    want = {k: v.detach().clone() for k, v in model.state_dict().items()}
    with WeightsPublisher(tmp_path, save_async=True, dtype="bfloat16") as pub:
        pub.publish(1, model)
    sd, _ = load_weights(RunLayout(tmp_path).weights_step_dir(1))
    assert sd["steps"].dtype == torch.int64 and torch.equal(sd["steps"], want["steps"])
    for k in ("emb.weight", "proj.weight", "proj.bias"):
        assert sd[k].dtype == torch.bfloat16 and torch.equal(sd[k], want[k].to(torch.bfloat16)), k


def test_publish_bad_dtype_names_the_value(tmp_path):
    with pytest.raises(ValueError, match="weights dtype 'fp8'"):
        WeightsPublisher(tmp_path, dtype="fp8")


def test_failed_publish_raises_at_next_call_and_leaves_no_complete(tmp_path, monkeypatch):
    import prime_ckpt.redistribute as mod  # where the shard write looks up atomic_write_streamed

    model = Small()
    pub = WeightsPublisher(tmp_path, save_async=True)
    pub.publish(1, model)
    pub.wait()

    def broken(path, write):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(mod, "atomic_write_streamed", broken)
    pub.publish(2, model)  # returns after staging; the failure is in the background
    with pytest.raises(WeightsPublishError, match=r"step_2: publishing weights step 2 failed \(rank 0: OSError: .*No space") as e:
        pub.publish(3, model)
    assert e.value.step == 2 and list(e.value.failures) == [0]
    monkeypatch.undo()
    pub.close()
    assert {w.step: w.complete for w in scan_weights(tmp_path)} == {1: True, 2: False}
    assert not (RunLayout(tmp_path).weights_step_dir(2) / WEIGHTS_MARKER).exists()
    with pytest.raises(RuntimeError, match="after close"):
        pub.publish(4, model)


def test_republishing_a_step_replaces_a_stale_directory(tmp_path):
    stale = RunLayout(tmp_path).weights_step_dir(1)
    stale.mkdir(parents=True)
    (stale / "model-00001-of-00009.safetensors").write_bytes(b"old run")
    with WeightsPublisher(tmp_path, save_async=False) as pub:
        pub.publish(1, Small())
    assert not (stale / "model-00001-of-00009.safetensors").exists()
    assert verify_path(stale)[0].status == "ok"


def test_republishing_a_complete_step_sets_the_earlier_one_aside_and_a_foreign_dir_is_refused(tmp_path):
    with WeightsPublisher(tmp_path, save_async=False) as pub:
        pub.publish(1, Small())
    first = {p.name: p.read_bytes() for p in RunLayout(tmp_path).weights_step_dir(1).iterdir()}
    model = Small()
    with torch.no_grad():
        model.proj.weight.add_(1.0)
    with WeightsPublisher(tmp_path, save_async=False) as pub:
        pub.publish(1, model)
    [aside] = list((tmp_path / "superseded").glob("*-republish-step_1-*/weights/step_1"))
    assert {p.name: p.read_bytes() for p in aside.iterdir()} == first  # nothing lost
    got, _ = load_weights(RunLayout(tmp_path).weights_step_dir(1))
    assert torch.equal(got["proj.weight"], model.proj.weight.detach())
    foreign = RunLayout(tmp_path).weights_step_dir(2)
    foreign.mkdir(parents=True)
    (foreign / "pytorch_model.bin").write_bytes(b"someone else's")
    with pytest.raises(WeightsPublishError, match=r"step_2: not this project's weights directory"), \
            WeightsPublisher(tmp_path, save_async=False) as pub:
        pub.publish(2, Small())
    assert (foreign / "pytorch_model.bin").read_bytes() == b"someone else's"


def test_verify_names_a_flipped_shard_and_inspect_reads_every_shard(tmp_path):
    with WeightsPublisher(tmp_path, save_async=False) as pub:
        pub.publish(2, Small())
    step_dir = RunLayout(tmp_path).weights_step_dir(2)
    runner = CliRunner()
    res = runner.invoke(app, ["inspect", str(step_dir), "--json"])
    assert res.exit_code == 0, res.output
    info = json.loads(res.output)
    assert sorted(t["name"] for t in info["tensors"]) == ["emb.weight", "proj.bias", "proj.weight", "steps"]
    assert info["complete"] is True and not info["problems"]
    assert runner.invoke(app, ["verify", str(tmp_path)]).exit_code == 0
    shard = step_dir / "model-00001-of-00001.safetensors"
    data = bytearray(shard.read_bytes())
    data[-1] ^= 0xFF
    shard.write_bytes(bytes(data))
    res = runner.invoke(app, ["verify", str(tmp_path)])
    assert res.exit_code == 1 and "model-00001-of-00001.safetensors" in res.output, res.output


def test_weights_files_refuses_an_index_that_points_outside(tmp_path):
    d = tmp_path / "weights" / "step_1"
    d.mkdir(parents=True)
    (d / SAFETENSORS_INDEX_FILE).write_text(json.dumps({"weight_map": {"w": "../../evil.safetensors"}}))
    with pytest.raises(ValueError, match="not a .safetensors file in this directory"):
        weights_files(d)


def test_publish_to_object_storage(tmp_path):
    """memory:// (fsspec): the shard streams into one object; COMPLETE last; readers agree."""
    import uuid

    root = f"memory://pub-{uuid.uuid4().hex}/run"
    model = Small()
    with WeightsPublisher(root, save_async=True, config={"k": 1}) as pub:
        pub.publish(7, model)
    assert wait_for_weights(root, 7, timeout=10).name == "step_7"
    sd, config = load_weights(RunLayout(root).weights_step_dir(7))
    assert config == {"k": 1}
    for k, v in model.state_dict().items():
        assert torch.equal(sd[k], v), k
    assert all(r.status == "ok" for r in verify_path(root + "/weights"))


# -- FSDP2 + transformers, several ranks --------------------------------------------------------
@pytest.mark.parametrize(
    "nproc,mode,dtype,tie",
    [(1, "sync", "float32", ""), (2, "async", "bfloat16", ""), (3, "async", "float32", "tie")],
)
def test_fsdp2_llama_publish_loads_with_from_pretrained(tmp_path, run_ranks, nproc, mode, dtype, tie):
    """World sizes 1, 2, 3 (vocab 259 splits unevenly): ``from_pretrained`` equals the trainer's
    full parameters bitwise in the export dtype; snapshot semantics; 0644; verify; a failing
    rank's step gets no COMPLETE and every rank raises naming it."""
    args = [str(tmp_path / "out"), mode, dtype] + ([tie] if tie else [])
    out = run_ranks("publish_hf.py", *args, nproc=nproc, timeout=240).stdout
    assert "from_pretrained equals the trainer's parameters bitwise" in out, out[-3000:]
    assert out.count("WeightsPublishError:") == nproc, out[-3000:]
    assert "step 2 incomplete, step 1 untouched" in out


def test_bad_dtype_and_step_types_are_refused(tmp_path):
    """Only the float dtypes inference engines load (an int8 'export' published zeros)."""
    for bad in (torch.int8, torch.float64, torch.complex64):
        with pytest.raises(ValueError, match="weights dtype"):
            WeightsPublisher(tmp_path, dtype=bad)
    with WeightsPublisher(tmp_path, save_async=False) as pub:
        for bad in ("3", True, -1, 2.0):
            with pytest.raises(ValueError, match="step must be an int >= 0"):
                pub.publish(bad, Small())


def test_a_truncated_shard_is_named_by_every_reader(tmp_path):
    """load_weights and convert say which shard is short (one line), never a library traceback."""
    from prime_ckpt.convert import ConvertError, open_source

    with WeightsPublisher(tmp_path, save_async=False) as pub:
        pub.publish(1, Small())
    step_dir = RunLayout(tmp_path).weights_step_dir(1)
    shard = step_dir / "model-00001-of-00001.safetensors"
    shard.write_bytes(shard.read_bytes()[:-100])
    with pytest.raises(ValueError, match=r"model-00001-of-00001.safetensors: size \d+ != \d+ declared by its header"):
        load_weights(step_dir)
    with pytest.raises(ConvertError, match=r"model-00001-of-00001.safetensors: size \d+ != \d+ declared by its header"):
        open_source(step_dir)
