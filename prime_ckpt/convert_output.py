"""Where a conversion may write: the output checks of ``prime-ckpt convert``.

:func:`check_output` refuses an output that exists (without ``force``), overlaps the input,
lies inside any checkpoint or weights step (:func:`checkpoint_containing`, even with
``force``), or cannot be written; nothing is created or opened while checking.
"""

from __future__ import annotations

import os
from pathlib import Path

from prime_ckpt.convert_options import ConvertError
from prime_ckpt.dcp_metadata import has_dcp_metadata
from prime_ckpt.foreign import foreign_checkpoint_kind
from prime_ckpt.layout import (
    CHECKPOINTS_DIR,
    DCP_METADATA_FILE,
    MANIFEST_FILE,
    ORCHESTRATOR_FILE,
    TRAINER_PART,
    WEIGHTS_DIR,
    WEIGHTS_MARKER,
    parse_step,
)


def _is_within(child: Path, parent: Path) -> bool:
    try:
        child.resolve().relative_to(parent.resolve())
        return True
    except ValueError:
        return False


def _step_dir_kind(path: Path) -> str | None:
    """``"checkpoint step"`` / ``"weights step"`` if ``path`` is an existing step directory:
    named ``step_<N>`` under ``checkpoints/`` or ``weights/``, or named ``step_<N>`` anywhere and
    holding a step's files (``trainer/``, ``orchestrator.pt``, ``COMPLETE``, ``manifest.json``)."""
    if parse_step(path.name) is None or not path.is_dir():
        return None
    if path.parent.name == CHECKPOINTS_DIR:
        return "checkpoint step"
    if path.parent.name == WEIGHTS_DIR:
        return "weights step"
    if (path / TRAINER_PART).is_dir() or (path / ORCHESTRATOR_FILE).is_file():
        return "checkpoint step"
    if (path / WEIGHTS_MARKER).is_file() or (path / MANIFEST_FILE).is_file():
        return "weights step"
    return None


def checkpoint_containing(out: Path | str) -> tuple[Path, str] | None:
    """The checkpoint a conversion output would be written into, or ``None``.

    ``out`` is inside a checkpoint when it is, or lies inside, an existing step directory
    (``checkpoints/step_<N>`` or ``weights/step_<N>``, or a ``step_<N>`` dir holding a step's
    files), or lies inside a DCP directory (one holding ``.metadata``). ``out`` being itself a
    standalone DCP directory (an earlier ``--to dcp`` output) is not "inside", nor is a step
    directory that does not exist yet (``checkpoints/step_<N>/trainer`` of a new step, to bring
    in a seed checkpoint: nothing there can be overwritten). Checked on the path as given (made
    absolute) and with symlinks resolved (``out`` itself, and its parent, where the temp file
    and the rename happen); nothing is created or opened.

    Args:
        out: the output path of a conversion (it need not exist).

    Returns:
        ``(directory, kind)``: the outermost checkpoint directory found and ``"checkpoint
        step"``, ``"weights step"`` or ``"DCP directory"``; ``None`` when ``out`` is outside
        every checkpoint.

    Raises:
        Nothing on its own (a symlink loop makes :meth:`Path.resolve` raise ``RuntimeError``
        before Python 3.13, ``OSError`` after; both are passed through).
    """
    out = Path(out)
    views = [out.parent.resolve() / out.name, out.resolve(), Path(os.path.abspath(out))]
    for view in dict.fromkeys(views):
        for parent in reversed(view.parents):
            kind = _step_dir_kind(parent)
            if kind is None and has_dcp_metadata(parent):
                kind = "DCP directory"
            if kind is None and parent != view:
                kind = foreign_checkpoint_kind(parent)  # another tool's: a save in progress, torchtitan, HF shards
            if kind is not None:
                return parent, kind
        kind = _step_dir_kind(view)
        if kind is not None:
            return view, kind
    return None


def refuse_inside_checkpoint(out: Path) -> None:
    """Raise :class:`ConvertError` (one line) if ``out`` is, or lies inside, a checkpoint or
    weights step (:func:`checkpoint_containing`) or cannot be resolved."""
    try:
        inside = checkpoint_containing(out)
    except (OSError, RuntimeError) as e:  # a symlink loop on the way to out
        raise ConvertError(f"{out}: cannot resolve the output path ({type(e).__name__}: {' '.join(str(e).split())})") from None
    if inside is not None:
        where, kind = inside
        raise ConvertError(f"{out}: inside the {kind} {where}; convert never writes into a checkpoint, even with --force (choose an OUT outside it)")


def _check_parent(out: Path) -> None:
    """Refuse an ``out`` whose directory cannot be made or written: the nearest existing ancestor
    is a file, or is a directory this process may not write (one line, before anything is read)."""
    ancestor = out.parent
    while not ancestor.exists() and ancestor != ancestor.parent:
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        raise ConvertError(f"{out}: {ancestor} is a file, not a directory")
    if not os.access(ancestor, os.W_OK | os.X_OK):
        raise ConvertError(f"{out}: {ancestor} is not writable (permission denied); choose another OUT")


def check_output(out: Path | str, source: Path | str, *, force: bool, directory: bool) -> Path:
    """Refuse an output that exists (without ``force``), lies inside the input, lies inside any
    checkpoint (:func:`checkpoint_containing`; even with ``force``), or (with ``force``) is
    something this conversion must not replace. Nothing is written.

    Returns:
        ``out`` as a Path.

    Raises:
        ConvertError: one line naming ``out`` and why it may not be written.
    """
    out, source = Path(out), Path(source)
    _check_parent(out)
    src_root = source
    if source.name == "model.safetensors" and source.is_file():
        src_root = source.parent
    elif source.name == TRAINER_PART and parse_step(source.parent.name) is not None:
        src_root = source.parent  # never write into the checkpoint step the input belongs to
    if _is_within(out, src_root) or _is_within(source, out):
        raise ConvertError(f"{out}: output overlaps the input {source} (the input is never modified)")
    refuse_inside_checkpoint(out)
    if out.exists() or out.is_symlink():
        if not force:
            raise ConvertError(f"{out}: already exists (use --force to overwrite)")
        if not out.is_symlink() and not out.is_file() and not out.is_dir():
            raise ConvertError(f"{out}: exists and is not a regular file (a device, FIFO or socket); convert never replaces it")
        if directory:
            if not out.is_dir() or any(out.iterdir()):
                what = "a DCP checkpoint" if (out / DCP_METADATA_FILE).is_file() else "not an empty directory"
                raise ConvertError(f"{out}: exists and is {what}; convert never replaces it, even with --force (remove it yourself or choose another OUT)")
        elif out.is_dir():
            raise ConvertError(f"{out}: is a directory; give a file name")
    return out
