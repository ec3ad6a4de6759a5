"""One command for a whole run: ``python -m examples.reverse_text.rl``.

    python -m examples.reverse_text.rl \\
        --trainer @ examples/configs/reverse_text/train.toml \\
        --orchestrator @ examples/configs/reverse_text/orch.toml \\
        --ckpt.interval 10 --ckpt.resume-step -1 \\
        --trainer.monitor.wandb.project rt --trainer.monitor.wandb.id "$(cat outputs/reverse_text/wandb/trainer.id)" \\
        --orchestrator.monitor.wandb.project rt --orchestrator.monitor.wandb.id "$(cat outputs/reverse_text/wandb/orchestrator.id)"

W&B: with ``--*.monitor.wandb.project``, each program prints the id of its W&B run at start and
writes it to ``<output_dir>/wandb/<program>.id``; passing the ids back, as above, continues the
same two runs on a resume (without them a resume starts new runs).

Routing: ``--ckpt``/``--ckpt.*``, ``--model.*`` and ``--output-dir``, ``--max-steps``,
``--async-level``, ``--seed`` go to both programs; ``--trainer.*`` / ``--orchestrator.*`` go to
one (prefix stripped); ``--trainer @ f.toml`` passes ``@ f.toml``. Both configs are validated
before anything starts (a bad flag: one line naming it, exit 2). The run is entered through the
library (:func:`prime_ckpt.run.enter_run`): the output directory's lease (a second run fails at
once), ``--ckpt.resume-step -1`` resolved once to the newest resumable step that both programs
then load, and checkpoints, weights and rollouts newer than it (left by a stopped or earlier
run) set aside together under ``superseded/``, never deleted, so neither side can run ahead
on stale files. The trainer runs under ``torchrun --standalone --nproc-per-node
<--nproc>``; if either program fails the other is stopped and the exit status is non-zero.

Preemption: SIGTERM or SIGUSR1 to the launcher goes to the trainer's workers and to the
orchestrator; the trainer finishes its step and checkpoints it, the orchestrator writes the
progress records of its last ``async_level + 1`` steps, and the launcher exits 0 once both did.
Resume with ``--ckpt.resume-step -1``.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from prime_ckpt.config import ConfigError, parse_cli
from prime_ckpt.errors import RunLeaseError
from prime_ckpt.layout import RUN_PARTS
from prime_ckpt.run import RUN_ID_ENV, enter_run

ROOT = Path(__file__).resolve().parents[2]
SHARED_FLAGS = ("--output-dir", "--max-steps", "--async-level", "--seed")
SHARED_PREFIXES = ("--ckpt.", "--model.")
USAGE = """usage: rl --trainer @ TRAIN.toml --orchestrator @ ORCH.toml [--nproc N] [flags]

  --trainer @ F / --orchestrator @ F   config file of one program
  --trainer.X V / --orchestrator.X V   flag --X V for one program
  --ckpt[.X V], --model.X V, --output-dir, --max-steps, --async-level, --seed
                                       flags for both programs
  --nproc N                            trainer ranks (torchrun --nproc-per-node; default 2)
"""


class UsageError(ValueError):
    pass


def route(argv: list[str]) -> tuple[list[str], list[str], int]:
    """Split launcher arguments into ``(trainer_args, orchestrator_args, nproc)``."""
    trainer: list[str] = []
    orch: list[str] = []
    nproc = 2
    i = 0

    def value_after(j: int) -> list[str]:
        nxt = argv[j + 1] if j + 1 < len(argv) else None
        return [nxt] if nxt is not None and not nxt.startswith("--") and nxt != "@" else []

    while i < len(argv):
        tok = argv[i]
        name, eq, inline = tok.partition("=")
        if tok in ("--trainer", "--orchestrator"):
            dest = trainer if tok == "--trainer" else orch
            nxt = argv[i + 1] if i + 1 < len(argv) else ""
            if nxt == "@" and i + 2 < len(argv):
                dest += ["@", argv[i + 2]]
                i += 3
            elif nxt.startswith("@") and len(nxt) > 1:
                dest.append(nxt)
                i += 2
            else:
                raise UsageError(f"{tok} must be followed by '@ <file.toml>'")
            continue
        if name == "--nproc":
            val = [inline] if eq else value_after(i)
            if not val or not val[0].isdigit() or int(val[0]) < 1:
                raise UsageError("--nproc: expected a positive integer")
            nproc = int(val[0])
            i += 1 if eq else 2
            continue
        if not tok.startswith("--"):
            raise UsageError(f"unexpected argument {tok!r}")
        val = [] if eq else value_after(i)
        step = 1 + len(val)
        for prefix, dest in (("--trainer.", trainer), ("--orchestrator.", orch)):
            if name.startswith(prefix):
                dest += ["--" + tok[len(prefix):], *val]
                break
        else:
            if name == "--ckpt" or name in SHARED_FLAGS or name.startswith(SHARED_PREFIXES):
                trainer += [tok, *val]
                orch += [tok, *val]
            else:
                raise UsageError(f"unrecognized argument: {name} (use --trainer.{name[2:]} or --orchestrator.{name[2:]})")
        i += step
    return trainer, orch, nproc


def _fail(msg: str, code: int = 2) -> None:
    print(f"rl: error: {msg}", file=sys.stderr, flush=True)
    raise SystemExit(code)


def _children(pid: int) -> list[int]:
    """PIDs whose parent is ``pid`` (Linux /proc): torchrun's workers."""
    kids = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            kids.append(int(entry))
    return kids


