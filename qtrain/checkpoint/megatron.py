"""Read and write Megatron legacy ("torch" format) checkpoints of Qwen3, as Megatron-LM and
MindSpeed-LLM (convert_ckpt_v2.py, training with --ckpt-format torch) lay them out.

Each rank file `iter_XXXXXXX/mp_rank_TT[_PPP][_EEE]/model_optim_rng.pt` (`_EEE`: the expert-parallel
rank of a MoE checkpoint) is a dict with `args` (an
argparse.Namespace), `checkpoint_version` 3.0, `iteration` and `model` (`model0`, `model1`, ...
with virtual pipeline stages), the model being megatron-core GPTModel's state dict for that
rank's slice (local layer spec names, layer numbers local to the chunk, the empty `_extra_state`
of each linear layer). Files written here carry no optimizer or RNG state: load them in Megatron
with `--finetune` or `--no-load-optim --no-load-rng`. MindSpeed-LLM 2.2.0's convert_ckpt.py and
convert_ckpt_v2.py read them as their own (docs/megatron.md says how that was checked).

Public API:
- `save_megatron(get_tensor, cfg, save_dir, tp=..., pp=..., ep=..., grouped=...)` writes one rank file at a time;
- `MegatronReader(dir, iteration)` gives random access to HF-named tensors, one PP stage mapped at a time;
- `load_megatron_state_dict(dir, iteration=None) -> (Qwen3Config, {hf_name: tensor})`, for `--load`.
"""

from __future__ import annotations

import argparse
import os
import pickle
import re
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch

from qtrain.checkpoint import safe_pickle
from qtrain.checkpoint.layout import (MODEL_FILE, iteration_dir_name, rank_dir_name, resolve_iteration,
                                      swap_into_place, write_tracker)
from qtrain.checkpoint.megatron_map import (ParamSpec, check_ep, check_tp, chunk_specs, hf_param_names, is_moe_layer,
                                            merge, normalize_key, num_experts, shard, with_extra_state)
from qtrain.errors import CheckpointError, ConfigError
from qtrain.models.config import Qwen3Config
from qtrain.models.presets import PRESETS
from qtrain.models.rope_scaling import megatron_rope_args, read_megatron_rope
from qtrain.parallel.stages import split_layers

CHECKPOINT_VERSION = 3.0
_DTYPE_NAMES = ("float32", "bfloat16", "float16")
_DTYPE_NAME = {getattr(torch, n): n for n in _DTYPE_NAMES}
_LAYER = re.compile(r"^decoder\.layers\.\d+\.")
_RANK_DIR = re.compile(r"^mp_rank_(\d{2})(?:_(\d{3}))?(?:_(\d{3}))?$")


def moe_args(cfg: Qwen3Config, *, tp: int, ep: int, grouped: bool) -> dict[str, Any]:
    """The MoE fields of `args`, in Megatron-LM's and MindSpeed-LLM's names (docs/megatron.md).

    Which layers are sparse: every layer is `moe_layer_freq=1, first_k_dense_replace=0` (what
    convert_ckpt_v2 writes for qwen3-moe); any other mix is Megatron-LM's per-layer list
    `moe_layer_freq=[0, 1, ...]`, which MindSpeed-LLM 2.2.0 cannot read (it takes an int there).
    Router: softmax over all experts, top-k, renormalised when norm_topk_prob (MindSpeed-LLM's
    `norm_topk_prob`; Megatron-LM's `moe_router_pre_softmax` is its negation).
    """
    if not num_experts(cfg):
        return dict(moe_grouped_gemm=False, expert_model_parallel_size=1, expert_tensor_parallel_size=tp)
    sparse = [int(is_moe_layer(cfg, i)) for i in range(cfg.num_hidden_layers)]
    all_sparse = all(sparse)
    return dict(
        num_experts=cfg.num_experts, moe_router_topk=cfg.num_experts_per_tok,
        moe_ffn_hidden_size=cfg.moe_intermediate_size, moe_intermediate_size=cfg.moe_intermediate_size,
        moe_grouped_gemm=grouped, expert_model_parallel_size=ep, expert_tensor_parallel_size=tp,
        norm_topk_prob=bool(cfg.norm_topk_prob), moe_router_pre_softmax=not cfg.norm_topk_prob,
        moe_router_score_function="softmax", moe_router_topk_scaling_factor=None,
        moe_router_load_balancing_type="aux_loss", moe_aux_loss_coeff=float(cfg.router_aux_loss_coef),
        moe_layer_freq=1 if all_sparse else sparse, first_k_dense_replace=0 if all_sparse else None,
        mlp_experts_flag=True, model_type_hf="qwen3-moe",
    )


