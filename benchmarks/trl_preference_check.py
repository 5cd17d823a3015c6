"""qtrain's preference losses against TRL's own loss functions, on random log-probabilities (not in CI:
TRL pulls datasets, accelerate and pandas, ~150 MB, for a few formulas; the CI test
tests/train/test_preference.py holds the same formulas written out).

    python -m venv /tmp/trl && /tmp/trl/bin/pip install torch==2.13.0 trl
    PYTHONPATH=. /tmp/trl/bin/python benchmarks/trl_preference_check.py

Compared, per pair, in float64 (loss, chosen and rejected rewards):
- DPO sigmoid (with and without cDPO label smoothing), hinge, IPO: TRL's CPOTrainer.cpo_loss of the
  log-ratios (pc - rc, pr - rr), which is the DPO loss of the paper (TRL 0.x's DPOTrainer.dpo_loss had
  the same body; TRL 1.x's DPOTrainer computes "sigmoid" without label smoothing, inline);
- SimPO: CPOTrainer.cpo_loss with loss_type "simpo" (gamma = margin x beta), label smoothing too;
- ORPO: ORPOTrainer.odds_ratio_loss (its losses are lambda x log s(log_odds); TRL's full loss subtracts
  their mean from the chosen NLL, qtrain's per-pair loss is nll - that term);
writes one line per case and exits 1 if any differs by more than 1e-12 (relative to the largest value;
1e-6 for ORPO, which TRL computes in float32).
"""

from __future__ import annotations

import sys
from types import SimpleNamespace

import torch


def main() -> int:
    import trl
    from trl.experimental.cpo.cpo_trainer import CPOTrainer
    from trl.experimental.orpo.orpo_trainer import ORPOTrainer

    from qtrain.train.preference_loss import PreferenceLoss, pair_losses

    g = torch.Generator().manual_seed(0)
    n = 64
    pc, pr = -torch.rand(n, generator=g, dtype=torch.float64) * 40, -torch.rand(n, generator=g, dtype=torch.float64) * 40
    rc, rr = pc + torch.randn(n, generator=g, dtype=torch.float64), pr + torch.randn(n, generator=g, dtype=torch.float64)
    mc, mr = -torch.rand(n, generator=g, dtype=torch.float64) * 3, -torch.rand(n, generator=g, dtype=torch.float64) * 3
    device = SimpleNamespace(device="cpu")
    worst, failed = 0.0, 0

    def check(name, got, want, tol=1e-12):
        nonlocal worst, failed
        for g_, w_ in zip(got, want):
            err = float((g_.double() - w_.double()).abs().max() / w_.double().abs().max().clamp(min=1e-300))
            worst = max(worst, err)
            if err > tol:
                failed += 1
                print(f"DIFFERS {name}: {err:.3g}")
                return
        print(f"equal   {name}")

    for loss_type, smoothing in (("sigmoid", 0.0), ("sigmoid", 0.2), ("hinge", 0.0), ("ipo", 0.0)):
        beta = 0.3
        cfg = PreferenceLoss("dpo", loss_type, beta, smoothing)
        # IPO reads mean log-probs: the same arrays stand for them here (the averaging is tested in CI).
        ours, m = pair_losses(cfg, pc, pr, rc, rr)
        trl_self = SimpleNamespace(alpha=0.0, beta=beta, loss_type=loss_type, label_smoothing=smoothing,
                                   simpo_gamma=0.0, accelerator=device)
        want = CPOTrainer.cpo_loss(trl_self, pc - rc, pr - rr)
        check(f"dpo {loss_type} label_smoothing={smoothing}", (ours, m["rewards/chosen"], m["rewards/rejected"]), want)
    for loss_type, smoothing in (("sigmoid", 0.0), ("sigmoid", 0.1)):
        beta, ratio = 2.5, 0.55
        ours, m = pair_losses(PreferenceLoss("simpo", loss_type, beta, smoothing, margin=ratio), mc, mr)
        trl_self = SimpleNamespace(alpha=0.0, beta=beta, loss_type="simpo", label_smoothing=smoothing,
                                   simpo_gamma=ratio * beta, accelerator=device)
        check(f"simpo label_smoothing={smoothing}", (ours, m["rewards/chosen"], m["rewards/rejected"]),
              CPOTrainer.cpo_loss(trl_self, mc, mr))
    lam = 0.25
    ours, m = pair_losses(PreferenceLoss("orpo", beta=lam), mc, mr)
    losses, reward_c, reward_r, ratio, log_odds = ORPOTrainer.odds_ratio_loss(
        SimpleNamespace(beta=lam, accelerator=device), mc, mr)
    check("orpo (TRL computes it in float32)", (ours, m["rewards/chosen"], m["rewards/rejected"],
                                                m["log_odds_ratio"].mean(), m["log_odds_chosen"].mean()),
          (-mc - losses, reward_c, reward_r, ratio, log_odds), tol=1e-6)
    print(f"trl {trl.__version__}, torch {torch.__version__}: {failed} differ; largest relative difference {worst:.3g}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
