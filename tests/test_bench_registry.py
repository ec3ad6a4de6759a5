"""The benchmark's case registry (``benchmarks/ckpt_bench/registry.py``): a case registered from a
file outside the package shows in ``--list-cases``; ``--cases`` with an unknown name is refused
with a one-line error naming it; the built-in families keep their cases. Nothing is measured."""

from __future__ import annotations

import sys

import pytest

from tests.conftest import ROOT, run_proc

SCRIPT = ROOT / "benchmarks" / "save_latency.py"

USER_CASE = '''
from ckpt_bench.common import timed
from ckpt_bench.registry import Op, register


@register("user_copy_case", family="user", storages=("memory",))
def user_copy_case(ctx, st):
    return Op(lambda rep: timed(lambda: ctx.flat_dst.copy_(ctx.flat_src)), note="a user's copy")
'''


def _run(*args: str) -> tuple[int, str]:
    proc = run_proc([sys.executable, str(SCRIPT), *args], timeout=120, check=False)
    return proc.returncode, proc.stdout or ""


def test_case_module_outside_the_package_shows_in_list_cases(tmp_path):
    module = tmp_path / "my_cases.py"
    module.write_text(USER_CASE)
    rc, out = _run("--case-module", str(module), "--list-cases")
    assert rc == 0, out
    listed = {line.split()[0]: line.split()[1:] for line in out.splitlines() if line.strip()}
    assert listed["user_copy_case"][:2] == ["user", "save"]
    assert {"memcpy", "ckpt_async_thread", "weights_async"} <= listed.keys()
    rc, out = _run("--list-cases")
    assert rc == 0 and "user_copy_case" not in out, out


def test_unknown_case_name_is_refused_in_one_line(tmp_path):
    rc, out = _run("--cases", "memcpy,no_such_case", "--results-dir", str(tmp_path))
    assert rc != 0
    assert "no_such_case" in out and "memcpy" not in out and out.count("\n") == 1, out
    assert not list(tmp_path.iterdir())  # refused before anything ran


def test_case_module_that_fails_to_import_is_refused_in_one_line(tmp_path):
    bad = tmp_path / "bad_cases.py"
    bad.write_text("raise ImportError('nope')\n")
    rc, out = _run("--case-module", str(bad), "--list-cases")
    assert rc != 0 and "bad_cases.py" in out and out.count("\n") == 1, out


@pytest.fixture
def registry(monkeypatch):
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    from ckpt_bench import registry

    registry.load_builtin()
    return registry


def test_registry_keeps_the_families(registry):
    families = {
        "baselines": {"memcpy", "raw_write", "torch_save"},
        "dcp": {"dcp_save", "dcp_save_t2", "dcp_async_default", "dcp_async_defaultstager", "dcp_async_pinned"},
        "ours": {"ckpt_sync", "ckpt_async_thread", "ckpt_async_process"},
        "s3": {"dcp_async_reused"},
        "loads": {"raw_read", "torch_load", "ckpt_load", "dcp_load"},
        "weights": {"weights_gather", "weights_sync", "weights_async", "weights_raw_write", "weights_memcpy"},
        "checks": {"rss", "step_overhead"},
        "titan": {"titan_sync", "titan_async", "titan_async_pinned", "titan_load"},
    }
    for family, names in families.items():
        assert {n for n, s in registry.CASES.items() if s.family == family} == names, family
    assert registry.CASES["raw_write"].storages == ("local", "s3") and registry.CASES["raw_write"].kind == "baseline"
    assert registry.CASES["dcp_async_reused"].storages == ("s3",)
    assert registry.CASES["ckpt_load"].phase == "load" and registry.CASES["weights_memcpy"].storages == ("memory",)
    assert registry.CASES["titan_load"].phase == "load" and registry.CASES["titan_async"].storages == ("local",)
    # the save cases run in the order the runner had them: baselines, DCP, ours, then S3
    save = [s.name for s in registry.selected("save", None)]
    assert save.index("memcpy") < save.index("dcp_save") < save.index("ckpt_sync") < save.index("dcp_async_reused")
    assert [s.name for s in registry.selected("save", ["ckpt_sync", "memcpy"])] == ["memcpy", "ckpt_sync"]


def test_register_refuses_a_duplicate_name(registry):
    with pytest.raises(ValueError, match="memcpy"):
        registry.register("memcpy", family="x")(lambda ctx, st: None)
    with pytest.raises(ValueError, match="phase"):
        registry.register("some_new_case", family="x", phase="later")
