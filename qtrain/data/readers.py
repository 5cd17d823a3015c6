"""Streaming corpus readers: parquet, JSON lines, JSON arrays, csv, txt and Arrow IPC.

Input is a file, a directory (every supported file below it, sorted) or a glob. Nothing reads a
whole input into memory: files are cut into `Chunk`s of a few MB, which `preprocess` ships to worker
processes; `decode_chunk` (run in the worker) turns a chunk into records. The split keeps the costly
parts (JSON parsing, UTF-8 validation, Arrow -> Python conversion) out of the reading process.

Every record carries its location (`file:line N`, `file row N`, `file record N (line L)`), and every
problem is reported against it: malformed JSON, non-UTF-8 bytes, a value that is not an object.

Formats, by suffix (or `fmt=`):

- ``.parquet``: row batches (`pyarrow.parquet.ParquetFile.iter_batches`), only the needed columns.
- ``.jsonl`` / ``.ndjson``: one JSON object per line; blank lines are skipped (and counted).
- ``.json``: JSON lines, or one JSON array of objects (detected from the first character), streamed
  with `json.JSONDecoder.raw_decode` over 1 MB reads.
- ``.csv`` / ``.tsv``: a header row gives the keys (Python's csv module).
- ``.txt``: one document per file (``txt_mode="file"``), or one per non-blank line (``"line"``);
  the text is under the key ``text``.
- ``.arrow`` / ``.feather`` / ``.ipc``: Arrow IPC file or stream (Hugging Face datasets' cache files).
"""

from __future__ import annotations

import csv
import glob as globlib
import json
import os
import sys
from dataclasses import dataclass, field
from typing import Any, Iterator

from qtrain.errors import DataError

SUFFIX_FORMATS = {
    ".parquet": "parquet",
    ".jsonl": "jsonl",
    ".ndjson": "jsonl",
    ".json": "json",
    ".csv": "csv",
    ".tsv": "csv",
    ".txt": "txt",
    ".arrow": "arrow",
    ".feather": "arrow",
    ".ipc": "arrow",
}
FORMATS = ("parquet", "jsonl", "json", "csv", "txt", "arrow")
CHUNK_BYTES = 4 << 20  # input bytes per chunk: large enough that shipping it costs nothing
CHUNK_RECORDS = 4096  # and a cap on records, so tiny records still flow in moderate batches


class RecordError(Exception):
    """One bad record: `kind` is the summary bucket (e.g. 'malformed JSON'), the message the detail."""

    def __init__(self, kind: str, message: str):
        super().__init__(message)
        self.kind = kind


@dataclass
class Chunk:
    """A slice of one input file, decoded into records by `decode_chunk` (in a worker process).

    kind: 'lines' (raw JSON-lines bytes), 'text_lines' (raw txt lines), 'texts' (whole txt files,
    `names` holds their paths), 'rows' (already-decoded dicts) or 'arrow' (a pyarrow RecordBatch).
    Item k sits at `locs[k]` if given, else at `start + k` (a 1-based line or row number).
    """

    path: str
    kind: str
    start: int
    items: Any
    nbytes: int
    unit: str = "line"
    locs: list | None = None
    names: list | None = None

    def location(self, k: int) -> str:
        if self.kind == "texts":
            return self.names[k]
        loc = self.locs[k] if self.locs is not None else self.start + k
        if self.unit == "record":  # JSON array: (record ordinal, line)
            return f"{self.path}: record {loc[0]} (line {loc[1]})"
        if self.unit == "row":
            return f"{self.path}: row {loc}"
        return f"{self.path}:{loc}"


@dataclass
class InputFile:
    path: str
    fmt: str
    size: int = field(default=0)


def detect_format(path: str) -> str:
    """Format of `path` from its suffix; an error naming the file and the formats otherwise."""
    suffix = os.path.splitext(path)[1].lower()
    if suffix not in SUFFIX_FORMATS:
        raise DataError(
            f"{path}: unknown input format {suffix or '(no suffix)'!r}; supported suffixes: "
            f"{', '.join(sorted(SUFFIX_FORMATS))} (or pass --input-format)"
        )
    return SUFFIX_FORMATS[suffix]


