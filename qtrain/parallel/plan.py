"""`qtrain plan`: per-device memory of a model under a layout, whether it fits, and layouts that do.

The estimate follows what qtrain actually keeps (notation: P parameters held by the device's
pipeline stage, TP-sharded matrices divided by TP; F = FSDP ways = dp_shard x CP, or CP alone
without --use-distributed-optimizer; b = 2 with --bf16 else 4; per token of a micro-batch):

  weights      4 P / F          fp32 master weights (FSDP shards them)
  grads        4 P / F          fp32 gradients (reduced in fp32); 4 P with gradient accumulation
                                (more than one micro-batch per step, or PP): FSDP2 without
                                gradient sync keeps every parameter's unsharded gradient, upcast
                                to fp32, until the last micro-batch's backward reduce-scatters it
  optimizer    8 P / F          AdamW exp_avg + exp_avg_sq in fp32
  transient    b x (the root unit + 2 decoder layers) gathered by FSDP (current and prefetched),
               plus the unsharded LM-head gradient (FSDP2 wraps the model on every layout, one
               device included); under PP b x P: the pipeline schedule keeps the stage's gathered
               weights from the first micro-batch's forward to the last one's backward
  activations  tokens x (sum over the stage's layers of A) x micro-batches in flight; the last
               stage adds its final RMSNorm (4H + bH + 4 per token, / TP under SP)
  loss         the chunked LM-head loss, as `qtrain.ops.linear_cross_entropy` runs it on every
               layout (no logits; `loss_working_bytes`): one chunk of fp32 logits over the
               vocabulary shard (4 + b bytes per element with bf16, for its gradient's copy;
               chunks of at most 2^27 elements, Qwen3: 768 tokens on one device) and the
               gradient of the hidden states (b x tokens x H; twice under SP, with the gathered
               hidden states); with Liger on CUDA (TP = 1) instead its fp32 head-gradient
               accumulator (4 V H) and a chunk of tokens x H elements. Which path is the one
               the loop takes on `device_type` (default: this machine's)

Per decoder layer and token, with H hidden, Q = heads x head_dim, K = kv heads x head_dim, n / m
query / kv heads, I = FFN size; everything after "|" is divided by TP (the norm terms too under
--sequence-parallel):

  no recompute   2(4H + bH + 4) [two RMSNorms: fp32 input, normed output, 1/rms]  +  2bH [inputs
                 of the q/k/v and gate/up matmuls, all-gathered under SP]
                 | 4Q + bQ + 4K + bK + 4(n + m) [q/k norms] + 2bQ + 2bK + 4n [SDPA q, k, v, output,
                 log-sum-exp; the output is also o_proj's input] + 4bI [SwiGLU: gate, up, silu(gate),
                 down_proj's input]
  selective      bH [layer input]  +  2bH [o_proj, down_proj outputs]
                 | bQ + 2bK [q/k/v projections] + bQ + 4n [SDPA output, log-sum-exp] + 2bI [gate, up]
  full           bH [layer input only]; the layer being recomputed adds one "no recompute" layer

Context parallel divides the tokens by CP (per-rank activations fall as 1/CP) and adds, per local
token, what its attention keeps for the backward (`cp_attention_bytes`): the ring
(megatron_cp_algo) its float32 output and log-sum-exp, 4Q + 4n | ; Ulysses its q, k, v and output
re-laid over whole sequences, b(2Q + 2K) | ; hybrid both. The ring's transient is one chunk of
float32 score blocks at a time (`ring_attention.SCORE_CHUNK_BYTES`, four live copies: scores,
probabilities, their gradient, a product), whatever the sequence length. 1F1B keeps min(micro-batches, PP)
micro-batches in flight on the first stage; the interleaved schedule (v chunks) multiplies that
by 1 + (PP-1)/(PP v), as Megatron's estimate does.

Offload (qtrain.parallel.offload): with --optimizer-cpu-offload weights, grads and optimizer
leave the device (`host`: their 16 P / F bytes in pinned host memory, not in the device total);
the device adds, to the transient, the fp32 shards of the units being gathered (4 x (root + 2
layers) / F) and one unit's fp32 reduce-scattered gradient before it moves to the host. With
--cpu-offloading the first N decoder layers keep no activations on the device, but one layer's
worth is in transit (copied out in the forward, back in the backward); the host holds the N
layers' activations.

These formulas count the tensors autograd saves for qtrain's layer (no dropout, flash or
efficient SDPA, whose output is laid out [B, S, heads, D] so o_proj reads it without a copy). tests/parallel/test_plan.py checks them against the bytes saved by the
tiny model on CPU; the GPU peak of Qwen3-1.7B is in benchmarks/results when it was measured.

Qwen3-MoE layers (router, experts, expert parallelism, all-to-all buffers): parallel/moe_plan.py.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

from qtrain.cli import ArgumentParser
from qtrain.errors import ConfigError
from qtrain.parallel.mesh import ParallelDims, parallel_args, stage_layers, validate_layout

GIB = 1024 ** 3


@dataclass
class MemoryEstimate:
    """Bytes per device on the busiest pipeline stage, by component."""

    weights: float
    grads: float
    optimizer: float
    transient: float
    activations: float
    loss: float
    dims: ParallelDims = field(default_factory=ParallelDims)
    loss_path: str = ""  # how the loop computes the loss on this layout and device
    stage: int = 0  # the pipeline stage (rank) described
    reference: float = 0.0  # preference training's frozen reference copy (qtrain dpo)
    host: float = 0.0  # pinned host memory per rank (offloaded optimizer state, activations), not in `total`
    ep: int = 1  # expert parallelism (MoE)
    params: float = 0.0  # parameters held by the stage (experts: the EP rank's share), before FSDP sharding

    @property
    def total(self) -> float:
        return self.weights + self.grads + self.optimizer + self.transient + self.activations + self.loss \
            + self.reference

    def gib(self) -> dict[str, float]:
        names = ("weights", "grads", "optimizer", "transient", "activations", "loss") + \
            (("reference",) if self.reference else ())
        return {**{n: getattr(self, n) / GIB for n in names}, "total": self.total / GIB,
                **({"host": self.host / GIB} if self.host else {})}

    def items(self):
        """(component, GiB) pairs, so the estimate prints like a dict (train.plan's dry run)."""
        return self.gib().items()

    def fits(self, device_memory_gb: float, reserve: float = 0.05) -> bool:
        """True when the total leaves `reserve` of the device free (allocator slack, CUDA context)."""
        return self.total <= device_memory_gb * GIB * (1 - reserve)


def layer_params(m, tp: int, ffn: Optional[int] = None) -> tuple[float, float]:
    """(TP-sharded, replicated) parameter counts of one decoder layer on one TP rank; `ffn`: the dense
    MLP's width (default intermediate_size; 0 for a MoE layer, whose experts moe_plan counts)."""
    h, q, k = m.hidden_size, m.num_attention_heads * m.head_dim, m.num_key_value_heads * m.head_dim
    i = m.intermediate_size if ffn is None else ffn
    sharded = h * q * 2 + h * k * 2 + 3 * h * i
    if m.attention_bias:
        sharded += q + 2 * k
    return sharded / tp, 2 * h + 2 * m.head_dim


def cp_attention_bytes(m, bytes_per_el: int, cp: int, algo: str = "megatron_cp_algo") -> float:
    """Bytes per local token (before dividing by TP) that context-parallel attention keeps for the
    backward beyond plain attention's (module doc)."""
    if cp == 1:
        return 0.0
    q, k, n = m.num_attention_heads * m.head_dim, m.num_key_value_heads * m.head_dim, m.num_attention_heads
    ring = 4 * q + 4 * n
    ulysses = bytes_per_el * (2 * q + 2 * k)
    return {"megatron_cp_algo": ring, "ulysses_cp_algo": ulysses}.get(algo, ring + ulysses)


def layer_activation_bytes(m, bytes_per_el: int, tp: int = 1, sp: bool = False, cp: int = 1,
                           mode: Optional[str] = None, cp_algo: str = "megatron_cp_algo",
                           layer: Optional[int] = None) -> float:
    """Bytes one decoder layer saves for the backward, per local token (formulas in the module doc).
    mode: None (no recompute), "selective" or "full". `layer`: its index, which says whether it is a
    MoE layer (router and experts instead of the dense MLP; moe_plan)."""
    from qtrain.parallel import moe_plan

    if layer is not None and moe_plan.is_moe_layer(m, layer):
        return _layer_activation_bytes(m, bytes_per_el, tp, sp, cp, mode, cp_algo, ffn=0) + \
            moe_plan.mlp_activation_bytes(m, bytes_per_el, tp, sp, mode)
    return _layer_activation_bytes(m, bytes_per_el, tp, sp, cp, mode, cp_algo)


def _layer_activation_bytes(m, bytes_per_el: int, tp: int = 1, sp: bool = False, cp: int = 1,
                            mode: Optional[str] = None, cp_algo: str = "megatron_cp_algo",
                            ffn: Optional[int] = None) -> float:
    b, h = bytes_per_el, m.hidden_size
    n, kv_heads = m.num_attention_heads, m.num_key_value_heads
    q, k = n * m.head_dim, kv_heads * m.head_dim
    i = m.intermediate_size if ffn is None else ffn
    seq_div = tp if sp else 1
    kv_sdpa = 2 * b * k + cp_attention_bytes(m, b, cp, cp_algo)
    if mode == "full":
        return b * h / seq_div
    if mode == "selective":
        return b * h / seq_div + 2 * b * h + (b * q + 2 * b * k + b * q + 4 * n + 2 * b * i
                                              + cp_attention_bytes(m, b, cp, cp_algo)) / tp
    return (2 * (4 * h + b * h + 4) / seq_div + 2 * b * h
            + (4 * q + b * q + 4 * k + b * k + 4 * (n + kv_heads) + 2 * b * q + kv_sdpa + 4 * n + 4 * b * i) / tp)


def final_norm_bytes(m, bytes_per_el: int, tp: int = 1, sp: bool = False) -> float:
    """Bytes the last stage's final RMSNorm keeps for the backward, per local token (its output, the
    loss's input, is not kept: the chunked loss stores gradients, not inputs)."""
    return (4 * m.hidden_size + bytes_per_el * m.hidden_size + 4) / (tp if sp else 1)


def estimate_memory(model_cfg, cfg: Any, world_size: int, *, micro_batch_size: Optional[int] = None,
                    seq_length: Optional[int] = None, bf16: Optional[bool] = None,
                    num_microbatches: Optional[int] = None, device_type: Optional[str] = None,
                    stage: Optional[int] = None, reference_copy: bool = False,
                    per_token_loss: bool = False) -> MemoryEstimate:
    """Per-device memory of `model_cfg` trained under the layout of `cfg` (a PretrainConfig, or
    ParallelArgs with the keyword arguments) on `world_size` devices of `device_type` ("cuda",
    "npu", "cpu"; default: this machine's, which decides the loss path). Raises ConfigError for
    an invalid layout. The busiest pipeline stage is reported, or pipeline rank `stage` (-1: the
    last, which computes the loss).

    Preference training (qtrain dpo; pass micro_batch_size = 2 x pairs): `per_token_loss`, the
    per-token chunked loss (on every device), which keeps its input (b H per token, gathered under
    SP) and each token's log-sum-exp (4) for its backward;
    `reference_copy`, DPO's frozen reference model: b x the stage's parameters / F (weights
    only, in the compute dtype; its forward runs before the policy's, so its transients do not
    add to the policy's)."""
    from qtrain.ops.linear_cross_entropy import loss_working_bytes
    from qtrain.ops.vocab_parallel_linear_cross_entropy import chunk_tokens, working_bytes

    t = getattr(cfg, "training", None)
    mbs = micro_batch_size or (t.micro_batch_size if t else 1)
    seq = seq_length or (cfg.data.seq_length if hasattr(cfg, "data") else None)
    if seq is None:
        raise ConfigError("estimate_memory needs seq_length (--seq-length)")
    bf16 = bool(t.bf16 if bf16 is None and t else bf16)
    p = parallel_args(cfg)
    dims = validate_layout(cfg, world_size, model_cfg, seq)
    if num_microbatches is None:
        gbs = (t.global_batch_size if t else None) or mbs * dims.dp
        num_microbatches = max(1, gbs // (mbs * dims.dp))
    b = 2 if bf16 else 4
    if device_type is None:
        from qtrain.device import device_type as this_machine

        device_type = this_machine()
    m, tp = model_cfg, dims.tp
    stages = stage_layers(p, m.num_hidden_layers)
    off = getattr(cfg, "offload", None)
    opt_off = bool(off is not None and off.optimizer_offloaded)
    act_off_layers = off.cpu_offloading_num_layers if off is not None and off.cpu_offloading else 0
    fsdp_ways = dims.dp_shard * dims.cp
    tokens = mbs * seq // dims.cp
    lay_sharded, lay_repl = layer_params(m, tp)
    embed = m.vocab_size * m.hidden_size / tp
    from qtrain.parallel import moe_plan

    moe = getattr(cfg, "moe", None)
    ep = getattr(moe, "expert_model_parallel_size", 1) or 1
    moe_plan.check_ep(m, ep, dims.dp, dims.cp)
    if opt_off and ep > 1:  # as training refuses it (qtrain.parallel.parallelize)
        raise ConfigError("--optimizer-cpu-offload / --swap-optimizer with --expert-model-parallel-size > 1 is not "
                          "supported yet; use one of them")
    moe_sharded, _ = layer_params(m, tp, ffn=0)
    moe_repl = lay_repl + moe_plan.router_params(m)
    local_experts = moe_plan.expert_params(m) / ep if moe_plan.num_experts(m) else 0.0
    best: Optional[MemoryEstimate] = None
    for rank, chunks in enumerate(stages):
        first, last = rank == 0, rank == len(stages) - 1
        layers = [i for c in chunks for i in c]
        n_moe = sum(moe_plan.is_moe_layer(m, i) for i in layers)
        root = (embed if first else 0) + ((m.hidden_size + (0 if m.tie_word_embeddings and first else embed))
                                          if last else 0)
        dense = (len(layers) - n_moe) * (lay_sharded + lay_repl) + n_moe * (moe_sharded + moe_repl) + root
        experts = n_moe * local_experts  # EP rank's experts, sharded further by expert-FSDP
        params = dense + experts
        biggest = max(moe_sharded + moe_repl + local_experts if n_moe else 0, lay_sharded + lay_repl)
        gathered = params if dims.pp > 1 else root + 2 * biggest
        transient = b * gathered + (b * embed if last else 0) + \
            (moe_plan.a2a_buffer_bytes(m, tokens, b, ep) if n_moe else 0)
        if dims.cp > 1 and getattr(p, "context_parallel_algo", "megatron_cp_algo") != "ulysses_cp_algo":
            from qtrain.parallel.ring_attention import SCORE_CHUNK_BYTES

            transient += 4 * SCORE_CHUNK_BYTES  # the ring's score blocks (module doc)
        state = dense / fsdp_ways + experts * ep / moe_plan.expert_ways(ep, fsdp_ways)
        acts = _stage_activations(m, p, dims, chunks, rank, b, num_microbatches, act_off_layers) * tokens
        loss, loss_path = 0.0, ""
        if last:
            acts += tokens * final_norm_bytes(m, b, tp, p.sequence_parallel)
            loss, loss_path = loss_working_bytes(tokens, m.vocab_size, m.hidden_size, b, tp, p.sequence_parallel,
                                                 device_type)
            if per_token_loss:  # the chunked path on every device (Liger's kernel only sums)
                acts += tokens * (b * m.hidden_size + 4)  # the (gathered) hidden states and the log-sum-exps
                loss = working_bytes(tokens, m.vocab_size // tp, m.hidden_size, b, p.sequence_parallel and tp > 1)
                loss_path = f"chunked per token, {min(tokens, chunk_tokens(m.vocab_size // tp))} tokens per chunk" \
                    + (", vocab-parallel" if tp > 1 else "")
        if opt_off:  # on the host; the device holds the shards of the units in use
            transient += 4 * (root + 2 * biggest) / fsdp_ways + 4 * max(root, biggest) / fsdp_ways
        on_device = 0.0 if opt_off else 1.0
        host = (16 * state if opt_off else 0.0) + act_off_layers * layer_activation_bytes(
            m, b, tp=tp, sp=p.sequence_parallel, cp=dims.cp, cp_algo=getattr(p, "context_parallel_algo",
                                                                               "megatron_cp_algo")) * tokens
        # Gradient accumulation keeps whole fp32 gradients on the device (offloaded or not) until the last
        # micro-batch's reduce-scatter (see "grads" above).
        accumulated = 4 * params if num_microbatches > 1 or dims.pp > 1 else 0.0
        est = MemoryEstimate(on_device * 4 * state, max(on_device * 4 * state, accumulated), on_device * 8 * state,
                             transient, acts, loss, dims, loss_path, rank,
                             b * state if reference_copy else 0.0, host=host, ep=ep, params=params)
        if stage is not None and rank == stage % len(stages):
            return est
        if best is None or est.total > best.total:
            best = est
    assert best is not None
    return best


def _stage_activations(m, p, dims: ParallelDims, chunks: list[list[int]], rank: int, b: int,
                       num_microbatches: int, offloaded_layers: int = 0) -> float:
    """Activation bytes per local token held by pipeline stage `rank` at its peak; the first
    `offloaded_layers` layers (--cpu-offloading, one stage) keep theirs in host memory."""
    from qtrain.parallel.recompute import layers_to_recompute

    kw = dict(tp=dims.tp, sp=p.sequence_parallel, cp=dims.cp,
              cp_algo=getattr(p, "context_parallel_algo", "megatron_cp_algo"))
    full = max((layer_activation_bytes(m, b, layer=i, **kw) for c in chunks for i in c), default=0.0)
    total = 0.0
    for chunk in chunks:
        recomputed = set(layers_to_recompute(len(chunk), p.recompute_granularity, p.recompute_method,
                                             p.recompute_num_layers))
        mode = p.recompute_granularity
        total += sum(0.0 if j < offloaded_layers else
                     layer_activation_bytes(m, b, mode=mode if j in recomputed else None, layer=i, **kw)
                     for j, i in enumerate(chunk))
    if offloaded_layers:
        total += full  # the layer whose tensors are on their way out (forward) or back (backward)
    in_flight = 1
    if dims.pp > 1:
        in_flight = min(num_microbatches, dims.pp - rank)
        if len(chunks) > 1:
            in_flight *= 1 + (dims.pp - 1) / (dims.pp * len(chunks))
    recompute_peak = full if p.recompute_granularity else 0.0  # the layer being recomputed
    return total * in_flight + recompute_peak


def suggest_layouts(model_cfg, cfg: Any, devices: int, device_memory_gb: float,
                    **estimate_kwargs: Any) -> list[tuple[dict, MemoryEstimate]]:
    """Layouts of `devices` devices (TP, PP, CP powers of two, FSDP on or off, recompute none /
    selective / full; for a MoE model EP too) that fit, fewest model-parallel ways and least recompute
    first (`estimate_kwargs`: estimate_memory's, e.g. preference training's). When none fits, the same
    search with the optimizer state in host memory (--optimizer-cpu-offload), then also with the
    activations of all but the last layer there (--cpu-offloading, without PP and recompute)."""
    import copy

    for optimizer_offload, activation_offload in ((False, False), (True, False), (True, True)):
        c = copy.deepcopy(cfg)
        if hasattr(c, "offload"):
            c.offload.optimizer_cpu_offload, c.offload.cpu_offloading = optimizer_offload, activation_offload
            c.offload.cpu_offloading_num_layers = model_cfg.num_hidden_layers - 1 if activation_offload else 0
        elif optimizer_offload:
            break
        found = _search_layouts(model_cfg, c, devices, device_memory_gb, activation_offload, **estimate_kwargs)
        if found:
            return found
    return []


def _search_layouts(model_cfg, cfg: Any, devices: int, device_memory_gb: float, activation_offload: bool,
                    **estimate_kwargs: Any) -> list[tuple[dict, MemoryEstimate]]:
    import copy
    import itertools

    from qtrain.parallel.moe_plan import num_experts

    off = getattr(cfg, "offload", None)
    out = []
    pw = [x for x in (1, 2, 4, 8, 16, 32, 64) if x <= devices]
    eps = [x for x in pw if num_experts(model_cfg) % x == 0] if num_experts(model_cfg) else [1]
    for tp, pp, cp, ep in itertools.product(pw, pw, pw, eps):
        if devices % (tp * pp * cp) or (devices // (tp * pp)) % ep:
            continue
        if activation_offload and pp > 1:
            continue
        for fsdp in (True, False):
            for rec in ((None,) if activation_offload else (None, "selective", "full")):
                c = copy.deepcopy(cfg)
                q = c.parallel
                q.tensor_model_parallel_size, q.pipeline_model_parallel_size = tp, pp
                q.context_parallel_size, q.use_distributed_optimizer = cp, fsdp
                q.sequence_parallel = tp > 1
                q.num_layers_per_virtual_pipeline_stage, q.num_layer_list = None, None
                q.recompute_granularity = rec
                q.recompute_method, q.recompute_num_layers = ("uniform", 1) if rec == "full" else (None, None)
                if hasattr(c, "moe"):
                    c.moe.expert_model_parallel_size = ep
                if pp > 1 and (c.training.global_batch_size or 0) < c.training.micro_batch_size * pp * (
                        devices // (tp * pp * cp)):
                    c.training.global_batch_size = c.training.micro_batch_size * pp * (devices // (tp * pp * cp))
                try:
                    est = estimate_memory(model_cfg, c, devices, **estimate_kwargs)
                except ConfigError:
                    continue
                if est.fits(device_memory_gb):
                    layout = {"tp": tp, "pp": pp, "cp": cp, **({"ep": ep} if len(eps) > 1 else {}),
                              "dp": devices // (tp * pp * cp),
                              "distributed_optimizer": fsdp, "sequence_parallel": tp > 1,
                              "recompute": rec or "none"}
                    if off is not None and off.optimizer_offloaded:
                        layout["optimizer_cpu_offload"] = True
                    if off is not None and off.cpu_offloading:
                        layout["cpu_offloading_num_layers"] = off.cpu_offloading_num_layers
                    out.append((layout, est))
    cost = {"none": 0, "selective": 1, "full": 2}
    out.sort(key=lambda le: (le[0]["tp"] * le[0]["pp"] * le[0]["cp"], cost[le[0]["recompute"]],
                             not le[0]["distributed_optimizer"], le[1].total))
    return out


def format_estimate(est: MemoryEstimate, device_memory_gb: Optional[float],
                    last: Optional[MemoryEstimate] = None) -> str:
    """The estimate's lines; `last`: the last pipeline stage's, shown too when it is not the busiest."""
    def parts(e: MemoryEstimate) -> str:
        return ", ".join(f"{k} {v:.2f}" for k, v in e.gib().items())

    where = f" {est.stage} of {est.dims.pp}" if est.dims.pp > 1 else ""
    line = f"memory per device (GiB, busiest stage{where}): {parts(est)}"
    if last is not None and last.stage != est.stage:
        line += f"\nlast stage ({last.stage}, computes the loss): {parts(last)}"
    loss_path = est.loss_path or (last.loss_path if last is not None else "")
    if loss_path:
        line += f"\nloss: LM head + cross-entropy {loss_path} (no logits)"
    if device_memory_gb is not None:
        verdict = "fits" if est.fits(device_memory_gb) else "does NOT fit"
        line += f"\n{verdict} in {device_memory_gb:g} GB per device (5% kept free)"
    return line


def main(argv: list[str]) -> int:
    """qtrain plan [pretrain flags] --world-size N [--device-memory-gb G] [--suggest N]."""
    from qtrain.config import parse_args, resolve_model_config
    from qtrain.models.rope_scaling import describe

    own = ArgumentParser(prog="qtrain plan", add_help=False)
    own.add_argument("--world-size", type=int, default=None, help="devices of the layout (default TP x PP x CP)")
    own.add_argument("--device-memory-gb", type=float, default=None, help="memory of one device, GB")
    own.add_argument("--suggest", type=int, default=None, help="list layouts of this many devices that fit")
    own.add_argument("--stage", choices=("pretrain", "sft", "dpo", "simpo", "orpo"), default="pretrain")
    own.add_argument("-h", "--help", action="store_true")
    ns, rest = own.parse_known_args(argv)
    if ns.help:
        print("usage: qtrain plan [any `qtrain pretrain` model/parallel/batch flags] [--world-size N] "
              "[--device-memory-gb G] [--suggest N] [--stage dpo|simpo|orpo]\n\nEstimates per-device memory "
              "(weights, grads, optimizer, activations by recompute setting) and whether it fits; --suggest lists "
              "layouts that fit. --stage dpo: preference pairs (MBS pairs = 2 x MBS sequences) with a frozen "
              "reference copy (a LoRA run uses the policy with adapters off instead: leave out the reference "
              "line); simpo / orpo: pairs without a reference.")
        return 0
    cfg = parse_args(rest)
    pairs = {}
    if ns.stage in ("dpo", "simpo", "orpo"):
        pairs = {"micro_batch_size": 2 * cfg.training.micro_batch_size, "per_token_loss": True,
                 "reference_copy": ns.stage == "dpo"}
    model_cfg = resolve_model_config(cfg)
    p = cfg.parallel
    if ns.suggest is not None:
        if ns.device_memory_gb is None:
            raise ConfigError("--suggest needs --device-memory-gb")
        found = suggest_layouts(model_cfg, cfg, ns.suggest, ns.device_memory_gb, **pairs)
        print(f"layouts of {ns.suggest} devices with {ns.device_memory_gb:g} GB that fit "
              f"(seq {cfg.data.seq_length}, MBS {cfg.training.micro_batch_size}, "
              f"{'bf16' if cfg.training.bf16 else 'fp32'}):")
        for layout, est in found[:20]:
            print("  " + " ".join(f"{k}={v}" for k, v in layout.items()) + f"  total {est.total / GIB:.1f} GiB"
                  + (f", host {est.host / GIB:.1f} GiB per rank" if est.host else ""))
        if any(layout.get("ep", 1) > 1 and (layout["tp"] > 1 or layout["cp"] > 1 or not layout["distributed_optimizer"])
               for layout, _ in found[:20]):
            print("  (training runs ep > 1 with distributed_optimizer=True and tp = cp = 1 only, so far)")
        if not found:
            print("  none: raise the device count or memory, or shorten --seq-length")
            states = 16 * model_cfg.num_params / GIB  # fp32 weights, gradients and AdamW moments, fully sharded
            print(f"  (weights, gradients and optimizer state alone take {states:,.0f} GiB: at least "
                  f"{-(-states // (ns.device_memory_gb * 0.95 * 1e9 / GIB)):.0f} devices of {ns.device_memory_gb:g} GB)")
        return 0 if found else 1
    world = ns.world_size or p.tensor_model_parallel_size * p.pipeline_model_parallel_size * \
        p.context_parallel_size
    est = estimate_memory(model_cfg, cfg, world, **pairs)
    last = estimate_memory(model_cfg, cfg, world, stage=-1, **pairs)
    experts = getattr(model_cfg, "num_experts", 0) or 0
    print(f"Qwen3{'-MoE' if experts else ''} {model_cfg.num_hidden_layers} layers, hidden {model_cfg.hidden_size}"
          + (f", {experts} experts (top-{model_cfg.num_experts_per_tok})" if experts else "") + ", layout "
          f"{est.dims.describe()}{f' (EP {est.ep})' if est.ep > 1 else ''} on {world} devices, seq {cfg.data.seq_length}, "
          f"MBS {cfg.training.micro_batch_size}{' pairs' if pairs else ''}, "
          f"recompute {p.recompute_granularity or 'none'}; {describe(model_cfg.rope_theta, model_cfg.rope_scaling)}")
    print(format_estimate(est, ns.device_memory_gb, last))
    if ns.device_memory_gb is not None and not est.fits(ns.device_memory_gb):
        for line in offload_alternatives(model_cfg, cfg, world, ns.device_memory_gb, **pairs):
            print(line)
    return 0 if ns.device_memory_gb is None or est.fits(ns.device_memory_gb) else 1


def offload_alternatives(model_cfg, cfg: Any, world: int, device_memory_gb: float, **estimate_kwargs: Any) -> list[str]:
    """What the layout of `cfg` needs with the optimizer state (and, without PP and recompute, the
    activations of all but the last layer) in host memory: one line each."""
    import copy

    o, p = cfg.offload, cfg.parallel
    options = []
    if not o.optimizer_offloaded:
        options.append(("--optimizer-cpu-offload", True, o.cpu_offloading_num_layers if o.cpu_offloading else 0))
    if not o.cpu_offloading and p.pipeline_model_parallel_size == 1 and p.recompute_granularity is None:
        n = model_cfg.num_hidden_layers - 1
        options.append((f"--optimizer-cpu-offload --cpu-offloading --cpu-offloading-num-layers {n}", True, n))
    lines = []
    for flags, optimizer, layers in options:
        c = copy.deepcopy(cfg)
        c.offload.optimizer_cpu_offload, c.offload.cpu_offloading = optimizer, bool(layers)
        c.offload.cpu_offloading_num_layers = layers
        est = estimate_memory(model_cfg, c, world, **estimate_kwargs)
        verdict = "fits" if est.fits(device_memory_gb) else "does NOT fit"
        lines.append(f"with {flags}: {est.total / GIB:.2f} GiB per device ({verdict}), "
                     f"{est.host / GIB:.2f} GiB pinned host memory per rank")
    return lines
