"""Read the history records of an offline W&B run file (``run-<id>.wandb``), for tests.

The file is a W&B header (``:W&B`` + magic + version, 7 bytes) followed by a LevelDB-style log:
32 KiB blocks of records, each ``crc32 (4) | length (2, LE) | type (1)`` + payload, a payload
split over blocks as FIRST/MIDDLE/LAST. Payloads are ``wandb_internal_pb2.Record`` messages.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

BLOCK = 32 * 1024
HEADER = 7
FULL, FIRST, MIDDLE, LAST = 1, 2, 3, 4


def _payloads(data: bytes):
    pos, pending = HEADER, b""
    while pos + 7 <= len(data):
        left_in_block = BLOCK - (pos % BLOCK)
        if left_in_block < 7:
            pos += left_in_block
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        chunk = data[pos + 7 : pos + 7 + length]
        pos += 7 + length
        if kind == FULL:
            yield chunk
        elif kind == FIRST:
            pending = chunk
        elif kind == MIDDLE:
            pending += chunk
        elif kind == LAST:
            yield pending + chunk
            pending = b""
        else:
            break


def read_run(path: Path) -> tuple[str | None, list[dict]]:
    """``(run_id, [history row as {key: value}])`` of one offline run file."""
    from wandb.proto import wandb_internal_pb2

    run_id, rows = None, []
    for payload in _payloads(Path(path).read_bytes()):
        rec = wandb_internal_pb2.Record()
        rec.ParseFromString(payload)
        kind = rec.WhichOneof("record_type")
        if kind == "run":
            run_id = rec.run.run_id
        elif kind == "history":
            rows.append({(i.key or "/".join(i.nested_key)): json.loads(i.value_json) for i in rec.history.item})
    return run_id, rows