def list_inputs(spec: str, fmt: str | None = None) -> list[InputFile]:
    """Expand a file, a directory (recursive, sorted, supported suffixes only) or a glob."""
    if fmt is not None and fmt not in FORMATS:
        raise DataError(f"--input-format {fmt!r}: choose one of {', '.join(FORMATS)}")
    if os.path.isdir(spec):
        paths = []
        for root, dirs, files in os.walk(spec):
            dirs[:] = sorted(d for d in dirs if not d.startswith("."))
            paths += [
                os.path.join(root, f)
                for f in sorted(files)
                if not f.startswith(".") and (fmt or os.path.splitext(f)[1].lower() in SUFFIX_FORMATS)
            ]
        if not paths:
            raise DataError(f"--input {spec}: the directory holds no {fmt or 'supported'} files")
    elif os.path.isfile(spec):
        paths = [spec]
    else:
        paths = sorted(p for p in globlib.glob(spec, recursive=True) if os.path.isfile(p))
        if not paths:
            raise DataError(f"--input {spec}: no such file or directory, and no file matches it as a glob")
    return [InputFile(p, fmt or detect_format(p), os.path.getsize(p)) for p in paths]


# --------------------------------------------------------------------------- reading (main process)


def iter_chunks(
    f: InputFile, columns: list[str] | None = None, txt_mode: str = "file", chunk_bytes: int = CHUNK_BYTES
) -> Iterator[Chunk]:
    """Cut one input file into chunks. `columns` limits columnar reads (parquet/arrow) and is checked."""
    try:
        if f.fmt == "parquet":
            yield from _parquet_chunks(f.path, columns, chunk_bytes)
        elif f.fmt == "arrow":
            yield from _arrow_chunks(f.path, columns, chunk_bytes)
        elif f.fmt == "csv":
            yield from _csv_chunks(f.path, chunk_bytes)
        elif f.fmt == "txt":
            if txt_mode == "line":
                yield from _line_chunks(f.path, "text_lines", chunk_bytes)
            else:
                yield Chunk(f.path, "texts", 1, [_read_bytes(f.path)], f.size, names=[f.path])
        elif f.fmt == "json" and _first_char(f.path) == "[":
            yield from _json_array_chunks(f.path, chunk_bytes)
        elif f.fmt in ("json", "jsonl"):
            yield from _line_chunks(f.path, "lines", chunk_bytes)
        else:
            raise DataError(f"{f.path}: unsupported format {f.fmt!r}")
    except OSError as exc:
        raise DataError(f"{f.path}: cannot read: {exc.strerror or exc}") from exc


def _read_bytes(path: str) -> bytes:
    with open(path, "rb") as fh:
        return fh.read()


def _first_char(path: str) -> str:
    with open(path, "rb") as fh:
        while block := fh.read(4096):
            stripped = block.lstrip(b" \t\r\n\xef\xbb\xbf")
            if stripped:
                return chr(stripped[0])
    return ""


def _line_chunks(path: str, kind: str, chunk_bytes: int) -> Iterator[Chunk]:
    """Raw lines (without the newline), grouped by size. Blank lines are kept as items so that
    item k is line start+k; decode_chunk drops and counts them."""
    with open(path, "rb") as fh:
        items: list[bytes] = []
        start, size = 1, 0
        for line in fh:
            items.append(line)
            size += len(line)
            if size >= chunk_bytes or len(items) >= CHUNK_RECORDS:
                yield Chunk(path, kind, start, items, size)
                start += len(items)
                items, size = [], 0
        if items:
            yield Chunk(path, kind, start, items, size)


def _json_array_chunks(path: str, chunk_bytes: int) -> Iterator[Chunk]:
    """Objects of a top-level JSON array, decoded one by one from 1 MB reads.

    A record that does not parse is an error at its ordinal and line (a truncated file shows as
    the last record failing); records cannot be skipped inside an array, since its framing is lost.
    """
    decoder = json.JSONDecoder()
    read_size = 1 << 20
    with open(path, "r", encoding="utf-8", errors="surrogateescape", newline="") as fh:
        buf = fh.read(read_size).lstrip("\ufeff \t\r\n")
        if not buf.startswith("["):
            raise DataError(f"{path}: expected a JSON array starting with '['")
        pos, line, ordinal, eof = 1, 1, 0, False
        items: list[dict] = []
        locs: list[tuple[int, int]] = []
        size = 0
        while True:
            # skip separators between records, counting lines
            while True:
                while pos < len(buf) and buf[pos] in " \t\r\n,":
                    line += buf[pos] == "\n"
                    pos += 1
                if pos < len(buf) or eof:
                    break
                buf, pos = fh.read(read_size), 0
                eof = not buf
            if pos >= len(buf):
                raise DataError(f"{path}: the JSON array ends without ']' after record {ordinal} (line {line})")
            if buf[pos] == "]":
                break
            ordinal += 1
            while True:
                try:
                    obj, end = decoder.raw_decode(buf, pos)
                    break
                except json.JSONDecodeError as exc:
                    more = "" if eof else fh.read(max(read_size, len(buf)))
                    if not more:
                        eof = True
                        raise DataError(
                            f"{path}: record {ordinal} (line {line}): malformed JSON: {exc.msg} "
                            f"(at line {line + buf.count(chr(10), pos, exc.pos)}); fix the record or "
                            "convert the file to JSON lines and use --skip-bad-records"
                        ) from None
                    buf = buf[pos:] + more
                    pos = 0
            items.append(obj)
            locs.append((ordinal, line))
            size += end - pos
            line += buf.count("\n", pos, end)
            pos = end
            if size >= chunk_bytes or len(items) >= CHUNK_RECORDS:
                yield Chunk(path, "rows", 1, items, size, unit="record", locs=locs)
                items, locs, size = [], [], 0
            if pos > read_size:  # drop what has been consumed, so the buffer stays ~1 record + 1 MB
                buf, pos = buf[pos:], 0
        if items:
            yield Chunk(path, "rows", 1, items, size, unit="record", locs=locs)


