"""Which keys of a Hugging Face Qwen3 config.json qtrain implements, which cannot change what the
model computes in training (each with its reason), and which it refuses unless they hold the one
value qtrain computes. Any other key is refused by name: qtrain cannot tell whether some reader of
the model (transformers, vLLM, custom code) acts on it.

`check_hf_keys(d, source)` applies the table; `Qwen3Config.from_hf_dict` calls it on every HF
config qtrain reads (HF dirs, qtrain checkpoints, the HF config kept in Megatron args).
tests/models/test_hf_config_keys.py walks transformers' Qwen3Config fields (and the keys a
transformers-4 config.json carries) and checks each against this table.
"""

from __future__ import annotations

from typing import Any, Callable

from qtrain.errors import ConfigError

# Read into Qwen3Config; each is parity-tested against transformers' Qwen3ForCausalLM.
# rope_scaling / rope_parameters (and rope_theta inside them) are read by models/rope_scaling.py.
IMPLEMENTED = frozenset({
    "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
    "num_key_value_heads", "head_dim", "max_position_embeddings", "rope_theta", "rms_norm_eps",
    "tie_word_embeddings", "attention_bias", "initializer_range", "bos_token_id", "eos_token_id",
    "rope_scaling", "rope_parameters",
})

# Mixture-of-experts keys, implemented for model_type "qwen3_moe" only (parity-tested against
# transformers' Qwen3MoeForCausalLM); in a dense "qwen3" config they are unknown keys, refused.
# transformers 5 writes num_experts as "num_local_experts" (its attribute_map); both are read.
MOE_IMPLEMENTED = frozenset({
    "num_experts", "num_local_experts", "num_experts_per_tok", "moe_intermediate_size", "norm_topk_prob",
    "decoder_sparse_step", "mlp_only_layers", "router_aux_loss_coef", "output_router_logits",
})

# transformers' Qwen3Config value of each implemented key when config.json leaves it out
# (the same in transformers 4.51 and 5.x; test_hf_config_keys checks them against the installed one).
HF_DEFAULTS: dict[str, Any] = {
    "vocab_size": 151936, "hidden_size": 4096, "intermediate_size": 22016, "num_hidden_layers": 32,
    "num_attention_heads": 32, "num_key_value_heads": 32, "head_dim": 128, "max_position_embeddings": 32768,
    "rope_theta": 10000.0, "rms_norm_eps": 1e-6, "tie_word_embeddings": False, "attention_bias": False,
    "initializer_range": 0.02, "bos_token_id": None, "eos_token_id": None,
}

# transformers' Qwen3MoeConfig defaults (5.x), for a qwen3_moe config.json that leaves keys out. It has
# no head_dim field: the attention then uses hidden_size // num_attention_heads (None here).
HF_MOE_DEFAULTS: dict[str, Any] = {
    **HF_DEFAULTS, "hidden_size": 2048, "intermediate_size": 6144, "num_hidden_layers": 24,
    "num_attention_heads": 32, "num_key_value_heads": 4, "head_dim": None,
    "num_experts": 128, "num_experts_per_tok": 8, "moe_intermediate_size": 768, "norm_topk_prob": False,
    "decoder_sparse_step": 1, "mlp_only_layers": [], "router_aux_loss_coef": 0.001, "output_router_logits": False,
}

_GENERATION = ("a default of transformers-4 generate(), not of the model; qtrain generate takes its "
               "settings from its flags")
_CLASSIFICATION = "used by sequence-classification heads only; the causal LM never reads it"
_OUTPUT = "selects what transformers' forward returns, not what it computes"

