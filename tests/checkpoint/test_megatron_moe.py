"""Megatron checkpoints of Qwen3-MoE: the layout MindSpeed-LLM 2.2.0's convert_ckpt_v2 writes (per-expert
and --moe-grouped-gemm), byte-identical round trips over TP x PP x EP, foreign args, and megatron-core's
own GPTModel (MoE layer spec) giving transformers' Qwen3MoeForCausalLM logits."""

from __future__ import annotations

import argparse
import contextlib
from pathlib import Path

import pytest
import torch
from ckpt_helpers import assert_byte_identical, hf_tensors

from qtrain.checkpoint.convert import main as convert
from qtrain.checkpoint.megatron import MegatronReader
from qtrain.errors import ConfigError
from tolerances import assert_close_scaled, qwen3_terms, scaled_error

# 4 experts of width 16, top-2; layer 0 dense (mlp_only_layers), layers 1-3 sparse
TINY_MOE = dict(vocab_size=128, hidden_size=32, intermediate_size=48, moe_intermediate_size=16, num_experts=4,
                num_experts_per_tok=2, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                max_position_embeddings=64, rope_theta=10000.0, rms_norm_eps=1e-6, norm_topk_prob=True,
                mlp_only_layers=[0], tie_word_embeddings=False)


def make_moe_hf(path: Path, dtype: torch.dtype = torch.float32, seed: int = 0, **overrides) -> Path:
    """A random transformers Qwen3MoeForCausalLM saved with save_pretrained (per-expert tensors on disk)."""
    import transformers

    torch.manual_seed(seed)
    model = transformers.Qwen3MoeForCausalLM(transformers.Qwen3MoeConfig(**{**TINY_MOE, **overrides}))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:  # away from 1, so a swapped norm shows
                p.uniform_(0.5, 1.5)
            elif "mlp.gate" in name:  # a decisive router: a wrong expert order changes the routing
                p.normal_(0, 1.0)
    model.to(dtype).save_pretrained(path)
    return path


def run(*argv) -> None:
    assert convert([str(a) for a in argv]) == 0


def to_mg(src: Path, dst: Path, tp: int = 1, pp: int = 1, ep: int = 1, grouped: bool = False,
          load: str = "hf") -> Path:
    run("--load-model-type", load, "--save-model-type", "mg", "--load-dir", src, "--save-dir", dst,
        "--target-tensor-parallel-size", tp, "--target-pipeline-parallel-size", pp,
        "--target-expert-parallel-size", ep, *(["--moe-grouped-gemm"] if grouped else []))
    return dst


def rank_file(mg: Path, folder: str) -> dict:
    return torch.load(mg / "iter_0000001" / folder / "model_optim_rng.pt", weights_only=False)


@pytest.fixture(scope="module")
def moe_hf(tmp_path_factory) -> Path:
    return make_moe_hf(tmp_path_factory.mktemp("moe_hf"), dtype=torch.bfloat16)


# ----------------------------------------------------------------------------- layout, no megatron-core

def mindspeed_grouped(hf: dict, layer: int, experts: int, hidden: int, tp: int, ep: int):
    """convert_ckpt_v2's set_model_layer_mlp for --moe-grouped-gemm, step for step (its TP interleave of
    gate/up, the transposes, the views): {(ep_rank, tp_rank): (weight1, weight2)}."""
    fc1s, fc2s = [], []
    for e in range(experts):
        p = f"model.layers.{layer}.mlp.experts.{e}."
        gate, up, down = hf[p + "gate_proj.weight"], hf[p + "up_proj.weight"], hf[p + "down_proj.weight"]
        fc1 = torch.cat([torch.cat(w, dim=0) for w in zip(torch.chunk(gate, tp, 0), torch.chunk(up, tp, 0))], 0)
        fc1s.append(fc1.t())
        fc2s.append(down.t())
    w1 = torch.chunk(torch.cat(fc1s).view(hidden, -1).view(experts, hidden, -1), ep, dim=0)
    w2 = torch.chunk(torch.cat(fc2s).view(-1, hidden).view(experts, -1, hidden), ep, dim=0)
    out = {}
    for e in range(ep):
        a, b = torch.chunk(w1[e], tp, dim=2), torch.chunk(w2[e], tp, dim=1)
        for t in range(tp):
            out[e, t] = a[t].reshape(hidden, -1), b[t].reshape(-1, hidden)
    return out


