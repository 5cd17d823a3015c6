"""Preference training: the loss, rewards and metrics of qtrain dpo's objective equal the published formulas
(as TRL and LLaMA-Factory compute them), written out here, on a tiny model whose log-probabilities come
from its full logits in float64; gradients too; the LoRA reference (adapters off) equals a frozen copy of
the base model.

The formulas below were checked once against TRL 1.16.0's own loss functions (CPOTrainer.cpo_loss for
DPO's and SimPO's, ORPOTrainer.odds_ratio_loss for ORPO's) with benchmarks/trl_preference_check.py in a
separate venv (TRL is not a test dependency: it pulls datasets, accelerate and pandas for a few lines):
benchmarks/results/trl-preference-check-2026-12-01.md.
"""

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from qtrain.data.instruction_dataset import make_sft_item
from qtrain.errors import ConfigError
from qtrain.models.config import Qwen3Config
from qtrain.models.qwen3 import Qwen3ForCausalLM
from qtrain.parallel import ParallelDims, ParallelState
from qtrain.train.preference import AdaptersOff, FrozenCopy, PreferenceObjective, pair_rows
from qtrain.train.preference_loss import PreferenceLoss
from tolerances import assert_close_scaled, qwen3_terms

pytestmark = pytest.mark.usefixtures("one_thread")

VOCAB, SEQ, PAIRS = 61, 24, 3
NO_LAYOUT = ParallelState(mesh=None, dims=ParallelDims())
CPU = torch.device("cpu")
CFG = Qwen3Config(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, head_dim=8, max_position_embeddings=64, rope_theta=10000.0,
                  tie_word_embeddings=False)


def _model(seed: int) -> Qwen3ForCausalLM:
    torch.manual_seed(seed)
    model = Qwen3ForCausalLM(CFG)
    model.init_weights(std=0.2)
    return model


def _pairs(seed: int = 0, pairs: int = PAIRS, longest_answer: int = SEQ) -> dict[str, torch.Tensor]:
    """`pairs` pairs [P, 2, SEQ]: one prompt, two answers of different lengths, next-token labels,
    and the sequences' lengths [P, 2] (as qtrain.data.pairwise_dataset gives them)."""
    rng = np.random.RandomState(seed)
    items = []
    for _ in range(pairs):
        prompt = rng.randint(1, VOCAB, size=rng.randint(3, 8))
        sides = []
        for _side in range(2):
            answer = rng.randint(1, VOCAB, size=rng.randint(2, min(longest_answer, SEQ - len(prompt))))
            tokens, labels = np.concatenate([prompt, answer]), np.concatenate([np.full(len(prompt), -100), answer])
            sides.append({**make_sft_item(tokens, labels, np.ones(len(tokens)), SEQ, 0, packed=False),
                          "lengths": torch.tensor(len(tokens))})
        items.append({k: torch.stack([s[k] for s in sides]) for k in ("input_ids", "labels", "lengths")})
    return {k: torch.stack([it[k] for it in items]) for k in ("input_ids", "labels", "lengths")}


def _logps(model: Qwen3ForCausalLM, batch) -> tuple[torch.Tensor, torch.Tensor]:
    """(summed, mean) answer log-probs [2P] (chosen rows first) from the full logits, float64."""
    rows = pair_rows(batch)
    logits = model.double()(rows["input_ids"]).double()
    model.float()
    labels = rows["labels"]
    mask = labels != -100
    picked = torch.log_softmax(logits, -1).gather(-1, labels.clamp(min=0)[..., None])[..., 0] * mask
    return picked.sum(-1), picked.sum(-1) / mask.sum(-1)


# ---------------------------------------------------------------- the published formulas (as TRL writes them)

