"""`--prompt-type qwen3` writes MindSpeed-LLM 2.2.0's samples: every rule of issue 21, held against token
sequences written out here, with MindSpeed-LLM's behaviour named in a comment. (Byte identity with
MindSpeed-LLM's own preprocess_data.py on 400 records was checked outside the test suite: docs/sft.md.)"""

import json

import pytest

from qtrain import cli
from qtrain.data import preprocess
from qtrain.data.handlers import build_handler
from qtrain.data.indexed import IndexedDataset
from qtrain.data.instruction_dataset import InstructionDataset
from qtrain.data.instruction_handlers import DROPPED, TRUNCATED
from qtrain.data.mindspeed_template import infer_seqlen
from qtrain.data.tokenizer import load_tokenizer

M = -100
U_HI = [151644, 872, 198, 13048, 151645, 198, 151644, 77091, 198]  # <|im_start|>user\nHi<|im_end|>\n...assistant\n
U_AND = [151644, 872, 198, 3036, 498, 30, 151645, 198, 151644, 77091, 198]  # ... user\nAnd you?<|im_end|> ...
SYS = [151644, 8948, 198, 3430, 9814, 13, 151645, 198]  # <|im_start|>system\nBe brief.<|im_end|>\n
THINK = [151667, 271, 151668, 271]  # <think>\n\n</think>\n\n, tokenized on its own
HELLO = [9707, 151645, 198]  # Hello<|im_end|>\n
FINE = [63716, 13, 151645, 198]  # Fine.<|im_end|>\n
X_Y = [151667, 87, 151668, 88, 151645, 198]  # <think>x</think>y<|im_end|>\n, verbatim
Y = [88, 151645, 198]  # y<|im_end|>\n
TEN = [603, 1378, 2326, 3040, 4236, 4743, 8094, 8063, 11627, 5779]  # one two ... ten
IM_END, PAD = 151645, 151643

TWO_TURNS = {"conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello"},
                               {"from": "human", "value": "And you?"}, {"from": "gpt", "value": "Fine."}]}


@pytest.fixture(scope="module")
def tok(tokenizer_dir):
    return load_tokenizer(tokenizer_dir)


def encode(tok, record, name="AlpacaStyleInstructionHandler", **kw):
    out = build_handler(name, tok, prompt_type=kw.pop("prompt_type", "qwen3"), **kw).encode(record)
    ids, labels = out["input_ids"][0].tolist(), out["labels"][0].tolist()
    assert out["attention_mask"][0].tolist() == [1] * len(ids)
    return ids, labels, [kind for kind, _ in out["notes"]]


def test_think_block_in_every_turn(tok):
    # 1. MindSpeed-LLM (ReasoningTemplate.encode_multiturn) puts the empty think block after every
    #    <|im_start|>assistant\n, in the prompt; transformers' template only in the last turn.
    ids, labels, _ = encode(tok, TWO_TURNS, "SharegptStyleInstructionHandler")
    assert ids == U_HI + THINK + HELLO + U_AND + THINK + FINE
    assert labels == [M] * 13 + HELLO + [M] * 15 + FINE
    hf_ids, _, _ = encode(tok, TWO_TURNS, "SharegptStyleInstructionHandler", prompt_type="qwen3-hf")
    assert hf_ids == U_HI + HELLO + U_AND + THINK + FINE


