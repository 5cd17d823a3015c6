"""Instruction and preference-pair handlers: a record in, MindSpeed-LLM's token sequences out.

AlpacaStyleInstructionHandler / SharegptStyleInstructionHandler write three int32 datasets, named as
MindSpeed-LLM names them whether or not ``--pack`` is given: ``<prefix>_packed_input_ids_document``,
``<prefix>_packed_attention_mask_document``, ``<prefix>_packed_labels_document``.

  Without --pack, one document per record, holding one sequence:
    input_ids       the conversation rendered by the chat template (--prompt-type, below) and tokenized,
                    then, with --append-eod, the tokenizer's eos (``<|im_end|>``, 151645 for Qwen3);
    labels          NOT shifted: labels[i] = input_ids[i] on tokens the model must produce (the replies,
                    their ``<|im_end|>\\n``, the appended eos), -100 on every prompt token. The trainer
                    predicts labels[i + 1] from position i;
    attention_mask  all 1.
  A sample of --seq-length tokens or more (possible only through --append-eod for --prompt-type qwen3,
  whose template already cuts samples to --seq-length - 1 tokens) is dropped and leaves an empty document
  (no sequence), as MindSpeed-LLM's writer does.

  With --pack (qtrain/data/packing.py), one document per pack of exactly --seq-length tokens: whole
  samples packed into seq_length - 1 tokens (one position always padding), then padded with the
  tokenizer's pad id (labels -100). attention_mask: all 1, padding included (plain --pack); with
  --neat-pack the sample's 1-based index within the pack on its tokens and 0 on padding, which lets the
  trainer restart positions and keep samples apart. With --neat-pack a sample of --seq-length tokens or
  more is cut to seq_length - 1 tokens instead of dropped.

--prompt-type:
  qwen3     MindSpeed-LLM 2.2.0's Qwen3 template (qtrain/data/mindspeed_template.py): the same bytes as
            MindSpeed-LLM's preprocess_data.py for the same flags. --enable-thinking true/false/unset.
  qwen3-hf  the model's own chat template as transformers' `apply_chat_template` renders it
            (qtrain/data/templates.py), token for token; --enable-thinking unset means false. Samples of
            --seq-length tokens or more are dropped (or cut with --neat-pack), never cut per turn.

AlpacaStylePairwiseHandler / SharegptStylePairwiseHandler (preference pairs, --prompt-type qwen3) write
four int32 datasets ``<prefix>_packed_{chosen_input_ids,chosen_labels,rejected_input_ids,rejected_labels}
_document``: per record one document of one sequence each, prompt + answer, labels -100 on the prompt.
A pair with either side of --seq-length tokens or more is dropped (empty documents in all four).

Records map to conversations with --map-keys (qtrain/data/chat_records.py). Every truncated, dropped or
partly ignored record is counted in the preprocess summary with the first example.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from qtrain.data.chat_records import AlpacaRecords, Chat, SharegptRecords
from qtrain.data.mindspeed_template import encode_multiturn, encode_oneturn
from qtrain.data.readers import RecordError
from qtrain.data.templates import IGNORE_INDEX, PROMPT_TYPES, encode_segments, render_qwen3
from qtrain.errors import ConfigError

INSTRUCTION_KEYS = ("input_ids", "attention_mask", "labels")
PAIRWISE_KEYS = ("chosen_input_ids", "chosen_labels", "rejected_input_ids", "rejected_labels")
TRUNCATED = "over-length samples cut to fit --seq-length"
DROPPED = "over-length samples dropped (--seq-length tokens or more)"


def _empty(keys) -> dict[str, tuple[np.ndarray, list[int]]]:
    return {k: (np.zeros(0, dtype=np.int32), []) for k in keys}


class _Handler:
    """What the instruction and pairwise handlers share: int32 outputs under MindSpeed-LLM's names."""

    instruction = True
    dtype = np.int32  # labels hold -100
    output_keys: list[str] = []

    def __init__(self, tokenizer, prompt_type: str = "qwen3", enable_thinking: bool | None = None,
                 seq_length: int | None = None):
        if prompt_type not in PROMPT_TYPES:
            raise ConfigError(f"--prompt-type {prompt_type!r}: supported: {', '.join(PROMPT_TYPES)}")
        self.tokenizer, self.prompt_type = tokenizer, prompt_type
        self.enable_thinking, self.seq_length = enable_thinking, seq_length

    def output_prefix(self, prefix: str, key: str) -> str:
        return f"{prefix}_packed_{key}_document"

    def columns(self) -> list[str] | None:
        return None  # optional fields are read when present


