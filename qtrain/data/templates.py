"""`--prompt-type qwen3-hf`: the model's own Qwen3 chat template, as text segments marked prompt / target.

(`--prompt-type qwen3`, MindSpeed-LLM's template and the default, is qtrain/data/mindspeed_template.py;
docs/sft.md lists how the two differ.)

`render_qwen3` reproduces the Qwen3 chat template of the model's tokenizer_config.json (as rendered by
transformers' `apply_chat_template`, no tools) for a whole conversation, and marks what the model
should learn: every assistant reply and its closing ``<|im_end|>\\n``. Everything else -- system, user
turns, the ``<|im_start|>assistant\\n`` headers -- is prompt.

Thinking (``--enable-thinking``), following the template and LLaMA-Factory's Qwen3 handling:

- the last assistant reply is rendered with a think block ``<think>\\n{reasoning}\\n</think>\\n\\n``
  (empty reasoning unless the reply holds ``<think>...</think>``); earlier replies without one;
- enable_thinking=False (default): reasoning in the last reply is dropped and the empty think block is
  prompt -- exactly what `apply_chat_template(..., add_generation_prompt=True, enable_thinking=False)`
  puts before the reply at inference, so the model learns to answer directly;
- enable_thinking=True: the think block (empty or not) is part of the target: the model learns to
  produce it.

`encode_segments` tokenizes the joined text in one piece (so ids equal the tokenizer's ids for the
rendered string) and derives labels from byte offsets: a token is a target token if it starts inside
a target segment. Message contents are NFC-normalised first (the Qwen tokenizer's normaliser), so byte
offsets in the text are offsets in the tokens.
"""

from __future__ import annotations

import unicodedata
from typing import Sequence

import numpy as np

from qtrain.data.readers import RecordError
from qtrain.labels import IGNORE_INDEX

PROMPT_TYPES = ("qwen3", "qwen3-hf")  # MindSpeed-LLM's template; the model's Jinja template

Segment = tuple[str, bool]  # (text, is_target)


def _split_reasoning(content: str) -> tuple[str, str]:
    """(reasoning, answer) of an assistant reply, split at '</think>' as the Qwen3 template does."""
    if "</think>" not in content:
        return "", content
    answer = content.split("</think>")[-1].lstrip("\n")
    reasoning = content.split("</think>")[0].rstrip("\n").split("<think>")[-1].lstrip("\n")
    return reasoning, answer


def render_qwen3(messages: Sequence[dict], enable_thinking: bool = False) -> list[Segment]:
    """Segments of the Qwen3 template for system? (user assistant)+ conversations.

    `messages`: dicts with 'role' in {system, user, assistant} and str 'content'; a system message may
    only come first; roles must then alternate user/assistant, ending with assistant.
    """
    nfc = lambda s: unicodedata.normalize("NFC", s)  # noqa: E731
    msgs = list(messages)
    segs: list[Segment] = []
    if msgs and msgs[0]["role"] == "system":
        segs.append(("<|im_start|>system\n" + nfc(msgs[0]["content"]) + "<|im_end|>\n", False))
        msgs = msgs[1:]
    if not msgs or len(msgs) % 2:
        roles = " -> ".join(m["role"] for m in msgs) or "none"
        raise RecordError("bad conversation", f"expected alternating user/assistant turns ending with an assistant "
                                               f"reply, got {len(msgs)} turn(s): {roles}")
    # The template renders think blocks only after the last real user query (tool responses
    # wrapped in <tool_response> tags do not count).
    last_query = len(msgs) - 1
    for i, m in enumerate(msgs):
        c = m["content"]
        if m["role"] == "user" and not (c.startswith("<tool_response>") and c.endswith("</tool_response>")):
            last_query = i
    for i, m in enumerate(msgs):
        want = "user" if i % 2 == 0 else "assistant"
        if m["role"] != want:
            raise RecordError("bad conversation", f"turn {i + 1} has role {m['role']!r}, expected {want!r}")
        if i % 2 == 0:
            segs.append(("<|im_start|>user\n" + nfc(m["content"]) + "<|im_end|>\n", False))
            continue
        reasoning, answer = _split_reasoning(m["content"])
        segs.append(("<|im_start|>assistant\n", False))
        last = i == len(msgs) - 1
        if last and not enable_thinking:
            reasoning = ""  # dropped: the prompt ends with an empty think block, as at inference
        if i > last_query and (last or reasoning):
            think = "<think>\n" + nfc(reasoning.strip("\n")) + "\n</think>\n\n"
            segs.append((think, enable_thinking or not last))
            answer = answer.lstrip("\n")
        segs.append((nfc(answer) + "<|im_end|>\n", True))
    return segs


def render_text(segments: Sequence[Segment]) -> str:
    return "".join(text for text, _ in segments)


def encode_segments(tokenizer, segments: Sequence[Segment]) -> tuple[np.ndarray, np.ndarray]:
    """(input_ids, labels) int32 arrays; labels are input_ids on target tokens, IGNORE_INDEX elsewhere."""
    text = render_text(segments)
    ids = np.asarray(tokenizer.encode(text), dtype=np.int64)
    starts = np.zeros(len(ids), dtype=np.int64)
    if len(ids) > 1:
        np.cumsum(tokenizer.token_byte_lengths[ids[:-1]], out=starts[1:])
    is_target = np.zeros(len(ids), dtype=bool)
    pos = 0
    for seg, target in segments:
        end = pos + len(seg.encode("utf-8"))
        if target:
            is_target |= (starts >= pos) & (starts < end)
        pos = end
    labels = np.where(is_target, ids, IGNORE_INDEX)
    return ids.astype(np.int32), labels.astype(np.int32)

