"""Regression: async saves at every step overlapped with the per-step preemption check, on
2 gloo ranks, finish (no hang) and leave the newest step loadable bitwise."""

from conftest import torchrun

from prime_ckpt.layout import latest_complete_step


def test_async_saves_and_preemption_checks_do_not_deadlock(tmp_path):
    out = tmp_path / "run"
    steps = 40
    # a hang fails by the hard timeout (the bug hung on a shared group within a few steps)
    res = torchrun("preempt_async_stress.py", str(out), str(steps), "own", timeout=240)
    assert f"done {steps} steps digest " in res.stdout
    assert latest_complete_step(out, parts=("trainer",)) == steps