def _csv_chunks(path: str, chunk_bytes: int) -> Iterator[Chunk]:
    csv.field_size_limit(sys.maxsize if sys.maxsize < 2**63 else 2**31 - 1)
    dialect = "excel-tab" if path.lower().endswith(".tsv") else "excel"
    # surrogateescape: undecodable bytes survive to decode_chunk, which names the row
    with open(path, "r", encoding="utf-8-sig", errors="surrogateescape", newline="") as fh:
        reader = csv.reader(fh, dialect=dialect)
        try:
            header = next(reader)
        except StopIteration:
            return
        except csv.Error as exc:
            raise DataError(f"{path}:1: malformed CSV header: {exc}") from None
        items, locs, size, row = [], [], 0, 0
        while True:
            try:
                values = next(reader)
            except StopIteration:
                break
            except csv.Error as exc:
                raise DataError(f"{path}:{reader.line_num}: malformed CSV: {exc}") from None
            row += 1
            if not values:
                continue
            if len(values) != len(header):
                items.append(RecordError("malformed CSV", f"{len(values)} fields, the header has {len(header)}"))
            else:
                items.append(dict(zip(header, values)))
            locs.append(row)
            size += sum(map(len, values))
            if size >= chunk_bytes or len(items) >= CHUNK_RECORDS:
                yield Chunk(path, "rows", 1, items, size, unit="row", locs=locs)
                items, locs, size = [], [], 0
        if items:
            yield Chunk(path, "rows", 1, items, size, unit="row", locs=locs)


def _check_columns(path: str, names: list[str], columns: list[str] | None) -> list[str] | None:
    if columns is None:
        return None
    missing = [c for c in columns if c not in names]
    if missing:
        raise DataError(
            f"{path}: no column {', '.join(map(repr, missing))}; the file has {', '.join(map(repr, names))} "
            "(choose with --json-keys, or --map-keys for instruction data)"
        )
    return columns


