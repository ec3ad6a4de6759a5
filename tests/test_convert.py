"""prime_ckpt.convert: DCP -> torch.save / safetensors and torch.save -> DCP on real checkpoints,
bitwise against the tensors the run had in memory; safe loads; outputs never clobber."""

from __future__ import annotations

import os
import pickle

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

from prime_ckpt.convert import (
    ConvertError,
    dcp_to_torch_save,
    open_source,
    to_safetensors,
    torch_save_to_dcp,
)


@pytest.fixture
def two(run_ranks, tmp_path_factory):
    return two_rank_run(run_ranks, tmp_path_factory)


def _bitwise(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(a.reshape(-1).view(torch.uint8), b.reshape(-1).view(torch.uint8))


def test_dcp_to_torch_save_is_bitwise_equal_to_the_live_state(tmp_path, two):
    run, ref = two
    before = snapshot(run)
    for step in (2, 4):  # step 2 saved sync, step 4 async
        out = tmp_path / f"step_{step}.pt"
        result = dcp_to_torch_save(run / "checkpoints" / f"step_{step}", out)
        sd = torch.load(out, weights_only=True)
        expected = torch.load(ref / f"step_{step}.pt", weights_only=True)
        app = sd["app"]
        for name, shape in TWO_RANK_MODEL.items():
            assert list(app["model"][name].shape) == shape
            assert _bitwise(app["model"][name], expected[f"model.{name}"]), name
            for k in ("exp_avg", "exp_avg_sq", "step"):
                assert _bitwise(app["optimizer"]["state"][name][k], expected[f"optim.{name}.{k}"]), (name, k)
        assert app["progress"] == {"step": step, "total_samples": 5 * step, "total_tokens": 40 * step}
        assert sorted(app["rank_state"]) == ["rank_0", "rank_1"]
        assert result.format == "torch-save" and result.tensors == 22
    assert snapshot(run) == before


def test_dcp_to_safetensors_model_only(tmp_path, two):
    run, ref = two
    expected = torch.load(ref / "step_4.pt", weights_only=True)
    out = tmp_path / "hf" / "model.safetensors"
    r = to_safetensors(run / "checkpoints" / "step_4" / "trainer", out)
    got = load_file(str(out))
    assert sorted(got) == sorted(TWO_RANK_MODEL)
    assert all(_bitwise(got[k], expected[f"model.{k}"]) for k in TWO_RANK_MODEL)
    assert r.tensors == 4 and r.bytes == sum(v.numel() * 4 for v in got.values())
    # the weights the run wrote at step 4 hold the same tensors
    weights = load_file(str(run / "weights" / "step_4" / "model.safetensors"))
    assert all(_bitwise(got[k], weights[k]) for k in TWO_RANK_MODEL)
    bf16 = tmp_path / "bf16.safetensors"
    to_safetensors(run / "checkpoints" / "step_4", bf16, dtype="bf16")
    cast = load_file(str(bf16))
    assert all(_bitwise(cast[k], expected[f"model.{k}"].to(torch.bfloat16)) for k in TWO_RANK_MODEL)


def test_weights_dir_to_safetensors_and_mixed_dtypes(tmp_path, tmp_path_factory):
    run, sd = one_proc_run(tmp_path_factory)
    out = tmp_path / "w.safetensors"
    to_safetensors(run / "weights" / "step_4", out)
    got = load_file(str(out))
    assert {k: v.dtype for k, v in got.items()} == {"0.weight": torch.float32, "0.bias": torch.float32, "1.weight": torch.bfloat16}
    assert all(_bitwise(got[k], sd[k]) for k in sd)
    out2 = tmp_path / "fp32.safetensors"
    to_safetensors(run / "checkpoints" / "step_4", out2, dtype="fp32")
    assert _bitwise(load_file(str(out2))["1.weight"], sd["1.weight"].float())


def test_torch_save_to_dcp_round_trip(tmp_path, two):
    run, _ = two
    pt = tmp_path / "full.pt"
    dcp_to_torch_save(run / "checkpoints" / "step_4", pt)
    out = tmp_path / "dcp"
    r = torch_save_to_dcp(pt, out)
    assert r.wrapped_in_app is False and (out / ".metadata").is_file()
    a, b = open_source(run / "checkpoints" / "step_4"), open_source(out)
    assert a.tensors == b.tensors and sorted(a.non_tensors) == sorted(b.non_tensors)
    for name in a.tensors:
        assert _bitwise(a.load([name])[name], b.load([name])[name]), name


def test_seed_single_file_trainer_pt_is_brought_in(tmp_path):
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 2)
    seed = {"model": model.state_dict(), "progress": {"step": 7, "total_samples": 70, "total_tokens": 700}}
    pt = tmp_path / "step_7" / "trainer.pt"
    pt.parent.mkdir()
    torch.save(seed, pt)
    out = tmp_path / "run" / "checkpoints" / "step_7" / "trainer"
    r = torch_save_to_dcp(pt, out)
    assert r.wrapped_in_app is True
    src = open_source(out)
    assert sorted(src.tensors) == ["app.model.bias", "app.model.weight"]
    assert _bitwise(src.load(["app.model.weight"])["app.model.weight"], model.weight.detach())
    assert src.load_values(["app.progress.step"]) == {"app.progress.step": 7}


