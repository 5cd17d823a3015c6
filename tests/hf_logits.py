"""An exported HF dir checked against a qtrain checkpoint: transformers' logits == qtrain's.
Imported as `from hf_logits import ...` (tests/ is on sys.path, as for tolerances.py)."""

import torch

from tolerances import assert_close_scaled, qwen3_terms


def assert_export_has_checkpoint_logits(hf_dir, ckpt_folder) -> torch.Tensor:
    """transformers' logits of `hf_dir` == qtrain's of the checkpoint `ckpt_folder`; returns them."""
    import transformers

    from qtrain.checkpoint import dcp as ckpt
    from qtrain.models.qwen3 import build_model
    from qtrain.parallel.weights import materialize

    theirs = transformers.AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
    cfg = ckpt.read_checkpoint_model_config(ckpt_folder)
    ours = materialize(build_model(cfg, "meta"), "cpu", seed=0)
    ckpt.load_checkpoint(ckpt_folder, ours, None, finetune=True)
    ids = torch.arange(24).reshape(2, 12) * 37 % cfg.vocab_size
    with torch.no_grad():
        expected, actual = ours(ids).float(), theirs(ids).logits.float()
    assert_close_scaled(actual, expected, terms=qwen3_terms(cfg, 12), what=str(hf_dir))
    return actual
