"""Retention: a pure planner (inventory + policy -> keep/delete with reasons) and its executor.

The planner does no I/O: it takes the inventory that :func:`prime_ckpt.layout.scan_inventory`
read and returns a :class:`Plan`. The executor (:func:`apply_plan`) deletes and decides nothing;
the trainer runs it on rank 0's background thread after each committed save.

Rules (every one that applies is recorded as a reason on the entry):

Every step directory:
  * one that is not this project's (:func:`prime_ckpt.layout.foreign_reason`: another tool's
    checkpoint saved as ``step_<N>``, unknown files inside) is kept, whatever the policy;
  * ``keep=None`` keeps everything, checkpoints and weights: "no keep" means nothing is deleted,
    in the trainer (no ``--ckpt.keep``) and in ``prime-ckpt prune`` alike.

Checkpoints (``checkpoints/step_<N>``):
  * never touch a step that is in flight (being saved);
  * always keep the newest complete step, and the newest *resumable* one (complete, with the
    weights ``[x - k, x]`` it needs complete: :func:`prime_ckpt.layout.missing_weights`), even
    when a newer complete step lacks its weights;
  * keep the ``keep`` newest complete steps;
  * keep multiples of ``keep_interval``;
  * a step newer than ``current_step`` belongs to another run (a reused directory): it is kept,
    and it neither counts towards ``keep`` nor is it "the newest" — so a fresh run never deletes
    the checkpoint it just wrote;
  * an incomplete step older than the newest complete one and not in flight is abandoned:
    deleted with reason ``incomplete``; a newer incomplete step may still be being written: kept.

Weights (``weights/step_<N>``), the seed's rule: resuming at checkpoint step ``x`` with async
level ``k`` needs the weights of steps ``[x - k, x]``:
  * keep ``[x - k, x]`` for every checkpoint step ``x`` that the plan keeps;
  * keep the live window ``[current_step - k, current_step]`` (the orchestrator is using it);
  * keep everything at or after the consumer's last acknowledged step (not yet loaded / in use);
  * keep multiples of ``weights_interval`` (e.g. evaluation steps);
  * keep steps newer than ``current_step`` (another run's); delete the rest.

User rules (:data:`RetentionRule`, ``RetentionPolicy.rules``; ``prime-ckpt plan/prune --rule
MODULE:NAME``) add reasons to keep complete steps of this run, under the guards above (they
cannot delete, and cannot keep what the guards decide); a checkpoint a rule keeps pins its
weights window like any kept checkpoint.

Names that are not ``step_<int>`` never reach the inventory, so never appear in a plan.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Literal

from prime_ckpt.errors import PrimeCkptError
from prime_ckpt.layout import Inventory, detect_parts, missing_weights
from prime_ckpt.storage import AnyPath, remove_tree

logger = logging.getLogger(__name__)

Kind = Literal["checkpoint", "weights"]
Action = Literal["keep", "delete"]

# Reason strings (stable: they appear in `prime-ckpt plan --json`).
IN_FLIGHT = "in flight"
NEWEST_COMPLETE = "newest complete"
NEWEST_RESUMABLE = "newest resumable (its weights window is complete)"
KEEP_ALL = "keep=None keeps all"
AHEAD_OF_CURRENT = "newer than current step (another run's)"
INCOMPLETE = "incomplete"
INCOMPLETE_MAYBE_WRITING = "incomplete but newer than the newest complete step (may still be written)"
LIVE_WINDOW = "live async window"
CONSUMER = "at or after the consumer's last acknowledged step"
NOT_PINNED = "not pinned by any kept checkpoint or window"


def _foreign(why: str) -> str:
    return f"not this project's layout ({why}): never deleted"


def _keep_latest(k: int) -> str:
    return f"among the {k} newest complete"


def _keep_interval(n: int) -> str:
    return f"multiple of keep_interval={n}"


def _weights_interval(n: int) -> str:
    return f"multiple of weights_interval={n}"


def _pinned_by(x: int, k: int) -> str:
    return f"pinned by checkpoint step {x} (needs weights [{x - k}, {x}])"


def _older_than_keep(k: int) -> str:
    return f"older than the {k} newest complete"


class RetentionConfigError(PrimeCkptError, ValueError):
    """A retention policy that is invalid or could delete what resuming needs."""


@dataclass(frozen=True)
class StepView:
    """What a retention rule sees of one step directory (pure data, no I/O).

    Attributes:
        kind: ``"checkpoint"`` or ``"weights"``.
        step: the step (int).
        complete: every part the run writes is complete (checkpoints; weights: ``COMPLETE``).
        current_step: the step the plan is made at (the trainer's current step).
        async_level: k of the seed's rule (checkpoint step x needs weights ``[x - k, x]``).
    """

    kind: Kind
    step: int
    complete: bool
    current_step: int
    async_level: int


#: A user-provided retention rule: a callable given a :class:`StepView` that returns a reason to
#: keep the step (a short text, shown in ``plan`` like the built-in reasons) or ``None``. Rules
#: only keep, never delete; they see only complete steps that are this project's and not
#: newer than the current step (the safety guards decide the rest: in-flight, foreign,
#: incomplete, newest complete). A checkpoint a rule keeps pins its weights ``[x - k, x]``.
#: Examples: keep the best eval step, keep the steps an evaluation job has not finished.
RetentionRule = Callable[[StepView], "str | None"]


@dataclass(frozen=True)
class RetentionPolicy:
    """What to keep.

    Attributes:
        keep: keep the K newest complete checkpoint steps (K >= 1); None keeps every checkpoint
            and every weights step (nothing is deleted).
        keep_interval: also keep checkpoint steps that are multiples of N (N >= 1); None: off.
        async_level: k >= 0; checkpoint step x pins weights [x - k, x] (the seed's rule).
        weights_interval: also keep weights steps that are multiples of N; None: keep only what
            is pinned.
        consumer_step: the last weights step the consumer (orchestrator / inference) acknowledged
            loading; steps >= it are kept. None: unknown.
        parts: the parts a checkpoint step must have to count as complete; None (the default,
            as everywhere ``parts`` is taken): the parts the run writes, judged from the
            inventory (:func:`prime_ckpt.layout.detect_parts`).
        rules: user-provided :data:`RetentionRule` s, each may add a reason to keep a step
            (``keep=None`` keeps everything anyway).

    Raises:
        RetentionConfigError: ``keep < 1``, ``keep_interval < 1``, ``async_level < 0``,
            ``weights_interval < 1``.
    """

    keep: int | None = None
    keep_interval: int | None = None
    async_level: int = 0
    weights_interval: int | None = None
    consumer_step: int | None = None
    parts: tuple[str, ...] | None = None
    rules: tuple[RetentionRule, ...] = ()

    def __post_init__(self) -> None:
        if self.keep is not None and self.keep < 1:
            raise RetentionConfigError(f"keep must be >= 1 (or None to keep all), got {self.keep}")
        if self.keep_interval is not None and self.keep_interval < 1:
            raise RetentionConfigError(f"keep_interval must be >= 1, got {self.keep_interval}")
        if self.async_level < 0:
            raise RetentionConfigError(f"async_level must be >= 0, got {self.async_level}")
        if self.weights_interval is not None and self.weights_interval < 1:
            raise RetentionConfigError(f"weights_interval must be >= 1, got {self.weights_interval}")


@dataclass(frozen=True)
class PlanEntry:
    """One step directory and what the plan does with it.

    ``path`` is the step directory, ``kind`` ``"checkpoint"`` or ``"weights"``, ``step`` the
    integer step, ``action`` ``"keep"`` or ``"delete"``, ``reasons`` every rule that applied.
    """

    path: AnyPath
    kind: Kind
    step: int
    action: Action
    reasons: tuple[str, ...]

    def to_json(self) -> dict:
        return {"path": str(self.path), "kind": self.kind, "step": self.step, "action": self.action, "reasons": list(self.reasons)}


@dataclass(frozen=True)
class Plan:
    """A retention plan: entries ordered by (kind, step)."""

    entries: tuple[PlanEntry, ...] = field(default_factory=tuple)

    @property
    def deletes(self) -> tuple[PlanEntry, ...]:
        return tuple(e for e in self.entries if e.action == "delete")

    @property
    def keeps(self) -> tuple[PlanEntry, ...]:
        return tuple(e for e in self.entries if e.action == "keep")

    def action_for(self, kind: Kind, step: int) -> Action | None:
        for e in self.entries:
            if e.kind == kind and e.step == step:
                return e.action
        return None


def plan(
    inventory: Inventory,
    policy: RetentionPolicy,
    *,
    current_step: int | None = None,
    in_flight: Iterable[int] = (),
) -> Plan:
    """Decide keep/delete for every step directory in ``inventory`` (pure; no I/O).

    Args:
        inventory: the checkpoint and weights step directories on disk.
        policy: the retention policy.
        current_step: the trainer's current step; steps above it belong to another run and are
            kept. None: the highest step in the inventory (everything counts).
        in_flight: checkpoint steps being saved right now (never touched).

    Returns:
        A :class:`Plan`, independent of the inventory's order.
    """
    in_flight_set = set(in_flight)
    ckpts = sorted(inventory.checkpoints, key=lambda c: c.step)
    weights = sorted(inventory.weights, key=lambda w: w.step)
    if current_step is None:
        all_steps = [c.step for c in ckpts] + [w.step for w in weights] + list(in_flight_set)
        current_step = max(all_steps) if all_steps else 0
    k = policy.async_level
    parts = detect_parts(ckpts) if policy.parts is None else policy.parts

    def complete(c) -> bool:
        return c.complete(parts) and c.step not in in_flight_set

    ours = [c for c in ckpts if c.step <= current_step and c.foreign is None]
    complete_steps = sorted((c.step for c in ours if complete(c)), reverse=True)
    newest_complete = complete_steps[0] if complete_steps else None
    latest_k = set(complete_steps if policy.keep is None else complete_steps[: policy.keep])
    newest_resumable = next((x for x in complete_steps if not missing_weights(x, k, weights)), None)

    entries: list[PlanEntry] = []
    kept_ckpt_steps: list[int] = []
    for c in ckpts:
        keep_reasons: list[str] = []
        delete_reasons: list[str] = []
        if c.foreign is not None:
            keep_reasons.append(_foreign(c.foreign))
        elif c.step in in_flight_set:
            keep_reasons.append(IN_FLIGHT)
        elif c.step > current_step:
            keep_reasons.append(AHEAD_OF_CURRENT)
        elif complete(c):
            if c.step == newest_complete:
                keep_reasons.append(NEWEST_COMPLETE)
            if c.step == newest_resumable and newest_resumable != newest_complete:
                keep_reasons.append(NEWEST_RESUMABLE)
            if c.step in latest_k:
                keep_reasons.append(KEEP_ALL if policy.keep is None else _keep_latest(policy.keep))
            if policy.keep_interval and c.step % policy.keep_interval == 0:
                keep_reasons.append(_keep_interval(policy.keep_interval))
            keep_reasons += _rule_reasons(policy, StepView("checkpoint", c.step, True, current_step, k))
            if not keep_reasons:
                delete_reasons.append(_older_than_keep(policy.keep or 0))
        else:
            if newest_complete is not None and c.step < newest_complete:
                delete_reasons.append(INCOMPLETE)
            else:
                keep_reasons.append(INCOMPLETE_MAYBE_WRITING)
        if keep_reasons:
            if c.foreign is None:
                kept_ckpt_steps.append(c.step)
            entries.append(PlanEntry(c.path, "checkpoint", c.step, "keep", tuple(keep_reasons)))
        else:
            entries.append(PlanEntry(c.path, "checkpoint", c.step, "delete", tuple(delete_reasons)))
    # An in-flight step may not be on disk yet; its window is pinned all the same.
    pinning = sorted(set(kept_ckpt_steps) | in_flight_set)

    complete_weights = [w.step for w in weights if w.complete and w.step <= current_step and w.foreign is None]
    newest_weights = max(complete_weights) if complete_weights else None
    for w in weights:
        reasons: list[str] = []
        if w.foreign is not None:
            reasons.append(_foreign(w.foreign))
        if policy.keep is None:
            reasons.append(KEEP_ALL)
        if w.step > current_step:
            reasons.append(AHEAD_OF_CURRENT)
        for x in pinning:
            if x - k <= w.step <= x:
                reasons.append(_pinned_by(x, k))
        if current_step - k <= w.step <= current_step:
            reasons.append(LIVE_WINDOW)
        if policy.consumer_step is not None and w.step >= policy.consumer_step:
            reasons.append(CONSUMER)
        if policy.weights_interval and w.step % policy.weights_interval == 0:
            reasons.append(_weights_interval(policy.weights_interval))
        if w.foreign is None and w.complete and w.step <= current_step:
            reasons += _rule_reasons(policy, StepView("weights", w.step, True, current_step, k))
        if not w.complete and not reasons and (newest_weights is None or w.step > newest_weights):
            reasons.append(INCOMPLETE_MAYBE_WRITING)
        if reasons:
            entries.append(PlanEntry(w.path, "weights", w.step, "keep", tuple(reasons)))
        else:
            entries.append(PlanEntry(w.path, "weights", w.step, "delete", (INCOMPLETE,) if not w.complete else (NOT_PINNED,)))
    entries.sort(key=lambda e: (e.kind, e.step))
    return Plan(tuple(entries))


def _rule_reasons(policy: RetentionPolicy, view: StepView) -> list[str]:
    """The keep reasons the policy's user rules give ``view`` (each as ``rule <name>: <reason>``).

    Raises:
        RetentionConfigError: a rule raised or returned something other than text or None (one
            line naming the rule and the step; the plan is not made, so nothing is deleted).
    """
    out = []
    for rule in policy.rules:
        name = getattr(rule, "__name__", type(rule).__name__)
        try:
            reason = rule(view)
        except Exception as e:
            raise RetentionConfigError(f"retention rule {name} failed on {view.kind} step {view.step}: {type(e).__name__}: {e}") from e
        if reason is not None and not isinstance(reason, str):
            raise RetentionConfigError(f"retention rule {name} returned {reason!r} for {view.kind} step {view.step}; expected a reason (str) or None")
        if reason:
            out.append(f"rule {name}: {reason}")
    return out


def load_rule(spec: str) -> RetentionRule:
    """The rule a ``MODULE:NAME`` spec names (``prime-ckpt plan --rule mypkg.rules:keep_best``):
    imports ``MODULE`` (the user's own code, named on the command line) and returns ``NAME``.

    Raises:
        RetentionConfigError: the spec is malformed, the module cannot be imported, or the name
            is missing or not callable (one line naming the spec).
    """
    import importlib

    module, _, name = spec.partition(":")
    if not module or not name:
        raise RetentionConfigError(f"--rule {spec}: expected MODULE:NAME (a callable taking a StepView)")
    try:
        obj = getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError) as e:
        raise RetentionConfigError(f"--rule {spec}: {type(e).__name__}: {e}") from None
    if not callable(obj):
        raise RetentionConfigError(f"--rule {spec}: {name} is not callable")
    return obj


@dataclass
class ApplyResult:
    """What :func:`apply_plan` did: paths deleted, already gone, and failures (path, error)."""

    deleted: list[AnyPath] = field(default_factory=list)
    already_gone: list[AnyPath] = field(default_factory=list)
    failed: list[tuple[AnyPath, str]] = field(default_factory=list)


def apply_plan(p: Plan, *, remove: Callable[[AnyPath], bool] = remove_tree) -> ApplyResult:
    """Delete every ``delete`` entry of ``p`` (checkpoints first, then weights).

    A path that is already gone is not an error; an ``OSError`` is logged and recorded in
    ``failed`` and the rest carries on. Decides nothing.
    """
    result = ApplyResult()
    for e in sorted(p.deletes, key=lambda e: (e.kind != "checkpoint", e.step)):
        try:
            if remove(e.path):
                result.deleted.append(e.path)
                logger.info("retention: deleted %s (%s)", e.path, "; ".join(e.reasons))
            else:
                result.already_gone.append(e.path)
        except OSError as err:
            logger.warning("retention: could not delete %s: %s", e.path, err)
            result.failed.append((e.path, f"{type(err).__name__}: {err}"))
    return result


def with_consumer_ack(policy: RetentionPolicy, output_dir: AnyPath | str) -> RetentionPolicy:
    """``policy`` with ``consumer_step`` set from the run's consumer acknowledgement
    (``<output_dir>/consumer_ack.json``: the weights step the inference side has loaded,
    :func:`prime_ckpt.orchestrator.write_consumer_ack`), unless the policy already has one or
    there is none. Reads one small file."""
    if policy.consumer_step is not None:
        return policy
    from prime_ckpt.orchestrator import read_consumer_ack

    acked = read_consumer_ack(output_dir)
    return policy if acked is None else dataclasses.replace(policy, consumer_step=acked)


def plan_output_dir(
    output_dir: AnyPath | str,
    policy: RetentionPolicy,
    *,
    current_step: int | None = None,
    in_flight: Iterable[int] = (),
    detect: bool = True,
) -> Plan:
    """Scan ``output_dir`` and plan it (the I/O half of :func:`plan`).

    With ``detect`` the parts a step needs to count as complete are judged from the disk
    (:func:`prime_ckpt.layout.detect_parts`: a trainer-only run needs only ``trainer``). A policy
    without ``consumer_step`` takes the run's consumer acknowledgement
    (``consumer_ack.json``, :func:`prime_ckpt.orchestrator.write_consumer_ack`) when there is one.

    Raises:
        FileNotFoundError: ``output_dir`` does not exist or holds neither ``checkpoints/`` nor
            ``weights/`` (message names the path).
    """
    from prime_ckpt.layout import RunLayout, detect_parts, scan_inventory

    layout = RunLayout(output_dir)
    if not layout.output_dir.is_dir():
        what = "a file, not a run output dir" if layout.output_dir.exists() else "no such directory"
        raise FileNotFoundError(f"{layout.output_dir}: {what}")
    if not (layout.checkpoints_dir.is_dir() or layout.weights_dir.is_dir()):
        from prime_ckpt.foreign import titan_folder

        if titan_folder(layout.output_dir) is not None:  # never plan (or prune) another tool's steps
            raise FileNotFoundError(f"{layout.output_dir}: a torchtitan checkpoint folder (step-<N> dirs), not this "
                                    "project's run output dir: never planned or pruned here")
        raise FileNotFoundError(f"{layout.output_dir}: not a run output dir (no checkpoints/ or weights/)")
    inventory = scan_inventory(layout.output_dir)
    if detect:
        policy = dataclasses.replace(policy, parts=detect_parts(inventory.checkpoints))
    policy = with_consumer_ack(policy, layout.output_dir)
    return plan(inventory, policy, current_step=current_step, in_flight=in_flight)


def plan_sizes(p: Plan) -> dict[AnyPath, int]:
    """Bytes on disk of every entry's directory (reads the file system)."""
    from prime_ckpt.storage import tree_size

    return {e.path: tree_size(e.path) for e in p.entries}
