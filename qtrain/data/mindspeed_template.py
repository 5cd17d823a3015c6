"""`--prompt-type qwen3`: MindSpeed-LLM 2.2.0's Qwen3 template, rule by rule, so that `qtrain preprocess`
writes the bytes MindSpeed-LLM's `preprocess_data.py` writes for the same flags.

MindSpeed-LLM renders Qwen3 with a LLaMA-Factory-style template (its configs/finetune/templates.json entry
"qwen3", class ReasoningTemplate in mindspeed_llm/tasks/preprocess/templates.py), not with the model's
Jinja chat template (that one is `--prompt-type qwen3-hf`, qtrain/data/templates.py). Its rules:

Pieces. Every message becomes one text piece, tokenized on its own (so no token ever spans two pieces):

    system       <|im_start|>system\\n{system}<|im_end|>\\n          (before the first message, if any)
    user         <|im_start|>user\\n{content}<|im_end|>\\n<|im_start|>assistant\\n
    observation  <|im_start|>user\\n<tool_response>\\n{content}\\n</tool_response><|im_end|>\\n<|im_start|>assistant\\n
    assistant    {content}<|im_end|>\\n

The system and the first user piece are two pieces. A user piece's text is built by Python `str.replace`:
first ``{{content}}`` -> the content, then the first ``{{idx}}`` (of the result) -> the turn number.

Thinking. `enable_thinking` is True, False or None (MindSpeed's `--enable-thinking` left unset):

- False: every reply loses its ``<think>...</think>`` blocks and then its leading newlines;
- a reply that (after that) holds neither ``<think>`` nor ``</think>`` gets the empty think block
  ``<think>\\n\\n</think>\\n\\n``, tokenized as a piece of its own: appended to the turn's prompt (not
  trained) unless enable_thinking is True, then put in front of the reply (trained). This happens in
  *every* turn, not only the last (the Jinja template renders it in the last turn only);
- a reply with think tags is kept verbatim, trained as written (None and True).

Truncation (`encode_multiturn`). Turns are (prompt, reply) pairs; they fill ``cutoff - 1`` tokens in
order (cutoff: --seq-length, else 100000); each pair is cut by `infer_seqlen` to what is left, and once
nothing is left the remaining turns are dropped. A reply can therefore lose its ``<|im_end|>``.

Pairwise data (`encode_oneturn`, MindSpeed-LLM 2.3.0 -- in 2.2.0 this path fails with a TypeError for
qwen3): earlier replies lose their think blocks (and leading newlines) and get no empty think block; the
last reply follows the thinking rules above; the prompt is everything before the last reply. No truncation.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Sequence

SYSTEM = "<|im_start|>system\n{{content}}<|im_end|>\n"
PIECES = {
    "user": "<|im_start|>user\n{{content}}<|im_end|>\n<|im_start|>assistant\n",
    "observation": ("<|im_start|>user\n<tool_response>\n{{content}}\n</tool_response><|im_end|>\n"
                    "<|im_start|>assistant\n"),
    "assistant": "{{content}}<|im_end|>\n",
}
EMPTY_THOUGHT = "<think>\n\n</think>\n\n"
DEFAULT_CUTOFF = 100000  # MindSpeed-LLM's cutoff when --seq-length is not given
_THOUGHT = re.compile(re.escape("<think>") + "(.*?)" + re.escape("</think>"), re.DOTALL)


def remove_thought(content: str) -> str:
    return _THOUGHT.sub("", content).lstrip("\n")


def has_thought(content: str) -> bool:
    return "<think>" in content or "</think>" in content


def _fill(piece: str, content: str, idx: int | None = None) -> str:
    text = piece.replace("{{content}}", content, 1)
    return text.replace("{{idx}}", str(idx), 1) if idx is not None else text


def encode_messages(tokenizer, messages: Sequence[dict], system: str | None) -> list[list[int]]:
    """Token ids per message (the system piece joins the first message), no think blocks added."""
    out = []
    for i, m in enumerate(messages):
        ids = tokenizer.encode(_fill(SYSTEM, system)) if i == 0 and system else []
        idx = i // 2 if m["role"] == "user" else None
        ids = ids + tokenizer.encode(_fill(PIECES[m["role"]], m["content"], idx))
        out.append(ids)
    return out


def infer_seqlen(source_len: int, target_len: int, cutoff_len: int) -> tuple[int, int]:
    """(prompt, reply) lengths kept of one turn with `cutoff_len` tokens left: LLaMA-Factory's rule
    (MindSpeed-LLM's `_infer_seqlen`), float expression included."""
    if target_len * 2 < cutoff_len:  # keep the reply, cut the prompt
        max_target_len = cutoff_len
    elif source_len * 2 < cutoff_len:  # keep the prompt, cut the reply
        max_target_len = cutoff_len - source_len
    else:  # cut both in proportion
        max_target_len = int(cutoff_len * (target_len / (source_len + target_len)))
    new_target_len = min(max_target_len, target_len)
    new_source_len = min(max(cutoff_len - new_target_len, 0), source_len)
    return new_source_len, new_target_len


@dataclass
class Encoded:
    pairs: list[tuple[list[int], list[int]]]  # (prompt ids, reply ids) per kept turn
    truncated: bool  # a turn was cut or dropped by the cutoff


def encode_multiturn(tokenizer, messages: Sequence[dict], system: str | None, enable_thinking: bool | None,
                     cutoff_len: int | None) -> Encoded:
    """MindSpeed-LLM's instruction samples: `messages` alternate prompt turns (user / observation) and
    assistant replies, ending with a reply."""
    msgs = [dict(m) for m in messages]
    if enable_thinking is False:
        for m in msgs[1::2]:
            m["content"] = remove_thought(m["content"])
    encoded = encode_messages(tokenizer, msgs, system)
    thought = tokenizer.encode(EMPTY_THOUGHT)
    for i in range(0, len(msgs), 2):
        if not has_thought(msgs[i + 1]["content"]):
            if enable_thinking:
                encoded[i + 1] = thought + encoded[i + 1]
            else:
                encoded[i] = encoded[i] + thought
    cutoff = (cutoff_len if cutoff_len is not None else DEFAULT_CUTOFF) - 1  # one token reserved, as MindSpeed
    pairs, total = [], 0
    for i in range(0, len(encoded), 2):
        if total >= cutoff:
            break
        n_src, n_tgt = infer_seqlen(len(encoded[i]), len(encoded[i + 1]), cutoff - total)
        pairs.append((encoded[i][:n_src], encoded[i + 1][:n_tgt]))
        total += n_src + n_tgt
    return Encoded(pairs, total < sum(map(len, encoded)))


def encode_oneturn(tokenizer, messages: Sequence[dict], system: str | None,
                   enable_thinking: bool | None) -> tuple[list[int], list[int]]:
    """(prompt ids, last reply ids) of a conversation ending with a reply (the pairwise handlers)."""
    msgs = [dict(m) for m in messages]
    for m in msgs[1:-2:2]:
        m["content"] = remove_thought(m["content"])
    if enable_thinking is False:
        msgs[-1]["content"] = remove_thought(msgs[-1]["content"])
    encoded = encode_messages(tokenizer, msgs, system)
    prompt = [t for ids in encoded[:-1] for t in ids]
    response = encoded[-1]
    if not has_thought(msgs[-1]["content"]):
        thought = tokenizer.encode(EMPTY_THOUGHT)
        if enable_thinking:
            response = thought + response
        else:
            prompt = prompt + thought
    return prompt, response