def test_system_and_history_only_when_named(tok):
    # 2. MindSpeed-LLM reads Alpaca system/history and ShareGPT's system field only when --map-keys names
    #    them (InstructionDatasetAttr defaults None); ignoring them is reported in the summary here.
    rec = {"instruction": "Hi", "output": "Hello", "system": "Be brief.", "history": [["And you?", "Fine."]]}
    ids, labels, notes = encode(tok, rec)
    assert ids == U_HI + THINK + HELLO and labels == [M] * 13 + HELLO
    assert sorted(notes) == ["'history' fields ignored (not named by --map-keys; MindSpeed-LLM ignores them too)",
                             "'system' fields ignored (not named by --map-keys; MindSpeed-LLM ignores them too)"]
    ids, labels, notes = encode(tok, rec, map_keys={"system": "system", "history": "history"})
    # the system piece and the first user piece are tokenized apart
    assert ids == SYS + U_AND + THINK + FINE + U_HI + THINK + HELLO and notes == []
    assert labels == [M] * 23 + FINE + [M] * 13 + HELLO
    conv = {**TWO_TURNS, "system": "Be brief."}
    assert encode(tok, conv, "SharegptStyleInstructionHandler")[0][:9] == U_HI
    assert encode(tok, conv, "SharegptStyleInstructionHandler", map_keys={"system": "system"})[0][:8] == SYS
    # a leading system turn is always the system prompt
    lead = {"conversations": [{"from": "system", "value": "Be brief."}] + TWO_TURNS["conversations"][:2]}
    assert encode(tok, lead, "SharegptStyleInstructionHandler")[0] == SYS + U_HI + THINK + HELLO


def test_reasoning_in_replies(tok):
    # 3. Thinking unset (MindSpeed's None) or true: a reply with <think> is kept verbatim and trained, no
    #    empty think block; false: think blocks removed (then leading newlines), empty block in the prompt.
    rec = {"instruction": "Hi", "output": "<think>x</think>y"}
    for thinking in (None, True):
        ids, labels, _ = encode(tok, rec, enable_thinking=thinking)
        assert ids == U_HI + X_Y and labels == [M] * 9 + X_Y
    ids, labels, _ = encode(tok, rec, enable_thinking=False)
    assert ids == U_HI + THINK + Y and labels == [M] * 13 + Y
    # thinking true, reply without reasoning: the empty think block is trained
    ids, labels, _ = encode(tok, {"instruction": "Hi", "output": "Hello"}, enable_thinking=True)
    assert ids == U_HI + THINK + HELLO and labels == [M] * 9 + THINK + HELLO
    # qwen3-hf reformats the reasoning (transformers' template): <think>\nx\n</think>\n\ny
    hf, _, _ = encode(tok, rec, prompt_type="qwen3-hf", enable_thinking=True)
    assert hf == U_HI + [151667, 198, 87, 198, 151668, 271, 88, 151645, 198]
    # reasoning in an earlier turn: kept and trained (unset), stripped with false
    hist = {"instruction": "And you?", "output": "Fine.", "history": [["Hi", "<think>x</think>y"]]}
    ids, labels, _ = encode(tok, hist, map_keys={"history": "history"})
    assert ids == U_HI + X_Y + U_AND + THINK + FINE and labels == [M] * 9 + X_Y + [M] * 15 + FINE
    ids, _, _ = encode(tok, hist, map_keys={"history": "history"}, enable_thinking=False)
    assert ids == U_HI + THINK + Y + U_AND + THINK + FINE


def test_reply_starting_with_newlines_is_kept_and_trained(tok):
    # 4. MindSpeed-LLM tokenizes the reply apart from its header and keeps its leading newlines.
    for reply, first in (("\nHello", [198]), ("\n\nHello", [271])):
        ids, labels, _ = encode(tok, {"instruction": "Hi", "output": reply})
        assert ids == U_HI + THINK + first + HELLO and labels == [M] * 13 + first + HELLO
    # ... unless thinking is false (remove_thought lstrips every reply)
    assert encode(tok, {"instruction": "Hi", "output": "\nHello"}, enable_thinking=False)[0] == U_HI + THINK + HELLO


def test_infer_seqlen_is_llama_factorys_rule():
    assert infer_seqlen(13, 3, 11) == (8, 3)  # short reply: the prompt is cut
    assert infer_seqlen(4, 30, 11) == (4, 7)  # short prompt: the reply is cut
    assert infer_seqlen(13, 12, 15) == (8, 7)  # both long: int(15 * 12 / 25) = 7 for the reply
    assert infer_seqlen(15, 4, 3) == (3, 0)