class Launcher:
    def __init__(self, stop_grace_s: float = 300.0) -> None:
        self.procs: dict[str, subprocess.Popen] = {}
        self.signalled: int | None = None
        self.stop_grace_s = stop_grace_s

    def _on_signal(self, signum, _frame) -> None:
        """Preemption: pass the signal to the trainer's workers (not to torchrun, whose agent
        would tear the workers down and exit non-zero) and to the orchestrator; each finishes
        its step, checkpoints and exits 0."""
        self.signalled = signum
        for name, p in self.procs.items():
            if p.poll() is not None:
                continue
            targets = _children(p.pid) if name == "trainer" else [p.pid]
            for pid in targets or [p.pid]:
                try:
                    os.kill(pid, signum)
                except ProcessLookupError:
                    pass

    def _drain(self, grace: float) -> int:
        """After a preemption signal: let every program checkpoint and exit by itself within
        ``grace`` seconds (then kill); 0 if all exited 0."""
        deadline = time.monotonic() + grace
        for p in self.procs.values():
            try:
                p.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                pass
        codes = {name: p.poll() for name, p in self.procs.items()}
        if any(c is None for c in codes.values()):
            print(f"rl: programs still running {grace:.0f} s after the signal: {codes}; killing", file=sys.stderr, flush=True)
            self.stop_all()
            return 128 + (self.signalled or 0)
        if any(c != 0 for c in codes.values()):
            print(f"rl: exit codes after the signal: {codes}", file=sys.stderr, flush=True)
            return 1
        print("rl: preempted: every program checkpointed and exited 0", flush=True)
        return 0

    def stop_all(self, grace: float = 10.0) -> None:
        for p in self.procs.values():
            if p.poll() is None:
                p.terminate()
        deadline = time.monotonic() + grace
        for p in self.procs.values():
            try:
                p.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()

    def run(self, cmds: dict[str, list[str]], env: dict[str, str]) -> int:
        for sig in (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT):
            signal.signal(sig, self._on_signal)
        for name, cmd in cmds.items():
            self.procs[name] = subprocess.Popen(cmd, env=env, cwd=ROOT)
        while True:
            if self.signalled is not None:
                return self._drain(self.stop_grace_s)
            codes = {name: p.poll() for name, p in self.procs.items()}
            failed = [(n, c) for n, c in codes.items() if c not in (None, 0)]
            if failed:
                name, code = failed[0]
                print(f"rl: {name} exited with status {code}; stopping the others", file=sys.stderr, flush=True)
                self.stop_all()
                return code if code > 0 else 1
            if all(c == 0 for c in codes.values()):
                return 0
            time.sleep(0.1)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if any(a in ("-h", "--help") for a in argv):
        print(USAGE)
        return 0
    from examples.reverse_text.orchestrator import OrchestratorConfig
    from examples.reverse_text.trainer import TrainerConfig

    try:
        trainer_args, orch_args, nproc = route(argv)
    except UsageError as e:
        _fail(str(e))
    try:
        tcfg = parse_cli(TrainerConfig, trainer_args, prog="trainer")
    except ConfigError as e:
        _fail(f"trainer: {e}")
    try:
        ocfg = parse_cli(OrchestratorConfig, orch_args, prog="orchestrator")
    except ConfigError as e:
        _fail(f"orchestrator: {e}")
    for field in ("output_dir", "max_steps", "async_level", "model"):
        if getattr(tcfg, field) != getattr(ocfg, field):
            _fail(f"--{field.replace('_', '-')}: trainer has {getattr(tcfg, field)!r}, orchestrator {getattr(ocfg, field)!r}; they must agree")
    if (tcfg.ckpt is None) != (ocfg.ckpt is None) or (tcfg.ckpt and tcfg.ckpt.interval != ocfg.ckpt.interval):
        _fail("--ckpt: trainer and orchestrator must both checkpoint, at the same --ckpt.interval")

    out = tcfg.output_dir
    # Enter the run through the library (prime_ckpt.run.enter_run): the output directory's lease
    # (a second run fails at once), the start step (-1: the newest resumable one, decided once;
    # both programs load this very step), and every checkpoint, weights and rollout step of an
    # earlier run newer than it set aside together under superseded/ (never deleted). The
    # trainer's Checkpointer joins the lease through PRIME_CKPT_RUN_ID.
    resume = tcfg.ckpt.resume_step if tcfg.ckpt is not None else None
    try:
        entry = enter_run(out, resume, parts=RUN_PARTS, async_level=tcfg.async_level, also=("rollouts",))
    except RunLeaseError as e:
        _fail(str(e), code=1)
    except (FileNotFoundError, ValueError) as e:
        _fail(str(e), code=1)
    start = entry.start_step
    if resume == -1:
        pinned = ["--ckpt.resume-step", "null" if start is None else str(start)]
        trainer_args += pinned
        orch_args += pinned
    if start is None:
        print(f"rl: starting fresh in {out} (run {entry.run_id})", flush=True)
    else:
        print(f"rl: resuming from checkpoint step {start} in {out} (run {entry.run_id})", flush=True)
    if entry.set_aside:
        print(f"rl: set aside {len(entry.set_aside)} step(s) of an earlier run newer than step {start or 0} "
              f"into {entry.superseded_dir} (nothing deleted)", flush=True)

    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH", "")) if p)
    env.setdefault("OMP_NUM_THREADS", "1")
    env["PYTHONUNBUFFERED"] = "1"
    env[RUN_ID_ENV] = entry.run_id
    cmds = {
        "trainer": [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
                    "-m", "examples.reverse_text.trainer", *trainer_args],
        "orchestrator": [sys.executable, "-m", "examples.reverse_text.orchestrator", *orch_args],
    }
    server = _ensure_server(ocfg) if ocfg.inference.backend == "server" else None
    try:
        return Launcher().run(cmds, env)
    finally:
        if entry.lease is not None:
            entry.lease.release()
        if server is not None:
            from examples.reverse_text.inference import stop_server

            stop_server(server)
            print(f"rl: stopped the inference server it started (pid {server.pid})", flush=True)


