"""The built-in retention rules one by one (each gives its reason or None for a StepView), and
the planner composing them: plans for a few flag combinations, expected by hand."""

from __future__ import annotations

from pathlib import Path

import pytest

from prime_ckpt.layout import CheckpointStep, Inventory, WeightsStep
from prime_ckpt.retention import Plan, RetentionPolicy, plan
from prime_ckpt.retention_rules import (
    AHEAD_OF_CURRENT,
    CONSUMER,
    IN_FLIGHT,
    INCOMPLETE,
    INCOMPLETE_MAYBE_WRITING,
    KEEP_ALL,
    LIVE_WINDOW,
    NEWEST_COMPLETE,
    NEWEST_RESUMABLE,
    NOT_PINNED,
    AheadOfCurrent,
    ConsumerAck,
    KeepAll,
    KeepEvery,
    KeepNewest,
    LiveWindow,
    PinnedBy,
    RetentionConfigError,
    StepView,
    UserRule,
    load_rule,
    reasons,
)


def view(step, kind="checkpoint", current=50, k=1, complete=True):
    return StepView(kind, step, complete, current, k)


# -- each rule ------------------------------------------------------------------------------------


def test_keep_all_keeps_everything():
    assert KeepAll()(view(3)) == KEEP_ALL == "keep=None keeps all"
    assert KeepAll()(view(3, "weights", complete=False)) == KEEP_ALL


def test_keep_newest_keeps_the_k_newest_of_its_steps():
    rule = KeepNewest.of(2, [10, 40, 30, 20])
    assert rule.steps == {40, 30}
    assert rule(view(40)) == rule(view(30)) == "among the 2 newest complete"
    assert rule(view(20)) is None and rule(view(50)) is None


def test_keep_every_names_its_setting():
    assert KeepEvery(20, "keep_interval")(view(40)) == "multiple of keep_interval=20"
    assert KeepEvery(10, "weights_interval")(view(0, "weights")) == "multiple of weights_interval=10"
    assert KeepEvery(20, "keep_interval")(view(30)) is None


def test_ahead_of_current():
    assert AheadOfCurrent()(view(51, current=50)) == AHEAD_OF_CURRENT == "newer than current step (another run's)"
    assert AheadOfCurrent()(view(50, current=50)) is None


def test_pinned_by_is_the_weights_window_of_a_checkpoint():
    rule = PinnedBy(40)
    assert rule(view(38, "weights", k=2)) == "pinned by checkpoint step 40 (needs weights [38, 40])"
    assert rule(view(40, "weights", k=0)) == "pinned by checkpoint step 40 (needs weights [40, 40])"
    assert rule(view(37, "weights", k=2)) is None and rule(view(41, "weights", k=2)) is None


def test_live_window():
    assert LiveWindow()(view(48, "weights", current=50, k=2)) == LIVE_WINDOW == "live async window"
    assert LiveWindow()(view(50, "weights", current=50, k=0)) == LIVE_WINDOW
    assert LiveWindow()(view(47, "weights", current=50, k=2)) is None
    assert LiveWindow()(view(51, "weights", current=50, k=2)) is None


def test_consumer_ack():
    assert ConsumerAck(45)(view(45, "weights")) == CONSUMER == "at or after the consumer's last acknowledged step"
    assert ConsumerAck(45)(view(44, "weights")) is None


def test_user_rule_prefixes_its_name_and_fails_in_one_line():
    def best(v):
        return "best eval" if v.step == 7 else None

    assert UserRule(best)(view(7)) == "rule best: best eval"
    assert UserRule(best)(view(8)) is None
    with pytest.raises(RetentionConfigError, match=r"retention rule bad returned 3 for checkpoint step 7; expected"):
        UserRule(_named("bad", lambda v: 3))(view(7))
    with pytest.raises(RetentionConfigError, match=r"retention rule boom failed on weights step 7: KeyError"):
        UserRule(_named("boom", lambda v: {}["x"]))(view(7, "weights"))


def _named(name, fn):
    fn.__name__ = name
    return fn


