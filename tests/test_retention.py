"""Retention planner (pure) and executor: property tests over random inventories plus the
classic retention bugs as unit cases."""

import random
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from prime_ckpt.layout import CheckpointStep, Inventory, WeightsStep, detect_parts, scan_inventory
from prime_ckpt.retention import (
    AHEAD_OF_CURRENT,
    IN_FLIGHT,
    INCOMPLETE,
    NEWEST_COMPLETE,
    Plan,
    RetentionConfigError,
    RetentionPolicy,
    apply_plan,
    plan,
)
from tests.marks import write_orchestrator_mark, write_trainer_mark


def ck(step, trainer=True, orchestrator=True):
    return CheckpointStep(step, Path(f"/r/checkpoints/step_{step}"), {"trainer": trainer, "orchestrator": orchestrator})


def wt(step, complete=True):
    return WeightsStep(step, Path(f"/r/weights/step_{step}"), complete)


def actions(p: Plan, kind="checkpoint"):
    return {e.step: e.action for e in p.entries if e.kind == kind}


def kept(p: Plan, kind="checkpoint"):
    return sorted(s for s, a in actions(p, kind).items() if a == "keep")


# -- strategies -------------------------------------------------------------------------------

steps = st.integers(min_value=0, max_value=40)


@st.composite
def scenarios(draw):
    ck_steps = draw(st.sets(steps, max_size=12))
    checkpoints = tuple(ck(s, draw(st.booleans()) or draw(st.booleans()), draw(st.booleans()) or draw(st.booleans())) for s in ck_steps)
    w_steps = draw(st.sets(steps, max_size=15))
    weights = tuple(wt(s, draw(st.booleans()) or draw(st.booleans())) for s in w_steps)
    policy = RetentionPolicy(
        keep=draw(st.none() | st.integers(1, 5)),
        keep_interval=draw(st.none() | st.integers(1, 10)),
        async_level=draw(st.integers(0, 4)),
        weights_interval=draw(st.none() | st.integers(1, 10)),
        consumer_step=draw(st.none() | steps),
    )
    current = draw(st.none() | st.integers(0, 45))
    in_flight = draw(st.sets(steps, max_size=2))
    return Inventory(checkpoints, weights), policy, current, in_flight


def _newest_complete(inv, policy, current, in_flight):
    all_steps = [c.step for c in inv.checkpoints] + [w.step for w in inv.weights] + list(in_flight)
    cur = current if current is not None else (max(all_steps) if all_steps else 0)
    parts = policy.parts if policy.parts is not None else detect_parts(inv.checkpoints)  # None: what the run writes
    done = [c.step for c in inv.checkpoints if c.complete(parts) and c.step not in in_flight and c.step <= cur]
    return (max(done) if done else None), cur


@settings(max_examples=3000, deadline=None)
@given(scenarios())
def test_safety_invariants(scenario):
    inv, policy, current, in_flight = scenario
    p = plan(inv, policy, current_step=current, in_flight=in_flight)
    ck_actions = actions(p)
    w_actions = actions(p, "weights")
    newest, cur = _newest_complete(inv, policy, current, in_flight)
    # every directory is in the plan exactly once
    assert sorted(ck_actions) == sorted(c.step for c in inv.checkpoints)
    assert sorted(w_actions) == sorted(w.step for w in inv.weights)
    assert all(e.reasons for e in p.entries)
    # the newest complete checkpoint and every in-flight step survive
    if newest is not None:
        assert ck_actions[newest] == "keep"
    for s in in_flight:
        assert ck_actions.get(s, "keep") == "keep"
    # steps of another run (above the current step) are never deleted
    assert all(a == "keep" for s, a in ck_actions.items() if s > cur)
    assert all(a == "keep" for s, a in w_actions.items() if s > cur)
    # the async window [x - k, x] of every kept (or in-flight) checkpoint step is pinned
    k = policy.async_level
    for x in set(kept(p)) | set(in_flight):
        for s, a in w_actions.items():
            if x - k <= s <= x:
                assert a == "keep", (x, s)
    # the live window and what the consumer has not acknowledged survive
    for s, a in w_actions.items():
        if cur - k <= s <= cur or (policy.consumer_step is not None and s >= policy.consumer_step):
            assert a == "keep", s
    # keep=K keeps at least min(K, #complete) complete checkpoints
    if policy.keep is not None:
        complete_kept = [c.step for c in inv.checkpoints if c.complete() and ck_actions[c.step] == "keep" and c.step not in in_flight and c.step <= cur]
        complete_all = [c.step for c in inv.checkpoints if c.complete() and c.step not in in_flight and c.step <= cur]
        assert len(complete_kept) >= min(policy.keep, len(complete_all))


