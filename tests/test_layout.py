"""Step parsing, inventory, completeness and resume-step resolution."""

import pytest
from hypothesis import given
from hypothesis import strategies as st

from prime_ckpt.layout import (
    CheckpointNotFoundError,
    RunLayout,
    latest_complete_step,
    parse_step,
    resolve_resume_step,
    scan_checkpoints,
    scan_weights,
)
from tests.marks import write_orchestrator_mark, write_trainer_mark


def make_step(root, step, trainer=True, orchestrator=True, trainer_started=True):
    layout = RunLayout(root)
    d = layout.trainer_dir(step)
    if trainer_started or trainer:
        d.mkdir(parents=True)
        (d / "__0_0.distcp").write_bytes(b"x")
    if trainer:
        write_trainer_mark(d)
    if orchestrator:
        layout.orchestrator_path(step).parent.mkdir(parents=True, exist_ok=True)
        write_orchestrator_mark(layout.orchestrator_path(step), step)


@pytest.mark.parametrize(
    "name,expected",
    [("step_0", 0), ("step_9", 9), ("step_10", 10), ("step_123456789", 123456789),
     ("step_010", None), ("step_-1", None), ("step_", None), ("step_1.tmp", None), ("latest", None),
     ("Step_1", None), ("step_1 ", None), (".step_1.tmp.123", None)],
)
def test_parse_step(name, expected):
    assert parse_step(name) == expected


@given(st.integers(min_value=0, max_value=10**12))
def test_parse_step_roundtrip(n):
    assert parse_step(f"step_{n}") == n


def test_scan_orders_by_integer_and_skips_foreign_names(tmp_path):
    for s in (9, 10, 100, 2):
        make_step(tmp_path, s)
    (tmp_path / "checkpoints" / "step_010").mkdir()
    (tmp_path / "checkpoints" / "notes").mkdir()
    (tmp_path / "checkpoints" / "step_11").write_text("a file, not a dir")
    assert [c.step for c in scan_checkpoints(tmp_path)] == [2, 9, 10, 100]
    assert latest_complete_step(tmp_path) == 100


def test_completeness_per_part(tmp_path):
    make_step(tmp_path, 10, trainer=True, orchestrator=False)
    make_step(tmp_path, 20, trainer=False, orchestrator=True)  # trainer started, no .metadata
    make_step(tmp_path, 5)
    by_step = {c.step: c for c in scan_checkpoints(tmp_path)}
    assert by_step[10].parts == {"trainer": True, "orchestrator": False}
    assert by_step[20].parts == {"trainer": False, "orchestrator": True}
    assert by_step[20].present == ("trainer", "orchestrator")
    assert by_step[5].complete()
    assert not by_step[10].complete() and by_step[10].complete(("trainer",))


def test_resume_latest_skips_incomplete(tmp_path):
    make_step(tmp_path, 9)
    make_step(tmp_path, 10, orchestrator=False)  # step_10 with trainer but no orchestrator part
    make_step(tmp_path, 11, trainer=False)
    assert resolve_resume_step(tmp_path, -1) == 9  # numeric: 9 < 10 < 11, newest complete is 9
    assert resolve_resume_step(tmp_path, -1, parts=("trainer",)) == 10


def test_resume_none_and_fresh(tmp_path, caplog):
    assert resolve_resume_step(tmp_path, None) is None
    with caplog.at_level("INFO"):
        assert resolve_resume_step(tmp_path, -1) is None
    assert "starting fresh" in caplog.text


def test_resume_explicit_missing_or_incomplete_lists_steps(tmp_path):
    make_step(tmp_path, 9)
    make_step(tmp_path, 10, orchestrator=False)
    assert resolve_resume_step(tmp_path, 9) == 9
    with pytest.raises(CheckpointNotFoundError, match=r"step_7: no such checkpoint step; steps on disk: 9, 10 \(incomplete: orchestrator\)"):
        resolve_resume_step(tmp_path, 7)
    with pytest.raises(CheckpointNotFoundError, match=r"step_10: checkpoint step is incomplete \(missing or unfinished: orchestrator\)"):
        resolve_resume_step(tmp_path, 10)
    with pytest.raises(ValueError):
        resolve_resume_step(tmp_path, -2)


def test_scan_weights(tmp_path):
    layout = RunLayout(tmp_path)
    for s, done in ((3, True), (12, False), (4, True)):
        d = layout.weights_step_dir(s)
        d.mkdir(parents=True)
        if done:
            (d / "COMPLETE").write_bytes(b"")
    (layout.weights_dir / "tmp").mkdir()
    assert [(w.step, w.complete) for w in scan_weights(tmp_path)] == [(3, True), (4, True), (12, False)]


def test_one_default_for_parts_a_trainer_only_run_resumes(tmp_path):
    """#17: resolve_resume_step / latest_complete_step / enter_run / RetentionPolicy share one
    default for ``parts`` (None: what the run writes, judged from disk). A trainer-only run
    resumes its newest step with -1 (it silently started fresh when the default demanded an
    orchestrator record); a run that writes both still needs both."""
    from prime_ckpt.layout import RUN_PARTS, latest_complete_step, resolve_resume_step, scan_inventory
    from prime_ckpt.retention import RetentionPolicy, plan
    from prime_ckpt.run import enter_run

    for s in (1, 2):
        write_trainer_mark(tmp_path / "checkpoints" / f"step_{s}" / "trainer")
    assert resolve_resume_step(tmp_path, -1) == 2 and latest_complete_step(tmp_path) == 2
    p = plan(scan_inventory(tmp_path), RetentionPolicy(keep=1))
    assert [e.step for e in p.entries if e.action == "delete"] == [1]
    entry = enter_run(tmp_path, -1, lease=False)
    assert entry.start_step == 2
    # both parts written somewhere: step 2 lacks the orchestrator record, so step 1 is the newest
    both = tmp_path / "both"
    for s in (1, 2):
        write_trainer_mark(both / "checkpoints" / f"step_{s}" / "trainer")
    write_orchestrator_mark(both / "checkpoints" / "step_1" / "orchestrator.pt", 1)
    assert resolve_resume_step(both, -1) == 1 == resolve_resume_step(both, -1, RUN_PARTS)
