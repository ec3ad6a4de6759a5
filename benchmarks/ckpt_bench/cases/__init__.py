"""The built-in cases, one module per family; importing this package registers them all, in the
order the runner builds them (within a phase: baselines, DCP, ours, S3, loads, torchtitan)."""

from ckpt_bench.cases import baselines, checks, dcp, loads, ours, s3, titan, weights  # noqa: F401
