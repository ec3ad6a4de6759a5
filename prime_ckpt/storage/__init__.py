"""File operations in one place (this package), on a local file system or on object storage (fsspec).

Every write that the commit protocol relies on goes through here, and every path may be a local
path or an fsspec URL (``s3://bucket/run``, ``gs://...``, ``memory://...`` in tests;
``file://`` means local). :func:`to_path` turns either into a path object: a plain
:class:`pathlib.Path` for local paths, a :class:`upath.UPath` (the pathlib API over fsspec) for
URLs, so callers build paths with ``/`` and call ``.is_file()`` / ``.iterdir()`` on both.

Local paths (unchanged fast paths): a small file is written
``tmp file -> write -> fsync(file) -> rename -> fsync(parent dir)``. A crash at any instant
leaves either the old file or the complete new one, never a partial one under the final name.
Temp files are named ``.<name>.tmp.<pid>.<n>`` so they never parse as a step or a part. A
directory is deleted by renaming it to a hidden name first.

Object stores have no rename and no fsync, but an object becomes visible whole, once, when its
upload completes (and S3 reads and listings are strongly consistent). The commit protocol
therefore holds by *order*, with the completion mark of each part written last:

* small files (``orchestrator.pt``, ``manifest.json``, ``save_info.json``, ``config.json``,
  ``COMPLETE``) are one PUT each (:func:`atomic_write`): a reader sees the old object, the new
  one or none, never a partial one;
* ``trainer/`` goes through DCP's ``FsspecWriter`` (:func:`dcp_writer`): every rank uploads its
  ``__<rank>_<n>.distcp`` (one object each, complete when its upload completes); only after every
  rank reported success does the coordinator (rank 0) write ``.metadata`` (uploaded as
  ``.metadata.tmp`` and copied server-side to ``.metadata``). ``.metadata`` is the mark;
* ``weights/step_<N>``: ``model.safetensors``, ``config.json``, ``manifest.json``, then
  ``COMPLETE``;
* a delete (:func:`remove_tree`) removes the completion marks first (``trainer/.metadata``,
  ``orchestrator.pt``, ``COMPLETE``, ``manifest.json``), then the rest: a crash mid-delete leaves
  a visibly incomplete step, never a half-deleted one that looks complete.

Listings are not cached: :func:`to_path` turns fsspec's listings cache off unless the options
say otherwise, and the inventory scans call :func:`refresh` first, because other ranks and
other processes (the orchestrator) write under the same prefix.

Credentials and the endpoint come from the standard fsspec / botocore configuration:
environment variables (``AWS_ACCESS_KEY_ID``, ``AWS_SECRET_ACCESS_KEY``, ``AWS_ENDPOINT_URL``
...), ``~/.aws``, or ``storage_options`` (``--storage.options '{"client_kwargs": ...}'``). They
are never logged: a UPath's ``str`` and ``repr`` carry no options.

Errors of a remote backend that are not ``OSError`` (botocore's connection errors ...) are
re-raised as ``OSError`` naming the path, so callers handle local and remote failures alike.
"""

from prime_ckpt.names import COMPLETION_MARKS, is_leftover
from prime_ckpt.storage.deletes import clean_leftovers, remove_tree, set_aside
from prime_ckpt.storage.paths import (
    AnyPath,
    is_remote,
    list_tree,
    missing_reason,
    one_line,
    refresh,
    remote_errors,
    storage_options_of,
    to_path,
    tree_size,
)
from prime_ckpt.storage.writes import (
    atomic_write,
    atomic_write_bytes,
    atomic_write_streamed,
    fsync_dir,
    fsync_file,
    tmp_path_for,
)

__all__ = [
    "COMPLETION_MARKS",
    "AnyPath",
    "atomic_write",
    "atomic_write_bytes",
    "atomic_write_streamed",
    "clean_leftovers",
    "fsync_dir",
    "fsync_file",
    "is_leftover",
    "is_remote",
    "list_tree",
    "missing_reason",
    "one_line",
    "refresh",
    "remote_errors",
    "remove_tree",
    "set_aside",
    "storage_options_of",
    "tmp_path_for",
    "to_path",
    "tree_size",
]
