"""Library safety of ``Checkpointer.load`` / ``save`` (issue 15, items 10-13): unused per-rank
state, strict keys and explicit partial loads, optimizer hyperparameters, one decision for every
rank, one progress on every rank, stateful dataloaders. Multi-rank cases run under torchrun
(2 CPU/gloo ranks, hard timeout); the rest on one in-process gloo rank."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from prime_ckpt.config import CheckpointConfig
from prime_ckpt.errors import CheckpointLoadError, PrimeCkptError
from prime_ckpt.trainer import Checkpointer, Progress, TrainerState, unused_saved_ranks


@pytest.fixture
def gloo1():
    """One in-process gloo rank (world size 1) for the duration of a test."""
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        yield
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def two_rank_run(tmp_path_factory):
    """``load_agreement.py`` on 2 ranks (once per module): its output, the run directory with
    step 2 saved at world size 2, and the reference values."""
    from conftest import torchrun

    tmp = tmp_path_factory.mktemp("agreement")
    # a rank left waiting inside DCP would wait for the group's 120 s timeout: the 90 s limit catches it
    res = torchrun("load_agreement.py", str(tmp / "run"), str(tmp / "ref.pt"), timeout=90, check=False)
    return res, tmp / "run", tmp / "ref.pt"


def _ok(two_rank_run):
    res = two_rank_run[0]
    assert res.returncode == 0, res.stdout[-6000:]
    return res.stdout


def _lines(stdout: str, case: str) -> list[str]:
    return [line for line in stdout.splitlines() if f": {case}: " in line and line.startswith("rank ")]


def _same_on_both_ranks(stdout: str, case: str, error: str) -> str:
    """The message both ranks printed for ``case`` (asserts: the same, of type ``error``, fast)."""
    lines = _lines(stdout, case)
    assert len(lines) == 2, stdout[-4000:]
    messages = set()
    for r in (0, 1):
        [line] = [x for x in lines if x.startswith(f"rank {r}: ")]
        head, message = line.split(" s: ", 1)
        assert head.startswith(f"rank {r}: {case}: {error} after "), line
        assert float(head.rsplit(" ", 1)[1]) < 10, line  # at once, not after a collective timeout
        messages.add(message)
    [message] = messages
    return message


# -- 12: one rank's failure reaches every rank, before DCP --------------------------------------
def test_a_load_failure_on_one_rank_raises_the_same_error_on_every_rank_at_once(two_rank_run):
    """Rank 1 alone cannot read ``.metadata`` (a stale view of shared storage): both ranks raise
    the same one-line CheckpointLoadError naming rank 1 within seconds (before: rank 1 raised,
    rank 0 blocked inside ``dcp.load`` until the group's timeout). A data read failing on rank 1
    inside DCP, a missing step and keys that differ on both ranks are named the same way; then the
    step still loads bitwise on both ranks."""
    out = _ok(two_rank_run)
    run = two_rank_run[1]
    step2 = run / "checkpoints" / "step_2" / "trainer"
    assert _same_on_both_ranks(out, "metadata", "CheckpointLoadError") == (
        f"{step2}: cannot load checkpoint step 2 (rank 1: MetadataError: {step2}/.metadata: cannot read "
        "(Stale file handle)); nothing was read"
    )
    assert _same_on_both_ranks(out, "read", "CheckpointLoadError") == (
        f"{step2}: loading checkpoint step 2 failed (rank 1: OSError: [Errno 5] Input/output error)"
    )
    assert _same_on_both_ranks(out, "missing", "IncompleteCheckpointError") == (
        f"{run / 'checkpoints' / 'step_7' / 'trainer'}: cannot load checkpoint step 7: not a complete trainer "
        "checkpoint (missing or incomplete, as rank 0 sees it)"
    )
    assert _same_on_both_ranks(out, "keys", "CheckpointLoadError") == (
        f"{step2}: cannot load checkpoint step 2 (ranks 0, 1: model/optimizer keys differ from the checkpoint: "
        "not saved: 2 model and 6 optimizer keys (app.model.weight, app.model.bias, app.optimizer.state.weight.step, ...); "
        "saved but not in the live state: 4 model and 12 optimizer keys (app.model.0.weight, app.model.0.bias, "
        "app.model.3.weight, ...); load(..., strict=False) loads the intersection); nothing was read"
    )
    for r in (0, 1):
        assert f"rank {r}: step 2 loads bitwise after the failures" in out


# -- 13a: progress must be the same on every rank -----------------------------------------------
def test_progress_differing_across_ranks_fails_the_save_on_every_rank(two_rank_run):
    """``Progress.total_tokens`` counted per rank (100 on rank 0, 101 on rank 1): the save raises
    ProgressMismatchError on both ranks with the same message, and writes nothing (before: the
    checkpoint silently kept one rank's value)."""
    out = _ok(two_rank_run)
    step3 = two_rank_run[1] / "checkpoints" / "step_3" / "trainer"
    assert _same_on_both_ranks(out, "progress", "ProgressMismatchError") == (
        f"{step3}: not saving checkpoint step 3: Progress.total_tokens differs across ranks (100 on rank 0; "
        "101 on rank 1); progress must be the same on every rank (all-reduce per-rank counts before saving); "
        "nothing was written"
    )
    assert not step3.parent.exists()


# -- 10: world size shrinks ---------------------------------------------------------------------
def test_unused_saved_ranks_rule():
    keys = [f"app.rank_state.rank_{r}.rng.torch_cpu" for r in range(4)] + ["app.model.w", "app.rank_state_x.rank_9.a"]
    assert unused_saved_ranks(keys, 1) == [1, 2, 3]
    assert unused_saved_ranks(keys, 2) == [2, 3]
    assert unused_saved_ranks(keys, 3) == [3]
    assert unused_saved_ranks(keys, 4) == []
    assert unused_saved_ranks(keys, 8) == []
    # saved ranks 0 and 2 only (rank 1 saved none): rank 1 takes saved[1 mod 2] = rank 2
    assert unused_saved_ranks(["app.rank_state.rank_0.a", "app.rank_state.rank_2.a"], 2) == []
    assert unused_saved_ranks(["app.rank_state.rank_0.a", "app.rank_state.rank_2.a"], 1) == [2]
    assert unused_saved_ranks(["app.model.w"], 1) == []
    with pytest.raises(ValueError, match="world_size must be >= 1, got 0"):
        unused_saved_ranks(keys, 0)


def _plain_build():
    """The model of ``_common.build`` without FSDP (same keys), AdamW and its LR schedule."""
    torch.manual_seed(321)
    model = torch.nn.Sequential(torch.nn.Linear(8, 33), torch.nn.ReLU(), torch.nn.Dropout(0.0), torch.nn.Linear(33, 4))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 / (1.0 + 0.1 * s))
    return model, opt, sched


class _Loader:
    """A resumable data position (the state of ``load_agreement.py``'s loader)."""

    def __init__(self, pos: int) -> None:
        self.pos, self.order = pos, torch.arange(16)

    def state_dict(self) -> dict:
        return {"pos": self.pos, "order": self.order.clone()}

    def load_state_dict(self, sd: dict) -> None:
        self.pos, self.order = int(sd["pos"]), sd["order"].clone()


class HalfStateful:
    """Has ``state_dict`` but no callable ``load_state_dict``."""

    def state_dict(self) -> dict:
        return {}

    load_state_dict = None


def _plain_state():
    model, opt, sched = _plain_build()
    loader = _Loader(pos=55)
    return TrainerState(model, opt, sched, dataloader=loader), loader


def test_world_size_shrink_names_the_dropped_rank_state(two_rank_run, gloo1, caplog):
    """Saved at 2 ranks, loaded at 1: rank 0 takes saved rank 0's RNG and dataloader state
    (bitwise) and saved rank 1's is dropped: a warning names rank 1 (before: silently);
    ``unused_rank_state="error"`` refuses the load before reading anything, ``"ignore"`` is
    silent."""
    _ok(two_rank_run)
    run, ref = two_rank_run[1], torch.load(two_rank_run[2], weights_only=True)
    trainer_dir = run / "checkpoints" / "step_2" / "trainer"
    ck = Checkpointer(run, CheckpointConfig(), enter=False)  # a reader: the fixture's run is shared
    text = (
        "the per-rank state (RNG, dataloader position) saved by rank 1 is taken by no rank at world size 1 "
        "(rule: rank r takes saved rank r if saved, else saved rank r mod N)"
    )

    state, loader = _plain_state()
    before = {k: v.clone() for k, v in state.model.state_dict().items()}
    with pytest.raises(CheckpointLoadError) as err:
        ck.load(2, state, unused_rank_state="error")
    assert str(err.value) == (
        f"{trainer_dir}: cannot load checkpoint step 2 (rank 0: {text}; load(..., unused_rank_state='warn' or "
        "'ignore') drops it); nothing was read"
    )
    assert all(torch.equal(state.model.state_dict()[k], v) for k, v in before.items())  # nothing was read
    assert loader.pos == 55

    caplog.set_level(logging.WARNING, logger="prime_ckpt.trainer")
    ck.load(2, state)
    assert [r.getMessage() for r in caplog.records] == [f"{trainer_dir}: {text} and is dropped"]
    got = _snapshot(state.model, state.optimizers[0])
    assert got.keys() == ref["tensors"].keys() and all(torch.equal(got[k], v) for k, v in ref["tensors"].items())
    assert torch.equal(torch.get_rng_state(), ref["rank_state"][0]["rng"])
    assert loader.pos == ref["rank_state"][0]["loader"]["pos"] == 3
    assert torch.equal(loader.order, ref["rank_state"][0]["loader"]["order"])

    caplog.clear()
    state, loader = _plain_state()
    ck.load(2, state, unused_rank_state="ignore")
    assert caplog.records == [] and loader.pos == 3
    with pytest.raises(ValueError, match=r"unused_rank_state must be one of 'warn', 'error', 'ignore', got 'drop'"):
        ck.load(2, state, unused_rank_state="drop")
    ck.close()


# -- 11: model keys drift -----------------------------------------------------------------------
def _mlp(n_layers: int, seed: int):
    torch.manual_seed(seed)
    model = torch.nn.Sequential(*[torch.nn.Linear(4, 4) for _ in range(n_layers)])
    opt = torch.optim.AdamW(model.parameters(), lr=0.1)
    return model, opt


def _train(model, opt, steps: int = 2, sched=None) -> None:
    for _ in range(steps):
        model(torch.randn(3, 4)).sum().backward()
        opt.step()
        opt.zero_grad()
        if sched is not None:
            sched.step()


def _snapshot(model, opt) -> dict[str, torch.Tensor]:
    names = {id(p): n for n, p in model.named_parameters()}
    out = {f"model.{k}": v.detach().clone() for k, v in model.state_dict().items()}
    for p, st in opt.state.items():
        out.update({f"optim.{names[id(p)]}.{k}": v.clone() for k, v in st.items()})
    return out


@pytest.fixture
def saved_2_layers(tmp_path, gloo1):
    """Step 1 of a 2-layer MLP + AdamW saved under tmp_path; yields (checkpointer, saved tensors)."""
    model, opt = _mlp(2, seed=0)
    _train(model, opt)
    ck = Checkpointer(tmp_path, CheckpointConfig(interval=1))
    ck.save(1, TrainerState(model, opt, progress=Progress(1, 3, 30)))
    ck.flush()
    yield ck, _snapshot(model, opt)
    ck.close()


def _step1(tmp_path) -> Path:
    return tmp_path / "checkpoints" / "step_1" / "trainer"


def test_strict_load_refuses_a_model_lacking_a_saved_module(tmp_path, saved_2_layers):
    """Live model with 1 of the 2 saved layers: CheckpointLoadError (one line: path, step,
    counts, first keys), nothing read (before: it returned normally, silently ignoring layer 1's
    weights and optimizer state)."""
    ck, _ = saved_2_layers
    model, opt = _mlp(1, seed=5)
    _train(model, opt, 1)
    before = _snapshot(model, opt)
    with pytest.raises(CheckpointLoadError) as err:
        ck.load(1, TrainerState(model, opt))
    assert str(err.value) == (
        f"{_step1(tmp_path)}: cannot load checkpoint step 1 (rank 0: model/optimizer keys differ from the checkpoint: "
        "not saved: 0 model and 0 optimizer keys; saved but not in the live state: 2 model and 6 optimizer keys "
        "(app.model.1.weight, app.model.1.bias, app.optimizer.state.1.weight.step, ...); "
        "load(..., strict=False) loads the intersection); nothing was read"
    )
    assert err.value.step == 1 and list(err.value.failures) == [0]
    assert isinstance(err.value, Exception) and isinstance(err.value, PrimeCkptError)
    after = _snapshot(model, opt)
    assert all(torch.equal(after[k], v) for k, v in before.items())


def test_strict_load_refuses_a_model_with_an_extra_module(tmp_path, saved_2_layers):
    """Live model with a third layer: one-line CheckpointLoadError (before: DCP's raw
    2,000-character CheckpointException, a BaseException)."""
    ck, _ = saved_2_layers
    model, opt = _mlp(3, seed=5)
    with pytest.raises(CheckpointLoadError) as err:
        ck.load(1, TrainerState(model, opt))
    assert str(err.value) == (
        f"{_step1(tmp_path)}: cannot load checkpoint step 1 (rank 0: model/optimizer keys differ from the checkpoint: "
        "not saved: 2 model and 6 optimizer keys (app.model.2.weight, app.model.2.bias, app.optimizer.state.2.weight.step, ...); "
        "saved but not in the live state: 0 model and 0 optimizer keys; load(..., strict=False) loads the intersection); "
        "nothing was read"
    )


def test_non_strict_load_loads_the_intersection_and_says_what_it_skipped(tmp_path, saved_2_layers, caplog):
    """``strict=False``: layers 0-1 and their optimizer state load bitwise, the extra layer 2 keeps
    its values bitwise, and one warning lists what was skipped; loading into a 1-layer model
    loads layer 0 and names the saved layer 1 as not loaded."""
    ck, saved = saved_2_layers
    model, opt = _mlp(3, seed=5)
    _train(model, opt, 1)
    before = _snapshot(model, opt)
    caplog.set_level(logging.WARNING, logger="prime_ckpt.trainer")
    state = TrainerState(model, opt)
    ck.load(1, state, strict=False)
    got = _snapshot(model, opt)
    assert all(torch.equal(got[k], v) for k, v in saved.items())
    extra = [k for k in got if k not in saved]
    assert len(extra) == 8 and all(torch.equal(got[k], before[k]) for k in extra), extra
    assert state.progress == Progress(1, 3, 30)
    assert [r.getMessage() for r in caplog.records] == [
        f"{_step1(tmp_path)}: partial load of step 1 (strict=False): not saved, keep their current values: 2 model and "
        "6 optimizer keys (app.model.2.weight, app.model.2.bias, app.optimizer.state.2.weight.step, "
        "app.optimizer.state.2.weight.exp_avg, app.optimizer.state.2.weight.exp_avg_sq, app.optimizer.state.2.bias.step, "
        "app.optimizer.state.2.bias.exp_avg, app.optimizer.state.2.bias.exp_avg_sq); saved but not in the live state, "
        "not loaded: 0 model and 0 optimizer keys"
    ]

    caplog.clear()
    model, opt = _mlp(1, seed=5)
    ck.load(1, TrainerState(model, opt), strict=False)
    got = _snapshot(model, opt)
    assert got.keys() == {k for k in saved if not k.startswith(("model.1.", "optim.1."))}
    assert all(torch.equal(v, saved[k]) for k, v in got.items())
    [message] = [r.getMessage() for r in caplog.records]
    assert message.endswith(
        "saved but not in the live state, not loaded: 2 model and 6 optimizer keys (app.model.1.weight, app.model.1.bias, "
        "app.optimizer.state.1.weight.step, app.optimizer.state.1.weight.exp_avg, app.optimizer.state.1.weight.exp_avg_sq, "
        "app.optimizer.state.1.bias.step, app.optimizer.state.1.bias.exp_avg, app.optimizer.state.1.bias.exp_avg_sq)"
    ), message


def test_a_live_hyperparameter_the_checkpoint_lacks_keeps_its_value(saved_2_layers):
    """A param-group hyperparameter the live optimizer has and the checkpoint lacks is not a
    mismatch: the load succeeds (strict) and it keeps its live value (before: DCP raised)."""
    ck, saved = saved_2_layers
    model, opt = _mlp(2, seed=5)
    opt.param_groups[0]["my_hparam"] = 7
    ck.load(1, TrainerState(model, opt))
    assert opt.param_groups[0]["my_hparam"] == 7
    got = _snapshot(model, opt)
    assert all(torch.equal(got[k], v) for k, v in saved.items())


def test_a_scheduler_new_in_the_trainer_state_loads_with_strict_false(tmp_path, saved_2_layers, caplog):
    """A checkpoint saved without an LR scheduler, loaded into a state that has one (a new thing
    in the trainer state): strict names the scheduler entries in one line before reading
    anything; strict=False loads model and optimizer bitwise and the scheduler keeps its current
    state, with one warning (before: DCP's 'Missing key in checkpoint state_dict' either way)."""
    ck, saved = saved_2_layers
    model, opt = _mlp(2, seed=5)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    _train(model, opt, 1, sched)
    before, sched_before = _snapshot(model, opt), sched.state_dict()
    with pytest.raises(CheckpointLoadError) as err:
        ck.load(1, TrainerState(model, opt, sched))
    message = str(err.value)
    assert "\n" not in message and "trainer state entries not in the checkpoint: app.scheduler." in message, message
    assert message.endswith("load(..., strict=False) keeps their current values); nothing was read"), message
    assert all(torch.equal(v, before[k]) for k, v in _snapshot(model, opt).items())

    caplog.set_level(logging.WARNING, logger="prime_ckpt.trainer")
    state = TrainerState(model, opt, sched)
    ck.load(1, state, strict=False)
    got = _snapshot(model, opt)
    assert got.keys() == saved.keys() and all(torch.equal(got[k], v) for k, v in saved.items())
    assert sched.state_dict() == sched_before and state.progress == Progress(1, 3, 30)
    [warning] = [r.getMessage() for r in caplog.records]
    assert "partial load of step 1 (strict=False): trainer state entries not in the checkpoint: app.scheduler." in warning
    assert warning.endswith("keep their current values"), warning


# -- 13b: initial_lr ----------------------------------------------------------------------------
def test_initial_lr_is_restored_so_a_scheduler_can_be_built_after_load(tmp_path, gloo1):
    """Saved with an LR scheduler built before the save (it sets ``initial_lr``), loaded into a
    fresh optimizer with no scheduler yet: ``initial_lr`` and ``lr`` come back, so
    ``LambdaLR(opt, f, last_epoch=step)`` builds (before: ``KeyError: 'initial_lr'``) and sets
    exactly the lr the original schedule reaches at the next step."""
    def f(s):
        return 1.0 / (1.0 + 0.5 * s)

    model, opt = _mlp(2, seed=0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, f)
    _train(model, opt, 3, sched)
    saved_lr, saved_initial = opt.param_groups[0]["lr"], opt.param_groups[0]["initial_lr"]
    assert (saved_lr, saved_initial) == (0.1 * f(3), 0.1)
    ck = Checkpointer(tmp_path, CheckpointConfig(interval=1))
    ck.save(3, TrainerState(model, opt, sched, Progress(step=3)))
    ck.close()
    sched.step()  # the original schedule, one step on

    model2, opt2 = _mlp(2, seed=5)
    opt2.param_groups[0]["lr"] = 0.5
    assert "initial_lr" not in opt2.param_groups[0]
    Checkpointer(tmp_path, CheckpointConfig(resume_step=3)).load(3, TrainerState(model2, opt2))
    assert opt2.param_groups[0]["lr"] == saved_lr and opt2.param_groups[0]["initial_lr"] == saved_initial
    sched2 = torch.optim.lr_scheduler.LambdaLR(opt2, f, last_epoch=3)
    assert sched2.base_lrs == [saved_initial]
    assert opt2.param_groups[0]["lr"] == opt.param_groups[0]["lr"] == 0.1 * f(4)


# -- 13c: stateful dataloader and scheduler -----------------------------------------------------
def test_a_dataloader_or_scheduler_without_state_dict_is_refused_at_construction():
    """A plain ``torch.utils.data.DataLoader`` is refused by ``TrainerState`` with one line saying
    what is needed (before: accepted, then an AttributeError at the first save)."""
    model, opt = _mlp(1, seed=0)
    with pytest.raises(TypeError) as err:
        TrainerState(model, opt, dataloader=torch.utils.data.DataLoader(list(range(4))))
    assert str(err.value) == (
        "TrainerState(dataloader=...): torch.utils.data.dataloader.DataLoader has no state_dict() or load_state_dict(), "
        "so its state cannot be checkpointed; pass torchdata's StatefulDataLoader, any object with state_dict() and "
        "load_state_dict(), or None"
    )

    with pytest.raises(TypeError) as err:
        TrainerState(model, opt, scheduler=HalfStateful())
    assert str(err.value) == (
        "TrainerState(scheduler=...): test_trainer_load.HalfStateful has no load_state_dict(), so its state cannot be "
        "checkpointed; pass a torch.optim.lr_scheduler scheduler, any object with state_dict() and load_state_dict(), "
        "or None"
    )
    TrainerState(model, opt, torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0), dataloader=None)  # accepted


