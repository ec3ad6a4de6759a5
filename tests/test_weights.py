"""Inference weight checkpoints: safetensors + config + completion marker written last."""

import threading
import time

import pytest
import torch

from prime_ckpt.layout import RunLayout, scan_weights
from prime_ckpt.manifest import verify_manifest
from prime_ckpt.weights import (
    WeightsNotReadyError,
    load_weights,
    save_weights,
    wait_for_weights,
    write_weights,
)


def test_save_and_load_bitwise(tmp_path):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(5, 7), torch.nn.Linear(7, 2)).to(torch.bfloat16)
    d = save_weights(tmp_path, 3, model, {"d_model": 7})
    assert d == RunLayout(tmp_path).weights_step_dir(3)
    assert sorted(p.name for p in d.iterdir()) == ["COMPLETE", "config.json", "manifest.json", "model.safetensors"]
    assert verify_manifest(d).ok and verify_manifest(d).files_checked == 2
    sd, cfg = load_weights(d)
    assert cfg == {"d_model": 7, "step": 3}
    ref = model.state_dict()
    assert sd.keys() == ref.keys()
    for k in ref:
        assert sd[k].dtype == torch.bfloat16 and torch.equal(sd[k], ref[k])


def test_incomplete_is_not_loaded(tmp_path):
    d = write_weights(tmp_path / "weights" / "step_1", {"w": torch.ones(2)})
    (d / "COMPLETE").unlink()
    with pytest.raises(FileNotFoundError, match="step_1: weights missing or incomplete"):
        load_weights(d)
    assert [(w.step, w.complete) for w in scan_weights(tmp_path)] == [(1, False)]


def test_rewrite_replaces_stale_files(tmp_path):
    d = tmp_path / "weights" / "step_2"
    d.mkdir(parents=True)
    (d / "stale.bin").write_bytes(b"old")
    write_weights(d, {"w": torch.zeros(3)})
    assert sorted(p.name for p in d.iterdir()) == ["COMPLETE", "config.json", "manifest.json", "model.safetensors"]


def test_wait_for_weights(tmp_path):
    def later():
        time.sleep(0.3)
        write_weights(RunLayout(tmp_path).weights_step_dir(4), {"w": torch.ones(1)})

    t = threading.Thread(target=later)
    t.start()
    assert wait_for_weights(tmp_path, 4, timeout=30) == RunLayout(tmp_path).weights_step_dir(4)
    t.join()
    with pytest.raises(WeightsNotReadyError, match="step_5: not complete after"):
        wait_for_weights(tmp_path, 5, timeout=0.2)
    with pytest.raises(WeightsNotReadyError, match="producer stopped"):
        wait_for_weights(tmp_path, 5, timeout=30, should_stop=lambda: True)
