"""Loading a trainer checkpoint into a live :class:`~prime_ckpt.state.TrainerState`: rank 0's
completeness decision, each rank's preparation (``.metadata``, key comparison, which saved rank's
per-rank state it takes), the agreement of all ranks before ``dcp.load``, and the load errors."""

from __future__ import annotations

import logging
import warnings
from dataclasses import dataclass
from typing import Any

import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint._nested_dict import flatten_state_dict
from torch.distributed.checkpoint._traverse import set_element

from prime_ckpt.dcp_io import SafeLoadPlanner, dcp_reader
from prime_ckpt.dcp_metadata import read_dcp_metadata
from prime_ckpt.errors import CheckpointLoadError, IncompleteCheckpointError
from prime_ckpt.layout import trainer_part_complete
from prime_ckpt.saving import rank_failures
from prime_ckpt.state import (
    APP_KEY,
    TrainerState,
    _present_only,
    current_rank,
    current_world_size,
    rank0_decision,
    ranks_by_value,
    ranks_text,
    source_rank_key,
    unused_saved_ranks,
)
from prime_ckpt.storage import AnyPath, one_line

# the trainer's logger: what users filter on and tests capture
logger = logging.getLogger("prime_ckpt.trainer")


def check_unused_rank_state(value: str) -> None:
    """Raise ``ValueError`` unless ``value`` is one of :data:`UNUSED_RANK_STATE`."""
    if value not in UNUSED_RANK_STATE:
        raise ValueError(f"unused_rank_state must be one of {', '.join(map(repr, UNUSED_RANK_STATE))}, got {value!r}")


def load_checkpoint(
    trainer_dir: AnyPath, step: int, state: TrainerState, group: Any, *, strict: bool, unused_rank_state: str
) -> None:
    """Load checkpoint ``step`` from ``trainer_dir`` into ``state`` in place on the checkpoint
    ``group`` (None: not distributed); what :meth:`prime_ckpt.checkpointer.Checkpointer.load` does,
    with its arguments, rules and errors (see there)."""
    check_complete(step, trainer_dir, group)
    prep: _LoadPrep | None = None
    failure: str | None = None
    cause: Exception | None = None
    try:
        sd = {APP_KEY: state.state_dict()}
        prep = prepare_load(step, trainer_dir, sd, state, strict=strict, unused_rank_state=unused_rank_state)
    except Exception as e:  # exchanged below, then raised on every rank
        failure, cause = load_reason(e), e
    agree(step, trainer_dir, failure, cause, group)
    assert prep is not None
    # Each rank plans and reads on its own (``no_dist``): the ranks already agree on the step and
    # hold its ``.metadata`` (read once, in the preparation, and handed to the reader), so DCP's
    # metadata broadcast and its gather/scatter of ~700 pickled read items per rank add nothing
    # but time (~0.14 s of a 0.8 s load of 1 GiB on 2 ranks, benchmarks/). One exchange of the
    # outcome afterwards keeps the rule that a read failing on one rank raises on every rank.
    reader = dcp_reader(trainer_dir)
    reader.preloaded_metadata = prep.metadata
    failure, cause = None, None
    try:
        with warnings.catch_warnings():  # DCP warns that no_dist means one process: intended
            warnings.filterwarnings("ignore", message=".*assuming the intent is to load in a single process")
            dcp.load(prep.request, storage_reader=reader, planner=SafeLoadPlanner(), no_dist=True)
    except BaseException as e:  # DCP's CheckpointException is a BaseException
        if isinstance(e, (KeyboardInterrupt, SystemExit)):
            raise
        failure, cause = next(iter(rank_failures(e).values()), one_line(e)), e
    failures = gather_failures(failure, group)
    if failures:
        raise load_error(step, trainer_dir, failures) from cause
    for key, path in prep.paths.items():  # tensors were read in place; plain values come back here
        set_element(sd, path, prep.request[key])
    own_key, src_key = prep.own_key, prep.src_key
    loaded_rank_state = sd[APP_KEY]["rank_state"]
    sd[APP_KEY]["rank_state"] = {own_key: loaded_rank_state[src_key]} if src_key is not None else {}
    state.remapped_rank_state = src_key is not None and src_key != own_key
    state.load_state_dict(sd[APP_KEY])


def check_complete(step: int, trainer_dir: AnyPath, group: Any) -> None:
    """Rank 0 decides whether ``trainer_dir`` is a complete checkpoint and broadcasts it on
    the checkpoint group; every rank raises the same error if it is not."""
    def decide() -> tuple[str, str | None]:
        try:
            return ("ok", None) if trainer_part_complete(trainer_dir) else ("incomplete", None)
        except Exception as e:  # a storage error while checking: raised on every rank below
            return ("error", one_line(e))

    status, reason = rank0_decision(group, decide)
    if status == "incomplete":
        raise IncompleteCheckpointError(
            f"{trainer_dir}: cannot load checkpoint step {step}: not a complete trainer checkpoint "
            "(missing or incomplete, as rank 0 sees it)",
            step=step, path=trainer_dir, failures={0: "not a complete trainer checkpoint"},
        )
    if status == "error":
        raise CheckpointLoadError(
            f"{trainer_dir}: cannot load checkpoint step {step} (rank 0: {reason})", step=step, path=trainer_dir, failures={0: reason}
        )


