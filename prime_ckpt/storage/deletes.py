"""Crash-safe deletes, crash leftovers, and setting steps aside.

Local: a directory is renamed to a hidden name (:func:`prime_ckpt.names.deleting_name`) before it
is deleted. Remote (no rename): the completion marks go first. Part of :mod:`prime_ckpt.storage`.
"""

from __future__ import annotations

import errno
import itertools
import logging
import os
import posixpath
import shutil
import time
from pathlib import Path
from typing import TYPE_CHECKING

from prime_ckpt.names import COMPLETION_MARKS, deleting_name, is_leftover, is_tmp_leftover, parse_step
from prime_ckpt.storage.paths import AnyPath, is_remote, list_tree, remote_errors, to_path
from prime_ckpt.storage.writes import fsync_dir

if TYPE_CHECKING:
    from upath import UPath

logger = logging.getLogger(__name__)
_counter = itertools.count()


def remove_tree(path: AnyPath | str) -> bool:
    """Delete a directory tree or file; a path that is already gone is not an error.

    Local: a directory is first renamed to a hidden sibling (``.<name>.deleting.<pid>``) and
    only then deleted, so a crash mid-delete never leaves a half-deleted step directory under
    its step name (where a surviving ``.metadata`` or marker could make it look complete).
    Leftovers are removed by :func:`clean_leftovers`.

    Remote (no rename): the completion marks (:data:`COMPLETION_MARKS`) under ``path`` are
    deleted first, one by one, then everything else; a crash in between leaves a step without
    its marks, i.e. visibly incomplete.

    Returns ``True`` if something was deleted; other ``OSError``s propagate.
    """
    path = to_path(path)
    if is_remote(path):
        return _remove_remote(path)
    try:
        if path.is_dir() and not path.is_symlink():
            doomed = path.with_name(deleting_name(path.name, os.getpid(), next(_counter)))
            os.rename(path, doomed)
            shutil.rmtree(doomed, ignore_errors=False)
        else:
            path.unlink()
    except FileNotFoundError:
        return False
    except OSError as e:  # a concurrent delete can surface as ENOENT mid-rmtree
        if e.errno == errno.ENOENT:
            return False
        raise
    return True


def _remove_remote(path: UPath) -> bool:
    fs, root = path.fs, path.path.rstrip("/")
    tree = list_tree(path)
    with remote_errors(path):
        if not tree:
            try:
                if not fs.isfile(root):
                    return False
                fs.rm_file(root)
            except FileNotFoundError:
                return False
            return True
        marks = sorted(
            (rel for rel, kind in tree.items() if kind == "file" and posixpath.basename(rel) in COMPLETION_MARKS),
            key=lambda rel: (COMPLETION_MARKS.index(posixpath.basename(rel)), rel),
        )
        for rel in marks:
            try:
                fs.rm_file(f"{root}/{rel}")
            except FileNotFoundError:
                pass
        try:
            fs.rm(root, recursive=True)
        except FileNotFoundError:
            pass
    return True


def clean_leftovers(directory: AnyPath | str, *, min_age_s: float = 300.0) -> list[Path]:
    """Remove crash leftovers (see :func:`is_leftover`) directly inside ``directory`` and inside
    its ``step_*`` subdirectories; returns what was removed.

    ``.deleting.`` trees are always removed (nothing writes into them); ``.tmp.`` files only once
    they are older than ``min_age_s`` seconds, so a temp file another live process (the
    orchestrator) is writing right now is left alone. Call from one process (rank 0) at start-up.
    A missing directory is not an error. On a remote path there is nothing to clean (no temp
    files, no renames) and this returns ``[]``.
    """
    directory = to_path(directory)
    removed: list[Path] = []
    if is_remote(directory) or not directory.is_dir():
        return removed
    candidates = [directory] + [p for p in directory.iterdir() if p.is_dir() and parse_step(p.name) is not None]
    for d in candidates:
        for entry in list(d.iterdir()):
            if is_leftover(entry.name):
                try:
                    if is_tmp_leftover(entry.name) and time.time() - entry.lstat().st_mtime < min_age_s:
                        continue
                    shutil.rmtree(entry) if entry.is_dir() and not entry.is_symlink() else entry.unlink()
                    removed.append(entry)
                except FileNotFoundError:
                    pass
                except OSError as e:  # e.g. permission denied: left in place, listed by `list`
                    logger.warning("could not remove the leftover %s: %s", entry, e)
    return removed


def set_aside(paths: list[AnyPath], into: AnyPath) -> list[AnyPath]:
    """Move each of ``paths`` into the directory ``into`` (created), keeping their names; returns
    the new paths. Used for checkpoint steps a new run supersedes: they leave the ``step_<N>``
    namespace (so nothing can load them or mix their parts with the new run's) but nothing is
    deleted.

    Local (same file system): one atomic rename each. Remote (no rename): each tree is copied
    into ``into`` (a name that never parses as a step), then removed with :func:`remove_tree`
    (marks first); a crash in between leaves the original in place, as before the call.
    """
    into = to_path(into)
    if is_remote(into):
        moved = []
        for p in paths:
            p = to_path(p)
            target = into / p.name
            with remote_errors(p):
                p.fs.copy(p.path.rstrip("/"), target.path.rstrip("/"), recursive=True)
            remove_tree(p)
            moved.append(target)
        return moved
    into.mkdir(parents=True, exist_ok=True)
    moved = []
    for p in paths:
        target = into / p.name
        os.rename(p, target)
        moved.append(target)
    fsync_dir(into)
    for parent in {p.parent for p in paths}:
        fsync_dir(parent)
    return moved