def test_reasons_in_rule_order_skipping_none():
    rules = [KeepAll(), AheadOfCurrent(), KeepEvery(5, "keep_interval")]
    assert reasons(rules, view(55, current=50)) == [KEEP_ALL, AHEAD_OF_CURRENT, "multiple of keep_interval=5"]
    assert reasons(rules[1:], view(3)) == []


def test_load_rule():
    from tests.retention_rules import keep_eval_steps

    assert load_rule("tests.retention_rules:keep_eval_steps") is keep_eval_steps
    with pytest.raises(RetentionConfigError, match="expected MODULE:NAME"):
        load_rule("tests.retention_rules")
    with pytest.raises(RetentionConfigError, match="EVAL_PINNED is not callable"):
        load_rule("tests.retention_rules:EVAL_PINNED")


# -- the composed planner -------------------------------------------------------------------------


def ck(step, orchestrator=True, foreign=None):
    return CheckpointStep(step, Path(f"/r/checkpoints/step_{step}"), {"trainer": True, "orchestrator": orchestrator}, foreign=foreign)


def wt(step, complete=True):
    return WeightsStep(step, Path(f"/r/weights/step_{step}"), complete)


INV = Inventory(tuple(ck(s) for s in (10, 20, 30, 40, 50)), tuple(wt(s) for s in (9, 10, 18, 19, 20, 29, 30, 39, 40, 48, 49, 50)))


def by_step(p: Plan, kind: str) -> dict[int, tuple[str, tuple[str, ...]]]:
    return {e.step: (e.action, e.reasons) for e in p.entries if e.kind == kind}


def kept(p: Plan, kind: str) -> set[int]:
    return {s for s, (a, _) in by_step(p, kind).items() if a == "keep"}


def test_keep_two_pins_their_windows():
    p = plan(INV, RetentionPolicy(keep=2, async_level=1), current_step=50)
    ckpts = by_step(p, "checkpoint")
    assert ckpts[50] == ("keep", (NEWEST_COMPLETE, "among the 2 newest complete"))
    assert ckpts[40] == ("keep", ("among the 2 newest complete",))
    assert {s for s, (a, _) in ckpts.items() if a == "delete"} == {10, 20, 30}
    assert ckpts[10] == ("delete", ("older than the 2 newest complete",))
    assert kept(p, "weights") == {39, 40, 49, 50}
    w = by_step(p, "weights")
    assert w[49] == ("keep", ("pinned by checkpoint step 50 (needs weights [49, 50])", LIVE_WINDOW))
    assert w[48] == ("delete", (NOT_PINNED,))


def test_intervals_and_consumer():
    policy = RetentionPolicy(keep=2, keep_interval=20, async_level=1, weights_interval=10, consumer_step=45)
    p = plan(INV, policy, current_step=50)
    ckpts = by_step(p, "checkpoint")
    assert kept(p, "checkpoint") == {20, 40, 50}
    assert ckpts[40] == ("keep", ("among the 2 newest complete", "multiple of keep_interval=20"))
    assert ckpts[20] == ("keep", ("multiple of keep_interval=20",))
    assert kept(p, "weights") == {10, 19, 20, 30, 39, 40, 48, 49, 50}
    w = by_step(p, "weights")
    assert w[50] == ("keep", ("pinned by checkpoint step 50 (needs weights [49, 50])", LIVE_WINDOW, CONSUMER, "multiple of weights_interval=10"))
    assert w[20] == ("keep", ("pinned by checkpoint step 20 (needs weights [19, 20])", "multiple of weights_interval=10"))
    assert w[48] == ("keep", (CONSUMER,))


def test_keep_none_keeps_everything():
    p = plan(INV, RetentionPolicy(async_level=1), current_step=50)
    assert not p.deletes
    ckpts, w = by_step(p, "checkpoint"), by_step(p, "weights")
    assert ckpts[50] == ("keep", (NEWEST_COMPLETE, KEEP_ALL))
    assert ckpts[10] == ("keep", (KEEP_ALL,))
    assert w[9] == ("keep", (KEEP_ALL, "pinned by checkpoint step 10 (needs weights [9, 10])"))
    assert w[18] == ("keep", (KEEP_ALL,))


