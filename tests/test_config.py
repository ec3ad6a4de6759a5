"""Config models and command-line parsing (flags, TOML files, errors naming the flag)."""

import json

import pytest

from prime_ckpt.config import (
    CheckpointConfig,
    CliSettings,
    ConfigError,
    MonitorConfig,
    StorageConfig,
    cli_entry,
    parse_cli,
)


class Prog(CliSettings):
    max_steps: int = 10
    """Steps to train."""
    ckpt: CheckpointConfig | None = None
    """Checkpointing; None writes no checkpoints."""
    monitor: MonitorConfig = MonitorConfig()
    """Monitoring."""


def test_defaults_match_the_seed():
    c = CheckpointConfig()
    assert (c.interval, c.save_async, c.keep, c.keep_interval, c.resume_step) == (50, False, None, None, None)


def test_no_checkpointing_unless_asked():
    assert parse_cli(Prog, []).ckpt is None
    assert parse_cli(Prog, ["--max-steps", "3"]).ckpt is None


@pytest.mark.parametrize(
    "argv,expected",
    [
        (["--ckpt"], CheckpointConfig()),
        (["--ckpt", "--max-steps", "4"], CheckpointConfig()),
        (["--ckpt.interval", "10"], CheckpointConfig(interval=10)),
        (["--ckpt.save-async"], CheckpointConfig(save_async=True)),
        (["--ckpt.resume-step", "-1"], CheckpointConfig(resume_step=-1)),
        (["--ckpt.keep", "2", "--ckpt.keep-interval", "5"], CheckpointConfig(keep=2, keep_interval=5)),
    ],
)
def test_ckpt_flags(argv, expected):
    assert parse_cli(Prog, argv).ckpt == expected


def test_toml_then_flags_override(tmp_path):
    f = tmp_path / "train.toml"
    f.write_text('max-steps = 3\n[ckpt]\ninterval = 5\nsave-async = true\n[monitor.wandb]\nproject = "p"\n')
    cfg = parse_cli(Prog, ["@", str(f), "--ckpt.interval", "7"])
    assert cfg.max_steps == 3 and cfg.ckpt == CheckpointConfig(interval=7, save_async=True)
    assert cfg.monitor.wandb.project == "p"
    assert parse_cli(Prog, [f"@{f}", "--no-ckpt.save-async"]).ckpt == CheckpointConfig(interval=5)


def test_ckpt_table_in_toml_enables_checkpointing(tmp_path):
    f = tmp_path / "t.toml"
    f.write_text("[ckpt]\n")
    assert parse_cli(Prog, ["@", str(f)]).ckpt == CheckpointConfig()


def test_environment_is_ignored(monkeypatch):
    monkeypatch.setenv("MAX_STEPS", "99")
    assert parse_cli(Prog, []).max_steps == 10


@pytest.mark.parametrize(
    "argv,message",
    [
        (["--ckpt.interval", "0"], "--ckpt.interval: Input should be greater than or equal to 1 (got '0')"),
        (["--ckpt.keep", "0"], "--ckpt.keep: Input should be greater than or equal to 1"),
        (["--ckpt.keep-interval", "x"], "--ckpt.keep-interval: Input should be a valid integer"),
        (["--ckpt.resume-step", "-2"], "--ckpt.resume-step: Input should be greater than or equal to -1"),
        (["--ckpt.bogus", "1"], "unrecognized arguments: --ckpt.bogus 1"),
        (["@", "/nonexistent/x.toml"], "/nonexistent/x.toml: config file not found"),
        (["@"], "'@' must be followed by a TOML config file path"),
    ],
)
def test_errors_name_the_flag(argv, message):
    with pytest.raises(ConfigError) as e:
        parse_cli(Prog, argv)
    assert message in str(e.value)
    assert "\n" not in str(e.value)


def test_bad_toml_names_the_file(tmp_path):
    f = tmp_path / "bad.toml"
    f.write_text("[ckpt\n")
    with pytest.raises(ConfigError, match="bad.toml: invalid TOML"):
        parse_cli(Prog, ["@", str(f)])
    g = tmp_path / "wrong.toml"
    g.write_text("[ckpt]\ninterval = -3\n")
    with pytest.raises(ConfigError, match="--ckpt.interval"):
        parse_cli(Prog, ["@", str(g)])


def test_cli_entry_exits_2_with_one_line(capsys):
    with pytest.raises(SystemExit) as e:
        cli_entry(Prog, ["--ckpt.interval", "0"], prog="trainer")
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert err.strip() == "trainer: error: --ckpt.interval: Input should be greater than or equal to 1 (got '0')"


def test_help_documents_flags(capsys):
    with pytest.raises(SystemExit) as e:
        parse_cli(Prog, ["--help"], prog="trainer")
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert "--ckpt.save-async" in out and "Save a checkpoint every N steps" in out


class RemoteProg(CliSettings):
    output_dir: str = "outputs/run"
    """Run directory (a path or an fsspec URL)."""
    storage: StorageConfig = StorageConfig()
    """Remote storage."""


def test_storage_options_parse_as_json_and_never_show(tmp_path, capsys):
    secret = {"client_kwargs": {"endpoint_url": "http://127.0.0.1:9000"}, "key": "AKIAXX", "secret": "hunter2"}
    cfg = parse_cli(RemoteProg, ["--output-dir", "s3://bkt/run", "--storage.options", json.dumps(secret)])
    assert cfg.output_dir == "s3://bkt/run" and cfg.storage.options == secret
    shown = repr(cfg) + str(cfg) + repr(cfg.storage) + str(cfg.model_dump()) + cfg.model_dump_json()
    assert "hunter2" not in shown and "AKIAXX" not in shown and "9000" not in shown
    assert cfg.model_dump()["storage"]["options"] == "**********"
    assert parse_cli(RemoteProg, []).storage.options == {} and RemoteProg().model_dump()["storage"]["options"] == {}
    toml = tmp_path / "c.toml"
    toml.write_text('[storage.options]\nsecret = "hunter2"\n[storage.options.client_kwargs]\nendpoint_url = "http://x"\n')
    assert parse_cli(RemoteProg, ["@", str(toml)]).storage.options == {"secret": "hunter2", "client_kwargs": {"endpoint_url": "http://x"}}


@pytest.mark.parametrize("bad", ['{"secret": "hunter2"', '"hunter2"', "[1, 2]"])
def test_bad_storage_options_name_the_flag_not_the_value(bad, tmp_path):
    with pytest.raises(ConfigError, match=r"storage\.options") as err:
        parse_cli(RemoteProg, ["--storage.options", bad])
    assert "hunter2" not in str(err.value)
    toml = tmp_path / "c.toml"
    toml.write_text('[storage]\noptions = "hunter2"\n')
    with pytest.raises(ConfigError, match=r"--storage\.options") as err:
        parse_cli(RemoteProg, ["@", str(toml)])
    assert "hunter2" not in str(err.value)
