"""The command line: flags, and the ``Settings`` a launch (and each of its workers) runs with."""

from __future__ import annotations

import argparse
from dataclasses import dataclass, field
from pathlib import Path

from ckpt_bench.common import BENCH_DIR, GiB, MiB, parse_size
from ckpt_bench.titan_env import DEFAULT_ENV

DESCRIPTION = "Sync vs async checkpoint save latency, measured side by side against baselines (issue 6)."


def build_parser(description: str = DESCRIPTION) -> argparse.ArgumentParser:
    """Every flag of ``benchmarks/save_latency.py`` (the worker-only ones hidden)."""
    p = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", default=None, help="state sizes, total over ranks, comma-separated (default 256M,1G,2G; --quick: 64M)")
    p.add_argument("--world-sizes", default="1,2", help="world sizes to run (CPU/gloo ranks; default 1,2)")
    p.add_argument("--reps", type=int, default=None, help="timed repetitions per case after one warm-up (default 5; --quick: 2)")
    p.add_argument("--quick", action="store_true", help="CI smoke mode: 64 MiB, 2 reps, short step loop, 4 RSS saves")
    p.add_argument("--name", default=None, help="results name: benchmarks/results/<name>.{json,md,png} (default latest, quick)")
    p.add_argument("--results-dir", default=str(BENCH_DIR / "results"))
    p.add_argument("--workdir", default=None, help="scratch directory for checkpoints (default: a temp dir, removed)")
    p.add_argument("--no-s3", action="store_true", help="skip the S3 (moto) cases")
    p.add_argument("--s3-max-size", default="1G", help="run S3 cases only for sizes up to this (moto is slow; default 1G)")
    p.add_argument("--no-process", action="store_true", help="skip Checkpointer async process mode")
    p.add_argument("--step-size", default=None, help="state size of the step-overhead loop (default 64M)")
    p.add_argument("--steps", type=int, default=None, help="training steps per mode in the step-overhead loop (default 300; --quick 20)")
    p.add_argument("--rss-saves", type=int, default=None, help="consecutive async saves for the RSS drift check (default 20; --quick 4)")
    p.add_argument("--rss-size", default=None, help="state size of the RSS checks (default: largest size <= 1G)")
    p.add_argument("--no-titan", action="store_true",
                   help="skip the torchtitan CheckpointManager cases (titan_*; they need .venv-titan: make titan-env)")
    p.add_argument("--titan-env", default=str(DEFAULT_ENV),
                   help="the virtual environment torchtitan is imported from (default .venv-titan)")
    p.add_argument("--no-weights", action="store_true", help="skip the weights publishing cases")
    p.add_argument("--weights-only", action="store_true",
                   help="run only the weights publishing cases (no checkpoint, load, S3, step-overhead or RSS-drift cases)")
    p.add_argument("--weights-max-size", default="1G", help="run the weights cases for sizes up to this (default 1G)")
    p.add_argument("--timeout", type=float, default=1800, help="seconds per world size before its ranks are killed")
    p.add_argument("--no-plot", action="store_true")
    p.add_argument("--merge", default=None, metavar="A.json,B.json",
                   help="measure nothing: merge result files of launches over disjoint world sizes into --name "
                        "(records and extras side by side, targets recomputed, each launch listed)")
    p.add_argument("--replot", default=None, metavar="RESULT.json",
                   help="measure nothing: redraw RESULT.png beside a results file (its JSON and markdown stay as they are)")
    p.add_argument("--list-cases", action="store_true", help="print the registered cases (name, family, phase, storages) and exit")
    p.add_argument("--cases", default=None, metavar="A,B",
                   help="run only these registered cases (names from --list-cases; default: all)")
    p.add_argument("--case-module", action="append", default=[], metavar="FILE.py",
                   help="import this file before running: the cases it registers with ckpt_bench.registry.register "
                        "run beside the built-in ones (repeatable)")
    # internal: set by the launcher for the torchrun workers
    p.add_argument("--worker-out", default=None, help=argparse.SUPPRESS)
    p.add_argument("--s3-endpoint", default=None, help=argparse.SUPPRESS)
    return p


@dataclass
class Settings:
    """One launch's settings (sizes in bytes, times in seconds)."""

    sizes: list[int]
    world_sizes: list[int]
    reps: int
    quick: bool
    name: str
    results_dir: Path
    workdir: str | None
    s3: bool
    s3_max_size: int
    process_mode: bool
    step_size: int
    steps: int
    rss_saves: int
    rss_size: int
    timeout: float
    plot: bool
    worker_out: str | None
    s3_endpoint: str | None
    merge: list[Path] | None = None
    replot: Path | None = None
    weights_sizes: list[int] = field(default_factory=list)  # parameter bytes; [] = no weights cases
    weights_only: bool = False
    cases: list[str] | None = None  # None = every registered case
    case_modules: list[str] = field(default_factory=list)
    list_cases: bool = False
    titan: bool = True  # the torchtitan cases (False: --no-titan, or no environment for them)
    titan_env: str = str(DEFAULT_ENV)


def settings_from_args(argv: list[str] | None = None) -> Settings:
    """Parse ``argv`` (default ``sys.argv[1:]``) into :class:`Settings`, with the defaults filled in."""
    a = build_parser().parse_args(argv)
    sizes = [parse_size(s) for s in (a.sizes or ("64M" if a.quick else "256M,1G,2G")).split(",") if s]
    rss_default = max([s for s in sizes if s <= GiB] or [min(sizes)])
    return Settings(
        sizes=sizes,
        world_sizes=[int(w) for w in a.world_sizes.split(",") if w],
        reps=a.reps if a.reps is not None else (2 if a.quick else 5),
        quick=a.quick,
        name=a.name or ("quick" if a.quick else "latest"),
        results_dir=Path(a.results_dir),
        workdir=a.workdir,
        s3=not a.no_s3 and not a.weights_only,
        s3_max_size=parse_size(a.s3_max_size),
        process_mode=not a.no_process,
        step_size=parse_size(a.step_size) if a.step_size else (min(sizes) if a.quick else 64 * MiB),
        steps=a.steps if a.steps is not None else (20 if a.quick else 300),
        rss_saves=a.rss_saves if a.rss_saves is not None else (4 if a.quick else 20),
        rss_size=parse_size(a.rss_size) if a.rss_size else rss_default,
        timeout=a.timeout,
        plot=not a.no_plot,
        worker_out=a.worker_out,
        s3_endpoint=a.s3_endpoint,
        merge=[Path(m) for m in a.merge.split(",") if m] if a.merge else None,
        replot=Path(a.replot) if a.replot else None,
        weights_sizes=[] if a.no_weights else [z for z in sizes if z <= parse_size(a.weights_max_size)],
        weights_only=a.weights_only,
        cases=[c.strip() for c in a.cases.split(",") if c.strip()] if a.cases is not None else None,
        case_modules=list(a.case_module),
        list_cases=a.list_cases,
        titan=not a.no_titan,
        titan_env=str(Path(a.titan_env).resolve()),
    )
