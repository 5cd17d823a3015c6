"""Training metrics: FLOPs/token and MFU (../anchors convention), the Megatron-shaped log line,
JSONL and TensorBoard writers.

FLOPs per token = 6 N + 12 L H Q T: N every parameter a token passes through (MoE: the routed
experts only, Qwen3Config.num_active_params), the tied embedding counted once
(as the LM-head matmul), L layers, H query heads, Q head dim, T sequence length.
"""

from __future__ import annotations

import json
import math
import os
from typing import Any, Optional


def flops_per_token(cfg, seq_length: int) -> float:
    """Training FLOPs per token (forward + backward), anchors.md convention; `cfg.num_params`
    counts the tied embedding once."""
    return 6.0 * cfg.num_active_params + 12.0 * cfg.num_hidden_layers * cfg.num_attention_heads * cfg.head_dim * seq_length


def device_peak_flops(device) -> Optional[float]:
    """Peak bf16 FLOP/s of one device from qtrain.device, or None when unknown (e.g. CPU)."""
    try:
        from qtrain.device import peak_flops
    except ImportError:
        return None
    try:
        return peak_flops(device)
    except Exception:  # an unknown card: report TFLOP/s without MFU rather than fail the run
        return None


def megatron_log_line(m: dict[str, Any], train_iters: int, extra: Optional[dict[str, float]] = None) -> str:
    """One log line in the shape of Megatron's training_log; `extra` metrics (e.g. preference
    training's rewards) follow the loss."""
    parts = [f" iteration {m['iteration']:8d}/{train_iters:8d}",
             f"consumed samples: {m['consumed_samples']:12d}",
             f"elapsed time per iteration (ms): {m['step_time_ms']:.1f}",
             f"learning rate: {m['lr']:.6E}",
             f"global batch size: {m['global_batch_size']:5d}",
             f"lm loss: {m['loss']:.6E}",
             *(f"{k}: {v:.6E}" for k, v in (extra or {}).items()),
             f"grad norm: {m['grad_norm']:.3f}",
             f"tokens/s/device: {m['tokens_per_s_per_device']:.1f}",
             f"TFLOP/s/device: {m['tflops_per_device']:.2f}"]
    if m.get("mfu") is not None:
        parts.append(f"MFU: {100 * m['mfu']:.1f}%")
    if m.get("mem_gib") is not None:
        parts.append(f"mem (GiB): {m['mem_gib']:.2f}")
    return " | ".join(parts) + " |"


def eval_log_line(iteration: int, loss: float, extra: Optional[dict[str, float]] = None) -> str:
    """Megatron's validation report shape; with `extra` metrics (a loss that is not a token
    cross-entropy, e.g. preference training's) those instead of the perplexity."""
    if extra is not None:
        return (f" validation loss at iteration {iteration} | lm loss value: {loss:.6E} | "
                + "".join(f"{k}: {v:.6E} | " for k, v in extra.items())).rstrip()
    ppl = math.exp(min(loss, 20.0))
    return (f" validation loss at iteration {iteration} | lm loss value: {loss:.6E} | "
            f"lm loss PPL: {ppl:.6E} |")


class MetricsWriter:
    """Appends metrics to <dir>/metrics.jsonl and, when asked, TensorBoard scalars (rank 0 only)."""

    def __init__(self, jsonl_dir: Optional[str], tensorboard_dir: Optional[str]):
        self._fh = None
        if jsonl_dir:
            os.makedirs(jsonl_dir, exist_ok=True)
            self._fh = open(os.path.join(jsonl_dir, "metrics.jsonl"), "a", encoding="utf-8")
        self._tb = None
        if tensorboard_dir:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:  # tensorboard is optional (extra "viz")
                SummaryWriter = None
            if SummaryWriter is not None:
                self._tb = SummaryWriter(tensorboard_dir)

    def write(self, record: dict[str, Any]) -> None:
        """One JSON line; numeric fields also go to TensorBoard under their name."""
        if self._fh:
            self._fh.write(json.dumps(record) + "\n")
            self._fh.flush()
        if self._tb:
            step = record.get("iteration", 0)
            for k, v in record.items():
                if k != "iteration" and isinstance(v, (int, float)) and v is not None:
                    self._tb.add_scalar(k, v, step)

    def close(self) -> None:
        if self._fh:
            self._fh.close()
        if self._tb:
            self._tb.close()
