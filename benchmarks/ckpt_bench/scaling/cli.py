"""``benchmarks/scaling.py``: arguments, the series in turn, the growth table, the outputs."""

from __future__ import annotations

import argparse
import gc
import os
import sys
import time
from pathlib import Path
from typing import Any

from ckpt_bench.common import BENCH_DIR, environment

SERIES = ("dcp", "retention", "s3", "reshard")


def _module(name: str):
    if name == "dcp":
        from ckpt_bench.scaling import dcp_plan as m
    elif name == "retention":
        from ckpt_bench.scaling import retention_series as m
    elif name == "s3":
        from ckpt_bench.scaling import s3_series as m
    else:
        from ckpt_bench.scaling import reshard_series as m
    return m


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="scaling.py", description=__doc__ + " Series: dcp (.metadata size and save "
                                "planning vs tensors and simulated ranks), retention (plan vs steps on disk), s3 (list / verify "
                                "requests and time vs steps, moto), reshard (load time, save at N ranks and load at M).")
    p.add_argument("--quick", action="store_true", help="tiny sizes (well under a minute)")
    p.add_argument("--only", default=None, help=f"comma-separated series to run, of {','.join(SERIES)} (default: all)")
    p.add_argument("--max-point-s", type=float, default=60.0, help="skip a point predicted to take longer (default 60)")
    p.add_argument("--results-dir", type=Path, default=BENCH_DIR / "results", help="where the outputs go")
    p.add_argument("--name", default=None, help="output file stem (default: scaling, or scaling_quick with --quick)")
    p.add_argument("--no-plot", action="store_true", help="skip the PNG")
    a = p.parse_args(argv)
    a.series = SERIES if a.only is None else tuple(s.strip() for s in a.only.split(",") if s.strip())
    bad = [s for s in a.series if s not in SERIES]
    if bad or not a.series:
        p.error(f"--only: unknown series {bad}; choose from {','.join(SERIES)}")
    if a.name is None:
        a.name = "scaling_quick" if a.quick else "scaling"
    return a


def main(argv: list[str] | None = None) -> None:
    from ckpt_bench.scaling.analysis import extrapolate, growth_rows
    from ckpt_bench.scaling.report import write_outputs

    a = parse_args(argv)
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    t0 = time.perf_counter()
    result: dict[str, Any] = {"name": a.name, "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                              "settings": {"quick": a.quick, "series": list(a.series), "max_point_s": a.max_point_s},
                              "errors": []}

    def log(msg: str) -> None:
        print(msg, flush=True)

    for name in a.series:
        log(f"== {name} ==")
        s0 = time.perf_counter()
        try:
            result[name] = _module(name).run(a.quick, a.max_point_s, log)
            result[name]["wall_s"] = time.perf_counter() - s0
        except Exception as e:  # one series failing must not lose the others
            result["errors"].append(f"{name}: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}")
            log(f"error: {result['errors'][-1]}")
        gc.collect()
    result["growth"] = growth_rows(result)
    result["extrapolation"] = extrapolate(result)
    result["wall_s"] = time.perf_counter() - t0
    result["environment"] = {**environment(), "loadavg_end": list(os.getloadavg())}
    base = write_outputs(result, a.results_dir, a.name, not a.no_plot)
    log(f"wrote {base}.json / .md{'' if a.no_plot else ' / .png'} ({result['wall_s']:.0f} s)")
    if result["errors"]:
        sys.exit(1)
