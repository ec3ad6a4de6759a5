"""``prime-ckpt`` on ``s3://``: inspect, list, manifest/verify, plan/prune on a real 2-rank run that
``tests/dist_scripts/s3_run.py`` saved to a moto S3 server (checkpoint every step with the
orchestrator's record, inference weights, manifests), through typer's runner and through the
installed console script with env-only credentials; bad remote input; ``--storage.options``
secrets never shown.

The run is written once per module (into a bucket of its own) and copied server-side into each
test's fresh bucket, so every test may modify its copy. Nothing here measures time.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import traceback
from pathlib import Path

import pytest
from conftest import S3_ENV, _env, _free_port, _new_bucket, torchrun
from typer.testing import CliRunner

from prime_ckpt.cli import app

pytestmark = pytest.mark.timeout(600)

runner = CliRunner()
STEPS = [1, 2, 3, 4]


@pytest.fixture(scope="module")
def _source(moto_server, tmp_path_factory) -> str:
    """``<bucket>/run`` of a 2-rank run saved by s3_run.py (4 steps, a checkpoint every step, no
    retention), endpoint and credentials from the environment only."""
    mp = pytest.MonkeyPatch()
    try:
        for k, v in S3_ENV.items():
            mp.setenv(k, v)
        bucket = _new_bucket(moto_server)
    finally:
        mp.undo()
    torchrun("s3_run.py", "--output-dir", bucket.url, "--ckpt.interval", "1", timeout=300, env=bucket.env)
    return f"{bucket.bucket}/run"


@pytest.fixture
def run(_source, s3_bucket):
    """This test's copy of the run: ``s3_bucket.url`` (``s3://<bucket>/run``) holds it."""
    s3_bucket.fs.copy(_source, f"{s3_bucket.bucket}/run", recursive=True)
    return s3_bucket


def cli(bucket, *args: str, code: int | None = 0, options: dict | None = None):
    """``prime-ckpt --storage.options <endpoint> ARGS`` through typer's runner (the test process
    has the credentials in its environment, the endpoint only in the options)."""
    r = runner.invoke(app, ["--storage.options", json.dumps(options or bucket.storage_options), *args])
    if code is not None:
        assert r.exit_code == code, (args, r.output, r.exception)
    return r


def objects(bucket) -> dict[str, tuple[int, str]]:
    """Every object in the bucket: key -> (size, ETag)."""
    found = bucket.fs.find(bucket.bucket, detail=True)
    return {k.split("/", 1)[1]: (int(v["size"]), v.get("ETag")) for k, v in found.items()}


def step_prefixes(bucket) -> set[str]:
    """``run/checkpoints/step_N`` / ``run/weights/step_N`` prefixes that hold objects."""
    return {"/".join(k.split("/")[:3]) for k in objects(bucket) if k.split("/")[1] in ("checkpoints", "weights")}


def one_error_line(r, *words: str) -> str:
    assert r.exit_code == 2, r.output
    assert "Traceback" not in r.output and r.stdout == "", r.output
    lines = r.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), r.stderr
    for w in words:
        assert w in lines[0], (w, lines[0])
    return lines[0]


