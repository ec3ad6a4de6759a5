"""Fault injection: SIGKILL the real reverse-text job at random instants, resume it, check it.

    python -m tests.faults.harness --trials 200 [--seed 0] [--workdir DIR] [--keep-dirs]

What runs is the real example (``python -m examples.reverse_text.rl``: a 2-rank FSDP2 trainer
under ``torchrun`` plus the orchestrator) with ``--ckpt.interval 1`` or ``2``, sync or async
saves, sometimes ``--ckpt.keep``. One uninterrupted reference run (no checkpoints) gives the
expected model hash after every step: ``weights/step_N`` (all its shards) is bitwise the
trainer's model after step N.

Trials are grouped in *chains* that share one output directory. Every launch of a chain uses
``--ckpt.resume-step -1``, so each launch both checks the previous trial and is the victim of
the next one::

    launch -> wait until it has loaded (or started fresh) -> check the previous trial
           -> wait for this trial's trigger -> SIGKILL (whole job, or one trainer rank)
           -> wait until every process of the job is gone -> snapshot + checks -> next launch

A chain ends with a launch that runs to ``--max-steps`` (no kill) and must end with the
reference's final hash. Checks of one trial (any failure makes the trial *lost*):

1. the job dies: after a single-rank kill the launcher exits non-zero and the other rank and
   the orchestrator exit too (``PR_SET_PDEATHSIG`` / torchrun); no process of the job survives;
2. right after the kill (everything dead), ``scan_checkpoints`` is snapshotted. The next launch
   must resume from exactly the newest step that is complete for every part (trainer
   ``.metadata`` and ``orchestrator.pt``) in that snapshot, or start fresh if there is none -
   the launcher, the trainer and the orchestrator all say so;
3. the trainer's ``resumed params sha256`` (printed right after the load) equals the reference's
   hash at that step;
4. ``prime-ckpt inspect OUTPUT_DIR --json`` agrees with the snapshot (same steps, same
   completeness, same latest complete step);
5. every step the snapshot calls complete is loadable and bitwise the reference (its DCP model
   state is hashed offline; ``orchestrator.pt`` holds that step), and every complete
   ``weights/step_N`` is bitwise the reference's step N - so the steps trained *after* a resume
   prove that optimizer, scheduler, RNG and data position were restored too.

Triggers (seeded, reproducible plan; the instant itself depends on timing):
``save_in_progress`` (a new ``checkpoints/step_N/trainer/`` without ``.metadata``),
``first_distcp`` (its first ``.distcp`` file appeared), ``after_commit`` (its ``.metadata`` just
appeared), ``weights_in_progress`` (``weights/step_N`` without ``COMPLETE``: a publish running
in the background), ``weights_shard`` (a rank's ``model-0000i-of-0000n.safetensors`` is in place
but ``COMPLETE`` is not), ``orch_record``
(an ``orchestrator.pt`` just appeared), ``delay`` (a random delay after the load), each for a
step ``N >= resume step + offset`` and followed by a small random jitter.

Prints one line per trial and the summary ``faults: N trials, N ok, 0 lost``; exit status 0 iff
nothing was lost.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from prime_ckpt.layout import (
    RUN_PARTS,
    CheckpointStep,
    parse_step,
    scan_checkpoints,
    scan_weights,
)

#: --max-steps of every run (reference and chains)
STEPS = 10
BATCH = 16
#: small and quick: few samples, no warm start (the policy does not need to learn here)
FAST = [
    "--trainer", "@", "examples/configs/reverse_text/train.toml",
    "--orchestrator", "@", "examples/configs/reverse_text/orch.toml",
    "--orchestrator.inference.backend", "local",  # in-process sampling (the vLLM server: tests/test_inference_server.py)
    "--orchestrator.batch-size", str(BATCH), "--trainer.warm-start-steps", "0",
]
#: hard limits (seconds): a whole launch; the job's exit after a kill; waiting for a trigger
LAUNCH_TIMEOUT = 300.0
EXIT_TIMEOUT = 90.0
POLL_S = 0.004

TRIGGERS = ("save_in_progress", "first_distcp", "after_commit", "weights_in_progress", "weights_shard", "orch_record", "delay")
KILLS = ("job", "job", "rank0", "rank1")  # job kills twice as likely as each single-rank kill

LAUNCH_RESUME_RE = re.compile(r"^rl: resuming from checkpoint step (\d+) in ", re.MULTILINE)
LAUNCH_FRESH_RE = re.compile(r"^rl: starting fresh in ", re.MULTILINE)
TRAINER_RESUMED_RE = re.compile(r"^trainer: resumed from checkpoint step (\d+) ", re.MULTILINE)
TRAINER_FRESH_RE = re.compile(r"^trainer: fresh start", re.MULTILINE)
ORCH_RESUMED_RE = re.compile(r"^orchestrator: resumed from checkpoint step (\d+) ", re.MULTILINE)
ORCH_FRESH_RE = re.compile(r"^orchestrator: fresh start", re.MULTILINE)
HASH_RE = re.compile(r"^resumed params sha256 ([0-9a-f]{64})$", re.MULTILINE)
FINAL_RE = re.compile(r"^final step (\d+) \| params sha256 ([0-9a-f]{64})$", re.MULTILINE)


def env() -> dict[str, str]:
    e = dict(os.environ)
    e["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), e.get("PYTHONPATH", "")) if p)
    e["OMP_NUM_THREADS"] = "1"
    e["PYTHONUNBUFFERED"] = "1"
    e["WANDB_MODE"] = "offline"
    return e


# -- processes ----------------------------------------------------------------------------------
def _proc_table() -> dict[int, tuple[int, list[bytes]]]:
    """``{pid: (ppid, argv)}`` of every process we can read (Linux ``/proc``)."""
    table = {}
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            with open(f"/proc/{entry.name}/stat", "rb") as f:
                stat = f.read()
            with open(f"/proc/{entry.name}/cmdline", "rb") as f:
                argv = f.read().split(b"\0")
        except OSError:
            continue
        fields_ = stat[stat.rfind(b")") + 2:].split()
        if fields_ and fields_[0] == b"Z":  # a zombie holds nothing open and writes nothing
            continue
        table[int(entry.name)] = (int(fields_[1]), argv)
    return table


def procs_using(path: Path) -> list[int]:
    """pids of live processes with ``path`` as one of their arguments (the job's --output-dir)."""
    needle = str(path).encode()
    return sorted(pid for pid, (_, argv) in _proc_table().items() if needle in argv and pid != os.getpid())


def trainer_ranks(launcher_pid: int) -> dict[int, int]:
    """``{rank: pid}`` of the torchrun workers under the launcher (rank from their environment)."""
    table = _proc_table()
    runs = [p for p, (pp, argv) in table.items() if pp == launcher_pid and b"torch.distributed.run" in argv]
    ranks = {}
    for p, (pp, argv) in table.items():
        if pp in runs and b"examples.reverse_text.trainer" in argv:
            try:
                with open(f"/proc/{p}/environ", "rb") as f:
                    environ = f.read().split(b"\0")
            except OSError:
                continue
            for kv in environ:
                if kv.startswith(b"RANK="):
                    ranks[int(kv[5:])] = p
    return ranks


_LIVE: set[Launch] = set()


def kill_live() -> None:
    """Kill every launch this process started that may still run (on errors and interrupts)."""
    for launch in list(_LIVE):
        if launch.proc.poll() is None or procs_using(launch.out):
            launch.kill_all()
        _LIVE.discard(launch)


class Launch:
    """One ``python -m examples.reverse_text.rl`` in its own session, output to a log file."""

    def __init__(self, out: Path, args: list[str], log: Path) -> None:
        self.out, self.log = out, log
        self.start_ns = time.time_ns()
        self.t0 = time.monotonic()
        with open(log, "w") as f:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "examples.reverse_text.rl", *FAST, "--output-dir", str(out), *args],
                cwd=ROOT, env=env(), stdout=f, stderr=subprocess.STDOUT, start_new_session=True,
            )
        _LIVE.add(self)

    def text(self) -> str:
        return self.log.read_text(errors="replace")

    def tail(self, n: int = 25) -> str:
        return "\n".join("      | " + line for line in self.text().splitlines()[-n:])

    def expired(self) -> bool:
        return time.monotonic() - self.t0 > LAUNCH_TIMEOUT

    def wait(self, timeout: float) -> int | None:
        try:
            return self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            return None

    def kill_all(self) -> None:
        """SIGKILL the launcher's process group and any process still using the output dir."""
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.proc.wait()
        for pid in procs_using(self.out):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