def megatron_args(cfg: Qwen3Config, *, tp: int, pp: int, num_layer_list: list[int] | None,
                  vpp_layers: int | None, dtype: torch.dtype, iteration: int, seq_length: int | None = None,
                  hf_config: dict[str, Any] | None = None, ep: int = 1, grouped: bool = False) -> argparse.Namespace:
    """The `args` of a rank file, set from the model and the layout.

    It holds every field that Megatron-LM's load_args_from_checkpoint / check_checkpoint_args /
    validate_args (core_v0.12.1) and MindSpeed-LLM 2.2.0 (its load_args wrapper, convert_ckpt.py,
    convert_ckpt_v2.py's MegatronModel) read from a checkpoint, plus the model fields
    convert_ckpt_v2 writes under HF names. docs/megatron.md lists who reads what;
    tests/checkpoint/test_megatron_args.py checks it. `seq_length` defaults to the model's
    max_position_embeddings (what MindSpeed-LLM's convert_ckpt.py records for an HF source).
    """
    chunks = None if vpp_layers is None else cfg.num_hidden_layers // pp // vpp_layers
    theta = cfg.rope_theta
    args = argparse.Namespace(
        # shape, in Megatron's names ...
        num_layers=cfg.num_hidden_layers, hidden_size=cfg.hidden_size, ffn_hidden_size=cfg.intermediate_size,
        num_attention_heads=cfg.num_attention_heads, group_query_attention=True,
        num_query_groups=cfg.num_key_value_heads, kv_channels=cfg.head_dim,
        vocab_size=cfg.vocab_size, padded_vocab_size=cfg.vocab_size, make_vocab_size_divisible_by=1,
        max_position_embeddings=cfg.max_position_embeddings,
        seq_length=cfg.max_position_embeddings if seq_length is None else seq_length,
        # ... and in the HF names MindSpeed-LLM's convert_ckpt_v2 writes beside them
        num_key_value_heads=cfg.num_key_value_heads, intermediate_size=cfg.intermediate_size,
        tie_word_embeddings=cfg.tie_word_embeddings, torch_dtype=_DTYPE_NAME.get(dtype),
        # add_position_embedding: Megatron's default, which MindSpeed-LLM's Qwen3 scripts keep; it is checked
        # against the running job's value on load, and unused with rope.
        position_embedding_type="rope", add_position_embedding=True, use_rotary_position_embeddings=True,
        rotary_percent=1.0, rotary_interleaved=False,
        rotary_base=int(theta) if float(theta).is_integer() else float(theta),  # Megatron's --rotary-base is an int
        normalization="RMSNorm", norm_epsilon=cfg.rms_norm_eps, apply_layernorm_1p=False, qk_layernorm=True,
        swiglu=True, squared_relu=False, add_bias_linear=False, add_qkv_bias=False, post_norm=False,
        apply_query_key_layer_scaling=False, untie_embeddings_and_output_weights=not cfg.tie_word_embeddings,
        init_method_std=cfg.initializer_range, hidden_dropout=0.0, attention_dropout=0.0,
        # how MindSpeed-LLM's converters lay out attention and MLP; a dense model (no experts, no MTP layers).
        # Not first_k_dense_replace: convert_ckpt_v2 writes num_layers there, which MindSpeed-LLM's own
        # validate_args (transformer_block.py) then refuses; left unset, both read the model as dense.
        qkv_type="unpack", fc_type="gate_up_down", moe_grouped_gemm=False, mtp_num_layers=0,
        tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp,
        virtual_pipeline_model_parallel_size=chunks, num_layers_per_virtual_pipeline_stage=vpp_layers,
        # MindSpeed-LLM refuses a layer list without pipeline stages to spread it over
        num_layer_list=None if num_layer_list is None or pp == 1 else ",".join(map(str, num_layer_list)),
        expert_model_parallel_size=1, expert_tensor_parallel_size=tp,
        params_dtype=dtype, bf16=dtype == torch.bfloat16, fp16=dtype == torch.float16,
        use_mcore_models=True, transformer_impl="local", ckpt_format="torch", model_type_hf="qwen3",
        tokenizer_type="PretrainedFromHF", iteration=iteration, consumed_train_samples=0,
        consumed_valid_samples=0,
        # Not read by Megatron: lets `qtrain convert mg -> hf` restore the HF config.json exactly.
        qtrain_hf_config=hf_config,
    )
    vars(args).update(megatron_rope_args(cfg.rope_scaling))  # MindSpeed-LLM's / Megatron-LM's RoPE scaling names
    vars(args).update(moe_args(cfg, tp=tp, ep=ep, grouped=grouped))
    return args


def _arg(args: argparse.Namespace, *names: str) -> Any:
    """The first of `names` that args sets (Megatron-LM and MindSpeed-LLM spell some fields differently)."""
    for name in names:
        if getattr(args, name, None) is not None:
            return getattr(args, name)
    return None