class _Evil:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_torch_save_input_is_loaded_weights_only(tmp_path):
    pt = tmp_path / "evil.pt"
    with open(pt, "wb") as f:
        pickle.dump({"model": _Evil(tmp_path / "pwned")}, f)
    with pytest.raises(ConvertError, match="not a torch.save file loadable with weights_only=True"):
        torch_save_to_dcp(pt, tmp_path / "out")
    assert not (tmp_path / "pwned").exists() and not (tmp_path / "out").exists()


def test_outputs_never_clobber_or_overlap(tmp_path, tmp_path_factory):
    run = copy_run(one_proc_run(tmp_path_factory)[0], tmp_path / "run")
    step = run / "checkpoints" / "step_4"
    existing = tmp_path / "exists.pt"
    existing.write_bytes(b"keep me")
    with pytest.raises(ConvertError, match="already exists"):
        dcp_to_torch_save(step, existing)
    assert existing.read_bytes() == b"keep me"
    dcp_to_torch_save(step, existing, force=True)
    assert "app" in torch.load(existing, weights_only=True)
    with pytest.raises(ConvertError, match="overlaps the input"):
        to_safetensors(step / "trainer", step / "model.safetensors")
    (tmp_path / "a_dir").mkdir()
    with pytest.raises(ConvertError, match="is a directory"):
        dcp_to_torch_save(step, tmp_path / "a_dir", force=True)
    with pytest.raises(ConvertError, match="not an empty directory; convert never replaces it"):
        torch_save_to_dcp(existing, run, force=True)  # would replace a whole run: refused
    assert (run / "checkpoints" / "step_4" / "trainer" / ".metadata").is_file()
    assert not list(tmp_path.glob(".*.tmp.*"))