class InstructionHandler(_Handler):
    output_keys = list(INSTRUCTION_KEYS)

    def __init__(self, tokenizer, records: AlpacaRecords | SharegptRecords, neat_pack: bool = False,
                 append_eod: bool = False, **kw: Any):
        super().__init__(tokenizer, **kw)
        self.records, self.neat_pack, self.append_eod = records, neat_pack, append_eod
        if append_eod and tokenizer.eod is None:
            raise ConfigError(f"--append-eod: tokenizer {tokenizer.path} has no eos_token; drop --append-eod")

    def _ids_labels(self, chat: Chat, notes: list) -> tuple[np.ndarray, np.ndarray]:
        if self.prompt_type == "qwen3":
            enc = encode_multiturn(self.tokenizer, chat.messages, chat.system, self.enable_thinking, self.seq_length)
            ids = [t for src, tgt in enc.pairs for t in src + tgt]
            labels = [t for src, tgt in enc.pairs for t in [IGNORE_INDEX] * len(src) + tgt]
            if enc.truncated:
                notes.append((TRUNCATED, f"cut to {len(ids)} tokens by the template (--seq-length {self.seq_length})"))
            return np.asarray(ids, dtype=np.int32), np.asarray(labels, dtype=np.int32)
        messages = [{"role": "system", "content": chat.system}] if chat.system else []
        for m in chat.messages:
            if m["role"] == "observation":
                raise RecordError("tools unsupported", "observation turns need --prompt-type qwen3")
            messages.append(m)
        return encode_segments(self.tokenizer, render_qwen3(messages, bool(self.enable_thinking)))

    def encode(self, record: dict) -> dict[str, Any]:
        chat = self.records.chat(record)
        notes = list(chat.notes)
        ids, labels = self._ids_labels(chat, notes)
        if self.append_eod:  # trained, like every reply token
            ids, labels = (np.append(a, np.int32(self.tokenizer.eod)) for a in (ids, labels))
        n = len(ids)
        if self.seq_length is not None and n >= self.seq_length:
            notes = [note for note in notes if note[0] != TRUNCATED]  # one count per sample: the final fate
            if not self.neat_pack:
                notes.append((DROPPED, f"{n} tokens >= --seq-length {self.seq_length}"))
                return {**_empty(INSTRUCTION_KEYS), "notes": notes}
            ids, labels = ids[: self.seq_length - 1], labels[: self.seq_length - 1]
            notes.append((TRUNCATED, f"{n} tokens cut to {self.seq_length - 1} (--neat-pack)"))
            n = len(ids)
        return {"input_ids": (ids, [n]), "attention_mask": (np.ones(n, dtype=np.int32), [n]),
                "labels": (labels, [n]), "notes": notes}


class PairwiseHandler(_Handler):
    output_keys = list(PAIRWISE_KEYS)

    def __init__(self, tokenizer, records: AlpacaRecords | SharegptRecords, **kw: Any):
        super().__init__(tokenizer, **kw)
        if self.prompt_type != "qwen3":
            raise ConfigError(f"--prompt-type {self.prompt_type}: the pairwise handlers write MindSpeed-LLM's "
                              "layout with --prompt-type qwen3 only")
        self.records = records

    def encode(self, record: dict) -> dict[str, Any]:
        pair = self.records.pair(record)
        out, notes = {}, list(pair.notes)
        for side, answer in (("chosen", pair.chosen), ("rejected", pair.rejected)):
            messages = pair.prompt + [{"role": "assistant", "content": answer}]
            prompt_ids, answer_ids = encode_oneturn(self.tokenizer, messages, pair.system, self.enable_thinking)
            if side == "chosen":
                prompt = prompt_ids  # MindSpeed-LLM uses the chosen side's prompt for both
            ids = np.asarray(prompt + answer_ids, dtype=np.int32)
            labels = np.asarray([IGNORE_INDEX] * len(prompt) + answer_ids, dtype=np.int32)
            out[f"{side}_input_ids"], out[f"{side}_labels"] = (ids, [len(ids)]), (labels, [len(ids)])
        longest = max(len(out["chosen_input_ids"][0]), len(out["rejected_input_ids"][0]))
        if self.seq_length is not None and longest >= self.seq_length:
            notes.append((DROPPED, f"{longest} tokens >= --seq-length {self.seq_length}"))
            out = _empty(PAIRWISE_KEYS)
        return {**out, "notes": notes}


INSTRUCTION_HANDLERS = {
    "AlpacaStyleInstructionHandler": (InstructionHandler, AlpacaRecords),
    "SharegptStyleInstructionHandler": (InstructionHandler, SharegptRecords),
    "AlpacaStylePairwiseHandler": (PairwiseHandler, AlpacaRecords),
    "SharegptStylePairwiseHandler": (PairwiseHandler, SharegptRecords),
}


def build_instruction_handler(name: str, tokenizer, map_keys=None, **options: Any):
    cls, records = INSTRUCTION_HANDLERS[name]
    return cls(tokenizer, records(map_keys, pairwise=cls is PairwiseHandler), **options)
