"""Tensor (and sequence) parallelism with DTensor plans, applied to a meta-device Qwen3ForCausalLM.

Megatron's layout: q/k/v and gate/up projections split by output (column parallel), o/down by
input (row parallel), so each rank owns whole heads and one all-reduce (or, with
--sequence-parallel, one reduce-scatter + all-gather pair) per block suffices. The embedding and
LM head are split by vocabulary. Training never calls the LM head module: the model's loss
reads its weight shard and runs the chunked vocab-parallel cross-entropy on it
(qtrain/ops/vocab_parallel_linear_cross_entropy.py), which gathers sequence-parallel hidden
states itself, so no logits exist at all (the module, called without labels, still returns
vocab-sharded logits).

q_norm / k_norm act on each head's vector with one weight shared by all heads. A rank sees only
its heads, so their weight gradient is a partial sum: they are marked as sharded along the head
dim (SequenceParallel(sequence_dim=2)) so DTensor sums that gradient over TP ranks.

Qwen3-MoE sparse layers: attention is split as above; the experts block (router and experts) is
replicated over TP: it takes the whole sequence as a plain tensor (gathered under SP), every TP
rank computes the same routing and expert outputs, and the output re-enters the residual
stream's layout (a local slice under SP). Its parameters stay plain tensors, so FSDP shards them
over the data-parallel ranks only, and their gradients are the same on every TP rank.
"""

from __future__ import annotations

from torch import nn
from torch.distributed.tensor import Replicate, Shard
from torch.distributed.tensor.parallel import (
    ColwiseParallel,
    PrepareModuleInput,
    PrepareModuleInputOutput,
    RowwiseParallel,
    SequenceParallel,
    parallelize_module,
)


def apply_tensor_parallel(model: nn.Module, tp_mesh, sequence_parallel: bool) -> None:
    """Shard `model` (a Qwen3ForCausalLM or a pipeline stage of one) over `tp_mesh` in place.

    Works on any subset of embed_tokens / layers / norm / lm_head (missing ones are None).
    """
    act = Shard(1) if sequence_parallel else Replicate()  # layout of the residual stream
    top: dict[str, object] = {}
    if model.model.embed_tokens is not None:
        top["model.embed_tokens"] = RowwiseParallel(input_layouts=Replicate(), output_layouts=act)
    if model.model.norm is not None and sequence_parallel:
        top["model.norm"] = SequenceParallel()
    if model.lm_head is not None:
        top["lm_head"] = ColwiseParallel(input_layouts=act, output_layouts=Shard(-1), use_local_output=False)
    if top:
        parallelize_module(model, tp_mesh, top)
    for layer in model.model.layers.values():
        sparse = hasattr(layer.mlp, "experts")  # a Qwen3-MoE experts block (qtrain.models.moe)
        parallelize_module(layer, tp_mesh, _layer_plan(sequence_parallel, sparse))
    _retie(model)


def _layer_plan(sp: bool, sparse: bool = False) -> dict[str, object]:
    act = Shard(1) if sp else Replicate()
    heads = SequenceParallel(sequence_dim=2, use_local_output=True)  # [B, S, heads, D]: heads are local
    plan: dict[str, object] = {
        "self_attn.q_proj": ColwiseParallel(), "self_attn.k_proj": ColwiseParallel(),
        "self_attn.v_proj": ColwiseParallel(), "self_attn.o_proj": RowwiseParallel(output_layouts=act),
        "self_attn.q_norm": heads, "self_attn.k_norm": heads,
    }
    if sparse:  # replicated experts block: whole sequence in (plain), residual layout out (plain)
        plan["mlp"] = PrepareModuleInputOutput(
            input_layouts=(act,), desired_input_layouts=(Replicate(),), use_local_input=True,
            output_layouts=(Replicate(),), desired_output_layouts=(act,), use_local_output=True)
    else:
        plan.update({"mlp.gate_proj": ColwiseParallel(), "mlp.up_proj": ColwiseParallel(),
                     "mlp.down_proj": RowwiseParallel(output_layouts=act)})
    if sp:
        plan.update({
            "input_layernorm": SequenceParallel(), "post_attention_layernorm": SequenceParallel(),
            # attention(x, cos, sin, mask): gather the sequence of x only
            "self_attn": PrepareModuleInput(input_layouts=(act, None, None, None),
                                            desired_input_layouts=(Replicate(), None, None, None)),
        })
        if not sparse:
            plan["mlp"] = PrepareModuleInput(input_layouts=(act,), desired_input_layouts=(Replicate(),))
    return plan


def _retie(model: nn.Module) -> None:
    """parallelize_module gave the embedding and the LM head separate DTensors; both are
    Shard(0) over the vocabulary, so tying them again keeps one shared parameter."""
    if (getattr(model.config, "tie_word_embeddings", False) and model.lm_head is not None
            and model.model.embed_tokens is not None):
        model.lm_head.weight = model.model.embed_tokens.weight