def agree(step: int, trainer_dir: AnyPath, failure: str | None, cause: Exception | None, group: Any) -> None:
    """Exchange this rank's preparation outcome (``failure``: None or a one-line reason) with
    one ``all_gather_object`` on the checkpoint group; if any rank failed, raise the same
    :class:`CheckpointLoadError` on every rank (chained to this rank's own error, if any).
    The path named is rank 0's."""
    gathered = _all_gather((str(trainer_dir), failure), group)
    failures = {r: f for r, (_, f) in enumerate(gathered) if f is not None}
    if not failures:
        return
    detail = "; ".join(f"{ranks_text(rs)}: {f}" for f, rs in ranks_by_value(failures).items())
    path0 = gathered[0][0]
    raise CheckpointLoadError(
        f"{path0}: cannot load checkpoint step {step} ({detail}); nothing was read",
        step=step, path=path0, failures=failures,
    ) from cause


def _all_gather(value: Any, group: Any) -> list[Any]:
    """Every rank's ``value`` (one ``all_gather_object`` on the checkpoint ``group``; ``[value]``
    when not distributed)."""
    if group is None:
        return [value]
    gathered: list[Any] = [None] * dist.get_world_size(group)
    dist.all_gather_object(gathered, value, group=group)
    return gathered


def gather_failures(failure: str | None, group: Any) -> dict[int, str]:
    """``{rank: one line}`` of every rank whose ``failure`` is not None (collective on ``group``)."""
    return {r: f for r, f in enumerate(_all_gather(failure, group)) if f is not None}


def prepare_load(
    step: int, trainer_dir: AnyPath, sd: dict[str, Any], state: TrainerState, *, strict: bool, unused_rank_state: str
) -> _LoadPrep:
    """This rank's part of a load, before any collective: read ``.metadata``, choose the
    per-rank state, compare keys, and build the flat request ``dcp.load`` reads into (see
    :meth:`prime_ckpt.checkpointer.Checkpointer.load` for the rules). Raises :class:`CheckpointLoadError` (without path and
    step: :func:`agree` adds them) or whatever reading ``.metadata`` raised."""
    metadata = read_dcp_metadata(trainer_dir, torch_free=False)
    saved = metadata.state_dict_metadata
    rank, world = current_rank(), current_world_size()
    unused = unused_saved_ranks(saved.keys(), world)
    if unused and unused_rank_state != "ignore":
        text = (
            f"the per-rank state (RNG, dataloader position) saved by rank{'s' if len(unused) > 1 else ''} "
            f"{', '.join(map(str, unused))} is taken by no rank at world size {world} "
            "(rule: rank r takes saved rank r if saved, else saved rank r mod N)"
        )
        if unused_rank_state == "error":
            raise CheckpointLoadError(f"{text}; load(..., unused_rank_state='warn' or 'ignore') drops it")
        if rank == 0:
            logger.warning("%s: %s and is dropped", trainer_dir, text)
    own_key = state.rank_key
    src_key = source_rank_key(saved.keys(), rank)
    if src_key is None:
        logger.warning(
            "%s holds no per-rank state: RNG and dataloader position of rank %d start fresh",
            trainer_dir, rank,
        )
        sd[APP_KEY]["rank_state"] = {}
    else:
        if src_key != own_key:
            logger.warning(
                "%s was saved at another world size: rank %d takes the RNG and dataloader state "
                "of saved %s (rule: rank r takes saved rank r mod N)",
                trainer_dir, rank, src_key,
            )
        # Load only the per-rank entries that were saved (e.g. no CUDA RNG from a CPU run).
        template = _present_only(sd[APP_KEY]["rank_state"][own_key], f"{APP_KEY}.rank_state.{src_key}", saved)
        sd[APP_KEY]["rank_state"] = {src_key: template}

    flat, mapping = flatten_state_dict(sd)  # DCP's own flattening: the keys of .metadata
    live_groups: dict[str, tuple] = {}  # param group id -> its path in sd
    for key in flat:
        if (pg := _param_group_entry(key)) is not None:
            live_groups.setdefault(pg[0], mapping[key][:-1])
    saved_groups = {pg[0] for key in saved if (pg := _param_group_entry(key)) is not None}
    request: dict[str, Any] = {}
    paths: dict[str, tuple] = {}
    missing: list[str] = []
    unexpected: list[str] = []
    live_hparams: list[str] = []
    not_saved: list[str] = []  # outside model/optimizer: scheduler, dataloader ... new in the state
    for key, value in flat.items():
        if key in saved:
            request[key], paths[key] = value, mapping[key]
        elif not key.startswith(_STRICT_PREFIXES):
            not_saved.append(key)
        elif (pg := _param_group_entry(key)) is not None and pg[0] in saved_groups:
            live_hparams.append(key)  # keeps its live value
        else:
            missing.append(key)
    for key in saved:
        if key in flat or not key.startswith(_STRICT_PREFIXES):
            continue
        if (pg := _param_group_entry(key)) is not None and pg[0] in live_groups:
            request[key], paths[key] = None, (*live_groups[pg[0]], pg[1])  # e.g. initial_lr
        else:
            unexpected.append(key)
    if live_hparams:
        logger.debug("%s: optimizer hyperparameters not in the checkpoint keep their live values: %s", trainer_dir, ", ".join(live_hparams))
    if missing or unexpected:
        if strict:
            raise CheckpointLoadError(
                f"model/optimizer keys differ from the checkpoint: not saved: {_keys_text(missing, 3)}; "
                f"saved but not in the live state: {_keys_text(unexpected, 3)}; "
                "load(..., strict=False) loads the intersection"
            )
        logger.warning(
            "%s: partial load of step %d (strict=False): not saved, keep their current values: %s; "
            "saved but not in the live state, not loaded: %s",
            trainer_dir, step, _keys_text(missing, 20), _keys_text(unexpected, 20),
        )
    if not_saved:
        text = f"trainer state entries not in the checkpoint: {', '.join(not_saved[:20 if not strict else 3])}"
        text += ", ..." if len(not_saved) > (3 if strict else 20) else ""
        if strict:
            raise CheckpointLoadError(f"{text}; load(..., strict=False) keeps their current values")
        logger.warning("%s: partial load of step %d (strict=False): %s keep their current values", trainer_dir, step, text)
    return _LoadPrep(request, paths, own_key, src_key, metadata)



