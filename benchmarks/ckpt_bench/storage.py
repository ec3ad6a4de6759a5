"""Where the bytes go: a local directory or an S3 bucket (fsspec), and the raw I/O baselines
(sequential write + fsync, read with the page cache dropped, the staging floor copy)."""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ckpt_bench.common import S3_BUCKET, MiB


class LocalStorage:
    """A local directory. ``checkpointer_root`` is what :class:`Checkpointer` takes."""

    name = "local"
    storage_options: dict[str, Any] | None = None

    def __init__(self, root: Path) -> None:
        self.root = root
        self.root.mkdir(parents=True, exist_ok=True)

    @property
    def checkpointer_root(self) -> str:
        return str(self.root)

    def path(self, *parts: str) -> str:
        return str(self.root.joinpath(*parts))

    def writer(self, path: str, **kw: Any):
        from torch.distributed.checkpoint import FileSystemWriter

        return FileSystemWriter(path, **kw)

    def reader(self, path: str):
        from prime_ckpt.dcp_io import SafeFileSystemReader

        return SafeFileSystemReader(path)

    def write_bytes(self, path: str, buf) -> None:
        write_file_fsync(path, buf)

    def read_into(self, path: str, buf) -> None:
        read_file_into(path, buf, drop_cache=True)

    def remove(self, path: str) -> None:
        shutil.rmtree(path, ignore_errors=True) if os.path.isdir(path) else Path(path).unlink(missing_ok=True)


class S3Storage:
    """A bucket on an S3 endpoint, through fsspec/s3fs. DCP's ``FsspecWriter`` gets
    ``sync_files=False``: there is no fsync on an object store (the writer would fall back to a
    machine-wide ``os.sync()``); an object is durable once its upload completes.

    ``checkpointer_root`` (the bucket URL) and ``storage_options`` are what :class:`Checkpointer`
    takes, so the Checkpointer cases run on S3 unchanged.
    """

    name = "s3"

    def __init__(self, endpoint: str, prefix: str) -> None:
        import s3fs

        self.endpoint = endpoint
        self.options = {"endpoint_url": endpoint, "key": "testing", "secret": "testing"}
        self.fs = s3fs.S3FileSystem(skip_instance_cache=False, **self.options)
        self.url = f"s3://{S3_BUCKET}/{prefix}"
        self.checkpointer_root = self.url
        self.storage_options = self.options

    def path(self, *parts: str) -> str:
        return "/".join([self.url, *parts])

    def writer(self, path: str, **kw: Any):
        from torch.distributed.checkpoint._fsspec_filesystem import FsspecWriter

        return FsspecWriter(path, sync_files=False, **kw, **self.options)

    def reader(self, path: str):
        from torch.distributed.checkpoint._fsspec_filesystem import FsspecReader

        return FsspecReader(path, **self.options)

    def write_bytes(self, path: str, buf) -> None:
        mv = memoryview(buf.numpy()).cast("B")
        with self.fs.open(path, "wb", block_size=64 * MiB) as f:
            for i in range(0, len(mv), 64 * MiB):
                f.write(mv[i : i + 64 * MiB])

    def read_into(self, path: str, buf) -> None:
        mv = memoryview(buf.numpy()).cast("B")
        with self.fs.open(path, "rb", block_size=64 * MiB, cache_type="none") as f:
            n = 0
            while n < len(mv):
                k = f.readinto(mv[n:])
                if not k:
                    break
                n += k

    def remove(self, path: str) -> None:
        try:
            self.fs.rm(path, recursive=True)
        except FileNotFoundError:
            pass


def staging_floor(flat_src, flat_dst) -> tuple[Callable[[], None], str]:
    """``(copy, note)``: the staging limit, one warm copy of the per-rank bytes. On a GPU a
    device-to-host copy into pinned memory that is already allocated (what staging does there);
    else a flat copy of ``flat_src`` into ``flat_dst`` (CPU float32 tensors of the per-rank size)."""
    import torch

    if torch.cuda.is_available():
        dev_src = flat_src.to("cuda")
        pinned_dst = torch.zeros_like(flat_src).pin_memory()

        def copy() -> None:
            pinned_dst.copy_(dev_src, non_blocking=True)
            torch.cuda.synchronize()

        return copy, "warm device-to-host copy of the per-rank bytes into pinned memory (staging limit)"
    return (lambda: flat_dst.copy_(flat_src)), "warm flat copy of the per-rank bytes (staging limit)"


def write_file_fsync(path: str, buf) -> None:
    """Sequential write of a flat CPU tensor's bytes, then fsync (writes in 256 MiB chunks:
    one ``write`` call moves at most ~2 GiB on Linux)."""
    mv = memoryview(buf.numpy()).cast("B")
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        n = 0
        while n < len(mv):
            n += os.write(fd, mv[n : n + 256 * MiB])
        os.fsync(fd)
    finally:
        os.close(fd)


def drop_file_cache(path: str) -> None:
    """Evict a file's clean pages from the page cache (no root needed) so reads hit the disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def drop_tree_cache(path: str) -> None:
    """:func:`drop_file_cache` of a file, or of every file under a directory."""
    if os.path.isdir(path):
        for dirpath, _, files in os.walk(path):
            for f in files:
                drop_file_cache(os.path.join(dirpath, f))
    elif os.path.exists(path):
        drop_file_cache(path)


def read_file_into(path: str, buf, drop_cache: bool = True) -> None:
    """Sequential read of a file into a flat CPU tensor (page cache dropped first unless told not to)."""
    if drop_cache:
        drop_file_cache(path)
    mv = memoryview(buf.numpy()).cast("B")
    with open(path, "rb", buffering=0) as f:
        n = 0
        while n < len(mv):
            k = f.readinto(mv[n:])
            if not k:
                break
            n += k
