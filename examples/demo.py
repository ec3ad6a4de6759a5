"""`make demo`: a real async-RL run is stopped mid-flight and resumed bitwise-identically.

0. one inference server (vLLM, from ``.venv-inference``) is started for the whole demo; every
   run's orchestrator samples from it over HTTP and tells it which weights to serve;
1. reference: the reverse-text run (a Hugging Face Llama trained on 2 FSDP2 ranks + the
   orchestrator), no checkpoints;
2. the same run with async checkpoints, logging to W&B (offline, ``outputs/demo/wandb``; each
   program prints its run id and writes it to ``<output_dir>/wandb/<program>.id``); once
   checkpoint step ~N/2 is complete on disk, the whole job (trainer + orchestrator, not the
   server) is SIGKILLed;
3. the same command with ``--ckpt.resume-step -1`` and the two W&B run ids read back from those
   files picks the newest resumable step x (complete, with its weights [x - async_level, x]); the
   server, still running (same pid), is told to load the weights of x - async_level; the run
   finishes, logging into the same W&B runs;
4. compare: final parameters (sha256) and every loss after the resume step must be identical to
   the reference (vLLM's seeded sampling reproduces the rollouts); reward must have risen;
5. ``prime-ckpt inspect`` of the last checkpoint and of the last published weights.

Logs of each run: ``outputs/demo/*.log``.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from examples.reverse_text.common import wandb_id_path
from prime_ckpt.layout import latest_complete_step, scan_checkpoints, scan_weights

OUT = ROOT / "outputs" / "demo"
STEPS = 50
INTERVAL = 5
ASYNC_LEVEL = 2  # as in examples/configs/reverse_text/*.toml
KEEP = 2  # --ckpt.keep: retention prunes older checkpoints and unpinned weights as the run goes
STOP_AT = STEPS // 2
STEP_RE = re.compile(r"^step (\d+) \| loss (\S+) \| reward (\S+)")
FINAL_RE = re.compile(r"^final step (\d+) \| params sha256 ([0-9a-f]{64})")


def env() -> dict[str, str]:
    e = dict(os.environ)
    e["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), e.get("PYTHONPATH", "")) if p)
    e["OMP_NUM_THREADS"] = "1"
    e["PYTHONUNBUFFERED"] = "1"
    e.setdefault("WANDB_MODE", "offline")
    e.setdefault("WANDB_DIR", str(OUT))
    return e


SERVER_URL = ""  # set by main() once the server is up


def rl_cmd(output_dir: Path, *extra: str) -> list[str]:
    return [
        sys.executable, "-m", "examples.reverse_text.rl",
        "--trainer", "@", "examples/configs/reverse_text/train.toml",
        "--orchestrator", "@", "examples/configs/reverse_text/orch.toml",
        "--orchestrator.inference.base-url", SERVER_URL,
        "--output-dir", str(output_dir), "--max-steps", str(STEPS), *extra,
    ]


def parse(log: Path) -> tuple[dict[int, tuple[str, float]], str | None, list[str]]:
    """({step: (loss text, reward)}, final sha256, launcher/resume lines) from a run log."""
    steps, sha, notes = {}, None, []
    for line in log.read_text().splitlines():
        if m := STEP_RE.match(line):
            steps[int(m.group(1))] = (m.group(2), float(m.group(3)))
        elif m := FINAL_RE.match(line):
            sha = m.group(2)
        elif line.startswith(("rl:", "trainer: resumed", "orchestrator: resumed", "orchestrator: inference server")) or " W&B run id " in line:
            notes.append(line)
    return steps, sha, notes


def start(cmd: list[str], log: Path) -> subprocess.Popen:
    f = open(log, "w")  # noqa: SIM115 - closed by the child exiting; we only read the file
    return subprocess.Popen(cmd, cwd=ROOT, env=env(), stdout=f, stderr=subprocess.STDOUT, start_new_session=True)


def wait(proc: subprocess.Popen, log: Path, what: str, timeout: float = 240) -> None:
    try:
        rc = proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        rc = "timeout"
    if rc != 0:
        print(f"\n{what} failed ({rc}); last lines of {log}:\n" + "\n".join(log.read_text().splitlines()[-30:]))
        sys.exit(1)


def procs_using(path: Path) -> list[int]:
    """pids whose command line mentions ``path`` (Linux /proc; [] elsewhere)."""
    found = []
    for d in Path("/proc").glob("[0-9]*"):
        try:
            if str(path).encode() in (d / "cmdline").read_bytes():
                found.append(int(d.name))
        except OSError:
            pass
    return found


def show_inspect(text: str, max_lines: int = 40) -> None:
    """The summary of ``prime-ckpt inspect``; long per-tensor tables are elided."""
    lines = text.rstrip().splitlines()
    if len(lines) <= max_lines:
        print(text.rstrip())
        return
    keep, skipping = [], False
    for line in lines:
        if line.startswith(("tensors", "non-tensor")):
            skipping = True
            keep.append(f"{line.strip()}  [... elided; run the command to see it]")
            continue
        if skipping and line[:1] not in "┏┃┡│└━┗┣╇╋" and line.strip():
            skipping = False
        if not skipping:
            keep.append(line)
    print("\n".join(keep[:max_lines]))


def show_steps(steps: dict[int, tuple[str, float]], every: int = 10) -> None:
    for n in sorted(steps):
        if n == 1 or n % every == 0:
            print(f"    step {n:3d}  loss {float(steps[n][0]):+.5f}  reward {steps[n][1]:.3f}")


def main() -> int:
    global SERVER_URL
    from examples.reverse_text.inference import InferenceClient, InferenceError, start_server, stop_server
    from examples.reverse_text.model import ModelConfig

    t_all = time.perf_counter()
    shutil.rmtree(OUT, ignore_errors=True)
    OUT.mkdir(parents=True)
    ref_dir, run_dir = OUT / "reference", OUT / "run"

    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    SERVER_URL = f"http://127.0.0.1:{port}"
    print(f"== 0/4 inference server: vLLM on {SERVER_URL}, started once for the whole demo (log {(OUT / 'vllm.log').relative_to(ROOT)})")
    t0 = time.perf_counter()
    try:
        server = start_server(ModelConfig(), OUT / "inference", port, log=OUT / "vllm.log")
    except InferenceError as e:
        print(f"    {e}")
        return 1
    try:
        InferenceClient(SERVER_URL).wait_ready(600, should_stop=lambda: server.poll() is not None)
    except InferenceError as e:
        print(f"    {e}\n" + "\n".join((OUT / "vllm.log").read_text().splitlines()[-20:]))
        stop_server(server)
        return 1
    print(f"    server pid {server.pid}, ready in {time.perf_counter() - t0:.1f} s")
    try:
        return _demo(server, ref_dir, run_dir, t_all)
    finally:
        stop_server(server)


def _demo(server, ref_dir: Path, run_dir: Path, t_all: float) -> int:
    from examples.reverse_text.inference import InferenceClient

    print(f"== 1/4 reference run: {STEPS} steps, trainer on 2 FSDP2 ranks + orchestrator, no checkpoints")
    t0 = time.perf_counter()
    log = OUT / "reference.log"
    wait(start(rl_cmd(ref_dir), log), log, "reference run")
    ref_steps, ref_sha, _ = parse(log)
    show_steps(ref_steps)
    print(f"    done in {time.perf_counter() - t0:.1f} s; final params sha256 {ref_sha[:16]}...")

    ckpt = ("--ckpt.interval", str(INTERVAL), "--ckpt.save-async", "--ckpt.keep", str(KEEP))
    wandb_flags = ("--trainer.monitor.wandb.project", "prime-ckpt-demo", "--orchestrator.monitor.wandb.project", "prime-ckpt-demo")
    print(f"\n== 2/4 same run with async checkpoints every {INTERVAL} steps, keeping the {KEEP} newest; "
          f"stop the job (SIGKILL; not the server) once step {STOP_AT} is on disk")
    t0 = time.perf_counter()
    log = OUT / "run.log"
    proc = start(rl_cmd(run_dir, *ckpt, *wandb_flags), log)
    deadline = time.monotonic() + 240
    while (latest_complete_step(run_dir) or 0) < STOP_AT:
        if proc.poll() is not None or time.monotonic() > deadline:
            print(f"    run ended or stalled before checkpoint {STOP_AT}:\n" + log.read_text()[-3000:])
            return 1
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    # torchrun puts the trainer ranks in their own sessions; they die with their torchrun parent
    # (PR_SET_PDEATHSIG). Make sure nothing of the stopped job still writes into the run dir.
    deadline = time.monotonic() + 10
    while (alive := procs_using(run_dir)) and time.monotonic() < deadline:
        time.sleep(0.1)
    if alive:
        print(f"    processes of the stopped job still alive: {alive}")
        return 1
    killed_steps, _, killed_notes = parse(log)
    last = max(killed_steps) if killed_steps else 0
    print(f"    killed the job's process group at trainer step {last} ({time.perf_counter() - t0:.1f} s)")
    for line in killed_notes:
        if " W&B run id " in line:
            print(f"    {line}")
    run_ids = {p: wandb_id_path(run_dir, p).read_text().strip() for p in ("trainer", "orchestrator")}
    print(f"    inference server: pid {server.pid}, alive: {server.poll() is None}, "
          f"serves weights step {InferenceClient(SERVER_URL).loaded_step()}")
    for c in scan_checkpoints(run_dir):
        state = "complete" if c.complete() else "INCOMPLETE (" + ", ".join(p for p, ok in c.parts.items() if not ok) + " missing)"
        print(f"    checkpoints/step_{c.step}: {state}")

    print("\n== 3/4 resume: the same command with --ckpt.resume-step -1")
    t0 = time.perf_counter()
    log = OUT / "resume.log"
    same_runs = [f"--{p}.monitor.wandb.id={run_id}" for p, run_id in run_ids.items()]  # what $(cat <file>) gives
    wait(start(rl_cmd(run_dir, *ckpt, "--ckpt.resume-step", "-1", *wandb_flags, *same_runs), log), log, "resumed run")
    res_steps, res_sha, notes = parse(log)
    for line in notes:
        print(f"    {line}")
    resumed_from = min(res_steps) - 1 if res_steps else STEPS
    show_steps(res_steps)
    print(f"    done in {time.perf_counter() - t0:.1f} s")
    print(f"    inference server: pid {server.pid} (the same process, never restarted), alive: {server.poll() is None}")

    print(f"\n== 4/4 compare with the reference (steps {resumed_from + 1}..{STEPS})")
    ok = True
    mism = [n for n in res_steps if ref_steps.get(n, (None,))[0] != res_steps[n][0]]
    missing = [n for n in range(resumed_from + 1, STEPS + 1) if n not in res_steps]
    print(f"    per-step losses identical: {len(res_steps) - len(mism)}/{len(res_steps)}" + (f"  MISMATCH at {mism[:5]}" if mism else ""))
    ok &= not mism and not missing
    print(f"    final params sha256  reference {ref_sha}")
    print(f"                         resumed   {res_sha}")
    ok &= ref_sha is not None and ref_sha == res_sha
    ok &= server.poll() is None
    resumed_ids = dict(re.findall(r"^(trainer|orchestrator): W&B run id (\S+) ", (OUT / "resume.log").read_text(), re.MULTILINE))
    print(f"    W&B runs continued: {resumed_ids == run_ids} (trainer {run_ids['trainer']}, orchestrator {run_ids['orchestrator']})")
    ok &= resumed_ids == run_ids
    first = [ref_steps[n][1] for n in range(1, 6)]
    lastr = [ref_steps[n][1] for n in range(STEPS - 4, STEPS + 1)]
    r0, r1 = sum(first) / len(first), sum(lastr) / len(lastr)
    print("    reward curve of the reference run (mean of each 5 steps):")
    for a in range(1, STEPS + 1, 5):
        window = [ref_steps[n][1] for n in range(a, min(a + 5, STEPS + 1)) if n in ref_steps]
        mean = sum(window) / len(window)
        print(f"      steps {a:2d}-{a + len(window) - 1:2d}  {mean:.3f}  {'#' * round(mean * 60)}")
    print(f"    reward: steps 1-5 mean {r0:.3f} -> steps {STEPS - 4}-{STEPS} mean {r1:.3f}")
    learned = r1 > r0 + 0.1
    print(f"\n{'PASS' if ok else 'FAIL'}: resumed run is {'bitwise identical to' if ok else 'DIFFERENT from'} the uninterrupted run"
          + ("" if learned else "  (warning: reward did not rise by 0.1)"))

    exe = Path(sys.executable).with_name("prime-ckpt")
    cmd = [str(exe)] if exe.exists() else [sys.executable, "-m", "prime_ckpt.cli"]
    ckpt_steps = [c.step for c in scan_checkpoints(run_dir)]
    weight_steps = [w.step for w in scan_weights(run_dir)]
    print(f"\n== retention (--ckpt.keep {KEEP}, async level {ASYNC_LEVEL}): left on disk")
    print(f"    checkpoints/ steps {ckpt_steps}")
    print(f"    weights/     steps {weight_steps}  (each kept checkpoint x pins weights [x-{ASYNC_LEVEL}, x])")
    r = subprocess.run([*cmd, "plan", str(run_dir), "--keep", str(KEEP), "--async-level", str(ASYNC_LEVEL)],
                       cwd=ROOT, env=env(), capture_output=True, text=True, timeout=60, check=False)
    print("    " + "\n    ".join(r.stdout.strip().splitlines()))

    final_ckpt = (run_dir / "checkpoints" / f"step_{latest_complete_step(run_dir)}")
    print(f"\n== prime-ckpt inspect {final_ckpt.relative_to(ROOT)}")
    r = subprocess.run([*cmd, "inspect", str(final_ckpt)], cwd=ROOT, env=env(), capture_output=True, text=True, timeout=60, check=False)
    if r.returncode == 0:
        show_inspect(r.stdout)
    else:
        print(f"    (prime-ckpt inspect not available: {(r.stderr or r.stdout).strip().splitlines()[-1:] or r.returncode})")
    last_weights = run_dir / "weights" / f"step_{max(weight_steps)}"
    print(f"\n== prime-ckpt inspect {last_weights.relative_to(ROOT)}  (what the inference server loads)")
    r = subprocess.run([*cmd, "inspect", str(last_weights)], cwd=ROOT, env=env(), capture_output=True, text=True, timeout=60, check=False)
    show_inspect(r.stdout if r.returncode == 0 else (r.stderr or r.stdout), max_lines=24)
    print(f"\ndemo wall time {time.perf_counter() - t_all:.1f} s; logs in {OUT.relative_to(ROOT)}/*.log")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