def test_grouped_and_per_expert_layout_as_mindspeed_writes_it(moe_hf, tmp_path):
    """TP2 PP2 EP2: folder names, router, weight1/weight2 (grouped) and local_experts (per expert)
    equal what convert_ckpt_v2's own code makes of the same HF tensors; the dense layer is untouched."""
    hf = hf_tensors(moe_hf)
    grouped = to_mg(moe_hf, tmp_path / "g", tp=2, pp=2, ep=2, grouped=True)
    plain = to_mg(moe_hf, tmp_path / "p", tp=2, pp=2, ep=2)
    folders = sorted(p.name for p in (grouped / "iter_0000001").iterdir())
    assert folders == [f"mp_rank_{t:02d}_{p:03d}_{e:03d}" for t in range(2) for p in range(2) for e in range(2)]
    for p in range(2):
        for e in range(2):
            for t in range(2):
                g = rank_file(grouped, f"mp_rank_{t:02d}_{p:03d}_{e:03d}")
                sd, per = g["model"], rank_file(plain, f"mp_rank_{t:02d}_{p:03d}_{e:03d}")["model"]
                args = g["args"]
                assert (args.num_experts, args.moe_router_topk, args.moe_ffn_hidden_size) == (4, 2, 16)
                assert args.expert_model_parallel_size == 2 and args.moe_grouped_gemm
                assert args.moe_layer_freq == [0, 1, 1, 1] and args.first_k_dense_replace is None
                for local in range(2):
                    layer = 2 * p + local
                    m = f"decoder.layers.{local}.mlp."
                    if layer == 0:
                        assert m + "linear_fc1.weight" in sd and m + "router.weight" not in sd
                        continue
                    assert torch.equal(sd[m + "router.weight"], hf[f"model.layers.{layer}.mlp.gate.weight"])
                    w1, w2 = mindspeed_grouped(hf, layer, 4, 32, tp=2, ep=2)[e, t]
                    assert torch.equal(sd[m + "experts.weight1"], w1) and sd[m + "experts.weight1"].shape == (32, 32)
                    assert torch.equal(sd[m + "experts.weight2"], w2) and sd[m + "experts.weight2"].shape == (16, 32)
                    assert not any(".local_experts." in k for k in sd)
                    for i in range(2):  # per expert: expert 2e + i, split over TP like a dense MLP
                        x = f"model.layers.{layer}.mlp.experts.{2 * e + i}."
                        gate, up = hf[x + "gate_proj.weight"].chunk(2)[t], hf[x + "up_proj.weight"].chunk(2)[t]
                        fc1 = per[f"{m}experts.local_experts.{i}.linear_fc1.weight"]
                        assert torch.equal(fc1, torch.cat([gate, up]))
                        assert torch.equal(per[f"{m}experts.local_experts.{i}.linear_fc2.weight"],
                                           hf[x + "down_proj.weight"].chunk(2, dim=1)[t])
                        assert per[f"{m}experts.local_experts.{i}.linear_fc1._extra_state"] is None
    # EP without PP: the single suffix is the EP rank (Megatron's and convert_ckpt_v2's naming)
    ep_only = to_mg(moe_hf, tmp_path / "ep", ep=2, grouped=True)
    assert sorted(p.name for p in (ep_only / "iter_0000001").iterdir()) == ["mp_rank_00_000", "mp_rank_00_001"]
    run("--load-model-type", "mg", "--save-model-type", "hf", "--load-dir", ep_only, "--save-dir", tmp_path / "back",
        "--moe-grouped-gemm")
    assert_byte_identical(hf, hf_tensors(tmp_path / "back"))


def test_round_trips_are_byte_identical(moe_hf, tmp_path):
    """HF -> mg (TP2 PP2 EP2, both expert layouts) -> HF, mg -> mg re-laid out (EP2 grouped -> EP4 per
    expert, PP2 -> 1) -> HF, and HF -> qtrain -> mg -> qtrain -> HF: every tensor's bytes come back."""
    hf = hf_tensors(moe_hf)
    for grouped in (True, False):
        mg = to_mg(moe_hf, tmp_path / f"mg{grouped}", tp=2, pp=2, ep=2, grouped=grouped)
        back = tmp_path / f"hf{grouped}"
        run("--load-model-type", "mg", "--save-model-type", "hf", "--load-dir", mg, "--save-dir", back,
            *(["--moe-grouped-gemm"] if grouped else []), "--model-type-hf", "qwen3-moe")
        assert_byte_identical(hf, hf_tensors(back))
    relaid = to_mg(tmp_path / "mgTrue", tmp_path / "relaid", tp=1, pp=1, ep=4, load="mg")
    assert MegatronReader(relaid).ep == 4 and not MegatronReader(relaid).grouped
    run("--load-model-type", "mg", "--save-model-type", "hf", "--load-dir", relaid, "--save-dir", tmp_path / "hf2")
    assert_byte_identical(hf, hf_tensors(tmp_path / "hf2"))
    # through qtrain's own format (stacked experts) both ways: hf -> qtrain -> mg -> qtrain -> hf
    run("--load-model-type", "hf", "--save-model-type", "qtrain", "--load-dir", moe_hf, "--save-dir", tmp_path / "q")
    to_mg(tmp_path / "q", tmp_path / "qmg", pp=2, ep=2, grouped=True, load="qtrain")
    run("--load-model-type", "mg", "--save-model-type", "qtrain", "--load-dir", tmp_path / "qmg", "--save-dir",
        tmp_path / "q2", "--moe-grouped-gemm")
    run("--load-model-type", "qtrain", "--save-model-type", "hf", "--load-dir", tmp_path / "q2", "--save-dir",
        tmp_path / "hf3")
    assert_byte_identical(hf, hf_tensors(tmp_path / "hf3"))


