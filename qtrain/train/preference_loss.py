"""Preference losses of `qtrain dpo`, per pair, from sequence log-probabilities: DPO (sigmoid, hinge,
IPO), SimPO and ORPO, with the rewards and metrics TRL and LLaMA-Factory report.

A pair is a chosen and a rejected answer to one prompt. `logps` below is a sequence's summed
log-probability of its answer tokens (the labels that are not -100), or their mean for IPO,
SimPO and ORPO (MindSpeed-LLM, LLaMA-Factory and TRL normalise those by length). Per pair:

  DPO (Rafailov et al. 2023, arXiv:2305.18290), logits = (pc - pr) - (rc - rr), p policy, r reference:
    sigmoid  -(1 - e) log s(b logits) - e log s(-b logits)   e = --dpo-label-smoothing (cDPO,
             Mitchell 2023; e = 0 is the paper's loss, TRL's "sigmoid")
    hinge    max(0, 1 - b logits)                               (SLiC, Zhao et al. 2023)
    ipo      (logits - 1 / (2 b))^2, mean log-probs           (Azar et al. 2023, arXiv:2310.12036 eq. 17)
    rewards  b (pc - rc), b (pr - rr)
  SimPO (Meng et al. 2024, arXiv:2405.14734), no reference, mean log-probs:
    logits = (pc - pr) - g / b (MindSpeed-LLM's --gamma-beta-ratio is g / b), then the same three
    loss types with b = --simpo-beta; rewards b pc, b pr
  ORPO (Hong et al. 2024, arXiv:2403.07691), no reference, mean log-probs, l = --orpo-lambda:
    log_odds = (pc - pr) - (log(1 - exp pc) - log(1 - exp pr))
    loss = -pc - l log s(log_odds)            (eq. 6-7: the chosen answer's mean NLL + l x the odds-ratio term)
    rewards l pc, l pr

`--pref-ftx f` adds f x (-mean log-prob of the chosen answer) to every pair's loss (MindSpeed-LLM's and
LLaMA-Factory's SFT term). The loss of a micro-batch is the mean over its pairs.

Metrics (per pair, averaged when logged): rewards/chosen, rewards/rejected, rewards/accuracies
(chosen reward > rejected reward), rewards/margins, logps/chosen, logps/rejected (the log-probs the
loss used: summed, or mean for IPO/SimPO/ORPO), and for ORPO nll_loss, log_odds_ratio (log s(log_odds)),
log_odds_chosen (log_odds), as TRL names them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from qtrain.errors import ConfigError

PREF_LOSSES = ("dpo", "simpo", "orpo")
LOSS_TYPES = ("sigmoid", "hinge", "ipo")
METRICS = ("rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins", "logps/chosen",
           "logps/rejected")
ORPO_METRICS = ("nll_loss", "log_odds_ratio", "log_odds_chosen")


@dataclass(frozen=True)
class PreferenceLoss:
    """Which loss and its parameters. `beta`: DPO's beta, SimPO's beta or ORPO's lambda;
    `margin`: SimPO's gamma / beta."""

    kind: str = "dpo"
    loss_type: str = "sigmoid"
    beta: float = 0.1
    label_smoothing: float = 0.0
    margin: float = 0.0
    ftx: float = 0.0

    def __post_init__(self) -> None:
        if self.kind not in PREF_LOSSES:
            raise ConfigError(f"--pref-loss {self.kind}: choose one of {', '.join(PREF_LOSSES)}")
        if self.loss_type not in LOSS_TYPES:
            raise ConfigError(f"loss type {self.loss_type}: choose one of {', '.join(LOSS_TYPES)}")
        if self.beta <= 0:
            raise ConfigError(f"the {self.kind} beta (or ORPO's lambda) must be positive, got {self.beta}")
        if not 0 <= self.label_smoothing < 0.5:
            raise ConfigError(f"label smoothing must be in [0, 0.5), got {self.label_smoothing}")
        if self.label_smoothing and (self.kind == "orpo" or self.loss_type != "sigmoid"):
            raise ConfigError(f"label smoothing applies to the sigmoid loss only (--pref-loss {self.kind}, loss "
                              f"type {self.loss_type}); drop it")
        if self.kind == "orpo" and self.loss_type != "sigmoid":
            raise ConfigError("--pref-loss orpo has one loss (the odds ratio's log-sigmoid); drop the loss type")
        if self.ftx < 0:
            raise ConfigError(f"--pref-ftx must be >= 0, got {self.ftx}")

    @property
    def needs_reference(self) -> bool:
        return self.kind == "dpo"

    @property
    def mean_logps(self) -> bool:
        """Whether the loss reads each answer's mean log-prob (else its sum)."""
        return self.kind != "dpo" or self.loss_type == "ipo"

    @property
    def metric_names(self) -> tuple[str, ...]:
        return METRICS + (ORPO_METRICS if self.kind == "orpo" else ())


