"""Hugging Face weights files: the safetensors format written a tensor at a time, and the small
files beside it (index, config, generation config, tokenizer, manifest, ``COMPLETE``).

Written here rather than with ``safetensors.torch.save_file``: that needs every tensor of a file
in memory at once (here: one at a time, as it arrives) and creates files with mode 0600, which an
inference server running as another user cannot read. The format (8-byte little-endian header
length, JSON header, raw little-endian tensor bytes) is checked against ``safetensors`` and
``transformers.AutoModelForCausalLM.from_pretrained`` in the tests.
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass
from typing import Any

import torch
import xxhash
from torch import nn

from prime_ckpt.layout import CONFIG_FILE, GENERATION_CONFIG_FILE, MANIFEST_FILE, SAFETENSORS_INDEX_FILE, WEIGHTS_MARKER
from prime_ckpt.manifest import ALGORITHM, build_manifest
from prime_ckpt.storage import AnyPath, atomic_write_bytes, fsync_dir

#: torch dtype -> safetensors dtype name (the format's spelling).
SAFETENSORS_DTYPES: dict[torch.dtype, str] = {
    torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
    torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
    torch.bool: "BOOL", torch.float8_e4m3fn: "F8_E4M3", torch.float8_e5m2: "F8_E5M2",
}

#: ``--weights.dtype`` spellings -> torch dtypes.
EXPORT_DTYPES: dict[str, torch.dtype] = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}

# Wrapper tokens that torch.compile / activation checkpointing put into parameter names; the
# published names are the model's own (Hugging Face) names.
_WRAPPER_TOKENS = ("_orig_mod.", "_checkpoint_wrapped_module.", "_fsdp_wrapped_module.")


@dataclass(frozen=True)
class TensorSpec:
    """One published tensor: its name, global shape, export dtype and where its data lives.

    ``shard_dim`` is the dimension split across ``mesh_ranks`` (global ranks, in mesh order;
    torch.chunk sizes, as DTensor's ``Shard``), or ``None`` for a replicated tensor (every rank
    holds all of it; only the owner reads it).
    """

    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype
    owner: int
    shard_dim: int | None = None
    mesh_ranks: tuple[int, ...] = ()

    @property
    def nbytes(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n * _itemsize(self.dtype)


def _itemsize(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


def _itemsize(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


def safetensors_header(specs: list[TensorSpec], metadata: dict[str, str] | None = None) -> bytes:
    """The 8-byte length plus JSON header of a safetensors file holding ``specs`` in order
    (data offsets back to back), padded with spaces to a multiple of 8 bytes as the
    ``safetensors`` library does."""
    header: dict[str, Any] = {"__metadata__": metadata or {"format": "pt"}}
    offset = 0
    for s in specs:
        if s.dtype not in SAFETENSORS_DTYPES:
            raise TypeError(f"{s.name}: dtype {s.dtype} has no safetensors spelling")
        header[s.name] = {"dtype": SAFETENSORS_DTYPES[s.dtype], "shape": list(s.shape), "data_offsets": [offset, offset + s.nbytes]}
        offset += s.nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-(8 + len(raw)) % 8)
    return struct.pack("<Q", len(raw)) + raw


def _clean_name(name: str) -> str:
    for token in _WRAPPER_TOKENS:
        name = name.replace(token, "")
    return name


def _model_class_name(model: nn.Module) -> str:
    """The model's own class name (FSDP2's ``fully_shard`` swaps in a subclass ``FSDP<Name>``)."""
    for cls in type(model).__mro__:
        if not cls.__name__.startswith("FSDP") and issubclass(cls, nn.Module):
            return cls.__name__
    return type(model).__name__


def hf_files(model: nn.Module, dtype: torch.dtype | None, config: dict[str, Any] | None, tokenizer: Any) -> dict[str, bytes]:
    """The small files of a weights directory, as bytes, computed once per publisher.

    ``config.json``: ``config`` if given, else the model's Hugging Face config (``model.config``
    with ``architectures`` and ``dtype`` set as ``save_pretrained`` sets them), else ``{}``.
    ``generation_config.json`` when the model has a generation config; the files
    ``tokenizer.save_pretrained`` writes when a tokenizer is given.
    """
    import copy
    import os
    import tempfile

    files: dict[str, bytes] = {}
    hf_config = getattr(model, "config", None)
    if config is not None:
        files[CONFIG_FILE] = json.dumps(config, indent=2, sort_keys=True).encode()
    elif hf_config is not None and hasattr(hf_config, "to_json_string"):
        cfg = copy.deepcopy(hf_config)
        cfg.architectures = [_model_class_name(model)]
        if dtype is not None or getattr(cfg, "dtype", None) is None:
            params = [p for p in model.parameters() if p.is_floating_point()]
            export = dtype or (params[0].dtype if params else torch.float32)
            cfg.dtype = export
        files[CONFIG_FILE] = cfg.to_json_string(use_diff=False).encode()
        gen = getattr(model, "generation_config", None)
        if gen is not None and hasattr(gen, "to_json_string"):
            files[GENERATION_CONFIG_FILE] = gen.to_json_string(use_diff=True).encode()
    else:
        files[CONFIG_FILE] = b"{}"
    if tokenizer is not None:
        with tempfile.TemporaryDirectory() as tmp:
            tokenizer.save_pretrained(tmp)
            for root, _, names in os.walk(tmp):
                for n in names:
                    rel = os.path.relpath(os.path.join(root, n), tmp)
                    with open(os.path.join(tmp, rel), "rb") as f:
                        files[rel] = f.read()
    return files


def published_tensors(model: nn.Module) -> list[tuple[str, torch.Tensor]]:
    """``(published name, live tensor)`` in state-dict order; tied weights once (first name).
    The published names are the model's own (wrapper tokens removed)."""
    seen: set[int] = set()
    out = []
    for name, value in model.state_dict(keep_vars=True).items():
        if id(value) in seen:
            continue
        seen.add(id(value))
        out.append((_clean_name(name), value))
    return out


