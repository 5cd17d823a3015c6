"""The history rows of an offline W&B run, read from its `run-<id>.wandb` file.

wandb >= 0.2x reads these files only in its Go core; the format is LevelDB's log format with a
W&B file header: 32 KiB blocks of records (crc32, length, type: full / first / middle / last),
each payload a `wandb_internal_pb2.Record`. History records hold the logged values as JSON.
"""

import json
import struct
import time
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


def _records(run_file: Path, wait_s: float):
    """The file's records, once its writer has closed it with the `exit` record: wandb's core
    process may still be flushing it when `run.finish()` returns."""
    from wandb.proto import wandb_internal_pb2

    deadline = time.monotonic() + wait_s
    while True:
        records = []
        for payload in _payloads(Path(run_file).read_bytes()):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(payload)
            records.append(record)
        if any(r.WhichOneof("record_type") == "exit" for r in records) or time.monotonic() > deadline:
            return records
        time.sleep(0.2)


def history(run_file: Path, wait_s: float = 60.0) -> dict[int, dict]:
    """{step: {key: value}} of every `run.log`, rows of the same step merged."""
    rows: dict[int, dict] = {}
    for record in _records(run_file, wait_s):
        if record.WhichOneof("record_type") != "history":
            continue
        items = {(i.key or "/".join(i.nested_key)): json.loads(i.value_json) for i in record.history.item}
        step = items.pop("_step", record.history.step.num)
        rows.setdefault(int(step), {}).update({k: v for k, v in items.items() if not k.startswith("_")})
    return rows
