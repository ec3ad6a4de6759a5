"""W&B resume (WANDB_MODE=offline): the trainer and the orchestrator each keep their run id
across a resume, and the resumed runs' first logged `progress/step` is checkpoint step + 1."""

from pathlib import Path

from tests.test_example import rl
from tests.wandb_records import read_run


def _runs(wandb_dir: Path, run_id: str) -> list[list[dict]]:
    """History rows of each offline run file of ``run_id``, oldest first."""
    files = sorted(wandb_dir.glob(f"wandb/offline-run-*-{run_id}/run-{run_id}.wandb"))
    out = []
    for f in files:
        rid, rows = read_run(f)
        assert rid == run_id, (f, rid)
        out.append(rows)
    return out


def test_resumed_runs_keep_their_ids_and_continue_at_checkpoint_plus_one(tmp_path):
    out, wdir = tmp_path / "run", tmp_path / "wb"
    wdir.mkdir()
    env = {"WANDB_MODE": "offline", "WANDB_DIR": str(wdir), "WANDB_SILENT": "true"}
    ids = ["--trainer.monitor.wandb.project", "prime-ckpt-test", "--trainer.monitor.wandb.id", "trainer-run-1",
           "--orchestrator.monitor.wandb.project", "prime-ckpt-test", "--orchestrator.monitor.wandb.id", "orch-run-1"]
    rl(out, "--max-steps", "4", "--ckpt.interval", "2", *ids, env=env, timeout=240)
    rl(out, "--max-steps", "6", "--ckpt.interval", "2", "--ckpt.resume-step", "2", *ids, env=env, timeout=240)
    for run_id in ("trainer-run-1", "orch-run-1"):
        first, resumed = _runs(wdir, run_id)
        steps_first = [r["progress/step"] for r in first if "progress/step" in r]
        steps_resumed = [r["progress/step"] for r in resumed if "progress/step" in r]
        assert steps_first == [1, 2, 3, 4], (run_id, steps_first)
        assert steps_resumed == [3, 4, 5, 6], (run_id, steps_resumed)  # checkpoint step 2 + 1 onwards