def wait_gone(out: Path, timeout: float) -> list[int]:
    """Wait until no process uses ``out``; returns the survivors (empty on success)."""
    deadline = time.monotonic() + timeout
    while (alive := procs_using(out)) and time.monotonic() < deadline:
        time.sleep(0.05)
    return alive


# -- hashes -------------------------------------------------------------------------------------
_hash_cache: dict[tuple[str, int, int], str] = {}


def _cached(path: Path, marker: Path, compute) -> str:
    st = marker.stat()
    key = (str(path), st.st_ino, st.st_ctime_ns)
    if key not in _hash_cache:
        _hash_cache[key] = compute()
    return _hash_cache[key]


def weights_sha(step_dir: Path) -> str:
    """params sha256 of a complete ``weights/step_N`` (every shard the index names, through
    ``load_weights``; same hash as the trainer prints)."""
    from examples.reverse_text.common import params_sha256
    from prime_ckpt.weights import load_weights

    return _cached(step_dir, step_dir / "COMPLETE", lambda: params_sha256(load_weights(step_dir)[0]))


def dcp_model_sha(trainer_dir: Path) -> str:
    """params sha256 of the model in a DCP trainer checkpoint, loaded offline (no process group)."""

    def compute() -> str:
        import torch
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.metadata import TensorStorageMetadata

        from examples.reverse_text.common import params_sha256
        from prime_ckpt.dcp_io import SafeFileSystemReader, SafeLoadPlanner
        from prime_ckpt.dcp_metadata import read_dcp_metadata

        prefix = "app.model."
        md = read_dcp_metadata(trainer_dir)
        sd = {
            k: torch.empty(tuple(m.size), dtype=m.properties.dtype)
            for k, m in md.state_dict_metadata.items()
            if k.startswith(prefix) and isinstance(m, TensorStorageMetadata)
        }
        if not sd:
            raise RuntimeError(f"{trainer_dir}: no {prefix}* tensors in the metadata")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "torch.distributed is ... uninitialized": intended
            dcp.load(sd, storage_reader=SafeFileSystemReader(str(trainer_dir)), planner=SafeLoadPlanner(), no_dist=True)
        return params_sha256({k[len(prefix):]: v for k, v in sd.items()})

    return _cached(trainer_dir, trainer_dir / ".metadata", compute)


def dcp_data_files(trainer_dir: Path) -> tuple[set[str], set[str]]:
    """``(.distcp files in the directory, files its .metadata references)``."""
    from prime_ckpt.dcp_metadata import read_dcp_metadata

    files = {n for n in os.listdir(trainer_dir) if n.endswith(".distcp")}
    storage = read_dcp_metadata(trainer_dir).storage_data or {}
    return files, {str(getattr(v, "relative_path", v)) for v in storage.values()}


