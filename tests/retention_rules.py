"""A retention rule defined outside the package, as a user would (tests/test_retention.py uses it
through the library and through `prime-ckpt plan --rule tests.retention_rules:keep_eval_steps`)."""

from __future__ import annotations

from prime_ckpt.retention import StepView

#: the checkpoint steps an evaluation job has not finished with
EVAL_PINNED = {20}


def keep_eval_steps(view: StepView) -> str | None:
    """Keep the checkpoint steps an evaluation job pinned."""
    if view.kind == "checkpoint" and view.step in EVAL_PINNED:
        return "pinned by the eval job"
    return None


def broken(view: StepView) -> str | None:
    raise KeyError("no eval record")
