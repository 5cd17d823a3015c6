"""`qtrain sft`: supervised fine-tuning, the pretraining loop on instruction data (+ optional LoRA).

Same flags, parallel layouts and checkpoints as `qtrain pretrain` (qtrain.train.loop), plus the
MindSpeed-LLM SFT flags below. What changes is plugged into the loop through `LoopHooks`:

- data: `--data-path PREFIX` of the instruction handlers' datasets (qtrain.data.instruction_dataset);
  packed samples carry their boundaries (cu_seqlens: causal attention within each sample, no
  [S, S] mask) and per-sample positions, so a pack trains exactly like its samples one by one,
  on every layout;
- loss: mean cross-entropy over the response tokens (labels != IGNORE_INDEX) of each micro-batch, then
  the mean over micro-batches and data-parallel ranks. This is MindSpeed-LLM's SFT loss (its
  `loss_func`: sum(loss * mask) / mask.sum() per micro-batch, averaged by Megatron across
  micro-batches and DP without --calculate-per-token-loss). A micro-batch without response
  tokens contributes 0 instead of NaN. `--calculate-per-token-loss` (Megatron's flag) instead
  divides by the response tokens of the whole global batch (every rank, every micro-batch), so
  every response token weighs the same;
- LoRA (`--lora-r`): adapters injected before sharding, base frozen; starting weights (HF,
  Megatron, or a qtrain checkpoint with --finetune) are loaded into the base first. Each saved
  checkpoint also holds `adapter/` (PEFT format); `--save-hf` exports the merged model.
"""

from __future__ import annotations

import argparse
import os
import sys
import warnings
from pathlib import Path

import torch

from qtrain.cli import ArgumentParser
from qtrain.errors import ConfigError

SFT_FLAGS_HELP = "SFT options (qtrain sft only); every `qtrain pretrain` option is accepted too"


def sft_parser() -> argparse.ArgumentParser:
    p = ArgumentParser(prog="qtrain sft", add_help=False, allow_abbrev=False)
    g = p.add_argument_group("sft", SFT_FLAGS_HELP)
    g.add_argument("--lora-r", type=int, default=None, help="LoRA rank; without it all weights are trained")
    g.add_argument("--lora-alpha", type=float, default=16.0, help="LoRA scale numerator (delta = B A alpha / r)")
    g.add_argument("--lora-dropout", type=float, default=0.0, help="dropout on the LoRA input")
    g.add_argument("--lora-target-modules", nargs="+", default=["q_proj", "k_proj", "v_proj", "o_proj",
                                                                 "gate_proj", "up_proj", "down_proj"],
                   help="HF (q_proj ...) or Megatron (linear_qkv linear_proj linear_fc1 linear_fc2) names; "
                        "lm_head (output_layer) only by name")
    g.add_argument("--no-shuffle", action="store_true", help="read samples in dataset order every epoch")
    g.add_argument("--calculate-per-token-loss", action="store_true",
                   help="average the loss over the response tokens of the global batch (default: per micro-batch, "
                        "then over micro-batches and ranks, as MindSpeed-LLM)")
    # MindSpeed-LLM SFT script flags that describe what qtrain sft always does.
    for flag in ("--is-instruction-dataset", "--reset-position-ids", "--reset-attention-mask", "--neat-pack",
                 "--variable-seq-lengths", "--no-pad-to-seq-lengths"):
        g.add_argument(flag, action="store_true", help=argparse.SUPPRESS)
    g.add_argument("--stage", default="sft", help=argparse.SUPPRESS)
    g.add_argument("--prompt-type", default=None, help=argparse.SUPPRESS)
    # MindSpeed-LLM's Qwen3-MoE tune scripts: the slow tokenizer (same ids as the fast one qtrain loads;
    # the data is tokenized by `qtrain preprocess` anyway) and its fused LoRA kernel (an implementation choice)
    g.add_argument("--tokenizer-not-use-fast", action="store_true", help=argparse.SUPPRESS)
    g.add_argument("--lora-fusion", action="store_true", help=argparse.SUPPRESS)
    return p


PREFERENCE_STAGES = ("dpo", "simpo", "orpo")  # MindSpeed-LLM's `--stage dpo`: run as `qtrain dpo`


def split_argv(argv: list[str]) -> tuple[argparse.Namespace, list[str]]:
    """(SFT options, the rest for the pretrain parser)."""
    ns, rest = sft_parser().parse_known_args(argv)
    if ns.stage != "sft":
        raise ConfigError(f"--stage {ns.stage}: qtrain sft does supervised fine-tuning (--stage sft) and "
                          f"preference training ({', '.join(PREFERENCE_STAGES)}: `qtrain dpo`)")
    if ns.variable_seq_lengths:
        warnings.warn("--variable-seq-lengths: qtrain pads every sample to --seq-length", stacklevel=2)
    if ns.no_pad_to_seq_lengths:
        raise ConfigError("--no-pad-to-seq-lengths: qtrain sft pads every sample to --seq-length (the same loss; "
                          "padding the micro-batch only to its longest sample is not implemented); drop the flag")
    return ns, rest


# ----------------------------------------------------------------------------- loss