@settings(max_examples=1500, deadline=None)
@given(scenarios(), st.randoms(use_true_random=False))
def test_independent_of_listing_order_and_idempotent(scenario, rnd):
    inv, policy, current, in_flight = scenario
    p = plan(inv, policy, current_step=current, in_flight=in_flight)
    shuffled_c, shuffled_w = list(inv.checkpoints), list(inv.weights)
    rnd.shuffle(shuffled_c)
    rnd.shuffle(shuffled_w)
    assert plan(Inventory(tuple(shuffled_c), tuple(shuffled_w)), policy, current_step=current, in_flight=in_flight) == p
    # applying the plan, then planning again on what is left, deletes nothing more
    gone = {(e.kind, e.step) for e in p.deletes}
    left = Inventory(
        tuple(c for c in inv.checkpoints if ("checkpoint", c.step) not in gone),
        tuple(w for w in inv.weights if ("weights", w.step) not in gone),
    )
    again = plan(left, policy, current_step=current if current is not None else _newest_complete(inv, policy, current, in_flight)[1], in_flight=in_flight)
    assert again.deletes == ()
    assert {(e.kind, e.step) for e in again.keeps} == {(e.kind, e.step) for e in p.keeps}


# -- unit cases: the classic retention bugs -------------------------------------------------


def test_integer_order_step_9_vs_step_10():
    p = plan(Inventory((ck(10), ck(9))), RetentionPolicy(keep=1))
    assert actions(p) == {9: "delete", 10: "keep"}
    assert p.entries[0].reasons == ("older than the 1 newest complete",)


def test_keep_1_while_a_save_is_in_flight():
    # step_20 is being written (trainer dir without .metadata yet); step_10 is the only complete one
    inv = Inventory((ck(10), ck(20, trainer=False, orchestrator=False)))
    p = plan(inv, RetentionPolicy(keep=1), current_step=20, in_flight=[20])
    assert actions(p) == {10: "keep", 20: "keep"}
    assert NEWEST_COMPLETE in dict((e.step, e.reasons) for e in p.entries)[10]
    assert dict((e.step, e.reasons) for e in p.entries)[20] == (IN_FLIGHT,)


def test_keep_plus_keep_interval():
    inv = Inventory(tuple(ck(s) for s in range(1, 13)))
    p = plan(inv, RetentionPolicy(keep=1, keep_interval=5), current_step=12)
    assert kept(p) == [5, 10, 12]


def test_stale_higher_steps_from_an_earlier_run_never_cost_the_new_checkpoint():
    # an earlier run reached step 100 in this directory; a fresh run just wrote step 10
    inv = Inventory((ck(100), ck(90), ck(10)), (wt(100), wt(10), wt(9)))
    p = plan(inv, RetentionPolicy(keep=1, async_level=1), current_step=10)
    assert actions(p) == {10: "keep", 90: "keep", 100: "keep"}
    assert dict((e.step, e.reasons) for e in p.entries if e.kind == "checkpoint")[100] == (AHEAD_OF_CURRENT,)
    assert actions(p, "weights") == {9: "keep", 10: "keep", 100: "keep"}


def test_incomplete_abandoned_vs_maybe_in_progress():
    inv = Inventory((ck(5, orchestrator=False), ck(10), ck(15, trainer=False)))
    p = plan(inv, RetentionPolicy(), current_step=15)
    assert actions(p) == {5: "delete", 10: "keep", 15: "keep"}
    assert dict((e.step, e.reasons) for e in p.entries)[5] == (INCOMPLETE,)


def test_weights_follow_the_async_window():
    inv = Inventory((ck(10), ck(20), ck(30)), tuple(wt(s) for s in range(31)))
    p = plan(inv, RetentionPolicy(keep=2, async_level=2), current_step=31)
    assert kept(p) == [20, 30]
    assert kept(p, "weights") == [18, 19, 20, 28, 29, 30]
    reasons = {e.step: e.reasons for e in p.entries if e.kind == "weights"}
    assert reasons[18] == ("pinned by checkpoint step 20 (needs weights [18, 20])",)
    assert "live async window" in reasons[29] and "live async window" in reasons[30]
    assert reasons[0] == ("not pinned by any kept checkpoint or window",)
    p2 = plan(inv, RetentionPolicy(keep=2, async_level=2, weights_interval=10, consumer_step=25), current_step=31)
    assert kept(p2, "weights") == [0, 10, 18, 19, 20, 25, 26, 27, 28, 29, 30]


@pytest.mark.parametrize(
    "kwargs,msg",
    [({"keep": 0}, "keep must be >= 1"), ({"keep_interval": 0}, "keep_interval must be >= 1"),
     ({"async_level": -1}, "async_level must be >= 0"), ({"weights_interval": 0}, "weights_interval must be >= 1")],
)
def test_policy_validation(kwargs, msg):
    with pytest.raises(RetentionConfigError, match=msg):
        RetentionPolicy(**kwargs)


