"""Anchor: training throughput of Qwen3 (random init) the way a user would do it without qtrain:
Hugging Face transformers on one GPU in a plain loop, optionally with Liger kernels or torch.compile.

Adapted from the project's shared anchor script `../shared/bench/hf_baseline.py` (the one that
produced ../shared/anchors.md), copied here because `../shared` does not travel to the GPU
machine. Same model, same loop, same timing (3 warm-up steps, mean of 10) and MFU convention;
added: --tiny (a small model on CPU, so the CPU smoke test keeps this file working) and
--warmup / --steps.

Usage: python hf_baseline.py VARIANT MBS SEQ [--tiny] [--warmup 3] [--steps 10]   prints one JSON line
VARIANT is a name made of parts: hf (always), fp32master or bf16 (pure bf16 params and
optimizer state), liger (apply_liger_kernel_to_qwen3), compile (torch.compile), ckpt
(gradient checkpointing). e.g. hf_fp32master, hf_liger, hf_bf16_liger, hf_compile, hf_liger_ckpt.
liger-kernel is not on the GPU machine: carry its wheel (pure Python, needs triton, which is there).
MFU convention: 6 * all parameters (the tied embedding counted once, as the LM head matmul)
+ 12 * layers * heads * head_dim * seq (full attention), over 989 TFLOP/s (H100/H200 dense bf16).

--moe LAYERS: Qwen3MoeForCausalLM with Qwen3-30B-A3B's layer shape and LAYERS layers (with --tiny a
tiny MoE); the variant part "grouped" selects transformers 5's experts_implementation="grouped_mm",
else its "eager" loop over experts. MFU then counts the parameters a token passes through (the
router and 8 of 128 experts per layer).
"""

import argparse
import json
import time

import torch

QWEN3_1_7B = dict(vocab_size=151936, hidden_size=2048, intermediate_size=6144, num_hidden_layers=28,
                  num_attention_heads=16, num_key_value_heads=8, head_dim=128, max_position_embeddings=40960,
                  rope_theta=1000000.0, rms_norm_eps=1e-6, tie_word_embeddings=True)
TINY = dict(QWEN3_1_7B, vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=512)
QWEN3_30B_A3B = dict(vocab_size=151936, hidden_size=2048, intermediate_size=6144, num_hidden_layers=48,
                     num_attention_heads=32, num_key_value_heads=4, head_dim=128, max_position_embeddings=40960,
                     rope_theta=1000000.0, rms_norm_eps=1e-6, tie_word_embeddings=False, num_experts=128,
                     num_experts_per_tok=8, moe_intermediate_size=768, norm_topk_prob=True)
TINY_MOE = dict(QWEN3_30B_A3B, vocab_size=512, hidden_size=64, intermediate_size=128, num_attention_heads=4,
                num_key_value_heads=2, head_dim=16, max_position_embeddings=512, num_experts=8,
                num_experts_per_tok=2, moe_intermediate_size=32)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("variant")
    ap.add_argument("mbs", type=int)
    ap.add_argument("seq", type=int)
    ap.add_argument("--tiny", action="store_true", help="tiny model on the CPU (smoke test)")
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--moe", type=int, default=0, help="Qwen3-30B-A3B-shaped MoE with this many layers")
    a = ap.parse_args()
    variant, mbs, seq = a.variant, a.mbs, a.seq

    from transformers import Qwen3Config, Qwen3ForCausalLM, Qwen3MoeConfig, Qwen3MoeForCausalLM

    dev = "cpu" if a.tiny else "cuda"
    if a.moe:
        shape = dict(TINY_MOE if a.tiny else QWEN3_30B_A3B, num_hidden_layers=a.moe)
        cfg = Qwen3MoeConfig(**shape, experts_implementation="grouped_mm" if "grouped" in variant else "eager")
        model_cls = Qwen3MoeForCausalLM
    else:
        shape = TINY if a.tiny else QWEN3_1_7B
        cfg = Qwen3Config(**shape)
        model_cls = Qwen3ForCausalLM
    cfg._attn_implementation = "sdpa"
    torch.manual_seed(0)
    if "liger" in variant:
        from liger_kernel.transformers import apply_liger_kernel_to_qwen3
        apply_liger_kernel_to_qwen3()
    pure_bf16 = "bf16" in variant
    with torch.device(dev):
        model = model_cls(cfg).to(torch.bfloat16 if pure_bf16 else torch.float32)
    if "ckpt" in variant:
        model.gradient_checkpointing_enable()
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5, betas=(0.9, 0.95), weight_decay=0.1, fused=dev == "cuda")
    fwd = torch.compile(model) if "compile" in variant else model

    n_params = sum(p.numel() for p in model.parameters())
    if a.moe:  # a token passes through the router and num_experts_per_tok of the experts
        expert_params = sum(p.numel() for n, p in model.named_parameters() if ".mlp.experts." in n)
        n_params -= expert_params * (1 - cfg.num_experts_per_tok / cfg.num_experts)
    L, H, Q, V = cfg.num_hidden_layers, cfg.num_attention_heads, cfg.head_dim, cfg.vocab_size
    # tied embeddings: counted once, as the LM head matmul (the input lookup costs no FLOPs)
    flops_per_token = 6 * n_params + 12 * L * H * Q * seq

    def step():
        x = torch.randint(0, V, (mbs, seq), device=dev)
        with torch.autocast(dev, dtype=torch.bfloat16, enabled=not pure_bf16):
            out = fwd(input_ids=x, labels=x)
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return out.loss

    sync = torch.cuda.synchronize if dev == "cuda" else (lambda: None)
    t_compile = time.perf_counter()
    for _ in range(a.warmup):
        loss = step()
    sync()
    t_compile = time.perf_counter() - t_compile
    if dev == "cuda":
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    for _ in range(a.steps):
        loss = step()
    sync()
    dt = (time.perf_counter() - t0) / a.steps
    tok_s = mbs * seq / dt
    peak = torch.cuda.max_memory_allocated() / 2**30 if dev == "cuda" else 0.0
    print(json.dumps(dict(
        variant=variant, mbs=mbs, seq=seq, params=n_params, step_s=round(dt, 4), tokens_per_s=round(tok_s),
        tflops=round(tok_s * flops_per_token / 1e12, 1), mfu_989=round(tok_s * flops_per_token / 989e12, 4),
        peak_mem_gib=round(peak, 1), warmup_s=round(t_compile, 1), loss=round(float(loss.detach()), 3),
        gpu=torch.cuda.get_device_name() if dev == "cuda" else "cpu", torch=torch.__version__,
    )), flush=True)


if __name__ == "__main__":
    main()