def test_refusals_name_the_option(moe_hf, tmp_path, capsys):
    from qtrain import cli

    def err(*argv) -> str:
        assert cli.main(["convert"] + [str(a) for a in argv]) == 1
        return capsys.readouterr().err

    base = ("--load-model-type", "hf", "--save-model-type", "mg", "--load-dir", moe_hf)
    assert "does not divide the model's num_experts (4)" in err(*base, "--save-dir", tmp_path / "a",
                                                                 "--target-expert-parallel-size", "3")
    assert "holds a qwen3-moe model (4 experts)" in err(*base, "--save-dir", tmp_path / "b", "--model-type-hf", "qwen3")
    assert "--expert-tensor-parallel-size 1" in err(*base, "--save-dir", tmp_path / "c",
                                                    "--target-tensor-parallel-size", "2",
                                                    "--expert-tensor-parallel-size", "1")
    mg = to_mg(moe_hf, tmp_path / "mg", ep=2, grouped=True)
    msg = err("--load-model-type", "mg", "--save-model-type", "hf", "--load-dir", mg, "--save-dir", tmp_path / "d")
    assert "--moe-grouped-gemm is off" in msg and "weight1/weight2" in msg


def mindspeed_moe_args(args: argparse.Namespace) -> argparse.Namespace:
    """qtrain's args reduced to what convert_ckpt_v2 records for qwen3-moe (model_cfg.json: no top-k,
    no norm_topk_prob, first_k_dense_replace 0, moe_layer_freq 1, moe_intermediate_size)."""
    keep = {k: getattr(args, k) for k in (
        "num_layers", "hidden_size", "num_attention_heads", "num_key_value_heads", "vocab_size", "intermediate_size",
        "norm_epsilon", "rotary_base", "kv_channels", "max_position_embeddings", "untie_embeddings_and_output_weights",
        "tensor_model_parallel_size", "pipeline_model_parallel_size", "expert_model_parallel_size",
        "expert_tensor_parallel_size", "num_experts", "moe_intermediate_size", "moe_grouped_gemm", "normalization",
        "swiglu", "qk_layernorm", "add_bias_linear", "tie_word_embeddings", "torch_dtype")}
    return argparse.Namespace(**keep, first_k_dense_replace=0, moe_layer_freq=1, qkv_type="unpack",
                              mlp_experts_flag=True, model_type_hf="qwen3-moe", seq_length=4096)


def test_reads_mindspeed_moe_args_and_says_what_it_assumed(tmp_path, capsys):
    """Without qtrain's HF config in the args (a MindSpeed-LLM checkpoint), the MoE shape comes from
    num_experts / moe_intermediate_size and the routing it does not record is Qwen3-MoE's, said once."""
    src = make_moe_hf(tmp_path / "hf", mlp_only_layers=[], num_experts_per_tok=8, num_experts=8, seed=1)
    mg = to_mg(src, tmp_path / "mg", pp=2, ep=2, grouped=True)
    for path in (mg / "iter_0000001").glob("*/model_optim_rng.pt"):
        obj = torch.load(path, weights_only=False)
        obj["args"] = mindspeed_moe_args(obj["args"])
        torch.save(obj, path, pickle_protocol=4)
    capsys.readouterr()
    run("--load-model-type", "mg", "--save-model-type", "hf", "--load-dir", mg, "--save-dir", tmp_path / "back",
        "--moe-grouped-gemm")
    assert "do not record moe_router_topk and norm_topk_prob" in capsys.readouterr().err
    assert_byte_identical(hf_tensors(src), hf_tensors(tmp_path / "back"))
    cfg = MegatronReader(mg).config
    assert (cfg.num_experts, cfg.num_experts_per_tok, cfg.moe_intermediate_size, cfg.norm_topk_prob) == (8, 8, 16, True)
    obj = torch.load(mg / "iter_0000001" / "mp_rank_00_000_000" / "model_optim_rng.pt", weights_only=False)
    obj["args"].n_shared_experts = 2
    torch.save(obj, mg / "iter_0000001" / "mp_rank_00_000_000" / "model_optim_rng.pt")
    with pytest.raises(ConfigError, match="n_shared_experts=2"):
        MegatronReader(mg)