def test_over_length_samples_are_cut_like_mindspeed(tok):
    # 5. MindSpeed-LLM cuts (prompt, reply) pairs to fill --seq-length - 1 tokens (_make_pairs / _infer_seqlen):
    ids, labels, notes = encode(tok, {"instruction": "Hi", "output": "Hello"}, seq_length=12)
    assert ids == (U_HI + THINK)[:8] + HELLO and labels == [M] * 8 + HELLO and notes == [TRUNCATED]
    # ... the reply can lose its <|im_end|>
    ids, labels, _ = encode(tok, {"instruction": "Hi", "output": " ".join(
        "one two three four five six seven eight nine ten".split())}, seq_length=16)
    assert ids == (U_HI + THINK)[:8] + TEN[:7] and labels == [M] * 8 + TEN[:7]
    # ... and turns after the budget are dropped
    ids, _, notes = encode(tok, TWO_TURNS, "SharegptStyleInstructionHandler", seq_length=17)
    assert ids == U_HI + THINK + HELLO and notes == [TRUNCATED]
    # 35 tokens fit --seq-length 36 untouched and uncounted, not 35
    assert encode(tok, TWO_TURNS, "SharegptStyleInstructionHandler", seq_length=36)[2] == []
    assert encode(tok, TWO_TURNS, "SharegptStyleInstructionHandler", seq_length=35)[2] == [TRUNCATED]


def _preprocess(tmp_path, records, *flags, name="AlpacaStyleInstructionHandler", capsys=None):
    path = tmp_path / "in.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    prefix = tmp_path / "out"
    rc = preprocess.main(["--input", str(path), "--handler-name", name, "--output-prefix", str(prefix),
                          "--workers", "0", *map(str, flags)])
    err = capsys.readouterr().err if capsys else ""
    assert rc == 0, err
    keys = ("input_ids", "attention_mask", "labels") if "Instruction" in name else (
        "chosen_input_ids", "chosen_labels", "rejected_input_ids", "rejected_labels")
    return {k: IndexedDataset(f"{prefix}_packed_{k}_document") for k in keys}, err


def test_append_eod_and_the_sample_it_pushes_over(tmp_path, tokenizer_dir, capsys):
    # 8. --append-eod: MindSpeed-LLM appends the tokenizer's eos (<|im_end|>, 151645), trained, mask 1.
    recs = [{"instruction": "Hi", "output": "Hello"}, {"instruction": "And you?", "output": "Fine."}]
    out, err = _preprocess(tmp_path, recs, "--append-eod", "--seq-length", 18,
                           "--tokenizer-name-or-path", tokenizer_dir, capsys=capsys)
    assert out["input_ids"][0].tolist() == U_HI + THINK + HELLO + [IM_END]
    assert out["labels"][0].tolist() == [M] * 13 + HELLO + [IM_END]
    assert out["attention_mask"][0].tolist() == [1] * 17
    # 5. The second sample is cut to 17 tokens by the template, the eos makes 18 = --seq-length: MindSpeed's
    #    writer drops it and still ends the document, so every file holds an empty second document.
    for ds in out.values():
        assert len(ds) == 1 and ds.document_indices.tolist() == [0, 1, 1]
    assert len(InstructionDataset(str(tmp_path / "out"), 18, PAD)) == 1  # qtrain sft reads it (sequences)
    assert f"{DROPPED}: 1 (first: " in err and "in.jsonl:2" in err and TRUNCATED not in err
    # With --neat-pack the same sample is cut to --seq-length - 1 instead (the eos goes).
    out, err = _preprocess(tmp_path, recs, "--append-eod", "--seq-length", 18, "--pack", "--neat-pack",
                           "--tokenizer-name-or-path", tokenizer_dir, capsys=capsys)
    assert f"{TRUNCATED}: 1" in err and DROPPED not in err
    assert out["input_ids"][0].tolist() == (U_AND + THINK)[:13] + FINE + [PAD]  # 17 tokens + one padding


