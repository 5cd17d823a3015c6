"""Megatron MMIDIDX indexed datasets: a memory-mapped reader, a writer and a merger.

A dataset is a pair of files sharing a prefix:

* ``<prefix>.bin``: the tokens of every sequence, back to back, in one numpy dtype.
* ``<prefix>.idx``: little-endian header and index arrays::

      b"MMIDIDX\\x00\\x00"      magic (9 bytes)
      <Q  1                    version
      <B  dtype code           1 uint8, 2 int8, 3 int16, 4 int32, 5 int64, 6 float64, 7 float32, 8 uint16
      <Q  sequence count       N
      <Q  document count       D (= number of documents + 1)
      int32[N]  sequence_lengths
      int64[N]  sequence_pointers (byte offset of each sequence in the .bin)
      int64[D]  document_indices  (sequence index where each document starts; last = N)

The writer produces files byte-identical to megatron-core's ``IndexedDatasetBuilder``; the
reader reads those files (and megatron-core reads ours).
"""

from __future__ import annotations

import os
import struct
from array import array
from typing import Any, Iterable, Sequence

import numpy as np

from qtrain.errors import DataError

MAGIC = b"MMIDIDX\x00\x00"
VERSION = 1
_HEADER_SIZE = len(MAGIC) + 8 + 1 + 8 + 8  # 34 bytes

DTYPE_CODES: dict[int, type[np.number]] = {
    1: np.uint8,
    2: np.int8,
    3: np.int16,
    4: np.int32,
    5: np.int64,
    6: np.float64,
    7: np.float32,
    8: np.uint16,
}
_CODE_OF_DTYPE = {np.dtype(t): c for c, t in DTYPE_CODES.items()}


def idx_path(prefix: str) -> str:
    """Path of the index file of a dataset prefix."""
    return prefix + ".idx"


def bin_path(prefix: str) -> str:
    """Path of the data file of a dataset prefix."""
    return prefix + ".bin"


def best_dtype(vocab_size: int | None) -> type[np.number]:
    """Token dtype Megatron picks for a vocabulary: uint16 below 65,500 ids, else int32."""
    if vocab_size is not None and vocab_size < 65500:
        return np.uint16
    return np.int32


def dtype_code(dtype: Any) -> int:
    """MMIDIDX code of a numpy dtype; raises ValueError for dtypes the format cannot store."""
    code = _CODE_OF_DTYPE.get(np.dtype(dtype))
    if code is None:
        raise ValueError(
            f"dtype {np.dtype(dtype)} cannot be stored in an MMIDIDX dataset; "
            f"use one of {sorted(str(np.dtype(t)) for t in DTYPE_CODES.values())}"
        )
    return code


