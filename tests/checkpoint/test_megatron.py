"""Megatron legacy checkpoints: layout checked against megatron-core 0.16.1's GPTModel and its
logits against transformers' Qwen3ForCausalLM; TP shard layout checked element by element."""

from __future__ import annotations

import argparse
import contextlib
from pathlib import Path

import numpy as np
import pytest
import torch
from ckpt_helpers import hf_tensors, make_hf

from qtrain.checkpoint.convert import main as convert
from qtrain.parallel.stages import split_layers
from qtrain.checkpoint.megatron import MegatronReader, load_megatron_state_dict
from qtrain.errors import CheckpointError, ConfigError
from tolerances import assert_close_scaled, qwen3_terms, scaled_error


def run(*argv) -> None:
    assert convert([str(a) for a in argv]) == 0


def rank_file(mg: Path, tp: int, pp: int | None) -> dict:
    folder = f"mp_rank_{tp:02d}" + ("" if pp is None else f"_{pp:03d}")
    return torch.load(mg / "iter_0000001" / folder / "model_optim_rng.pt", weights_only=False)


# ----------------------------------------------------------------------------- layout, no megatron-core

def test_split_layers():
    assert split_layers(4, 2) == [[[0, 1]], [[2, 3]]]
    assert split_layers(5, 2, [1, 4]) == [[[0]], [[1, 2, 3, 4]]]
    # interleaved: chunk v of stage p is block v * pp + p
    assert split_layers(8, 2, vpp_layers=2) == [[[0, 1], [4, 5]], [[2, 3], [6, 7]]]
    with pytest.raises(ConfigError, match="do not divide"):
        split_layers(5, 2)
    with pytest.raises(ConfigError, match="summing"):
        split_layers(4, 2, [2, 3])
    with pytest.raises(ConfigError, match="must divide"):
        split_layers(8, 2, vpp_layers=3)