def _batches_to_chunks(
    path: str, batches: Iterator[Any], chunk_bytes: int, bytes_per_row: float | None = None
) -> Iterator[Chunk]:
    """Slices of record batches; nbytes is the share of the file (bytes_per_row) when known."""
    row = 1
    for batch in batches:
        if batch.num_rows == 0:
            continue
        # Slice big batches so one chunk stays near chunk_bytes.
        per_row = max(1, batch.nbytes // batch.num_rows)
        step = max(1, min(CHUNK_RECORDS, chunk_bytes // per_row))
        for off in range(0, batch.num_rows, step):
            part = batch.slice(off, step)
            nbytes = int(part.num_rows * bytes_per_row) if bytes_per_row else part.nbytes
            yield Chunk(path, "arrow", row, part, nbytes, unit="row")
            row += part.num_rows


def _parquet_chunks(path: str, columns: list[str] | None, chunk_bytes: int) -> Iterator[Chunk]:
    import pyarrow.parquet as pq

    try:
        pf = pq.ParquetFile(path)
    except Exception as exc:  # pyarrow raises ArrowInvalid/OSError for a non-parquet file
        raise DataError(f"{path}: not a readable parquet file: {exc}") from None
    cols = _check_columns(path, pf.schema_arrow.names, columns)
    rows_per_batch = 1024
    if pf.metadata.num_rows and pf.metadata.num_row_groups:
        rg = pf.metadata.row_group(0)
        per_row = max(1, rg.total_byte_size // max(1, rg.num_rows))
        rows_per_batch = max(1, min(CHUNK_RECORDS, chunk_bytes // per_row))
    file_share = os.path.getsize(path) / max(1, pf.metadata.num_rows)  # progress in file bytes
    batches = pf.iter_batches(batch_size=rows_per_batch, columns=cols)
    yield from _batches_to_chunks(path, batches, chunk_bytes, file_share)


def _arrow_chunks(path: str, columns: list[str] | None, chunk_bytes: int) -> Iterator[Chunk]:
    import pyarrow as pa

    source = pa.memory_map(path, "r")
    try:
        reader = pa.ipc.open_file(source)
        schema = reader.schema
        batches = (reader.get_batch(i) for i in range(reader.num_record_batches))
    except pa.ArrowInvalid:
        source.seek(0)
        try:
            reader = pa.ipc.open_stream(source)
        except pa.ArrowInvalid as exc:
            raise DataError(f"{path}: not an Arrow IPC file or stream: {exc}") from None
        schema = reader.schema
        batches = iter(reader)
    cols = _check_columns(path, schema.names, columns)
    if cols is not None:
        batches = (b.select(cols) for b in batches)
    yield from _batches_to_chunks(path, batches, chunk_bytes)


# --------------------------------------------------------------------------- decoding (worker)


def _utf8(raw: bytes) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise RecordError(
            "not UTF-8",
            f"not valid UTF-8 (byte {exc.start}: {raw[exc.start:exc.start + 4]!r}); re-encode the file as "
            "UTF-8, e.g. `iconv -f latin1 -t utf-8`",
        ) from None


def check_text(value: str) -> str:
    """Refuse strings that are not valid Unicode text (lone surrogates from bad bytes or \\ud800 escapes)."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise RecordError(
            "not UTF-8",
            f"text holds invalid characters at position {exc.start} ({value[exc.start]!r}: undecodable bytes "
            "or a lone surrogate escape); re-encode the file as UTF-8",
        ) from None
    return value


def decode_chunk(chunk: Chunk) -> Iterator[tuple[int, Any]]:
    """(item index, record dict or RecordError) for every record of a chunk; blank lines are dropped.

    Call `chunk.location(k)` for the place of item k. Strings from csv and JSON arrays may still hold
    undecodable bytes: consumers pass values through `check_text`.
    """
    kind = chunk.kind
    if kind == "lines":
        loads = json.loads
        for k, raw in enumerate(chunk.items):
            if raw.isspace() or not raw:
                continue
            if k == 0 and chunk.start == 1:
                raw = raw.removeprefix(b"\xef\xbb\xbf")  # a UTF-8 byte order mark opening the file
            try:
                obj = loads(_utf8(raw.rstrip(b"\r\n")))
            except RecordError as exc:
                yield k, exc
                continue
            except ValueError as exc:
                yield k, RecordError("malformed JSON", f"malformed JSON: {exc}")
                continue
            if not isinstance(obj, dict):
                yield k, RecordError("not an object", f"expected a JSON object, got {type(obj).__name__}")
                continue
            yield k, obj
    elif kind == "text_lines":
        for k, raw in enumerate(chunk.items):
            if raw.isspace() or not raw:
                continue
            try:
                yield k, {"text": _utf8(raw.rstrip(b"\r\n"))}
            except RecordError as exc:
                yield k, exc
    elif kind == "texts":
        for k, raw in enumerate(chunk.items):
            try:
                yield k, {"text": _utf8(raw)}
            except RecordError as exc:
                yield k, exc
    elif kind == "rows":
        for k, obj in enumerate(chunk.items):
            if not isinstance(obj, (dict, RecordError)):
                obj = RecordError("not an object", f"expected a JSON object, got {type(obj).__name__}")
            yield k, obj
    elif kind == "arrow":
        yield from enumerate(chunk.items.to_pylist())
    else:
        raise ValueError(f"unknown chunk kind {kind!r}")


def blank_lines(chunk: Chunk) -> int:
    """Number of blank lines in a line-based chunk (reported in the summary, never an error)."""
    if chunk.kind not in ("lines", "text_lines"):
        return 0
    return sum(1 for raw in chunk.items if not raw or raw.isspace())


def iter_records(
    spec: str, fmt: str | None = None, columns: list[str] | None = None, txt_mode: str = "file"
) -> Iterator[tuple[str, dict]]:
    """(location, record) for every record of an input, in order; the first bad record raises DataError.

    The simple in-process API (tests, small tools); `preprocess` runs the same steps across processes.
    """
    for f in list_inputs(spec, fmt):
        for chunk in iter_chunks(f, columns, txt_mode):
            for k, rec in decode_chunk(chunk):
                if isinstance(rec, RecordError):
                    raise DataError(f"{chunk.location(k)}: {rec}")
                yield chunk.location(k), rec