#: the values of ``Checkpointer.load(unused_rank_state=...)``
UNUSED_RANK_STATE = ("warn", "error", "ignore")
#: the parts of the state whose keys a strict load compares with the checkpoint's
_STRICT_PREFIXES = (f"{APP_KEY}.model.", f"{APP_KEY}.optimizer.")
_PARAM_GROUPS_PREFIX = f"{APP_KEY}.optimizer.param_groups."


@dataclass
class _LoadPrep:
    """One rank's prepared load: the flat ``dcp.load`` request, where each loaded value goes in
    the nested state dict, and the own / source per-rank state keys."""

    request: dict[str, Any]
    paths: dict[str, tuple]
    own_key: str
    src_key: str | None
    metadata: Any = None  # torch's Metadata of the step, read once, handed to the reader


def _param_group_entry(key: str) -> tuple[str, str] | None:
    """``(group, hyperparameter)`` of an ``app.optimizer.param_groups.<group>.<name>`` key
    (``<group>`` is DCP's list index; ``None`` for other keys and for ``params``, the group's
    member list, which is structure, not a hyperparameter)."""
    if not key.startswith(_PARAM_GROUPS_PREFIX):
        return None
    group, _, name = key[len(_PARAM_GROUPS_PREFIX):].rpartition(".")
    return (group, name) if group and name and name != "params" else None


def _keys_text(keys: list[str], n: int) -> str:
    """``"2 model and 6 optimizer keys (app.model.a, ..., ...)"`` listing the first ``n``."""
    n_model = sum(k.startswith(_STRICT_PREFIXES[0]) for k in keys)
    text = f"{n_model} model and {len(keys) - n_model} optimizer keys"
    if keys:
        text += f" ({', '.join(keys[:n])}{', ...' if len(keys) > n else ''})"
    return text


def _truncated(text: str, limit: int = 500) -> str:
    return text if len(text) <= limit else text[: limit - 3] + "..."


def load_reason(e: BaseException) -> str:
    """One line naming why a rank could not prepare a load (our own errors without their type)."""
    return _truncated(" ".join(str(e).split()) if isinstance(e, CheckpointLoadError) else one_line(e))


def load_error(step: int, path: AnyPath, failures: dict[int, str]) -> CheckpointLoadError:
    """A one-line :class:`CheckpointLoadError` for a failed read: ``failures`` is ``{rank: one
    line}`` of every rank whose read failed (:func:`gather_failures`); the first one is named."""
    first = min(failures)
    more = f"; {len(failures) - 1} more rank(s) failed" if len(failures) > 1 else ""
    return CheckpointLoadError(
        f"{path}: loading checkpoint step {step} failed (rank {first}: {_truncated(failures[first])}{more})",
        step=step, path=path, failures=failures,
    )
