"""qtrain generate: chat template (thinking on/off), streaming one prompt, a left-padded batch from a
file, and the interactive chat, all equal to direct greedy `generate` calls."""

import io
import json

import pytest
import torch

from infer_helpers import save_tiny_hf
from qtrain.infer.generate import format_prompt, generate, main

transformers = pytest.importorskip("transformers")
EOS = [151643, 151645]


@pytest.fixture(scope="module")
def setup(tmp_path_factory, tokenizer_dir):
    path = tmp_path_factory.mktemp("gen") / "m"
    model = save_tiny_hf(path, vocab=151936, tokenizer_dir=tokenizer_dir, seed=4)
    return path, model, transformers.AutoTokenizer.from_pretrained(str(path))


def _reply(model, tok, messages, n):
    text = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True, enable_thinking=False)
    ids = tok(text).input_ids
    out = generate(model, torch.tensor([ids]), n, eos_token_ids=EOS)[0, len(ids):].tolist()
    return out[: next((i for i, t in enumerate(out) if t in EOS), len(out))]


def test_chat_template_thinking_switch(setup):
    _, _, tok = setup
    off = tok.decode(format_prompt(tok, "Hi", True, "Be brief.", thinking=False))
    on = tok.decode(format_prompt(tok, "Hi", True, None, thinking=True))
    assert off == "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n" \
                  "<|im_start|>assistant\n<think>\n\n</think>\n\n"
    assert on == "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
    assert tok.decode(format_prompt(tok, "Hi", False, None, False)) == "Hi"


def test_single_prompt_streams_the_greedy_reply(setup, capsys):
    path, model, tok = setup
    assert main(["--load", str(path), "--prompt", "Tell me a story.", "--greedy", "--max-new-tokens", "12"]) == 0
    want = _reply(model, tok, [{"role": "user", "content": "Tell me a story."}], 12)
    assert len(want) > 3
    out = capsys.readouterr().out
    assert out == f">>> Tell me a story.\n{tok.decode(want, skip_special_tokens=False)}\n"


def test_prompt_file_batch_equals_one_by_one(setup, tmp_path, capsys):
    path, model, tok = setup
    prompts = ["Hi", "What is the tallest mountain on Earth, and how high is it?", "Count to three."]
    with open(tmp_path / "p.jsonl", "w") as f:
        f.write(json.dumps({"prompt": prompts[0]}) + "\n" + json.dumps({"instruction": prompts[1]}) + "\n")
        f.write(json.dumps({"messages": [{"role": "user", "content": prompts[2]}]}) + "\n")
    out_file = tmp_path / "out.jsonl"
    assert main(["--load", str(path), "--prompt-file", str(tmp_path / "p.jsonl"), "--greedy",
                 "--max-new-tokens", "10", "--output-file", str(out_file), "--batch-size", "3"]) == 0
    rows = [json.loads(line) for line in out_file.read_text().splitlines()]
    assert len(rows) == 3
    for row, p in zip(rows, prompts):
        want = _reply(model, tok, [{"role": "user", "content": p}], 10)
        assert row["response"] == tok.decode(want, skip_special_tokens=True)


def test_interactive_chat_keeps_the_history(setup, monkeypatch, capsys):
    path, model, tok = setup
    monkeypatch.setattr("sys.stdin", io.StringIO("Hello\nAnd then?\n/exit\n"))
    assert main(["--load", str(path), "--greedy", "--max-new-tokens", "8"]) == 0
    out = capsys.readouterr().out
    first = _reply(model, tok, [{"role": "user", "content": "Hello"}], 8)
    history = [{"role": "user", "content": "Hello"},
               {"role": "assistant", "content": tok.decode(first, skip_special_tokens=True)},
               {"role": "user", "content": "And then?"}]
    second = _reply(model, tok, history, 8)
    turns = out.split("assistant> ")
    assert len(turns) == 3
    assert turns[1].startswith(tok.decode(first, skip_special_tokens=False) + "\n")
    assert turns[2].startswith(tok.decode(second, skip_special_tokens=False) + "\n")


def test_bad_options_are_reported(setup):
    from qtrain.errors import ConfigError

    path, _, _ = setup
    with pytest.raises(ConfigError, match="--top-p"):
        main(["--load", str(path), "--prompt", "x", "--top-p", "0"])
    with pytest.raises(Exception, match="no such file"):
        main(["--load", str(path), "--prompt-file", str(path / "missing.txt")])
