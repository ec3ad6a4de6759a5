"""How cost grows with the job (issue 18): ``.metadata`` size and DCP save planning vs tensors
and (simulated) ranks, retention planning vs steps on disk, ``prime-ckpt list`` / ``verify``
requests and time vs steps on S3 (moto), and load time vs world-size change (N -> M). Each series
gets a fitted growth law; ``benchmarks/results/scaling.{json,md,png}`` hold the result.

``python benchmarks/scaling.py --help``; ``--quick`` (tiny sizes), ``--only dcp,retention``.
The code is ``benchmarks/ckpt_bench/scaling/``.
"""

from __future__ import annotations

import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parent
for _p in (str(BENCH.parent), str(BENCH)):  # the repository (prime_ckpt) and benchmarks/ (ckpt_bench)
    if _p not in sys.path:
        sys.path.insert(0, _p)

from ckpt_bench.scaling.cli import main

if __name__ == "__main__":
    main()