class IndexedDataset:
    """Memory-mapped reader of a ``<prefix>.bin/.idx`` pair.

    ``ds[i]`` is sequence ``i`` as a read-only numpy array (a view into the mapped file);
    ``ds[a:b]`` a list of them. ``get(i, offset, length)`` reads part of one sequence.
    Pickling reopens the files by path, so it is cheap to send to DataLoader workers.
    """

    def __init__(self, path_prefix: str) -> None:
        self.path_prefix = str(path_prefix)
        self._open()

    def _open(self) -> None:
        ipath, bpath = idx_path(self.path_prefix), bin_path(self.path_prefix)
        missing = [p for p in (ipath, bpath) if not os.path.isfile(p)]
        if missing:
            raise DataError(
                f"indexed dataset {self.path_prefix!r}: missing {' and '.join(missing)}; "
                "pass the prefix without .bin/.idx (e.g. data/corpus_text_document) "
                "and run `qtrain preprocess` to create it"
            )
        idx_size = os.path.getsize(ipath)
        with open(ipath, "rb") as f:
            head = f.read(_HEADER_SIZE)
        if len(head) < len(MAGIC) or head[: len(MAGIC)] != MAGIC:
            raise DataError(
                f"{ipath}: not a Megatron MMIDIDX index (bad magic {head[:len(MAGIC)]!r}, "
                f"expected {MAGIC!r}); re-create it with `qtrain preprocess`"
            )
        if len(head) < _HEADER_SIZE:
            raise DataError(f"{ipath}: truncated header ({idx_size} bytes); re-create the dataset")
        (version,) = struct.unpack_from("<Q", head, 9)
        if version != VERSION:
            raise DataError(f"{ipath}: unsupported MMIDIDX version {version} (only {VERSION} is known)")
        (code,) = struct.unpack_from("<B", head, 17)
        if code not in DTYPE_CODES:
            raise DataError(f"{ipath}: unknown dtype code {code}")
        n_seq, n_doc = struct.unpack_from("<QQ", head, 18)
        need = _HEADER_SIZE + n_seq * 4 + n_seq * 8 + n_doc * 8
        if idx_size < need:
            raise DataError(
                f"{ipath}: truncated ({idx_size} bytes, header promises {need} for {n_seq} "
                f"sequences and {n_doc} document indices); re-create the dataset"
            )
        self.dtype: type[np.number] = DTYPE_CODES[code]
        self._idx_map = np.memmap(ipath, mode="r", dtype=np.uint8)
        buf = self._idx_map
        off = _HEADER_SIZE
        self.sequence_lengths = np.frombuffer(buf, np.int32, n_seq, off)
        off += n_seq * 4
        self.sequence_pointers = np.frombuffer(buf, np.int64, n_seq, off)
        off += n_seq * 8
        self.document_indices = np.frombuffer(buf, np.int64, n_doc, off)
        if n_doc == 0 or self.document_indices[-1] != n_seq:
            raise DataError(
                f"{ipath}: inconsistent index (document_indices must end at the sequence count "
                f"{n_seq}); re-create the dataset"
            )

        itemsize = np.dtype(self.dtype).itemsize
        want_bin = int(self.sequence_pointers[-1]) + int(self.sequence_lengths[-1]) * itemsize if n_seq else 0
        have_bin = os.path.getsize(bpath)
        if have_bin != want_bin:
            state = "truncated" if have_bin < want_bin else "larger than its index says"
            raise DataError(
                f"{bpath}: {state} ({have_bin} bytes, {ipath} describes {want_bin}); "
                "the pair does not belong together or a write was interrupted: re-create the dataset"
            )
        self._check_index(ipath, itemsize)
        # numpy cannot map an empty file; an empty dataset has nothing to read anyway.
        self._bin = np.memmap(bpath, mode="r", dtype=np.uint8) if have_bin else np.empty(0, np.uint8)

    def _check_index(self, ipath: str, itemsize: int, chunk: int = 1 << 22) -> None:
        """Sequences lie back to back in the .bin (as every Megatron writer puts them) and documents
        start at increasing sequences: a corrupt index would read other bytes as tokens. Checked
        in chunks, so memory stays small for any number of sequences."""
        lengths, pointers, docs = self.sequence_lengths, self.sequence_pointers, self.document_indices
        offset = 0
        for start in range(0, len(lengths), chunk):
            part = lengths[start:start + chunk].astype(np.int64)
            expect = offset + np.concatenate([[0], np.cumsum(part[:-1])]) * itemsize
            bad = np.flatnonzero((pointers[start:start + chunk] != expect) | (part < 0))
            if len(bad):
                i = start + int(bad[0])
                raise DataError(f"{ipath}: corrupt index: sequence {i} has length {int(lengths[i])} at byte "
                                f"{int(pointers[i])}, expected a length >= 0 at byte {int(expect[bad[0]])}; "
                                f"re-create the dataset with `qtrain preprocess`")
            offset = int(expect[-1]) + int(part[-1]) * itemsize
        for start in range(0, len(docs), chunk):
            part = docs[max(start - 1, 0):start + chunk]
            if int(docs[0]) != 0 or (np.diff(part) < 0).any():
                raise DataError(f"{ipath}: corrupt index: document start sequences are not increasing from 0; "
                                f"re-create the dataset with `qtrain preprocess`")

    def __getstate__(self) -> dict:
        return {"path_prefix": self.path_prefix}

    def __setstate__(self, state: dict) -> None:
        self.path_prefix = state["path_prefix"]
        self._open()

    def __len__(self) -> int:
        return len(self.sequence_lengths)

    @property
    def num_documents(self) -> int:
        """Number of documents (``len(document_indices) - 1``)."""
        return len(self.document_indices) - 1

    @property
    def num_tokens(self) -> int:
        """Total number of tokens in the data file."""
        return int(self.sequence_lengths.sum(dtype=np.int64))

    def _read(self, pointer: int, count: int) -> np.ndarray:
        return np.frombuffer(self._bin, self.dtype, count, pointer)

    def __getitem__(self, idx: int | np.integer | slice) -> np.ndarray | list[np.ndarray]:
        if isinstance(idx, (int, np.integer)):
            i = int(idx)
            if not -len(self) <= i < len(self):
                raise IndexError(f"sequence {i} out of range for {self.path_prefix} ({len(self)} sequences)")
            return self._read(int(self.sequence_pointers[i]), int(self.sequence_lengths[i]))
        if isinstance(idx, slice):
            start, stop, step = idx.indices(len(self))
            if step != 1:
                raise ValueError("slices of an IndexedDataset must be contiguous (step 1)")
            if stop <= start:
                return []
            lengths = self.sequence_lengths[start:stop]
            flat = self._read(int(self.sequence_pointers[start]), int(lengths.sum(dtype=np.int64)))
            return np.split(flat, np.cumsum(lengths[:-1], dtype=np.int64))
        raise TypeError(f"IndexedDataset index must be an int or a slice, not {type(idx).__name__}")

    def get(self, idx: int, offset: int = 0, length: int | None = None) -> np.ndarray:
        """Tokens ``offset : offset + length`` of sequence ``idx`` (to its end if length is None)."""
        seq_len = int(self.sequence_lengths[idx])
        if length is None:
            length = seq_len - offset
        if offset < 0 or length < 0 or offset + length > seq_len:
            raise IndexError(
                f"tokens [{offset}, {offset + length}) out of range for sequence {idx} "
                f"of length {seq_len} in {self.path_prefix}"
            )
        itemsize = np.dtype(self.dtype).itemsize
        return self._read(int(self.sequence_pointers[idx]) + offset * itemsize, length)

    @staticmethod
    def exists(path_prefix: str) -> bool:
        """Whether both ``<prefix>.bin`` and ``<prefix>.idx`` exist."""
        return os.path.isfile(idx_path(path_prefix)) and os.path.isfile(bin_path(path_prefix))