def test_guards_come_before_the_rules():
    def keep_ten(v):
        return "best eval" if v.step == 10 else None

    inv = Inventory(
        (ck(5), ck(7, foreign="unknown files: x.bin"), ck(10), ck(20), ck(25, orchestrator=False), ck(30), ck(40, orchestrator=False), ck(60)),
        (wt(5), wt(7), wt(15, complete=False), wt(19), wt(20), wt(30), wt(39), wt(40), wt(45, complete=False), wt(60)),
    )
    p = plan(inv, RetentionPolicy(keep=1, async_level=1, rules=(keep_ten,)), current_step=50, in_flight=[40])
    assert by_step(p, "checkpoint") == {
        5: ("delete", ("older than the 1 newest complete",)),
        7: ("keep", ("not this project's layout (unknown files: x.bin): never deleted",)),
        10: ("keep", ("rule keep_ten: best eval",)),
        20: ("keep", (NEWEST_RESUMABLE,)),  # 30 lacks weights 29
        25: ("delete", (INCOMPLETE,)),
        30: ("keep", (NEWEST_COMPLETE, "among the 1 newest complete")),
        40: ("keep", (IN_FLIGHT,)),
        60: ("keep", (AHEAD_OF_CURRENT,)),
    }
    assert by_step(p, "weights") == {
        5: ("delete", (NOT_PINNED,)),
        7: ("delete", (NOT_PINNED,)),  # a foreign checkpoint pins nothing
        15: ("delete", (INCOMPLETE,)),
        19: ("keep", ("pinned by checkpoint step 20 (needs weights [19, 20])",)),
        20: ("keep", ("pinned by checkpoint step 20 (needs weights [19, 20])",)),
        30: ("keep", ("pinned by checkpoint step 30 (needs weights [29, 30])",)),
        39: ("keep", ("pinned by checkpoint step 40 (needs weights [39, 40])",)),
        40: ("keep", ("pinned by checkpoint step 40 (needs weights [39, 40])",)),
        45: ("keep", (INCOMPLETE_MAYBE_WRITING,)),
        60: ("keep", (AHEAD_OF_CURRENT, "pinned by checkpoint step 60 (needs weights [59, 60])")),
    }


def test_weights_planning_asks_only_the_checkpoints_whose_window_can_hold_the_step(monkeypatch):
    """Each weights step is checked against the kept checkpoints x with the step in [x - k, x]
    only (by bisection), not against every kept checkpoint: planning stays linear in steps on disk
    (benchmarks/scaling.py measured 63 s at 1e5 steps with keep_interval=100 before). The plan is
    the one the full check gives."""
    import prime_ckpt.retention as retention_mod

    calls = []
    real = PinnedBy.__call__
    monkeypatch.setattr(PinnedBy, "__call__", lambda self, v: calls.append(self.x) or real(self, v))
    n, k = 400, 2
    inv = Inventory(tuple(ck(s) for s in range(1, n + 1)), tuple(wt(s) for s in range(n + 1)))
    p = plan(inv, RetentionPolicy(keep=3, keep_interval=10, async_level=k))
    kept_ckpts = [e.step for e in p.entries if e.kind == "checkpoint" and e.action == "keep"]
    assert kept_ckpts == sorted([*range(10, n + 1, 10), 398, 399])
    assert len(calls) <= (k + 1) * (n + 1)  # before: len(kept_ckpts) * (n + 1) = 16842
    reasons_of = {e.step: e.reasons for e in p.entries if e.kind == "weights"}
    assert reasons_of[19] == ("pinned by checkpoint step 20 (needs weights [18, 20])",)
    assert reasons_of[398] == ("pinned by checkpoint step 398 (needs weights [396, 398])",
                               "pinned by checkpoint step 399 (needs weights [397, 399])",
                               "pinned by checkpoint step 400 (needs weights [398, 400])", "live async window")
    assert [e.action for e in p.entries if e.kind == "weights" and e.step == 17] == ["delete"]
    full = [*retention_mod.weights_rules(RetentionPolicy(keep=3, keep_interval=10, async_level=k), kept_ckpts)]
    for e in p.entries:
        if e.kind == "weights" and e.action == "keep":
            assert list(e.reasons) == retention_mod.reasons(full, StepView("weights", e.step, True, n, k)), e