def test_output_inside_any_checkpoint_is_refused_even_with_force(tmp_path, tmp_path_factory):
    """``--force`` never overwrites a part of another checkpoint: a file of a checkpoint step, of
    its ``trainer/`` DCP dir, of a weights step, a new file inside one, the same through a
    symlink, or a step's ``trainer/`` replaced by ``--from torch-save``. (Before: all written.)"""
    run = copy_run(one_proc_run(tmp_path_factory)[0], tmp_path / "run")
    src = run / "checkpoints" / "step_2"
    step4 = run / "checkpoints" / "step_4"
    weights = run / "weights" / "step_4"
    standalone = tmp_path / "exported_dcp"
    torch_save_to_dcp(dcp_to_torch_save(src, tmp_path / "x.pt").output, standalone)
    (tmp_path / "link").symlink_to(step4)
    (tmp_path / "dcp_link").symlink_to(standalone)
    before, before_dcp = snapshot(run), snapshot(standalone)
    cases = {
        step4 / "orchestrator.pt": step4,
        step4 / "trainer" / "__0_0.distcp": step4,
        step4 / "new" / "model.safetensors": step4,
        step4: step4,
        weights / "model.safetensors": weights,
        tmp_path / "link" / "orchestrator.pt": step4,
        standalone / "__0_0.distcp": standalone,
        tmp_path / "dcp_link" / "x.pt": standalone,
    }
    for out, inside in cases.items():
        for convert in (lambda o: dcp_to_torch_save(src, o, force=True), lambda o: to_safetensors(src, o, force=True)):
            with pytest.raises(ConvertError) as e:
                convert(out)
            msg = str(e.value)
            assert msg.startswith(f"{out}: inside the ") and str(inside) in msg and "\n" not in msg, msg
    for out in (step4 / "trainer", tmp_path / "link" / "trainer"):
        with pytest.raises(ConvertError, match=f"inside the checkpoint step {step4}"):
            torch_save_to_dcp(tmp_path / "x.pt", out, force=True)
    assert snapshot(run) == before and snapshot(standalone) == before_dcp
    assert not list(run.rglob(".*.tmp.*")) and not list(run.rglob("new"))
    from prime_ckpt.convert import checkpoint_containing

    assert all(checkpoint_containing(out)[0] == inside for out, inside in cases.items())
    # outside every checkpoint: a file may be replaced with --force; a DCP checkpoint never is
    assert checkpoint_containing(run / "exports" / "model.safetensors") is None
    assert checkpoint_containing(standalone) is None
    with pytest.raises(ConvertError, match="exists and is a DCP checkpoint; convert never replaces it, even with --force"):
        torch_save_to_dcp(tmp_path / "x.pt", standalone, force=True)
    assert snapshot(standalone) == before_dcp
    to_safetensors(src, run / "model.safetensors")


# -- checkpoints other tools wrote (#16 item 1) -------------------------------------------------
def _model_sd():
    torch.manual_seed(7)
    m = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Linear(3, 2))
    return {k: v.detach().clone() for k, v in m.state_dict().items()}


@pytest.mark.parametrize(
    "layout, key",
    [
        ("model_key", None),  # {"model": sd, "optim": ...}: accelerate / hand-written loops
        ("root", None),  # dcp.save(model.state_dict())
        ("torchtitan", None),  # model flattened to the root beside optimizer/lr_scheduler/train_state
        ("model_key", "model"),  # chosen explicitly
    ],
)
def test_other_tools_checkpoints_export_to_safetensors_bitwise(tmp_path, layout, key):
    import stat

    import torch.distributed.checkpoint as dcp
    from typer.testing import CliRunner

    from prime_ckpt.cli import app

    sd = _model_sd()
    other = {"optimizer": {"state": {"0.weight": {"exp_avg": torch.ones(3, 4)}}}, "lr_scheduler": {"last_epoch": 3},
             "train_state": {"step": 3}}
    state = {"model": sd, "optim": {"lr": torch.tensor(0.1)}} if layout == "model_key" else (
        dict(sd) if layout == "root" else {**sd, **other})
    ckpt = tmp_path / "ckpt"
    dcp.save(state, checkpoint_id=str(ckpt), no_dist=True)
    out = tmp_path / "export"  # no suffix: a directory receiving model.safetensors
    r = CliRunner().invoke(app, ["convert", str(ckpt), str(out), "--to", "safetensors", *(["--key", key] if key else [])])
    assert r.exit_code == 0, r.output
    got = load_file(out / "model.safetensors")
    assert set(got) == set(sd) and all(torch.equal(got[k], sd[k]) for k in sd)
    assert stat.S_IMODE(os.stat(out / "model.safetensors").st_mode) == 0o644
    r = CliRunner().invoke(app, ["diff", str(ckpt), str(out / "model.safetensors"), "--values"])
    assert r.exit_code == 0 and "identical" in r.stdout, r.output


