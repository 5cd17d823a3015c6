"""Preference training's step loss (`qtrain dpo`): sequence log-probabilities of chosen and rejected
answers, the reference model's, and the pair loss of qtrain.train.preference_loss, on every layout.

A micro-batch of MBS pairs ([MBS, 2, S], qtrain.data.pairwise_dataset) becomes 2 x MBS rows, the
chosen answers first, and goes through the model in one forward: the model's chunked LM-head loss
returns each token's negative log-probability (`loss_reduction="none"`, no logits, vocab-parallel
under TP), summed per row into the answer's log-probability. Then:

- the reference log-probabilities (DPO only) come from `Reference`: the same model with its LoRA
  adapters switched off (`AdaptersOff`), or a frozen copy laid out like the policy
  (`FrozenCopy`), always forward-only under no_grad, before the policy's forward;
- context parallel: each rank holds 1/CP of every row; the row sums are summed over the CP group
  by an all-reduce whose backward is an all-reduce too (each rank's tokens get CP x the pair's
  gradient, which FSDP's average over the dp x cp ranks turns back into the gradient);
- pipeline parallel: the schedule carries the rows; the last stage's loss function gets the
  per-token losses and, as the schedule's target, each row's reference log-prob and answer
  length (`Pipeline.run_objective`); the reference copy runs its own pipeline, forward only.

The step's loss is each micro-batch's mean over its pairs, averaged over micro-batches and data-
parallel ranks (as MindSpeed-LLM's DPO trainer averages its loss). Metrics are summed per pair on
the device and reduced when the loop logs (`take_metrics`).
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.distributed as dist

from qtrain.labels import IGNORE_INDEX
from qtrain.parallel import ParallelState
from qtrain.train.pair_packing import pack_pairs
from qtrain.train.preference_loss import PreferenceLoss, pair_losses, sequence_logps
from qtrain.train.step import Batch, model_inputs


def pair_rows(batch: Batch) -> Batch:
    """[MBS, 2, S] pairs -> [2 x MBS, S] rows: the chosen answers, then the rejected ones."""
    return {k: batch[k].transpose(0, 1).reshape(-1, batch[k].shape[-1]) for k in ("input_ids", "labels")}


class _SumOverGroup(torch.autograd.Function):
    """all_reduce(SUM) whose backward is all_reduce(SUM) of the gradient (see the module doc, CP)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, group) -> torch.Tensor:
        ctx.group = group
        out = x.clone()
        dist.all_reduce(out, group=group)
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        grad = grad.clone()
        dist.all_reduce(grad, group=ctx.group)
        return grad, None