def test_a_load_reads_metadata_once_and_plans_without_an_exchange(tmp_path, saved_2_layers, monkeypatch):
    """Each rank plans its own read (``dcp.load(no_dist=True)``) with the ``.metadata`` it read
    for the key check: the reader never reads ``.metadata`` again, and the values come back
    bitwise (before: DCP's coordinator read it a second time and gathered every rank's plan)."""
    import torch.distributed.checkpoint as dcp

    import prime_ckpt.dcp_io
    import prime_ckpt.restore

    ck, saved = saved_2_layers
    reads: list[str] = []
    real_read = prime_ckpt.restore.read_dcp_metadata

    def counting(path, **kw):
        reads.append(str(path))
        return real_read(path, **kw)

    monkeypatch.setattr(prime_ckpt.restore, "read_dcp_metadata", counting)
    monkeypatch.setattr(prime_ckpt.dcp_io, "read_dcp_metadata", counting)
    no_dist: list[bool] = []
    real_load = dcp.load
    monkeypatch.setattr(dcp, "load", lambda *a, **kw: (no_dist.append(kw.get("no_dist", False)), real_load(*a, **kw))[1])
    model, opt = _mlp(2, seed=7)
    ck.load(1, TrainerState(model, opt))
    assert reads == [str(_step1(tmp_path))] and no_dist == [True]
    got = _snapshot(model, opt)
    assert got.keys() == saved.keys() and all(torch.equal(got[k], v) for k, v in saved.items())