def test_inspect_step_run_and_weights(run, tmp_path):
    url = run.url
    before = objects(run)

    out = cli(run, "inspect", f"{url}/checkpoints/step_4").stdout
    assert f"{url}/checkpoints/step_4  step 4  complete" in out
    assert "parts: trainer: complete  orchestrator: complete" in out
    assert "orchestrator: step=4, total_tokens=40" in out
    assert "world size at save: 2  files: __0_0.distcp, __1_0.distcp" in out
    assert "app.model.0.weight" in out and "(sharded)" in out and "missing" not in out

    d = json.loads(cli(run, "inspect", f"{url}/checkpoints/step_4", "--json").stdout)
    assert (d["kind"], d["path"], d["step"], d["complete"]) == ("checkpoint_step", f"{url}/checkpoints/step_4", 4, True)
    assert d["parts"] == {"trainer": True, "orchestrator": True} and d["problems"] == []
    assert d["orchestrator"]["step"] == 4 and d["orchestrator"]["total_tokens"] == 40
    assert d["save_info"]["world_size"] == 2 and d["save_info"]["step"] == 4
    tr = d["trainer"]
    assert tr["world_size"] == 2 and tr["path"] == f"{url}/checkpoints/step_4/trainer"
    sizes = objects(run)
    assert [(f["name"], f["rank"], f["exists"], f["size"]) for f in tr["storage_files"]] == [
        (f"__{r}_0.distcp", r, True, sizes[f"run/checkpoints/step_4/trainer/__{r}_0.distcp"][0]) for r in (0, 1)
    ]
    rows = {t["name"]: t for t in tr["tensors"]}
    assert rows["app.model.0.weight"] == {"name": "app.model.0.weight", "shape": [33, 8], "dtype": "float32", "bytes": 1056, "chunks": 2, "sharded": True}

    # The same step read locally gives the same answer (paths aside).
    local = tmp_path / "run"
    run.fs.get(f"{run.bucket}/run/checkpoints/step_4", str(local / "checkpoints" / "step_4"), recursive=True)
    r = runner.invoke(app, ["inspect", str(local / "checkpoints" / "step_4"), "--json"])
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout.replace(str(local), url)) == d

    d = json.loads(cli(run, "inspect", url, "--json").stdout)
    assert d["kind"] == "run" and d["latest_complete_step"] == 4 and d["ignored"] == []
    assert [(s["step"], s["complete"], s["path"]) for s in d["checkpoints"]] == [(s, True, f"{url}/checkpoints/step_{s}") for s in STEPS]
    assert [(w["step"], w["complete"]) for w in d["weights"]] == [(s, True) for s in STEPS]

    d = json.loads(cli(run, "inspect", f"{url}/weights/step_3", "--json").stdout)
    assert d["kind"] == "weights_step" and d["complete"] and d["config"] == {"note": "s3", "step": 3}
    assert [f["name"] for f in d["files"]] == ["COMPLETE", "config.json", "manifest.json", "model.safetensors"]
    assert {t["name"]: t["shape"] for t in d["tensors"]} == {"0.bias": [33], "0.weight": [33, 8], "3.bias": [4], "3.weight": [4, 33]}
    assert d["problems"] == []

    d = json.loads(cli(run, "inspect", f"{url}/checkpoints/step_2/trainer", "--filter", "app.model.*", "--json").stdout)
    assert d["kind"] == "trainer" and d["step"] == 2 and len(d["trainer"]["tensors"]) == 4
    assert objects(run) == before  # read-only


def test_list_json(run):
    url = run.url
    before = objects(run)
    d = json.loads(cli(run, "list", url, "--json").stdout)
    assert d["schema"] == "prime-ckpt.list/1" and d["path"] == url
    assert d["parts"] == ["trainer", "orchestrator"] and d["latest_complete_step"] == 4 and d["latest_resumable_step"] == 4
    assert [r["step"] for r in d["checkpoints"]] == STEPS and [w["step"] for w in d["weights"]] == STEPS
    sizes = objects(run)
    for r in d["checkpoints"]:
        s = r["step"]
        assert r["complete"] and r["parts"] == {"trainer": True, "orchestrator": True} and r["manifest"], r
        assert r["progress"]["step"] == s and r["progress"]["total_tokens"] == 10 * s
        assert r["save_info"]["world_size"] == 2
        # the run published weights 1..4: checkpoint 1 (async level 1) lacks weights 0 of its window
        assert r["problems"] == ([] if s > 1 else [f"{url}/checkpoints/step_1: not resumable: weights step(s) 0 of its window [0, 1] (async level 1) are not complete"])
        assert r["resumable"] == (s > 1)
        assert r["bytes"] == sum(size for k, (size, _) in sizes.items() if k.startswith(f"run/checkpoints/step_{s}/"))
    assert all(w["complete"] and w["manifest"] for w in d["weights"])
    assert d["ignored"] == []
    # a checkpoints/ dir means its run
    assert json.loads(cli(run, "list", f"{url}/checkpoints", "--json").stdout) == d

    d = json.loads(cli(run, "list", url, "--keep", "1", "--async-level", "1", "--json").stdout)
    assert {(r["step"], r["retention"]["action"]) for r in d["checkpoints"]} == {(1, "delete"), (2, "delete"), (3, "delete"), (4, "keep")}
    assert {(w["step"], w["retention"]["action"]) for w in d["weights"]} == {(1, "delete"), (2, "delete"), (3, "keep"), (4, "keep")}

    out = cli(run, "list", url).stdout
    assert "latest complete step: 4" in out and "4/0/40" in out
    assert objects(run) == before