# -- executor ---------------------------------------------------------------------------------


def _make_run(root: Path, ck_steps, w_steps):
    for s in ck_steps:
        t = root / "checkpoints" / f"step_{s}" / "trainer"
        t.mkdir(parents=True)
        write_trainer_mark(t)
        write_orchestrator_mark(t.parent / "orchestrator.pt", s)
    for s in w_steps:
        d = root / "weights" / f"step_{s}"
        d.mkdir(parents=True)
        (d / "COMPLETE").write_bytes(b"")


def test_apply_on_disk_never_touches_foreign_names(tmp_path):
    _make_run(tmp_path, [9, 10, 11], range(12))
    for foreign in ("checkpoints/step_010", "checkpoints/latest", "weights/step_1.tmp", "weights/notes.txt"):
        (tmp_path / foreign).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / foreign).write_text("not ours")
    p = plan(scan_inventory(tmp_path), RetentionPolicy(keep=1, async_level=1), current_step=11)
    result = apply_plan(p)
    assert sorted(x.name for x in result.deleted) == sorted(["step_9", "step_10"] + [f"step_{s}" for s in range(10)])
    assert sorted(x.name for x in (tmp_path / "checkpoints").iterdir()) == ["latest", "step_010", "step_11"]
    assert sorted(x.name for x in (tmp_path / "weights").iterdir()) == ["notes.txt", "step_1.tmp", "step_10", "step_11"]
    # applying the same plan again: everything is already gone, nothing fails
    again = apply_plan(p)
    assert again.deleted == [] and len(again.already_gone) == len(result.deleted) and again.failed == []


def test_apply_carries_on_after_oserror(tmp_path):
    _make_run(tmp_path, [1, 2, 3], [])
    p = plan(scan_inventory(tmp_path), RetentionPolicy(keep=1), current_step=3)

    def flaky(path):
        if path.name == "step_1":
            raise PermissionError(13, "Permission denied")
        from prime_ckpt.storage import remove_tree
        return remove_tree(path)

    result = apply_plan(p, remove=flaky)
    assert [x.name for x in result.deleted] == ["step_2"]
    assert result.failed[0][0].name == "step_1" and "Permission denied" in result.failed[0][1]


# -- integration: the trainer prunes every step while a slow consumer reads weights -----------


def test_slow_consumer_never_sees_a_missing_weights_file(tmp_path):
    """The trainer saves a checkpoint and prunes (keep=1) every step; a slow consumer at step m
    reads weights/step_{m-k} as the async-RL orchestrator does, and the trainer only runs step n
    once the consumer produced step n (rollouts). Nothing the consumer reads may vanish."""
    import threading
    import time

    import torch

    from prime_ckpt.config import CheckpointConfig
    from prime_ckpt.layout import scan_checkpoints, scan_weights
    from prime_ckpt.trainer import Checkpointer, TrainerState
    from prime_ckpt.weights import load_weights, save_weights, wait_for_weights

    k, steps = 2, 14
    model = torch.nn.Linear(64, 64)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    state = TrainerState(model, opt)
    ckpt = Checkpointer(tmp_path, CheckpointConfig(interval=1, keep=1), async_level=k)
    consumer_done = [0]
    errors: list[BaseException] = []
    rnd = random.Random(0)

    def consumer():
        try:
            for m in range(1, steps + 1):
                d = wait_for_weights(tmp_path, max(m - k, 0), timeout=60)
                time.sleep(rnd.uniform(0.0, 0.03))  # slow: the trainer moves on meanwhile
                sd, cfg = load_weights(d)
                assert cfg["step"] == max(m - k, 0)
                consumer_done[0] = m
        except BaseException as e:  # noqa: BLE001 - reported by the test thread
            errors.append(e)
            consumer_done[0] = steps + 1

    save_weights(tmp_path, 0, model)
    t = threading.Thread(target=consumer)
    t.start()
    for n in range(1, steps + 1):
        deadline = time.monotonic() + 60
        while consumer_done[0] < n:  # wait for the rollouts of step n
            assert time.monotonic() < deadline, "consumer stalled"
            time.sleep(0.001)
        if errors:
            break
        with torch.no_grad():
            model.weight.add_(1.0)
        save_weights(tmp_path, n, model)
        state.progress.step = n
        ckpt.save(n, state)
    t.join(timeout=60)
    ckpt.close()
    assert not errors, errors
    assert [c.step for c in scan_checkpoints(tmp_path)] == [steps]
    assert [w.step for w in scan_weights(tmp_path)] == [steps - k, steps - 1, steps]