# -- the reference ------------------------------------------------------------------------------
@dataclass
class Reference:
    """The uninterrupted run: ``hashes[N]`` = params sha256 after step N (0 = initial)."""

    out: Path
    hashes: dict[int, str]
    steps: int
    seconds: float


def run_reference(workdir: Path, steps: int = STEPS) -> Reference:
    out = workdir / "reference"
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    t0 = time.monotonic()
    launch = Launch(out, ["--max-steps", str(steps)], workdir / "reference.log")
    try:
        rc = launch.wait(LAUNCH_TIMEOUT)
    finally:
        kill_live()
    if rc != 0:
        raise RuntimeError(f"reference run failed (exit {rc}):\n{launch.tail(40)}")
    hashes = {w.step: weights_sha(w.path) for w in scan_weights(out) if w.complete}
    final = FINAL_RE.findall(launch.text())
    if sorted(hashes) != list(range(steps + 1)) or not final or final[-1][1] != hashes[steps]:
        raise RuntimeError(f"reference run: weights steps {sorted(hashes)}, final line {final}; expected 0..{steps} and a matching hash")
    return Reference(out, hashes, steps, time.monotonic() - t0)


# -- the plan -----------------------------------------------------------------------------------
@dataclass
class Trial:
    index: int
    chain: int
    mode: str  # "sync" | "async"
    interval: int
    keep: int | None
    kill: str  # "job" | "rank0" | "rank1"
    trigger: str
    offset: int  # the trigger fires for a step >= resume step + offset
    jitter_s: float  # sleep between the trigger firing and the kill
    delay_s: float  # for trigger "delay": seconds after the load
    # results
    out: Path | None = None
    started_from: int | None = None
    fired: str = ""
    snapshot: list[CheckpointStep] = field(default_factory=list)
    expected: int | None = None
    problems: list[str] = field(default_factory=list)
    checked: bool = False
    exit_s: float | None = None  # kill -> every process of the job gone (s)

    def describe(self) -> str:
        keep = f" keep={self.keep}" if self.keep else ""
        return (f"trial {self.index:3d} [chain {self.chain} {self.mode:5s} interval={self.interval}{keep}] "
                f"kill={self.kill:5s} trigger={self.trigger}+{self.offset}")


