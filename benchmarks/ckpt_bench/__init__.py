"""The save-latency benchmark as a package: cases registered per family, one runner, one report.

``benchmarks/save_latency.py`` is the entry point (``from ckpt_bench.cli import main``). Modules:

* :mod:`ckpt_bench.registry`: the ``@register`` decorator and ``CASES`` (name -> spec);
* :mod:`ckpt_bench.cases`: one module per family of cases (baselines, DCP, ours, S3, loads,
  weights, checks);
* :mod:`ckpt_bench.runner`: one worker per rank under torchrun (timing, RSS sampling);
* :mod:`ckpt_bench.launch`: the launcher (moto server, one torchrun per world size);
* :mod:`ckpt_bench.targets`, :mod:`ckpt_bench.report`, :mod:`ckpt_bench.weights_report`: the
  targets, the markdown / JSON / plot outputs and merging of launches;
* :mod:`ckpt_bench.settings`, :mod:`ckpt_bench.cli`: the command line.
"""
