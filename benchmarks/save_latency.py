"""Sync vs async checkpoint save latency, measured side by side against baselines (issue 6).

One run measures, interleaved (every repetition runs every case once, in turn), for each state
size (model + AdamW state, total over ranks) and world size (1 and 2 CPU/gloo ranks, launched
with torchrun under a timeout):

* baselines: raw sequential write + fsync of the same bytes (disk limit), a warm memcpy of the
  per-rank bytes (staging limit), ``torch.save`` (+fsync) per rank, plain ``dcp.save``,
  ``dcp.async_save`` with its defaults;
* this project's :class:`prime_ckpt.checkpointer.Checkpointer`: sync, async thread mode, async
  process mode (staging into reused buffers);
* S3 (a ``moto`` server on 127.0.0.1 through ``s3fs``): raw upload, DCP's fsspec writer sync,
  and async with :class:`prime_ckpt.staging.ReusedBufferStager`;
* weights publishing (``weights/step_N``, sizes = fp32 parameter bytes): today's gather to rank 0
  + one file, :class:`prime_ckpt.publisher.WeightsPublisher` sync and async, raw write + fsync
  and memcpy of the per-rank bytes (``ckpt_bench/cases/weights.py``; ``--weights-only``,
  ``--no-weights``);
* load time per format, the step-time overhead of an async checkpoint every 10 steps, and RSS
  (peak during async saves, drift over 20 consecutive saves; then 20 training steps with and
  without a save after each, side by side, since training's own allocations move RSS too).

Reported per case: blocking time (training-loop stall), time to durable, throughput and peak
RSS, median / min / max over the repetitions after a warm-up save. Output:
``benchmarks/results/<name>.{json,md,png}``. Targets (ratios from this one run) are under the
JSON's top-level ``"targets"``. Run ``python benchmarks/save_latency.py --help``;
``--list-cases`` lists the registered cases, ``--cases a,b`` runs a subset, and ``--case-module
FILE.py`` adds the cases a file registers (see "Adding a case" in ``benchmarks/README.md``).

The code is the package ``benchmarks/ckpt_bench/`` (a case registry, one module per family of
cases under ``ckpt_bench/cases/``); this file is its entry point.

On a CUDA machine the state lives on the GPU and staging measures GPU-to-host copies into
pinned buffers (DCP's ``DefaultStager`` with ``StagingOptions`` pinned, and this project's
stager), and the memcpy floor is a device-to-host copy into pinned memory; nothing else changes.
"""

from __future__ import annotations

import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parent
for _p in (str(BENCH.parent), str(BENCH)):  # the repository (prime_ckpt) and benchmarks/ (ckpt_bench)
    if _p not in sys.path:
        sys.path.insert(0, _p)

from ckpt_bench.cli import main

if __name__ == "__main__":  # required: process-mode async_save spawns a child that re-imports this file
    main()
