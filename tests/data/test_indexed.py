"""MMIDIDX reader/writer: byte parity with megatron-core, cross-reading, merging, bad files."""

from __future__ import annotations

import os
import pickle

import numpy as np
import pytest

from qtrain.data.indexed import (
    IndexedDataset,
    IndexedDatasetBuilder,
    best_dtype,
    bin_path,
    find_prefixes,
    idx_path,
    merge_datasets,
)
from qtrain.errors import DataError

# megatron-core's builder trips a numpy 2 deprecation on torch tensors; not ours to fix.
pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")


def _documents(seed: int, vocab: int, n_docs: int = 7) -> list[list[np.ndarray]]:
    """Documents of 1-3 sequences each, including an empty sequence and an empty document."""
    rng = np.random.default_rng(seed)
    docs = []
    for d in range(n_docs):
        if d == 3:
            docs.append([])  # a document without sequences
            continue
        n_seq = int(rng.integers(1, 4))
        docs.append([rng.integers(0, vocab, size=int(rng.integers(0, 40))) for _ in range(n_seq)])
    docs[1].append(np.zeros(0, dtype=np.int64))  # an empty sequence
    return docs


def _write_ours(prefix: str, docs, dtype, whole_documents: bool) -> None:
    builder = IndexedDatasetBuilder(bin_path(prefix), dtype=dtype)
    for doc in docs:
        if whole_documents:
            flat = np.concatenate(doc) if doc else np.zeros(0, dtype=np.int64)
            builder.add_document(flat, [len(s) for s in doc])
        else:
            for seq in doc:
                builder.add_item(seq)
            builder.end_document()
    builder.finalize(idx_path(prefix))


def _write_megatron(prefix: str, docs, dtype, whole_documents: bool) -> None:
    torch = pytest.importorskip("torch")
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder as MBuilder

    builder = MBuilder(bin_path(prefix), dtype=dtype)
    for doc in docs:
        if whole_documents:
            flat = np.concatenate(doc) if doc else np.zeros(0, dtype=np.int64)
            builder.add_document(torch.from_numpy(flat), [len(s) for s in doc])
        else:
            for seq in doc:
                builder.add_item(torch.from_numpy(np.asarray(seq)))
            builder.end_document()
    builder.finalize(idx_path(prefix))


def _read_bytes(prefix: str) -> tuple[bytes, bytes]:
    with open(bin_path(prefix), "rb") as b, open(idx_path(prefix), "rb") as i:
        return b.read(), i.read()


@pytest.mark.megatron
@pytest.mark.parametrize("dtype,vocab", [(np.uint16, 151), (np.int32, 151_669)])
@pytest.mark.parametrize("whole_documents", [False, True])
def test_byte_identical_to_megatron(tmp_path, dtype, vocab, whole_documents):
    pytest.importorskip("megatron.core")
    docs = _documents(0, vocab)
    _write_ours(str(tmp_path / "ours"), docs, dtype, whole_documents)
    _write_megatron(str(tmp_path / "theirs"), docs, dtype, whole_documents)
    assert _read_bytes(str(tmp_path / "ours")) == _read_bytes(str(tmp_path / "theirs"))
    assert sorted(os.listdir(tmp_path)) == ["ours.bin", "ours.idx", "theirs.bin", "theirs.idx"]


@pytest.mark.megatron
@pytest.mark.parametrize("dtype", [np.uint16, np.int32])
def test_cross_reading(tmp_path, dtype):
    pytest.importorskip("megatron.core")
    from megatron.core.datasets.indexed_dataset import IndexedDataset as MDataset

    docs = _documents(1, 1000)
    seqs = [s for d in docs for s in d]
    _write_megatron(str(tmp_path / "theirs"), docs, dtype, True)
    _write_ours(str(tmp_path / "ours"), docs, dtype, False)
    for ours, theirs in [
        (IndexedDataset(str(tmp_path / "theirs")), MDataset(str(tmp_path / "theirs"))),
        (IndexedDataset(str(tmp_path / "ours")), MDataset(str(tmp_path / "ours"))),
    ]:
        assert len(ours) == len(theirs) == len(seqs)
        assert ours.dtype == theirs.index.dtype == dtype
        np.testing.assert_array_equal(ours.sequence_lengths, theirs.sequence_lengths)
        np.testing.assert_array_equal(ours.document_indices, theirs.document_indices)
        for i, seq in enumerate(seqs):
            np.testing.assert_array_equal(ours[i], seq)
            np.testing.assert_array_equal(theirs[i], seq)
            if len(seq) > 3:
                np.testing.assert_array_equal(ours.get(i, 2, 1), theirs.get(i, 2, 1))
                np.testing.assert_array_equal(ours.get(i, 1), seq[1:])
        for a, b in zip(ours[1:5], seqs[1:5]):
            np.testing.assert_array_equal(a, b)


def test_reader_basics_and_pickle(tmp_path):
    prefix = str(tmp_path / "d")
    docs = _documents(2, 300)
    _write_ours(prefix, docs, np.uint16, True)
    ds = IndexedDataset(prefix)
    seqs = [s for d in docs for s in d]
    assert ds.num_documents == len(docs)
    assert ds.num_tokens == sum(len(s) for s in seqs)
    assert list(ds.document_indices) == list(np.cumsum([0] + [len(d) for d in docs]))
    np.testing.assert_array_equal(ds[-1], seqs[-1])
    with pytest.raises(IndexError):
        ds[len(seqs)]
    with pytest.raises(IndexError):
        ds.get(0, 0, int(ds.sequence_lengths[0]) + 1)
    clone = pickle.loads(pickle.dumps(ds))
    assert len(pickle.dumps(ds)) < 200  # pickles the prefix, not the mapped data
    np.testing.assert_array_equal(clone[0], seqs[0])


