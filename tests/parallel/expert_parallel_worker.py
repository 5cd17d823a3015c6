"""`torchrun --nproc-per-node 2 expert_parallel_worker.py`: qtrain.parallel.expert.ExpertParallel on a
stacked-experts module (SwiGLU experts, parameters [E, ...]) against the same module unsharded, on
each rank's own tokens: outputs, input gradients and each rank's expert-shard gradients (which sum
over both ranks' tokens); an expert that gets no token from one rank, and a rank that gets none at
all. Prints one "ok <case>" line per case that passes."""

from __future__ import annotations


import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.distributed.device_mesh import init_device_mesh

from qtrain.parallel.expert import ExpertParallel
from worker_exit import exit_without_teardown

E, H, I = 4, 8, 6


class StackedExperts(nn.Module):
    """gate_up_proj [E, 2I, H] (gate rows, then up rows), down_proj [E, H, I]; tokens sorted by expert."""

    def __init__(self) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.gate_up_proj = nn.Parameter(torch.randn(E, 2 * I, H, generator=g, dtype=torch.float64))
        self.down_proj = nn.Parameter(torch.randn(E, H, I, generator=g, dtype=torch.float64))

    def forward(self, x: torch.Tensor, num_tokens_per_expert: torch.Tensor) -> torch.Tensor:
        out, start = [], 0
        for e, n in enumerate(num_tokens_per_expert.tolist()):
            gate, up = (x[start:start + n] @ self.gate_up_proj[e].t()).chunk(2, dim=-1)
            out.append((F.silu(gate) * up) @ self.down_proj[e].t())
            start += n
        return torch.cat(out) if out else x.new_zeros(0, H)


def tokens(rank: int, counts: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(10 + rank)
    return torch.randn(sum(counts), H, generator=g, dtype=torch.float64), torch.tensor(counts)


def close(a: torch.Tensor, b: torch.Tensor, tol: float = 1e-12) -> bool:
    if a.shape != b.shape or b.numel() == 0:
        return a.shape == b.shape
    return bool((a - b).abs().max() <= tol * max(b.abs().max().item(), 1.0))


def main() -> int:
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    mesh = init_device_mesh("cpu", (world,), mesh_dim_names=("ep",))
    cases = {  # tokens each rank sends to experts 0..3 (experts 0, 1 live on rank 0; 2, 3 on rank 1)
        "uneven": [[3, 0, 2, 5], [1, 4, 0, 2]],
        "one rank sends nothing": [[0, 0, 0, 0], [2, 1, 3, 1]],
        "a rank receives nothing": [[2, 3, 0, 0], [1, 1, 0, 0]],
    }
    failed = 0
    for case, counts in cases.items():
        ref = StackedExperts()
        ep = ExpertParallel(mesh).apply(StackedExperts())
        upstream = torch.randn(sum(counts[rank]), H, generator=torch.Generator().manual_seed(99 + rank),
                               dtype=torch.float64)
        x, n = tokens(rank, counts[rank])
        x.requires_grad_()
        out = ep(x, n)
        (out * upstream).sum().backward()
        ref_out = None
        for r in range(world):  # the unsharded module on every rank's tokens: its gradients sum over them
            xr, nr = tokens(r, counts[r])
            xr.requires_grad_()
            o = ref(xr, nr)
            (o * torch.randn(o.shape, generator=torch.Generator().manual_seed(99 + r), dtype=torch.float64)).sum().backward()
            if r == rank:
                ref_out, ref_x_grad = o.detach(), xr.grad
        rows = slice(rank * E // world, (rank + 1) * E // world)
        checks = {
            "output": close(out.detach(), ref_out),
            "input grad": close(x.grad, ref_x_grad),
            "sharded": ep.gate_up_proj.to_local().shape == (E // world, 2 * I, H),
            "gate_up grad": close(ep.gate_up_proj.grad.to_local(), ref.gate_up_proj.grad[rows]),
            "down grad": close(ep.down_proj.grad.to_local(), ref.down_proj.grad[rows]),
            "state dict is global": ep.state_dict()["down_proj"].full_tensor().shape == (E, H, I),
        }
        bad = [k for k, v in checks.items() if not v]
        if bad:
            failed += 1
            print(f"FAIL {case} rank {rank}: {bad}", flush=True)
        else:
            print(f"ok {case}", flush=True)
    dist.destroy_process_group()
    return 1 if failed else 0


if __name__ == "__main__":
    code = main()
    exit_without_teardown(code)
