"""Reading an offline wandb run's ``run-<id>.wandb`` file: the records wandb itself wrote.

The file is wandb's transaction log: a 7-byte header (``:W&B``, magic 0xBEE1, version 0) then the
LevelDB log format (32 KiB blocks of chunks: crc32c u32, length u16, type u8 with FULL=1 /
FIRST=2 / MIDDLE=3 / LAST=4), each record a ``wandb_internal_pb2.Record`` protobuf (wandb's own
message class parses them). wandb no longer ships a Python reader of its own, hence this one.
"""
from __future__ import annotations

import json
import struct
from pathlib import Path

_BLOCK = 32 * 1024
_HEADER = b":W&B" + struct.pack("<H", 0xBEE1) + b"\x00"


def read_records(path: str | Path) -> list:
    """Every record of a .wandb file, in order (``Record`` protobuf messages)."""
    from wandb.proto import wandb_internal_pb2

    data = Path(path).read_bytes()
    if not data.startswith(_HEADER):
        raise ValueError(f"{path}: not a wandb transaction log (header {data[:7]!r})")
    pos, pending, records = len(_HEADER), b"", []
    while pos + 7 <= len(data):
        room = _BLOCK - pos % _BLOCK
        if room < 7:          # block trailer: zero padding
            pos += room
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        chunk = data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind == 0 and length == 0:
            continue
        pending += chunk
        if kind in (1, 4):    # FULL or LAST: a whole record
            rec = wandb_internal_pb2.Record()
            rec.ParseFromString(pending)
            records.append(rec)
            pending = b""
    return records


def summary(path: str | Path) -> dict:
    """What a test checks: ``run_id``, ``config`` (key -> value), ``history`` (list of
    {key: value} per logged step, ``_step`` included) and ``media`` (paths of logged images)."""
    out: dict = {"run_id": None, "config": {}, "history": [], "media": []}
    for rec in read_records(path):
        which = rec.WhichOneof("record_type")
        if which == "run":
            out["run_id"] = rec.run.run_id
            for item in rec.run.config.update:
                out["config"][item.key] = json.loads(item.value_json)
        elif which == "config":
            for item in rec.config.update:
                out["config"][item.key] = json.loads(item.value_json)
        elif which == "history":
            row = {}
            for item in rec.history.item:
                key = item.key or "/".join(item.nested_key)
                row[key] = json.loads(item.value_json)
            out["history"].append(row)
        elif which == "files":
            out["media"].extend(f.path for f in rec.files.files if f.path.startswith("media/"))
    return out