def make_plan(n: int, seed: int) -> list[Trial]:
    """``n`` trials in chains of 3-6. Chains alternate sync/async and cycle ``--ckpt.keep``
    through none, 2, 1 (each with both modes); the rest is drawn from ``random.Random(seed)``."""
    rng = random.Random(seed)
    plan: list[Trial] = []
    chain = 0
    while len(plan) < n:
        mode = ("sync", "async")[chain % 2]
        keep = (None, 2, 1)[(chain // 2) % 3]
        interval = rng.choice((1, 1, 2))
        for _ in range(min(rng.randint(3, 6), n - len(plan))):
            plan.append(Trial(
                index=len(plan), chain=chain, mode=mode, interval=interval, keep=keep,
                kill=rng.choice(KILLS), trigger=rng.choice(TRIGGERS), offset=rng.randint(1, 3),
                jitter_s=rng.choice((0.0, 0.0, rng.uniform(0.0, 0.03))), delay_s=rng.uniform(0.0, 3.0),
            ))
        chain += 1
    return plan


def ckpt_args(t: Trial) -> list[str]:
    args = ["--ckpt.interval", str(t.interval)]
    if t.mode == "async":
        args.append("--ckpt.save-async")
    if t.keep is not None:
        args += ["--ckpt.keep", str(t.keep)]
    return args


# -- snapshot checks ----------------------------------------------------------------------------
def newest_complete(snapshot: list[CheckpointStep]) -> int | None:
    complete = [c.step for c in snapshot if c.complete(RUN_PARTS)]
    return max(complete) if complete else None


#: --async-level of the example's configs: resuming at checkpoint x needs weights [x - 2, x]
ASYNC_LEVEL = 2


def newest_resumable(snapshot: list[CheckpointStep], out: Path) -> int | None:
    """The newest complete step whose weights [x - k, x] are all complete (the seed's rule,
    checked here from the weights directories' COMPLETE marks, independently of the library)."""
    weights = out / "weights"
    for c in sorted(snapshot, key=lambda c: c.step, reverse=True):
        if c.complete(RUN_PARTS) and all(
            (weights / f"step_{s}" / "COMPLETE").is_file() for s in range(max(0, c.step - ASYNC_LEVEL), c.step + 1)
        ):
            return c.step
    return None


def describe_snapshot(snapshot: list[CheckpointStep]) -> str:
    if not snapshot:
        return "no steps"
    out = []
    for c in snapshot:
        if c.complete(RUN_PARTS):
            out.append(str(c.step))
        else:
            have = "".join(("T" if c.parts.get("trainer") else ("t" if "trainer" in c.present else "-"),
                            "O" if c.parts.get("orchestrator") else "-"))
            out.append(f"{c.step}({have})")
    return " ".join(out)


def inspect_json(out: Path, subprocess_cli: bool = False) -> tuple[int, dict | None, str]:
    """``prime-ckpt inspect OUT --json``: in-process through the typer app (same code as the
    console script) or, with ``subprocess_cli``, the installed script itself."""
    if subprocess_cli:
        exe = Path(sys.executable).with_name("prime-ckpt")
        cmd = [str(exe)] if exe.exists() else [sys.executable, "-m", "prime_ckpt.cli"]
        r = subprocess.run([*cmd, "inspect", str(out), "--json"], cwd=ROOT, env=env(), capture_output=True,
                           text=True, timeout=120, check=False)
        stdout, rc, err = r.stdout, r.returncode, r.stderr
    else:
        from typer.testing import CliRunner

        from prime_ckpt.cli import app

        r = CliRunner().invoke(app, ["inspect", str(out), "--json"])
        stdout, rc = r.stdout, r.exit_code
        err = getattr(r, "stderr", "") if rc else ""
        if r.exception is not None and not isinstance(r.exception, SystemExit):
            err += f" {type(r.exception).__name__}: {r.exception}"
    try:
        return rc, json.loads(stdout) if rc == 0 else None, err
    except json.JSONDecodeError as e:
        return rc, None, f"not JSON ({e}): {stdout[:200]}"


def check_inspect(out: Path, snapshot: list[CheckpointStep], subprocess_cli: bool = False) -> list[str]:
    rc, data, err = inspect_json(out, subprocess_cli)
    if rc != 0 or data is None:
        return [f"inspect --json failed (exit {rc}): {err.strip()[:300]}"]
    problems = []
    listed = {c["step"]: c for c in (data.get("checkpoints") or [])}
    want = {c.step: c for c in snapshot}
    if sorted(listed) != sorted(want):
        problems.append(f"inspect lists steps {sorted(listed)}, on disk {sorted(want)}")
    for step, c in want.items():
        got = listed.get(step)
        if got is None:
            continue
        if bool(got.get("complete")) != c.complete(RUN_PARTS):
            problems.append(f"inspect says step {step} complete={got.get('complete')}, snapshot {c.complete(RUN_PARTS)} ({c.parts})")
        if {k: bool(v) for k, v in (got.get("parts") or {}).items()} != {k: bool(v) for k, v in c.parts.items()}:
            problems.append(f"inspect parts of step {step}: {got.get('parts')}, snapshot {c.parts}")
    if data.get("latest_complete_step") != newest_complete(snapshot):
        problems.append(f"inspect latest_complete_step={data.get('latest_complete_step')}, snapshot {newest_complete(snapshot)}")
    return problems


def check_disk(out: Path, snapshot: list[CheckpointStep], ref: Reference) -> list[str]:
    """Every complete checkpoint step and every complete weights step is bitwise the reference."""
    from prime_ckpt.orchestrator import load_orchestrator_checkpoint

    problems = []
    for c in snapshot:
        if not c.complete(RUN_PARTS):
            continue
        try:
            sha = dcp_model_sha(c.path / "trainer")
        except Exception as e:  # noqa: BLE001 - any failure to load a 'complete' step is a finding
            problems.append(f"complete step {c.step}: trainer part does not load ({type(e).__name__}: {str(e)[:200]})")
        else:
            if sha != ref.hashes.get(c.step):
                problems.append(f"complete step {c.step}: model differs from the reference (sha {sha[:12]} != {str(ref.hashes.get(c.step))[:12]})")
            files, referenced = dcp_data_files(c.path / "trainer")
            if files != referenced:  # e.g. a shard left over from an earlier, crashed save
                problems.append(f"complete step {c.step}: trainer/ data files {sorted(files)}, .metadata references {sorted(referenced)}")
        try:
            rec = load_orchestrator_checkpoint(out, c.step)
        except Exception as e:  # noqa: BLE001
            problems.append(f"complete step {c.step}: orchestrator.pt does not load ({type(e).__name__}: {e})")
        else:
            if rec.step != c.step or rec.total_samples != c.step * BATCH:
                problems.append(f"complete step {c.step}: orchestrator.pt holds step {rec.step}, samples {rec.total_samples}")
    for w in scan_weights(out):
        if not w.complete:
            continue
        try:
            sha = weights_sha(w.path)
        except Exception as e:  # noqa: BLE001
            problems.append(f"weights/step_{w.step} is marked COMPLETE but does not load ({type(e).__name__}: {e})")
            continue
        if sha != ref.hashes.get(w.step):
            problems.append(f"weights/step_{w.step} differs from the reference (sha {sha[:12]} != {str(ref.hashes.get(w.step))[:12]})")
    return problems


# -- one launch ---------------------------------------------------------------------------------
def await_start(launch: Launch) -> tuple[str | None, dict[str, Any]]:
    """Wait until the launcher, the trainer (with its hash) and the orchestrator have said where
    they start. Returns ``(error, info)``; ``info`` has ``launcher``, ``trainer``, ``orch``
    (step or None for fresh) and ``sha``."""
    exited = False
    while True:
        text = launch.text()
        info: dict[str, Any] = {}
        if m := LAUNCH_RESUME_RE.search(text):
            info["launcher"] = int(m.group(1))
        elif LAUNCH_FRESH_RE.search(text):
            info["launcher"] = None
        if m := TRAINER_RESUMED_RE.search(text):
            info["trainer"] = int(m.group(1))
            if h := HASH_RE.search(text):
                info["sha"] = h.group(1)
        elif TRAINER_FRESH_RE.search(text):
            info["trainer"], info["sha"] = None, None
        if m := ORCH_RESUMED_RE.search(text):
            info["orch"] = int(m.group(1))
        elif ORCH_FRESH_RE.search(text):
            info["orch"] = None
        if all(k in info for k in ("launcher", "trainer", "orch", "sha")):
            return None, info
        rc = launch.proc.poll()
        if rc is not None:
            if exited:
                return f"launch exited ({rc}) before reporting its start point:\n{launch.tail()}", info
            exited = True  # parse the log once more: its last lines may have landed just now
            time.sleep(0.2)
            continue
        if launch.expired():
            return f"launch did not report its start point within {LAUNCH_TIMEOUT:.0f} s:\n{launch.tail()}", info
        time.sleep(0.02)


def check_start(info: dict[str, Any], expected: int | None, ref: Reference) -> list[str]:
    problems = []
    for who in ("launcher", "trainer", "orch"):
        if info.get(who) != expected:
            what = "fresh" if info.get(who) is None else f"step {info.get(who)}"
            problems.append(f"{who} resumed from {what}, expected {'a fresh start' if expected is None else f'step {expected}'}")
    if expected is not None and info.get("sha") != ref.hashes.get(expected):
        problems.append(f"loaded params sha256 {str(info.get('sha'))[:12]} != reference step {expected} {ref.hashes.get(expected, '')[:12]}")
    return problems


def _fresh(path: Path, since_ns: int) -> bool:
    """``path`` exists and was created/renamed/changed since ``since_ns`` (written by this launch,
    not a leftover of the killed one)."""
    try:
        return path.stat().st_ctime_ns >= since_ns
    except FileNotFoundError:
        return False


def poll_trigger(t: Trial, out: Path, target: int, since_ns: int, armed_at: float) -> str | None:
    """What fired, or None. Only files the current launch wrote count (see :func:`_fresh`)."""
    if t.trigger == "delay":
        return f"delay {t.delay_s:.2f}s" if time.monotonic() - armed_at >= t.delay_s else None
    weights = t.trigger in ("weights_in_progress", "weights_shard")
    root = out / ("weights" if weights else "checkpoints")
    try:
        entries = sorted((s, e.path) for e in os.scandir(root) if (s := parse_step(e.name)) is not None and s >= target)
    except FileNotFoundError:
        return None
    for step, p in entries:
        p = Path(p)
        if t.trigger == "weights_in_progress":
            if _fresh(p, since_ns) and not (p / "COMPLETE").exists():
                return f"weights/step_{step} in progress"
            continue
        if t.trigger == "weights_shard":  # a rank's shard is in place, the publish not committed
            try:
                if _fresh(p, since_ns) and not (p / "COMPLETE").exists() and any(
                    n.startswith("model-") and n.endswith(".safetensors") for n in os.listdir(p)
                ):
                    return f"weights/step_{step} first shard written"
            except FileNotFoundError:
                pass
            continue
        tdir = p / "trainer"
        if t.trigger == "orch_record":
            if _fresh(p / "orchestrator.pt", since_ns):
                return f"step_{step}/orchestrator.pt written"
        elif t.trigger == "after_commit":
            if _fresh(tdir / ".metadata", since_ns):
                return f"step_{step} trainer committed"
        elif _fresh(tdir, since_ns) and not (tdir / ".metadata").exists():
            if t.trigger == "save_in_progress":
                return f"step_{step} trainer save in progress"
            try:
                if any(n.endswith(".distcp") for n in os.listdir(tdir)):
                    return f"step_{step} first .distcp written"
            except FileNotFoundError:
                pass
    return None


def _running(pid: int) -> bool:
    """True if ``pid`` exists and is not a zombie (a zombie has exited; killing it does nothing)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
    except OSError:
        return False
    fields_ = stat[stat.rfind(b")") + 2:].split()
    return bool(fields_) and fields_[0] != b"Z"


def kill_and_snapshot(t: Trial, launch: Launch, ranks: dict[int, int], ref: Reference, subprocess_cli: bool) -> None:
    """Kill as the trial says, wait for the job to be gone, snapshot and check the disk."""
    out = launch.out
    t_kill = time.monotonic()
    if t.kill == "job":
        os.killpg(launch.proc.pid, signal.SIGKILL)
        launch.wait(EXIT_TIMEOUT)
    else:
        rank = int(t.kill[-1])
        pid = ranks.get(rank)
        if pid is None:
            t.problems.append(f"no pid for trainer rank {rank} (found {ranks})")
            launch.kill_all()
        else:
            landed = _running(pid)
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                landed = False
            rc = launch.wait(EXIT_TIMEOUT)
            if rc is None:
                t.problems.append(f"launcher still running {EXIT_TIMEOUT:.0f} s after rank {rank} was killed")
                launch.kill_all()
            elif rc == 0 and (landed and not FINAL_RE.search(launch.text())):
                t.problems.append(f"launcher exited 0 after rank {rank} was killed")
            elif rc == 0:
                # the rank had already finished (exited, or printed its final line and exited 0
                # before the signal landed): torchrun saw exit 0, nothing was killed
                t.fired += " (too late: the rank had finished)"
    survivors = wait_gone(out, EXIT_TIMEOUT)
    if survivors:
        t.problems.append(f"processes of the killed job still alive after {EXIT_TIMEOUT:.0f} s: {survivors}")
        launch.kill_all()
        wait_gone(out, 10)
    t.exit_s = time.monotonic() - t_kill
    t.snapshot = scan_checkpoints(out)
    t.expected = newest_resumable(t.snapshot, out)
    t.problems += check_inspect(out, t.snapshot, subprocess_cli)
    t.problems += check_disk(out, t.snapshot, ref)


# -- the runner ---------------------------------------------------------------------------------
@dataclass
class Result:
    trials: list[Trial]
    chain_problems: list[str]
    seconds: float
    launches: int

    @property
    def lost(self) -> list[Trial]:
        return [t for t in self.trials if t.problems or not t.checked]

    def summary(self) -> str:
        n = len(self.trials)
        return f"faults: {n} trials, {n - len(self.lost)} ok, {len(self.lost)} lost"


def _log(verbose: bool, msg: str) -> None:
    if verbose:
        print(msg, flush=True)


def run_trials(
    n: int, seed: int, workdir: Path, ref: Reference, *, verbose: bool = True, subprocess_cli: bool = False,
    keep_dirs: bool = False,
) -> Result:
    """Run the seeded plan; see the module docstring."""
    try:
        return _run_trials(n, seed, workdir, ref, verbose=verbose, subprocess_cli=subprocess_cli, keep_dirs=keep_dirs)
    finally:
        kill_live()


def _run_trials(n: int, seed: int, workdir: Path, ref: Reference, *, verbose: bool, subprocess_cli: bool,
                keep_dirs: bool) -> Result:
    t_all = time.monotonic()
    plan = make_plan(n, seed)
    chain_problems: list[str] = []
    launches = 0
    i = 0
    seg = 0
    while i < len(plan):
        first = plan[i]
        seg += 1
        out = workdir / f"chain{first.chain}_{seg}"
        shutil.rmtree(out, ignore_errors=True)
        out.mkdir(parents=True)
        pending: Trial | None = None  # the trial whose kill the next launch checks
        while True:
            t = plan[i] if i < len(plan) and plan[i].chain == first.chain else None
            start_hint = pending.expected if pending is not None else None
            # No room left for another kill in this directory: finish the chain here.
            if t is not None and (start_hint or 0) + t.offset > ref.steps:
                t = None
            launches += 1
            launch = Launch(out, [*ckpt_args(first), "--max-steps", str(ref.steps), "--ckpt.resume-step", "-1"],
                            workdir / f"{out.name}.{launches}.log")
            err, info = await_start(launch)
            if pending is not None:
                pending.checked = err is None
                if err:
                    pending.problems.append(f"resume launch: {err}")
                else:
                    pending.problems += check_start(info, pending.expected, ref)
                status = "ok" if not pending.problems else "LOST"
                gone = f" (job gone in {pending.exit_s:.1f}s)" if pending.exit_s is not None else ""
                _log(verbose, f"{pending.describe()} fired: {pending.fired}{gone}; snapshot {describe_snapshot(pending.snapshot)}; "
                              f"resume {pending.expected} -> {status}" + "".join(f"\n      {p}" for p in pending.problems))
            if err:
                launch.kill_all()
                if pending is None:
                    chain_problems.append(f"{out.name}: {err}")
                    if t is not None:  # the trial never ran; count it lost
                        t.out, t.problems = out, [f"launch failed before the trial: {err}"]
                        i += 1
                break
            if t is None:  # the chain's last launch: run to the end, compare the final hash
                rc = launch.wait(max(1.0, LAUNCH_TIMEOUT - (time.monotonic() - launch.t0)))
                if rc is None:
                    launch.kill_all()
                text = launch.text()
                final = FINAL_RE.findall(text)
                snap = scan_checkpoints(out)
                problems = []
                if rc != 0:
                    problems.append(f"final launch exited {rc}:\n{launch.tail()}")
                elif not final or final[-1][1] != ref.hashes[ref.steps]:
                    problems.append(f"final params sha256 {final[-1][1][:12] if final else None} != reference {ref.hashes[ref.steps][:12]}")
                if rc == 0 and newest_complete(snap) != ref.steps:
                    problems.append(f"after the final launch the newest complete step is {newest_complete(snap)}, not {ref.steps}")
                problems += check_disk(out, snap, ref)
                chain_problems += [f"{out.name}: {p}" for p in problems]
                _log(verbose, f"  {out.name}: final launch {'ok' if not problems else 'FAILED'}" + "".join(f"\n      {p}" for p in problems))
                break
            # this launch is trial t's victim
            i += 1
            t.out, t.started_from = out, info["trainer"]
            target = (info["trainer"] or 0) + t.offset
            ranks = trainer_ranks(launch.proc.pid)
            armed_at = time.monotonic()
            fired = None
            while fired is None:
                fired = poll_trigger(t, out, target, launch.start_ns, armed_at)
                if fired is None:
                    if launch.proc.poll() is not None or launch.expired():
                        break
                    time.sleep(POLL_S)
            if fired is None:
                rc = launch.proc.poll()
                if rc is None:  # timed out
                    launch.kill_all()
                    t.problems.append(f"trigger did not fire within {LAUNCH_TIMEOUT:.0f} s")
                elif rc != 0:
                    t.problems.append(f"the job failed by itself (exit {rc}) before the trigger:\n{launch.tail()}")
                t.fired = f"nothing (run ended with {rc} first)"
                wait_gone(out, EXIT_TIMEOUT)
                t.snapshot = scan_checkpoints(out)
                t.expected = newest_resumable(t.snapshot, out)
                t.problems += check_inspect(out, t.snapshot, subprocess_cli) + check_disk(out, t.snapshot, ref)
            else:
                if t.jitter_s:
                    time.sleep(t.jitter_s)
                t.fired = f"{fired} (+{t.jitter_s * 1000:.0f} ms)" if t.jitter_s else fired
                kill_and_snapshot(t, launch, ranks, ref, subprocess_cli)
            pending = t
        if not keep_dirs and not chain_problems and all(not x.problems for x in plan if x.out == out):
            shutil.rmtree(out, ignore_errors=True)
    return Result(plan, chain_problems, time.monotonic() - t_all, launches)


# -- crash during a save, resume from an earlier step, save the same step again -------------------
def retried_save_scenario(workdir: Path, ref: Reference, mode: str = "async", kill_at: int = 4,
                          subprocess_cli: bool = False) -> list[str]:
    """Kill the job while the trainer saves step ``kill_at`` (or later), resume explicitly from an
    earlier complete step, run to the end: the step that crashed mid-save is saved again and every
    step ends complete and bitwise the reference. Returns the problems found.

    A save of the tiny model can finish in the instant between seeing it in progress and the
    SIGKILL landing; then no step was caught half-written and the scenario's precondition is not
    met (not a product failure). That case is tried again, up to 3 times, from a fresh directory."""
    for attempt in range(3):
        try:
            problems = _retried_save_scenario(workdir, ref, mode, kill_at, subprocess_cli)
        finally:
            kill_live()
        missed = len(problems) == 1 and problems[0].startswith(MISSED_CRASH)
        if not missed or attempt == 2:
            return problems
        print(f"retried_save_scenario[{mode}]: {problems[0]}; trying again", flush=True)
    return problems


MISSED_CRASH = "expected a half-written trainer part after the kill"


def _retried_save_scenario(workdir: Path, ref: Reference, mode: str, kill_at: int, subprocess_cli: bool) -> list[str]:
    out = workdir / f"retried_{mode}"
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    args = ["--ckpt.interval", "1", *(["--ckpt.save-async"] if mode == "async" else []), "--max-steps", str(ref.steps)]
    problems: list[str] = []
    launch = Launch(out, args, workdir / f"{out.name}.1.log")
    t = Trial(0, 0, mode, 1, None, "job", "save_in_progress", kill_at, 0.0, 0.0)
    fired = None
    while fired is None and launch.proc.poll() is None and not launch.expired():
        fired = poll_trigger(t, out, kill_at, launch.start_ns, 0.0)
        time.sleep(POLL_S)
    if fired is None:
        launch.kill_all()
        return [f"no save of step >= {kill_at} was caught in progress (exit {launch.proc.poll()}):\n{launch.tail()}"]
    os.killpg(launch.proc.pid, signal.SIGKILL)
    launch.wait(EXIT_TIMEOUT)
    if survivors := wait_gone(out, EXIT_TIMEOUT):
        launch.kill_all()
        problems.append(f"processes alive after the job kill: {survivors}")
    snap = scan_checkpoints(out)
    crashed = [c.step for c in snap if "trainer" in c.present and not c.parts["trainer"]]
    complete = [c.step for c in snap if c.complete(RUN_PARTS)]
    if not crashed:
        problems.append(f"{MISSED_CRASH} ({fired}); snapshot {describe_snapshot(snap)}")
        return problems
    n = min(crashed)
    earlier = [s for s in complete if s < n]
    if not earlier:
        return problems + [f"no complete step before the crashed step {n}: {describe_snapshot(snap)}"]
    resume = earlier[0] if len(earlier) == 1 else earlier[-2]  # not the newest: re-save complete steps too
    problems += check_inspect(out, snap, subprocess_cli) + check_disk(out, snap, ref)
    launch = Launch(out, [*args, "--ckpt.resume-step", str(resume)], workdir / f"{out.name}.2.log")
    err, info = await_start(launch)
    if err:
        launch.kill_all()
        return problems + [err]
    problems += check_start(info, resume, ref)
    rc = launch.wait(max(1.0, LAUNCH_TIMEOUT - (time.monotonic() - launch.t0)))
    if rc is None:
        launch.kill_all()
    if rc != 0:
        return problems + [f"resumed run exited {rc}:\n{launch.tail()}"]
    final = FINAL_RE.findall(launch.text())
    if not final or final[-1][1] != ref.hashes[ref.steps]:
        problems.append(f"final params sha256 {final[-1][1][:12] if final else None} != reference")
    snap2 = scan_checkpoints(out)
    if [c.step for c in snap2] != list(range(1, ref.steps + 1)) or not all(c.complete(RUN_PARTS) for c in snap2):
        problems.append(f"after the retried run: {describe_snapshot(snap2)}; expected steps 1..{ref.steps} all complete")
    # a re-saved step holds only the new save's data files: every .distcp is one its .metadata
    # references (nothing left over from the crashed save), and every referenced one exists
    # (check_disk below also checks that every complete step's .distcp files are exactly the ones
    # its .metadata references: nothing is left over from the crashed save)
    problems += check_inspect(out, snap2, subprocess_cli) + check_disk(out, snap2, ref)
    if not problems:
        print(f"retried save ({mode}): killed at {fired}; snapshot {describe_snapshot(snap)}; resumed from {resume}; "
              f"step {n} saved again; all {ref.steps} steps complete and bitwise the reference", flush=True)
        shutil.rmtree(out, ignore_errors=True)
    return [f"retried save ({mode}): {p}" for p in problems]


# -- two runs on one directory; the lease holder is killed -------------------------------------
def lease_scenario(workdir: Path, ref: Reference, subprocess_cli: bool = False) -> list[str]:
    """Run A holds the output directory; run B on the same directory fails at once (non-zero,
    one line naming A) and changes nothing; A is SIGKILLed while it holds the lease; run C
    (``--ckpt.resume-step -1``) takes the stale lease over, resumes from the newest resumable step
    and ends bitwise the reference. Returns the problems found."""
    try:
        return _lease_scenario(workdir, ref, subprocess_cli)
    finally:
        kill_live()


def _lease_scenario(workdir: Path, ref: Reference, subprocess_cli: bool) -> list[str]:
    out = workdir / "lease"
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    args = ["--ckpt.interval", "2", "--ckpt.save-async", "--max-steps", str(ref.steps)]
    problems: list[str] = []
    a = Launch(out, args, workdir / "lease.a.log")
    while not LAUNCH_FRESH_RE.search(a.text()):  # A's launcher holds the lease from here on
        if a.proc.poll() is not None or a.expired():
            a.kill_all()
            return [f"run A did not start:\n{a.tail()}"]
        time.sleep(0.02)
    t_b = time.monotonic()
    b = Launch(out, [*args, "--ckpt.resume-step", "-1"], workdir / "lease.b.log")
    rc_b = b.wait(60)
    took = time.monotonic() - t_b
    if rc_b is None:
        b.kill_all()
        problems.append("run B on the held directory did not exit within 60 s")
    elif rc_b == 0 or "output directory is in use by run" not in b.text():
        problems.append(f"run B exited {rc_b} without naming the holder:\n{b.tail()}")
    if a.proc.poll() is not None:
        problems.append(f"run A stopped ({a.proc.poll()}) before it could be killed holding the lease:\n{a.tail()}")
    while a.proc.poll() is None and not a.expired() and not any(c.parts.get("trainer") for c in scan_checkpoints(out)):
        time.sleep(POLL_S)  # kill once A has a complete checkpoint, mid-run
    if a.proc.poll() is not None:
        problems.append(f"run A exited ({a.proc.poll()}) before it could be killed holding the lease:\n{a.tail()}")
    fired = describe_snapshot(scan_checkpoints(out))
    os.killpg(a.proc.pid, signal.SIGKILL)  # while it holds the lease
    a.wait(EXIT_TIMEOUT)
    if survivors := wait_gone(out, EXIT_TIMEOUT):
        a.kill_all()
        problems.append(f"processes alive after killing run A: {survivors}")
    snap = scan_checkpoints(out)
    expected = newest_resumable(snap, out)
    if (out / "checkpoints").is_dir() or (out / "weights").is_dir():  # (A may be killed before its first write)
        problems += check_inspect(out, snap, subprocess_cli) + check_disk(out, snap, ref)
    c = Launch(out, [*args, "--ckpt.resume-step", "-1"], workdir / "lease.c.log")
    err, info = await_start(c)
    if err:
        c.kill_all()
        return problems + [f"run C: {err}"]
    problems += check_start(info, expected, ref)
    rc = c.wait(max(1.0, LAUNCH_TIMEOUT - (time.monotonic() - c.t0)))
    if rc != 0:
        c.kill_all()
        return problems + [f"run C exited {rc}:\n{c.tail()}"]
    final = FINAL_RE.findall(c.text())
    if not final or final[-1][1] != ref.hashes[ref.steps]:
        problems.append(f"final params sha256 {final[-1][1][:12] if final else None} != reference")
    if (out / "run.lock").exists():
        problems.append("run C left its lease behind")
    if not problems:
        print(f"lease: run B refused in {took:.1f} s; run A killed holding the lease (steps: {fired}); run C took the lease over, resumed "
              f"from {expected} and ended bitwise the reference", flush=True)
        shutil.rmtree(out, ignore_errors=True)
    return [f"lease: {p}" for p in problems]


def report(result: Result) -> str:
    lines = []
    for t in result.lost:
        lines.append(f"{t.describe()} fired: {t.fired}; snapshot {describe_snapshot(t.snapshot)}; expected resume {t.expected}; dir {t.out}")
        lines += [f"    {p}" for p in t.problems or ["never checked (no resume launch)"]]
    lines += [f"chain: {p}" for p in result.chain_problems]
    kinds = {}
    for t in result.trials:
        kinds[(t.mode, "job" if t.kill == "job" else "rank")] = kinds.get((t.mode, "job" if t.kill == "job" else "rank"), 0) + 1
    missed = sum(1 for t in result.trials if t.fired.startswith("nothing"))
    lines.append(
        f"{result.launches} launches in {result.seconds:.0f} s ({result.seconds / max(1, len(result.trials)):.1f} s/trial); "
        + ", ".join(f"{m}/{k}-kill {c}" for (m, k), c in sorted(kinds.items()))
        + (f"; {missed} runs ended before their trigger" if missed else "")
    )
    lines.append(result.summary())
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m tests.faults.harness", description=__doc__.split("\n\n")[0])
    ap.add_argument("--trials", type=int, default=200)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--workdir", type=Path, default=None, help="default: a fresh temp dir (removed unless --keep-dirs or a failure)")
    ap.add_argument("--keep-dirs", action="store_true", help="keep the output dirs of passing chains")
    ap.add_argument("--inspect-subprocess", action="store_true", help="run the prime-ckpt script for inspect (slower)")
    ap.add_argument("--retried", action="store_true", help="also run the crashed-then-retried save scenario (sync and async)")
    ap.add_argument("-q", "--quiet", action="store_true")
    a = ap.parse_args(argv)
    workdir = a.workdir or Path(tempfile.mkdtemp(prefix="prime-ckpt-faults-"))
    workdir.mkdir(parents=True, exist_ok=True)
    print(f"faults: workdir {workdir}; seed {a.seed}; reference run ({STEPS} steps)...", flush=True)
    ref = run_reference(workdir)
    print(f"faults: reference done in {ref.seconds:.0f} s", flush=True)
    extra: list[str] = []
    if a.retried:
        for mode in ("sync", "async"):
            extra += retried_save_scenario(workdir, ref, mode, subprocess_cli=a.inspect_subprocess)
    result = run_trials(a.trials, a.seed, workdir, ref, verbose=not a.quiet, subprocess_cli=a.inspect_subprocess,
                        keep_dirs=a.keep_dirs)
    for p in extra:
        print(p)
    print(report(result), flush=True)
    ok = not result.lost and not result.chain_problems and not extra
    if ok and a.workdir is None and not a.keep_dirs:
        shutil.rmtree(workdir, ignore_errors=True)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