def config_from_args(args: argparse.Namespace, source: str, shapes: dict[str, tuple[int, ...]],
                     tp: int) -> tuple[Qwen3Config, dict[str, Any] | None]:
    """A Qwen3Config from a checkpoint's `args` and the shapes of its first stage's tensors.

    qtrain stores the HF config in args. Otherwise the shape comes from Megatron-LM's names
    (ffn_hidden_size, num_query_groups, padded_vocab_size) or the ones MindSpeed-LLM's converter
    writes (intermediate_size, num_key_value_heads, vocab_size); query groups, MLP width and
    vocabulary are read off the tensors themselves, which cannot be stale. Args describing another
    architecture are refused.
    """
    hf_config = getattr(args, "qtrain_hf_config", None)
    if isinstance(hf_config, dict):
        return Qwen3Config.from_hf_dict(hf_config, source=source), hf_config
    mismatches = []
    if getattr(args, "normalization", "LayerNorm") != "RMSNorm":
        mismatches.append(f"normalization={getattr(args, 'normalization', None)!r} (Qwen3 uses RMSNorm)")
    if not getattr(args, "swiglu", False):
        mismatches.append("swiglu is off (Qwen3 uses SwiGLU)")
    if not getattr(args, "qk_layernorm", False):
        mismatches.append("qk_layernorm is off (Qwen3 normalises q and k)")
    if getattr(args, "add_bias_linear", False) or getattr(args, "add_qkv_bias", False):
        mismatches.append("linear biases are on (Qwen3 has none)")
    mismatches += _moe_mismatches(args)
    if getattr(args, "position_embedding_type", "rope") != "rope":
        mismatches.append(f"position_embedding_type={args.position_embedding_type!r} (Qwen3 uses rope)")
    if mismatches:
        raise ConfigError(f"{source}: not a Qwen3 checkpoint: " + "; ".join(mismatches))
    rope_scaling = read_megatron_rope(args, source)
    moe = _moe_config(args, source, shapes, tp)
    for key in ("embedding.word_embeddings.weight", "decoder.layers.0.self_attention.linear_qkv.weight") + (
            () if moe else ("decoder.layers.0.mlp.linear_fc1.weight",)):
        if key not in shapes:
            raise CheckpointError(f"{source}: no {key!r} in the first pipeline stage; not a GPT model checkpoint")
    vocab, hidden = shapes["embedding.word_embeddings.weight"]
    heads = _arg(args, "num_attention_heads")
    layers = _arg(args, "num_layers")
    if heads is None or layers is None:
        raise CheckpointError(f"{source}: checkpoint args lack num_attention_heads / num_layers")
    head_dim = _arg(args, "kv_channels") or hidden // heads
    qkv_rows = shapes["decoder.layers.0.self_attention.linear_qkv.weight"][0] * tp
    groups, rest = divmod(qkv_rows // head_dim - heads, 2)
    if rest or groups < 1 or qkv_rows % head_dim:
        raise CheckpointError(f"{source}: linear_qkv has {qkv_rows} rows, which does not fit {heads} heads "
                              f"of size {head_dim} (kv_channels) with whole query groups")
    untie = _arg(args, "untie_embeddings_and_output_weights")
    fc1 = shapes.get("decoder.layers.0.mlp.linear_fc1.weight")  # a dense first layer has the true width
    intermediate = fc1[0] * tp // 2 if fc1 else _arg(args, "ffn_hidden_size", "intermediate_size")
    if not intermediate:
        raise CheckpointError(f"{source}: checkpoint args lack ffn_hidden_size and layer 0 has no dense MLP")
    cfg = Qwen3Config(
        vocab_size=vocab * tp, hidden_size=hidden, intermediate_size=intermediate,
        num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=groups, head_dim=head_dim,
        max_position_embeddings=_arg(args, "max_position_embeddings", "seq_length") or 40960,
        rope_theta=float(_arg(args, "rotary_base") or 10000),
        rms_norm_eps=float(_arg(args, "norm_epsilon", "layernorm_epsilon") or 1e-5),
        tie_word_embeddings=(not untie) if untie is not None else bool(_arg(args, "tie_word_embeddings")),
        initializer_range=float(_arg(args, "init_method_std") or 0.02), rope_scaling=rope_scaling, **moe,
    )
    return cfg, None


# Routing of every published Qwen3-MoE (30B-A3B, 235B-A22B config.json), for args that do not record it
QWEN3_MOE_ROUTING = {"num_experts_per_tok": 8, "norm_topk_prob": True}


def routing_note(args: argparse.Namespace, source: str) -> str | None:
    """What to tell the user when a MoE checkpoint's args do not say how tokens are routed."""
    if not getattr(args, "num_experts", None) or isinstance(getattr(args, "qtrain_hf_config", None), dict):
        return None
    missing = [name for name, have in (("moe_router_topk", _arg(args, "moe_router_topk")),
                                       ("norm_topk_prob", _arg(args, "norm_topk_prob", "moe_router_pre_softmax")))
               if have is None]
    if not missing:
        return None
    return (f"{source}: the checkpoint args do not record {' and '.join(missing)} (MindSpeed-LLM's convert_ckpt_v2 "
            f"writes neither); using Qwen3-MoE's num_experts_per_tok=8, norm_topk_prob=true. If the model routes "
            f"otherwise, convert with --hf-cfg-dir <the original HF model dir> to take them from its config.json")


# MoE features of Megatron-LM / MindSpeed-LLM that Qwen3-MoE does not have: (field, the value meaning "off")
_MOE_OFF = ("moe_shared_expert_intermediate_size", "n_shared_experts", "shared_expert_gate",
            "moe_router_enable_expert_bias", "moe_router_num_groups", "moe_router_group_topk")


def _moe_mismatches(args: argparse.Namespace) -> list[str]:
    """What in a MoE checkpoint's args Qwen3-MoE does not have (each named with its value)."""
    if not getattr(args, "num_experts", None):
        return []
    out = [f"{name}={getattr(args, name)!r} (Qwen3-MoE has no shared experts, expert bias or router groups)"
           for name in _MOE_OFF if getattr(args, name, None) not in (None, False, 0)]
    if (getattr(args, "mtp_num_layers", 0) or 0) > 0:
        out.append(f"mtp_num_layers={args.mtp_num_layers} (multi-token prediction layers)")
    score = getattr(args, "moe_router_score_function", "softmax") or "softmax"
    if score != "softmax":
        out.append(f"moe_router_score_function={score!r} (Qwen3-MoE routes with a softmax)")
    factor = getattr(args, "moe_router_topk_scaling_factor", None)
    if factor not in (None, 1, 1.0):
        out.append(f"moe_router_topk_scaling_factor={factor!r}")
    etp = getattr(args, "expert_tensor_parallel_size", None)
    if etp not in (None, getattr(args, "tensor_model_parallel_size", 1)):
        out.append(f"expert_tensor_parallel_size={etp} (qtrain reads experts split over the same TP ranks as "
                   f"attention, MindSpeed-LLM's default)")
    if getattr(args, "moe_tp_extend_ep", False):
        out.append("moe_tp_extend_ep is on")
    return out


def _sparse_layers(args: argparse.Namespace, layers: int) -> list[bool]:
    """Which layers are MoE, from Megatron-LM's moe_layer_freq (int or per-layer list) and MindSpeed-LLM's
    first_k_dense_replace."""
    freq = getattr(args, "moe_layer_freq", None) or 1
    sparse = [bool(x) for x in freq] if isinstance(freq, (list, tuple)) else [i % int(freq) == 0 for i in range(layers)]
    first_k = getattr(args, "first_k_dense_replace", None) or 0
    return [s and i >= first_k for i, s in enumerate(sparse)]


def _moe_config(args: argparse.Namespace, source: str, shapes: dict[str, tuple[int, ...]],
                tp: int) -> dict[str, Any]:
    """Qwen3Config's MoE fields from a foreign MoE checkpoint's args (empty for a dense one)."""
    experts = getattr(args, "num_experts", None)
    if not experts:
        return {}
    layers = _arg(args, "num_layers")
    sparse = _sparse_layers(args, layers)
    if len(sparse) != layers:
        raise CheckpointError(f"{source}: moe_layer_freq lists {len(sparse)} layers, num_layers is {layers}")
    width = _arg(args, "moe_ffn_hidden_size", "moe_intermediate_size")
    if not width:
        fc1 = shapes.get("decoder.layers.0.mlp.experts.local_experts.0.linear_fc1.weight")
        width = fc1[0] * tp // 2 if fc1 else None
    if not width:
        raise CheckpointError(f"{source}: MoE checkpoint args lack moe_ffn_hidden_size (moe_intermediate_size)")
    # convert_ckpt_v2 records neither the top-k nor the renormalisation (its qwen3-moe entry maps no such
    # key): Qwen3-MoE's published values are taken, and MegatronReader.routing_note says so
    topk = _arg(args, "moe_router_topk") or QWEN3_MOE_ROUTING["num_experts_per_tok"]
    norm = getattr(args, "norm_topk_prob", None)
    if norm is None and getattr(args, "moe_router_pre_softmax", None) is not None:
        norm = not args.moe_router_pre_softmax  # Megatron-LM: softmax after top-k renormalises
    if norm is None:
        norm = QWEN3_MOE_ROUTING["norm_topk_prob"]
    return dict(num_experts=experts, num_experts_per_tok=topk, moe_intermediate_size=width, norm_topk_prob=bool(norm),
                decoder_sparse_step=1, mlp_only_layers=[i for i, s in enumerate(sparse) if not s],
                router_aux_loss_coef=float(_arg(args, "moe_aux_loss_coeff") or 0.001))  # else transformers' default


class RopeThetaWarning(UserWarning):
    """rope_theta was taken from a Megatron checkpoint's args (rotary_base), which may not be the model's."""


def _plain(x: float) -> int | float:
    return int(x) if float(x).is_integer() else x


def rope_theta_note(args: argparse.Namespace, cfg: Qwen3Config, source: str) -> str | None:
    """What to tell the user about a rope_theta that comes from a foreign checkpoint's args; None when
    the model has the shape of a published Qwen3 and the same theta.

    Megatron records --rotary-base, default 10000, and MindSpeed-LLM's convert_ckpt.py records that
    default whatever the HF model's rope_theta when its command line has no --rotary-base (its
    Qwen3 example has none). A model run with another theta than it was trained with gives wrong
    logits without any error, so this is said every time it cannot be ruled out.
    """
    base = _arg(args, "rotary_base")
    said = f"rotary_base={_plain(base)}" if base is not None else "no rotary_base, so Megatron's default 10000"
    fix = "convert with --hf-cfg-dir <the original HF model dir> to take rope_theta from its config.json"
    shape = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
             "head_dim")
    for name, preset in PRESETS.items():
        if not name.startswith("tiny") and all(getattr(preset, f) == getattr(cfg, f) for f in shape):
            if preset.rope_theta == cfg.rope_theta:
                return None
            return (f"{source}: the checkpoint args say {said}, but this is the shape of Qwen3-{name}, whose "
                    f"rope_theta is {_plain(preset.rope_theta)}; MindSpeed-LLM's convert_ckpt.py records Megatron's "
                    f"default 10000 when its command line has no --rotary-base. Using rope_theta="
                    f"{_plain(cfg.rope_theta)} as the args say; if the model was not trained with it, {fix}")
    return (f"{source}: rope_theta={_plain(cfg.rope_theta)} comes from the checkpoint args ({said}); Megatron "
            f"records its default 10000 when the command line that wrote the checkpoint had no --rotary-base. "
            f"If the model was trained with another theta, {fix}")


