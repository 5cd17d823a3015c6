"""Pipeline parallelism with torch.distributed.pipelining, stages built by hand.

The meta-device model is copied once per local (virtual) stage and each copy keeps only its
layers, in a ModuleDict keyed by the global layer index: parameter names stay HF names
(`model.layers.17.mlp.up_proj.weight`), so a checkpoint written under PP loads under any
other layout. The first stage keeps the embedding, the last the final norm and LM head and
computes the loss there, from its hidden states: the labels reach the last stage as a keyword
argument and the model's chunked LM-head loss returns the micro-batch's summed token loss
(qtrain.ops.linear_cross_entropy; vocab-parallel under TP), so the logits never exist and the
stage's output is one number per micro-batch. Schedules: 1F1B, or interleaved 1F1B with virtual stages
(--num-layers-per-virtual-pipeline-stage; chunk v of rank p is stage v*PP + p, as Megatron).

Tied embeddings: the first stage's embedding and the last stage's LM head are two copies of
one weight. They start equal (loaded from the same tensor); after each backward their
gradients are summed between the two stages (`sync_tied_grads`), so the optimizer keeps them
equal, as Megatron's embedding group does.
"""

from __future__ import annotations

import copy
from typing import Optional

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.pipelining import PipelineStage, Schedule1F1B, ScheduleInterleaved1F1B

from qtrain.labels import IGNORE_INDEX


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


def _loss_as_vector(module, args, output):  # noqa: ARG001
    """Forward hook of the last chunk: its loss sum as shape [1], so that the schedule, which
    concatenates the last stage's outputs along dim 0 after the step, can. (Per-token losses,
    [rows, S], already can.)"""
    return output.reshape(1) if output.ndim == 0 else output


class Pipeline:
    """Runs one optimizer step's micro-batches through the schedule on this rank."""

    def __init__(self, chunks: list[nn.Module], stages: list[list[list[int]]], pp_group, device: torch.device,
                 num_microbatches: int, tied_group: Optional[dist.ProcessGroup]) -> None:
        pp, pp_rank = dist.get_world_size(pp_group), dist.get_rank(pp_group)
        num_chunks = len(stages[0])
        self.chunks = chunks
        self.stages = [PipelineStage(c, v * pp + pp_rank, pp * num_chunks, device, group=pp_group)
                       for v, c in enumerate(chunks)]
        self.is_first, self.is_last = pp_rank == 0, pp_rank == pp - 1
        self.pp_group, self.tied_group = pp_group, tied_group
        self.num_microbatches = num_microbatches
        self._sum_losses = False  # eval_loss wants each micro-batch's loss sum, training its mean
        self._objective_loss = None  # run_objective's loss function while it runs
        self.inputs: dict[str, torch.Tensor] = {}  # per-row model inputs beside the tokens (see _run)
        self._cp_scale = 0  # train_step under CP: the CP degree while the target holds whole-row token counts
        if self.is_last:
            chunks[-1].register_forward_hook(_loss_as_vector)
        if num_chunks == 1:
            self.schedule = Schedule1F1B(self.stages[0], num_microbatches, loss_fn=self._loss)
        else:
            self.schedule = ScheduleInterleaved1F1B(self.stages, num_microbatches, loss_fn=self._loss)

    def _loss(self, loss_sum: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """The schedule's loss_fn: the last stage's output (its micro-batch's summed token loss) ->
        the mean over the micro-batch's trained tokens (0, not NaN, without any), or the sum."""
        if self._objective_loss is not None:
            return self._objective_loss(loss_sum, labels)
        if self._sum_losses:
            return loss_sum.sum()
        if self._cp_scale:  # context parallel: this slice's sum over the whole micro-batch's count
            return loss_sum.sum() * self._cp_scale / labels.sum().clamp(min=1)
        return loss_sum.sum() / (labels != IGNORE_INDEX).sum().clamp(min=1)

    def _run(self, run, input_ids: torch.Tensor, labels: torch.Tensor, reduction: str = "sum",
             target: Optional[torch.Tensor] = None) -> list[torch.Tensor]:
        """schedule.step or .eval over [num_microbatches * mbs, S] samples; the last stage's losses.
        The labels go to the model as well as to the loss: every chunk of the last rank receives
        them (chunks without the LM head ignore them) and the last stage returns the loss sum
        (or, reduction "none", the per-token losses). The loss function's target: the labels, or
        `target` (split by micro-batch along dim 0 like them). `self.inputs` (position_ids, cu_seqlens of
        packed documents) go to every stage, split the same way."""
        losses: list[torch.Tensor] = []
        model_kwargs = {"labels": labels, "loss_reduction": reduction} if self.is_last else {}
        model_kwargs |= self.inputs
        run(input_ids if self.is_first else None, target=(labels if target is None else target) if self.is_last
            else None, losses=losses, **model_kwargs)
        return losses

    def run_objective(self, input_ids: torch.Tensor, labels: torch.Tensor, target: torch.Tensor, loss_fn,
                      train: bool = True) -> list[torch.Tensor]:
        """One schedule (step, or eval when not `train`) whose last stage returns per-token losses
        [rows, S] and `loss_fn(per_token_losses, target of the micro-batch)` gives each micro-batch's
        loss (e.g. preference training's, qtrain.train.preference). Returns the last stage's
        losses (empty elsewhere); gradients, when training, are the mean over micro-batches."""
        self._objective_loss = loss_fn
        try:
            losses = self._run(self.schedule.step if train else self.schedule.eval, input_ids, labels, "none", target)
        finally:
            self._objective_loss = None
        if train:
            self.sync_tied_grads()
        return losses

    def from_last_stage(self, value: torch.Tensor) -> torch.Tensor:
        """`value` of the last stage on every pipeline rank (a tensor of the same shape elsewhere)."""
        dist.broadcast(value, group=self.pp_group, group_src=dist.get_world_size(self.pp_group) - 1)
        return value

    def train_step(self, input_ids: torch.Tensor, labels: torch.Tensor, row_tokens: Optional[torch.Tensor] = None,
                   cp: int = 1) -> torch.Tensor:
        """Forward and backward of [num_microbatches * mbs, S] samples; returns the mean micro-batch
        loss (fp32, detached) on every pipeline rank. Gradients are the mean over micro-batches.
        Under context parallel (`cp` > 1) the samples are this rank's slices and `row_tokens` [rows]
        each whole row's trained tokens: a micro-batch's loss is its slice's sum over the whole
        count, times CP (FSDP averages the gradients over the CP ranks)."""
        self._cp_scale = cp if row_tokens is not None else 0
        try:
            losses = self._run(self.schedule.step, input_ids, labels, target=row_tokens)
        finally:
            self._cp_scale = 0
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
        self._sum_losses = True
        try:
            losses = self._run(self.schedule.eval, input_ids, labels)
        finally:
            self._sum_losses = False
        total = torch.zeros((), dtype=torch.float32, device=input_ids.device)
        if self.is_last:
            total = torch.stack([x.detach().float() for x in losses]).sum().to(total.device)
        dist.broadcast(total, group=self.pp_group, group_src=dist.get_world_size(self.pp_group) - 1)
        return total, (labels != ignore_index).sum().to(torch.int64)

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