def sequence_logps(sums: torch.Tensor, counts: torch.Tensor, mean: bool) -> torch.Tensor:
    """Summed answer log-probs, or their mean over the answer tokens (0 for an empty answer)."""
    return sums / counts.clamp(min=1) if mean else sums


def log1mexp(x: torch.Tensor) -> torch.Tensor:
    """log(1 - exp(x)) for x <= 0 without cancellation (Maechler 2012: switch at -log 2)."""
    return torch.where(x < -math.log(2), torch.log1p(-torch.exp(x)), torch.log(-torch.expm1(x)))


def _margin_loss(cfg: PreferenceLoss, logits: torch.Tensor) -> torch.Tensor:
    b, e = cfg.beta, cfg.label_smoothing
    if cfg.loss_type == "sigmoid":
        return -F.logsigmoid(b * logits) * (1 - e) - F.logsigmoid(-b * logits) * e
    if cfg.loss_type == "hinge":
        return torch.relu(1 - b * logits)
    return (logits - 1 / (2 * b)) ** 2


def pair_losses(cfg: PreferenceLoss, chosen: torch.Tensor, rejected: torch.Tensor,
                ref_chosen: torch.Tensor | None = None, ref_rejected: torch.Tensor | None = None,
                chosen_mean: torch.Tensor | None = None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """(loss per pair [P], metrics per pair {name: [P]}, detached) from the log-probs the loss reads
    (`PreferenceLoss.mean_logps`); `chosen_mean`: the chosen answers' mean log-probs, needed for
    --pref-ftx when the loss reads sums (default: `chosen`)."""
    chosen_mean = chosen if chosen_mean is None else chosen_mean
    extra: dict[str, torch.Tensor] = {}
    if cfg.kind == "dpo":
        if ref_chosen is None or ref_rejected is None:
            raise ValueError("DPO needs the reference model's log-probs")
        logits = (chosen - rejected) - (ref_chosen - ref_rejected)
        losses = _margin_loss(cfg, logits)
        reward_c, reward_r = cfg.beta * (chosen - ref_chosen), cfg.beta * (rejected - ref_rejected)
    elif cfg.kind == "simpo":
        losses = _margin_loss(cfg, (chosen - rejected) - cfg.margin)
        reward_c, reward_r = cfg.beta * chosen, cfg.beta * rejected
    else:  # orpo
        log_odds = (chosen - rejected) - (log1mexp(chosen) - log1mexp(rejected))
        ratio = F.logsigmoid(log_odds)
        nll = -chosen
        losses = nll - cfg.beta * ratio
        reward_c, reward_r = cfg.beta * chosen, cfg.beta * rejected
        extra = {"nll_loss": nll, "log_odds_ratio": ratio, "log_odds_chosen": log_odds}
    if cfg.ftx > 0:
        losses = losses + cfg.ftx * -chosen_mean
    reward_c, reward_r = reward_c.detach(), reward_r.detach()
    metrics = {"rewards/chosen": reward_c, "rewards/rejected": reward_r,
               "rewards/accuracies": (reward_c > reward_r).float(), "rewards/margins": reward_c - reward_r,
               "logps/chosen": chosen.detach(), "logps/rejected": rejected.detach(),
               **{k: v.detach() for k, v in extra.items()}}
    return losses, metrics
