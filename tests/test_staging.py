"""ReusedBufferStager: buffers reused across saves, bitwise-equal copies, snapshot semantics."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp

from prime_ckpt.staging import ReusedBufferStager


def _leaves(x, prefix=""):
    if isinstance(x, dict):
        for k, v in x.items():
            yield from _leaves(v, f"{prefix}.{k}")
    elif isinstance(x, (list, tuple)):
        for i, v in enumerate(x):
            yield from _leaves(v, f"{prefix}[{i}]")
    else:
        yield prefix, x


def _bits(t: torch.Tensor) -> bytes:
    return t.detach().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()


def _state() -> dict:
    base = torch.randn(8, 6)
    nan = torch.randn(5)
    nan[1] = float("nan")
    nan[2] = -0.0
    return {
        "model": {"w": torch.randn(4, 3, requires_grad=True), "b": torch.randn(3).to(torch.bfloat16)},
        "optimizer": {
            "exp_avg": base[2:6],  # a view into a larger storage
            "exp_avg_t": base.t(),  # non-contiguous, same storage as exp_avg
            "step": torch.tensor(7.0),  # 0-dim
            "ids": torch.arange(10, dtype=torch.int64),
            "nan": nan,
            "lr": 1e-3,
            "betas": (0.9, 0.999),
        },
        "progress": {"step": 3, "name": "run"},
        "history": [1, 2, [3, 4]],
    }


def test_copies_are_bitwise_equal_and_structure_kept():
    sd = _state()
    staged = ReusedBufferStager().stage(sd)
    src, out = dict(_leaves(sd)), dict(_leaves(staged))
    assert src.keys() == out.keys()
    for k, v in src.items():
        if isinstance(v, torch.Tensor):
            assert out[k].device.type == "cpu"
            assert out[k].dtype == v.dtype and out[k].shape == v.shape, k
            assert _bits(out[k]) == _bits(v), k
            assert out[k].untyped_storage().data_ptr() != v.untyped_storage().data_ptr(), k
            assert not out[k].requires_grad
        else:
            assert out[k] == v, k
    assert isinstance(staged["optimizer"]["betas"], tuple)


def test_buffers_reused_across_saves():
    sd = _state()
    stager = ReusedBufferStager()
    first = stager.stage(sd)
    ptrs = {k: v.data_ptr() for k, v in _leaves(first) if isinstance(v, torch.Tensor)}
    assert stager.last_new_buffers == len(ptrs)
    held = stager.buffer_bytes
    # Train a bit: values change in place, storages stay.
    with torch.no_grad():
        for _, v in _leaves(sd):
            if isinstance(v, torch.Tensor) and v.is_floating_point():
                v.add_(1)
    second = stager.stage(sd)
    assert stager.last_new_buffers == 0
    assert stager.buffer_bytes == held
    for k, v in _leaves(second):
        if isinstance(v, torch.Tensor):
            assert v.data_ptr() == ptrs[k], f"{k}: staging buffer not reused"
            assert _bits(v) == _bits(dict(_leaves(sd))[k]), k
    stager.close()
    assert stager.buffer_bytes == 0


def test_same_tensor_twice_is_staged_once():
    t = torch.randn(16)
    stager = ReusedBufferStager()
    staged = stager.stage({"a": t, "b": t})
    assert staged["a"] is staged["b"]
    assert stager.last_staged_bytes == t.numel() * t.element_size()


def test_new_shape_gets_a_new_buffer():
    stager = ReusedBufferStager()
    t = torch.randn(6)
    p0 = stager.stage({"t": t})["t"].data_ptr()
    staged = stager.stage({"t": t.view(2, 3)})["t"]
    assert staged.shape == (2, 3) and torch.equal(staged.reshape(-1), t)
    assert stager.last_new_buffers == 1
    assert stager.stage({"t": t})["t"].data_ptr() == p0


def test_snapshot_semantics():
    sd = _state()
    expected = {k: (_bits(v) if isinstance(v, torch.Tensor) else repr(v)) for k, v in _leaves(sd)}
    staged = ReusedBufferStager().stage(sd)
    # Mutate everything after stage() returned.
    with torch.no_grad():
        for _, v in _leaves(sd):
            if isinstance(v, torch.Tensor):
                v.zero_() if v.dtype != torch.bool else v.logical_not_()
    sd["progress"]["step"] = 99
    sd["history"][2].append(5)
    sd["history"].append(6)
    got = {k: (_bits(v) if isinstance(v, torch.Tensor) else repr(v)) for k, v in _leaves(staged)}
    assert got == expected


def test_async_save_snapshot_round_trip(tmp_path):
    """dcp.async_save with the stager: what is on disk is the state when async_save returned."""
    sd = {"w": torch.randn(64, 64), "opt": {"m": torch.randn(64), "step": torch.tensor(1.0)}}
    want = {k: v.clone() for k, v in _leaves(sd)}
    stager = ReusedBufferStager()
    for step in range(2):  # the second save goes through the reused buffers
        res = dcp.async_save(sd, checkpoint_id=str(tmp_path / f"s{step}"), async_stager=stager)
        want = {k: v.clone() for k, v in _leaves(sd)}
        with torch.no_grad():  # training continues while the write runs
            sd["w"].add_(1)
            sd["opt"]["m"].mul_(2)
        getattr(res, "upload_completion", res).result()
        out = {"w": torch.zeros(64, 64), "opt": {"m": torch.zeros(64), "step": torch.tensor(0.0)}}
        dcp.load(out, checkpoint_id=str(tmp_path / f"s{step}"))
        for k, v in _leaves(out):
            assert _bits(v) == _bits(want[k]), (step, k)
    stager.close()


@pytest.fixture
def one_rank_group():
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    yield
    dist.destroy_process_group()


def test_dtensor_rewrapped_with_same_spec_and_reused(one_rank_group):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import DTensor, Shard, distribute_tensor

    mesh = init_device_mesh("cpu", (1,))
    d = distribute_tensor(torch.randn(8, 4), mesh, [Shard(0)])
    stager = ReusedBufferStager()
    s1 = stager.stage({"d": d})["d"]
    assert isinstance(s1, DTensor)
    assert s1.placements == d.placements and s1.shape == d.shape
    assert _bits(s1.to_local()) == _bits(d.to_local())
    ptr = s1.to_local().data_ptr()
    with torch.no_grad():
        d.to_local().add_(3)
    s2 = stager.stage({"d": d})["d"]
    assert s2.to_local().data_ptr() == ptr
    assert _bits(s2.to_local()) == _bits(d.to_local())
    assert np.array_equal(s1.to_local().numpy(), s2.to_local().numpy())  # same buffer, new contents


def test_staged_bytes_count_every_tensor_once(one_rank_group):
    """``last_staged_bytes`` (what an async save records as its bytes) equals the bytes of the
    state's tensors, DTensors counted by their local shard, for a state without shared tensors."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor

    from prime_ckpt.trainer import local_tensor_bytes

    mesh = init_device_mesh("cpu", (1,))
    sd = {
        "d": distribute_tensor(torch.randn(8, 4), mesh, [Shard(0)]),
        "w": torch.randn(4, 3, requires_grad=True),
        "h": torch.zeros(5, dtype=torch.float16),
        "step": torch.tensor(3),
        "lr": 0.1,
    }
    stager = ReusedBufferStager()
    stager.stage(sd)
    assert stager.last_staged_bytes == local_tensor_bytes(sd) == 8 * 4 * 4 + 4 * 3 * 4 + 5 * 2 + 8


def test_stage_casts_floats_to_the_export_dtype_and_reuses_the_buffers():
    """dtype=bf16 (weights publishing from fp32 master weights): the staged copy equals
    ``Tensor.to(bf16)`` bitwise, integers keep their dtype, and buffers are reused."""
    stager = ReusedBufferStager(dtype=torch.bfloat16)
    state = {"w": torch.randn(7, 5) * 1e3, "ids": torch.arange(4), "half": torch.randn(3).half()}
    staged = stager.stage(state)
    assert staged["w"].dtype == torch.bfloat16 and torch.equal(staged["w"], state["w"].to(torch.bfloat16))
    assert staged["half"].dtype == torch.bfloat16 and torch.equal(staged["half"], state["half"].to(torch.bfloat16))
    assert staged["ids"].dtype == torch.int64 and torch.equal(staged["ids"], state["ids"])
    assert stager.last_staged_bytes == 7 * 5 * 2 + 4 * 8 + 3 * 2
    state["w"].add_(1.0)
    again = stager.stage(state)
    assert stager.last_new_buffers == 0 and again["w"].data_ptr() == staged["w"].data_ptr()
    assert torch.equal(again["w"], state["w"].to(torch.bfloat16))
