"""Series 4: load time vs world-size change (save at N ranks, load at M ranks; N, M in {1, 2, 4};
12 MiB (--quick) or 60 MiB of parameters + AdamW state, 1 and 5 layers of the benchmark's model).

Each N saves once (one torchrun of :mod:`reshard_worker`); each (N, M) loads it in a torchrun of
M ranks, timed inside (median of a few loads, the slowest rank each) and checked against the
saved values. CPU/gloo ranks on this machine's cores: more ranks than cores share them, which the
diagonal (N = M) shows as the baseline every reshard is compared with (``vs_same``: load N -> M
over load M -> M).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

from ckpt_bench.common import HIDDEN, ROOT

#: Bytes of one Linear(HIDDEN, HIDDEN) layer's weight + bias + AdamW's two moments (fp32): the
#: model's unit (``ckpt_bench.model``), so the sizes below are exact.
LAYER_BYTES = 3 * (HIDDEN * HIDDEN + HIDDEN) * 4

WORKER = Path(__file__).with_name("reshard_worker.py")


def torchrun(nproc: int, args: list[str], timeout: float) -> None:
    """``torchrun --standalone --nproc-per-node=nproc reshard_worker.py ARGS``, killed (its
    process group) after ``timeout`` seconds; RuntimeError (one line) on failure."""
    env = {**os.environ, "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep)}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}", str(WORKER), *args]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True, text=True)
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        raise RuntimeError(f"reshard {args[0]} at {nproc} ranks timed out after {timeout:.0f} s") from None
    if proc.returncode != 0:
        raise RuntimeError(f"reshard {args[0]} at {nproc} ranks exited {proc.returncode}: {out.strip()[-800:]}")


def run(quick: bool, max_point_s: float, log) -> dict[str, Any]:
    sizes = [LAYER_BYTES] if quick else [5 * LAYER_BYTES]  # 12 MiB, 60 MiB
    worlds = (1, 2) if quick else (1, 2, 4)
    reps = 2 if quick else 3
    rows: list[dict] = []
    work = Path(tempfile.mkdtemp(prefix="prime_ckpt_reshard_"))
    try:
        for size in sizes:
            for n in worlds:
                out = work / f"s{size}_n{n}"
                torchrun(n, ["save", str(out), str(size)], timeout=max(120.0, 4 * max_point_s))
                for m in worlds:
                    res = work / f"r{size}_{n}_{m}.json"
                    torchrun(m, ["load", str(out), str(size), str(res), str(reps)], timeout=max(120.0, 4 * max_point_s))
                    times = json.loads(res.read_text())["load_s"]
                    rows.append({"size_bytes": size, "save_ranks": n, "load_ranks": m, "load_s": statistics.median(times),
                                 "load_min_s": min(times), "load_max_s": max(times), "reps": len(times)})
                    log(f"  reshard {size >> 20} MiB: {n} -> {m} ranks: load {rows[-1]['load_s']:.3f} s")
                shutil.rmtree(out, ignore_errors=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    same = {(r["size_bytes"], r["load_ranks"]): r["load_s"] for r in rows if r["save_ranks"] == r["load_ranks"]}
    for r in rows:
        r["vs_same"] = r["load_s"] / same[(r["size_bytes"], r["load_ranks"])]
    return {"points": {"reshard": rows}, "skipped": [], "cpu_cores": os.cpu_count()}
