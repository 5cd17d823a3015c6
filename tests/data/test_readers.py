"""Streaming readers: every format gives the same records, and bad input names file, line/row, reason."""

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from qtrain.data.readers import (
    Chunk,
    RecordError,
    check_text,
    decode_chunk,
    iter_chunks,
    iter_records,
    list_inputs,
)
from qtrain.errors import DataError

RECORDS = [{"text": t, "n": str(i)} for i, t in enumerate(["first doc", "zweite Zeile ü", "", "中文 \U0001f600", 'q "x", y'])]


def _write_all(d):
    (d / "a.jsonl").write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in RECORDS), encoding="utf-8")
    (d / "b.json").write_text(json.dumps(RECORDS, ensure_ascii=False, indent=2), encoding="utf-8")
    (d / "c.json").write_text("\n".join(json.dumps(r) for r in RECORDS), encoding="utf-8")  # JSON lines in .json
    pq.write_table(pa.Table.from_pylist(RECORDS), d / "d.parquet", row_group_size=2)
    table = pa.Table.from_pylist(RECORDS)
    with pa.OSFile(str(d / "e.arrow"), "wb") as f, pa.ipc.new_stream(f, table.schema) as w:
        w.write_table(table, max_chunksize=2)
    with pa.OSFile(str(d / "f.feather"), "wb") as f, pa.ipc.new_file(f, table.schema) as w:
        w.write_table(table)
    import csv

    with open(d / "g.csv", "w", encoding="utf-8", newline="") as f:
        w = csv.writer(f)
        w.writerow(["text", "n"])
        w.writerows([r["text"], r["n"]] for r in RECORDS)


def test_every_format_yields_the_same_records(tmp_path):
    _write_all(tmp_path)
    files = list_inputs(str(tmp_path))
    assert [f.fmt for f in files] == ["jsonl", "json", "json", "parquet", "arrow", "arrow", "csv"]
    for f in files:
        got = [rec for _, rec in iter_records(f.path, columns=["text", "n"] if f.fmt in ("parquet", "arrow") else None)]
        assert got == RECORDS, f.path


def test_locations(tmp_path):
    _write_all(tmp_path)
    locs = {f.path.rsplit("/", 1)[1]: [loc for loc, _ in iter_records(f.path)] for f in list_inputs(str(tmp_path))}
    assert locs["a.jsonl"][1] == f"{tmp_path}/a.jsonl:2"
    assert locs["b.json"][1] == f"{tmp_path}/b.json: record 2 (line 6)"
    assert locs["d.parquet"][3] == f"{tmp_path}/d.parquet: row 4"
    assert locs["g.csv"][4] == f"{tmp_path}/g.csv: row 5"


def test_txt_modes(tmp_path):
    (tmp_path / "one.txt").write_text("line one\n\n  \nline two\r\n", encoding="utf-8")
    assert [r for _, r in iter_records(str(tmp_path / "one.txt"))] == [{"text": "line one\n\n  \nline two\r\n"}]
    got = list(iter_records(str(tmp_path / "one.txt"), txt_mode="line"))
    assert got == [(f"{tmp_path}/one.txt:1", {"text": "line one"}), (f"{tmp_path}/one.txt:4", {"text": "line two"})]


def test_directory_and_glob(tmp_path):
    (tmp_path / "sub").mkdir()
    for name in ("b.jsonl", "a.jsonl", "sub/c.jsonl"):
        (tmp_path / name).write_text('{"text": "%s"}\n' % name)
    (tmp_path / "notes.md").write_text("ignored")
    (tmp_path / ".hidden.jsonl").write_text("ignored")
    assert [r["text"] for _, r in iter_records(str(tmp_path))] == ["a.jsonl", "b.jsonl", "sub/c.jsonl"]
    assert [r["text"] for _, r in iter_records(str(tmp_path / "*.jsonl"))] == ["a.jsonl", "b.jsonl"]
    with pytest.raises(DataError, match="no such file or directory, and no file matches"):
        list_inputs(str(tmp_path / "nope*.jsonl"))
    with pytest.raises(DataError, match=r"unknown input format '.md'.*--input-format"):
        list_inputs(str(tmp_path / "notes.md"))
    assert list_inputs(str(tmp_path / "notes.md"), fmt="txt")[0].fmt == "txt"
    with pytest.raises(DataError, match="--input-format 'xml'"):
        list_inputs(str(tmp_path), fmt="xml")


def test_jsonl_bad_records_name_line_and_reason(tmp_path):
    p = tmp_path / "bad.jsonl"
    p.write_bytes(b'{"text": "ok"}\n\n{"text": "broken\n[1, 2]\n{"text": "caf\xe9"}\n{"text": "\\ud800"}\n')
    [chunk] = list(iter_chunks(list_inputs(str(p))[0]))
    got = [(chunk.location(k), r) for k, r in decode_chunk(chunk)]
    assert got[0] == (f"{p}:1", {"text": "ok"})  # line 2 is blank: dropped
    assert got[1][0] == f"{p}:3" and got[1][1].kind == "malformed JSON" and "Unterminated string" in str(got[1][1])
    assert got[2][0] == f"{p}:4" and got[2][1].kind == "not an object" and "got list" in str(got[2][1])
    assert got[3][0] == f"{p}:5" and got[3][1].kind == "not UTF-8" and "iconv" in str(got[3][1])
    with pytest.raises(RecordError, match="lone surrogate"):  # valid JSON, invalid text
        check_text(got[4][1]["text"])
    with pytest.raises(DataError, match=rf"{p}:3: malformed JSON"):
        list(iter_records(str(p)))


