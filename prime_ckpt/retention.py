"""Retention planning: inventory + policy -> keep/delete for every step, with reasons.

The planner does no I/O: it takes the inventory that :func:`prime_ckpt.layout.scan_inventory`
read and returns a :class:`Plan`. It composes small rules (:mod:`prime_ckpt.retention_rules`,
each returning a reason to keep a step or None) and keeps the safety guards no rule may
override. The executor (:func:`prime_ckpt.prune.apply_plan`, re-exported here) deletes and
decides nothing; the trainer runs it on rank 0's background thread after each committed save.

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

import bisect
import dataclasses
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Literal

from prime_ckpt.layout import Inventory, detect_parts, missing_weights
from prime_ckpt.prune import ApplyResult, apply_plan
from prime_ckpt.retention_rules import (
    AHEAD_OF_CURRENT,
    CONSUMER,
    IN_FLIGHT,
    INCOMPLETE,
    INCOMPLETE_MAYBE_WRITING,
    KEEP_ALL,
    LIVE_WINDOW,
    NEWEST_COMPLETE,
    NEWEST_RESUMABLE,
    NOT_PINNED,
    AheadOfCurrent,
    ConsumerAck,
    KeepAll,
    KeepEvery,
    KeepNewest,
    Kind,
    LiveWindow,
    PinnedBy,
    RetentionConfigError,
    RetentionRule,
    StepView,
    UserRule,
    foreign_reason_text,
    load_rule,
    older_than_keep,
    reasons,
)
from prime_ckpt.storage import AnyPath

Action = Literal["keep", "delete"]


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


def checkpoint_rules(policy: RetentionPolicy, complete_steps: Iterable[int]) -> list[RetentionRule]:
    """The rules that keep complete checkpoint steps of this run, in reason order: ``keep``
    (:class:`KeepAll` / :class:`KeepNewest` over ``complete_steps``), ``keep_interval``, then the
    user's rules."""
    rules: list[RetentionRule] = [KeepAll() if policy.keep is None else KeepNewest.of(policy.keep, complete_steps)]
    if policy.keep_interval:
        rules.append(KeepEvery(policy.keep_interval, "keep_interval"))
    return rules + [UserRule(r) for r in policy.rules]


def weights_rules(policy: RetentionPolicy, pinning: Iterable[int]) -> list[RetentionRule]:
    """The rules that keep weights steps, in reason order (the user's rules are not among them:
    they see only complete weights of this run). ``pinning``: the kept (and in-flight)
    checkpoint steps, ascending."""
    head, tail = _weights_rules_around_pins(policy)
    return [*head, *(PinnedBy(x) for x in pinning), *tail]


def _weights_rules_around_pins(policy: RetentionPolicy) -> tuple[list[RetentionRule], list[RetentionRule]]:
    """The weights rules before and after the :class:`PinnedBy` ones (see :func:`weights_rules`)."""
    head: list[RetentionRule] = [KeepAll()] if policy.keep is None else []
    head.append(AheadOfCurrent())
    tail: list[RetentionRule] = [LiveWindow()]
    if policy.consumer_step is not None:
        tail.append(ConsumerAck(policy.consumer_step))
    if policy.weights_interval:
        tail.append(KeepEvery(policy.weights_interval, "weights_interval"))
    return head, tail


def _entry(path: AnyPath, kind: Kind, step: int, keep: list[str], delete: tuple[str, ...]) -> PlanEntry:
    """Kept when any reason to keep applies, else deleted for the ``delete`` reasons."""
    return PlanEntry(path, kind, step, "keep", tuple(keep)) if keep else PlanEntry(path, kind, step, "delete", delete)


def plan(
    inventory: Inventory,
    policy: RetentionPolicy,
    *,
    current_step: int | None = None,
    in_flight: Iterable[int] = (),
) -> Plan:
    """Decide keep/delete for every step directory in ``inventory`` (pure; no I/O).

    The safety guards come first and no rule overrides them: a foreign directory, an in-flight
    step and a checkpoint newer than ``current_step`` are kept alone; the newest complete and the
    newest resumable checkpoints are always kept; an incomplete step is deleted only when older
    than the newest complete one. The rules (:mod:`prime_ckpt.retention_rules`) add the rest.

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
    newest_resumable = next((x for x in complete_steps if not missing_weights(x, k, weights)), None)
    rules = checkpoint_rules(policy, complete_steps)

    entries: list[PlanEntry] = []
    for c in ckpts:
        view = StepView("checkpoint", c.step, complete(c), current_step, k)
        keep: list[str] = []
        delete: tuple[str, ...] = ()
        if c.foreign is not None:
            keep = [foreign_reason_text(c.foreign)]
        elif c.step in in_flight_set:
            keep = [IN_FLIGHT]
        elif c.step > current_step:
            keep = [AHEAD_OF_CURRENT]
        elif view.complete:
            keep = [NEWEST_COMPLETE] if c.step == newest_complete else []
            if c.step == newest_resumable and newest_resumable != newest_complete:
                keep.append(NEWEST_RESUMABLE)
            keep += reasons(rules, view)
            delete = (older_than_keep(policy.keep or 0),)
        elif newest_complete is not None and c.step < newest_complete:
            delete = (INCOMPLETE,)
        else:
            keep = [INCOMPLETE_MAYBE_WRITING]
        entries.append(_entry(c.path, "checkpoint", c.step, keep, delete))
    # An in-flight step may not be on disk yet; its window is pinned all the same.
    kept = {c.step for c, e in zip(ckpts, entries) if e.action == "keep" and c.foreign is None}
    pinning = sorted(kept | in_flight_set)
    head, tail = _weights_rules_around_pins(policy)
    user = [UserRule(r) for r in policy.rules]

    complete_weights = [w.step for w in weights if w.complete and w.step <= current_step and w.foreign is None]
    newest_weights = max(complete_weights) if complete_weights else None
    for w in weights:
        view = StepView("weights", w.step, w.complete, current_step, k)
        keep = [foreign_reason_text(w.foreign)] if w.foreign is not None else []
        # only the checkpoints x with w.step in [x - k, x] can pin it: found by bisection, so
        # planning stays linear in steps on disk however many checkpoints are kept
        pins = pinning[bisect.bisect_left(pinning, w.step): bisect.bisect_right(pinning, w.step + k)]
        keep += reasons([*head, *(PinnedBy(x) for x in pins), *tail], view)
        if w.foreign is None and w.complete and w.step <= current_step:
            keep += reasons(user, view)
        if not w.complete and not keep and (newest_weights is None or w.step > newest_weights):
            keep.append(INCOMPLETE_MAYBE_WRITING)
        entries.append(_entry(w.path, "weights", w.step, keep, (NOT_PINNED,) if w.complete else (INCOMPLETE,)))
    entries.sort(key=lambda e: (e.kind, e.step))
    return Plan(tuple(entries))


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


__all__ = [  # the old import paths: re-exported names
    "AHEAD_OF_CURRENT", "CONSUMER", "INCOMPLETE", "INCOMPLETE_MAYBE_WRITING", "IN_FLIGHT",
    "KEEP_ALL", "LIVE_WINDOW", "NEWEST_COMPLETE", "NEWEST_RESUMABLE", "NOT_PINNED", "ApplyResult",
    "Plan", "PlanEntry", "RetentionConfigError", "RetentionPolicy", "RetentionRule", "StepView",
    "apply_plan", "load_rule", "plan", "plan_output_dir", "plan_sizes", "with_consumer_ack",
]
