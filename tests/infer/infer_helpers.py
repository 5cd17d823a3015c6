"""Tiny Qwen3 models for inference tests: a transformers + qtrain pair with the same weights."""

import pytest
import torch

from qtrain.models.config import Qwen3Config
from qtrain.models.qwen3 import Qwen3ForCausalLM


def tiny_config(vocab: int = 211, **kw) -> Qwen3Config:
    d = dict(vocab_size=vocab, hidden_size=64, intermediate_size=160, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, head_dim=16, max_position_embeddings=256, rope_theta=10000.0,
             eos_token_id=None, bos_token_id=None)
    d.update(kw)
    return Qwen3Config(**d)


def spread_weights(model: torch.nn.Module, seed: int = 0) -> None:
    """Weights large enough that greedy decoding does not collapse to one repeated token."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(1.0 + 0.2 * torch.randn(p.shape, generator=g))
            else:
                p.copy_((0.25 if "embed" in name else 0.15) * torch.randn(p.shape, generator=g))


def hf_pair(cfg: Qwen3Config, seed: int = 0):
    """(transformers Qwen3ForCausalLM, qtrain Qwen3ForCausalLM) with the same weights, eval mode."""
    transformers = pytest.importorskip("transformers")
    hf = transformers.Qwen3ForCausalLM(
        transformers.Qwen3Config(**cfg.to_hf_dict("float32"), attn_implementation="sdpa")).eval()
    spread_weights(hf, seed)
    ours = Qwen3ForCausalLM(cfg).eval()
    ours.load_state_dict(hf.state_dict(), strict=True)
    return hf, ours


def save_tiny_hf(path, vocab: int = 211, tokenizer_dir=None, seed: int = 0):
    """A tiny qtrain model with spread weights written as an HF dir; returns the model."""
    from qtrain.models.hf import save_hf

    cfg = tiny_config(vocab=vocab, hidden_size=32, intermediate_size=64, head_dim=8, num_hidden_layers=1,
                      eos_token_id=151645 if vocab > 151645 else None)
    model = Qwen3ForCausalLM(cfg).eval()
    spread_weights(model, seed)
    save_hf(model, path, tokenizer_dir=tokenizer_dir)
    return model
