"""Smoke test of benchmarks/save_latency.py in its smallest --quick mode (checkpoint and weights
cases side by side), and of the weights cases alone at world size 2: each runs to the end under a
hard timeout and writes the JSON / markdown / plot with the documented schema. No timing is
asserted anywhere (timings on shared CI machines are noise)."""

from __future__ import annotations

import json
import math
import sys

import pytest

from tests.conftest import ROOT, run_proc

# The benchmark's own dependencies (`pip install -e ".[bench]"`, what `make bench` installs).
for _mod in ("psutil", "matplotlib", "s3fs", "moto"):
    pytest.importorskip(_mod, reason='needs the bench extra: pip install -e ".[bench]"')

SCRIPT = ROOT / "benchmarks" / "save_latency.py"
TARGETS = {
    "blocking_vs_memcpy",
    "async_blocking_vs_sync",
    "async_durable_vs_sync",
    "save_vs_raw_write",
    "load_vs_raw_read",
    "step_overhead",
    "async_peak_rss_vs_state",
    "rss_drift_20_saves",
}
WEIGHTS_TARGETS = {"weights_blocking_vs_memcpy", "weights_ready_vs_raw_write", "weights_peak_rss_vs_share", "weights_vs_gather_blocking"}
WEIGHTS_CASES = {("weights_gather", "local"), ("weights_sync", "local"), ("weights_async", "local"),
                 ("weights_raw_write", "local"), ("weights_memcpy", "memory")}


def check_targets(result: dict, names: set[str]) -> dict:
    targets = {k: v for k, v in result["targets"].items() if not k.startswith("_")}
    assert set(targets) == names
    for name, t in targets.items():
        assert {"value", "limit", "holds", "how"} <= t.keys(), name
        assert isinstance(t["value"], float) and math.isfinite(t["value"]), name
        assert isinstance(t["limit"], float | int) and isinstance(t["holds"], bool), name
    return targets


def test_quick_benchmark_writes_results_with_schema(tmp_path):
    args = [
        "--quick", "--world-sizes", "1", "--sizes", "8M", "--reps", "1", "--steps", "10", "--rss-saves", "2",
        "--no-process", "--name", "smoke", "--results-dir", str(tmp_path), "--timeout", "170",
    ]
    run_proc([sys.executable, str(SCRIPT), *args], timeout=180)
    result = json.loads((tmp_path / "smoke.json").read_text())
    assert (tmp_path / "smoke.md").read_text().startswith("# Save latency: smoke")
    assert (tmp_path / "smoke.png").stat().st_size > 0

    env = result["environment"]
    assert {"torch", "cpu_count", "device"} <= env.keys()
    assert result["errors"] == []

    cases = {(r["case"], r["storage"]) for r in result["records"]}
    assert {("memcpy", "memory"), ("raw_write", "local"), ("torch_save", "local"), ("dcp_save", "local"),
            ("dcp_async_default", "local"), ("ckpt_sync", "local"), ("ckpt_async_thread", "local"),
            ("raw_write", "s3"), ("dcp_save", "s3"), ("dcp_async_reused", "s3"),
            ("raw_read", "local"), ("torch_load", "local"), ("ckpt_load", "local"), ("dcp_load", "s3")} | WEIGHTS_CASES <= cases
    for r in result["records"]:
        assert r["error"] is None, r
        for key in ("case", "kind", "storage", "world_size", "size_bytes", "per_rank_bytes", "reps", "blocking_s",
                    "durable_s", "throughput_gbps", "peak_rss_bytes", "torch", "cpu_count", "device"):
            assert key in r, (key, r["case"])
        assert r["reps"] == 1
        for stat in ("blocking_s", "durable_s"):
            assert set(r[stat]) == {"median", "min", "max"}
            assert r[stat]["min"] <= r[stat]["median"] <= r[stat]["max"]
        assert r["throughput_gbps"] > 0

    targets = check_targets(result, TARGETS | WEIGHTS_TARGETS)
    assert "## Weights publish" in (tmp_path / "smoke.md").read_text()

    # the RSS check: training alone first, then consecutive saves (the target), then training with saves
    rss = result["extras"]["1"]["rss"]
    for key in ("rss_train_only_bytes", "rss_after_each_save_bytes", "rss_after_train_and_save_bytes"):
        assert len(rss[key]) == 2 and all(v > 0 for v in rss[key]), key
    assert targets["rss_drift_20_saves"]["value"] == rss["drift"]
    assert 0 <= rss["drift_train_only"] < 1 and 0 <= rss["drift_train_and_save"] < 1
    assert rss["rss_before_bytes"] == max(rss["rss_train_only_bytes"])

    # the step-overhead check measures its floor beside the checkpoint: the same bytes written +
    # fsync'd by a plain thread instead of a checkpoint, and says so in the markdown
    so = result["extras"]["1"]["step_overhead"]
    assert set(so["mean_step_s"]) == {"none", "async_every_10", "raw_write_every_10"}
    assert so["ratio_raw_write"] == so["mean_step_s"]["raw_write_every_10"] / so["mean_step_s"]["none"]
    assert "the floor, the same bytes written + fsync'd" in (tmp_path / "smoke.md").read_text()

    # --merge: the same launch relabelled as world size 2, merged with the original, gives both
    # world sizes side by side, and the targets of the reference (largest) world size, which
    # are this launch's own; a world size in two files is refused with a one-line error
    ws2 = json.loads(json.dumps(result))
    ws2["settings"]["world_sizes"] = [2]
    for r in ws2["records"]:
        r["world_size"] = 2
    ws2["extras"] = {"2": ws2["extras"]["1"]}
    (tmp_path / "ws2.json").write_text(json.dumps(ws2))
    run_proc([sys.executable, str(SCRIPT), "--merge", f"{tmp_path / 'smoke.json'},{tmp_path / 'ws2.json'}",
              "--name", "merged", "--results-dir", str(tmp_path), "--no-plot"], timeout=120)
    merged = json.loads((tmp_path / "merged.json").read_text())
    assert merged["settings"]["world_sizes"] == [1, 2]
    assert len(merged["records"]) == 2 * len(result["records"])
    assert [la["file"] for la in merged["settings"]["launches"]] == ["smoke.json", "ws2.json"]
    for name in TARGETS | WEIGHTS_TARGETS:
        assert merged["targets"][name]["value"] == pytest.approx(result["targets"][name]["value"]), name
    assert "reps after a warm-up" in (tmp_path / "merged.md").read_text() and "Merged from launches" in (tmp_path / "merged.md").read_text()
    dup = run_proc([sys.executable, str(SCRIPT), "--merge", f"{tmp_path / 'smoke.json'},{tmp_path / 'smoke.json'}",
                    "--results-dir", str(tmp_path)], timeout=120, check=False)
    said = (dup.stdout or "") + (dup.stderr or "")
    assert dup.returncode == 1 and "world size 1 is also in" in said and said.count("\n") == 1, said