def dpo_formula(pc, pr, rc, rr, beta, loss_type, smoothing=0.0):
    """DPO (Rafailov et al. 2023, arXiv:2305.18290 eq. 7); cDPO label smoothing (Mitchell 2023); hinge
    (SLiC, Zhao et al. 2023); IPO (Azar et al. 2023, arXiv:2310.12036 eq. 17, on mean log-probs)."""
    logits = (pc - pr) - (rc - rr)
    if loss_type == "sigmoid":
        losses = -F.logsigmoid(beta * logits) * (1 - smoothing) - F.logsigmoid(-beta * logits) * smoothing
    elif loss_type == "hinge":
        losses = torch.relu(1 - beta * logits)
    else:
        losses = (logits - 1 / (2 * beta)) ** 2
    return losses, beta * (pc - rc), beta * (pr - rr)


def simpo_formula(pc, pr, beta, gamma, smoothing=0.0):
    """SimPO (Meng et al. 2024, arXiv:2405.14734 eq. 6) on mean log-probs, TRL's CPOTrainer loss_type simpo."""
    logits = (pc - pr) - gamma / beta
    losses = -F.logsigmoid(beta * logits) * (1 - smoothing) - F.logsigmoid(-beta * logits) * smoothing
    return losses, beta * pc, beta * pr


def orpo_formula(pc, pr, lam):
    """ORPO (Hong et al. 2024, arXiv:2403.07691 eqs. 4-7) on mean log-probs: NLL of the chosen answer minus
    lambda x log sigmoid(log odds ratio); TRL's ORPOTrainer.odds_ratio_loss for the second term."""
    log_odds = (pc - pr) - (torch.log1p(-torch.exp(pc)) - torch.log1p(-torch.exp(pr)))
    ratio = F.logsigmoid(log_odds)
    return -pc - lam * ratio, lam * pc, lam * pr, ratio, log_odds


CASES = {
    "dpo_sigmoid": PreferenceLoss("dpo", "sigmoid", 0.3),
    "dpo_sigmoid_cdpo": PreferenceLoss("dpo", "sigmoid", 0.3, label_smoothing=0.2),
    "dpo_hinge": PreferenceLoss("dpo", "hinge", 0.05),
    "dpo_ipo": PreferenceLoss("dpo", "ipo", 0.3),
    "dpo_sigmoid_ftx": PreferenceLoss("dpo", "sigmoid", 0.3, ftx=0.7),
    "simpo_sigmoid": PreferenceLoss("simpo", "sigmoid", 2.5, margin=0.55),
    "simpo_smoothed": PreferenceLoss("simpo", "sigmoid", 2.0, label_smoothing=0.1, margin=1.4),
    "orpo": PreferenceLoss("orpo", beta=0.25),
}


def _expected(cfg: PreferenceLoss, policy, reference):
    (sums, means), (ref_sums, ref_means) = policy, reference
    use = means if cfg.mean_logps else sums
    pc, pr = use.chunk(2)
    extra = {}
    if cfg.kind == "dpo":
        rc, rr = (ref_means if cfg.mean_logps else ref_sums).chunk(2)
        losses, reward_c, reward_r = dpo_formula(pc, pr, rc, rr, cfg.beta, cfg.loss_type, cfg.label_smoothing)
    elif cfg.kind == "simpo":
        losses, reward_c, reward_r = simpo_formula(pc, pr, cfg.beta, cfg.margin * cfg.beta, cfg.label_smoothing)
    else:
        losses, reward_c, reward_r, ratio, log_odds = orpo_formula(pc, pr, cfg.beta)
        extra = {"nll_loss": -pc.mean(), "log_odds_ratio": ratio.mean(), "log_odds_chosen": log_odds.mean()}
    losses = losses + cfg.ftx * -means.chunk(2)[0]  # MindSpeed-LLM's / LLaMA-Factory's --pref-ftx
    metrics = {"loss": losses.mean(), "rewards/chosen": reward_c.mean(), "rewards/rejected": reward_r.mean(),
               "rewards/accuracies": (reward_c > reward_r).double().mean(),
               "rewards/margins": (reward_c - reward_r).mean(), "logps/chosen": pc.mean(), "logps/rejected": pr.mean(),
               **extra}
    return losses.mean(), metrics


