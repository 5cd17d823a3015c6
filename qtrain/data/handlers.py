"""Dataset handlers (MindSpeed-LLM's `--handler-name`s): one record in, token sequences out.

Output files (Megatron MMIDIDX, see qtrain/data/indexed.py):

GeneralPretrainHandler -- ``<prefix>_<key>_document.{bin,idx}``, one dataset per ``--json-keys`` key.
  Each record is one document: the key's text tokenized as the HF tokenizer does (``tokenizer(text)
  .input_ids``), then, with ``--append-eod``, the tokenizer's ``eos_token_id`` (``<|im_end|>``, 151645,
  for Qwen3). A list value is a list of sentences: one sequence each, empty ones dropped, the EOD
  appended to the last. An empty text is kept as a zero-length document (a document with no
  sequences, no EOD), as Megatron-LM's tools/preprocess_data.py does, and counted in the summary
  (MindSpeed-LLM drops such records; keeping them keeps our files byte-identical to Megatron's).
  dtype: uint16 if the vocabulary (``len(tokenizer)``) is below 65,500, else int32 (Megatron's choice).

AlpacaStyleInstructionHandler / SharegptStyleInstructionHandler -- three int32 datasets, named as
  MindSpeed-LLM names them whether or not ``--pack`` is given:
  ``<prefix>_packed_input_ids_document``, ``<prefix>_packed_attention_mask_document``,
  ``<prefix>_packed_labels_document``; the three have the same document and sequence lengths.

  Without --pack, one document (one sequence) per sample:
    input_ids       the chat template (qtrain/data/templates.py) rendered and tokenized; identical to
                    ``tokenizer.apply_chat_template(messages)``;
    labels          NOT shifted: labels[i] = input_ids[i] on tokens the model must produce (assistant
                    replies and their ``<|im_end|>\\n``), -100 on every prompt token (system, user,
                    ``<|im_start|>assistant\\n`` headers, the empty think block when thinking is off).
                    The trainer predicts labels[i + 1] from position i;
    attention_mask  all 1 (MindSpeed-LLM writes the same).
    Samples of ``--seq-length`` tokens or more are dropped and counted (as MindSpeed-LLM does).

  With --pack (see qtrain/data/packing.py), one document (one sequence) per pack of exactly
  ``--seq-length`` tokens: whole samples greedily packed into seq_length - 1 tokens (one position is
  always padding, as in MindSpeed-LLM), then padded:
    input_ids       samples back to back, then the tokenizer's pad_token_id (eos if it has none);
    labels          each sample's labels (unshifted, as above), then -100 on padding;
    attention_mask  the sample's 1-based index within the pack on its tokens (1, 1, ..., 2, 2, ...)
                    and 0 on padding: MindSpeed-LLM's --neat-pack layout, which lets the trainer
                    restart position ids and block attention across samples.

Records map to conversations with ``--map-keys`` (MindSpeed-LLM's JSON dict; defaults below).
"""

from __future__ import annotations

import json
from typing import Any

import numpy as np

from qtrain.data.indexed import best_dtype
from qtrain.data.readers import RecordError, check_text
from qtrain.data.templates import PROMPT_TYPES, encode_segments, render
from qtrain.errors import ConfigError

HANDLERS = ("GeneralPretrainHandler", "AlpacaStyleInstructionHandler", "SharegptStyleInstructionHandler")
INSTRUCTION_KEYS = ("input_ids", "attention_mask", "labels")

ALPACA_KEYS = {"prompt": "instruction", "query": "input", "response": "output", "system": "system", "history": "history"}
SHAREGPT_KEYS = {"messages": "conversations", "system": "system", "tools": "tools"}
SHAREGPT_TAGS = {
    "role_tag": "from",
    "content_tag": "value",
    "user_tag": "human",
    "assistant_tag": "gpt",
    "system_tag": "system",
    "observation_tag": "observation",
    "function_tag": "function_call",
}


class Dropped(RecordError):
    """A valid record left out by rule (e.g. longer than --seq-length): counted, never an error."""


def _describe_keys(record: dict) -> str:
    keys = list(record)
    return ", ".join(map(repr, keys[:12])) + (", ..." if len(keys) > 12 else "") if keys else "none"


def _text(record: dict, key: str, option: str, required: bool = True) -> str | None:
    if key not in record or record[key] is None:
        if not required:
            return None
        what = "no key" if key not in record else "a null value for"
        raise RecordError("missing key", f"{what} {key!r} (the record has {_describe_keys(record)}); set {option}")
    value = record[key]
    if isinstance(value, bytes):
        try:
            value = value.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise RecordError("not UTF-8", f"{key!r} is not valid UTF-8 (byte {exc.start})") from None
    if not isinstance(value, str):
        raise RecordError("wrong type", f"{key!r} is a {type(value).__name__}, expected a string")
    return check_text(value)


