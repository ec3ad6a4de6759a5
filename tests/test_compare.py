"""prime_ckpt.compare: layout differences from metadata, value differences per tensor."""

from __future__ import annotations

import json
import warnings

import pytest
import torch
import torch.distributed.checkpoint as dcp
from dist_scripts.cli2_runs import TWO_RANK_MODEL, one_proc_run, two_rank_run

from prime_ckpt.compare import diff, max_abs_diff


def _save(path, sd):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dcp.save(sd, checkpoint_id=str(path))
    return path


@pytest.fixture
def pair(tmp_path):
    w = torch.arange(12, dtype=torch.float32).reshape(4, 3)
    a = _save(tmp_path / "a", {"w": w, "x": torch.zeros(5), "gone": torch.ones(2, dtype=torch.int64), "meta": {"step": 1}})
    w2 = w.clone()
    w2[2, 1] += 0.5
    b = _save(tmp_path / "b", {"w": w2, "x": torch.zeros(6), "new": torch.ones(3, dtype=torch.bfloat16), "meta": {"step": 2}, "extra": 3})
    return a, b


def test_layout_diff_from_metadata(pair):
    a, b = pair
    r = diff(a, b)
    assert r.added == [{"name": "new", "shape": [3], "dtype": "bfloat16"}]
    assert r.removed == [{"name": "gone", "shape": [2], "dtype": "int64"}]
    assert r.changed == [{"name": "x", "a": {"name": "x", "shape": [5], "dtype": "float32"}, "b": {"name": "x", "shape": [6], "dtype": "float32"}}]
    assert r.same_layout == 1 and r.non_tensors_added == ["extra"] and r.non_tensors_removed == []
    assert r.values is None and r.identical is False


def test_value_diff(pair):
    a, b = pair
    r = diff(a, b, values=True)
    assert [(v.name, v.equal, v.max_abs_diff) for v in r.values] == [("w", False, 0.5)]
    assert r.non_tensor_values == [{"name": "meta.step", "equal": False, "a": "1", "b": "2"}]
    assert [v.name for v in diff(a, b, values=True, atol=0.5).values_differ] == []
    d = r.to_dict()
    assert d["schema"] == "prime-ckpt.diff/1" and d["identical"] is False


def test_identical_and_model_only(run_ranks, tmp_path_factory):
    run, _ = two_rank_run(run_ranks, tmp_path_factory)
    step4 = run / "checkpoints" / "step_4"
    assert diff(step4, step4 / "trainer", values=True).identical
    r = diff(step4, run / "weights" / "step_4", values=True)
    assert r.model_only and r.identical and sorted(v.name for v in r.values) == sorted(TWO_RANK_MODEL)
    r = diff(run / "weights" / "step_3", run / "weights" / "step_4", values=True)
    assert not r.identical and all(not v.equal and v.max_abs_diff > 0 for v in r.values)
    r = diff(run / "checkpoints" / "step_2", step4)
    assert r.identical  # same layout; values not compared without values=True
    assert not diff(run / "checkpoints" / "step_2", step4, values=True).identical


def test_mixed_dtype_run(tmp_path_factory):
    run, _ = one_proc_run(tmp_path_factory)
    r = diff(run / "checkpoints" / "step_4", run / "weights" / "step_4", values=True)
    assert r.identical and {v.name for v in r.values} == {"0.weight", "0.bias", "1.weight"}


def test_max_abs_diff_nan_and_inf():
    nan, inf = float("nan"), float("inf")
    assert max_abs_diff(torch.tensor([1.0, nan]), torch.tensor([1.0, nan])) == (True, 0.0)
    assert max_abs_diff(torch.tensor([1.0, nan]), torch.tensor([1.0, 2.0])) == (False, inf)
    assert max_abs_diff(torch.tensor([inf, 1.0]), torch.tensor([inf, 1.25])) == (False, 0.25)
    assert max_abs_diff(torch.tensor(3), torch.tensor(5)) == (False, 2.0)
    assert max_abs_diff(torch.tensor([0.0]), torch.tensor([-0.0])) == (False, 0.0)  # bitwise differs


def test_cli_without_values_says_same_layout_not_identical(run_ranks, tmp_path_factory):
    """Two different steps of one run have the same layout; without --values the CLI must not
    call them identical (a fresh-user trial read 'identical' as 'same values')."""
    from typer.testing import CliRunner

    from prime_ckpt.cli import app

    run, _ = two_rank_run(run_ranks, tmp_path_factory)
    a, b = str(run / "checkpoints" / "step_2"), str(run / "checkpoints" / "step_4")
    r = CliRunner().invoke(app, ["diff", a, b])
    assert r.exit_code == 0 and "same layout (values not compared" in r.stdout and "identical" not in r.stdout
    r = CliRunner().invoke(app, ["diff", a, b, "--json"])
    d = json.loads(r.stdout)
    assert d["values_compared"] is False and d["identical"] is True
    r = CliRunner().invoke(app, ["diff", a, b, "--values"])
    assert r.exit_code == 1 and "different: " in r.stdout