def test_file_contents_and_tp_shard_layout(tmp_path):
    """Each TP2 shard, rebuilt here by hand from the HF tensors, equals what was written."""
    src = make_hf(tmp_path / "hf", tied=False, dtype=torch.float32)
    hf = hf_tensors(src)
    mg = tmp_path / "mg"
    run("--load-model-type", "hf", "--save-model-type", "mg", "--load-dir", src, "--save-dir", mg,
        "--target-tensor-parallel-size", "2", "--target-pipeline-parallel-size", "2")
    heads, groups, d, tp = 4, 2, 32, 2
    per_group = heads // groups
    for pp in range(2):
        for r in range(tp):
            obj = rank_file(mg, r, pp)
            assert obj["checkpoint_version"] == 3.0 and obj["iteration"] == 1
            args = obj["args"]
            assert isinstance(args, argparse.Namespace)
            assert (args.num_layers, args.hidden_size, args.ffn_hidden_size, args.num_attention_heads,
                    args.num_query_groups, args.kv_channels, args.padded_vocab_size) == (4, 64, 96, 4, 2, 32, 256)
            assert (args.tensor_model_parallel_size, args.pipeline_model_parallel_size) == (2, 2)
            assert args.normalization == "RMSNorm" and args.swiglu and args.qk_layernorm
            assert not args.add_bias_linear and args.untie_embeddings_and_output_weights
            assert args.position_embedding_type == "rope" and args.rotary_base == 10000
            sd = obj["model"]
            for local in range(2):  # layer numbers are local to the stage
                g = pp * 2 + local
                h, m = f"model.layers.{g}.", f"decoder.layers.{local}."
                q = hf[h + "self_attn.q_proj.weight"].view(groups, per_group * d, -1)
                k = hf[h + "self_attn.k_proj.weight"].view(groups, d, -1)
                v = hf[h + "self_attn.v_proj.weight"].view(groups, d, -1)
                rows = []
                for grp in range(r * groups // tp, (r + 1) * groups // tp):
                    rows += [q[grp], k[grp], v[grp]]
                assert torch.equal(sd[m + "self_attention.linear_qkv.weight"], torch.cat(rows))
                gate, up = hf[h + "mlp.gate_proj.weight"], hf[h + "mlp.up_proj.weight"]
                half = gate.shape[0] // tp
                assert torch.equal(sd[m + "mlp.linear_fc1.weight"],
                                   torch.cat([gate[r * half:(r + 1) * half], up[r * half:(r + 1) * half]]))
                o, down = hf[h + "self_attn.o_proj.weight"], hf[h + "mlp.down_proj.weight"]
                assert torch.equal(sd[m + "self_attention.linear_proj.weight"], o.chunk(tp, dim=1)[r])
                assert torch.equal(sd[m + "mlp.linear_fc2.weight"], down.chunk(tp, dim=1)[r])
                assert torch.equal(sd[m + "self_attention.q_layernorm.weight"], hf[h + "self_attn.q_norm.weight"])
                assert torch.equal(sd[m + "pre_mlp_layernorm.weight"], hf[h + "post_attention_layernorm.weight"])
                # stored compactly: a shard's storage is its own slice, not the full tensor
                assert sd[m + "self_attention.linear_proj.weight"].untyped_storage().nbytes() == o.nbytes // tp
            if pp == 0:
                assert torch.equal(sd["embedding.word_embeddings.weight"], hf["model.embed_tokens.weight"].chunk(2)[r])
                assert "output_layer.weight" not in sd
            else:
                assert torch.equal(sd["output_layer.weight"], hf["lm_head.weight"].chunk(2)[r])
                assert torch.equal(sd["decoder.final_layernorm.weight"], hf["model.norm.weight"])
                assert "embedding.word_embeddings.weight" not in sd


def test_tied_pp_last_stage_holds_output_layer(tmp_path):
    src = make_hf(tmp_path / "hf", tied=True, dtype=torch.float32)
    mg = tmp_path / "mg"
    run("--load-model-type", "hf", "--save-model-type", "mg", "--load-dir", src, "--save-dir", mg,
        "--target-pipeline-parallel-size", "2")
    emb = hf_tensors(src)["model.embed_tokens.weight"]
    assert torch.equal(rank_file(mg, 0, 1)["model"]["output_layer.weight"], emb)
    run("--load-model-type", "hf", "--save-model-type", "mg", "--load-dir", src, "--save-dir", tmp_path / "pp1")
    assert "output_layer.weight" not in rank_file(tmp_path / "pp1", 0, None)["model"]


def test_reads_transformer_engine_names(tmp_path):
    src = make_hf(tmp_path / "hf", tied=True, dtype=torch.float32)
    mg = tmp_path / "mg"
    run("--load-model-type", "hf", "--save-model-type", "mg", "--load-dir", src, "--save-dir", mg)
    path = mg / "iter_0000001" / "mp_rank_00" / "model_optim_rng.pt"
    obj = torch.load(path, weights_only=False)
    te = {}
    for k, v in obj["model"].items():
        k = k.replace(".input_layernorm.weight", ".self_attention.linear_qkv.layer_norm_weight")
        te[k.replace(".pre_mlp_layernorm.weight", ".mlp.linear_fc1.layer_norm_weight")] = v
        if k.endswith("linear_qkv.weight"):
            te[k.replace(".weight", "._extra_state")] = None
    obj["model"] = te
    torch.save(obj, path)
    _, sd = load_megatron_state_dict(mg)
    for name, t in hf_tensors(src).items():
        assert torch.equal(sd[name], t), name


def test_reader_refuses_non_qwen3_args_and_untrusted_pickle(tmp_path):
    src = make_hf(tmp_path / "hf", tied=True, dtype=torch.float32)
    mg = tmp_path / "mg"
    run("--load-model-type", "hf", "--save-model-type", "mg", "--load-dir", src, "--save-dir", mg)
    path = mg / "iter_0000001" / "mp_rank_00" / "model_optim_rng.pt"
    obj = torch.load(path, weights_only=False)
    del obj["args"].qtrain_hf_config
    obj["args"].normalization = "LayerNorm"
    torch.save(obj, path)
    with pytest.raises(ConfigError, match="not a Qwen3 checkpoint: normalization='LayerNorm'"):
        MegatronReader(mg)
    obj["args"].normalization = "RMSNorm"
    # what a training run adds (numpy RNG state, scheduler) still loads without trusting pickle
    obj["rng_state"] = [{"np_rng_state": np.random.get_state(), "torch_rng_state": torch.get_rng_state()}]
    obj["opt_param_scheduler"] = {"max_lr": 3e-4, "num_steps": 100}
    torch.save(obj, path)
    assert MegatronReader(mg).config.num_hidden_layers == 4
    obj["args"].odd = contextlib.nullcontext  # a global outside the weights-only allowlist
    torch.save(obj, path)
    with pytest.raises(CheckpointError, match="--trust-pickle"):
        MegatronReader(mg)
    assert MegatronReader(mg, weights_only=False).config.num_hidden_layers == 4
    del obj["args"].odd
    obj["args"].noop_layers = "3"  # MindSpeed-LLM's skipped layers: the files alone cannot place them
    torch.save(obj, path)
    with pytest.raises(CheckpointError, match="noop_layers='3'"):
        MegatronReader(mg)


# ----------------------------------------------------------------------------- megatron-core parity

@pytest.fixture(scope="module")
def mcore(tmp_path_factory):
    """megatron-core on CPU in this process: a 1-rank gloo group and three test-only patches for
    calls that assume CUDA (rotary inv_freq device, the RNG tracker's fork around dropout)."""
    pytest.importorskip("megatron.core")
    import torch.distributed as dist
    from megatron.core import parallel_state, tensor_parallel

    own_group = not dist.is_initialized()
    if own_group:
        store = tmp_path_factory.mktemp("pg") / "store"
        dist.init_process_group("gloo", init_method=f"file://{store}", rank=0, world_size=1)
    parallel_state.initialize_model_parallel(1, 1)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(torch.cuda, "current_device", lambda: "cpu")
        mp.setattr(tensor_parallel.get_cuda_rng_tracker(), "fork", lambda *a, **k: contextlib.nullcontext())
        yield
    parallel_state.destroy_model_parallel()
    if own_group:
        dist.destroy_process_group()


def gpt_model(cfg, num_layers: int, tied: bool, pre_process: bool = True, post_process: bool = True):
    import torch.nn.functional as F
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.transformer.transformer_config import TransformerConfig

    tc = TransformerConfig(
        num_layers=num_layers, hidden_size=cfg.hidden_size, num_attention_heads=cfg.num_attention_heads,
        num_query_groups=cfg.num_key_value_heads, ffn_hidden_size=cfg.intermediate_size, kv_channels=cfg.head_dim,
        normalization="RMSNorm", layernorm_epsilon=cfg.rms_norm_eps, gated_linear_unit=True, activation_func=F.silu,
        add_bias_linear=False, qk_layernorm=True, use_cpu_initialization=True, hidden_dropout=0.0,
        attention_dropout=0.0, bias_activation_fusion=False, apply_rope_fusion=False, masked_softmax_fusion=False,
        persist_layer_norm=False, gradient_accumulation_fusion=False, params_dtype=torch.float32)
    spec = get_gpt_layer_local_spec(qk_layernorm=True, normalization="RMSNorm")
    return GPTModel(tc, spec, vocab_size=cfg.vocab_size, max_sequence_length=cfg.max_position_embeddings,
                    position_embedding_type="rope", rotary_base=int(cfg.rope_theta),
                    share_embeddings_and_output_weights=tied, pre_process=pre_process, post_process=post_process)


def entries(state: dict) -> dict[str, tuple | None]:
    """Name -> shape, or the value itself for `_extra_state` entries (None for megatron-core's local layers)."""
    return {k: v if k.endswith("._extra_state") else tuple(v.shape) for k, v in state.items()}


@pytest.mark.megatron
@pytest.mark.parametrize("tied", [True, False])
def test_stage_files_match_megatron_core_modules(mcore, tmp_path, tied):
    """Every PP stage file holds exactly the state dict entries (names, shapes, the empty `_extra_state`
    of each linear layer) of megatron-core's module for that stage, uneven stages included; with tied
    embeddings the last stage has output_layer."""
    src = make_hf(tmp_path / "hf", tied=tied, dtype=torch.float32)
    mg = tmp_path / "mg"
    run("--load-model-type", "hf", "--save-model-type", "mg", "--load-dir", src, "--save-dir", mg,
        "--target-pipeline-parallel-size", "2", "--num-layer-list", "1,3")
    reader_cfg = MegatronReader(mg).config
    for pp, (n, pre, post) in enumerate([(1, True, False), (3, False, True)]):
        want = entries(gpt_model(reader_cfg, n, tied, pre, post).state_dict())
        assert any(k.endswith("._extra_state") for k in want)
        assert entries(rank_file(mg, 0, pp)["model"]) == want


def hf_logits(src: Path, ids: torch.Tensor) -> torch.Tensor:
    import transformers

    model = transformers.Qwen3ForCausalLM.from_pretrained(src, dtype=torch.float32).eval()
    with torch.no_grad():
        return model(ids).logits


def mcore_logits(cfg, state: dict, ids: torch.Tensor, tied: bool) -> torch.Tensor:
    model = gpt_model(cfg, cfg.num_hidden_layers, tied).eval()
    model.load_state_dict(state, strict=True)
    seq = ids.shape[1]
    mask = torch.triu(torch.ones(seq, seq, dtype=torch.bool), diagonal=1)[None, None]  # True = masked
    with torch.no_grad():
        return model(ids, torch.arange(seq).expand_as(ids), attention_mask=mask)


@pytest.mark.megatron
@pytest.mark.parametrize("tied", [True, False])
def test_megatron_core_logits_match_transformers(mcore, tmp_path, tied):
    """HF -> mg (TP1 and TP2 x PP2, merged to TP1) -> GPTModel gives transformers' logits (fp32)."""
    src = make_hf(tmp_path / "hf", tied=tied, dtype=torch.float32, seed=3)
    ids = torch.randint(0, 256, (2, 24), generator=torch.Generator().manual_seed(0))
    ref = hf_logits(src, ids)
    direct, sharded, merged = tmp_path / "direct", tmp_path / "sharded", tmp_path / "merged"
    run("--load-model-type", "hf", "--save-model-type", "mg", "--load-dir", src, "--save-dir", direct)
    run("--load-model-type", "hf", "--save-model-type", "mg", "--load-dir", src, "--save-dir", sharded,
        "--target-tensor-parallel-size", "2", "--target-pipeline-parallel-size", "2")
    run("--load-model-type", "mg", "--save-model-type", "mg", "--load-dir", sharded, "--save-dir", merged)
    cfg = MegatronReader(direct).config
    for mg in (direct, merged):
        out = mcore_logits(cfg, rank_file(mg, 0, None)["model"], ids, tied)
        assert_close_scaled(out, ref, terms=qwen3_terms(cfg, 24), what=str(mg))
    # and the logits are not trivially equal: a wrong qkv order breaks them
    state = rank_file(direct, 0, None)["model"]
    qkv = state["decoder.layers.0.self_attention.linear_qkv.weight"]
    state["decoder.layers.0.self_attention.linear_qkv.weight"] = qkv.view(2, 4, 32, -1).flip(1).reshape(qkv.shape)
    assert scaled_error(mcore_logits(cfg, state, ids, tied), ref) > 1e-3


def test_reader_loads_args_holding_megatron_objects_inertly(tmp_path):
    """Megatron-LM puts enums in `args`; they load as inert placeholders (no megatron import needed)."""
    enums = pytest.importorskip("megatron.core.enums")
    src = make_hf(tmp_path / "hf", tied=True, dtype=torch.float32)
    mg = tmp_path / "mg"
    run("--load-model-type", "hf", "--save-model-type", "mg", "--load-dir", src, "--save-dir", mg)
    path = mg / "iter_0000001" / "mp_rank_00" / "model_optim_rng.pt"
    obj = torch.load(path, weights_only=False)
    obj["args"].model_type = enums.ModelType.encoder_or_decoder
    torch.save(obj, path, pickle_protocol=4)
    reader = MegatronReader(mg)
    assert type(reader.args.model_type).__name__ == "ModelType"
    assert not isinstance(reader.args.model_type, enums.ModelType)
    assert torch.equal(reader.get("model.norm.weight"), hf_tensors(src)["model.norm.weight"])


@pytest.mark.megatron
def test_reads_a_state_dict_saved_from_megatron_core(mcore, tmp_path):
    """GPTModel.state_dict() itself (with its `_extra_state` entries; a Transformer Engine one holds
    a BytesIO) saved as a rank file reads back as the original HF tensors."""
    import io

    src = make_hf(tmp_path / "hf", tied=False, dtype=torch.float32, seed=4)
    mg = tmp_path / "mg"
    run("--load-model-type", "hf", "--save-model-type", "mg", "--load-dir", src, "--save-dir", mg)
    obj = rank_file(mg, 0, None)
    cfg = MegatronReader(mg).config
    model = gpt_model(cfg, cfg.num_hidden_layers, tied=False)
    model.load_state_dict(obj["model"], strict=True)
    state = model.state_dict()
    assert any(k.endswith("._extra_state") for k in state)
    state["decoder.layers.0.self_attention.linear_proj._extra_state"] = io.BytesIO(b"fp8 meta")
    obj["model"] = state
    torch.save(obj, mg / "iter_0000001" / "mp_rank_00" / "model_optim_rng.pt")
    _, sd = load_megatron_state_dict(mg)
    want = hf_tensors(src)
    assert sorted(sd) == sorted(want)
    for name, t in want.items():
        assert torch.equal(sd[name], t), name
