"""prime_ckpt.async_level.resolve_async_level over run directories on disk (the library rule
`plan`, `prune` and `list` share)."""

import json
import logging

import pytest

from prime_ckpt.async_level import AsyncLevelError, resolve_async_level
from prime_ckpt.errors import PrimeCkptError
from tests.test_cli_retention import make_run


def _record(root, step, level):
    (root / "checkpoints" / f"step_{step}" / "save_info.json").write_text(json.dumps({"step": step, "async_level": level}))


def test_given_level_wins_and_none_recorded_needs_no_warning(tmp_path):
    make_run(tmp_path, [5, 10], range(3, 11))
    warnings = []
    assert resolve_async_level(tmp_path, 3, warn=warnings.append) == 3
    assert resolve_async_level(str(tmp_path), 0, warn=warnings.append) == 0
    assert warnings == []


def test_recorded_level_is_the_default_newest_record_wins(tmp_path):
    make_run(tmp_path, [5, 10], range(3, 11))
    _record(tmp_path, 5, 1)
    _record(tmp_path, 10, 2)
    assert resolve_async_level(tmp_path, None) == 2


def test_no_level_and_weights_on_disk_is_an_error(tmp_path):
    make_run(tmp_path, [5, 10], range(3, 11))
    with pytest.raises(AsyncLevelError, match=r"^--async-level: not given, and .* records none") as e:
        resolve_async_level(tmp_path, None)
    assert isinstance(e.value, PrimeCkptError) and isinstance(e.value, ValueError)
    assert "[x-k, x]" in str(e.value)


def test_no_level_and_no_weights_is_zero(tmp_path):
    make_run(tmp_path, [5, 10], [])
    assert resolve_async_level(tmp_path, None) == 0
    assert resolve_async_level(tmp_path / "empty-run", None) == 0  # nothing on disk at all


def test_below_the_recorded_level_is_used_with_one_warning(tmp_path, caplog):
    make_run(tmp_path, [10], range(8, 11))
    _record(tmp_path, 10, 2)
    warnings = []
    assert resolve_async_level(tmp_path, 1, warn=warnings.append) == 1
    assert warnings == [
        "--async-level 1 is below the async level 2 this run recorded: resuming at a kept step x needs "
        "weights [x-2, x], and this plan may delete some of them"
    ]
    assert resolve_async_level(tmp_path, 2, warn=warnings.append) == 2 and len(warnings) == 1  # equal: no warning
    with caplog.at_level(logging.WARNING, logger="prime_ckpt.async_level"):
        assert resolve_async_level(tmp_path, 0) == 0  # default: logged
    assert [r.getMessage() for r in caplog.records] == [warnings[0].replace("level 1 is", "level 0 is")]
