"""``benchmarks/scaling.py`` (issue 18, how cost grows): the growth fitter names the law of
synthetic series (constant, log n, n, n log n, n², with a fixed cost and noise), the counting
moto middleware tallies requests by kind, and ``--quick`` runs write the documented JSON /
markdown / plot with positive measurements. Nothing asserts a timing."""

from __future__ import annotations

import json
import math
import random
import sys

import pytest

from tests.conftest import ROOT, run_proc

sys.path.insert(0, str(ROOT / "benchmarks"))

from ckpt_bench.scaling.growth import LAWS, fit_growth, loglog_slope, predict  # noqa: E402
from ckpt_bench.scaling.moto_counting import COUNT_PATH, Counting  # noqa: E402

SCRIPT = ROOT / "benchmarks" / "scaling.py"
NS = [10, 100, 1_000, 10_000, 100_000]
SERIES = {
    "constant": lambda n: 0.25,
    "log n": lambda n: 0.01 + 0.3 * math.log(n),
    "n": lambda n: 0.002 + 3e-6 * n,
    "n log n": lambda n: 1e-7 * n * math.log(n),
    "n^2": lambda n: 0.001 + 4e-10 * n * n,
}


@pytest.mark.parametrize("law", list(SERIES))
def test_fitter_names_the_law(law):
    f = SERIES[law]
    exact = fit_growth(NS, [f(n) for n in NS])
    assert exact["law"] == law, exact
    rng = random.Random(law)
    noisy = fit_growth(NS, [f(n) * rng.uniform(0.93, 1.07) for n in NS])
    assert noisy["law"] == law, noisy
    assert set(exact["residuals"]) == set(LAWS)
    # extrapolating an exact series one decade further gives the law's own value
    assert predict(exact, 1e6) == pytest.approx(f(1e6), rel=1e-6)


def test_exponent_of_power_laws():
    assert loglog_slope(NS, [5.0 * n**1.5 for n in NS]) == pytest.approx(1.5)
    fit = fit_growth(NS, [3e-9 * n * n for n in NS])
    assert fit["exponent"] == pytest.approx(2.0) and fit["exponent_last"] == pytest.approx(2.0)
    assert fit_growth([1, 8, 64, 1024], [7.0] * 4)["exponent"] == pytest.approx(0.0, abs=1e-12)


def test_fitter_refuses_a_single_n():
    with pytest.raises(ValueError, match="two points"):
        fit_growth([10, 10], [1.0, 2.0])


def test_counting_middleware_tallies_by_kind():
    seen = []

    def app(environ, start_response):
        seen.append(environ["PATH_INFO"])
        start_response("200 OK", [])
        return [b""]

    mw = Counting(app)
    calls = [("GET", "/bkt", "list-type=2&prefix=run/"), ("GET", "/bkt/run/a", ""), ("HEAD", "/bkt/run/a", ""),
             ("PUT", "/bkt/run/b", ""), ("GET", "/", "")]
    for method, path, query in calls:
        mw({"REQUEST_METHOD": method, "PATH_INFO": path, "QUERY_STRING": query}, lambda *a: None)
    assert len(seen) == 5
    out = mw({"REQUEST_METHOD": "POST", "PATH_INFO": COUNT_PATH, "QUERY_STRING": ""}, lambda *a: None)
    assert json.loads(out[0]) == {"LIST": 2, "GET": 1, "HEAD": 1, "PUT": 1}
    assert dict(mw.counts) == {}  # POST answered the tallies and zeroed them
    assert len(seen) == 5  # the count path never reaches S3


def _run(tmp_path, only: str, timeout: float) -> dict:
    proc = run_proc([sys.executable, str(SCRIPT), "--quick", "--only", only, "--results-dir", str(tmp_path)],
                    timeout=timeout, check=False)
    assert proc.returncode == 0, (proc.stdout or "")[-3000:]
    for ext in ("json", "md", "png"):
        assert (tmp_path / f"scaling_quick.{ext}").stat().st_size > 0, ext
    result = json.loads((tmp_path / "scaling_quick.json").read_text())
    assert {"name", "created", "settings", "environment", "errors", "growth", "extrapolation", "wall_s"} <= result.keys()
    assert result["errors"] == [] and result["settings"]["series"] == only.split(",")
    for row in result["growth"]:
        assert row["law"] in LAWS and math.isfinite(row["exponent"]) and row["n"][1] > row["n"][0] > 0, row
    assert "## Growth" in (tmp_path / "scaling_quick.md").read_text()
    return result


def test_quick_dcp_and_retention(tmp_path):
    result = _run(tmp_path, "dcp,retention", timeout=240)
    for policy in ("keep3", "keep3_every100"):
        rows = result["retention"]["points"][policy]
        assert [r["steps"] for r in rows] == [10, 100, 1000]
        assert all(r["plan_s"] > 0 and r["keeps"] + r["deletes"] == 2 * r["steps"] for r in rows)
    for sweep in ("tensors", "ranks"):
        rows = result["dcp"]["points"][sweep]
        assert len(rows) == 3
        for r in rows:
            assert r["chunks"] == r["tensors"] * r["ranks"]
            assert all(r[k] > 0 for k in ("plan_s", "metadata_bytes", "plans_bytes", "decode_s", "pickle_loads_s", "load_plan_rank_s"))
        # more tensors or ranks: more chunks in the same .metadata, never fewer bytes
        assert [r["metadata_bytes"] for r in rows] == sorted(r["metadata_bytes"] for r in rows)
    labels = {r["label"] for r in result["growth"]}
    assert any(".metadata size vs ranks" in x for x in labels) and any("retention plan" in x for x in labels)
    assert result["extrapolation"]["dcp"] and all(j["metadata_bytes_pred"] > 0 for j in result["extrapolation"]["dcp"])


def test_only_refuses_an_unknown_series(tmp_path):
    proc = run_proc([sys.executable, str(SCRIPT), "--only", "bogus", "--results-dir", str(tmp_path)], timeout=60, check=False)
    assert proc.returncode == 2 and "bogus" in (proc.stdout or "") + (proc.stderr or "")
    assert not list(tmp_path.iterdir())


@pytest.mark.slow
def test_quick_s3(tmp_path):
    rows = _run(tmp_path, "s3", timeout=400)["s3"]["points"]["s3"]
    assert [r["steps"] for r in rows] == [2, 4, 8]
    for r in rows:
        assert r["list_s"] > 0 and r["verify_s"] > 0
        assert r["list_requests"] >= 1 and r["verify_requests"] >= r["steps"]  # verify reads each step's files


@pytest.mark.slow
def test_quick_reshard(tmp_path):
    rows = _run(tmp_path, "reshard", timeout=580)["reshard"]["points"]["reshard"]
    assert {(r["save_ranks"], r["load_ranks"]) for r in rows} == {(1, 1), (1, 2), (2, 1), (2, 2)}
    assert all(r["load_s"] > 0 for r in rows)
    assert all(r["vs_same"] == 1.0 for r in rows if r["save_ranks"] == r["load_ranks"])
