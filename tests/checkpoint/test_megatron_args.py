"""The `args` of qtrain's Megatron files, read the way MindSpeed-LLM 2.2.0 and Megatron-LM core_v0.12.1 read them.

Each reader below touches the args as the function it names does: plain attribute access where that
code raises on a missing field, getattr / hasattr with its default where it does not, Megatron's
argparse default where a field is copied only when the checkpoint has it. The values must then
describe the model and layout that were written. Every field in a *_REQUIRED list is deleted in
turn to show that the reader then fails. (The tools themselves were run on qtrain's files as
docs/megatron.md describes; these tests keep the fields from going missing without them.)
Paths are relative to the MindSpeed-LLM 2.2.0 and Megatron-LM core_v0.12.1 source trees.
"""

from __future__ import annotations

import argparse
import copy
import types

import pytest
import torch
from ckpt_helpers import make_hf

from qtrain.checkpoint.convert import main as convert
from qtrain.models.hf import read_hf_config

TP, PP = 2, 2


@pytest.fixture(scope="module")
def written(tmp_path_factory):
    """(args of every rank file, the HF config) for an untied model with Qwen3's rope_theta at TP2 PP2:
    untied and theta 1e6 so that neither matches a Megatron default by chance."""
    tmp = tmp_path_factory.mktemp("args")
    src = make_hf(tmp / "hf", tied=False, dtype=torch.bfloat16, rope_theta=1e6, max_position_embeddings=512)
    assert convert(["--load-model-type", "hf", "--save-model-type", "mg", "--load-dir", str(src),
                    "--save-dir", str(tmp / "mg"), "--target-tensor-parallel-size", str(TP),
                    "--target-pipeline-parallel-size", str(PP)]) == 0
    files = sorted((tmp / "mg" / "iter_0000001").glob("mp_rank_*/model_optim_rng.pt"))
    assert len(files) == TP * PP
    return [torch.load(f, weights_only=False)["args"] for f in files], read_hf_config(src)


# ----------------------------------------------------------------------------- MindSpeed-LLM convert_ckpt_v2 (mg -> hf)

# configs/checkpoint/model_cfg.json: "config_set_value" of "base" updated by "qwen3"'s. MegatronModel.load_mg_args
# (mindspeed_llm/tasks/checkpoint/model_builder.py) sets these first, then every field of the checkpoint's args.
MODEL_CFG_QWEN3 = dict(
    seq_length=4096, global_batch_size=64, add_position_embedding=True, use_rotary_position_embeddings=True,
    add_bias_linear=False, gradient_accumulation_fusion=False, normalization="RMSNorm", swiglu=True,
    tokenizer_type="Llama2Tokenizer", group_query_attention=False, qkv_type="unpack", fc_type="gate_up_down",
    qk_layernorm=True)

_MG2HF = "mindspeed_llm/tasks/checkpoint/convert_mg2hf.py Mg2HfConvert"
V2_REQUIRED = [  # read as self.load_model.<field>: AttributeError when the args lack it
    ("tensor_model_parallel_size", f"{_MG2HF}.__init__"),
    ("pipeline_model_parallel_size", f"{_MG2HF}.__init__"),
    ("expert_model_parallel_size", f"{_MG2HF}.__init__"),
    ("num_layers", f"{_MG2HF}.__init__"),
    ("num_attention_heads", f"{_MG2HF}.set_model_layer_attn"),
    ("untie_embeddings_and_output_weights", f"{_MG2HF}.set_model_postprocess"),
]
V2_OPTIONAL = [  # read with getattr / hasattr and a default
    ("expert_tensor_parallel_size", f"{_MG2HF}.__init__ / check_etp_conflict (None -> TP; must be 1 or TP)"),
    ("num_layer_list", f"{_MG2HF}.__init__ (None -> num_layers // PP per stage)"),
    ("num_layers_per_virtual_pipeline_stage", f"{_MG2HF}.__init__"),
    ("num_experts", f"{_MG2HF}.__init__ (falsy -> every layer dense)"),
    ("first_k_dense_replace", f"{_MG2HF}.get_first_k_dense_replace"),
    ("num_query_groups", f"{_MG2HF}.set_model_layer_attn (hasattr, else num_key_value_heads)"),
    ("post_attention", f"{_MG2HF}.set_model_layer_norm (hasattr: another norm layout; must be absent)"),
    ("qkv_type", f"{_MG2HF}.set_model_layer_attn (model_cfg.json's 'unpack' unless the args say otherwise)"),
]