@pytest.mark.parametrize("case", list(CASES))
def test_loss_rewards_and_metrics_equal_the_formulas(case):
    cfg = CASES[case]
    policy, ref_model, batch = _model(0), _model(1), _pairs()
    want, want_metrics = _expected(cfg, _logps(policy, batch), _logps(ref_model, batch))
    objective = PreferenceObjective(cfg, FrozenCopy(ref_model, NO_LAYOUT))
    got = objective.micro_batch_loss(policy, NO_LAYOUT, batch, CPU)
    metrics = objective.take_metrics(CPU)
    # float32 forward over the model, a sum over <= SEQ answer tokens, then the pair formula
    terms = qwen3_terms(CFG, SEQ, tokens=SEQ)
    assert_close_scaled(got, want, terms=terms, what=f"{case} loss")
    assert abs(float(got.detach()) - float(want)) <= 1e-5 * max(1.0, abs(float(want)))
    assert metrics.keys() == want_metrics.keys()
    for name, value in want_metrics.items():
        if name == "rewards/accuracies":
            assert metrics[name] == float(value), name  # a count: exact (no reward pair is a near tie here)
        else:
            assert abs(metrics[name] - float(value)) <= 1e-5 * max(1.0, abs(float(value))), (name, metrics[name], value)


@pytest.mark.parametrize("case", ["dpo_sigmoid", "dpo_ipo", "simpo_sigmoid", "orpo"])
def test_gradients_equal_the_full_logits_path(case):
    """The per-token chunked loss's recomputed backward, through the pair loss, gives the gradients of the
    formula on full logits (float64), for every parameter."""
    cfg = CASES[case]
    ref_model, batch = _model(1), _pairs(3)
    ref = _logps(ref_model, batch)
    policy64 = _model(0).double()
    rows = pair_rows(batch)
    logits = policy64(rows["input_ids"])
    mask = rows["labels"] != -100
    picked = torch.log_softmax(logits, -1).gather(-1, rows["labels"].clamp(min=0)[..., None])[..., 0] * mask
    want, _ = _expected(cfg, (picked.sum(-1), picked.sum(-1) / mask.sum(-1)), ref)
    want.backward()
    policy = _model(0)
    objective = PreferenceObjective(cfg, FrozenCopy(ref_model, NO_LAYOUT))
    objective.micro_batch_loss(policy, NO_LAYOUT, batch, CPU).backward()
    terms = qwen3_terms(CFG, SEQ, tokens=SEQ, backward=True)
    want_grads = dict(policy64.named_parameters())
    for name, p in policy.named_parameters():
        assert_close_scaled(p.grad, want_grads[name].grad, terms=terms, what=f"{case} grad {name}")


def test_first_step_from_the_reference_is_log2_with_zero_rewards():
    """Policy == reference: every DPO logit is 0, so the sigmoid loss is log 2 and all rewards 0 (no pair
    counts as accurate: accuracy is chosen reward > rejected reward, as TRL)."""
    policy, batch = _model(0), _pairs()
    objective = PreferenceObjective(CASES["dpo_sigmoid"], FrozenCopy(_model(0), NO_LAYOUT))
    loss = objective.micro_batch_loss(policy, NO_LAYOUT, batch, CPU)
    m = objective.take_metrics(CPU)
    assert abs(float(loss) - math.log(2)) < 1e-6
    assert m["rewards/margins"] == 0 and m["rewards/accuracies"] == 0