# ----------------------------------------------------------------------------- megatron-core parity

@pytest.fixture(scope="module")
def mcore(tmp_path_factory):
    """megatron-core on CPU: a 1-rank gloo group; test-only patches for calls that assume CUDA, and for
    megatron-core 0.16.1's router, which names Transformer Engine's te_general_gemm without TE installed
    (moe_utils.py defines it only when TE imports)."""
    pytest.importorskip("megatron.core")
    import torch.distributed as dist
    from megatron.core import parallel_state, tensor_parallel
    from megatron.core.transformer.moe import moe_utils

    own_group = not dist.is_initialized()
    if own_group:
        store = tmp_path_factory.mktemp("pg") / "store"
        dist.init_process_group("gloo", init_method=f"file://{store}", rank=0, world_size=1)
    parallel_state.initialize_model_parallel(1, 1)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(torch.cuda, "current_device", lambda: "cpu")
        mp.setattr(tensor_parallel.get_cuda_rng_tracker(), "fork", lambda *a, **k: contextlib.nullcontext())
        mp.setattr(moe_utils, "te_general_gemm", None, raising=False)
        yield mp
    parallel_state.destroy_model_parallel()
    if own_group:
        dist.destroy_process_group()


def _reference_gmm(x, w, tokens_per_expert, trans_b=False):
    """grouped_gemm.ops.gmm (not installable on CPU) written out: rows of x sorted by expert, one
    matmul per expert with its [in, out] weight (GroupedMLP passes trans_b=False)."""
    assert not trans_b
    out, start = [], 0
    for e, n in enumerate(tokens_per_expert.tolist()):
        out.append(x[start:start + n] @ w[e])
        start += n
    return torch.cat(out)


def moe_gpt_model(cfg, grouped: bool, mp):
    """megatron-core's GPTModel with its local (non-TE) MoE decoder spec: SequentialMLP experts, or
    the legacy GroupedMLP (grouped_gemm's gmm replaced by the reference above; its bf16-only assert
    met by a copy of the config with bf16 set, given to the experts only: the rest runs in fp32)."""
    import copy

    import torch.nn.functional as F
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_decoder_block_spec
    from megatron.core.transformer.transformer_config import TransformerConfig

    if grouped:
        from megatron.core.transformer.moe import experts, grouped_gemm_util as gg

        mp.setattr(gg, "assert_grouped_gemm_is_available", lambda: None)
        mp.setattr(experts.gg, "ops", argparse.Namespace(gmm=_reference_gmm), raising=False)
    sparse = [0 if i in cfg.mlp_only_layers else 1 for i in range(cfg.num_hidden_layers)]
    tc = TransformerConfig(
        num_layers=cfg.num_hidden_layers, hidden_size=cfg.hidden_size, num_attention_heads=cfg.num_attention_heads,
        num_query_groups=cfg.num_key_value_heads, ffn_hidden_size=cfg.intermediate_size, kv_channels=cfg.head_dim,
        normalization="RMSNorm", layernorm_epsilon=cfg.rms_norm_eps, gated_linear_unit=True, activation_func=F.silu,
        add_bias_linear=False, qk_layernorm=True, use_cpu_initialization=True, hidden_dropout=0.0,
        attention_dropout=0.0, bias_activation_fusion=False, apply_rope_fusion=False, masked_softmax_fusion=False,
        persist_layer_norm=False, gradient_accumulation_fusion=False, params_dtype=torch.float32,
        num_moe_experts=cfg.num_experts, moe_router_topk=cfg.num_experts_per_tok,
        moe_ffn_hidden_size=cfg.moe_intermediate_size, moe_layer_freq=sparse,
        moe_router_pre_softmax=not cfg.norm_topk_prob, moe_router_load_balancing_type="none",
        moe_token_dispatcher_type="allgather", moe_grouped_gemm=grouped, moe_use_legacy_grouped_gemm=grouped)
    spec = get_gpt_decoder_block_spec(tc, use_transformer_engine=False, normalization="RMSNorm")
    model = GPTModel(tc, spec, vocab_size=cfg.vocab_size, max_sequence_length=cfg.max_position_embeddings,
                     position_embedding_type="rope", rotary_base=int(cfg.rope_theta),
                     share_embeddings_and_output_weights=cfg.tie_word_embeddings)
    for module in model.modules():
        if type(module).__name__ == "GroupedMLP":
            module.config = copy.copy(module.config)
            module.config.bf16 = True
    return model