# Accepted and kept (writers pass the source's config.json on): they do not change the logits,
# the loss or the gradients of qtrain's (or transformers') Qwen3 causal LM.
NO_EFFECT: dict[str, str] = {
    "transformers_version": "metadata",
    "_name_or_path": "metadata",
    "torch_dtype": "the dtype the weights are stored in; training precision comes from --bf16",
    "dtype": "transformers 5's name of torch_dtype",
    "use_cache": "turns the KV cache of generation on or off; values are the same",
    "pad_token_id": "HF builds the embedding with padding_idx, so in transformers' training that row gets "
                    "no gradient; the forward is the same, and qtrain trains every embedding row as "
                    "Megatron-LM and MindSpeed-LLM do (README, limitations)",
    "sliding_window": "used only with use_sliding_window, which must be false (see REQUIRED)",
    "max_window_layers": "used only with use_sliding_window, which must be false (see REQUIRED)",
    "chunk_size_feed_forward": "Qwen3's layers never chunk the MLP; chunking would not change values anyway",
    "is_decoder": "Qwen3 is always a causal decoder; transformers' Qwen3 never reads it",
    "cross_attention_hidden_size": "used only with add_cross_attention, which must be false (see REQUIRED)",
    "tie_encoder_decoder": "encoder-decoder models only",
    "decoder_start_token_id": "encoder-decoder generation only",
    "sep_token_id": "a tokenizer id the model never reads",
    "output_attentions": _OUTPUT,
    "output_hidden_states": _OUTPUT,
    "return_dict": _OUTPUT,
    "use_return_dict": _OUTPUT,
    "use_bfloat16": "TensorFlow/Flax option of transformers 4; the PyTorch model never reads it",
    "tf_legacy_loss": "TensorFlow option of transformers 4",
    "_attn_implementation_autoset": "transformers' choice of attention kernel; the same attention",
    "_attn_implementation": "transformers' choice of attention kernel; the same attention",
    "tokenizer_class": "names the tokenizer class; the model never reads it",
    "prefix": "a text prefix for pipelines; the model never reads it",
    "task_specific_params": "pipeline defaults; the model never reads it",
    "finetuning_task": "metadata",
    "id2label": _CLASSIFICATION,
    "label2id": _CLASSIFICATION,
    "num_labels": _CLASSIFICATION,
    "problem_type": _CLASSIFICATION,
    **{k: _GENERATION for k in (
        "max_length", "min_length", "do_sample", "early_stopping", "num_beams", "num_beam_groups",
        "diversity_penalty", "temperature", "top_k", "top_p", "typical_p", "repetition_penalty",
        "length_penalty", "no_repeat_ngram_size", "encoder_no_repeat_ngram_size", "bad_words_ids",
        "num_return_sequences", "output_scores", "return_dict_in_generate", "forced_bos_token_id",
        "forced_eos_token_id", "remove_invalid_values", "exponential_decay_length_penalty",
        "suppress_tokens", "begin_suppress_tokens")},
}


def _all_full_attention(v: Any) -> bool:
    return v is None or (isinstance(v, list) and all(t == "full_attention" for t in v))


# Keys that change the computation when set to anything but the value qtrain computes:
# name -> (accepts the value?, what qtrain computes / what to do).
REQUIRED: dict[str, tuple[Callable[[Any], bool], str]] = {
    "model_type": (lambda v: v in ("qwen3", "qwen3_moe"),
                   "qtrain supports 'qwen3' (dense Qwen3) and 'qwen3_moe' (Qwen3 MoE) only"),
    "architectures": (lambda v: v is None or v in (["Qwen3ForCausalLM"], ["Qwen3MoeForCausalLM"]),
                      "qtrain builds Qwen3ForCausalLM and Qwen3MoeForCausalLM only"),
    "hidden_act": (lambda v: v == "silu", "Qwen3's MLP is SwiGLU with silu"),
    "attention_dropout": (lambda v: v in (0, 0.0, None), "qtrain trains without attention dropout"),
    "use_sliding_window": (lambda v: not v, "sliding-window attention is not implemented"),
    "layer_types": (_all_full_attention, "every layer must be full_attention; sliding-window layers "
                                         "are not implemented"),
    "partial_rotary_factor": (lambda v: v in (None, 1, 1.0), "qtrain rotates the whole head (partial RoPE "
                                                             "is not implemented)"),
    "is_encoder_decoder": (lambda v: not v, "Qwen3 is a decoder-only model"),
    "add_cross_attention": (lambda v: not v, "cross-attention is not implemented"),
    "pruned_heads": (lambda v: not v, "pruned attention heads are not implemented"),
    "torchscript": (lambda v: not v, "transformers 4 unties the embedding and LM head under torchscript"),
}

# Keys refused whenever present, with the reason.
REFUSED: dict[str, str] = {
    "quantization_config": "quantized checkpoints are not supported; use bf16/fp32 weights",
    "auto_map": "the config names custom modelling code, which qtrain does not run",
}


def check_hf_keys(d: dict[str, Any], source: str) -> None:
    """Raise ConfigError naming the first key of `d` qtrain refuses (or does not know)."""
    moe = d.get("model_type") == "qwen3_moe"
    arch = d.get("architectures")
    if arch is not None and arch != (["Qwen3MoeForCausalLM"] if moe else ["Qwen3ForCausalLM"]):
        raise ConfigError(f"{source}: architectures={arch!r} does not match model_type={d.get('model_type')!r}")
    for key, value in d.items():
        if moe and key in MOE_IMPLEMENTED:
            continue
        if key in REFUSED and value not in (None, {}):
            raise ConfigError(f"{source}: {key} is set: {REFUSED[key]}")
        if key in REQUIRED:
            ok, why = REQUIRED[key]
            if not ok(value):
                raise ConfigError(f"{source}: {key}={value!r} is not supported: {why}")
            continue
        if key not in IMPLEMENTED and key not in NO_EFFECT and key not in REFUSED:
            raise ConfigError(
                f"{source}: unknown config key {key!r}: qtrain cannot tell whether it changes the model, so it "
                f"refuses it; remove it from config.json if it is only metadata (known keys: "
                f"qtrain/models/hf_config_keys.py)")
