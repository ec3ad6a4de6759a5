"""The benchmark's plot (``benchmarks/ckpt_bench/plot.py``, issue 18) on a small synthetic result:
at the reference size (1 GiB) one row per storage with three panels (stall, time to durable,
load), a bar per case and world size with the record's median as its height, the floor (memcpy,
raw_write, raw_read of the same world size) as a dashed line over each group, a colour per family
taken from the case name (a new ``titan_*`` family gets its own), and a weights row. Nothing is
measured; the values are the synthetic records' medians."""

from __future__ import annotations

import json

import pytest

from tests.conftest import ROOT

GiB, MiB = 1 << 30, 1 << 20


def _rec(case: str, kind: str, storage: str, ws: int, blocking: float, durable: float | None = None,
         size: int = GiB, **extra) -> dict:
    durable = blocking if durable is None else durable
    return {"case": case, "kind": kind, "storage": storage, "world_size": ws, "size_bytes": size,
            "blocking_s": {"median": blocking, "min": blocking, "max": blocking},
            "durable_s": {"median": durable, "min": durable, "max": durable}, "error": None, "note": "", **extra}


def _result() -> dict:
    recs = []
    for ws in (1, 2):
        k = 10.0 * ws  # every value differs between the world sizes
        recs += [
            _rec("memcpy", "baseline", "memory", ws, 0.1 + k), _rec("raw_write", "baseline", "local", ws, 1.0 + k),
            _rec("raw_read", "load", "local", ws, 0.5 + k),
            _rec("ckpt_sync", "save", "local", ws, 2.0 + k), _rec("ckpt_async_thread", "save", "local", ws, 0.2 + k, 3.0 + k),
            _rec("dcp_save", "save", "local", ws, 2.5 + k), _rec("titan_async", "save", "local", ws, 0.3 + k, 2.8 + k),
            _rec("torch_save", "save", "local", ws, 1.7 + k),
            _rec("ckpt_load", "load", "local", ws, 0.6 + k), _rec("dcp_load", "load", "local", ws, 0.9 + k),
            _rec("ckpt_sync", "save", "local", ws, 99.0, size=256 * MiB),  # not the reference size: not drawn
        ]
    # S3 at 1 GiB at world size 1 only
    recs += [_rec("raw_write", "baseline", "s3", 1, 20.0), _rec("ckpt_async_thread", "save", "s3", 1, 0.4, 30.0),
             _rec("raw_read", "load", "s3", 1, 5.0), _rec("ckpt_load", "load", "s3", 1, 7.0)]
    return {"name": "synthetic", "records": recs}


@pytest.fixture
def plot(monkeypatch):
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    from ckpt_bench import plot

    return plot


def _bars(ax) -> dict[float, tuple]:
    return {round(p.get_height(), 6): tuple(p.get_facecolor()) for p in ax.patches}


def _floors(ax) -> list[float]:
    lines = [ln for ln in ax.lines if ln.get_gid() == "floor"]
    assert all(ln.get_linestyle() == "--" and len(set(ln.get_ydata())) == 1 for ln in lines)
    return sorted(ln.get_ydata()[0] for ln in lines)


