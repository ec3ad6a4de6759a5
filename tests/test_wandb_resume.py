"""W&B resume (WANDB_MODE=offline): each program prints the id of its W&B run at start and writes it
to ``<output_dir>/wandb/<program>.id``; a resume that passes those ids back, as the README does,
continues the same two runs, and their first logged `progress/step` is checkpoint step + 1."""

import re
import shlex
import sys
from pathlib import Path

from examples.reverse_text.common import wandb_id_path
from tests.conftest import run_proc
from tests.test_example import FAST, rl
from tests.wandb_records import read_run

ID_LINE = re.compile(r"^(trainer|orchestrator): W&B run id (\w+) \(project (\S+), (offline|online); written to (\S+)\)$", re.MULTILINE)


def _runs(wandb_dir: Path, run_id: str) -> list[list[dict]]:
    """History rows of each offline run file of ``run_id``, oldest first; each file's own run
    record must carry ``run_id`` (the id W&B used)."""
    files = sorted(wandb_dir.glob(f"wandb/offline-run-*-{run_id}/run-{run_id}.wandb"))
    out = []
    for f in files:
        rid, rows = read_run(f)
        assert rid == run_id, (f, rid)
        out.append(rows)
    return out


def printed_ids(stdout: str) -> dict[str, str]:
    """``{program: run id}`` from the id lines; each program prints exactly one."""
    found = ID_LINE.findall(stdout)
    assert sorted(p for p, *_ in found) == ["orchestrator", "trainer"], stdout[-3000:]
    return {p: rid for p, rid, *_ in found}


def test_run_ids_are_printed_recorded_and_resumed_as_the_readme_does(tmp_path):
    out, wdir = tmp_path / "run", tmp_path / "wb"
    wdir.mkdir()
    env = {"WANDB_MODE": "offline", "WANDB_DIR": str(wdir), "WANDB_SILENT": "true"}
    project = ["--trainer.monitor.wandb.project", "prime-ckpt-test", "--orchestrator.monitor.wandb.project", "prime-ckpt-test"]

    first = rl(out, "--max-steps", "4", "--ckpt.interval", "2", *project, env=env, timeout=240)
    ids = printed_ids(first.stdout)  # no ids given: W&B made them
    assert ids["trainer"] != ids["orchestrator"]
    for program, rid, proj, mode, written in ID_LINE.findall(first.stdout):
        assert (proj, mode, Path(written)) == ("prime-ckpt-test", "offline", wandb_id_path(out, program))
        assert wandb_id_path(out, program).read_text() == f"{rid}\n"
        assert len(_runs(wdir, rid)) == 1  # the run W&B wrote has exactly the printed id

    # the README's resume: the shell reads the ids back from the files
    cmd = shlex.join([sys.executable, "-m", "examples.reverse_text.rl", *FAST, "--output-dir", str(out),
                      "--max-steps", "6", "--ckpt.interval", "2", "--ckpt.resume-step", "2", *project])
    for program in ("trainer", "orchestrator"):
        cmd += f' --{program}.monitor.wandb.id "$(cat {shlex.quote(str(wandb_id_path(out, program)))})"'
    again = run_proc(["bash", "-c", cmd], timeout=240, env=env)
    assert printed_ids(again.stdout) == ids
    for program, run_id in ids.items():
        first_rows, resumed = _runs(wdir, run_id)
        steps_first = [r["progress/step"] for r in first_rows if "progress/step" in r]
        steps_resumed = [r["progress/step"] for r in resumed if "progress/step" in r]
        assert steps_first == [1, 2, 3, 4], (program, steps_first)
        assert steps_resumed == [3, 4, 5, 6], (program, steps_resumed)  # checkpoint step 2 + 1 onwards
