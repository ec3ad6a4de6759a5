"""Wall time of ``prime-ckpt inspect`` (and ``list`` / ``plan``) on a large checkpoint (issue 4).

Target: ``prime-ckpt inspect`` of a 1 GB checkpoint step prints in under 2 s. The commands
read metadata only and never import torch (see ``prime_ckpt/cli/``), so the time is process
start-up plus reading ``.metadata``, ``orchestrator.pt`` and a few small files, whatever the
checkpoint's size. For contrast the same ``inspect`` is timed with torch's DCP imported first
(the cost the command paid before it went torch-free), and ``python -c "import torch"`` alone.

The checkpoint (``--size`` bytes of float32 tensors in ``--tensors`` tensors, saved with
``dcp.save`` on one process, plus an orchestrator progress record) is written under a
temporary directory and deleted afterwards (``--keep`` keeps it). Each case runs once as a
warm-up, then ``--reps`` times; reported: median (min-max) seconds, with the load average.
Writes ``--out`` (JSON). No test asserts these timings.

    .venv/bin/python benchmarks/inspect_latency.py                  # 1 GiB, 5 reps
    .venv/bin/python benchmarks/inspect_latency.py --size 64M --reps 2
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

TARGET_S = 2.0


def parse_size(text: str) -> int:
    units = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}
    text = text.strip().upper().removesuffix("B").removesuffix("I")
    return int(float(text[:-1]) * units[text[-1]]) if text and text[-1] in units else int(text)


def make_checkpoint(root: Path, size: int, n_tensors: int) -> Path:
    """``root/checkpoints/step_1`` with ``size`` bytes of float32 model tensors; returns the step dir."""
    import torch
    import torch.distributed.checkpoint as dcp

    from prime_ckpt.orchestrator import OrchestratorProgress, save_orchestrator_checkpoint

    cols = 1024
    rows = max(1, size // (4 * cols * n_tensors))
    model = {f"layers.{i}.weight": torch.full((rows, cols), float(i)) for i in range(n_tensors)}
    sd = {"app": {"model": model, "progress": {"step": 1, "total_samples": 8, "total_tokens": 800}}}
    step_dir = root / "checkpoints" / "step_1"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dcp.save(sd, checkpoint_id=str(step_dir / "trainer"), no_dist=True)
    save_orchestrator_checkpoint(root, OrchestratorProgress(step=1, total_tokens=800, total_samples=8))
    return step_dir


def cli() -> list[str]:
    script = Path(sys.executable).parent / "prime-ckpt"
    return [str(script)] if script.exists() else [sys.executable, "-m", "prime_ckpt.cli"]


def timed(cmd: list[str], reps: int) -> dict:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    times = []
    for i in range(reps + 1):  # the first run warms the page cache and .pyc files
        t0 = time.perf_counter()
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT)
        elapsed = time.perf_counter() - t0
        if proc.returncode != 0:
            raise SystemExit(f"failed ({proc.returncode}): {' '.join(cmd)}\n{proc.stderr[-2000:]}")
        if i:
            times.append(elapsed)
    return {"median_s": statistics.median(times), "min_s": min(times), "max_s": max(times), "reps": times}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", default="1G", help="checkpoint size (bytes of float32 tensors; K/M/G suffixes)")
    ap.add_argument("--tensors", type=int, default=8, help="number of tensors")
    ap.add_argument("--reps", type=int, default=5, help="timed runs per case (after one warm-up run)")
    ap.add_argument("--dir", default=None, help="where to write the checkpoint (default: a new temp dir)")
    ap.add_argument("--keep", action="store_true", help="keep the checkpoint afterwards")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "inspect_latency.json"), help="JSON output file")
    args = ap.parse_args()

    root = Path(args.dir) if args.dir else Path(tempfile.mkdtemp(prefix="prime-ckpt-inspect-bench-"))
    run = root / "run"
    try:
        t0 = time.perf_counter()
        step = make_checkpoint(run, parse_size(args.size), args.tensors)
        on_disk = sum(f.stat().st_size for f in step.rglob("*") if f.is_file())
        print(f"wrote {step} ({on_disk / (1 << 30):.2f} GiB) in {time.perf_counter() - t0:.1f} s", flush=True)
        prime = cli()
        torch_backed = [sys.executable, "-c", "import sys, torch.distributed.checkpoint; from prime_ckpt.cli import main; main(sys.argv[1:])"]
        cases = {
            "inspect": prime + ["inspect", str(step)],
            "inspect --json": prime + ["inspect", str(step), "--json"],
            "list": prime + ["list", str(run)],
            "plan --keep 1": prime + ["plan", str(run), "--keep", "1"],
            "inspect (torch imported first)": torch_backed + ["inspect", str(step)],
            "python -c 'import torch'": [sys.executable, "-c", "import torch"],
        }
        results = {}
        for name, cmd in cases.items():
            load = os.getloadavg()[0]
            results[name] = {**timed(cmd, args.reps), "load_1min": load}
            r = results[name]
            print(f"{name:34s} {r['median_s']:.3f} s ({r['min_s']:.3f}-{r['max_s']:.3f})  load {load:.2f}", flush=True)
    finally:
        if not args.keep:
            shutil.rmtree(root if not args.dir else run, ignore_errors=True)
    inspect = results["inspect"]["median_s"]
    record = {
        "checkpoint_bytes": on_disk,
        "tensors": args.tensors,
        "cpus": os.cpu_count(),
        "python": platform.python_version(),
        "loadavg_end": os.getloadavg(),
        "results": results,
        "targets": {"inspect_1gb_s": {"value": inspect, "limit": TARGET_S, "holds": inspect < TARGET_S}},
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(record, indent=2) + "\n")
    print(f"inspect: {inspect:.3f} s median (target < {TARGET_S} s: {'holds' if inspect < TARGET_S else 'MISSED'}); wrote {args.out}")


if __name__ == "__main__":
    main()
