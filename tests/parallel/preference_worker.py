"""Preference-training worker for the parallel tests: `torchrun ... preference_worker.py SPEC.json` (or plain
python for one process). Each run of the spec trains a tiny Qwen3 (float32, CPU, gloo) for a few steps with
qtrain dpo's objective (qtrain.train.preference) through the loop's own `train.step.train_step`, and
writes per step the loss, the gradient norm and the reward metrics to spec["out"].

The policy is built as the loop builds it (parallel_worker.make_model: mesh, parallelize, materialize,
full weights); DPO's reference is a frozen copy on the same mesh holding *other* weights (so that its
log-probs matter), built like the policy. The pairs of step i depend only on i: a global batch of GBS
pairs, prompts of varied length with -100 labels, chosen and rejected answers of different lengths,
split over data-parallel ranks and micro-batches. The chunked loss runs in several chunks per
micro-batch (parallel_worker's CHUNK_LOGITS).
"""

from __future__ import annotations

import json
import os
import sys

import numpy as np
import torch
import torch.distributed as dist
from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

from parallel_worker import CHUNK_LOGITS, GBS, MBS, SEQ, TINY, full_weights, make_model, mean_over_loss_group
from qtrain.data.instruction_dataset import make_sft_item
from qtrain.models.config import Qwen3Config
from qtrain.ops import vocab_parallel_linear_cross_entropy
from qtrain.train.optim import build_optimizer
from qtrain.train.preference import FrozenCopy, PreferenceObjective
from qtrain.train.preference_loss import PreferenceLoss
from qtrain.train.runtime import init_runtime
from qtrain.train.step import train_step
from worker_exit import exit_without_teardown

LR = 3e-3


def global_pairs(step: int, vocab: int) -> dict[str, torch.Tensor]:
    """GBS pairs [GBS, 2, SEQ] (chosen row 0, rejected row 1) with next-token labels on the answers."""
    rng = np.random.RandomState(5000 + step)
    items = []
    for _ in range(GBS):
        prompt = rng.randint(1, vocab, size=rng.randint(2, 7))
        sides = []
        for _side in range(2):
            answer = rng.randint(1, vocab, size=rng.randint(2, SEQ - len(prompt) + 1))
            tokens = np.concatenate([prompt, answer])
            labels = np.concatenate([np.full(len(prompt), -100), answer])
            sides.append(make_sft_item(tokens, labels, np.ones(len(tokens)), SEQ, 0, packed=False))
        items.append({k: torch.stack([s[k] for s in sides]) for k in ("input_ids", "labels")})
    return {k: torch.stack([it[k] for it in items]) for k in ("input_ids", "labels")}


def micro_batches(step: int, vocab: int, state) -> list[dict[str, torch.Tensor]]:
    pairs = global_pairs(step, vocab)
    per_rank = GBS // state.dp_size
    rows = slice(state.dp_rank * per_rank, (state.dp_rank + 1) * per_rank)
    mine = {k: v[rows] for k, v in pairs.items()}
    return [{k: v[m:m + MBS] for k, v in mine.items()} for m in range(0, per_rank, MBS)]


def reference(run: dict, world: int, cfg: Qwen3Config) -> FrozenCopy:
    model, state = make_model(run, world, cfg)
    weights = {k: v + 0.02 * torch.randn(v.shape, generator=torch.Generator().manual_seed(7))
               for k, v in full_weights(cfg).items()}
    set_model_state_dict(model, weights, options=StateDictOptions(full_state_dict=True, strict=False))
    return FrozenCopy(model, state)


def main(spec_path: str) -> int:
    spec = json.loads(open(spec_path).read())
    rt = init_runtime("cpu")
    world = rt.world_size
    torch.manual_seed(0)
    vocab_parallel_linear_cross_entropy.CHUNK_LOGITS = CHUNK_LOGITS
    results = {}
    for run in spec["runs"]:
        cfg = Qwen3Config(**{**TINY, **run.get("model", {})})
        loss = PreferenceLoss(**run.get("loss", {}))
        model, state = make_model(run, world, cfg)
        ref = reference(run, world, cfg) if loss.needs_reference else None
        objective = PreferenceObjective(loss, ref)
        optimizer = build_optimizer(model, LR, 0.01, (0.9, 0.95), 1e-8)
        out = {"losses": [], "grad_norms": [], "metrics": []}
        for step in range(run.get("iters", 5)):
            step_loss, norm = train_step(model, state, optimizer, micro_batches(step, cfg.vocab_size, state),
                                         torch.device("cpu"), clip_grad=1.0, objective=objective)
            out["losses"].append(mean_over_loss_group(step_loss, state))
            out["grad_norms"].append(float(norm))
            out["metrics"].append(objective.take_metrics(torch.device("cpu")))
        results[run["name"]] = out
    if dist.get_rank() == 0:
        tmp = spec["out"] + ".tmp"
        with open(tmp, "w") as f:
            json.dump(results, f)
        os.replace(tmp, spec["out"])
    dist.barrier()
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    code = main(sys.argv[1])
    exit_without_teardown(code)