class GeneralPretrainHandler:
    """Plain text -> token documents, exactly as Megatron-LM's preprocess_data.py with an HF tokenizer."""

    instruction = False

    def __init__(self, tokenizer, json_keys: list[str], append_eod: bool = False):
        self.tokenizer = tokenizer
        self.keys = list(json_keys)
        self.append_eod = append_eod
        if append_eod and tokenizer.eod is None:
            raise ConfigError(f"--append-eod: tokenizer {tokenizer.path} has no eos_token; drop --append-eod")
        self.dtype = best_dtype(tokenizer.vocab_size)

    @property
    def output_keys(self) -> list[str]:
        return self.keys

    def output_prefix(self, prefix: str, key: str) -> str:
        return f"{prefix}_{key}_document"

    def columns(self) -> list[str]:
        return self.keys

    def encode(self, record: dict) -> dict[str, tuple[list[int], list[int]]]:
        """{key: (token ids, sequence lengths)} for one record; no sequences for an empty text."""
        out = {}
        for key in self.keys:
            value = record.get(key)
            if value is None:
                _text(record, key, "--json-keys")  # raises the missing-key error
            ids: list[int] = []
            lengths: list[int] = []
            for s in value if isinstance(value, list) else [value]:
                if not isinstance(s, str):
                    s = _text({key: s}, key, "--json-keys")  # decodes bytes, refuses other types
                sid = self.tokenizer.encode(check_text(s))
                if sid:
                    ids.extend(sid)
                    lengths.append(len(sid))
            if ids and self.append_eod:
                ids.append(self.tokenizer.eod)
                lengths[-1] += 1
            out[key] = (ids, lengths)
        return out


class _InstructionHandler:
    """Shared by the Alpaca and ShareGPT handlers: messages -> chat template -> ids and labels."""

    instruction = True
    output_keys = list(INSTRUCTION_KEYS)
    dtype = np.int32  # labels hold -100

    def __init__(self, tokenizer, prompt_type: str = "qwen3", enable_thinking: bool = False, seq_length: int | None = None):
        self.tokenizer = tokenizer
        self.prompt_type = prompt_type
        self.enable_thinking = enable_thinking
        self.seq_length = seq_length
        if prompt_type not in PROMPT_TYPES:
            raise ConfigError(f"--prompt-type {prompt_type!r}: supported: {', '.join(PROMPT_TYPES)}")

    def output_prefix(self, prefix: str, key: str) -> str:
        return f"{prefix}_packed_{key}_document"

    def columns(self) -> list[str] | None:
        return None  # optional fields (system, history) are read when present

    def messages(self, record: dict) -> list[dict]:
        raise NotImplementedError

    def encode(self, record: dict) -> dict[str, tuple[np.ndarray, list[int]]]:
        ids, labels = encode_segments(self.tokenizer, render(self.prompt_type, self.messages(record), self.enable_thinking))
        n = len(ids)
        if self.seq_length is not None and n >= self.seq_length:
            raise Dropped("longer than --seq-length", f"{n} tokens >= --seq-length {self.seq_length}")
        return {
            "input_ids": (ids, [n]),
            "attention_mask": (np.ones(n, dtype=np.int32), [n]),
            "labels": (labels, [n]),
        }


def _parse_map_keys(map_keys: str | dict | None, defaults: dict, allowed: set[str]) -> dict:
    if map_keys is None:
        return dict(defaults)
    if isinstance(map_keys, str):
        try:
            map_keys = json.loads(map_keys)
        except json.JSONDecodeError as exc:
            raise ConfigError(f"--map-keys {map_keys!r}: not valid JSON ({exc.msg}); e.g. '{json.dumps(defaults)}'") from None
    if not isinstance(map_keys, dict):
        raise ConfigError(f"--map-keys must be a JSON object, e.g. '{json.dumps(defaults)}'")
    unknown = sorted(set(map_keys) - allowed)
    if unknown:
        raise ConfigError(f"--map-keys: unknown field(s) {unknown}; allowed: {sorted(allowed)}")
    return {**defaults, **map_keys}


