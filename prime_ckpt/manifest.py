"""Integrity of a step directory: ``manifest.json`` (sizes + checksums) and ``verify``.

The names of three modules, kept importable from here:

* :mod:`prime_ckpt.manifest_record`: which files a manifest covers, hashing, writing and
  reading ``manifest.json`` (its format is described there);
* :mod:`prime_ckpt.verify`: re-hashing against the manifest and the structural checks of a step;
* :mod:`prime_ckpt.safetensors_io`: reading and checking a safetensors header.
"""

from __future__ import annotations

from prime_ckpt.layout import MANIFEST_FILE
from prime_ckpt.manifest_record import (
    ALGORITHM,
    CHUNK_BYTES,
    SCHEMA,
    WEIGHTS_PART,
    ManifestError,
    OnBytes,
    build_manifest,
    covered_files,
    hash_file,
    manifest_bytes,
    manifest_entry_path,
    read_manifest,
    write_manifest,
)
from prime_ckpt.safetensors_io import header_problem, safetensors_header
from prime_ckpt.verify import (
    VERIFY_SCHEMA,
    VerifyReport,
    VerifyTargetError,
    all_ok,
    verify_manifest,
    verify_path,
    verify_step,
    verify_targets,
)

__all__ = [
    "ALGORITHM",
    "CHUNK_BYTES",
    "MANIFEST_FILE",
    "SCHEMA",
    "VERIFY_SCHEMA",
    "WEIGHTS_PART",
    "ManifestError",
    "OnBytes",
    "VerifyReport",
    "VerifyTargetError",
    "all_ok",
    "build_manifest",
    "covered_files",
    "hash_file",
    "header_problem",
    "manifest_bytes",
    "manifest_entry_path",
    "read_manifest",
    "safetensors_header",
    "verify_manifest",
    "verify_path",
    "verify_step",
    "verify_targets",
    "write_manifest",
]