def test_manifest_and_verify(run):
    url = run.url
    r = cli(run, "verify", url)
    assert "8 steps, 8 ok, 0 not ok" in r.stdout
    d = json.loads(cli(run, "verify", url, "--json").stdout)
    assert d["ok"] and [(s["kind"], s["step"], s["status"]) for s in d["steps"]] == [
        *(("checkpoint", s, "ok") for s in STEPS), *(("weights", s, "ok") for s in STEPS)
    ]
    assert all(s["files_checked"] > 0 for s in d["steps"])

    # A step without its manifest fails verify until `manifest` writes one (only that one).
    run.fs.rm_file(f"{run.bucket}/run/checkpoints/step_2/manifest.json")
    r = cli(run, "verify", url, code=1)
    assert f"NO MANIFEST  checkpoint step 2  {url}/checkpoints/step_2" in r.stdout
    before = objects(run)
    r = cli(run, "manifest", url)
    assert f"wrote    {url}/checkpoints/step_2/manifest.json" in r.stdout
    assert r.stdout.count("exists   ") == 7
    after = objects(run)
    assert set(after) - set(before) == {"run/checkpoints/step_2/manifest.json"}
    assert {k: v for k, v in after.items() if k in before} == before
    cli(run, "verify", url)

    # One byte of one shard flipped (the object rewritten in place): verify names the file.
    shard = f"{run.bucket}/run/checkpoints/step_3/trainer/__1_0.distcp"
    data = bytearray(run.fs.cat_file(shard))
    data[len(data) // 2] ^= 0x01
    run.fs.pipe_file(shard, bytes(data))
    before = objects(run)
    r = cli(run, "verify", url, code=1)
    assert f"FAILED  checkpoint step 3  {url}/checkpoints/step_3" in r.stdout
    assert f"{url}/checkpoints/step_3/trainer/__1_0.distcp: checksum mismatch" in r.stdout
    assert "8 steps, 7 ok, 1 not ok" in r.stdout
    d = json.loads(cli(run, "verify", f"{url}/checkpoints/step_3", "--json", code=1).stdout)
    assert [s["status"] for s in d["steps"]] == ["failed"]
    cli(run, "verify", f"{url}/checkpoints/step_4")
    assert objects(run) == before  # verify wrote nothing


def test_plan_then_prune_keep_1(run):
    """s3_run.py's Checkpointer records async level 1, so keeping step 4 pins weights [3, 4]."""
    url = run.url
    before = objects(run)
    d = json.loads(cli(run, "plan", url, "--keep", "1", "--json").stdout)
    actions = {(e["kind"], e["step"]): e["action"] for e in d["entries"]}
    assert actions == {
        **{("checkpoint", s): "delete" for s in (1, 2, 3)}, ("checkpoint", 4): "keep",
        **{("weights", s): "delete" for s in (1, 2)}, ("weights", 3): "keep", ("weights", 4): "keep",
    }
    paths = {e["path"] for e in d["entries"]}
    assert f"{url}/checkpoints/step_1" in paths and f"{url}/weights/step_4" in paths
    kept = ("run/checkpoints/step_4/", "run/weights/step_3/", "run/weights/step_4/", "run/run.json")
    freed = sum(size for k, (size, _) in before.items() if not k.startswith(kept))
    assert d["bytes_freed"] == freed
    assert objects(run) == before  # a dry run

    r = cli(run, "prune", url, "--keep", "1", "--yes")
    assert "deleted 5, already gone 0, failed 0" in r.stdout
    assert step_prefixes(run) == {"run/checkpoints/step_4", "run/weights/step_3", "run/weights/step_4"}
    assert objects(run) == {k: v for k, v in before.items() if k.startswith(kept)}
    assert "nothing to delete" in cli(run, "prune", url, "--keep", "1", "--yes").stdout
    cli(run, "verify", url)


def _console_script() -> str:
    exe = shutil.which("prime-ckpt", path=str(Path(sys.executable).parent))
    if exe is None:
        pytest.skip("prime-ckpt console script not installed next to this interpreter")
    return exe


def _script(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run([_console_script(), *args], capture_output=True, text=True, env=_env(env), timeout=240)


def test_console_script_with_env_only_credentials(run):
    """The installed entry point, no --storage.options: credentials and endpoint from AWS_*; the
    read-only commands import no torch on s3:// either."""
    url = run.url
    env = {**run.env, "PYTHONPROFILEIMPORTTIME": "1", "COLUMNS": "160"}
    p = _script("inspect", f"{url}/checkpoints/step_4", env=env)
    assert p.returncode == 0, p.stderr[-3000:]
    assert "app.model.0.weight" in p.stdout and f"{url}/checkpoints/step_4  step 4  complete" in p.stdout
    imported = [ln.rsplit("|", 1)[-1].strip() for ln in p.stderr.splitlines() if ln.startswith("import time:")]
    assert "s3fs" in {m.split(".")[0] for m in imported}  # really the remote path
    assert not [m for m in imported if m.split(".")[0] == "torch"]

    p = _script("list", url, "--json", env=run.env)
    assert p.returncode == 0, p.stderr
    d = json.loads(p.stdout)
    assert [(r["step"], r["complete"]) for r in d["checkpoints"]] == [(s, True) for s in STEPS]
    p = _script("verify", url, env=run.env)
    assert p.returncode == 0 and "8 steps, 8 ok" in p.stdout, p.stdout + p.stderr


@pytest.mark.parametrize("cmd", ["inspect", "list", "verify", "manifest", "plan", "prune"])
def test_missing_bucket_and_prefix(run, cmd):
    extra = {"plan": ["--keep", "1"], "prune": ["--keep", "1", "--yes"]}.get(cmd, [])
    before = objects(run)
    nobucket = f"s3://{run.bucket}-missing/run"
    one_error_line(cli(run, cmd, nobucket, *extra, code=None), f"error: {nobucket}: no such bucket")
    for missing in (f"s3://{run.bucket}/nope", f"{run.url}/checkpoints/step_9"):
        one_error_line(cli(run, cmd, missing, *extra, code=None), f"error: {missing}: no such file or directory")
    assert objects(run) == before


def test_not_a_checkpoint_and_local_only_commands(run, tmp_path):
    url = run.url
    one_error_line(cli(run, "inspect", f"{url}/checkpoints/step_4/trainer/__0_0.distcp", code=None), "__0_0.distcp: not a directory")
    one_error_line(cli(run, "list", f"{url}/checkpoints/step_4", code=None), "not a run output dir")
    one_error_line(cli(run, "convert", f"{url}/checkpoints/step_4", str(tmp_path / "x.pt"), "--to", "torch-save", code=None),
                   f"error: {url}/checkpoints/step_4: remote paths are not supported by convert yet")
    one_error_line(cli(run, "convert", str(tmp_path), f"{url}/out", "--to", "safetensors", code=None),
                   f"error: {url}/out: remote paths are not supported by convert yet")
    one_error_line(cli(run, "diff", f"{url}/checkpoints/step_3", f"{url}/checkpoints/step_4", code=None),
                   "remote paths are not supported by diff yet")
    assert not (tmp_path / "x.pt").exists()


def test_no_credentials_and_unreachable_endpoint(run, tmp_path):
    """Through the console script (a fresh process: no file system instance cached with
    credentials): one line naming the URL, exit 2, no traceback."""
    url = run.url
    no_creds = {k: v for k, v in run.env.items() if k not in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY")}
    env = {**_env(no_creds), "AWS_EC2_METADATA_DISABLED": "true"}
    for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE"):
        env.pop(k, None)
    for args in (["inspect", f"{url}/checkpoints/step_4"], ["list", url], ["verify", url], ["plan", url, "--keep", "1"]):
        p = subprocess.run([_console_script(), *args], capture_output=True, text=True, env=env, timeout=240)
        assert p.returncode == 2 and p.stdout == "" and "Traceback" not in p.stderr, (args, p.stdout, p.stderr[-3000:])
        assert p.stderr.splitlines() == [f"error: {args[1]}: NoCredentialsError: Unable to locate credentials"], (args, p.stderr)

    dead = f"http://127.0.0.1:{_free_port()}"
    env = {**run.env, "AWS_ENDPOINT_URL": dead, "AWS_MAX_ATTEMPTS": "1"}
    for args in (["inspect", f"{url}/checkpoints/step_4"], ["prune", url, "--keep", "1", "--yes"]):
        p = _script(*args, env=env)
        assert p.returncode == 2 and p.stdout == "" and "Traceback" not in p.stderr, (args, p.stdout, p.stderr[-3000:])
        [line] = p.stderr.splitlines()
        assert line.startswith(f"error: {url}") and "EndpointConnectionError: Could not connect to the endpoint URL" in line, line
    assert step_prefixes(run) == {f"run/{kind}/step_{s}" for kind in ("checkpoints", "weights") for s in STEPS}


def test_storage_options_secrets_never_shown(run):
    """Secret values in --storage.options appear in no output: not in results, not in errors
    (bad JSON, wrong type, options the file system refuses, a missing bucket, an unreachable
    endpoint), not with --debug."""
    key, secret = "AKIAPRIMECKPTNEVERSHOWN", "s3cr3t-never-shown-anywhere"  # moto accepts any pair
    good = {**run.storage_options, "key": key, "secret": secret}
    url = run.url

    def check(r) -> None:
        text = r.output + (str(r.exception) if r.exception else "")
        if r.exc_info and not isinstance(r.exception, SystemExit):
            text += "".join(traceback.format_exception(*r.exc_info))
        assert key not in text and secret not in text, text

    for args in (["inspect", f"{url}/checkpoints/step_4"], ["list", url, "--json"], ["verify", url], ["plan", url, "--keep", "1", "--json"],
                 ["inspect", url, "--json"], ["manifest", url]):
        check(cli(run, *args, options=good))
    nobucket = f"s3://{run.bucket}-missing/run"
    check(r := cli(run, "inspect", nobucket, code=2, options=good))
    one_error_line(r, "no such bucket")
    r = runner.invoke(app, ["--debug", "--storage.options", json.dumps(good), "list", nobucket])
    assert r.exit_code == 2 and "no such bucket" in r.stderr and "Traceback" in r.stderr, r.output
    check(r)

    dead = {"client_kwargs": {"endpoint_url": f"http://127.0.0.1:{_free_port()}"}, "config_kwargs": {"retries": {"max_attempts": 1}},
            "key": key, "secret": secret}
    check(r := cli(run, "verify", url, code=2, options=dead))
    one_error_line(r, f"error: {url}: EndpointConnectionError")
    check(r := cli(run, "inspect", url, code=2, options={**good, "no_such_option": True}))
    one_error_line(r, f"error: {url}: --storage.options not accepted by the file system (TypeError")

    for bad in (f'{{"key": "{key}", "secret": "{secret}",}}', f'["{secret}"]', f'{{"secret": "{secret}"'):
        for flag in ("--storage.options", "--storage-options"):
            r = runner.invoke(app, [flag, bad, "inspect", url])
            check(r)
            one_error_line(r, "error: --storage.options: ")