def test_lora_reference_with_adapters_off_equals_a_frozen_copy_of_the_base():
    from qtrain.checkpoint.adapter import LoRAConfig
    from qtrain.train.lora import LoRALinear, inject_lora

    base, batch = _model(0), _pairs(1)
    copy = _model(0)  # the same base weights, a separate module
    inject_lora(base, LoRAConfig(r=4, alpha=8, target_modules=["all-linear", "lm_head"]))
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for m in base.modules():
            if isinstance(m, LoRALinear):  # non-zero adapters: the policy differs from its base
                m.lora_B.weight.copy_(torch.randn(m.lora_B.weight.shape, generator=g) * 0.2)
    rows = pair_rows(batch)
    adapters_off = AdaptersOff().row_logps(base, NO_LAYOUT, rows, CPU)
    frozen = FrozenCopy(copy, NO_LAYOUT).row_logps(None, NO_LAYOUT, rows, CPU)
    assert torch.equal(adapters_off, frozen)
    with torch.no_grad():
        with_adapters = -base(rows["input_ids"], labels=rows["labels"], loss_reduction="none").sum(-1)
    assert (with_adapters - frozen).abs().max() > 1e-2  # the adapters are on again, and they matter
    # one DPO step: the policy has adapters, the reference is its base; both references give one loss
    losses = []
    for ref in (AdaptersOff(), FrozenCopy(_model(0), NO_LAYOUT)):
        losses.append(PreferenceObjective(CASES["dpo_sigmoid"], ref).micro_batch_loss(base, NO_LAYOUT, batch, CPU))
    assert torch.equal(losses[0], losses[1]) and abs(float(losses[0]) - math.log(2)) > 1e-3


def test_bad_loss_options_are_refused_by_name():
    with pytest.raises(ConfigError, match="label smoothing applies to the sigmoid loss only"):
        PreferenceLoss("dpo", "hinge", 0.1, label_smoothing=0.1)
    with pytest.raises(ConfigError, match="beta"):
        PreferenceLoss("dpo", "sigmoid", 0.0)
    with pytest.raises(ConfigError, match="--pref-loss kto"):
        PreferenceLoss("kto")
    with pytest.raises(ConfigError, match="orpo has one loss"):
        PreferenceLoss("orpo", "ipo")


# ---------------------------------------------------------------- packed pairs (--pack-pairs)

def test_pack_pairs_keeps_every_sequence_whole_in_its_own_document():
    from qtrain.train.pair_packing import pack_pairs

    batch = _pairs(4, pairs=5, longest_answer=9)
    rows, slots = pack_pairs(batch)
    assert rows["input_ids"].shape[0] < 2 * 5  # short sequences share rows
    for slot in range(10):
        side, pair = divmod(slot, 5)
        n = int(batch["lengths"][pair, side])
        where = slots == slot
        assert int(where.sum()) == n
        r = int(where.any(-1).nonzero()[0])
        assert torch.equal(rows["input_ids"][r][where[r]], batch["input_ids"][pair, side, :n])
        assert torch.equal(rows["labels"][r][where[r]], batch["labels"][pair, side, :n])
        assert torch.equal(rows["position_ids"][r][where[r]], torch.arange(n))  # positions restart
        start = int(where[r].nonzero()[0])
        assert start in rows["cu_seqlens"][r].tolist() and start + n in rows["cu_seqlens"][r].tolist()
    assert bool((rows["labels"][slots < 0] == -100).all())  # padding trains nothing


@pytest.mark.parametrize("case", ["dpo_sigmoid", "orpo"])
def test_packed_pairs_give_the_unpacked_losses_metrics_and_gradients(case):
    """Packed rows with document attention == one row per sequence: the same pair losses, metrics and
    gradients (fp32), for a micro-batch whose sequences share rows."""
    cfg, batch = CASES[case], _pairs(5, pairs=4, longest_answer=8)
    results = []
    for pack in (False, True):
        policy = _model(0)
        objective = PreferenceObjective(cfg, FrozenCopy(_model(1), NO_LAYOUT), pack_pairs=pack)
        loss = objective.micro_batch_loss(policy, NO_LAYOUT, batch, CPU)
        loss.backward()
        results.append((loss.detach(), objective.take_metrics(CPU), {n: p.grad for n, p in policy.named_parameters()}))
    (loss0, m0, g0), (loss1, m1, g1) = results
    assert abs(float(loss0) - float(loss1)) <= 1e-5 * max(1.0, abs(float(loss0)))
    for name, value in m0.items():
        assert abs(m1[name] - value) <= 1e-5 * max(1.0, abs(value)), (name, m1[name], value)
    terms = qwen3_terms(CFG, SEQ, tokens=SEQ, backward=True)
    for name, grad in g0.items():
        assert_close_scaled(g1[name], grad, terms=terms, what=f"{case} packed grad {name}")