def test_packs_take_the_last_sample_of_a_length_first(tmp_path, tokenizer_dir):
    # 6. MindSpeed-LLM packs by length (greedy knapsack into --seq-length - 1) and takes, of equal lengths,
    #    the sample that came last (length2indexes[length].pop()).
    recs = [{"instruction": "Hi", "output": c} for c in "ABC"]  # 9 + 4 + 3 tokens each
    a, b, c = ([*U_HI, *THINK, i, IM_END, 198] for i in (32, 33, 34))  # A, B, C are ids 32, 33, 34
    out, _ = _preprocess(tmp_path, recs, "--pack", "--neat-pack", "--seq-length", 40,
                         "--tokenizer-name-or-path", tokenizer_dir)
    assert [out["input_ids"][i].tolist() for i in range(2)] == [c + b + [PAD] * 8, a + [PAD] * 24]
    assert out["attention_mask"][0].tolist() == [1] * 16 + [2] * 16 + [0] * 8  # --neat-pack: sample index
    assert out["labels"][1].tolist() == [M] * 13 + a[13:] + [M] * 24
    # 7. --pack without --neat-pack: MindSpeed-LLM's mask is 1 everywhere, padding included.
    out, _ = _preprocess(tmp_path, recs, "--pack", "--seq-length", 40, "--tokenizer-name-or-path", tokenizer_dir)
    assert out["input_ids"][0].tolist() == c + b + [PAD] * 8
    assert out["attention_mask"][0].tolist() == [1] * 40 and out["attention_mask"][1].tolist() == [1] * 40


def test_enable_thinking_spellings(tmp_path, tokenizer_dir, capsys):
    # 9. MindSpeed-LLM's scripts write `--enable-thinking true`; false and none are its other values.
    rec = [{"instruction": "Hi", "output": "Hello"}]
    for flags, want in [((), M), (("--enable-thinking", "true"), THINK[0]), (("--enable-thinking",), THINK[0]),
                        (("--enable-thinking", "False"), M), (("--enable-thinking", "none"), M)]:
        out, _ = _preprocess(tmp_path, rec, *flags, "--tokenizer-name-or-path", tokenizer_dir)
        assert out["labels"][0].tolist()[9] == want, flags
    assert cli.main(["preprocess", "--input", "x", "--output-prefix", "o", "--enable-thinking", "maybe"]) == 2
    assert "expected true or false" in capsys.readouterr().err


def test_pairwise_samples(tok):
    # MindSpeed-LLM (2.3.0; 2.2.0 fails here for qwen3) encode_oneturn: prompt + answer, labels -100 on the
    # prompt; the empty think block goes to the prompt when thinking is not true.
    rec = {"instruction": "Hi", "chosen": "Hello", "rejected": "Fine."}
    out = build_handler("AlpacaStylePairwiseHandler", tok).encode(rec)
    assert out["chosen_input_ids"][0].tolist() == U_HI + THINK + HELLO
    assert out["chosen_labels"][0].tolist() == [M] * 13 + HELLO
    assert out["rejected_input_ids"][0].tolist() == U_HI + THINK + FINE
    assert out["rejected_labels"][0].tolist() == [M] * 13 + FINE
    out = build_handler("AlpacaStylePairwiseHandler", tok, enable_thinking=True).encode(rec)
    assert out["rejected_labels"][0].tolist() == [M] * 9 + THINK + FINE
    # The prompt is the chosen side's: a chosen answer with reasoning leaves no think block for either.
    out = build_handler("AlpacaStylePairwiseHandler", tok).encode({**rec, "chosen": "<think>x</think>y"})
    assert out["chosen_input_ids"][0].tolist() == U_HI + X_Y
    assert out["rejected_input_ids"][0].tolist() == U_HI + FINE
    # Earlier replies lose their reasoning and get no think block.
    hist = {"instruction": "And you?", "history": [["Hi", "<think>x</think>y"]], "chosen": "Fine.", "rejected": "Hello"}
    out = build_handler("AlpacaStylePairwiseHandler", tok, map_keys={"history": "history"}).encode(hist)
    assert out["chosen_input_ids"][0].tolist() == U_HI + Y + U_AND + THINK + FINE
    assert out["rejected_labels"][0].tolist() == [M] * 27 + HELLO
    sg = {"conversations": TWO_TURNS["conversations"][:1], "chosen": {"from": "gpt", "value": "Hello"},
          "rejected": {"from": "gpt", "value": "Fine."}}
    out = build_handler("SharegptStylePairwiseHandler", tok, seq_length=18).encode(sg)
    assert out["chosen_input_ids"][0].tolist() == U_HI + THINK + HELLO and out["notes"] == []
    # either side of --seq-length tokens or more drops the pair (empty documents in all four files)
    out = build_handler("SharegptStylePairwiseHandler", tok, seq_length=18).encode(
        {**sg, "rejected": {"from": "gpt", "value": "Fine.  Fine."}})
    assert out["chosen_input_ids"][1] == [] and out["notes"][0][0] == DROPPED


