"""Mixture-of-experts in training: the load-balancing loss added to each micro-batch's loss, and the
routing metrics of the log (the loss itself, and each sparse layer's expert load).

The loss is transformers' (qtrain.models.moe.load_balancing_loss) over the micro-batch's tokens on
this rank, times `--moe-aux-loss-coeff`; the logged "lm loss" stays the token loss alone, as
Megatron logs it. By default the coefficient is what transformers trains with: the config's
router_aux_loss_coef when its output_router_logits is true, else 0 (the released Qwen3-MoE configs
say false). Expert load: token copies each expert received, summed over the data-parallel ranks
and the iterations since the last log; reported per sparse layer as max / mean over experts
(1.0 = perfectly balanced, num_experts / top_k = every token to the same experts).
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.distributed as dist

from qtrain.errors import ConfigError


def aux_loss_coeff(flag: Optional[float], model_cfg) -> float:
    """--moe-aux-loss-coeff, or transformers' default for this config."""
    if flag is not None:
        if flag < 0:
            raise ConfigError(f"--moe-aux-loss-coeff {flag}: must be >= 0")
        return float(flag)
    return float(model_cfg.router_aux_loss_coef) if model_cfg.output_router_logits else 0.0


class MoeTraining:
    """Adds coeff * load-balancing loss to each micro-batch's loss; keeps the routing metrics."""

    def __init__(self, coeff: float, num_experts: int):
        self.coeff, self.num_experts = coeff, num_experts
        self._aux_sum: Optional[torch.Tensor] = None
        self._micro_batches = 0
        self._loads: Optional[torch.Tensor] = None  # [sparse layers held here, E], int64

    def extra_loss(self, model: torch.nn.Module) -> Optional[torch.Tensor]:
        """After a micro-batch's forward: the term to add to its loss (None when the coefficient is
        0), recording the aux loss and the expert loads for the log."""
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

    def take_metrics(self, group=None) -> dict:
        """{"load_balancing_loss": mean over micro-batches and ranks, "expert_load_max_over_mean":
        [per sparse layer]} since the last call (collective over `group`); {} if nothing was routed."""
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


def moe_training(cfg, model_cfg, objective: Optional[object] = None) -> Optional[MoeTraining]:
    """What the loop adds for an MoE model (None for a dense one), refusing by name what qtrain
    does not do: the load-balancing loss under pipeline parallelism (transformers' loss pools the
    routing of all layers, which no pipeline stage sees), context parallelism and in preference
    training."""
    flag = cfg.training.moe_aux_loss_coeff
    if not model_cfg.is_moe:
        if flag is not None:
            raise ConfigError("--moe-aux-loss-coeff is set, but the model is dense (num_experts 0)")
        return None
    coeff = aux_loss_coeff(flag, model_cfg)
    where = ("--pipeline-model-parallel-size > 1" if cfg.parallel.pipeline_model_parallel_size > 1
             else "--context-parallel-size > 1 (each rank would pool only its slice of the sequence)"
             if cfg.parallel.context_parallel_size > 1
             else "preference training (qtrain dpo)" if objective is not None else None)
    if where is not None:
        if coeff:
            raise ConfigError(f"--moe-aux-loss-coeff {coeff}: the MoE load-balancing loss is not implemented with "
                              f"{where}; set --moe-aux-loss-coeff 0 (or leave the model config's "
                              f"output_router_logits false)")
        return None  # nothing to add; the routing metrics are not collected there either
    return MoeTraining(coeff, model_cfg.num_experts)