def per_token_loss(data_parallel_size: int, num_microbatches: int):
    """The LossWeight of --calculate-per-token-loss (see train.step): each micro-batch adds sum / N
    to the gradient, N = response tokens of the global batch (`batch_tokens` of the items), times
    the data-parallel size that FSDP's gradient averaging divides by and the micro-batch count
    the step divides by. Averaged like the loop's other losses, the values give the global
    batch's mean token loss."""
    def weight(total: torch.Tensor, count: int, batch: dict[str, torch.Tensor]) -> torch.Tensor:  # noqa: ARG001
        n = max(int(batch["batch_tokens"][0]), 1)
        return total * (data_parallel_size * num_microbatches) / n

    return weight


# ----------------------------------------------------------------------------- hooks

def build_hooks(cfg, sft: argparse.Namespace):
    """LoopHooks for `pretrain(cfg, hooks=...)` (also used by tests)."""
    from qtrain.checkpoint import dcp as ckpt
    from qtrain.data.instruction_dataset import build_instruction_datasets
    from qtrain.parallel.batch import batch_plan
    from qtrain.train.loop import LoopHooks

    paths = cfg.data.data_path
    if len(paths) != 1:
        raise ConfigError(f"--data-path: qtrain sft takes one instruction data prefix, got {paths}")

    par = cfg.parallel
    plan = batch_plan(cfg, int(os.environ.get("WORLD_SIZE", "1")))

    def build_datasets(cfg, sizes):
        train, valid, _ = build_instruction_datasets(
            paths[0], cfg.data.split, sizes, cfg.data.seq_length, pad_id=0, seed=cfg.training.seed,
            shuffle=not sft.no_shuffle, global_batch_size=plan.global_batch_size if sft.calculate_per_token_loss else None)
        return train, valid

    if sft.calculate_per_token_loss and par.pipeline_model_parallel_size > 1:
        raise ConfigError("--calculate-per-token-loss is not available with pipeline parallelism yet; "
                          "drop it (per-micro-batch mean) or use --pipeline-model-parallel-size 1")
    hooks = LoopHooks(build_datasets=build_datasets)
    if sft.calculate_per_token_loss:
        hooks.loss_weight = per_token_loss(plan.data_parallel_size, plan.num_microbatches)
    if sft.lora_r is None:
        return hooks

    from qtrain.checkpoint.adapter import LoRAConfig, merge_lora_state_dict, write_adapter
    from qtrain.train.lora import adapter_state_dict, inject_lora

    if par.tensor_model_parallel_size > 1 or par.pipeline_model_parallel_size > 1 or par.context_parallel_size > 1:
        raise ConfigError("--lora-r: LoRA trains with data parallelism (FSDP) only in this version; "
                          "use --tensor-model-parallel-size 1 --pipeline-model-parallel-size 1 "
                          "--context-parallel-size 1")
    if cfg.moe.expert_model_parallel_size > 1:
        raise ConfigError(f"--lora-r with --expert-model-parallel-size {cfg.moe.expert_model_parallel_size}: LoRA "
                          f"with expert parallelism is not supported yet; use --expert-model-parallel-size 1 (experts "
                          f"FSDP-sharded over the data-parallel ranks)")
    lora = LoRAConfig(r=sft.lora_r, alpha=sft.lora_alpha, dropout=sft.lora_dropout,
                      target_modules=sft.lora_target_modules)
    c = cfg.checkpoint
    # Weights-only starts are loaded into the plain model, before the adapters change its state dict;
    # resuming a LoRA run's own checkpoint restores base + adapters through the loop.
    kind = ckpt.load_kind(c.load, c.save)
    hooks.skip_load = kind in ("hf", "megatron") or (kind == "qtrain" and c.finetune)

    def prepare_model(model):
        if hooks.skip_load:
            ckpt.load_checkpoint(c.load, model, None, finetune=True)
        inject_lora(model, lora)
        return model

    def after_save(model, iteration, path):
        tensors = adapter_state_dict(model)  # collective when sharded
        if not torch.distributed.is_initialized() or torch.distributed.get_rank() == 0:
            write_adapter(tensors, lora, Path(path) / "adapter", base_model=c.load)

    hooks.prepare_model, hooks.after_save = prepare_model, after_save
    hooks.export_transform = lambda full: merge_lora_state_dict(full, lora.scaling)
    return hooks


def run_sft(argv: list[str], log=print):
    """Parse `qtrain sft` flags and train; returns the loop's TrainResult."""
    from qtrain.config import parse_args
    from qtrain.train.loop import pretrain

    sft, rest = split_argv(argv)
    cfg = parse_args(rest)
    return pretrain(cfg, log=log, hooks=build_hooks(cfg, sft))


def _stage(argv: list[str]) -> str | None:
    """The value of --stage on a command line (the last one wins, as in argparse)."""
    stage = None
    for i, a in enumerate(argv):
        if a == "--stage" and i + 1 < len(argv):
            stage = argv[i + 1]
        elif a.startswith("--stage="):
            stage = a.split("=", 1)[1]
    return stage


def main(argv: list[str] | None = None) -> int:
    from qtrain.train.runtime import run_command

    argv = list(sys.argv[1:] if argv is None else argv)
    if _stage(argv) in PREFERENCE_STAGES:
        from qtrain.train import dpo

        return dpo.main(argv)
    if any(a in ("-h", "--help") for a in argv):
        from qtrain.config import build_parser

        print(build_parser("qtrain sft").format_help())
        text = sft_parser().format_help()
        print(text[text.index("\nsft:") + 1:])
        return 0
    return run_command("sft", lambda: run_sft(argv))


if __name__ == "__main__":
    sys.exit(main())
