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

Instruction and preference-pair handlers (AlpacaStyleInstructionHandler, SharegptStyleInstructionHandler,
AlpacaStylePairwiseHandler, SharegptStylePairwiseHandler): qtrain/data/instruction_handlers.py.
"""

from __future__ import annotations

from typing import Any

from qtrain.data.chat_records import text_field
from qtrain.data.indexed import best_dtype
from qtrain.data.instruction_handlers import INSTRUCTION_HANDLERS, build_instruction_handler
from qtrain.data.readers import check_text
from qtrain.errors import ConfigError

HANDLERS = ("GeneralPretrainHandler", *INSTRUCTION_HANDLERS)


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
                text_field(record, key, "--json-keys")  # raises the missing-key error
            ids: list[int] = []
            lengths: list[int] = []
            for s in value if isinstance(value, list) else [value]:
                if not isinstance(s, str):
                    s = text_field({key: s}, key, "--json-keys")  # decodes bytes, refuses other types
                sid = self.tokenizer.encode(check_text(s))
                if sid:
                    ids.extend(sid)
                    lengths.append(len(sid))
            if ids and self.append_eod:
                ids.append(self.tokenizer.eod)
                lengths[-1] += 1
            out[key] = (ids, lengths)
        return out


def build_handler(name: str, tokenizer, **options: Any):
    """The handler called `name` (MindSpeed-LLM's --handler-name) with its options."""
    if name == "GeneralPretrainHandler":
        return GeneralPretrainHandler(tokenizer, options.get("json_keys") or ["text"], options.get("append_eod", False))
    if name not in INSTRUCTION_HANDLERS:
        raise ConfigError(f"--handler-name {name!r}: supported handlers are {', '.join(HANDLERS)}")
    kw = {k: options[k] for k in ("prompt_type", "enable_thinking", "seq_length") if options.get(k) is not None}
    if name.endswith("InstructionHandler"):
        kw.update({k: bool(options.get(k)) for k in ("neat_pack", "append_eod")})
    return build_instruction_handler(name, tokenizer, options.get("map_keys"), **kw)