def write_index(path: str, dtype: Any, sequence_lengths: Any, document_indices: Any) -> None:
    """Write an ``.idx`` file (not atomically; callers write to a temporary name)."""
    lengths = np.asarray(sequence_lengths, dtype=np.int32)
    pointers = np.zeros(len(lengths), dtype=np.int64)
    if len(lengths) > 1:
        np.cumsum(lengths[:-1].astype(np.int64) * np.dtype(dtype).itemsize, out=pointers[1:])
    docs = np.asarray(document_indices, dtype=np.int64)
    with open(path, "wb") as f:
        f.write(MAGIC)
        f.write(struct.pack("<Q", VERSION))
        f.write(struct.pack("<B", dtype_code(dtype)))
        f.write(struct.pack("<Q", len(lengths)))
        f.write(struct.pack("<Q", len(docs)))
        f.write(lengths.tobytes())
        f.write(pointers.tobytes())
        f.write(docs.tobytes())


class IndexedDatasetBuilder:
    """Writer of a ``.bin/.idx`` pair, byte-identical to megatron-core's builder.

    Tokens go to ``<bin_path>.tmp`` while building; :meth:`finalize` writes the index to a
    temporary name too and then renames both into place (the index last, after removing any
    old index), so an interrupted run never leaves a pair that looks complete. Use it as a
    context manager (or call :meth:`abort`) to remove the temporary files on error.
    """

    def __init__(self, bin_path: str, dtype: Any = np.int32) -> None:
        dtype_code(dtype)  # refuse unsupported dtypes up front
        self.bin_path = str(bin_path)
        self.dtype = np.dtype(dtype).type
        self._tmp_bin = self.bin_path + ".tmp"
        self._file = open(self._tmp_bin, "wb")
        # array.array keeps the index compact (4/8 bytes per entry) for corpora of many documents.
        self.sequence_lengths = array("i")
        self.document_indices = array("q", [0])
        self._int_info = np.iinfo(self.dtype) if np.issubdtype(self.dtype, np.integer) else None

    def __enter__(self) -> "IndexedDatasetBuilder":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None:
            self.abort()

    def _as_array(self, tokens: Any) -> np.ndarray:
        arr = tokens if isinstance(tokens, np.ndarray) else np.asarray(tokens)
        if arr.dtype != self.dtype:
            if arr.size and self._int_info is not None and arr.dtype.kind in "iub":
                lo, hi = int(arr.min()), int(arr.max())
                if lo < self._int_info.min or hi > self._int_info.max:
                    raise DataError(
                        f"{self.bin_path}: token ids [{lo}, {hi}] do not fit {np.dtype(self.dtype)}; "
                        "use a wider dtype (best_dtype(vocab_size))"
                    )
            arr = arr.astype(self.dtype)
        if arr.ndim != 1 or not arr.flags.c_contiguous:
            arr = np.ascontiguousarray(arr).reshape(-1)
        return arr

    def add_item(self, tokens: Any) -> None:
        """Append one sequence (numpy array, list or CPU tensor) to the current document."""
        arr = self._as_array(tokens)
        self._file.write(arr)  # raw bytes through the buffer protocol, no copy
        self.sequence_lengths.append(arr.size)

    def end_document(self) -> None:
        """Close the current document (after one or more :meth:`add_item`)."""
        self.document_indices.append(len(self.sequence_lengths))

    def add_document(self, tokens: Any, lengths: Sequence[int]) -> None:
        """Append a whole document: ``tokens`` split into sequences of ``lengths``."""
        arr = self._as_array(tokens)
        self._file.write(arr)
        self.sequence_lengths.extend(lengths)
        self.document_indices.append(len(self.sequence_lengths))

    def add_index(self, path_prefix: str) -> None:
        """Append every document of an existing dataset (same dtype), copying its tokens."""
        ds = IndexedDataset(path_prefix)
        if np.dtype(ds.dtype) != np.dtype(self.dtype):
            raise DataError(
                f"cannot merge {idx_path(path_prefix)}: its dtype is {np.dtype(ds.dtype)}, "
                f"the output's is {np.dtype(self.dtype)}; re-create it with the same tokenizer"
            )
        offset = len(self.sequence_lengths)
        self.sequence_lengths.frombytes(ds.sequence_lengths.tobytes())
        self.document_indices.frombytes((ds.document_indices[1:] + offset).tobytes())
        with open(bin_path(path_prefix), "rb") as src:
            while chunk := src.read(1 << 24):
                self._file.write(chunk)

    def finalize(self, idx_path: str) -> None:
        """Write the index and move both files to their final names (index last)."""
        self._file.close()
        tmp_idx = str(idx_path) + ".tmp"
        try:
            write_index(tmp_idx, self.dtype, self.sequence_lengths, self.document_indices)
            if os.path.exists(idx_path):
                os.remove(idx_path)  # never leave an old index beside a new .bin
            os.replace(self._tmp_bin, self.bin_path)
            os.replace(tmp_idx, idx_path)
        except BaseException:
            for p in (tmp_idx, self._tmp_bin):
                if os.path.exists(p):
                    os.remove(p)
            raise

    def abort(self) -> None:
        """Drop everything written so far (removes the temporary data file)."""
        self._file.close()
        if os.path.exists(self._tmp_bin):
            os.remove(self._tmp_bin)


def find_prefixes(directory: str) -> list[str]:
    """Dataset prefixes in ``directory`` (pairs of .bin/.idx), sorted by name as Megatron's merger."""
    names = os.listdir(directory)
    stems = {n[:-4] for n in names if n.endswith(".idx")}
    return [os.path.join(directory, s) for s in sorted(stems) if s + ".bin" in names]


def merge_datasets(prefixes: Iterable[str], out_prefix: str) -> None:
    """Concatenate datasets (in the given order) into ``out_prefix``, like Megatron's merge_datasets.py.

    Every input must have the dtype of the first; documents keep their boundaries.
    """
    prefixes = list(prefixes)
    if not prefixes:
        raise DataError("merge_datasets: no input datasets given")
    first = IndexedDataset(prefixes[0])
    with IndexedDatasetBuilder(bin_path(out_prefix), dtype=first.dtype) as builder:
        for prefix in prefixes:
            builder.add_index(prefix)
        builder.finalize(idx_path(out_prefix))
