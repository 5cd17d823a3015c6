"""qtrain: pretrain and fine-tune Qwen3 language models, PyTorch-native."""

__version__ = "0.1.0"

__all__ = ["__version__", "load_hf", "save_hf", "Qwen3Config", "Qwen3ForCausalLM"]


def __getattr__(name):
    # Lazy so that `import qtrain` (and `qtrain --version`) does not pay for importing torch.
    if name in ("load_hf", "save_hf"):
        from qtrain.models import hf

        return getattr(hf, name)
    if name in ("Qwen3Config", "Qwen3ForCausalLM"):
        from qtrain.models import qwen3

        return getattr(qwen3, name)
    raise AttributeError(f"module 'qtrain' has no attribute {name!r}")
