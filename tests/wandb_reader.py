"""Read a W&B offline run file (`run-*.wandb`) back, to check what raycls logged.

wandb >= 0.2x no longer ships a Python reader (its core is in Go), so this is the documented record format:
a 7-byte header (":W&B", magic 0xBEE1, version 0), then LevelDB-log records in 32 KiB blocks, each record
`crc32 (4) | length (2, LE) | type (1: full, 2: first, 3: middle, 4: last)` followed by a protobuf `Record`.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path
from typing import Any

BLOCK = 32 * 1024
HEADER = 7


def records(path: Path) -> list[Any]:
    from wandb.proto import wandb_internal_pb2

    data = path.read_bytes()
    assert data[:4] == b":W&B", f"{path} is not a W&B run file"
    out, pos, pending = [], HEADER, b""
    while pos + HEADER <= len(data):
        room = BLOCK - pos % BLOCK
        if room < HEADER:  # the rest of a block too small for a header is padding
            pos += room
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos : pos + HEADER])
        if kind == 0 and length == 0:
            break
        payload = data[pos + HEADER : pos + HEADER + length]
        pos += HEADER + length
        pending = payload if kind in (1, 2) else pending + payload
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            out.append(record)
            pending = b""
    return out


def read_run(run_dir: Path) -> dict[str, Any]:
    """{"config": {...}, "history": [{...}, ...], "summary": {...}, "group": ..., "name": ...} of one run."""
    (file,) = run_dir.glob("run-*.wandb")
    result: dict[str, Any] = {"config": {}, "history": [], "summary": {}}
    for record in records(file):
        kind = record.WhichOneof("record_type")
        if kind == "run":
            result["group"], result["name"] = record.run.run_group, record.run.display_name
            for item in record.run.config.update:
                result["config"][item.key] = json.loads(item.value_json)
        elif kind == "config":
            for item in record.config.update:
                result["config"][item.key] = json.loads(item.value_json)
        elif kind == "history":
            result["history"].append(
                {i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in record.history.item}
            )
        elif kind == "summary":
            for item in record.summary.update:
                result["summary"][item.key or "/".join(item.nested_key)] = json.loads(item.value_json)
    return result
