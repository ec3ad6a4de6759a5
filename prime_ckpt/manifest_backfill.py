"""Backfilling ``manifest.json`` for steps saved without one (``prime-ckpt manifest``).

The rule: a step that has a manifest keeps it (unless ``force``); a step without one gets one
only when it is complete and structurally sound (:func:`prime_ckpt.manifest.verify_step` with
``allow_missing_manifest=True`` passes), because a manifest must not bless a broken checkpoint;
with ``force`` every step's manifest is (re)written from the files as they are now.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from prime_ckpt.manifest import MANIFEST_FILE, verify_step, verify_targets, write_manifest
from prime_ckpt.verify import run_parts


@dataclass(frozen=True)
class BackfillOutcome:
    """What :func:`backfill_manifests` did for one step.

    ``action``: ``"exists"`` (kept its manifest), ``"skipped"`` (not sound: ``detail`` is
    ``"<status>: <first problem>"``), ``"wrote"`` (``path`` is then the manifest written).
    """

    action: str
    path: Any
    detail: str = ""


def backfill_manifests(path: Any, *, force: bool = False) -> Iterator[BackfillOutcome]:
    """Write ``manifest.json`` for every step under ``path`` (a run output dir, ``checkpoints/`` or
    ``weights/`` dir, or one step dir; local or UPath) that lacks one; yields one outcome per
    step, in :func:`~prime_ckpt.manifest.verify_targets` order, as it goes.

    Raises:
        VerifyTargetError: ``path`` is not a run, step or steps directory.
        OSError: a file cannot be read or the manifest cannot be written.
    """
    parts_cache: dict[str, tuple[str, ...]] = {}
    for t in verify_targets(path):
        if (t / MANIFEST_FILE).is_file() and not force:
            yield BackfillOutcome("exists", t)
            continue
        if not force:
            r = verify_step(t, parts=run_parts(t, parts_cache), allow_missing_manifest=True)
            if not r.ok:
                yield BackfillOutcome("skipped", t, f"{r.status}: {r.problems[0] if r.problems else ''}")
                continue
        yield BackfillOutcome("wrote", write_manifest(t))