def test_best_dtype_and_range_check(tmp_path):
    assert best_dtype(151_669) is np.int32
    assert best_dtype(65_499) is np.uint16
    assert best_dtype(65_500) is np.int32
    assert best_dtype(None) is np.int32
    builder = IndexedDatasetBuilder(str(tmp_path / "x.bin"), dtype=np.uint16)
    with pytest.raises(DataError, match="do not fit uint16"):
        builder.add_item(np.array([1, 70_000]))
    builder.abort()
    assert os.listdir(tmp_path) == []
    with pytest.raises(ValueError, match="cannot be stored"):
        IndexedDatasetBuilder(str(tmp_path / "y.bin"), dtype=np.uint32)


def test_interrupted_write_leaves_no_pair(tmp_path):
    prefix = str(tmp_path / "d")
    _write_ours(prefix, _documents(3, 100), np.uint16, True)
    old = _read_bytes(prefix)
    with pytest.raises(RuntimeError):
        with IndexedDatasetBuilder(bin_path(prefix), dtype=np.uint16) as builder:
            builder.add_item(np.arange(5))
            assert os.path.exists(bin_path(prefix) + ".tmp")
            raise RuntimeError("killed")
    assert _read_bytes(prefix) == old  # untouched, no temp files left
    assert sorted(os.listdir(tmp_path)) == ["d.bin", "d.idx"]
    # while a build is in progress the final names are not written
    builder = IndexedDatasetBuilder(bin_path(str(tmp_path / "e")), dtype=np.uint16)
    builder.add_item(np.arange(5))
    builder.end_document()
    assert not IndexedDataset.exists(str(tmp_path / "e"))
    builder.finalize(idx_path(str(tmp_path / "e")))
    assert IndexedDataset.exists(str(tmp_path / "e"))
    assert sorted(os.listdir(tmp_path)) == ["d.bin", "d.idx", "e.bin", "e.idx"]


@pytest.mark.megatron
def test_merge_matches_megatron(tmp_path):
    pytest.importorskip("megatron.core")
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder as MBuilder

    parts = tmp_path / "parts"
    parts.mkdir()
    all_docs = []
    for k in range(3):
        docs = _documents(10 + k, 500, n_docs=4 + k)
        all_docs += docs
        _write_ours(str(parts / f"p{k}"), docs, np.uint16, True)
    prefixes = find_prefixes(str(parts))
    assert [os.path.basename(p) for p in prefixes] == ["p0", "p1", "p2"]
    merge_datasets(prefixes, str(tmp_path / "merged"))

    theirs = MBuilder(bin_path(str(tmp_path / "mmerged")), dtype=np.uint16)
    for p in prefixes:
        theirs.add_index(p)
    theirs.finalize(idx_path(str(tmp_path / "mmerged")))
    assert _read_bytes(str(tmp_path / "merged")) == _read_bytes(str(tmp_path / "mmerged"))

    merged = IndexedDataset(str(tmp_path / "merged"))
    seqs = [s for d in all_docs for s in d]
    assert merged.num_documents == len(all_docs)
    for i, seq in enumerate(seqs):
        np.testing.assert_array_equal(merged[i], seq)


def test_merge_refuses_mixed_dtypes(tmp_path):
    _write_ours(str(tmp_path / "a"), _documents(4, 100), np.uint16, True)
    _write_ours(str(tmp_path / "b"), _documents(5, 100), np.int32, True)
    with pytest.raises(DataError, match=r"b\.idx.*int32"):
        merge_datasets([str(tmp_path / "a"), str(tmp_path / "b")], str(tmp_path / "m"))
    assert not IndexedDataset.exists(str(tmp_path / "m"))
    assert not os.path.exists(str(tmp_path / "m.bin.tmp"))
    with pytest.raises(DataError, match="no input"):
        merge_datasets([], str(tmp_path / "m"))


def test_errors_name_the_file(tmp_path):
    prefix = str(tmp_path / "d")
    with pytest.raises(DataError, match=r"d\.idx and .*d\.bin"):
        IndexedDataset(prefix)
    _write_ours(prefix, _documents(6, 100), np.uint16, True)
    good_idx = open(idx_path(prefix), "rb").read()
    good_bin = open(bin_path(prefix), "rb").read()

    os.remove(bin_path(prefix))
    with pytest.raises(DataError, match=r"missing .*d\.bin"):
        IndexedDataset(prefix)
    open(bin_path(prefix), "wb").write(good_bin[:-2])
    with pytest.raises(DataError, match=r"d\.bin: truncated"):
        IndexedDataset(prefix)
    open(bin_path(prefix), "wb").write(good_bin + b"\0\0")
    with pytest.raises(DataError, match=r"d\.bin: larger"):
        IndexedDataset(prefix)
    open(bin_path(prefix), "wb").write(good_bin)

    cases = [
        (b"TNTIDX\x00\x00" + good_idx[9:], "bad magic"),
        (good_idx[:9] + (2).to_bytes(8, "little") + good_idx[17:], "version 2"),
        (good_idx[:17] + bytes([9]) + good_idx[18:], "dtype code 9"),
        (good_idx[:20], "truncated header"),
        (good_idx[:-8], "truncated"),
        (b"", "bad magic"),
    ]
    for data, msg in cases:
        open(idx_path(prefix), "wb").write(data)
        with pytest.raises(DataError, match=rf"d\.idx.*{msg}"):
            IndexedDataset(prefix)