def row_logps(per_token_loss: torch.Tensor, labels: torch.Tensor, state: ParallelState,
              slots: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(summed answer log-probs [R], answer tokens [R]) of rows whose per-token losses (negative
    log-probs, 0 on ignored labels) are [R, S_local], summed over context-parallel ranks. With
    `slots` (packed pairs, qtrain.train.pair_packing: each token's sequence, -1 on padding) the
    sums are per sequence [2 x pairs] instead of per row."""
    answer = (labels != IGNORE_INDEX)
    if slots is None:
        sums = -per_token_loss.sum(-1)
        counts = answer.sum(-1).to(sums.dtype)
    else:
        slots = slots.to(per_token_loss.device)
        n, keep = int(slots.max()) + 1, slots >= 0
        sums = torch.zeros(n, dtype=per_token_loss.dtype, device=per_token_loss.device).index_add(
            0, slots[keep], -per_token_loss[keep])
        counts = torch.zeros(n, dtype=sums.dtype, device=sums.device).index_add(
            0, slots[keep], answer[keep].to(sums.dtype))
    if state.cp_group is not None:
        sums = _SumOverGroup.apply(sums, state.cp_group)
        dist.all_reduce(counts, group=state.cp_group)
    return sums, counts


class Reference:
    """Where the reference log-probabilities come from (subclasses); all forward-only, no_grad."""

    def row_logps(self, policy: torch.nn.Module, state: ParallelState, rows: Batch,
                  device: torch.device, slots: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Summed answer log-probs [R] of the (context-sharded) rows (per sequence with `slots`)."""
        raise NotImplementedError

    def pipeline_row_logps(self, input_ids: torch.Tensor, labels: torch.Tensor) -> Optional[torch.Tensor]:
        """[num_microbatches x R] summed log-probs on the last pipeline stage (None elsewhere)."""
        raise NotImplementedError


def _forward_row_logps(model, state, rows, device, slots=None) -> torch.Tensor:
    labels = rows["labels"].to(device, non_blocking=True)
    with torch.no_grad():
        per_token = model(**model_inputs(rows, device), labels=labels, loss_reduction="none")
        return row_logps(per_token, labels, state, slots)[0]


class AdaptersOff(Reference):
    """The policy itself with its LoRA adapters switched off: the frozen base model (TRL's and
    LLaMA-Factory's reference for adapter training). No extra weights."""

    def row_logps(self, policy, state, rows, device, slots=None):
        from qtrain.train.lora import adapters_disabled

        with adapters_disabled(policy):
            return _forward_row_logps(policy, state, rows, device, slots)


class FrozenCopy(Reference):
    """A second model with the reference weights, laid out like the policy (same mesh, TP/PP/FSDP
    sharding), never trained: weights only, in the compute dtype."""

    def __init__(self, model: torch.nn.Module, state: ParallelState):
        self.model, self.state = model, state
        model.eval()
        for p in model.parameters():
            p.requires_grad_(False)

    def row_logps(self, policy, state, rows, device, slots=None):  # noqa: ARG002
        return _forward_row_logps(self.model, state, rows, device, slots)

    def pipeline_row_logps(self, input_ids, labels):
        with torch.no_grad():
            losses = self.state.pipeline.run_objective(input_ids, labels, labels, _pipeline_row_sums, train=False)
        return torch.cat(losses) if losses else None


def _pipeline_row_sums(per_token_loss: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    return -per_token_loss.sum(-1)


class PreferenceObjective:
    """The step loss of preference training (train.step's `objective`): `micro_batch_loss` on the
    plain path, `pipeline_loss` under PP; `take_metrics` when the loop logs, `validation` when it
    validates (the LoopHooks objective)."""

    sequences_per_sample = 2  # a pair trains its chosen and its rejected sequence

    def __init__(self, loss: PreferenceLoss, reference: Optional[Reference] = None, pack_pairs: bool = False):
        """`reference`: needed by DPO (it may be set later, before the first step); `pack_pairs`:
        a micro-batch's sequences packed into as few rows as fit (qtrain.train.pair_packing)."""
        self.loss, self.reference = loss, reference if loss.needs_reference else None
        self.pack_pairs = pack_pairs
        self.names = ("pairs", "loss") + loss.metric_names
        self._sums: dict[str, torch.Tensor] = {}  # "train" / "eval": per-pair sums of self.names
        self.mode = "train"

    # ---------------------------------------------------------------- the pair loss

    def pair_loss(self, sums: torch.Tensor, counts: torch.Tensor,
                  ref_sums: Optional[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """(mean pair loss, the metrics' per-pair sums to `record`) of 2P rows' summed log-probs
        (chosen rows first)."""
        if self.loss.needs_reference and ref_sums is None:
            raise ValueError(f"--pref-loss {self.loss.kind} needs the reference model's log-probs")
        mean = self.loss.mean_logps
        logps = sequence_logps(sums, counts, mean)
        chosen, rejected = logps.chunk(2)
        chosen_mean = sequence_logps(sums, counts, True).chunk(2)[0]
        ref_c = ref_r = None
        if ref_sums is not None:
            ref_c, ref_r = sequence_logps(ref_sums.to(sums.dtype), counts, mean).chunk(2)
        losses, metrics = pair_losses(self.loss, chosen, rejected, ref_c, ref_r, chosen_mean)
        values = torch.stack([torch.tensor(float(len(losses)), device=losses.device), losses.detach().sum()]
                             + [metrics[n].sum() for n in self.names[2:]]).double()
        return losses.mean(), values

    def _record(self, values: torch.Tensor) -> None:
        acc = self._sums.get(self.mode)
        self._sums[self.mode] = values if acc is None else acc + values

    # ---------------------------------------------------------------- the step

    def micro_batch_loss(self, model: torch.nn.Module, state: ParallelState, batch: Batch,
                         device: torch.device) -> torch.Tensor:
        """The loss of one micro-batch of pairs (this rank's context-parallel slice of its rows)."""
        rows, slots = pack_pairs(batch) if self.pack_pairs else (pair_rows(batch), None)
        rows = state.prepare_batch(rows)
        ref = self.reference.row_logps(model, state, rows, device, slots) if self.loss.needs_reference else None
        labels = rows["labels"].to(device, non_blocking=True)
        per_token = model(**model_inputs(rows, device), labels=labels, loss_reduction="none")
        sums, counts = row_logps(per_token, labels, state, slots)
        loss, values = self.pair_loss(sums, counts, ref)
        self._record(values)
        return loss

    def pipeline_loss(self, state: ParallelState, micro_batches: Sequence[Batch], device: torch.device,
                      train: bool = True) -> torch.Tensor:
        """The schedule over all micro-batches; returns the mean micro-batch loss on every rank."""
        rows = [pair_rows(b) for b in micro_batches]
        input_ids = torch.cat([r["input_ids"] for r in rows]).to(device)
        labels = torch.cat([r["labels"] for r in rows]).to(device)
        pipeline = state.pipeline
        ref = self.reference.pipeline_row_logps(input_ids, labels) if self.loss.needs_reference else None
        target = None
        if pipeline.is_last:
            counts = (labels != IGNORE_INDEX).sum(-1).float()
            target = torch.stack([ref if ref is not None else torch.zeros_like(counts), counts], dim=1)
        self._pipeline_values: list[torch.Tensor] = []
        losses = pipeline.run_objective(input_ids, labels, target, self._pipeline_pair_loss, train=train)
        mean = torch.zeros((), dtype=torch.float32, device=device)
        if pipeline.is_last:
            mean = torch.stack([x.detach().float() for x in losses]).mean().to(device)
            # The schedule's own micro-batches are the last calls (torch may call the loss once before
            # them, to infer gradient shapes).
            for values in self._pipeline_values[-len(micro_batches):]:
                self._record(values)
        return pipeline.from_last_stage(mean)

    def _pipeline_pair_loss(self, per_token_loss: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        ref = target[:, 0] if self.loss.needs_reference else None
        loss, values = self.pair_loss(-per_token_loss.sum(-1), target[:, 1], ref)
        self._pipeline_values.append(values)
        return loss

    @torch.no_grad()
    def validation(self, model: torch.nn.Module, state: ParallelState, valid_ds, eval_index: int, eval_iters: int,
                   batch, device: torch.device) -> tuple[float, dict[str, float]]:
        """(mean pair loss, mean metrics) over `eval_iters` global batches of validation pairs from
        block `eval_index` (as train.validation reads them), the same on every rank."""
        from qtrain.data.sampler import ResumableLoader

        start = eval_index * eval_iters * batch.global_batch_size
        loader = ResumableLoader(valid_ds, batch.micro_batch_size, state.dp_rank, state.dp_size,
                                 consumed_samples=start, vocab_size=model.config.vocab_size)
        model.eval()
        self.mode = "eval"
        try:
            for _ in range(eval_iters):
                micro_batches = [next(loader) for _ in range(batch.num_microbatches)]
                if state.pipeline is not None:
                    self.pipeline_loss(state, micro_batches, device, train=False)
                else:
                    for b in micro_batches:
                        self.micro_batch_loss(model, state, b, device)
        finally:
            model.train()
            self.mode = "train"
        metrics = self.take_metrics(device, "eval")
        return metrics.pop("loss", float("nan")), metrics

    # ---------------------------------------------------------------- metrics

    def take_metrics(self, device: torch.device, mode: str = "train") -> dict[str, float]:
        """The metrics recorded since the last call, averaged over every pair of every rank
        (collective: all ranks call it). Ranks that computed no pair loss (pipeline stages
        before the last) add zeros; ranks that computed the same pairs (TP, CP) weigh alike."""
        acc = self._sums.pop(mode, None)
        values = acc.to(device) if acc is not None else torch.zeros(len(self.names), dtype=torch.float64,
                                                                    device=device)
        if dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(values)
        pairs = float(values[0])
        if pairs == 0:
            return {}
        return {name: float(v) / pairs for name, v in zip(self.names[1:], values[1:])}
