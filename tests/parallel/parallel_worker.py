"""Training worker for the parallel tests: `torchrun ... parallel_worker.py SPEC.json` (or plain python for
one process). Runs each layout of the spec in turn on a tiny Qwen3 (float32, CPU, gloo) and
writes the loss and gradient norm of every iteration to spec["out"] as JSON.

Each step goes through the training loop's own pieces (train.step forward/backward or the
pipeline schedule, train.loop.clip_gradients, train.optim's AdamW, checkpoint.dcp save/load);
only data and initial weights are made here: a global batch of GBS samples per step, split over
data-parallel ranks and micro-batches. The data of step i depends only on i, so every layout sees the same
samples and the same losses up to float rounding.
"""

from __future__ import annotations

import json
import os
import sys
import time

import torch
import torch.distributed as dist
from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

from qtrain.checkpoint.dcp import load_checkpoint, save_checkpoint
from qtrain.config import PretrainConfig
from qtrain.models.config import Qwen3Config
from qtrain.models.qwen3 import build_model
from qtrain.parallel.weights import materialize
from qtrain.parallel import build_mesh, parallel_state, parallelize
from qtrain.train.loop import clip_gradients
from qtrain.train.optim import build_optimizer
from qtrain.train.step import forward_backward, forward_loss, pipeline_forward_backward, uses_pipeline

TINY = dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
            num_key_value_heads=2, head_dim=16, max_position_embeddings=64, rope_theta=10000.0,
            tie_word_embeddings=True)
SEQ, GBS, MBS, LR = 16, 8, 2, 3e-3


def full_weights(cfg: Qwen3Config) -> dict[str, torch.Tensor]:
    model = build_model(cfg, "cpu")
    model.init_weights(generator=torch.Generator().manual_seed(0))
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def global_batch(step: int, vocab: int) -> tuple[torch.Tensor, torch.Tensor]:
    tokens = torch.randint(0, vocab, (GBS, SEQ + 1), generator=torch.Generator().manual_seed(1000 + step))
    return tokens[:, :-1], tokens[:, 1:]


def make_model(run: dict, world: int, cfg: Qwen3Config):
    pcfg = PretrainConfig()
    for k, v in run.get("parallel", {}).items():
        setattr(pcfg.parallel, k, v)
    pcfg.training.micro_batch_size, pcfg.training.global_batch_size = MBS, GBS
    pcfg.data.seq_length = SEQ
    if world == 1:
        model = build_model(cfg, "cpu")
        model.load_state_dict(full_weights(cfg))
        return model, 0, 1
    mesh = build_mesh(pcfg, world, "cpu", model_cfg=cfg)
    model = parallelize(build_model(cfg, "meta"), mesh, pcfg, device=torch.device("cpu"))
    materialize(model, "cpu")
    set_model_state_dict(model, full_weights(cfg), options=StateDictOptions(full_state_dict=True, strict=False))
    return model, mesh["dp"].get_local_rank(), mesh["dp"].size()


def train_step(model, optimizer, step: int, vocab: int, dp_rank: int, dp: int) -> tuple[float, float]:
    """One optimizer step through the training loop's own step functions."""
    inputs, labels = global_batch(step, vocab)
    per_rank = GBS // dp
    rows = slice(dp_rank * per_rank, (dp_rank + 1) * per_rank)
    n = per_rank // MBS
    micro = [{"input_ids": inputs[rows][m * MBS:(m + 1) * MBS], "labels": labels[rows][m * MBS:(m + 1) * MBS]}
             for m in range(n)]
    state = parallel_state(model)
    cpu = torch.device("cpu")
    if uses_pipeline(model):
        loss = pipeline_forward_backward(model, micro, cpu)
    else:
        loss = sum(forward_backward(model, b, n, cpu, bf16=False, sharded=state is not None) for b in micro) / n
    norm = clip_gradients(model, [p for p in model.parameters() if p.requires_grad], 1.0)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    if state is not None:  # mean over the ranks that saw different tokens
        group = state.mesh["dp_cp"].get_group()
        dist.all_reduce(loss, group=group)
        loss = loss / dist.get_world_size(group)
    return float(loss), float(norm)


def eval_loss(model, vocab: int, dp_rank: int, dp: int) -> float:
    """Mean token loss of one held-out global batch (the validation path: forward only)."""
    inputs, labels = global_batch(10_000, vocab)
    per_rank = GBS // dp
    rows = slice(dp_rank * per_rank, (dp_rank + 1) * per_rank)
    state = parallel_state(model)
    cpu = torch.device("cpu")
    if uses_pipeline(model):
        total, count = state.pipeline.eval_loss(inputs[rows], labels[rows])
    else:
        total, count = torch.zeros(()), torch.zeros((), dtype=torch.int64)
        for m in range(per_rank // MBS):
            t, c = forward_loss(model, {"input_ids": inputs[rows][m * MBS:(m + 1) * MBS],
                                        "labels": labels[rows][m * MBS:(m + 1) * MBS]}, cpu, False, state is not None)
            total, count = total + t, count + c
    if state is not None:
        pair = torch.stack([total.float(), count.float()])
        dist.all_reduce(pair, group=state.mesh["dp_cp"].get_group())
        total, count = pair[0], pair[1]
    return float(total / count)


def main(spec_path: str) -> int:
    spec = json.loads(open(spec_path).read())
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1:
        dist.init_process_group("gloo")
    torch.manual_seed(0)
    cfg = Qwen3Config(**TINY)
    results = {}
    for run in spec["runs"]:
        t0 = time.time()
        model, dp_rank, dp = make_model(run, world, cfg)
        optimizer = build_optimizer(model, LR, 0.01, (0.9, 0.95), 1e-8)
        start = 0
        if run.get("load"):
            start = load_checkpoint(run["load"], model, optimizer, load_rng=False).iteration
        losses, norms = [], []
        for step in range(start, run.get("iters", 10)):
            loss, norm = train_step(model, optimizer, step, cfg.vocab_size, dp_rank, dp)
            losses.append(loss)
            norms.append(norm)
            if run.get("save") and step + 1 == run["save_at"]:
                save_checkpoint(run["save"], step + 1, model, optimizer, {"iteration": step + 1},
                                cfg.to_hf_dict(), {"layout": run["name"]})
        results[run["name"]] = {"losses": losses, "grad_norms": norms, "seconds": time.time() - t0,
                                "eval_loss": eval_loss(model, cfg.vocab_size, dp_rank, dp)}
    if not dist.is_initialized() or dist.get_rank() == 0:
        tmp = spec["out"] + ".tmp"
        with open(tmp, "w") as f:
            json.dump(results, f)
        os.replace(tmp, spec["out"])
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
