"""Units, formatting and small measurement helpers shared by every part of the benchmark."""

from __future__ import annotations

import ctypes
import os
import platform
import socket
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

MiB = 1 << 20
GiB = 1 << 30
HIDDEN = 1024  # Linear(HIDDEN, HIDDEN) layers: 4 MiB of fp32 weights + bias each
S3_BUCKET = "prime-ckpt-bench"
BENCH_DIR = Path(__file__).resolve().parent.parent  # benchmarks/
ROOT = BENCH_DIR.parent  # the repository
SCRIPT = BENCH_DIR / "save_latency.py"  # what torchrun runs for each rank


def parse_size(text: str) -> int:
    """``"256M"``, ``"1G"``, ``"1.5GiB"``, ``"64MiB"`` or a byte count -> bytes."""
    t = text.strip().upper().removesuffix("IB").removesuffix("B")
    mult = {"K": 1 << 10, "M": MiB, "G": GiB}.get(t[-1:], 1)
    return int(float(t[:-1] if t[-1:] in "KMG" else t) * mult)


def fmt_size(n: int) -> str:
    """Bytes as ``"1 GiB"`` / ``"256 MiB"``."""
    return f"{n / GiB:g} GiB" if n >= GiB else f"{n / MiB:g} MiB"


def fmt_s(x: dict | None) -> str:
    """A ``summary`` as ``"median (min–max)"`` seconds, or ``"—"``."""
    return f"{x['median']:.3f} ({x['min']:.3f}–{x['max']:.3f})" if x else "—"


def summary(values: list[float]) -> dict[str, float] | None:
    """``{"median", "min", "max"}`` of ``values`` (None when empty)."""
    if not values:
        return None
    return {"median": statistics.median(values), "min": min(values), "max": max(values)}


def timed(fn: Callable[[], Any]) -> tuple[float, float, dict[str, float]]:
    """Run ``fn`` once: ``(blocking_s, durable_s, extra)`` with both times the whole call."""
    t0 = time.perf_counter()
    fn()
    dt = time.perf_counter() - t0
    return dt, dt, {}


def find_record(records: list[dict], case: str, ws: int, size: int, storage: str | None = None) -> dict | None:
    """The measured record of ``case`` at world size ``ws`` and ``size`` (on ``storage``, any if None)."""
    for r in records:
        same = r["case"] == case and r["world_size"] == ws and r["size_bytes"] == size
        if same and (storage is None or r["storage"] == storage) and r.get("durable_s"):
            return r
    return None


def median_of(r: dict | None, key: str) -> float | None:
    """The median of the summary ``r[key]`` (None when ``r`` or the key is missing)."""
    return r[key]["median"] if r and r.get(key) else None


def target(value: float | None, limit: float, smaller_is_better: bool, how: str) -> dict[str, Any]:
    """One target entry: ``{"value", "limit", "holds", "how"}`` (a missing value never holds)."""
    holds = value is not None and (value <= limit if smaller_is_better else value >= limit)
    return {"value": value, "limit": limit, "holds": bool(holds), "how": how}


def environment() -> dict[str, Any]:
    """torch version, CPUs, device, platform, load average: what each record carries."""
    import torch

    cuda = torch.cuda.is_available()
    return {
        "torch": torch.__version__,
        "python": platform.python_version(),
        "cpu_count": os.cpu_count(),
        "device": torch.cuda.get_device_name(0) if cuda else "cpu",
        "cuda": cuda,
        "platform": platform.platform(),
        "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
        "hostname": socket.gethostname(),
        "loadavg": list(os.getloadavg()),
    }


def settle() -> None:
    """After a cleanup, outside the timed region: commit the deletes to disk (``os.sync``: on a
    file system mounted with ``discard``, such as this machine's root, the TRIM of a deleted GiB
    otherwise lands in the next case's fsync) and return freed heap memory to the OS
    (``malloc_trim``, glibc; skipped elsewhere)."""
    os.sync()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass
