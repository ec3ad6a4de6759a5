"""The entry point of ``benchmarks/save_latency.py``: parse the flags, register the cases (the
built-in ones and those of ``--case-module`` files), then list them, merge result files, redraw
a result's plot, run one rank's worker (under torchrun) or launch every world size."""

from __future__ import annotations

import sys

from ckpt_bench import registry
from ckpt_bench.settings import settings_from_args


def main(argv: list[str] | None = None) -> None:
    """Run the benchmark with ``argv`` (default ``sys.argv[1:]``); see ``--help``.

    Raises SystemExit with a one-line message for an unknown ``--cases`` name, a bad
    ``--case-module`` file or a bad ``--merge`` / ``--replot`` input, and exit status 1 when a world size failed."""
    argv = list(sys.argv[1:] if argv is None else argv)
    s = settings_from_args(argv)
    registry.load_builtin()
    for path in s.case_modules:
        registry.load_case_module(path)
    if s.list_cases:
        print(registry.listing())
        return
    registry.check_names(s.cases)
    if s.replot is not None:
        from ckpt_bench.report import replot

        print(replot(s.replot))
        return
    if s.merge:
        from ckpt_bench.report import merge_results, write_outputs

        write_outputs(merge_results(s.merge, s.name), s.results_dir, s.name, s.plot)
        return
    if s.worker_out is not None:
        from ckpt_bench.runner import Worker

        Worker(s).main()
        return
    from ckpt_bench.launch import launcher

    launcher(s, argv)
