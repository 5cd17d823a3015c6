"""Training worker for the parallel tests: `torchrun ... parallel_worker.py SPEC.json` (or plain python for
one process). Runs each layout of the spec in turn on a tiny Qwen3 (float32, CPU, gloo) and
writes the loss and gradient norm of every iteration to spec["out"] as JSON.

Every layout, one process included, is built as the loop builds it (a DeviceMesh, parallelize,
materialize; one process is a one-rank mesh under FSDP2) and each step is the loop's own
`train.step.train_step` (micro-batches or the pipeline schedule, clipping, AdamW), with
checkpoint.dcp save/load and `train.step.eval_step` for validation. Only data and initial weights
are made here: a global batch of GBS samples per step, split over data-parallel ranks and
micro-batches. The data of step i depends only on i, so every layout sees the same samples and
the same losses up to float rounding.

The LM-head loss runs chunked on every layout, as in training, with chunks small enough here that
each micro-batch's 32 tokens take several (7 per chunk on one device, 14 per vocabulary shard under
TP 2: uneven tails); ring attention likewise takes its query rows in chunks of 3 (CP2) or more. A run's "model" entry changes the tiny model (e.g. untied embeddings).
A run with "docs" packs several documents into each sample (cu_seqlens, per-document positions, no
label across a document boundary), the same documents for every layout.
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
from qtrain.ops import vocab_parallel_linear_cross_entropy
from qtrain.parallel import build_mesh, parallelize
from qtrain.parallel.offload import optimizer_offloaded
from qtrain.ops.document_attention import sample_cu_seqlens
from qtrain.parallel import ring_attention
from qtrain.parallel.weights import materialize
from qtrain.train.optim import build_optimizer
from qtrain.train.moe import MoeTraining
from qtrain.train.runtime import init_runtime
from qtrain.train.step import eval_step, train_step
from worker_exit import exit_without_teardown

TINY = dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
            num_key_value_heads=2, head_dim=16, max_position_embeddings=64, rope_theta=10000.0,
            tie_word_embeddings=True)
SEQ, GBS, MBS, LR = 16, 8, 2, 3e-3
CHUNK_LOGITS = 7 * TINY["vocab_size"]  # fp32 logits per chunk: 7 tokens of the whole vocabulary
RING_SCORE_CHUNK = 4 * MBS * TINY["num_attention_heads"] * 8 * 3  # ring attention: 3 query rows per chunk of 8 keys


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
    for k, v in run.get("offload", {}).items():
        setattr(pcfg.offload, k, v)
    for k, v in run.get("moe", {}).items():
        setattr(pcfg.moe, k, v)
    pcfg.training.micro_batch_size, pcfg.training.global_batch_size = MBS, GBS
    pcfg.data.seq_length = SEQ
    mesh = build_mesh(pcfg, world, "cpu", model_cfg=cfg)
    model, state = parallelize(build_model(cfg, "meta"), mesh, pcfg, device=torch.device("cpu"))
    materialize(model, "cpu")
    if pcfg.offload.optimizer_offloaded and not optimizer_offloaded(model):
        raise AssertionError(f"{run['name']}: FSDP's CPU offload policy is not applied")
    set_model_state_dict(model, full_weights(cfg), options=StateDictOptions(full_state_dict=True, strict=False))
    return model, state


def global_documents(step: int, labels: torch.Tensor) -> dict[str, torch.Tensor]:
    """1 to 5 documents per sample: cu_seqlens, per-document positions, and labels without the
    token after each document's end (so CP ranks hold unequal numbers of trained tokens)."""
    gen = torch.Generator().manual_seed(5000 + step)
    cu, pos, labels = [], [], labels.clone()
    for row in range(GBS):
        starts = torch.zeros(SEQ, dtype=torch.bool)
        starts[torch.randperm(SEQ - 1, generator=gen)[: int(torch.randint(0, 5, (1,), generator=gen))] + 1] = True
        starts[0] = True
        index = torch.arange(SEQ)
        pos.append(index - torch.cummax(torch.where(starts, index, 0), 0).values)
        cu.append(sample_cu_seqlens(starts))
        labels[row, :-1][starts[1:]] = -100
    return {"cu_seqlens": torch.stack(cu), "position_ids": torch.stack(pos), "labels": labels}


