"""Megatron's document flags for pretraining (--reset-position-ids, --reset-attention-mask,
--eod-mask-loss): which are on, and the end-of-document token they split at. Documents travel
with the batch on every layout (pipeline stages get them beside the tokens; context parallel
masks by global position and document).

A sample of a pretraining corpus runs across document boundaries; Megatron marks a document's end
by the EOD token (the tokenizer's eos, what `qtrain preprocess --append-eod` appends), so these
flags need the tokenizer (--tokenizer-name-or-path). The data set turns them into per-document
positions, `cu_seqlens` and the loss mask (qtrain.data.gpt_dataset.make_item).
"""

from __future__ import annotations

from qtrain.config import PretrainConfig
from qtrain.errors import ConfigError

FLAGS = {"reset_position_ids": "--reset-position-ids", "reset_attention_mask": "--reset-attention-mask",
         "eod_mask_loss": "--eod-mask-loss"}


def document_flags(cfg: PretrainConfig) -> list[str]:
    """The document flags given (their spelling on the command line)."""
    return [flag for name, flag in FLAGS.items() if getattr(cfg.data, name)]


def eod_token_id(cfg: PretrainConfig) -> int:
    """The tokenizer's end-of-document id (its eos_token_id, as Megatron's HF tokenizer reads it)."""
    flags = ", ".join(document_flags(cfg))
    if not cfg.data.tokenizer_name_or_path:
        raise ConfigError(f"{flags}: documents end at the tokenizer's EOD token; give --tokenizer-name-or-path")
    from qtrain.data.tokenizer import Tokenizer

    eod = Tokenizer(cfg.data.tokenizer_name_or_path, fast=False).eod
    if eod is None:
        raise ConfigError(f"{flags}: tokenizer {cfg.data.tokenizer_name_or_path} has no eos token (EOD)")
    return int(eod)