def test_pairwise_bad_records_name_their_line(tmp_path, tokenizer_dir, capsys):
    recs = [{"instruction": "Hi", "chosen": "Hello", "rejected": "Fine."}, {"instruction": "Hi", "chosen": "Hello"}]
    (tmp_path / "p.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
    base = ["--input", str(tmp_path / "p.jsonl"), "--handler-name", "AlpacaStylePairwiseHandler",
            "--output-prefix", str(tmp_path / "o"), "--tokenizer-name-or-path", str(tokenizer_dir), "--workers", "0"]
    assert cli.main(["preprocess", *base]) == 1
    assert "p.jsonl:2: no key 'rejected' (the record has 'instruction', 'chosen'); set --map-keys rejected" in \
        capsys.readouterr().err
    assert preprocess.main(base + ["--skip-bad-records"]) == 0  # MindSpeed-LLM drops such records silently
    assert len(IndexedDataset(str(tmp_path / "o_packed_chosen_input_ids_document"))) == 1
    for flag in ("--pack", "--append-eod"):
        assert cli.main(["preprocess", *base, flag, "--seq-length", "64"]) == 1
        assert f"{flag}: AlpacaStylePairwiseHandler writes one unpacked pair" in capsys.readouterr().err
    sg = {"conversations": [{"from": "human", "value": "Hi"}], "chosen": {"from": "gpt", "value": "x"},
          "rejected": {"from": "human", "value": "y"}}
    h = build_handler("SharegptStylePairwiseHandler", load_tokenizer(tokenizer_dir))
    with pytest.raises(Exception, match="'rejected' has role 'human', expected 'gpt'"):
        h.encode(sg)


def test_neat_pack_needs_pack(capsys):
    rc = cli.main(["preprocess", "--input", "x.jsonl", "--output-prefix", "o", "--handler-name",
                          "AlpacaStyleInstructionHandler", "--neat-pack", "--seq-length", "8"])
    assert rc == 1 and "--neat-pack needs --pack (as in MindSpeed-LLM)" in capsys.readouterr().err


def test_observation_turns_and_idx_placeholder(tok):
    # MindSpeed-LLM's qwen3 observation piece; its user piece fills "{{idx}}" (the turn number) after the
    # content, so a literal "{{idx}}" in the first user turn becomes "0".
    conv = {"conversations": [{"from": "human", "value": "{{idx}}"}, {"from": "gpt", "value": "Hello"},
                              {"from": "observation", "value": "42"}, {"from": "gpt", "value": "Fine."}]}
    ids, _, _ = encode(tok, conv, "SharegptStyleInstructionHandler")
    want = (tok.encode("<|im_start|>user\n0<|im_end|>\n<|im_start|>assistant\n") + THINK + HELLO
            + tok.encode("<|im_start|>user\n<tool_response>\n42\n</tool_response><|im_end|>\n<|im_start|>assistant\n")
            + THINK + FINE)
    assert ids == want