def tensor_reads(cfg: Qwen3Config, tp: int = 1, pp: int = 1, num_layer_list: list[int] | None = None,
                 vpp_layers: int | None = None) -> int:
    """How many times `save_megatron` calls `get_tensor` (every tensor once per TP rank): the
    length of its progress."""
    stages = split_layers(cfg.num_hidden_layers, pp, num_layer_list, vpp_layers)
    return tp * sum(len(spec.hf_names) for p, chunks in enumerate(stages) for v, layers in enumerate(chunks)
                    for spec in chunk_specs(cfg, layers, pre_process=p == 0 and v == 0,
                                            post_process=p == pp - 1 and v == len(chunks) - 1, pp_size=pp))


def save_megatron(get_tensor: Callable[[str], torch.Tensor], cfg: Qwen3Config, save_dir: str | Path, *,
                  tp: int = 1, pp: int = 1, num_layer_list: list[int] | None = None,
                  vpp_layers: int | None = None, dtype: torch.dtype | None = None, iteration: int = 1,
                  seq_length: int | None = None, hf_config: dict[str, Any] | None = None,
                  log: Callable[[str], None] | None = None, ep: int = 1, grouped: bool = False) -> list[Path]:
    """Write a Megatron checkpoint for TP x PP (x EP) ranks, one rank file at a time.

    For a MoE model, EP rank e's files hold experts [e * E/EP, (e + 1) * E/EP) of every MoE layer
    and a copy of everything else (as MindSpeed-LLM's convert_ckpt_v2 writes them); `grouped` writes
    the experts as GroupedMLP's weight1/weight2 (`--moe-grouped-gemm`), else per expert.

    `get_tensor(hf_name)` returns a full HF tensor; it is called again for every TP rank, so only
    one rank's shard is ever held. `dtype` casts every tensor (default: keep each tensor's dtype).
    `seq_length` is recorded in args (default: the model's max_position_embeddings).
    Files go to `iter_XXXXXXX.tmp/`, which replaces `iter_XXXXXXX/` (and any stale rank folders
    in it) once complete; the tracker file is written last.
    """
    check_tp(cfg, tp)
    check_ep(cfg, ep)
    megatron_rope_args(cfg.rope_scaling)  # refuses, before any work, a RoPE the args cannot carry
    stages = split_layers(cfg.num_hidden_layers, pp, num_layer_list, vpp_layers)
    out_dtype = dtype
    final = Path(save_dir) / iteration_dir_name(iteration)
    root = final.with_name(final.name + ".tmp")
    shutil.rmtree(root, ignore_errors=True)  # leftovers of a conversion that was killed
    written = []
    for p, chunks in enumerate(stages):
        for e, t in ((e, t) for e in range(ep) for t in range(tp)):
            obj: dict[str, Any] = {"checkpoint_version": CHECKPOINT_VERSION, "iteration": iteration}
            for v, layers in enumerate(chunks):
                post_process = p == pp - 1 and v == len(chunks) - 1
                specs = chunk_specs(cfg, layers, pre_process=p == 0 and v == 0, post_process=post_process,
                                    pp_size=pp, ep_rank=e, ep_size=ep, grouped=grouped)
                state = {}
                for spec in specs:
                    tensors = [get_tensor(n) for n in spec.hf_names]
                    out_dtype = out_dtype or tensors[0].dtype  # default: the source's own dtype
                    state[spec.mg_name] = shard(spec, [x.to(out_dtype) for x in tensors], cfg, tp, t)
                    del tensors
                obj["model" if len(chunks) == 1 else f"model{v}"] = with_extra_state(state, post_process)
            obj = {"args": megatron_args(cfg, tp=tp, pp=pp, num_layer_list=num_layer_list, vpp_layers=vpp_layers,
                                         dtype=out_dtype, iteration=iteration, seq_length=seq_length,
                                         hf_config=hf_config, ep=ep, grouped=grouped),
                   **obj, "num_floating_point_operations_so_far": 0}
            path = root / rank_dir_name(t, p, pp, e, ep) / MODEL_FILE
            path.parent.mkdir(parents=True, exist_ok=True)
            torch.save(obj, path)
            del obj, state
            written.append(final / path.relative_to(root))
            if log:
                log(f"wrote {written[-1]}")
    swap_into_place(root, final)
    write_tracker(save_dir, iteration)
    return written


