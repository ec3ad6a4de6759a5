"""The case registry: every measured operation is a function registered under a name and family.

A case module registers builders::

    from ckpt_bench.common import timed
    from ckpt_bench.registry import Op, register

    @register("my_copy", family="mine", phase="save", storages=("memory",))
    def my_copy(ctx, st):
        buf = ctx.flat_src.clone()
        return Op(lambda rep: timed(lambda: buf.copy_(ctx.flat_src)), note="a clone, then copies")

``phase`` says when the builder runs and what ``ctx`` is:

* ``"save"`` / ``"load"``: once per state size and storage, ``ctx`` a
  :class:`ckpt_bench.runner.SizeContext` (model, optimizer, per-rank bytes, scratch tensors);
  load builders run after the save cases have run (``ctx.save_cases``);
* ``"weights"``: once per weights size, ``ctx`` a :class:`ckpt_bench.cases.weights.WeightsContext`;
* ``"check"``: once per world size before the size cases, ``fn(worker)``, writing
  ``worker.extras`` (the RSS and step-overhead checks).

``storages`` names where a save/load/weights case runs: ``"local"``, ``"s3"`` (when the launch
has S3 and the size is at most ``--s3-max-size``) or ``"memory"`` (no storage: ``st`` is None).
A builder returns an :class:`Op` (``run(rep) -> (blocking_s, durable_s, extra)``, ``cleanup(rep)``
outside the timed region, a note for the tables) or None to skip itself (e.g. CUDA only).
"""

from __future__ import annotations

import importlib.util
import sys
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

PHASES = ("check", "save", "load", "weights")
RunFn = Callable[[int], tuple[float, float, dict[str, float]]]


def _no_cleanup(rep: int) -> None:
    return None


@dataclass
class Op:
    """What a builder returns: the timed operation, its cleanup and note, and what it drives
    (``handle``: the Checkpointer or WeightsPublisher, for the load cases and the records)."""

    run: RunFn
    cleanup: Callable[[int], None] = _no_cleanup
    note: str = ""
    handle: Any = None


@dataclass
class Case:
    """One measured operation at one size and storage. ``run(rep)`` returns (blocking_s, durable_s, extra)."""

    name: str
    storage: str
    kind: str  # "save" | "load" | "baseline" | "weights"
    run: RunFn
    cleanup: Callable[[int], None] = _no_cleanup
    note: str = ""
    handle: Any = None
    samples: dict[str, list[float]] = field(default_factory=dict)
    error: str | None = None


@dataclass(frozen=True)
class CaseSpec:
    """A registered case: its name, family, phase, record kind, storages and builder."""

    name: str
    family: str
    phase: str
    kind: str
    storages: tuple[str, ...]
    build: Callable[..., Any]
    module: str

    def make(self, ctx: Any, st: Any) -> Case | None:
        """Build this case on storage ``st`` (None for ``"memory"``); None when it skips itself."""
        op = self.build(ctx, st)
        if op is None:
            return None
        storage = "memory" if st is None else st.name
        return Case(self.name, storage, self.kind, op.run, op.cleanup, op.note, op.handle)


CASES: dict[str, CaseSpec] = {}


def register(name: str, *, family: str, phase: str = "save", kind: str | None = None,
             storages: tuple[str, ...] = ("local",)) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Register the decorated builder as case ``name`` (see the module docstring).

    ``kind`` is the records' ``"kind"`` (default: the phase). Raises ValueError on a name that is
    already registered, an unknown phase or an unknown storage."""
    if phase not in PHASES:
        raise ValueError(f"case {name!r}: phase {phase!r} is not one of {', '.join(PHASES)}")
    if bad := [s for s in storages if s not in ("local", "s3", "memory")]:
        raise ValueError(f"case {name!r}: unknown storage {bad[0]!r} (local, s3 or memory)")

    def deco(fn: Callable[..., Any]) -> Callable[..., Any]:
        if name in CASES:
            raise ValueError(f"case {name!r} is already registered by {CASES[name].module}")
        CASES[name] = CaseSpec(name, family, phase, kind or phase, tuple(storages), fn, fn.__module__)
        return fn

    return deco


def load_builtin() -> None:
    """Register the cases of :mod:`ckpt_bench.cases` (idempotent)."""
    importlib.import_module("ckpt_bench.cases")


def load_case_module(path: str | Path) -> None:
    """Import the Python file ``path`` so its ``@register`` calls add cases.

    Raises SystemExit (one line) when the file does not exist or fails to import."""
    p = Path(path).resolve()
    mod_name = f"ckpt_bench_user_{p.stem}_{zlib.crc32(str(p).encode()):08x}"
    if mod_name in sys.modules:
        return
    spec = importlib.util.spec_from_file_location(mod_name, p)
    if not p.is_file() or spec is None or spec.loader is None:
        raise SystemExit(f"--case-module {path}: no such Python file")
    module = importlib.util.module_from_spec(spec)
    sys.modules[mod_name] = module
    try:
        spec.loader.exec_module(module)
    except Exception as e:
        del sys.modules[mod_name]
        raise SystemExit(f"--case-module {path}: {type(e).__name__}: {e}") from e


def check_names(names: list[str] | None) -> None:
    """Raise SystemExit (one line naming it) if a name of ``--cases`` is not registered."""
    unknown = [n for n in names or [] if n not in CASES]
    if unknown:
        raise SystemExit(f"--cases: unknown case{'s' if len(unknown) > 1 else ''} {', '.join(unknown)} "
                         f"(see --list-cases)")


def selected(phase: str, names: list[str] | None) -> list[CaseSpec]:
    """The registered specs of ``phase``, in registration order (only ``names`` when given)."""
    return [s for s in CASES.values() if s.phase == phase and (names is None or s.name in names)]


def build_cases(specs: list[CaseSpec], ctx: Any, storages: dict[str, Any]) -> list[Case]:
    """Each spec's case on each of its storages that ``storages`` has (``"memory"``: None)."""
    cases: list[Case] = []
    for spec in specs:
        for name in spec.storages:
            if name not in storages:
                continue
            case = spec.make(ctx, storages[name])
            if case is not None:
                cases.append(case)
    return cases


def listing() -> str:
    """One line per registered case: name, family, phase, storages."""
    width = max((len(n) for n in CASES), default=4)
    return "\n".join(f"{s.name:<{width}}  {s.family:<10} {s.phase:<8} {','.join(s.storages) or '-'}" for s in CASES.values())