def test_three_panels_per_storage_row_with_bars_and_floors(plot):
    import matplotlib.pyplot as plt

    fig = plot.figure(_result())
    try:
        assert len(fig.axes) == 6  # local row + S3 row, three panels each (the legend is outside the axes)
        stall, durable, load, s3_stall, s3_durable, s3_load = fig.axes
        assert "local" in stall.get_title() and "1 GiB" in stall.get_title() and "stall" in stall.get_title()
        assert "durable" in durable.get_title() and "load" in load.get_title() and "S3" in s3_stall.get_title()
        # a bar per save case and world size, the median as its height; the floor of each world size dashed
        assert sorted(_bars(stall)) == sorted(round(x + k, 6) for k in (10, 20) for x in (2.0, 0.2, 2.5, 0.3, 1.7))
        assert _floors(stall) == pytest.approx([10.1, 20.1])
        assert sorted(_bars(durable)) == sorted(round(x + k, 6) for k in (10, 20) for x in (2.0, 3.0, 2.5, 2.8, 1.7))
        assert _floors(durable) == pytest.approx([11.0, 21.0])
        assert sorted(_bars(load)) == sorted(round(x + k, 6) for k in (10, 20) for x in (0.6, 0.9))
        assert _floors(load) == pytest.approx([10.5, 20.5])
        assert 99.0 not in _bars(stall)  # the 256 MiB record is not at the reference size
        assert [t.get_text().splitlines()[0] for t in stall.get_xticklabels()] == ["world size 1", "world size 2"]
        assert "memcpy" in stall.get_xticklabels()[0].get_text()
        # S3: world size 1 only, said under the panel
        assert list(_bars(s3_stall)) == [0.4] and _floors(s3_stall) == [pytest.approx(10.1)]
        assert list(_bars(s3_durable)) == [30.0] and _floors(s3_durable) == [20.0]
        assert list(_bars(s3_load)) == [7.0] and _floors(s3_load) == [5.0]
        assert [t.get_text().splitlines()[0] for t in s3_stall.get_xticklabels()] == ["world size 1"]
        assert "world size 2" in s3_stall.get_xlabel()
        # every value is written on its bar
        assert {t.get_text() for t in stall.texts} >= {"12.0", "10.2", "22.5", "21.7"}
        # colours by family: ours blue, DCP orange, baselines grey, titan_* its own family and colour
        colour = {c: _bars(durable)[round(v + 10, 6)] for c, v in
                  (("ckpt_sync", 2.0), ("ckpt_async_thread", 3.0), ("dcp_save", 2.5), ("titan_async", 2.8), ("torch_save", 1.7))}
        assert [plot.family(c) for c in colour] == ["ours", "ours", "DCP", "titan", "baseline"]
        assert all(colour[c][2] > colour[c][0] for c in ("ckpt_sync", "ckpt_async_thread"))  # blue
        assert colour["dcp_save"][0] > colour["dcp_save"][2]  # orange
        r, g, b, _ = colour["torch_save"]
        assert abs(r - g) < 0.02 and abs(g - b) < 0.02  # grey
        assert len(set(colour.values())) == 5 and colour["titan_async"][1] > max(colour["titan_async"][0], colour["titan_async"][2])
        # the legend (outside the panels) names every case with its family
        legend = [t.get_text() for t in fig.legends[0].get_texts()]
        assert "titan_async (titan)" in legend and "ckpt_load (ours)" in legend and len(legend) == 8
    finally:
        plt.close(fig)


def test_weights_row_and_replot_writes_only_the_png(plot, tmp_path):
    import matplotlib.pyplot as plt
    from ckpt_bench.cli import main

    share = 100 * MiB
    recs = [_rec(c, "weights", "memory" if c == "weights_memcpy" else "local", 2, b, d, per_rank_bytes=share,
                 peak_extra_rss_rank0_bytes={"median": rss, "min": rss, "max": rss}, held_bytes=held)
            for c, b, d, rss, held in (("weights_gather", 4.0, 4.0, 2 * share, 0), ("weights_sync", 1.5, 1.5, 0, share),
                                       ("weights_async", 0.13, 1.4, MiB, share), ("weights_raw_write", 1.0, 1.0, 0, 0),
                                       ("weights_memcpy", 0.1, 0.1, 0, 0))]
    fig = plot.figure({"name": "w", "records": recs})
    try:
        assert len(fig.axes) == 3
        stall, ready, rss = fig.axes
        assert sorted(_bars(stall)) == [0.13, 1.5, 4.0] and _floors(stall) == [0.1]
        assert sorted(_bars(ready)) == [1.4, 1.5, 4.0] and _floors(ready) == [1.0]
        assert sorted(_bars(rss)) == pytest.approx([1.0, 1.01, 2.0]) and _floors(rss) == [1.5]  # the target's limit
        assert rss.get_yscale() == "linear" and "weights" in stall.get_title()
    finally:
        plt.close(fig)
    path = tmp_path / "res.json"
    text = json.dumps(_result())
    path.write_text(text)
    main(["--replot", str(path)])
    assert (tmp_path / "res.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert path.read_text() == text and sorted(p.name for p in tmp_path.iterdir()) == ["res.json", "res.png"]
