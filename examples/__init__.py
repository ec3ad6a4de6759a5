"""Runnable examples built on prime_ckpt (``python -m examples.<name>...`` from the repo root)."""
