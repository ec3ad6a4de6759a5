"""Fault injection on the real example job (see ``tests/faults/harness.py``).

30 seeded trials (sync and async saves; whole-job and single-rank SIGKILLs at random instants,
mostly while a save is in flight), each resumed with ``--ckpt.resume-step -1`` and checked
against one uninterrupted reference run; and a save that crashed, was resumed from an earlier
step and saved again. ``make faults`` runs 200 trials.
"""

from __future__ import annotations

import pytest

from tests.faults.harness import (
    lease_scenario,
    make_plan,
    report,
    retried_save_scenario,
    run_reference,
    run_trials,
)

TRIALS = 30
SEED = 20240605

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    return run_reference(tmp_path_factory.mktemp("faults-ref"))


def test_plan_is_seeded_and_mixed():
    a, b = make_plan(TRIALS, SEED), make_plan(TRIALS, SEED)
    assert [(t.mode, t.kill, t.trigger, t.offset, t.jitter_s) for t in a] == [(t.mode, t.kill, t.trigger, t.offset, t.jitter_s) for t in b]
    assert {t.mode for t in a} == {"sync", "async"}
    assert {t.kill for t in a} == {"job", "rank0", "rank1"}
    assert len({t.trigger for t in a}) >= 4


@pytest.mark.timeout(1800)
def test_fault_injection_trials(reference, tmp_path):
    result = run_trials(TRIALS, SEED, tmp_path, reference, verbose=True)
    text = report(result)
    print(text)
    assert not result.lost and not result.chain_problems, text
    assert result.summary() == f"faults: {TRIALS} trials, {TRIALS} ok, 0 lost"


@pytest.mark.timeout(900)
@pytest.mark.parametrize("mode", ["sync", "async"])
def test_crashed_then_retried_save(reference, tmp_path, mode):
    problems = retried_save_scenario(tmp_path, reference, mode)
    assert not problems, "\n".join(problems)


@pytest.mark.timeout(900)
def test_second_run_refused_and_killed_lease_holder_taken_over(reference, tmp_path):
    problems = lease_scenario(tmp_path, reference)
    assert not problems, "\n".join(problems)