def mcore_logits(cfg, state: dict, ids: torch.Tensor, grouped: bool, mp) -> torch.Tensor:
    model = moe_gpt_model(cfg, grouped, mp).eval()
    model.load_state_dict(state, strict=True)
    seq = ids.shape[1]
    mask = torch.triu(torch.ones(seq, seq, dtype=torch.bool), diagonal=1)[None, None]
    with torch.no_grad():
        return model(ids, torch.arange(seq).expand_as(ids), attention_mask=mask)


@pytest.mark.megatron
@pytest.mark.parametrize("grouped,norm", [(False, True), (True, False)])
def test_megatron_core_moe_logits_match_transformers(mcore, tmp_path, grouped, norm):
    """HF -> mg TP2 PP2 EP2 -> mg TP1 PP1 EP1 (qtrain), loaded strictly into megatron-core's GPTModel
    with its MoE layer spec: transformers' Qwen3MoeForCausalLM logits (fp32)."""
    import transformers

    src = make_moe_hf(tmp_path / "hf", norm_topk_prob=norm, seed=5)
    ids = torch.randint(0, 128, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = transformers.Qwen3MoeForCausalLM.from_pretrained(src, dtype=torch.float32).eval()(ids).logits
    sharded = to_mg(src, tmp_path / "sharded", tp=2, pp=2, ep=2, grouped=grouped)
    merged = to_mg(sharded, tmp_path / "merged", grouped=grouped, load="mg")
    cfg = MegatronReader(merged).config
    state = rank_file(merged, "mp_rank_00")["model"]
    want = {k for k in moe_gpt_model(cfg, grouped, mcore).state_dict()}
    assert set(state) == want  # names, `_extra_state` entries included
    out = mcore_logits(cfg, state, ids, grouped, mcore)
    terms = qwen3_terms(cfg, 16) + (cfg.num_experts, cfg.moe_intermediate_size)
    assert_close_scaled(out, ref, terms=terms, what=f"megatron-core grouped={grouped}")
    # not trivially equal: two experts swapped in one layer change the logits
    key = "decoder.layers.1.mlp.experts." + ("weight2" if grouped else "local_experts.0.linear_fc2.weight")
    w = state[key]
    state[key] = w.view(4, 16, 32).flip(0).reshape(w.shape) if grouped else \
        state["decoder.layers.1.mlp.experts.local_experts.1.linear_fc2.weight"]
    assert scaled_error(mcore_logits(cfg, state, ids, grouped, mcore), ref) > 1e-3


def test_training_load_of_a_megatron_moe_checkpoint_equals_the_hf_load(moe_hf, tmp_path):
    """`--load <Megatron dir>` (TP2 EP2 grouped) fills the model's stacked experts as `--load <HF dir>` does."""
    from qtrain.checkpoint.dcp import load_checkpoint
    from qtrain.models.qwen3 import build_model

    mg = to_mg(moe_hf, tmp_path / "mg", tp=2, ep=2, grouped=True)
    cfg = MegatronReader(mg).config
    from_mg, from_hf = build_model(cfg, "cpu"), build_model(cfg, "cpu")
    assert load_checkpoint(mg, from_mg, None).kind == "megatron"
    assert load_checkpoint(moe_hf, from_hf, None).kind == "hf"
    a, b = from_mg.state_dict(), from_hf.state_dict()
    assert "model.layers.1.mlp.experts.gate_up_proj" in a and sorted(a) == sorted(b)
    for name in a:
        assert torch.equal(a[name], b[name]), name


def test_first_stage_of_dense_layers_reads_the_layout_from_args(tmp_path):
    """PP2 with layers 0-1 dense: stage 0 has no expert tensors, so the grouped layout comes from args."""
    src = make_moe_hf(tmp_path / "hf", mlp_only_layers=[0, 1], dtype=torch.bfloat16)
    mg = to_mg(src, tmp_path / "mg", pp=2, ep=2, grouped=True)
    assert MegatronReader(mg).grouped
    run("--load-model-type", "mg", "--save-model-type", "hf", "--load-dir", mg, "--save-dir", tmp_path / "back",
        "--moe-grouped-gemm")
    assert_byte_identical(hf_tensors(src), hf_tensors(tmp_path / "back"))
