"""The safetensors file format, header only: read and check a ``.safetensors`` header.

A safetensors file is an 8-byte little-endian header length, a JSON header (tensor name ->
``{dtype, shape, data_offsets}``, plus optional ``__metadata__``) and the tensor data.
:func:`safetensors_header` reads the header alone (never tensor data, never torch) and
:func:`header_problem` checks it is consistent (pure). :data:`SAFETENSORS_DTYPES` names each
safetensors dtype as torch does; :func:`stand_in_dtype` gives its element size without torch.
"""

from __future__ import annotations

import json
import struct
from typing import Any

from prime_ckpt.dcp_metadata import DTYPES
from prime_ckpt.storage import AnyPath, to_path

#: safetensors dtype -> name of the torch dtype (``getattr(torch, name)``; without torch,
#: ``dcp_metadata.DTYPES[name]`` has its element size).
SAFETENSORS_DTYPES: dict[str, str] = {
    "BOOL": "bool", "U8": "uint8", "I8": "int8", "I16": "int16", "I32": "int32", "I64": "int64",
    "F16": "float16", "BF16": "bfloat16", "F32": "float32", "F64": "float64", "U16": "uint16",
    "U32": "uint32", "U64": "uint64", "F8_E4M3": "float8_e4m3fn", "F8_E5M2": "float8_e5m2",
}  # fmt: skip


def stand_in_dtype(st_dtype: str) -> Any:
    """The torch-free dtype stand-in (``dcp_metadata.DTYPES``: ``itemsize``, ``str()`` =
    ``"torch.<name>"``) of a safetensors dtype name (``"BF16"``), or None for a dtype newer than
    :data:`SAFETENSORS_DTYPES`."""
    return DTYPES.get(SAFETENSORS_DTYPES.get(st_dtype, ""))


def safetensors_header(path: AnyPath) -> tuple[dict[str, Any], int]:
    """``(header, expected file size)`` of a safetensors file, reading only its header.

    Raises ``ValueError`` (one line, names the file) for a file that is not safetensors.
    """
    with to_path(path).open("rb") as f:
        raw = f.read(8)
        if len(raw) < 8:
            raise ValueError(f"{path}: not a safetensors file (shorter than its 8-byte header length)")
        (n,) = struct.unpack("<Q", raw)
        if n > 100_000_000:
            raise ValueError(f"{path}: not a safetensors file (header length {n})")
        text = f.read(n)
    try:
        header = json.loads(text)
        end = max((int(v["data_offsets"][1]) for k, v in header.items() if k != "__metadata__"), default=0)
    except (ValueError, KeyError, TypeError, IndexError, AttributeError, RecursionError):
        raise ValueError(f"{path}: not a safetensors file (unreadable header)") from None
    if (why := header_problem(header)) is not None:
        raise ValueError(f"{path}: not a valid safetensors file ({why})")
    return header, 8 + n + end


def header_problem(header: dict[str, Any]) -> str | None:
    """Why a parsed safetensors header is inconsistent, or None (pure; the rules the
    ``safetensors`` library enforces when it opens a file, checked before it does so that a
    bad file is one line naming the tensor): every entry has a dtype name, a shape of
    non-negative ints, and ``data_offsets`` ``[begin, end]`` with ``end - begin`` = numel x
    element size (for the dtypes :data:`SAFETENSORS_DTYPES` knows); the entries, in offset order, tile the data from byte 0 with no gap or overlap.
    """
    spans = []
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        if not isinstance(entry, dict):
            return f"tensor {name!r}: not an object"
        shape, offsets, dtype = entry.get("shape"), entry.get("data_offsets"), entry.get("dtype")
        if not isinstance(shape, list) or not all(isinstance(s, int) and not isinstance(s, bool) and s >= 0 for s in shape):
            return f"tensor {name!r}: shape {shape!r} is not a list of non-negative ints"
        if not (isinstance(offsets, list) and len(offsets) == 2 and all(isinstance(o, int) and not isinstance(o, bool) for o in offsets)
                and 0 <= offsets[0] <= offsets[1]):
            return f"tensor {name!r}: data_offsets {offsets!r} are not [begin, end] with 0 <= begin <= end"
        if not isinstance(dtype, str):
            return f"tensor {name!r}: dtype {dtype!r} is not a string"
        stand_in = stand_in_dtype(dtype)  # None: a dtype newer than this table
        numel = 1
        for s in shape:
            numel *= s
        if stand_in is not None and offsets[1] - offsets[0] != numel * stand_in.itemsize:
            return (f"tensor {name!r}: data_offsets {offsets} hold {offsets[1] - offsets[0]} bytes, "
                    f"but shape {shape} {dtype} needs {numel * stand_in.itemsize}")
        spans.append((offsets[0], offsets[1], name))
    at = 0
    for begin, end, name in sorted(spans):
        if begin != at:
            return f"tensor {name!r}: data_offsets start at {begin}, expected {at} ({'overlap' if begin < at else 'gap'})"
        at = end
    return None