class AlpacaStyleInstructionHandler(_InstructionHandler):
    """Alpaca records: instruction, input, output[, system, history=[[q, a], ...]].

    --map-keys names the fields: '{"prompt": "instruction", "query": "input", "response": "output",
    "system": "system", "history": "history"}' (these are the defaults). The user turn is
    instruction and input joined by a newline (input omitted when empty), as LLaMA-Factory does.
    """

    def __init__(self, tokenizer, map_keys: str | dict | None = None, **kw: Any):
        super().__init__(tokenizer, **kw)
        self.keys = _parse_map_keys(map_keys, ALPACA_KEYS, set(ALPACA_KEYS))

    def messages(self, record: dict) -> list[dict]:
        k = self.keys
        msgs = []
        system = _text(record, k["system"], "--map-keys system", required=False) if k.get("system") else None
        if system:
            msgs.append({"role": "system", "content": system})
        history = record.get(k["history"]) if k.get("history") else None
        if history:
            if not isinstance(history, list) or not all(isinstance(t, (list, tuple)) and len(t) == 2 for t in history):
                raise RecordError("bad history", f"{k['history']!r} must be a list of [prompt, response] pairs")
            for q, a in history:
                if not isinstance(q, str) or not isinstance(a, str):
                    raise RecordError("bad history", f"{k['history']!r} holds a non-string turn")
                msgs += [{"role": "user", "content": check_text(q)}, {"role": "assistant", "content": check_text(a)}]
        prompt = _text(record, k["prompt"], "--map-keys prompt")
        query = _text(record, k["query"], "--map-keys query", required=False) if k.get("query") else None
        user = "\n".join(p for p in (prompt, query) if p)
        msgs.append({"role": "user", "content": user})
        msgs.append({"role": "assistant", "content": _text(record, k["response"], "--map-keys response")})
        return msgs


class SharegptStyleInstructionHandler(_InstructionHandler):
    """ShareGPT records: {"conversations": [{"from": "human"|"gpt"|"system", "value": ...}, ...], "system"?}.

    --map-keys: '{"messages": "conversations", "system": "system", "tools": "tools", "tags": {"role_tag":
    "from", "content_tag": "value", "user_tag": "human", "assistant_tag": "gpt", "system_tag": "system"}}'
    (the defaults; e.g. OpenAI-style data: '{"messages": "messages", "tags": {"role_tag": "role",
    "content_tag": "content", "user_tag": "user", "assistant_tag": "assistant"}}'). A leading system turn
    wins over the system field. Turns must alternate user/assistant and end with assistant; tool and
    function-call turns are not supported (such records are bad records).
    """

    def __init__(self, tokenizer, map_keys: str | dict | None = None, **kw: Any):
        super().__init__(tokenizer, **kw)
        self.keys = _parse_map_keys(map_keys, SHAREGPT_KEYS, set(SHAREGPT_KEYS) | {"tags"})
        tags = self.keys.pop("tags", None) or {}
        unknown = sorted(set(tags) - set(SHAREGPT_TAGS))
        if unknown:
            raise ConfigError(f"--map-keys tags: unknown tag(s) {unknown}; allowed: {sorted(SHAREGPT_TAGS)}")
        self.tags = {**SHAREGPT_TAGS, **tags}

    def messages(self, record: dict) -> list[dict]:
        t = self.tags
        name = self.keys["messages"]
        turns = record.get(name)
        if turns is None:
            raise RecordError("missing key", f"no key {name!r} (the record has {_describe_keys(record)}); set --map-keys messages")
        if not isinstance(turns, list):
            raise RecordError("wrong type", f"{name!r} is a {type(turns).__name__}, expected a list of turns")
        if self.keys.get("tools") and record.get(self.keys["tools"]):
            raise RecordError("tools unsupported", "records with tools are not supported")
        roles = {t["user_tag"]: "user", t["assistant_tag"]: "assistant", t["system_tag"]: "system"}
        msgs = []
        for i, turn in enumerate(turns):
            if not isinstance(turn, dict) or t["role_tag"] not in turn or t["content_tag"] not in turn:
                raise RecordError("bad conversation", f"turn {i + 1} lacks {t['role_tag']!r} or {t['content_tag']!r}")
            role = roles.get(turn[t["role_tag"]])
            if role is None:
                raise RecordError("bad conversation", f"turn {i + 1}: unsupported role {turn[t['role_tag']]!r}")
            if role == "system" and i != 0:
                raise RecordError("bad conversation", f"turn {i + 1}: a system turn may only come first")
            msgs.append({"role": role, "content": _text(turn, t["content_tag"], "--map-keys tags")})
        if not (msgs and msgs[0]["role"] == "system") and self.keys.get("system"):
            system = _text(record, self.keys["system"], "--map-keys system", required=False)
            if system:
                msgs.insert(0, {"role": "system", "content": system})
        return msgs


def build_handler(name: str, tokenizer, **options: Any):
    """The handler called `name` (MindSpeed-LLM's --handler-name) with its options."""
    if name == "GeneralPretrainHandler":
        return GeneralPretrainHandler(tokenizer, options.get("json_keys") or ["text"], options.get("append_eod", False))
    kw = dict(
        map_keys=options.get("map_keys"),
        prompt_type=options.get("prompt_type") or "qwen3",
        enable_thinking=options.get("enable_thinking", False),
        seq_length=options.get("seq_length"),
    )
    if name == "AlpacaStyleInstructionHandler":
        return AlpacaStyleInstructionHandler(tokenizer, **kw)
    if name == "SharegptStyleInstructionHandler":
        return SharegptStyleInstructionHandler(tokenizer, **kw)
    raise ConfigError(f"--handler-name {name!r}: supported handlers are {', '.join(HANDLERS)}")
