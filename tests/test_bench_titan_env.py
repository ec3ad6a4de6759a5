"""Where the benchmark's torchtitan peer comes from (``benchmarks/ckpt_bench/titan_env.py``) and
what a launch does without it (``launch.titan_notes``): the version is read from the
environment's ``site-packages``, an environment without torchtitan turns the cases off with a
one-line note for the results and ``--no-titan`` for the workers. Nothing here installs or
imports torchtitan; the real cases run in ``make bench``."""

from __future__ import annotations

import sys

import pytest

from tests.conftest import ROOT


@pytest.fixture
def bench(monkeypatch):
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    from ckpt_bench import launch, registry, settings, titan_env

    registry.load_builtin()
    return titan_env, launch, settings


def _fake_env(tmp_path, entries: list[str]):
    site = tmp_path / "env" / "lib" / f"python{sys.version_info[0]}.{sys.version_info[1]}" / "site-packages"
    site.mkdir(parents=True)
    for name in entries:
        (site / name).mkdir()
    return tmp_path / "env", site


def test_dist_version_reads_torchtitans_dist_info(bench):
    titan_env, _, _ = bench
    assert titan_env.dist_version(["tyro", "torchtitan", "torchtitan-0.3.0.dist-info", "torch-2.13.0+cpu.dist-info"]) == "0.3.0"
    assert titan_env.dist_version(["torchtitan-0.4.0rc1.dist-info"]) == "0.4.0rc1"
    assert titan_env.dist_version(["torch-2.13.0.dist-info", "torchtitan_extra-1.0.dist-info"]) is None
    # two installs side by side: which one imports is not knowable from names
    assert titan_env.dist_version(["torchtitan-0.2.0.dist-info", "torchtitan-0.3.0.dist-info"]) is None


def test_site_packages_is_this_pythons(bench):
    titan_env, _, _ = bench
    assert titan_env.site_packages(ROOT / "x", (3, 12)) == ROOT / "x" / "lib" / "python3.12" / "site-packages"


def test_availability_and_activate(bench, tmp_path, monkeypatch):
    titan_env, _, _ = bench
    ok, why = titan_env.availability(tmp_path / "nowhere")
    assert not ok and "make titan-env" in why
    env, site = _fake_env(tmp_path, ["tyro"])
    ok, why = titan_env.availability(env)
    assert not ok and "not installed" in why
    with pytest.raises(RuntimeError, match="not installed"):
        titan_env.activate(env)
    (site / "torchtitan").mkdir()
    (site / "torchtitan-0.3.0.dist-info").mkdir()
    assert titan_env.availability(env) == (True, "0.3.0")
    monkeypatch.setattr(sys, "path", list(sys.path))
    assert titan_env.activate(env) == "0.3.0"
    assert sys.path[-1] == str(site)  # behind the project's own packages


def test_launch_without_the_environment_skips_the_cases_with_a_note(bench, tmp_path):
    _, launch, settings = bench
    argv = ["--titan-env", str(tmp_path / "none"), "--quick"]
    s = settings.settings_from_args(argv)
    notes = launch.titan_notes(s, argv)
    assert len(notes) == 1 and notes[0].startswith("torchtitan cases skipped") and "make titan-env" in notes[0]
    assert argv[-1] == "--no-titan" and not s.titan
    assert not settings.settings_from_args(argv).titan  # what the workers parse
    argv = ["--no-titan"]
    assert launch.titan_notes(settings.settings_from_args(argv), argv) == ["torchtitan cases skipped: --no-titan"]
    # no torchtitan case selected: nothing to say, nothing passed on
    argv = ["--cases", "memcpy,ckpt_sync", "--titan-env", str(tmp_path / "none")]
    assert launch.titan_notes(settings.settings_from_args(argv), argv) == [] and "--no-titan" not in argv
    argv = ["--weights-only", "--titan-env", str(tmp_path / "none")]
    assert launch.titan_notes(settings.settings_from_args(argv), argv) == [] and "--no-titan" not in argv


def test_launch_with_the_environment_names_the_version(bench, tmp_path):
    _, launch, settings = bench
    env, _ = _fake_env(tmp_path, ["torchtitan", "torchtitan-0.3.0.dist-info"])
    argv = ["--titan-env", str(env), "--cases", "titan_sync"]
    s = settings.settings_from_args(argv)
    notes = launch.titan_notes(s, argv)
    assert s.titan and "--no-titan" not in argv and notes[0].startswith("torchtitan 0.3.0")
