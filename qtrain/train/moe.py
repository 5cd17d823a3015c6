"""Mixture-of-experts in training: the load-balancing loss, and the routing metrics of the log
(the loss itself, and each sparse layer's expert load).

Which loss follows from where the coefficient comes from (docs/moe.md):
- `--moe-aux-loss-coeff C` (Megatron's flag): Megatron-core's loss, per MoE layer, each layer's
  C * loss attached to its output (qtrain.models.moe_aux); works under PP, TP, EP, FSDP, CP, recompute.
- no flag: what transformers trains with, the config's router_aux_loss_coef when its
  output_router_logits is true, else 0 (the released Qwen3-MoE configs say false), with
  transformers' formula pooled over all layers (qtrain.models.moe.load_balancing_loss), added
  to each micro-batch's loss.
The logged "lm loss" stays the token loss alone, as Megatron logs it. Expert load: token copies
each expert received, summed over the data-parallel ranks and the iterations since the last log;
reported per sparse layer as max / mean over experts (1.0 = perfectly balanced, num_experts /
top_k = every token to the same experts).
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.distributed as dist

from qtrain.errors import ConfigError

TRANSFORMERS, MEGATRON = "transformers", "megatron"


def aux_loss_coeff(flag: Optional[float], model_cfg) -> float:
    """--moe-aux-loss-coeff, or transformers' default for this config."""
    if flag is not None:
        if flag < 0:
            raise ConfigError(f"--moe-aux-loss-coeff {flag}: must be >= 0")
        return float(flag)
    return float(model_cfg.router_aux_loss_coef) if model_cfg.output_router_logits else 0.0


def aux_loss_formula(flag: Optional[float]) -> str:
    """Megatron's per-layer loss when the coefficient is Megatron's flag, else transformers'."""
    return MEGATRON if flag is not None else TRANSFORMERS


class MoeTraining:
    """The load-balancing loss of one formula (TRANSFORMERS: added to each micro-batch's loss by
    `extra_loss`; MEGATRON: attached inside each experts block, see `begin_step`), and the routing
    metrics."""

    def __init__(self, coeff: float, num_experts: int, formula: str = TRANSFORMERS):
        if formula not in (TRANSFORMERS, MEGATRON):
            raise ConfigError(f"load-balancing loss formula {formula!r}: expected {TRANSFORMERS} or {MEGATRON}")
        self.coeff, self.num_experts, self.formula = coeff, num_experts, formula
        self._aux_sum: Optional[torch.Tensor] = None
        self._micro_batches = 0
        self._loads: Optional[torch.Tensor] = None  # [sparse layers held here, E], int64
        self._layers: list = []  # MEGATRON: the LayerAuxLoss of each experts block held here, in order

    def begin_step(self, model: torch.nn.Module, num_microbatches: int, pipeline: bool, cp_group=None) -> None:
        """Before a step's forwards. MEGATRON: give each experts block its LayerAuxLoss (once; the
        context-parallel group, if any, to sum the expert counts over) and the main loss's
        per-micro-batch gradient scale (the pipeline schedule divides gradients by num_microbatches
        itself; the plain loop divides each micro-batch's loss)."""
        if self.formula != MEGATRON:
            return
        if not self._layers:
            from qtrain.models.moe import Qwen3MoeSparseMoeBlock
            from qtrain.models.moe_aux import LayerAuxLoss

            for m in model.modules():
                if isinstance(m, Qwen3MoeSparseMoeBlock):
                    m.aux_loss = LayerAuxLoss(self.coeff, cp_group)
                    self._layers.append(m.aux_loss)
        for layer in self._layers:
            layer.begin_step(1.0 if pipeline else 1.0 / num_microbatches, num_microbatches)

    def extra_loss(self, model: torch.nn.Module) -> Optional[torch.Tensor]:
        """After a micro-batch's forward: the term to add to its loss (None when the coefficient is
        0, or with MEGATRON, whose loss the blocks attach), recording the aux loss and the expert
        loads for the log."""
        if self.formula == MEGATRON:
            return None
        stats = model.router_stats()
        if not stats:
            return None
        self.record_loads(stats)
        from qtrain.models.moe import load_balancing_loss

        aux = load_balancing_loss(stats, self.num_experts)
        self._aux_sum = aux.detach().float() if self._aux_sum is None else self._aux_sum + aux.detach().float()
        self._micro_batches += 1
        return self.coeff * aux if self.coeff else None

    def record_loads(self, stats) -> None:
        counts = torch.stack([s.counts for s in stats])
        self._loads = counts if self._loads is None else self._loads + counts

    def _take_layers(self) -> None:
        """MEGATRON: the blocks' records -> the sum over this rank's layers of each micro-batch's
        loss (summed over micro-batches), and the loads."""
        taken = [layer.take() for layer in self._layers]
        if not taken or taken[0][2] == 0:
            return
        self._aux_sum = torch.stack([loss for loss, _, _ in taken]).sum()
        self._micro_batches = taken[0][2]
        self._loads = torch.stack([counts for _, counts, _ in taken])

    def take_metrics(self, group=None, pp_group=None, device: Optional[torch.device] = None) -> dict:
        """{"load_balancing_loss": mean over micro-batches and ranks, "expert_load_max_over_mean":
        [per sparse layer]} since the last call (collective over `group`, and with MEGATRON over
        `pp_group`: the loss sums the layers of every stage, the loads list every stage's layers,
        stage by stage, on `device`); {} if nothing was routed."""
        if self.formula == MEGATRON:
            self._take_layers()
            if pp_group is not None:
                return self._take_metrics_pipeline(group, pp_group, device or torch.device("cpu"))
        out: dict = {}
        if self._aux_sum is not None:
            pair = torch.stack([self._aux_sum, torch.tensor(float(self._micro_batches), device=self._aux_sum.device)])
            if dist.is_initialized():
                dist.all_reduce(pair, group=group)
            out["load_balancing_loss"] = float(pair[0] / pair[1])
        if self._loads is not None:
            loads = self._loads.double()
            if dist.is_initialized():
                dist.all_reduce(loads, group=group)
            mean = loads.mean(-1).clamp_min(1e-12)
            out["expert_load_max_over_mean"] = [round(float(x), 4) for x in loads.max(-1).values / mean]
        self._aux_sum, self._micro_batches, self._loads = None, 0, None
        return out

    def _take_metrics_pipeline(self, group, pp_group, device: torch.device) -> dict:
        """take_metrics under PP: every stage joins the collectives, also one without MoE layers."""
        pair = torch.zeros(2, dtype=torch.float64, device=device)
        if self._aux_sum is not None:
            pair[0], pair[1] = self._aux_sum.double(), float(self._micro_batches)
        dist.all_reduce(pair, group=group)  # data-parallel ranks: their sums and micro-batch counts
        total = pair[:1].clone()
        dist.all_reduce(total, group=pp_group)  # stages: the layers add up
        dist.all_reduce(pair, op=dist.ReduceOp.MAX, group=pp_group)  # the count, from a stage with MoE layers
        loads = []
        if self._loads is not None:
            local = self._loads.to(device, torch.float64)
            dist.all_reduce(local, group=group)
            loads = [round(float(x), 4) for x in local.max(-1).values / local.mean(-1).clamp_min(1e-12)]
        stages: list = [None] * dist.get_world_size(pp_group)
        dist.all_gather_object(stages, loads, group=pp_group)
        self._aux_sum, self._micro_batches, self._loads = None, 0, None
        out: dict = {"load_balancing_loss": float(total[0] / pair[1])} if pair[1] > 0 else {}
        if any(stages):
            out["expert_load_max_over_mean"] = [x for stage in stages for x in stage]
        return out