def _ensure_server(ocfg) -> subprocess.Popen | None:
    """Use the inference server at ``--orchestrator.inference.base-url`` if one answers (and leave
    it running: it was not started here); else start one on that local port (vLLM, from
    ``.venv-inference``) and return it, to be stopped when the run ends."""
    from urllib.parse import urlparse

    from examples.reverse_text.inference import InferenceClient, InferenceError, start_server, stop_server

    url = ocfg.inference.base_url
    client = InferenceClient(url)
    if client.ready():
        print(f"rl: using the inference server at {url} (not started here: left running)", flush=True)
        return None
    parsed = urlparse(url)
    if parsed.hostname not in ("127.0.0.1", "localhost") or parsed.port is None:
        _fail(f"--orchestrator.inference.base-url: no server answers at {url}, and rl only starts one on 127.0.0.1:<port>", code=1)
    work = ocfg.output_dir / "inference"
    work.mkdir(parents=True, exist_ok=True)
    try:
        proc = start_server(ocfg.model, work, parsed.port, log=work / "server.log")
    except InferenceError as e:
        _fail(str(e), code=1)
    print(f"rl: starting an inference server (vLLM, pid {proc.pid}) at {url}; log {work / 'server.log'}", flush=True)
    try:
        client.wait_ready(ocfg.inference.timeout_s * 3, should_stop=lambda: proc.poll() is not None)
    except InferenceError as e:
        stop_server(proc)
        _fail(f"{e} (see {work / 'server.log'})", code=1)
    print(f"rl: inference server ready (pid {proc.pid})", flush=True)
    return proc


def cli() -> None:
    """Console script ``rl``."""
    # whole lines per write, as in common.whole_lines (not imported: it would import torch here)
    sys.stdout.reconfigure(line_buffering=True, write_through=False)
    sys.exit(main())


if __name__ == "__main__":
    cli()