def test_a_slow_consumer_keeps_the_weights_it_acknowledged(tmp_path):
    """The inference side acknowledged weights step 3 and is late; the trainer's retention
    (--ckpt.keep 1, async level 1) runs at steps 6 and 12: every weights step >= 3 survives, the
    older unpinned ones go. Without the acknowledgement step 3..9 would be deleted."""
    import torch

    from prime_ckpt.config import CheckpointConfig
    from prime_ckpt.layout import scan_checkpoints, scan_weights
    from prime_ckpt.orchestrator import read_consumer_ack, write_consumer_ack
    from prime_ckpt.publisher import WeightsPublisher
    from prime_ckpt.retention import plan_output_dir
    from prime_ckpt.trainer import Checkpointer, TrainerState

    model = torch.nn.Linear(4, 4)
    state = TrainerState(model, torch.optim.SGD(model.parameters(), lr=0.1))
    ckpt = Checkpointer(tmp_path, CheckpointConfig(interval=6, keep=1), async_level=1)
    assert read_consumer_ack(tmp_path) is None
    with WeightsPublisher(tmp_path, save_async=False) as pub:
        for n in range(13):
            pub.publish(n, model)
            if n == 3:
                write_consumer_ack(tmp_path, 3)  # the server reported it serves step 3
            state.progress.step = n
            if ckpt.should_save(n):
                ckpt.save(n, state)
                ckpt.flush()
    ckpt.close()
    assert read_consumer_ack(tmp_path) == 3
    assert [c.step for c in scan_checkpoints(tmp_path)] == [12]
    assert [w.step for w in scan_weights(tmp_path)] == list(range(3, 13))
    # prime-ckpt plan/prune read the same acknowledgement
    reasons = {e.step: e.reasons for e in plan_output_dir(tmp_path, RetentionPolicy(keep=1, async_level=1)).entries if e.kind == "weights"}
    assert all(any("acknowledged" in r for r in reasons[s]) for s in range(3, 11)), reasons
    write_consumer_ack(tmp_path, 11)
    p = plan_output_dir(tmp_path, RetentionPolicy(keep=1, async_level=1))
    assert sorted(e.step for e in p.entries if e.kind == "weights" and e.action == "delete") == list(range(3, 11))


def test_a_custom_rule_from_outside_the_package_keeps_with_its_reason(tmp_path):
    """#17: a user rule (tests/retention_rules.py) keeps a step the policy would delete, its reason
    shows in the plan (library and `plan --json`), and the kept checkpoint pins its weights."""
    import json

    from typer.testing import CliRunner

    from prime_ckpt.cli import app
    from tests.marks import write_orchestrator_mark, write_trainer_mark
    from tests.retention_rules import keep_eval_steps

    inv = Inventory((ck(10), ck(20), ck(30)), tuple(wt(s) for s in range(31)))
    p = plan(inv, RetentionPolicy(keep=1, async_level=1, rules=(keep_eval_steps,)), current_step=30)
    assert kept(p) == [20, 30] and dict((e.step, e.reasons) for e in p.entries if e.kind == "checkpoint")[20] == (
        "rule keep_eval_steps: pinned by the eval job",)
    assert kept(p, "weights") == [19, 20, 29, 30]
    assert kept(plan(inv, RetentionPolicy(keep=1, async_level=1), current_step=30)) == [30]  # without the rule
    for s in (10, 20, 30):
        write_trainer_mark(tmp_path / "checkpoints" / f"step_{s}" / "trainer")
        write_orchestrator_mark(tmp_path / "checkpoints" / f"step_{s}" / "orchestrator.pt", s)
    runner = CliRunner()
    r = runner.invoke(app, ["plan", str(tmp_path), "--keep", "1", "--async-level", "0", "--json", "--rule", "tests.retention_rules:keep_eval_steps"])
    assert r.exit_code == 0, r.output
    got = {e["step"]: (e["action"], e["reasons"]) for e in json.loads(r.stdout)["entries"]}
    assert got[20] == ("keep", ["rule keep_eval_steps: pinned by the eval job"]) and got[10][0] == "delete"
    for spec, words in (("tests.retention_rules:broken", "retention rule broken failed on checkpoint step"),
                        ("tests.retention_rules:nothing", "--rule tests.retention_rules:nothing: AttributeError"),
                        ("no_colon", "expected MODULE:NAME")):  # fmt: skip
        r = runner.invoke(app, ["prune", str(tmp_path), "--keep", "1", "--async-level", "0", "--yes", "--rule", spec])
        assert r.exit_code == 2 and words in r.stderr and len(r.stderr.splitlines()) == 1, r.output
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["step_10", "step_20", "step_30"]
