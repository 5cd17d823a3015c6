"""Load a model for inference from any checkpoint qtrain knows, in one process, without a process group.

`--load` may be an HF dir (config.json + safetensors), a qtrain save dir (DCP; its tracker's
iteration, or an `iter_XXXXXXX` folder) or a Megatron legacy dir; the tensors are read one at
a time through `qtrain.checkpoint.sources` and assigned into a model built on the meta device.
An optional PEFT LoRA adapter is merged into the weights.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from qtrain.checkpoint.dcp import detect_kind
from qtrain.errors import CheckpointError
from qtrain.models.qwen3 import Qwen3ForCausalLM, build_model

_KIND_TO_SOURCE = {"hf": "hf", "qtrain": "qtrain", "megatron": "mg"}


def load_model_for_inference(path: str | Path, dtype: torch.dtype = torch.float32,
                             device: str | torch.device = "cpu", iteration: int | None = None,
                             lora_dir: str | Path | None = None) -> tuple[Qwen3ForCausalLM, Path | None]:
    """(model in eval mode, tokenizer dir found with the checkpoint or None)."""
    from qtrain.checkpoint.sources import open_source

    source = open_source(_KIND_TO_SOURCE[detect_kind(path)], path, iteration)
    if lora_dir is not None:
        from qtrain.checkpoint.adapter import refuse_second_adapter

        refuse_second_adapter(source, "--lora-load", path)
    try:
        model = build_model(source.config, "meta")
        wanted = model.state_dict()
        tied = source.config.tie_word_embeddings
        sd = {}
        for name in wanted:
            if tied and name == "lm_head.weight":
                continue
            try:
                tensor = source.get(name)
            except KeyError:
                raise CheckpointError(f"--load {path}: tensor {name} is missing") from None
            sd[name] = tensor.to(device=device, dtype=dtype)
        if tied:
            sd["lm_head.weight"] = sd["model.embed_tokens.weight"]
        model.load_state_dict(sd, strict=True, assign=True)
        model.tie_weights()
    finally:
        source.close()
    if lora_dir is not None:
        from qtrain.checkpoint.adapter import apply_adapter

        apply_adapter(model, lora_dir)
    return model.eval(), source.tokenizer_dir or _training_tokenizer(source)


def _training_tokenizer(source) -> Path | None:
    """The --tokenizer-name-or-path a qtrain checkpoint was trained with (from its qtrain_args.json)."""
    args_file = Path(getattr(source, "folder", "")) / "qtrain_args.json"
    if not args_file.is_file():
        return None
    try:
        path = json.loads(args_file.read_text()).get("data", {}).get("tokenizer_name_or_path")
    except (json.JSONDecodeError, AttributeError):
        return None
    return Path(path) if path and Path(path).is_dir() else None
