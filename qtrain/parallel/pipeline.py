"""Pipeline parallelism with torch.distributed.pipelining, stages built by hand.

The meta-device model is copied once per local (virtual) stage and each copy keeps only its
layers, in a ModuleDict keyed by the global layer index: parameter names stay HF names
(`model.layers.17.mlp.up_proj.weight`), so a checkpoint written under PP loads under any
other layout. The first stage keeps the embedding, the last the final norm and LM head and
computes the loss there. Schedules: 1F1B, or interleaved 1F1B with virtual stages
(--num-layers-per-virtual-pipeline-stage; chunk v of rank p is stage v*PP + p, as Megatron).

Tied embeddings: the first stage's embedding and the last stage's LM head are two copies of
one weight. They start equal (loaded from the same tensor); after each backward their
gradients are summed between the two stages (`sync_tied_grads`), so the optimizer keeps them
equal, as Megatron's embedding group does.
"""

from __future__ import annotations

import contextlib
import copy
from typing import Callable, Optional

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.pipelining import PipelineStage, Schedule1F1B, ScheduleInterleaved1F1B
from torch.distributed.tensor.parallel import loss_parallel

from qtrain.labels import IGNORE_INDEX
from qtrain.parallel.full_tensors import full_tensor


def split_into_chunks(model: nn.Module, stages: list[list[list[int]]], pp_rank: int) -> list[nn.Module]:
    """This rank's stage chunks of a (meta) Qwen3ForCausalLM: copies holding only their layers."""
    num_chunks = len(stages[0])
    last_rank = len(stages) - 1
    chunks = []
    for v, layer_ids in enumerate(stages[pp_rank]):
        first, last = pp_rank == 0 and v == 0, pp_rank == last_rank and v == num_chunks - 1
        # Copy only what the chunk keeps (the model may already hold real weights).
        keep = {str(i) for i in layer_ids}
        dropped = [m for k, m in model.model.layers.items() if k not in keep]
        dropped += [] if first else [model.model.embed_tokens]
        dropped += [] if last else [model.model.norm, model.lm_head]
        chunk = copy.deepcopy(model, memo={id(m): None for m in dropped})
        chunk.model.layers = nn.ModuleDict({k: m for k, m in chunk.model.layers.items() if m is not None})
        chunks.append(chunk)
    return chunks


def stage_view(chunks: list[nn.Module]) -> nn.Module:
    """One Qwen3ForCausalLM over all of this rank's chunks (the same submodules, HF names), for the
    optimizer, the state dict and DCP. It is never called: the schedule calls the chunks."""
    from qtrain.models.qwen3 import Qwen3ForCausalLM, Qwen3Model

    view, inner = Qwen3ForCausalLM.__new__(Qwen3ForCausalLM), Qwen3Model.__new__(Qwen3Model)
    nn.Module.__init__(view)
    nn.Module.__init__(inner)
    view.config = chunks[0].config
    inner.embed_tokens = chunks[0].model.embed_tokens
    inner.layers = nn.ModuleDict({k: m for c in chunks for k, m in c.model.layers.items()})
    inner.norm = chunks[-1].model.norm
    view.model, view.lm_head = inner, chunks[-1].lm_head
    return view


class Pipeline:
    """Runs one optimizer step's micro-batches through the schedule on this rank."""

    def __init__(self, chunks: list[nn.Module], stages: list[list[list[int]]], pp_group, device: torch.device,
                 num_microbatches: int, loss_fn: Callable, vocab_parallel: bool,
                 tied_group: Optional[dist.ProcessGroup]) -> None:
        pp, pp_rank = dist.get_world_size(pp_group), dist.get_rank(pp_group)
        num_chunks = len(stages[0])
        self.chunks = chunks
        self.stages = [PipelineStage(c, v * pp + pp_rank, pp * num_chunks, device, group=pp_group)
                       for v, c in enumerate(chunks)]
        self.is_first, self.is_last = pp_rank == 0, pp_rank == pp - 1
        self.pp_group, self.tied_group = pp_group, tied_group
        self.num_microbatches = num_microbatches
        self.vocab_parallel = vocab_parallel

        def loss(output, labels):  # the last stage's output (today the logits) -> the micro-batch's loss
            return full_tensor(loss_fn(output, labels))

        if num_chunks == 1:
            self.schedule = Schedule1F1B(self.stages[0], num_microbatches, loss_fn=loss)
        else:
            self.schedule = ScheduleInterleaved1F1B(self.stages, num_microbatches, loss_fn=loss)

    def train_step(self, input_ids: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Forward and backward of [num_microbatches * mbs, S] samples; returns the mean micro-batch
        loss (fp32, detached) on every pipeline rank. Gradients are the mean over micro-batches."""
        losses: list[torch.Tensor] = []
        # The vocab-parallel loss's backward runs inside the schedule: keep loss_parallel on throughout.
        with loss_parallel() if self.vocab_parallel else contextlib.nullcontext():
            self.schedule.step(input_ids if self.is_first else None,
                               target=labels if self.is_last else None, losses=losses)
        self.sync_tied_grads()
        mean = torch.stack([x.detach().float() for x in losses]).mean() if self.is_last else \
            torch.zeros((), dtype=torch.float32, device=input_ids.device)
        dist.broadcast(mean, group=self.pp_group, group_src=dist.get_world_size(self.pp_group) - 1)
        return mean

    @torch.no_grad()
    def eval_loss(self, input_ids: torch.Tensor, labels: torch.Tensor,
                  ignore_index: int = IGNORE_INDEX) -> tuple[torch.Tensor, torch.Tensor]:
        """Forward only: (sum of token losses, number of trained tokens) of [num_microbatches * mbs, S]
        samples, on every pipeline rank (for validation)."""
        losses: list[torch.Tensor] = []
        with loss_parallel() if self.vocab_parallel else contextlib.nullcontext():
            self.schedule.eval(input_ids if self.is_first else None,
                               target=labels if self.is_last else None, losses=losses)
        counts = (labels != ignore_index).reshape(self.num_microbatches, -1).sum(1).to(torch.float32)
        total = torch.zeros((), dtype=torch.float32, device=input_ids.device)
        if self.is_last:  # each micro-batch's loss is its mean over trained tokens
            means = torch.stack([x.detach().float() for x in losses]).to(counts.device)
            total = torch.where(counts > 0, means * counts, torch.zeros_like(means)).sum().to(total.device)
        dist.broadcast(total, group=self.pp_group, group_src=dist.get_world_size(self.pp_group) - 1)
        return total, counts.sum().to(torch.int64)

    def sync_tied_grads(self) -> None:
        """Sum the gradients of the embedding (first stage) and the tied LM head (last stage)."""
        if self.tied_group is None:
            return
        if self.is_first:
            p = self.chunks[0].model.embed_tokens.weight
        elif self.is_last:
            p = self.chunks[-1].lm_head.weight
        else:
            return
        g = p.grad.to_local() if hasattr(p.grad, "to_local") else p.grad
        dist.all_reduce(g, group=self.tied_group)


def tied_embedding_group(mesh) -> Optional[dist.ProcessGroup]:
    """Groups of (first stage, last stage) ranks at equal coordinates elsewhere; this rank's group,
    or None when it is in no such pair. Every rank must call this (new_group is collective)."""
    ranks = mesh.mesh  # [pp, dp_replicate, dp_shard, cp, tp] global ranks
    mine = None
    pairs = torch.stack([ranks[0].flatten(), ranks[-1].flatten()], dim=1).tolist()
    for pair in pairs:
        group = dist.new_group(pair)
        if dist.get_rank() in pair:
            mine = group
    return mine