def test_a_key_that_holds_nothing_is_one_line_and_torch_save_output_is_0644(tmp_path):
    import stat

    import torch.distributed.checkpoint as dcp
    from typer.testing import CliRunner

    from prime_ckpt.cli import app

    ckpt = tmp_path / "ckpt"
    dcp.save({"model": _model_sd()}, checkpoint_id=str(ckpt), no_dist=True)
    r = CliRunner().invoke(app, ["convert", str(ckpt), str(tmp_path / "x.safetensors"), "--to", "safetensors", "--key", "encoder"])
    assert r.exit_code == 2 and r.stderr.splitlines() == [
        f"error: {ckpt}: no tensors under --key 'encoder' (top-level keys: model)"], r.output
    r = CliRunner().invoke(app, ["convert", str(ckpt), str(tmp_path / "all.pt"), "--to", "torch-save"])
    assert r.exit_code == 0, r.output
    assert stat.S_IMODE(os.stat(tmp_path / "all.pt").st_mode) == 0o644


def test_bytesio_and_numpy_values_are_read_and_anything_else_is_named(tmp_path):
    """io.BytesIO entries (a documented DCP value type) and numpy arrays (np.random.get_state())
    convert and diff; a value of another type is refused with one line naming the entry and the
    type, and nothing runs (#16 item 2)."""
    import io

    import numpy as np
    import torch.distributed.checkpoint as dcp
    from typer.testing import CliRunner

    from prime_ckpt.cli import app

    np.random.seed(3)
    ckpt = tmp_path / "ckpt"
    state = {"model": _model_sd(), "blob": io.BytesIO(b"\x00raw bytes"), "np_rng": np.random.get_state(),
             "arr": np.arange(6, dtype=np.int16)}
    dcp.save(state, checkpoint_id=str(ckpt), no_dist=True)
    r = CliRunner().invoke(app, ["convert", str(ckpt), str(tmp_path / "all.pt"), "--to", "torch-save"])
    assert r.exit_code == 0, r.output
    back = torch.load(tmp_path / "all.pt", weights_only=False)
    assert back["blob"].getvalue() == b"\x00raw bytes" and back["np_rng"][0] == "MT19937"
    assert np.array_equal(back["np_rng"][1], state["np_rng"][1]) and np.array_equal(back["arr"], state["arr"])
    r = CliRunner().invoke(app, ["diff", str(ckpt), str(ckpt), "--values"])
    assert r.exit_code == 0 and "identical" in r.stdout, r.output

    evil = tmp_path / "evil"
    dcp.save({"model": _model_sd(), "obj": _Marker()}, checkpoint_id=str(evil), no_dist=True)
    r = CliRunner().invoke(app, ["convert", str(evil), str(tmp_path / "evil.pt"), "--to", "torch-save"])
    assert r.exit_code == 2 and r.stderr.splitlines() == [
        f"error: {evil}: entry 'obj' holds a {_Marker.__module__}._Marker: refused to load (tensors, plain values, "
        "numpy arrays and BytesIO are read); nothing was executed"], r.output
    assert not (tmp_path / "evil.pt").exists()


class _Marker:
    def __reduce__(self):
        return (_Marker, ())


def test_duplicate_flattened_keys_are_one_line_and_nothing_is_written(tmp_path):
    from typer.testing import CliRunner

    from prime_ckpt.cli import app

    src = tmp_path / "dup.pt"
    torch.save({"a.b": torch.ones(1), "a": {"b": torch.zeros(1)}}, src)
    r = CliRunner().invoke(app, ["convert", str(src), str(tmp_path / "out"), "--from", "torch-save"])
    assert r.exit_code == 2 and r.stderr.splitlines() == [
        f"error: {src}: duplicated flatten key app.a.b (two entries, e.g. 'a.b' and 'a': {{'b': ...}}, flatten to the "
        "same DCP key); nothing was written"], r.output
    assert sorted(os.listdir(tmp_path)) == ["dup.pt"]
