"""The history rows of an offline W&B run, read from its `run-<id>.wandb` file.

wandb >= 0.2x reads these files only in its Go core; the format is LevelDB's log format with a
W&B file header: 32 KiB blocks of records (crc32, length, type: full / first / middle / last),
each payload a `wandb_internal_pb2.Record`. History records hold the logged values as JSON.
"""

import json
import struct
from pathlib import Path

BLOCK, HEADER = 32768, 7
FULL, FIRST, MIDDLE, LAST = 1, 2, 3, 4


def _payloads(data: bytes):
    ident, magic, version = struct.unpack("<4sHB", data[:HEADER])
    assert (ident, magic, version) == (b":W&B", 0xBEE1, 0), "not a W&B run file"
    pos, parts = HEADER, []
    while pos + HEADER <= len(data):
        if BLOCK - pos % BLOCK < HEADER:  # the block's tail is too short for a header: padding
            pos += BLOCK - pos % BLOCK
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos:pos + HEADER])
        if kind == 0 and length == 0:
            break
        parts.append(data[pos + HEADER:pos + HEADER + length])
        pos += HEADER + length
        if kind in (FULL, LAST):
            yield b"".join(parts)
            parts = []


def history(run_file: Path) -> dict[int, dict]:
    """{step: {key: value}} of every `run.log`, rows of the same step merged."""
    from wandb.proto import wandb_internal_pb2

    rows: dict[int, dict] = {}
    for payload in _payloads(Path(run_file).read_bytes()):
        record = wandb_internal_pb2.Record()
        record.ParseFromString(payload)
        if record.WhichOneof("record_type") != "history":
            continue
        items = {(i.key or "/".join(i.nested_key)): json.loads(i.value_json) for i in record.history.item}
        step = items.pop("_step", record.history.step.num)
        rows.setdefault(int(step), {}).update({k: v for k, v in items.items() if not k.startswith("_")})
    return rows