def test_weights_only_benchmark_at_world_size_2(tmp_path):
    """--weights-only: the five weights cases at world size 2 (the sharded publish redistributes
    slices between the ranks), the four weights targets and nothing else, the markdown section
    with the load average, and the plot."""
    args = ["--weights-only", "--world-sizes", "2", "--sizes", "8M", "--reps", "1", "--name", "weights",
            "--results-dir", str(tmp_path), "--timeout", "100"]
    run_proc([sys.executable, str(SCRIPT), *args], timeout=110)
    result = json.loads((tmp_path / "weights.json").read_text())
    assert result["errors"] == [] and result["settings"]["weights_only"] is True
    assert {(r["case"], r["storage"]) for r in result["records"]} == WEIGHTS_CASES
    for r in result["records"]:
        assert r["error"] is None and r["kind"] == "weights" and r["world_size"] == 2 and r["reps"] == 1, r
        assert r["per_rank_bytes"] * 2 == r["param_bytes"] == r["state_bytes"], r
        assert set(r["peak_extra_rss_rank0_bytes"]) == {"median", "min", "max"} and len(r["loadavg"]) == 3, r
        for stat in ("blocking_s", "durable_s"):
            assert r[stat]["min"] <= r[stat]["median"] <= r[stat]["max"]
        if r["case"] in ("weights_sync", "weights_async"):
            assert r["staged_bytes"] == r["per_rank_bytes"] and r["file_bytes"] > 0, r
    check_targets(result, WEIGHTS_TARGETS)
    assert result["targets"]["_weights_reference"] == {"world_size": 2, "size_bytes": 8 << 20}
    assert len(result["environment"]["loadavg"]) == len(result["environment"]["loadavg_end"]) == 3
    md = (tmp_path / "weights.md").read_text()
    assert "## Weights publish" in md and "load average" in md and "## Save" not in md
    assert (tmp_path / "weights.png").stat().st_size > 0
