"""Retention rules: small pure callables that look at one step and return a reason to keep it.

A rule is given a :class:`StepView` (what a rule sees of one step directory: pure data, no I/O)
and returns a short reason (shown in ``prime-ckpt plan``, stable: ``plan --json`` carries them)
or ``None``. Rules only keep, never delete. The planner (:func:`prime_ckpt.retention.plan`)
composes the built-in ones below from a :class:`prime_ckpt.retention.RetentionPolicy`, adds the
user's own (:class:`UserRule`, ``--rule MODULE:NAME``) and keeps the safety guards no rule may
override (foreign directories, in-flight saves, the newest complete and resumable checkpoints,
incomplete steps).

Built-in rules:
  * :class:`KeepAll`: ``keep=None`` keeps everything;
  * :class:`KeepNewest`: the ``keep`` newest complete checkpoints;
  * :class:`KeepEvery`: multiples of ``keep_interval`` (checkpoints) / ``weights_interval``
    (weights);
  * :class:`AheadOfCurrent`: steps newer than the current step (another run's);
  * :class:`PinnedBy`: the weights window ``[x - k, x]`` of a kept checkpoint step ``x``;
  * :class:`LiveWindow`: the weights window ``[current - k, current]`` in use;
  * :class:`ConsumerAck`: weights at or after the consumer's last acknowledged step.
"""

from __future__ import annotations

import importlib
import os
import sys
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Literal

from prime_ckpt.errors import PrimeCkptError

Kind = Literal["checkpoint", "weights"]

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


def foreign_reason_text(why: str) -> str:
    """The keep reason of a step directory that is not this project's (``why``: what is foreign)."""
    return f"not this project's layout ({why}): never deleted"


def older_than_keep(k: int) -> str:
    """The delete reason of a complete checkpoint no rule keeps (``k``: the policy's ``keep``)."""
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
class KeepAll:
    """``keep=None``: every step is kept (nothing is deleted)."""

    def __call__(self, view: StepView) -> str | None:
        return KEEP_ALL


@dataclass(frozen=True)
class KeepNewest:
    """Keep the ``k`` newest of ``steps`` (the complete checkpoint steps of this run)."""

    k: int
    steps: frozenset[int]

    @classmethod
    def of(cls, k: int, steps: Iterable[int]) -> KeepNewest:
        """The rule keeping the ``k`` (>= 1) newest of ``steps`` (any order)."""
        return cls(k, frozenset(sorted(steps, reverse=True)[:k]))

    def __call__(self, view: StepView) -> str | None:
        return f"among the {self.k} newest complete" if view.step in self.steps else None


@dataclass(frozen=True)
class KeepEvery:
    """Keep multiples of ``n`` (>= 1); ``setting`` names the policy field in the reason
    (``keep_interval`` for checkpoints, ``weights_interval`` for weights)."""

    n: int
    setting: str

    def __call__(self, view: StepView) -> str | None:
        return f"multiple of {self.setting}={self.n}" if view.step % self.n == 0 else None


@dataclass(frozen=True)
class AheadOfCurrent:
    """Keep a step newer than the current step: another run's (a reused directory)."""

    def __call__(self, view: StepView) -> str | None:
        return AHEAD_OF_CURRENT if view.step > view.current_step else None


@dataclass(frozen=True)
class PinnedBy:
    """Keep the weights checkpoint step ``x`` needs to resume: ``[x - k, x]`` (the seed's rule;
    ``k`` is the view's ``async_level``)."""

    x: int

    def __call__(self, view: StepView) -> str | None:
        k = view.async_level
        if self.x - k <= view.step <= self.x:
            return f"pinned by checkpoint step {self.x} (needs weights [{self.x - k}, {self.x}])"
        return None


@dataclass(frozen=True)
class LiveWindow:
    """Keep the live async window ``[current_step - k, current_step]`` (the orchestrator uses it)."""

    def __call__(self, view: StepView) -> str | None:
        return LIVE_WINDOW if view.current_step - view.async_level <= view.step <= view.current_step else None


@dataclass(frozen=True)
class ConsumerAck:
    """Keep every step at or after ``step``, the consumer's last acknowledged one (not yet
    loaded, or in use)."""

    step: int

    def __call__(self, view: StepView) -> str | None:
        return CONSUMER if view.step >= self.step else None


@dataclass(frozen=True)
class UserRule:
    """A user's :data:`RetentionRule`, its reason shown as ``rule <name>: <reason>``.

    Raises (when called):
        RetentionConfigError: the rule raised or returned something other than text or None (one
            line naming the rule and the step; the plan is not made, so nothing is deleted).
    """

    rule: RetentionRule

    @property
    def name(self) -> str:
        return getattr(self.rule, "__name__", type(self.rule).__name__)

    def __call__(self, view: StepView) -> str | None:
        try:
            reason = self.rule(view)
        except Exception as e:
            raise RetentionConfigError(f"retention rule {self.name} failed on {view.kind} step {view.step}: {type(e).__name__}: {e}") from e
        if reason is not None and not isinstance(reason, str):
            raise RetentionConfigError(f"retention rule {self.name} returned {reason!r} for {view.kind} step {view.step}; expected a reason (str) or None")
        return f"rule {self.name}: {reason}" if reason else None


def reasons(rules: Iterable[RetentionRule], view: StepView) -> list[str]:
    """Every reason ``rules`` give ``view``, in the rules' order (a rule giving None adds none)."""
    return [r for r in (rule(view) for rule in rules) if r]


def load_rule(spec: str) -> RetentionRule:
    """The rule a ``MODULE:NAME`` spec names (``prime-ckpt plan --rule mypkg.rules:keep_best``):
    imports ``MODULE`` (the user's own code, named on the command line; found on ``sys.path``,
    then in the current directory, as ``python -m`` would) and returns ``NAME``.

    Raises:
        RetentionConfigError: the spec is malformed, the module cannot be imported (not found,
            or it raised while importing: a syntax error, an exception at import), or the name
            is missing or not callable (one line naming the spec; the cause chained).
    """
    module, _, name = spec.partition(":")
    if not module or not name:
        raise RetentionConfigError(f"--rule {spec}: expected MODULE:NAME (a callable taking a StepView)")
    cwd = os.getcwd()
    added = cwd not in sys.path and "" not in sys.path
    if added:  # the installed console script does not put the current directory on sys.path
        sys.path.append(cwd)
    try:
        obj = getattr(importlib.import_module(module), name)
    except Exception as e:  # the user's module may raise anything while importing
        raise RetentionConfigError(f"--rule {spec}: {type(e).__name__}: {' '.join(str(e).split())}") from e
    finally:
        if added:
            sys.path.remove(cwd)
    if not callable(obj):
        raise RetentionConfigError(f"--rule {spec}: {name} is not callable")
    return obj
