"""Helpers for the conversion tests: tiny HF Qwen3 checkpoints written by transformers, tensor comparison."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file

TINY = dict(vocab_size=256, hidden_size=64, intermediate_size=96, num_hidden_layers=4, num_attention_heads=4,
            num_key_value_heads=2, head_dim=32, max_position_embeddings=128, rope_theta=10000.0, rms_norm_eps=1e-6)


def make_hf(path: Path, *, tied: bool, dtype: torch.dtype, seed: int = 0, tokenizer: bool = False,
            **overrides) -> Path:
    """A random Qwen3ForCausalLM saved with save_pretrained (head_dim != hidden/heads on purpose)."""
    import transformers

    torch.manual_seed(seed)
    cfg = transformers.Qwen3Config(**{**TINY, **overrides}, tie_word_embeddings=tied)
    model = transformers.Qwen3ForCausalLM(cfg)
    with torch.no_grad():  # norms away from 1 so a swapped norm weight would show
        for name, p in model.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)
    model.to(dtype).save_pretrained(path)
    if tokenizer:  # stand-ins: conversion copies these files byte for byte
        (path / "tokenizer.json").write_text(json.dumps({"version": "1.0", "model": {"type": "BPE"}}))
        (path / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<|im_end|>"}))
    return path


def hf_tensors(path: Path) -> dict[str, torch.Tensor]:
    """All tensors of an HF dir (single or sharded safetensors)."""
    out: dict[str, torch.Tensor] = {}
    for file in sorted(Path(path).glob("*.safetensors")):
        out.update(load_file(file))
    return out


def assert_byte_identical(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert sorted(a) == sorted(b)
    for name in a:
        assert a[name].dtype == b[name].dtype, name
        assert a[name].shape == b[name].shape, name
        assert a[name].contiguous().view(torch.uint8).equal(b[name].contiguous().view(torch.uint8)), name
