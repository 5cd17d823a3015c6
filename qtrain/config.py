"""Every training option as a dataclass field, named like its Megatron / MindSpeed-LLM flag.

A field `micro_batch_size` is the flag `--micro-batch-size`; its `help` metadata is the
`--help` text. `build_parser()` generates the argparse parser from these dataclasses, so a
MindSpeed-LLM pretrain script's argument groups run unchanged. Fields in `CompatArgs` describe
what qtrain always does (fused kernels, RoPE, RMSNorm, ...): they are accepted and documented,
with a warning when a value asks for something qtrain does not do. A flag that is not here
stops the run before start with its name and a hint (`parse_args`).

Resolution order of a value: dataclass default < `--config file.yaml` < command line.
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import os
import sys
import typing
import warnings
from dataclasses import dataclass, field
from typing import Any, Optional

from qtrain.cli import ArgumentParser
from qtrain.errors import ConfigError, UsageError


def opt(default: Any, help: str, **argparse_kwargs: Any) -> Any:
    """A dataclass field carrying its one-line help and extra argparse settings (choices, nargs)."""
    kwargs = {"default_factory": lambda: list(default)} if isinstance(default, list) else {"default": default}
    return field(metadata={"help": help, "argparse": argparse_kwargs}, **kwargs)


def compat(default: Any, help: str, qtrain_value: Any = None, **argparse_kwargs: Any) -> Any:
    """A flag accepted for script compatibility. `qtrain_value`: what qtrain does; another value warns."""
    f = opt(default, help, **argparse_kwargs)
    f.metadata = {**f.metadata, "compat": True, "qtrain_value": qtrain_value}
    return f


@dataclass
class ModelArgs:
    """Model shape. Base: --model-preset, else the HF config.json of --load, else Qwen3 defaults;
    any shape flag given overrides the base."""

    model_preset: Optional[str] = opt(None, "named model shape from qtrain.models.presets (e.g. 1.7B, tiny)")
    num_layers: Optional[int] = opt(None, "number of transformer layers (HF num_hidden_layers)")
    hidden_size: Optional[int] = opt(None, "hidden size (HF hidden_size)")
    ffn_hidden_size: Optional[int] = opt(None, "MLP inner size (HF intermediate_size)")
    num_attention_heads: Optional[int] = opt(None, "query heads (HF num_attention_heads)")
    num_query_groups: Optional[int] = opt(None, "key/value heads with --group-query-attention (HF num_key_value_heads)")
    kv_channels: Optional[int] = opt(None, "head dimension (HF head_dim); default hidden_size / heads")
    rotary_base: Optional[float] = opt(None, "RoPE base frequency (HF rope_theta)")
    rope_scaling_type: Optional[str] = opt(
        None, "RoPE scaling: yarn (MindSpeed-LLM) or linear (HF rope_scaling); default: the --load config's")
    rope_scaling_factor: Optional[float] = opt(
        None, "RoPE scaling factor (HF rope_scaling.factor); yarn default: max positions / original")
    rope_scaling_original_max_position_embeddings: Optional[int] = opt(
        None, "yarn: context length the model was pretrained for (HF original_max_position_embeddings)")
    beta_fast: Optional[float] = opt(None, "yarn: rotations below which frequencies are interpolated (default 32)")
    beta_slow: Optional[float] = opt(None, "yarn: rotations above which frequencies are kept (default 1)")
    rope_scaling_mscale: Optional[float] = opt(None, "yarn: attention-scale mscale (default 1)")
    rope_scaling_mscale_all_dim: Optional[float] = opt(None, "yarn: attention-scale mscale_all_dim (default 0)")
    rotary_seq_len_interpolation_factor: Optional[int] = opt(
        None, "Megatron's linear RoPE scaling: positions divided by this (HF rope_scaling linear)")
    padded_vocab_size: Optional[int] = opt(None, "embedding rows (HF vocab_size)")
    make_vocab_size_divisible_by: int = opt(
        128, "without --padded-vocab-size, pad the tokenizer's vocabulary to a multiple of this")
    max_position_embeddings: Optional[int] = opt(None, "longest sequence the model is built for")
    norm_epsilon: Optional[float] = opt(None, "RMSNorm epsilon (HF rms_norm_eps)")
    untie_embeddings_and_output_weights: bool = opt(False, "separate LM head instead of the tied embedding")
    add_qkv_bias: bool = opt(False, "bias on q/k/v projections (HF attention_bias)")
    init_method_std: float = opt(0.02, "std of the normal init of weights when not loading")


@dataclass
class DataArgs:
    """Datasets in Megatron .bin/.idx format and the tokenizer."""

    data_path: list = opt([], "one dataset prefix, or `weight prefix weight prefix ...` to blend", nargs="*")
    split: str = opt("969,30,1", "train,valid,test proportions of each dataset")
    seq_length: int = opt(4096, "tokens per sample")
    data_cache_path: Optional[str] = opt(None, "where index files are cached (default: next to the data)")
    tokenizer_name_or_path: Optional[str] = opt(None, "HF tokenizer dir (for --padded-vocab-size and the demo)")
    num_workers: int = opt(0, "DataLoader worker processes")
    # Megatron's document flags (qtrain pretrain): documents end at each EOD token of a sample (the
    # tokenizer's eos: they need --tokenizer-name-or-path)
    reset_position_ids: bool = opt(False, "positions restart at 0 after each EOD token inside a sample (needs the tokenizer)")
    reset_attention_mask: bool = opt(
        False, "attention stays inside each document (split after each EOD token); no [S, S] mask is built")
    eod_mask_loss: bool = opt(False, "no loss where the input token is EOD (predicting the next document's first token)")


@dataclass
class TrainingArgs:
    """Batch sizes, length of the run, precision and evaluation."""

    micro_batch_size: int = opt(1, "samples per rank per forward/backward")
    global_batch_size: Optional[int] = opt(None, "samples per optimizer step (default MBS x DP); accumulation derived")
    train_iters: Optional[int] = opt(None, "optimizer steps to train for")
    seed: int = opt(1234, "random seed (init, data order)")
    bf16: bool = opt(False, "bf16 compute with fp32 master weights and fp32 gradient reduction")
    compile: bool = opt(False, "torch.compile each decoder layer (fuses norms, RoPE, SwiGLU; compiles at start)")
    clip_grad: float = opt(1.0, "clip the global gradient norm to this (0 disables)")
    eval_interval: int = opt(1000, "run validation every this many iterations")
    eval_iters: int = opt(100, "validation iterations (global batches) per evaluation (0 disables)")
    exit_interval: Optional[int] = opt(None, "save (with --save) and exit after an iteration divisible by this")
    exit_duration_in_mins: Optional[float] = opt(None, "save (with --save) and exit once training has run this long")
    device: str = opt("auto", "cpu, cuda, npu or auto (the accelerator if present)")
    dry_run: bool = opt(False, "print the plan (model size, layout, batch math, memory) and exit")


@dataclass
class OptimizerArgs:
    """AdamW and the learning-rate schedule (Megatron's OptimizerParamScheduler formulas)."""

    optimizer: str = opt("adam", "optimizer (AdamW with decoupled weight decay)", choices=["adam", "adamw"])
    lr: float = opt(1e-4, "peak learning rate")
    min_lr: float = opt(0.0, "learning rate at the end of decay")
    lr_decay_style: str = opt("linear", "decay after warmup", choices=["constant", "linear", "cosine", "WSD"])
    lr_decay_iters: Optional[int] = opt(None, "iterations to decay over (default --train-iters)")
    lr_warmup_fraction: Optional[float] = opt(None, "warmup as a fraction of --lr-decay-iters (wins over iters)")
    lr_warmup_iters: int = opt(0, "linear warmup iterations, from --lr-warmup-init to --lr")
    lr_warmup_init: float = opt(0.0, "learning rate at the start of warmup")
    lr_wsd_decay_style: str = opt(
        "exponential", "WSD annealing shape", choices=["linear", "cosine", "exponential", "minus_sqrt"])
    lr_wsd_decay_iters: Optional[int] = opt(None, "WSD: iterations of the final annealing phase")
    weight_decay: float = opt(0.01, "decoupled weight decay (not on norms or biases)")
    adam_beta1: float = opt(0.9, "Adam beta1")
    adam_beta2: float = opt(0.999, "Adam beta2")
    adam_eps: float = opt(1e-8, "Adam epsilon")


@dataclass
class CheckpointArgs:
    """Saving and loading (qtrain DCP checkpoints, HF dirs, Megatron legacy dirs)."""

    load: Optional[str] = opt(None, "resume from a qtrain checkpoint dir, or start from an HF or Megatron dir")
    save: Optional[str] = opt(None, "checkpoint dir (iter_XXXXXXX/ + latest_checkpointed_iteration.txt)")
    save_interval: Optional[int] = opt(None, "save every this many iterations (and at the end)")
    no_load_optim: bool = opt(False, "do not restore optimizer and LR-scheduler state")
    no_load_rng: bool = opt(False, "do not restore random-number generator states")
    finetune: bool = opt(False, "load weights only, start at iteration 0 with fresh optimizer and data order")
    override_data_order: bool = opt(
        False, "resume although --data-path/--split/--seq-length/--seed differ from the checkpoint's (changes the "
               "sample order; without it such a resume stops)")
    save_hf: Optional[str] = opt(None, "export the final model as an HF dir (config, safetensors, tokenizer)")
    # Long runs (docs/promises.md: what a crash during an async save leaves).
    async_save: bool = opt(
        False, "write checkpoints in a background thread while training goes on (torch.distributed.checkpoint."
               "async_save); the tracker moves only once the write has finished")
    keep_last_checkpoints: Optional[int] = opt(
        None, "after each complete save delete all but the newest N checkpoints (never the tracker's)")
    save_hf_interval: Optional[int] = opt(
        None, "also export <save-hf>/iter_XXXXXXX/ as an HF dir every N iterations (under pipeline parallelism "
              "N must be a multiple of --save-interval: the export is read back from that checkpoint)")
    save_retain_interval: Optional[int] = opt(
        None, "Megatron: after each complete save delete older checkpoints whose iteration is not a multiple "
              "of N (the latest stays)")


@dataclass
class LoggingArgs:
    """Metrics: Megatron-shaped log line, JSONL, TensorBoard."""

    log_interval: int = opt(100, "print / record metrics every this many iterations")
    tensorboard_dir: Optional[str] = opt(None, "write TensorBoard events here")
    log_dir: Optional[str] = opt(None, "write metrics.jsonl here (default: --save dir)")
    # Weights & Biases (qtrain.train.wandb_log; the optional extra `wandb`).
    wandb_project: Optional[str] = opt(None, "log the metrics.jsonl records to this W&B project (rank 0)")
    wandb_exp_name: Optional[str] = opt(None, "W&B run name (default: W&B's)")
    wandb_save_dir: Optional[str] = opt(None, "W&B's local run files (default: <save>/wandb, as Megatron)")
    wandb_entity: Optional[str] = opt(None, "W&B team or user (default: the logged-in account's)")


@dataclass
class ParallelArgs:
    """Parallel layout; applied by qtrain.parallel (data parallel = world / (TP x PP x CP))."""

    tensor_model_parallel_size: int = opt(1, "tensor-parallel degree (TP)")
    pipeline_model_parallel_size: int = opt(1, "pipeline-parallel degree (PP)")
    context_parallel_size: int = opt(1, "context-parallel degree (CP)")
    context_parallel_algo: str = opt(
        "megatron_cp_algo", "CP attention: ring (K/V blocks passed around), Ulysses (all-to-all over heads) or "
        "both (hybrid)", choices=["megatron_cp_algo", "ulysses_cp_algo", "hybrid_cp_algo"])
    ulysses_degree_in_cp: Optional[int] = opt(None, "hybrid_cp_algo: CP ranks per Ulysses group (the rest is ring)")
    sequence_parallel: bool = opt(False, "shard norms/activations along the sequence inside TP regions")
    use_distributed_optimizer: bool = opt(False, "shard optimizer state over data-parallel ranks (FSDP does)")
    num_layers_per_virtual_pipeline_stage: Optional[int] = opt(None, "layers per virtual pipeline stage")
    num_layer_list: Optional[str] = opt(None, "comma-separated layers per pipeline stage, e.g. 13,15")
    recompute_granularity: Optional[str] = opt(
        None, "activation recomputation", choices=["full", "selective"])
    recompute_method: Optional[str] = opt(None, "which layers to recompute", choices=["uniform", "block"])
    recompute_num_layers: Optional[int] = opt(None, "layers per recompute unit / recomputed layers")
    distributed_backend: Optional[str] = compat(
        None, "collective backend; qtrain picks gloo (CPU), nccl (CUDA), hccl (NPU)", None,
        choices=["nccl", "gloo", "hccl"])


@dataclass
class OffloadArgs:
    """Memory off the device: optimizer state and activations in host memory (qtrain.parallel.offload)."""

    optimizer_cpu_offload: bool = opt(
        False, "fp32 master weights, gradients and AdamW state in pinned host memory, the optimizer step on the "
               "host (FSDP2 CPUOffloadPolicy); the device keeps the gathered bf16 units and the activations")
    swap_optimizer: bool = opt(False, "MindSpeed-LLM's name for --optimizer-cpu-offload (the same thing)")
    optimizer_offload_fraction: float = opt(
        1.0, "Megatron: the share of the optimizer state offloaded; qtrain offloads all of it (only 1.0)")
    cpu_offloading: bool = opt(
        False, "Megatron: keep the activations of the first --cpu-offloading-num-layers decoder layers in host "
               "memory between forward and backward")
    cpu_offloading_num_layers: int = opt(0, "Megatron: decoder layers whose activations --cpu-offloading moves")

    @property
    def optimizer_offloaded(self) -> bool:
        return self.optimizer_cpu_offload or self.swap_optimizer


@dataclass
class CompatArgs:
    """Flags of Megatron / MindSpeed-LLM scripts that describe what qtrain always does."""

    use_flash_attn: bool = compat(False, "qtrain always uses fused (flash) attention where the device has it")
    use_mcore_models: bool = compat(False, "qtrain has one model implementation")
    spec: list = compat([], "layer spec module and name; qtrain's Qwen3 layer is fixed", nargs="*")
    use_fused_rmsnorm: bool = compat(False, "RMSNorm uses the fused kernel where available")
    use_fused_swiglu: bool = compat(False, "SwiGLU uses the fused kernel where available")
    use_fused_rotary_pos_emb: bool = compat(False, "RoPE uses the fused kernel where available")
    use_rotary_position_embeddings: bool = compat(False, "Qwen3 always uses RoPE")
    no_masked_softmax_fusion: bool = compat(False, "attention softmax fusion is the attention kernel's")
    no_bias_swiglu_fusion: bool = compat(False, "Qwen3 has no MLP bias")
    no_bias_dropout_fusion: bool = compat(False, "Qwen3 has no bias or dropout")
    no_rope_fusion: bool = compat(False, "RoPE kernel choice is qtrain's")
    disable_bias_linear: bool = compat(False, "Qwen3 linear layers have no bias")
    position_embedding_type: str = compat("rope", "position embedding (Qwen3: rope)", "rope")
    normalization: str = compat("RMSNorm", "normalization layer (Qwen3: RMSNorm)", "RMSNorm")
    swiglu: bool = compat(False, "Qwen3's MLP is SwiGLU")
    attention_softmax_in_fp32: bool = compat(False, "attention softmax accumulates in fp32")
    no_gradient_accumulation_fusion: bool = compat(False, "gradient accumulation is PyTorch's")
    group_query_attention: bool = compat(False, "grouped-query attention follows --num-query-groups")
    qk_layernorm: bool = compat(False, "Qwen3 always has q/k RMSNorm")
    tokenizer_type: str = compat("PretrainedFromHF", "qtrain loads HF tokenizers", "PretrainedFromHF")
    initial_loss_scale: Optional[float] = compat(None, "fp16 loss scaling; bf16 needs none")
    no_shared_storage: bool = compat(False, "checkpoint dirs are assumed visible to every rank")
    attention_dropout: float = compat(0.0, "Qwen3 pretraining uses no dropout", 0.0)
    hidden_dropout: float = compat(0.0, "Qwen3 pretraining uses no dropout", 0.0)
    transformer_impl: Optional[str] = compat(None, "qtrain's model is plain PyTorch")
    ckpt_format: Optional[str] = compat(None, "qtrain writes torch.distributed.checkpoint (torch_dist)")
    distributed_timeout_minutes: int = compat(10, "timeout of collective operations, minutes")
    use_cp_send_recv_overlap: bool = compat(False, "ring attention always overlaps each K/V send/recv with a block")
    use_cpu_initialization: bool = compat(False, "qtrain builds on the meta device and materialises sharded")
    no_load_rng_state: bool = compat(False, "alias of --no-load-rng")
    use_torch_optimizer_for_cpu_offload: bool = compat(
        False, "with --optimizer-cpu-offload qtrain's host optimizer is torch's AdamW")
    reuse_fp32_param: bool = compat(
        False, "MindSpeed-LLM keeps no separate bf16 weight copy: qtrain never does (FSDP2 holds fp32 shards, "
               "bf16 exists only for the unit being gathered)")


@dataclass
class MoeArgs:
    """Mixture of experts (Qwen3-MoE), in MindSpeed-LLM's names. Shape flags must agree with the model
    of --model-preset / an HF or qtrain --load (else refused, naming both values); without those
    they define it (a Megatron --load is then checked against them). --moe-aux-loss-coeff: training."""

    num_experts: Optional[int] = opt(None, "routed experts per MoE layer (HF num_experts)")
    moe_router_topk: Optional[int] = opt(None, "experts each token is routed to (HF num_experts_per_tok)")
    moe_ffn_hidden_size: Optional[int] = opt(None, "inner size of each expert's MLP (HF moe_intermediate_size)")
    norm_topk_prob: Optional[bool] = opt(
        None, "renormalise each token's top-k routing weights to sum to 1 (HF norm_topk_prob); with a dense "
              "model it has no effect. Without the flag the model config decides")
    moe_layer_freq: Optional[str] = opt(
        None, "which layers are MoE: N (every N-th; 1 or MindSpeed-LLM's -1: every layer) or a list like [0,1,1]; "
              "must agree with the model's mlp_only_layers / decoder_sparse_step")
    first_k_dense_replace: Optional[int] = opt(
        None, "MindSpeed-LLM: the first K layers are dense (-1 or 0: none); must agree with the model")
    moe_aux_loss_coeff: Optional[float] = opt(
        None, "weight of Megatron-core's load-balancing loss (per MoE layer, each layer's loss times C added to the "
              "training loss, as MindSpeed-LLM trains; docs/moe.md; a training option: the model config is not changed); "
              "default: transformers' pooled loss with the model config's router_aux_loss_coef if its "
              "output_router_logits is true (what transformers trains with), else none")
    moe_router_load_balancing_type: str = opt(
        "aux_loss", "load balancing: aux_loss, the Switch-Transformer loss transformers and Megatron compute "
                    "(the only one qtrain implements)")
    expert_model_parallel_size: int = opt(
        1, "expert-parallel degree (EP): EP neighbouring data-parallel ranks split the experts, num_experts / EP "
           "each, and exchange tokens by all-to-all; needs --use-distributed-optimizer; with PP, not yet with TP, CP "
           "or LoRA")
    moe_grouped_gemm: bool = compat(
        False, "qtrain always computes experts as grouped GEMMs over tokens sorted by expert (qtrain/ops/moe.py)")
    moe_token_dispatcher_type: str = compat(
        "alltoall", "tokens reach their experts by an all-to-all over the EP group (alltoall and MindSpeed-LLM's "
                    "alltoall_seq name that; others are refused)")
    moe_permutation_async_comm: bool = compat(
        False, "overlap of the permutation's communication; qtrain's order of operations is its own")
    moe_alltoall_overlap_comm: bool = compat(False, "overlap of the all-to-all with compute; qtrain's is its own")
    gemm_gradient_accumulation_fusion: bool = compat(False, "gradient accumulation is PyTorch's (autograd)")


@dataclass
class PretrainConfig:
    """All options of `qtrain pretrain`, one group per dataclass."""

    model: ModelArgs = field(default_factory=ModelArgs)
    data: DataArgs = field(default_factory=DataArgs)
    training: TrainingArgs = field(default_factory=TrainingArgs)
    optim: OptimizerArgs = field(default_factory=OptimizerArgs)
    checkpoint: CheckpointArgs = field(default_factory=CheckpointArgs)
    logging: LoggingArgs = field(default_factory=LoggingArgs)
    parallel: ParallelArgs = field(default_factory=ParallelArgs)
    offload: OffloadArgs = field(default_factory=OffloadArgs)
    compat: CompatArgs = field(default_factory=CompatArgs)
    moe: MoeArgs = field(default_factory=MoeArgs)

    def to_dict(self) -> dict:
        """Plain nested dict (for qtrain_args.json)."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "PretrainConfig":
        """Inverse of to_dict; unknown keys are ignored so older args files still load."""
        groups = {}
        for g in dataclasses.fields(cls):
            gcls = _group_classes()[g.name]
            names = {f.name for f in dataclasses.fields(gcls)}
            groups[g.name] = gcls(**{k: v for k, v in d.get(g.name, {}).items() if k in names})
        return cls(**groups)


def _group_classes() -> dict[str, type]:
    return {f.name: f.default_factory for f in dataclasses.fields(PretrainConfig)}  # type: ignore[misc]


# Megatron / MindSpeed-LLM flags qtrain does not support, with what to do instead.
UNSUPPORTED_HINTS: dict[str, str] = {
    "--fp16": "qtrain trains in bf16 (--bf16) or fp32; fp16 loss scaling is not implemented",
    # MoE features Qwen3-MoE does not have, or layouts qtrain does not implement
    "--noop-layers": "qtrain builds the model's real layers only; spread them over pipeline stages with "
                     "--num-layer-list (e.g. 94 layers on PP 8: --num-layer-list 11,12,12,12,12,12,12,11)",
    "--n-shared-experts": "Qwen3-MoE has no shared experts",
    "--moe-shared-expert-intermediate-size": "Qwen3-MoE has no shared experts",
    "--moe-router-enable-expert-bias": "Qwen3-MoE's router has no expert bias",
    "--moe-router-score-function": "Qwen3-MoE routes with a softmax (the only score function qtrain implements)",
    "--moe-router-topk-scaling-factor": "Qwen3-MoE does not scale routing weights",
    "--moe-router-num-groups": "group-limited routing is not part of Qwen3-MoE",
    "--moe-router-group-topk": "group-limited routing is not part of Qwen3-MoE",
    "--moe-expert-capacity-factor": "qtrain drops no tokens (every token reaches its top-k experts)",
    "--moe-pad-expert-input-to-capacity": "qtrain drops no tokens and pads no expert input",
    "--moe-token-drop-policy": "qtrain drops no tokens",
    "--moe-z-loss-coeff": "the router z-loss is not part of Qwen3-MoE's training loss",
    "--moe-input-jitter-eps": "router input jitter is not implemented",
    "--moe-tp-extend-ep": "experts are not split over TP ranks in qtrain",
    "--expert-tensor-parallel-size": "experts are not split over TP ranks in qtrain",
    "--moe-zero-memory": "MindSpeed-LLM's MoE activation offload is not implemented; use --recompute-granularity",
    "--use-fused-moe-token-permute-and-unpermute": "token permutation is qtrain's own (qtrain/ops/moe.py)",
    "--train-samples": "give the run length in iterations with --train-iters",
    "--lr-decay-samples": "give the decay length in iterations with --lr-decay-iters",
    "--lr-warmup-samples": "give warmup in iterations with --lr-warmup-iters or --lr-warmup-fraction",
    "--rampup-batch-size": "batch-size ramp-up is not supported; use a fixed --global-batch-size",
    "--fp8-format": "fp8 training is not supported",
    "--use-rope-scaling": "Llama-3 RoPE scaling is not implemented; Qwen3 extends its context with "
                          "--rope-scaling-type yarn",
    "--original-max-position-embeddings": "MindSpeed-LLM's llama3 / longrope option; for yarn give "
                                          "--rope-scaling-original-max-position-embeddings",
    "--rope-scaling-beta-fast": "MindSpeed-LLM's deprecated spelling: use --beta-fast",
    "--rope-scaling-beta-slow": "MindSpeed-LLM's deprecated spelling: use --beta-slow",
    "--dynamic-factor": "dynamic NTK RoPE is not implemented (use --rope-scaling-type yarn)",
    "--yarn-original-max-position-embeddings": "use MindSpeed-LLM's spelling: --rope-scaling-type yarn "
                                               "--rope-scaling-original-max-position-embeddings N",
    "--rotary-percent": "partial RoPE is not implemented; Qwen3 rotates the whole head",
    # Long runs (issue 19): the neighbours of the flags qtrain implements.
    "--use-wandb": "W&B logging is on when --wandb-project NAME is given (Megatron's flag)",
    "--overlap-cpu-optimizer-d2h-h2d": "not implemented: with --optimizer-cpu-offload FSDP2 copies a unit's shards "
                                       "to the device when it gathers them",
    "--no-pin-cpu-grads": "qtrain always pins offloaded state (FSDP2 CPUOffloadPolicy(pin_memory=True))",
    "--no-pin-cpu-params": "qtrain always pins offloaded state (FSDP2 CPUOffloadPolicy(pin_memory=True))",
    "--non-persistent-save-interval": "not implemented; save with --save-interval (and --async-save, "
                                      "--keep-last-checkpoints)",
}


def flag_of(name: str) -> str:
    """Field name -> command-line flag."""
    return "--" + name.replace("_", "-")


def iter_fields():
    """Yield (group_name, group_class, field, resolved type) for every option."""
    for gname, gcls in _group_classes().items():
        hints = typing.get_type_hints(gcls)
        for f in dataclasses.fields(gcls):
            yield gname, gcls, f, hints[f.name]


def _base_type(tp: Any) -> Any:
    args = [a for a in typing.get_args(tp) if a is not type(None)]
    return args[0] if typing.get_origin(tp) is typing.Union and args else tp


def _parse_bool(text: str) -> bool:
    low = str(text).lower()
    if low in ("1", "true", "yes", "on"):
        return True
    if low in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true/false, got {text!r}")


def build_parser(prog: str = "qtrain pretrain") -> argparse.ArgumentParser:
    """argparse parser generated from the dataclasses (one argument group per dataclass)."""
    parser = ArgumentParser(
        prog=prog, allow_abbrev=False, usage=f"{prog} [--config FILE.yaml] [--FLAG VALUE ...]  (table: docs/flags.md)",
        description="Train a Qwen3 model on Megatron .bin/.idx data. Flags follow Megatron / MindSpeed-LLM.",
    )
    parser.add_argument("--config", metavar="FILE.yaml", help="read option values from a YAML file; the command line wins")
    for gname, gcls in _group_classes().items():
        group = parser.add_argument_group(gname, (gcls.__doc__ or "").strip().splitlines()[0])
        hints = typing.get_type_hints(gcls)
        for f in dataclasses.fields(gcls):
            tp = _base_type(hints[f.name])
            extra = dict(f.metadata.get("argparse", {}))
            help_text = f.metadata["help"]
            kwargs: dict[str, Any] = {"dest": f"{gname}.{f.name}", "help": help_text, "default": argparse.SUPPRESS}
            if tp is bool:
                kwargs["action"] = "store_true"
            else:
                kwargs["type"] = {int: int, float: float, str: str, list: str}.get(tp, str)
                kwargs["metavar"] = f.name.upper() if tp is not list else "ARG"
                if f.default is not dataclasses.MISSING and f.default is not None:
                    kwargs["help"] = f"{help_text} (default: {f.default})"
            kwargs.update(extra)
            group.add_argument(flag_of(f.name), **kwargs)
    return parser


def _unknown_flag_error(unknown: list[str], parser: argparse.ArgumentParser) -> UsageError:
    flags = [u.split("=")[0] for u in unknown if u.startswith("--")]
    if not flags:
        return UsageError(f"unexpected argument(s) {unknown}: every option is a --flag; see `qtrain pretrain --help`")
    name = flags[0]
    if name in UNSUPPORTED_HINTS:
        hint = UNSUPPORTED_HINTS[name]
    else:
        known = [o for a in parser._actions for o in a.option_strings]
        close = difflib.get_close_matches(name, known, n=3)
        hint = f"did you mean {' or '.join(close)}?" if close else "see `qtrain pretrain --help` and docs/flags.md"
    return UsageError(f"unsupported flag {name}: {hint}")


def _load_yaml(path: str) -> dict[str, Any]:
    """YAML option file -> {dest: value}. Keys: flag names with or without `--`, dashes or
    underscores, flat or nested under a group name (model:, training:, ...)."""
    import yaml

    try:
        with open(path, encoding="utf-8") as fh:
            raw = yaml.safe_load(fh) or {}
    except OSError as e:
        raise ConfigError(f"--config {path}: cannot read ({e.strerror})") from e
    except yaml.YAMLError as e:
        raise ConfigError(f"--config {path}: not valid YAML ({e})") from e
    if not isinstance(raw, dict):
        raise ConfigError(f"--config {path}: expected a mapping of option: value at the top level")
    dest_of = {f.name: f"{g}.{f.name}" for g, _, f, _ in iter_fields()}
    flat: dict[str, Any] = {}
    for key, value in raw.items():
        key = str(key).lstrip("-").replace("-", "_")
        if key in _group_classes() and isinstance(value, dict):
            for sub, v in value.items():
                flat[str(sub).lstrip("-").replace("-", "_")] = v
        else:
            flat[key] = value
    out = {}
    for key, value in flat.items():
        if key not in dest_of:
            close = difflib.get_close_matches(key, list(dest_of), n=1)
            hint = f" (did you mean {close[0]}?)" if close else ""
            raise ConfigError(f"--config {path}: unknown option {key!r}{hint}")
        out[dest_of[key]] = value
    return out


def parse_args(argv: list[str]) -> PretrainConfig:
    """Command line (+ optional YAML) -> PretrainConfig. Raises ConfigError on unknown flags."""
    parser = build_parser()
    ns, unknown = parser.parse_known_args(argv)
    if unknown:
        raise _unknown_flag_error(unknown, parser)
    values: dict[str, Any] = _load_yaml(ns.config) if getattr(ns, "config", None) else {}
    values.update({k: v for k, v in vars(ns).items() if "." in k})
    cfg = PretrainConfig()
    types = {f"{g}.{f.name}": _base_type(t) for g, _, f, t in iter_fields()}
    for dest, value in values.items():
        gname, fname = dest.split(".")
        tp = types[dest]
        try:
            if value is not None:
                value = _parse_bool(value) if tp is bool else ([str(v) for v in value] if tp is list else tp(value))
        except (TypeError, ValueError, argparse.ArgumentTypeError) as e:
            raise ConfigError(f"{flag_of(fname)}: bad value {value!r} ({e})") from e
        setattr(getattr(cfg, gname), fname, value)
    _check_choices(cfg, parser)
    validate(cfg)  # before the compat warnings: a refused value must not first say "continuing"
    _warn_compat(cfg)
    return cfg


def _check_choices(cfg: PretrainConfig, parser: argparse.ArgumentParser) -> None:
    # argparse checks choices on the command line; YAML values are checked here.
    for gname, _, f, _ in iter_fields():
        choices = f.metadata.get("argparse", {}).get("choices")
        value = getattr(getattr(cfg, gname), f.name)
        if choices and value is not None and value not in choices:
            raise ConfigError(f"{flag_of(f.name)}: {value!r} is not one of {choices}")


def _warn_compat(cfg: PretrainConfig) -> None:
    """Warn where a compatibility flag asks for something other than what qtrain does."""
    for gname, _, f, _ in iter_fields():
        if not f.metadata.get("compat"):
            continue
        want = f.metadata.get("qtrain_value")
        value = getattr(getattr(cfg, gname), f.name)
        if want is not None and value != want:
            warnings.warn(f"{flag_of(f.name)} {value}: qtrain uses {want} ({f.metadata['help']}); continuing with {want}",
                          stacklevel=3)
    if cfg.compat.no_load_rng_state:
        cfg.checkpoint.no_load_rng = True
    if cfg.parallel.sequence_parallel and cfg.parallel.tensor_model_parallel_size == 1:
        # Megatron-LM's validate_args does the same (MindSpeed-LLM's Qwen3-MoE 30B script passes both)
        warnings.warn("--sequence-parallel with --tensor-model-parallel-size 1: nothing to shard the sequence over; "
                      "turned off, as Megatron-LM does", stacklevel=3)
        cfg.parallel.sequence_parallel = False


def validate(cfg: PretrainConfig) -> None:
    """Checks that need only the options (world size, data and model checks live in pretrain)."""
    t, o = cfg.training, cfg.optim
    positive = {"--micro-batch-size": t.micro_batch_size, "--seq-length": cfg.data.seq_length,
                "--log-interval": cfg.logging.log_interval, "--eval-interval": t.eval_interval}
    for name, v in positive.items():
        if v is None or v <= 0:
            raise ConfigError(f"{name} must be a positive integer, got {v}")
    if t.train_iters is not None and t.train_iters <= 0:
        raise ConfigError(f"--train-iters must be positive, got {t.train_iters}")
    if t.global_batch_size is not None and t.global_batch_size <= 0:
        raise ConfigError(f"--global-batch-size must be positive, got {t.global_batch_size}")
    if o.min_lr > o.lr:
        raise ConfigError(f"--min-lr {o.min_lr} is above --lr {o.lr}")
    if o.lr_warmup_fraction is not None and not 0.0 <= o.lr_warmup_fraction < 1.0:
        raise ConfigError(f"--lr-warmup-fraction must be in [0, 1), got {o.lr_warmup_fraction}")
    if o.lr_decay_style == "WSD" and o.lr_wsd_decay_iters is None:
        raise ConfigError("--lr-decay-style WSD needs --lr-wsd-decay-iters (length of the annealing phase)")
    if cfg.compat.position_embedding_type == "yarn":
        raise ConfigError("--position-embedding-type yarn: give MindSpeed-LLM's --rope-scaling-type yarn "
                          "--rope-scaling-factor F --rope-scaling-original-max-position-embeddings N instead")
    if cfg.model.rope_scaling_type not in (None, "yarn", "linear"):
        from qtrain.models.rope_scaling import REFUSED_TYPES

        why = REFUSED_TYPES.get(cfg.model.rope_scaling_type, "qtrain implements yarn and linear")
        raise ConfigError(f"--rope-scaling-type {cfg.model.rope_scaling_type}: not supported: {why}")
    _validate_long_run(cfg)
    _validate_offload(cfg)
    _validate_wandb(cfg)
    if cfg.parallel.num_layer_list is not None:
        try:
            [int(x) for x in cfg.parallel.num_layer_list.split(",")]
        except ValueError as e:
            raise ConfigError(f"--num-layer-list {cfg.parallel.num_layer_list!r}: expected integers like 13,15") from e
    from qtrain.data.blended import parse_data_path
    from qtrain.data.gpt_dataset import parse_split

    if cfg.data.data_path:
        parse_data_path(cfg.data.data_path)
    parse_split(cfg.data.split)
    from qtrain.moe_flags import validate_moe

    validate_moe(cfg.moe)


def _validate_long_run(cfg: PretrainConfig) -> None:
    c = cfg.checkpoint
    for name, v in (("--keep-last-checkpoints", c.keep_last_checkpoints), ("--save-hf-interval", c.save_hf_interval),
                    ("--save-retain-interval", c.save_retain_interval)):
        if v is not None and v <= 0:
            raise ConfigError(f"{name} must be a positive integer, got {v}")
    for name, used in (("--async-save", c.async_save), ("--keep-last-checkpoints", c.keep_last_checkpoints),
                       ("--save-retain-interval", c.save_retain_interval)):
        if used and not c.save:
            raise ConfigError(f"{name} needs --save: it is about the checkpoints written there")
    if c.save_hf_interval and not c.save_hf:
        raise ConfigError("--save-hf-interval needs --save-hf: the dir its iter_XXXXXXX/ exports go into")
    if c.save_hf_interval and cfg.parallel.pipeline_model_parallel_size > 1 and \
            not (c.save and c.save_interval and c.save_hf_interval % c.save_interval == 0):
        raise ConfigError(f"--save-hf-interval {c.save_hf_interval} with pipeline parallelism needs --save and must be "
                          f"a multiple of --save-interval ({c.save_interval}): no rank holds every layer, so each "
                          f"export is read back from the checkpoint of its iteration")


def _validate_wandb(cfg: PretrainConfig) -> None:
    lg = cfg.logging
    for flag, value in (("--wandb-exp-name", lg.wandb_exp_name), ("--wandb-save-dir", lg.wandb_save_dir),
                        ("--wandb-entity", lg.wandb_entity)):
        if value and not lg.wandb_project:
            raise ConfigError(f"{flag} needs --wandb-project: W&B logging is on only with a project")
    if lg.wandb_project:
        from qtrain.train.wandb_log import check_available

        check_available()


def _validate_offload(cfg: PretrainConfig) -> None:
    o, p = cfg.offload, cfg.parallel
    if o.optimizer_offload_fraction != 1.0:
        raise ConfigError(f"--optimizer-offload-fraction {o.optimizer_offload_fraction}: qtrain offloads the whole "
                          f"optimizer state or none of it; give --optimizer-cpu-offload (fraction 1.0) or neither")
    if o.cpu_offloading_num_layers and not o.cpu_offloading:
        raise ConfigError("--cpu-offloading-num-layers needs --cpu-offloading")
    if not o.cpu_offloading:
        return
    if o.cpu_offloading_num_layers <= 0:
        raise ConfigError("--cpu-offloading: give the number of decoder layers to offload with "
                          "--cpu-offloading-num-layers N (N >= 1)")
    for flag, used in (("--recompute-granularity", p.recompute_granularity is not None),
                       ("--pipeline-model-parallel-size > 1", p.pipeline_model_parallel_size > 1),
                       ("--compile", cfg.training.compile)):
        if used:
            raise ConfigError(f"--cpu-offloading with {flag} is not supported (as in Megatron for recompute and "
                              f"pipelining); use one of them")


def resolve_model_config(cfg: PretrainConfig, vocab_size_hint: Optional[int] = None):
    """The Qwen3Config to build: preset / HF config of --load / Qwen3 defaults, then shape flags.

    `vocab_size_hint`: the tokenizer's vocabulary size, padded by --make-vocab-size-divisible-by
    when no --padded-vocab-size, preset or HF config gives the vocabulary.
    """
    from qtrain.models.config import Qwen3Config

    m = cfg.model
    vocab_given = m.padded_vocab_size is not None
    base_name = None  # what the model's shape comes from, when not from the flags (MoE flags are checked against it)
    if m.model_preset:
        base_name = f"--model-preset {m.model_preset}"
        from qtrain.models.presets import get_preset

        try:
            base = get_preset(m.model_preset)
        except (KeyError, ValueError) as e:
            raise ConfigError(f"--model-preset {m.model_preset!r}: {e}") from e
        vocab_given = True
    elif _load_kind(cfg) in ("hf", "qtrain"):
        # An HF dir or a qtrain checkpoint carries its config.json; a Megatron dir is described
        # by the shape flags (as in MindSpeed-LLM scripts) and checked against its tensors at load.
        base_name = f"--load {cfg.checkpoint.load}"
        if _load_kind(cfg) == "hf":
            base = Qwen3Config.from_json(os.path.join(cfg.checkpoint.load, "config.json"))
        else:
            from qtrain.checkpoint.dcp import read_checkpoint_model_config

            base = read_checkpoint_model_config(cfg.checkpoint.load)
        vocab_given = True
    else:
        base = Qwen3Config()
    d = base.to_hf_dict() if hasattr(base, "to_hf_dict") else dataclasses.asdict(base)
    overrides = {
        "num_hidden_layers": m.num_layers, "hidden_size": m.hidden_size,
        "intermediate_size": m.ffn_hidden_size, "num_attention_heads": m.num_attention_heads,
        "num_key_value_heads": m.num_query_groups, "head_dim": m.kv_channels, "rope_theta": m.rotary_base,
        "vocab_size": m.padded_vocab_size, "max_position_embeddings": m.max_position_embeddings,
        "rms_norm_eps": m.norm_epsilon,
    }
    for k, v in overrides.items():
        if v is not None:
            d[k] = v
    if m.num_attention_heads is not None and m.num_query_groups is None and not m.model_preset:
        # Megatron: without --group-query-attention every head has its own key/value.
        if not cfg.compat.group_query_attention:
            d["num_key_value_heads"] = m.num_attention_heads
    if m.hidden_size is not None and m.kv_channels is None and m.num_attention_heads:
        d["head_dim"] = m.hidden_size // m.num_attention_heads
    if m.untie_embeddings_and_output_weights:
        d["tie_word_embeddings"] = False
    if m.add_qkv_bias:
        d["attention_bias"] = True
    from qtrain.models.rope_scaling import rope_from_flags

    d["rope_scaling"] = rope_from_flags(
        rope_scaling_type=m.rope_scaling_type, factor=m.rope_scaling_factor,
        original=m.rope_scaling_original_max_position_embeddings, beta_fast=m.beta_fast, beta_slow=m.beta_slow,
        mscale=m.rope_scaling_mscale, mscale_all_dim=m.rope_scaling_mscale_all_dim,
        interpolation_factor=m.rotary_seq_len_interpolation_factor, base=d.get("rope_scaling"),
        max_position_embeddings=d["max_position_embeddings"])
    if not vocab_given and vocab_size_hint:
        mult = max(1, m.make_vocab_size_divisible_by) * cfg.parallel.tensor_model_parallel_size
        d["vocab_size"] = -(-vocab_size_hint // mult) * mult
    d["initializer_range"] = m.init_method_std
    from qtrain.moe_flags import apply_moe_flags

    apply_moe_flags(cfg.moe, d, base_name)
    return Qwen3Config.from_hf_dict(d)


def _load_kind(cfg: PretrainConfig) -> Optional[str]:
    """The kind of --load when it is readable (pretrain reports an unreadable one before training)."""
    from qtrain.checkpoint.dcp import load_kind
    from qtrain.errors import CheckpointError

    try:
        return load_kind(cfg.checkpoint.load, cfg.checkpoint.save)
    except CheckpointError:
        return None


def dump_flags_markdown() -> str:
    """docs/flags.md: every flag, its group, default and help; compat flags marked."""
    lines = ["# qtrain pretrain flags", "",
             "Generated from `qtrain/config.py` (`python -m qtrain.config > docs/flags.md`).",
             "Flags follow Megatron-LM / MindSpeed-LLM names, so their pretrain scripts run unchanged.",
             "Rows marked *compat* describe what qtrain always does: they are accepted; a value that asks",
             "for something else prints a warning and qtrain goes on with its own behaviour.",
             "A flag not listed stops the run before start with its name and a hint.", "",
             "| flag | group | default | meaning |", "|---|---|---|---|",
             "| `--config FILE.yaml` | - | - | read option values from YAML; the command line wins |"]
    for gname, _, f, _ in iter_fields():
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[misc]
        mark = " *compat*" if f.metadata.get("compat") else ""
        choices = f.metadata.get("argparse", {}).get("choices")
        extra = f" ({'/'.join(choices)})" if choices else ""
        lines.append(f"| `{flag_of(f.name)}` | {gname}{mark} | `{default}` | {f.metadata['help']}{extra} |")
    lines += ["", "## Megatron flags that stop the run", "", "| flag | what to do |", "|---|---|"]
    lines += [f"| `{k}` | {v} |" for k, v in UNSUPPORTED_HINTS.items()]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.stdout.write(dump_flags_markdown())