def test_bom_and_crlf_jsonl(tmp_path):
    p = tmp_path / "win.jsonl"
    p.write_bytes(b'\xef\xbb\xbf{"text": "a"}\r\n{"text": "b"}\r\n')
    assert [r for _, r in iter_records(str(p))] == [{"text": "a"}, {"text": "b"}]


def test_latin1_txt_is_an_error_naming_the_file(tmp_path):
    p = tmp_path / "bbc.txt"
    p.write_bytes("Caf\u00e9 society".encode("latin-1"))
    with pytest.raises(DataError, match=rf"{p}: not valid UTF-8 \(byte 3: b'\\xe9 so'\)"):
        list(iter_records(str(p)))


def test_json_array_streams_across_reads_and_reports_truncation(tmp_path):
    recs = [{"text": f"record {i} " + "x" * (i % 700)} for i in range(6000)]  # ~2.2 MB: several 1 MB reads
    p = tmp_path / "big.json"
    p.write_text(json.dumps(recs), encoding="utf-8")
    chunks = list(iter_chunks(list_inputs(str(p))[0], chunk_bytes=1 << 19))
    assert len(chunks) > 3
    assert [r for c in chunks for _, r in decode_chunk(c)] == recs
    assert chunks[-1].location(len(chunks[-1].items) - 1) == f"{p}: record 6000 (line 1)"
    cut = tmp_path / "cut.json"
    cut.write_text(json.dumps(recs[:3], indent=1)[:-20], encoding="utf-8")
    with pytest.raises(DataError, match=rf"{cut}: record 3 \(line \d+\): malformed JSON"):
        list(iter_records(str(cut)))
    (tmp_path / "open.json").write_text('[{"text": "a"}, ')
    with pytest.raises(DataError, match=r"ends without '\]' after record 1"):
        list(iter_records(str(tmp_path / "open.json")))


def test_large_jsonl_is_chunked_with_exact_line_numbers(tmp_path):
    p = tmp_path / "many.jsonl"
    p.write_text("".join(json.dumps({"text": "y" * 50, "i": i}) + "\n" for i in range(10000)))
    chunks = list(iter_chunks(list_inputs(str(p))[0], chunk_bytes=64 << 10))
    assert len(chunks) > 5 and sum(c.nbytes for c in chunks) == p.stat().st_size
    for c in chunks:
        for k, rec in decode_chunk(c):
            assert c.location(k) == f"{p}:{rec['i'] + 1}"


def test_columnar_inputs_check_columns_and_chunk(tmp_path):
    table = pa.Table.from_pylist([{"text": "t" * 100, "id": i} for i in range(5000)])
    pq.write_table(table, tmp_path / "x.parquet", row_group_size=1000)
    f = list_inputs(str(tmp_path / "x.parquet"))[0]
    with pytest.raises(DataError, match=r"no column 'body'; the file has 'text', 'id' \(choose with --json-keys"):
        list(iter_chunks(f, columns=["body"]))
    chunks = list(iter_chunks(f, columns=["text"], chunk_bytes=32 << 10))
    assert len(chunks) > 5
    rows = [(c.location(k), r) for c in chunks for k, r in decode_chunk(c)]
    assert rows[4321] == (f"{f.path}: row 4322", {"text": "t" * 100})
    assert abs(sum(c.nbytes for c in chunks) - f.size) < len(chunks)  # progress counts file bytes
    (tmp_path / "junk.parquet").write_text("not parquet")
    with pytest.raises(DataError, match="not a readable parquet file"):
        list(iter_chunks(list_inputs(str(tmp_path / "junk.parquet"))[0]))
    (tmp_path / "junk.arrow").write_text("not arrow")
    with pytest.raises(DataError, match="not an Arrow IPC file or stream"):
        list(iter_chunks(list_inputs(str(tmp_path / "junk.arrow"))[0]))


def test_csv_errors(tmp_path):
    p = tmp_path / "x.csv"
    p.write_bytes(b'text,n\n"good",1\n"too","many",3\n"caf\xe9",4\n')
    [chunk] = list(iter_chunks(list_inputs(str(p))[0]))
    got = [(chunk.location(k), r) for k, r in decode_chunk(chunk)]
    assert got[0] == (f"{p}: row 1", {"text": "good", "n": "1"})
    assert got[1][0] == f"{p}: row 2" and got[1][1].kind == "malformed CSV" and "3 fields" in str(got[1][1])
    with pytest.raises(RecordError, match="invalid characters at position 3"):  # undecodable byte survives to here
        check_text(got[2][1]["text"])


def test_chunk_kinds_roundtrip_through_pickle(tmp_path):
    """Chunks travel to worker processes: they must pickle, Arrow batches included."""
    import pickle

    _write_all(tmp_path)
    for f in list_inputs(str(tmp_path)):
        for c in iter_chunks(f):
            c2 = pickle.loads(pickle.dumps(c))
            assert isinstance(c2, Chunk)
            assert [r for _, r in decode_chunk(c2)] == [r for _, r in decode_chunk(c)]