def read_like_convert_ckpt_v2(args: argparse.Namespace) -> dict:
    m = types.SimpleNamespace(**{**MODEL_CFG_QWEN3, **vars(args)})  # MegatronModel.load_mg_args
    tp, pp, ep = m.tensor_model_parallel_size, m.pipeline_model_parallel_size, m.expert_model_parallel_size
    etp = getattr(m, "expert_tensor_parallel_size", tp)
    etp = tp if etp is None else etp
    if etp not in (1, tp):
        raise ValueError("Currently expert-tensor-parallel-size is only support to be set to 1 or None")
    layers = m.num_layers
    stages = (list(map(int, m.num_layer_list.split(","))) if getattr(m, "num_layer_list", None) is not None
              else [layers // pp] * pp)
    dense_layers = layers if not getattr(m, "num_experts", None) else (getattr(m, "first_k_dense_replace", 0) or 0)
    groups = m.num_query_groups if hasattr(m, "num_query_groups") else m.num_key_value_heads
    return dict(tp=tp, pp=pp, ep=ep, etp=etp, stages=stages, dense_layers=dense_layers,
                vpp=getattr(m, "num_layers_per_virtual_pipeline_stage", None), heads=m.num_attention_heads,
                groups=groups, qkv_type=m.qkv_type, post_norm_layout=hasattr(m, "post_attention"),
                untie=m.untie_embeddings_and_output_weights)


def test_convert_ckpt_v2_reads_the_model_and_layout(written):
    all_args, cfg = written
    for args in all_args:
        assert read_like_convert_ckpt_v2(args) == dict(
            tp=TP, pp=PP, ep=1, etp=TP, stages=[2, 2], dense_layers=4, vpp=None, heads=4, groups=2,
            qkv_type="unpack", post_norm_layout=False, untie=True)


@pytest.mark.parametrize("field,where", V2_REQUIRED, ids=[f for f, _ in V2_REQUIRED])
def test_convert_ckpt_v2_fails_without(written, field, where):
    args = copy.deepcopy(written[0][0])
    delattr(args, field)
    with pytest.raises(AttributeError, match=field):
        read_like_convert_ckpt_v2(args)


@pytest.mark.parametrize("field,where", V2_OPTIONAL, ids=[f for f, _ in V2_OPTIONAL])
def test_convert_ckpt_v2_reads_the_same_model_with_its_default(written, field, where):
    """Where the reader has a default (or a second spelling: num_key_value_heads), what qtrain writes agrees with it."""
    args = copy.deepcopy(written[0][0])
    if hasattr(args, field):
        delattr(args, field)
    assert read_like_convert_ckpt_v2(args) == read_like_convert_ckpt_v2(written[0][0])


def test_fields_the_readers_would_misread_are_not_written(written):
    """post_attention selects another norm layout in Mg2HfConvert; first_k_dense_replace = num_layers (what
    convert_ckpt_v2 writes) is refused by MindSpeed-LLM's TransformerBlockFeature.validate_args; num_experts
    makes layers MoE; spec would make a Megatron-LM job import MindSpeed-LLM's module; sequence_parallel
    would override the job's own choice under --use-checkpoint-args."""
    for args in written[0]:
        for name in ("post_attention", "first_k_dense_replace", "num_experts", "spec", "sequence_parallel"):
            assert getattr(args, name, None) is None, name


# ----------------------------------------------------------------------------- Megatron-LM load_args + validate_args

_CKPT = "megatron/training/checkpointing.py load_args_from_checkpoint"
_WRAP = "mindspeed_llm/training/checkpointing.py load_args_from_checkpoint_wrapper"
# Fields copied from a checkpoint's args (with --use-checkpoint-args; always in MindSpeed-LLM's convert_ckpt.py,
# whose loader calls load_args_from_checkpoint from mindspeed_llm/tasks/checkpoint/models.py
# update_megatron_args_from_megatron_checkpoint), each with the running job's argparse default
# (megatron/training/arguments.py; MindSpeed-LLM's added flags), kept when the checkpoint has None.
MEGATRON_COPIED = {
    "num_layers": None, "hidden_size": None, "ffn_hidden_size": None, "seq_length": None,
    "num_attention_heads": None, "num_query_groups": 1, "group_query_attention": False, "kv_channels": None,
    "max_position_embeddings": None, "position_embedding_type": "learned_absolute", "add_position_embedding": True,
    "use_rotary_position_embeddings": False, "rotary_base": 10000, "rotary_percent": 1.0,
    "rotary_interleaved": False, "add_bias_linear": True, "add_qkv_bias": False, "squared_relu": False,
    "swiglu": False, "untie_embeddings_and_output_weights": False, "apply_layernorm_1p": False,
    "normalization": "LayerNorm", "apply_query_key_layer_scaling": False, "attention_dropout": 0.1,
    "hidden_dropout": 0.1, "num_experts": None, "moe_grouped_gemm": False, "tokenizer_type": None,
    "padded_vocab_size": None, "ckpt_format": "torch_dist",
    # with --use-mp-args-from-checkpoint-args (convert_ckpt.py passes it)
    "tensor_model_parallel_size": 1, "pipeline_model_parallel_size": 1,
    "virtual_pipeline_model_parallel_size": None, "num_layers_per_virtual_pipeline_stage": None,
    # MindSpeed-LLM's wrapper; expert_model_parallel_size for checkpoint_version >= 3.0
    "num_layer_list": None, "post_norm": False, "qk_layernorm": False, "first_k_dense_replace": None,
    "expert_model_parallel_size": 1,
}
MEGATRON_REQUIRED = [  # without these the job stops or builds another model than the one written
    ("num_layers", f"{_CKPT}; validate_args requires it"),
    ("hidden_size", f"{_CKPT}; validate_args requires it"),
    ("num_attention_heads", f"{_CKPT}; validate_args requires it"),
    ("max_position_embeddings", f"{_CKPT}; validate_args requires it"),
    ("seq_length", f"{_CKPT}; validate_args: assert args.encoder_seq_length is not None"),
    ("ffn_hidden_size", f"{_CKPT}; validate_args derives 4h*2/3 (rounded to 64) when absent"),
    ("kv_channels", f"{_CKPT}; validate_args derives hidden/heads when absent (Qwen3's head_dim differs)"),
    ("group_query_attention", f"{_CKPT}; without it num_query_groups is ignored (one K/V head per query head)"),
    ("num_query_groups", f"{_CKPT}"),
    ("position_embedding_type", f"{_CKPT}; default learned_absolute"),
    ("rotary_base", f"{_CKPT}; default 10000"),
    ("add_bias_linear", f"{_CKPT}; default True"),
    ("swiglu", f"{_CKPT}; default False"),
    ("untie_embeddings_and_output_weights", f"{_CKPT}; default False"),
    ("normalization", f"{_CKPT}; default LayerNorm"),
    ("attention_dropout", f"{_CKPT}; default 0.1 (Qwen3 has none)"),
    ("hidden_dropout", f"{_CKPT}; default 0.1 (Qwen3 has none)"),
    ("tokenizer_type", f"{_CKPT}; mindspeed_llm/tasks/checkpoint/models.py check_for_args stops without it"),
    ("padded_vocab_size", f"{_CKPT}"),
    ("ckpt_format", f"{_CKPT}; default torch_dist, a different file layout"),
    ("tensor_model_parallel_size", f"{_CKPT} (--use-mp-args-from-checkpoint-args)"),
    ("pipeline_model_parallel_size", f"{_CKPT} (--use-mp-args-from-checkpoint-args)"),
    ("qk_layernorm", f"{_WRAP}; default False"),
]


def read_like_megatron(args: argparse.Namespace) -> argparse.Namespace:
    """load_args_from_checkpoint's _set_arg (a None in the checkpoint keeps the running value), then the
    checks of megatron/training/arguments.py validate_args and MindSpeed-LLM's
    features_manager/transformer/transformer_block.py TransformerBlockFeature.validate_args."""
    run = argparse.Namespace(**MEGATRON_COPIED)
    for name in MEGATRON_COPIED:
        value = getattr(args, name, None)
        if value is not None:
            setattr(run, name, value)
    for name in ("num_layers", "hidden_size", "num_attention_heads", "max_position_embeddings"):
        assert getattr(run, name) is not None, f"{name} argument is None"  # _check_arg_is_not_none
    if run.ffn_hidden_size is None:
        run.ffn_hidden_size = int((4 * run.hidden_size * 2 / 3) / 64) * 64 if run.swiglu else 4 * run.hidden_size
    if run.kv_channels is None:
        run.kv_channels = run.hidden_size // run.num_attention_heads
    assert run.seq_length is not None, "encoder_seq_length is None"
    assert run.max_position_embeddings >= run.seq_length
    if run.first_k_dense_replace and run.num_layers <= run.first_k_dense_replace:
        raise AssertionError("Num-layer must be greater than first-k-dense-replace")
    if run.num_layer_list:
        assert len(run.num_layer_list.split(",")) == run.pipeline_model_parallel_size
        assert run.pipeline_model_parallel_size > 1 and not run.num_layers_per_virtual_pipeline_stage
    if not run.group_query_attention:  # megatron/training/arguments.py core_transformer_config_from_args
        run.num_query_groups = None
    return run


def megatron_model(run: argparse.Namespace) -> dict:
    """What the job builds from those args (core_transformer_config_from_args, the GPT model provider)."""
    return dict(
        layers=run.num_layers, hidden=run.hidden_size, ffn=run.ffn_hidden_size, heads=run.num_attention_heads,
        groups=run.num_query_groups or run.num_attention_heads, head_dim=run.kv_channels,
        rope=(run.position_embedding_type, float(run.rotary_base), run.rotary_percent, run.rotary_interleaved),
        norm=(run.normalization, run.apply_layernorm_1p, run.qk_layernorm), swiglu=run.swiglu,
        bias=(run.add_bias_linear, run.add_qkv_bias), untie=run.untie_embeddings_and_output_weights,
        dropout=(run.attention_dropout, run.hidden_dropout), vocab=run.padded_vocab_size, moe=run.num_experts,
        layout=(run.tensor_model_parallel_size, run.pipeline_model_parallel_size, run.expert_model_parallel_size,
                run.num_layers_per_virtual_pipeline_stage), ckpt_format=run.ckpt_format,
        tokenizer=run.tokenizer_type, seq=(run.seq_length, run.max_position_embeddings))


def expected_model(cfg) -> dict:
    return dict(
        layers=cfg.num_hidden_layers, hidden=cfg.hidden_size, ffn=cfg.intermediate_size,
        heads=cfg.num_attention_heads, groups=cfg.num_key_value_heads, head_dim=cfg.head_dim,
        rope=("rope", cfg.rope_theta, 1.0, False), norm=("RMSNorm", False, True), swiglu=True, bias=(False, False),
        untie=not cfg.tie_word_embeddings, dropout=(0.0, 0.0), vocab=cfg.vocab_size, moe=None,
        layout=(TP, PP, 1, None), ckpt_format="torch", tokenizer="PretrainedFromHF",
        # an HF source records no training length: seq_length is the model's max_position_embeddings
        seq=(cfg.max_position_embeddings, cfg.max_position_embeddings))


def test_megatron_builds_the_model_that_was_written(written):
    all_args, cfg = written
    for args in all_args:
        assert megatron_model(read_like_megatron(args)) == expected_model(cfg)


@pytest.mark.parametrize("field,where", MEGATRON_REQUIRED, ids=[f for f, _ in MEGATRON_REQUIRED])
def test_megatron_fails_without(written, field, where):
    all_args, cfg = written
    args = copy.deepcopy(all_args[0])
    delattr(args, field)
    try:
        built = megatron_model(read_like_megatron(args))
    except AssertionError:
        return
    assert built != expected_model(cfg), f"{field} ({where}) is not needed after all"


def test_check_checkpoint_args_of_a_training_job(written):
    """megatron/training/checkpointing.py check_checkpoint_args, which --load without --finetune runs, against
    the flags of MindSpeed-LLM's examples/mcore/qwen3 scripts (--tokenizer-type PretrainedFromHF, so no
    vocab_file: the vocabulary fields are not compared); consumed samples start at 0."""
    all_args, cfg = written
    job = dict(num_layers=cfg.num_hidden_layers, hidden_size=cfg.hidden_size,
               num_attention_heads=cfg.num_attention_heads, add_position_embedding=True,
               tensor_model_parallel_size=TP, pipeline_model_parallel_size=PP)
    for args in all_args:
        for name, value in job.items():
            assert getattr(args, name, True if name == "add_position_embedding" else None) == value, name
        assert getattr(args, "consumed_train_samples", 0) == 0 and getattr(args, "consumed_valid_samples", 0) == 0


def test_layer_list_and_virtual_stages_as_mindspeed_validates_them(tmp_path):
    """--num-layer-list is recorded only with PP > 1 (MindSpeed-LLM refuses it otherwise) and never with
    virtual stages; the stage split reads back as written."""
    src = make_hf(tmp_path / "hf", tied=True, dtype=torch.float32)

    def args_of(*flags: str) -> argparse.Namespace:
        out = tmp_path / f"mg{len(list(tmp_path.glob('mg*')))}"
        assert convert(["--load-model-type", "hf", "--save-model-type", "mg", "--load-dir", str(src),
                        "--save-dir", str(out), *flags]) == 0
        return torch.load(next((out / "iter_0000001").glob("mp_rank_*/model_optim_rng.pt")), weights_only=False)["args"]

    uneven = args_of("--target-pipeline-parallel-size", "2", "--num-layer-list", "1,3")
    assert uneven.num_layer_list == "1,3" and read_like_convert_ckpt_v2(uneven)["stages"] == [1, 3]
    read_like_megatron(uneven)
    single = args_of("--num-layer-list", "4")
    assert single.num_layer_list is None
    read_like_megatron(single)
    virtual = args_of("--target-pipeline-parallel-size", "2", "--num-layers-per-virtual-pipeline-stage", "1")
    assert (virtual.num_layers_per_virtual_pipeline_stage, virtual.virtual_pipeline_model_parallel_size) == (1, 2)
    assert read_like_convert_ckpt_v2(virtual)["vpp"] == 1
    read_like_megatron(virtual)


def test_seq_length_comes_from_the_source_when_it_records_one(tmp_path, capsys):
    """A qtrain training checkpoint's --seq-length (its qtrain_args.json) and a Megatron checkpoint's
    seq_length are kept; an HF dir records none, so the model's max_position_embeddings is written."""
    import json

    from qtrain.config import PretrainConfig

    make_hf(tmp_path / "hf", tied=True, dtype=torch.float32)

    def to(kind: str, load: str, out: str, *flags: str) -> argparse.Namespace | None:
        assert convert(["--load-model-type", kind, "--save-model-type", "mg" if out.startswith("mg") else "qtrain",
                        "--load-dir", str(tmp_path / load), "--save-dir", str(tmp_path / out), *flags]) == 0
        if not out.startswith("mg"):
            return None
        return torch.load(next((tmp_path / out / "iter_0000001").glob("mp_rank_*/model_optim_rng.pt")),
                          weights_only=False)["args"]

    assert to("hf", "hf", "mg_hf").seq_length == 128  # TINY's max_position_embeddings
    assert "recording seq_length 128 (the model's max_position_embeddings)" in capsys.readouterr().out
    to("hf", "hf", "q")
    trained = PretrainConfig()
    trained.data.seq_length = 64
    (tmp_path / "q" / "iter_0000001" / "qtrain_args.json").write_text(json.dumps(trained.to_dict()))
    assert to("qtrain", "q", "mg_q").seq_length == 64
    assert to("mg", "mg_q", "mg_mg", "--target-tensor-parallel-size", "2").seq_length == 64