def _torch_load(path: Path, weights_only: bool) -> dict[str, Any]:
    """Load a rank file memory-mapped (tensors are read when touched).

    `weights_only` uses qtrain's restricted unpickler (tensors, args, RNG state; see safe_pickle.py);
    False unpickles in full, for files one trusts that hold other objects.
    """
    kwargs: dict[str, Any] = {"pickle_module": safe_pickle} if weights_only else {}
    try:
        try:
            return torch.load(path, map_location="cpu", mmap=True, weights_only=False, **kwargs)
        except RuntimeError as e:  # files in the pre-zipfile format cannot be memory-mapped
            if "mmap" not in str(e):
                raise
            return torch.load(path, map_location="cpu", weights_only=False, **kwargs)
    except pickle.UnpicklingError as e:
        raise CheckpointError(
            f"{path}: refusing to unpickle it ({e}). If you trust this file, convert with --trust-pickle "
            f"to load it in full") from None


class MegatronReader:
    """HF-named tensors from a Megatron checkpoint, merging TP shards on demand.

    Tensors of one pipeline stage are memory-mapped at a time; `get(name)` merges the TP shards
    of the Megatron parameter that holds `name`.
    """

    def __init__(self, ckpt_dir: str | Path, iteration: int | None = None, weights_only: bool = True):
        self.dir = Path(ckpt_dir)
        self.weights_only = weights_only
        self.iteration = resolve_iteration(self.dir, iteration)
        self.root = self.dir / iteration_dir_name(self.iteration)
        self.tp, self.pp, self.ep = self._discover()
        head = _torch_load(self._path(0, 0), weights_only)
        if "args" not in head:
            raise CheckpointError(f"{self._path(0, 0)}: no 'args' entry; not a Megatron checkpoint file")
        self.args = head["args"]
        for flag, value in (("noop_layers", getattr(self.args, "noop_layers", None)),
                            ("schedules_method", getattr(self.args, "schedules_method", None))):
            if value:  # these reorder or skip layers in ways the files alone do not reveal
                raise CheckpointError(f"{self._path(0, 0)}: saved with {flag}={value!r}, which qtrain "
                                      f"cannot map back to layer order; re-save without it in MindSpeed-LLM")
        shapes = {k: tuple(t.shape) for k, t in self._chunks(head, self._path(0, 0))[0].items()}
        self.config, self.hf_config = config_from_args(self.args, str(self._path(0, 0)), shapes, self.tp)
        # qtrain's own files carry the HF config; for others, what to say about their rope_theta
        self.rope_theta_note = None if self.hf_config is not None else rope_theta_note(
            self.args, self.config, str(self._path(0, 0)))
        routing = routing_note(self.args, str(self._path(0, 0)))
        if routing:  # said wherever the rope_theta note is (same remedy: --hf-cfg-dir)
            self.rope_theta_note = f"{self.rope_theta_note}\n{routing}" if self.rope_theta_note else routing
        self.seq_length: int | None = _arg(self.args, "seq_length", "encoder_seq_length")  # trained with, if recorded
        dtype = _arg(self.args, "params_dtype", "torch_dtype")  # MindSpeed-LLM keeps HF's "bfloat16" string
        self.dtype = getattr(torch, dtype) if isinstance(dtype, str) and dtype in _DTYPE_NAMES else dtype
        self.grouped = False  # experts as GroupedMLP's weight1/weight2 (else per expert); set by _build_index
        self._owner: dict[str, tuple[int, int, int, ParamSpec]] = {}  # HF name -> (stage, chunk, EP rank, spec)
        self._build_index(head)
        self._stage: tuple[int, dict[int, list[list[dict[str, torch.Tensor]]]]] | None = None
        self._pending: dict[str, torch.Tensor] = {}
        self._pending_layer: tuple[int, int, str] | None = None

    def _path(self, tp_rank: int, pp_rank: int, ep_rank: int = 0) -> Path:
        folder = (f"mp_rank_{tp_rank:02d}" + (f"_{pp_rank:03d}" if self._pp_suffix else "")
                  + (f"_{ep_rank:03d}" if self._ep_suffix else ""))
        return self.root / folder / MODEL_FILE

    def _discover(self) -> tuple[int, int, int]:
        """TP, PP and EP sizes (from args, else from the folders); names every missing rank file.

        Folders are `mp_rank_TT[_PPP][_EEE]`; a single suffix is the EP rank when the args say
        EP > 1 and PP == 1 (Megatron writes `_PPP` only with PP > 1, `_EEE` only with EP > 1)."""
        if not self.root.is_dir():
            raise CheckpointError(f"{self.root}: iteration folder named by the tracker file does not exist")
        ranks = []
        for entry in sorted(os.listdir(self.root)):
            m = _RANK_DIR.match(entry)
            if m is not None:
                ranks.append(tuple(int(g) for g in m.groups() if g is not None))
        if not ranks:
            hint = (" (it looks like a torch_dist checkpoint: convert it to --ckpt-format torch with Megatron first)"
                    if any(f.endswith(".distcp") or f == "metadata.json" for f in os.listdir(self.root)) else "")
            raise CheckpointError(f"{self.root}: no mp_rank_* folders{hint}")
        lengths = {len(r) for r in ranks}
        if len(lengths) > 1:
            raise CheckpointError(f"{self.root}: mixes mp_rank_TT, mp_rank_TT_PPP and mp_rank_TT_PPP_EEE folders")
        suffixes = lengths.pop() - 1
        first = self.root / ("mp_rank_00" + "_000" * suffixes) / MODEL_FILE
        args = _torch_load(first, self.weights_only).get("args") if first.is_file() else None
        arg_pp = getattr(args, "pipeline_model_parallel_size", None) or 1
        arg_ep = getattr(args, "expert_model_parallel_size", None) or 1
        self._ep_suffix = suffixes == 2 or (suffixes == 1 and arg_ep > 1 and arg_pp == 1)
        self._pp_suffix = suffixes == 2 or (suffixes == 1 and not self._ep_suffix)
        tp = max(r[0] for r in ranks) + 1
        pp = max(r[1] for r in ranks) + 1 if self._pp_suffix else 1
        ep = max(r[-1] for r in ranks) + 1 if self._ep_suffix else 1
        if args is not None:  # the sizes the checkpoint was saved with win over what is on disk
            tp = getattr(args, "tensor_model_parallel_size", None) or tp
            pp, ep = (arg_pp if self._pp_suffix else pp), (arg_ep if self._ep_suffix else ep)
        expected = [self._path(t, p, e) for p in range(pp) for e in range(ep) for t in range(tp)]
        missing = [str(path) for path in expected if not path.is_file()]
        if missing:
            raise CheckpointError(f"{self.root}: incomplete Megatron checkpoint (TP={tp}, PP={pp}, EP={ep}); missing "
                                  + ", ".join(missing))
        return tp, pp, ep

    def _chunks(self, obj: dict[str, Any], path: Path) -> list[dict[str, torch.Tensor]]:
        if "model" in obj:
            chunks = [obj["model"]]
        else:
            keys = sorted((k for k in obj if re.fullmatch(r"model\d+", k)), key=lambda k: int(k[5:]))
            if not keys:
                raise CheckpointError(f"{path}: no 'model' (or 'model0', ...) entry")
            chunks = [obj[k] for k in keys]
        out = []
        for sd in chunks:
            if any(k.startswith("language_model.") for k in sd):
                raise CheckpointError(f"{path}: legacy (non-mcore) Megatron model names are not supported; "
                                      f"save the model with --use-mcore-models")
            out.append({nk: t for k, t in sd.items() if (nk := normalize_key(k)) is not None})
        return out

    def _build_index(self, head: dict[str, Any]) -> None:
        """Find which stage and chunk holds each layer by counting the layers in each rank-0 file."""
        counts = []
        for p in range(self.pp):
            obj = head if p == 0 else _torch_load(self._path(0, p), self.weights_only)
            layer_ids = [{int(k.split(".")[2]) for k in sd if k.startswith("decoder.layers.")}
                         for sd in self._chunks(obj, self._path(0, p))]
            counts.append([len(ids) for ids in layer_ids])
            del obj
        n_chunks = {len(c) for c in counts}
        if len(n_chunks) != 1:
            raise CheckpointError(f"{self.root}: pipeline stages hold different numbers of model chunks {counts}")
        total = sum(map(sum, counts))
        if total != self.config.num_hidden_layers:
            raise CheckpointError(f"{self.root}: rank files hold {total} decoder layers, args say "
                                  f"{self.config.num_hidden_layers}; some layers are missing")
        v_count, offset = n_chunks.pop(), 0
        keys = [k for sd in self._chunks(head, self._path(0, 0)) for k in sd]
        if any(".mlp.experts." in k for k in keys):  # the files say how experts are stored ...
            self.grouped = any(k.endswith(".mlp.experts.weight1") for k in keys)
        else:  # ... unless the first stage has dense layers only: then the args do
            self.grouped = bool(getattr(self.args, "moe_grouped_gemm", False))
        self.stages: list[list[list[int]]] = [[[] for _ in range(v_count)] for _ in range(self.pp)]
        for v in range(v_count):  # interleaved order: chunk v of every stage, then chunk v + 1
            for p in range(self.pp):
                self.stages[p][v] = list(range(offset, offset + counts[p][v]))
                offset += counts[p][v]
        if num_experts(self.config) % self.ep:
            raise CheckpointError(f"{self.root}: EP={self.ep} does not divide num_experts={num_experts(self.config)}")
        for p, chunks in enumerate(self.stages):
            for v, layers in enumerate(chunks):
                for e in range(self.ep):  # rank e holds its experts; the rest is read from rank 0
                    specs = chunk_specs(self.config, layers, pre_process=p == 0 and v == 0,
                                        post_process=p == self.pp - 1 and v == v_count - 1, pp_size=self.pp,
                                        ep_rank=e, ep_size=self.ep, grouped=self.grouped)
                    for spec in specs:
                        for name in spec.hf_names:
                            self._owner.setdefault(name, (p, v, e, spec))

    def names(self) -> list[str]:
        """HF tensor names in file order."""
        return hf_param_names(self.config)

    def _load_stage(self, p: int, e: int = 0) -> list[list[dict[str, torch.Tensor]]]:
        """`[tp rank][chunk] -> state dict` of stage p, EP rank e, memory-mapped; the files of the
        previous stage are released."""
        if self._stage is None or self._stage[0] != p:
            self._stage = None
            self._stage = (p, {})
        loaded = self._stage[1]
        if e not in loaded:
            loaded[e] = [self._chunks(_torch_load(self._path(t, p, e), self.weights_only), self._path(t, p, e))
                         for t in range(self.tp)]
        return loaded[e]

    def get(self, name: str) -> torch.Tensor:
        """The full HF tensor `name`, merged from its TP shards (all experts of a grouped weight come
        out of one merge; the others are kept for the next calls)."""
        if name in self._pending:
            return self._pending.pop(name)
        if name not in self._owner:
            raise KeyError(f"{name}: not a parameter of this Qwen3 model")
        p, v, e, spec = self._owner[name]
        shards = []
        for t, chunks in enumerate(self._load_stage(p, e)):
            if spec.mg_name not in chunks[v]:
                raise CheckpointError(f"{self._path(t, p, e)}: missing parameter {spec.mg_name!r} (model chunk {v})")
            shards.append(chunks[v][spec.mg_name])
        tensors = dict(zip(spec.hf_names, merge(spec, shards, self.config)))
        result = tensors.pop(name)
        # q/k/v, gate/up and a grouped weight's experts come out of one merge: keep the siblings, for the
        # current layer only (weight1's gate/up and weight2's down of the same experts are asked for in turn)
        layer = (p, v, _LAYER.match(spec.mg_name)[0] if _LAYER.match(spec.mg_name) else spec.mg_name)
        if layer != self._pending_layer:
            self._pending, self._pending_layer = {}, layer
        self._pending.update(tensors)
        return result

    def __iter__(self) -> Iterator[tuple[str, torch.Tensor]]:
        for name in self.names():
            yield name, self.get(name)

    def close(self) -> None:
        """Release the memory-mapped stage."""
        self._stage, self._pending = None, {}


def load_megatron_state_dict(ckpt_dir: str | Path, iteration: int | None = None,
                             weights_only: bool = True) -> tuple[Qwen3Config, dict[str, torch.Tensor]]:
    """A Megatron checkpoint as (Qwen3Config, {HF name: full tensor}); for `qtrain pretrain --load`."""
    reader = MegatronReader(ckpt_dir, iteration, weights_only)
    state = {name: tensor.clone() for name, tensor in reader}
    reader.close()
    return reader.config, state