def micro_batches(step: int, vocab: int, state, docs: bool = False) -> list[dict[str, torch.Tensor]]:
    """This rank's micro-batches of the global batch of `step`."""
    inputs, labels = global_batch(step, vocab)
    batch = {"input_ids": inputs, "labels": labels}
    if docs:
        batch |= global_documents(step, labels)
    per_rank = GBS // state.dp_size
    rows = slice(state.dp_rank * per_rank, (state.dp_rank + 1) * per_rank)
    batch = {k: v[rows] for k, v in batch.items()}
    return [{k: v[m:m + MBS] for k, v in batch.items()} for m in range(0, per_rank, MBS)]


def mean_over_loss_group(value: torch.Tensor, state) -> float:
    """Mean over the ranks that saw different tokens (TP and PP ranks already agree)."""
    value = value.clone()
    dist.all_reduce(value, group=state.loss_group)
    return float(value) / dist.get_world_size(state.loss_group)


def eval_loss(model, state, vocab: int, docs: bool = False) -> float:
    """Mean token loss of one held-out global batch (the validation path: forward only)."""
    total, count = eval_step(model, state, micro_batches(10_000, vocab, state, docs), torch.device("cpu"))
    pair = torch.stack([total, count])
    dist.all_reduce(pair, group=state.loss_group)
    return float(pair[0] / pair[1])


def main(spec_path: str) -> int:
    spec = json.loads(open(spec_path).read())
    rt = init_runtime("cpu")  # torchrun's gloo group, or an in-process world of one
    world = rt.world_size
    torch.manual_seed(0)
    vocab_parallel_linear_cross_entropy.CHUNK_LOGITS = CHUNK_LOGITS
    ring_attention.SCORE_CHUNK_BYTES = RING_SCORE_CHUNK
    results = {}
    for run in spec["runs"]:
        t0 = time.time()
        cfg = Qwen3Config(**{**TINY, **run.get("model", {})})
        model, state = make_model(run, world, cfg)
        optimizer = build_optimizer(model, LR, 0.01, (0.9, 0.95), 1e-8)
        start = 0
        if run.get("load"):
            start = load_checkpoint(run["load"], model, optimizer, load_rng=False).iteration
        losses, norms, aux = [], [], []
        # MoE runs ("moe_aux": the coefficient; "moe_formula": transformers' by default, or megatron's):
        # the loop's load-balancing loss (qtrain.train.moe)
        moe = MoeTraining(run["moe_aux"], cfg.num_experts, run.get("moe_formula", "transformers")) \
            if "moe_aux" in run else None
        for step in range(start, run.get("iters", 10)):
            batches = micro_batches(step, cfg.vocab_size, state, run.get("docs", False))
            loss, norm = train_step(model, state, optimizer, batches, torch.device("cpu"), clip_grad=1.0, moe=moe)
            losses.append(mean_over_loss_group(loss, state))
            norms.append(float(norm))
            if moe is not None:
                pp_group = state.pipeline.pp_group if state.pipeline is not None else None
                aux.append(moe.take_metrics(state.loss_group, pp_group)["load_balancing_loss"])
            if run.get("save") and step + 1 == run["save_at"]:
                save_checkpoint(run["save"], step + 1, model, optimizer, {"iteration": step + 1},
                                cfg.to_hf_dict(), {"layout": run["name"]})
        results[run["name"]] = {"losses": losses, "grad_norms": norms, "aux": aux, "seconds": time.time() - t0,
                                "eval_loss": eval_loss(model, state, cfg.vocab_size, run.get("docs", False))}
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
