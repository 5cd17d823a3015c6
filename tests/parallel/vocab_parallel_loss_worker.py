"""`torchrun --nproc-per-node 2 vocab_parallel_loss_worker.py`: the vocab-parallel chunked LM-head loss
(qtrain.ops.linear_cross_entropy on a vocab-sharded DTensor weight) against full logits in float64,
hidden states replicated and sequence-sharded; prints one "ok <case>" line per case that passes."""

from __future__ import annotations


import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import DTensor, Shard, distribute_tensor

from qtrain.labels import IGNORE_INDEX
from qtrain.ops.linear_cross_entropy import linear_cross_entropy
from worker_exit import exit_without_teardown

V, H, B, S, CHUNK = 40, 8, 2, 12, 5  # 24 tokens: chunks of 5, 5, 5, 5 and a tail of 4


def close(got: torch.Tensor, ref: torch.Tensor, tol: float) -> bool:
    return bool((got.double() - ref).abs().max() <= tol * ref.abs().max())


def main() -> int:
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    mesh = init_device_mesh("cpu", (world,))
    g = torch.Generator().manual_seed(0)  # the same data on every rank
    h = torch.randn(B, S, H, dtype=torch.float64, generator=g)
    w = torch.randn(V, H, dtype=torch.float64, generator=g)
    y = torch.randint(0, V, (B, S), generator=g)
    y[0, :6] = IGNORE_INDEX  # the first chunk ignored entirely, and part of the second
    y[1, 7] = IGNORE_INDEX
    y[1, 8], y[1, 9] = 0, V - 1  # the first and the last word: each owned by a different rank

    hr, wr = h.clone().requires_grad_(), w.clone().requires_grad_()
    ref = F.cross_entropy((hr @ wr.t()).reshape(-1, V), y.reshape(-1), ignore_index=IGNORE_INDEX, reduction="sum")
    (2.5 * ref).backward()  # a non-unit upstream gradient
    rows = slice(rank * V // world, (rank + 1) * V // world)
    seq = slice(rank * S // world, (rank + 1) * S // world)
    failed = 0
    for case in ("replicated", "sequence_sharded"):
        weight = distribute_tensor(w.float(), mesh, [Shard(0)]).requires_grad_()
        local_h = (h[:, seq] if case == "sequence_sharded" else h).float().requires_grad_()
        hidden = DTensor.from_local(local_h, mesh, [Shard(1)]) if case == "sequence_sharded" else local_h
        loss = linear_cross_entropy(hidden, weight, y, reduction="sum", chunk_size=CHUNK)
        (2.5 * loss).backward()
        with torch.no_grad():
            eval_loss = linear_cross_entropy(hidden, weight, y, reduction="sum", chunk_size=CHUNK)
        mean = linear_cross_entropy(hidden, weight, y, chunk_size=CHUNK)
        checks = {
            "loss": close(loss, ref.detach(), 1e-6),
            "no_grad loss": close(eval_loss, ref.detach(), 1e-6),
            "mean": close(mean, ref.detach() / (y != IGNORE_INDEX).sum(), 1e-6),
            "grad hidden": close(local_h.grad, (hr.grad[:, seq] if case == "sequence_sharded" else hr.grad), 1e-5),
            "grad weight shard": close(weight.grad.to_local(), wr.grad[rows], 1e-5),
            "ignored tokens get no gradient": case == "sequence_sharded" or local_h.grad[0, :6].abs().max() == 0,
        }
        bad = [name for name, ok in checks.items() if not ok]
        if bad:
            failed += 1
            print(f"rank {rank} {case}: FAILED {bad}", flush=True)
        else:
            print(f"ok {case}", flush=True)
    failed += per_token_cases(h, w, y, rank, world, mesh, rows, seq)
    dist.destroy_process_group()
    return 1 if failed else 0


def per_token_cases(h, w, y, rank, world, mesh, rows, seq) -> int:
    """reduction "none" (preference training's per-token log-probs): values [B, S] in the labels' order
    and the gradients of a per-token upstream gradient (recomputed in backward), both layouts."""
    hr, wr = h.clone().requires_grad_(), w.clone().requires_grad_()
    ref = F.cross_entropy((hr @ wr.t()).reshape(-1, V), y.reshape(-1), ignore_index=IGNORE_INDEX,
                          reduction="none").view(B, S)
    upstream = torch.randn(B, S, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    (ref * upstream).sum().backward()
    failed = 0
    for case in ("replicated", "sequence_sharded"):
        weight = distribute_tensor(w.float(), mesh, [Shard(0)]).requires_grad_()
        local_h = (h[:, seq] if case == "sequence_sharded" else h).float().requires_grad_()
        hidden = DTensor.from_local(local_h, mesh, [Shard(1)]) if case == "sequence_sharded" else local_h
        tokens = linear_cross_entropy(hidden, weight, y, reduction="none", chunk_size=CHUNK)
        (tokens * upstream.float()).sum().backward()
        checks = {
            "per-token values": tokens.shape == (B, S) and close(tokens, ref.detach(), 1e-6),
            "ignored tokens are 0": bool((tokens[y == IGNORE_INDEX] == 0).all()),
            "grad hidden": close(local_h.grad, (hr.grad[:, seq] if case == "sequence_sharded" else hr.grad), 1e-5),
            "grad weight shard": close(weight.grad.to_local(), wr.grad[rows], 1e-5),
        }
        bad = [name for name, ok in checks.items() if not ok]
        if bad:
            failed += 1
            print(f"rank {rank} per-token {case}: FAILED {bad}", flush=True)
        else:
            print(f"ok per-token {case}", flush=True)
    return failed


if __name__ == "__main__":
    code = main()
    exit_without_teardown(code)