def commit_weights_dir(step_dir: AnyPath, specs: list[TensorSpec], entries: list[dict[str, Any]], files: dict[str, bytes]) -> None:
    """Finish ``step_dir`` once every safetensors shard is durable: the index, the small
    ``files`` (configs, tokenizer: :func:`hf_files`), ``manifest.json`` (from the shards'
    manifest ``entries`` ``{"path", "size", "xxh3_64", "tensors"}``, no second read), an fsync of
    the directory, then ``COMPLETE`` last. Raises ``OSError`` from the writes."""
    weight_map = {name: e["path"] for e in sorted(entries, key=lambda e: e["path"]) for name in e["tensors"]}
    index = {"metadata": {"total_size": sum(s.nbytes for s in specs)}, "weight_map": dict(sorted(weight_map.items()))}
    small = {SAFETENSORS_INDEX_FILE: json.dumps(index, indent=2).encode() + b"\n", **files}
    manifest_files = [{k: v for k, v in e.items() if k != "tensors"} for e in entries]
    for rel, data in small.items():
        atomic_write_bytes(step_dir / rel, data)
        manifest_files.append({"path": rel, "size": len(data), ALGORITHM: xxhash.xxh3_64_hexdigest(data)})
    manifest = build_manifest("weights", step_dir, sorted(manifest_files, key=lambda e: e["path"]))
    atomic_write_bytes(step_dir / MANIFEST_FILE, manifest)
    fsync_dir(step_dir)
    atomic_write_bytes(step_dir / WEIGHTS_MARKER, b"")


def _bytes_of(t: torch.Tensor) -> memoryview:
    """A zero-copy byte view of a contiguous CPU tensor (any dtype, bf16 included)."""
    flat = t.reshape(-1)
    if not flat.numel():
        return memoryview(b"")
    return memoryview(flat.view(torch.uint8).numpy()).cast("B")
