"""How cost grows (``benchmarks/scaling.py``): one module per series (``dcp_plan``,
``retention_series``, ``s3_series``, ``reshard_series``), the growth fitter (``growth``), the
growth table and extrapolations (``analysis``), the outputs (``report``), the entry (``cli``)."""