def moe_training(cfg, model_cfg, objective: Optional[object] = None) -> Optional[MoeTraining]:
    """What the loop adds for an MoE model (None for a dense one), refusing by name what qtrain
    does not do: transformers' pooled loss under pipeline parallelism (it pools the routing of all
    layers, which no pipeline stage sees) or context parallelism, and the loss in preference
    training."""
    flag = cfg.moe.moe_aux_loss_coeff
    if not model_cfg.is_moe:
        if flag is not None:
            raise ConfigError("--moe-aux-loss-coeff is set, but the model is dense (num_experts 0)")
        return None
    coeff, formula = aux_loss_coeff(flag, model_cfg), aux_loss_formula(flag)
    if formula == TRANSFORMERS and cfg.parallel.pipeline_model_parallel_size > 1:
        if coeff:
            raise ConfigError(
                f"the model config's router_aux_loss_coef {coeff} with output_router_logits true asks for "
                f"transformers' load-balancing loss, which pools the routing of every layer and is not "
                f"implemented with --pipeline-model-parallel-size > 1; pass --moe-aux-loss-coeff C for "
                f"Megatron's per-layer loss (docs/moe.md), or set output_router_logits false")
        return None  # nothing to add; the routing metrics are not collected there either
    where = ("preference training (qtrain dpo)" if objective is not None
             else "--context-parallel-size > 1 (each rank would pool only its slice of the sequence; "
             "--moe-aux-loss-coeff C gives Megatron's per-layer loss, which works there)"
             if formula == TRANSFORMERS and cfg.parallel.context_parallel_size > 1 else None)
    if where is not None:
        if coeff:
            source = "--moe-aux-loss-coeff" if flag is not None else "router_aux_loss_coef"
            name = "Megatron-core's" if formula == MEGATRON else "transformers'"
            raise ConfigError(f"{source} {coeff}: the MoE load-balancing loss ({name} formula) is not implemented "
                              f"with {where}; set --moe-aux-loss-coeff 0 (or leave the model config's "
                              f"output_router_logits false)")
        return None  # nothing to add; the routing metrics are not collected there either
    return MoeTraining(coeff, model_cfg.num_experts, formula)


def describe(moe: Optional[MoeTraining]) -> Optional[str]:
    """The startup log's words for the load-balancing loss in use."""
    if moe is None:
        return None
    if moe.formula == TRANSFORMERS and not moe.coeff:
        return ("load-balancing loss: none (the model config's output_router_logits is false or its "
                "router_aux_loss_coef 0; --moe-aux-loss-coeff C adds Megatron-core's per-layer loss)")
    if moe.formula == MEGATRON:
        return (f"load-balancing loss: Megatron-core's per-layer switch loss (from --moe-aux-loss-coeff), "
                f"coefficient {moe.coeff} per MoE layer")
    return (f"load-balancing loss: transformers' pooled loss (the model config's router_aux_loss_coef with "
            f"output_router_logits), coefficient {moe.coeff}")
