"""Every invalid layout stops before training with a ConfigError naming the option."""

import pytest

from qtrain.config import PretrainConfig
from qtrain.errors import ConfigError
from qtrain.models.config import Qwen3Config
from qtrain.models.presets import get_preset
from qtrain.parallel.mesh import ParallelDims, stage_layers, validate_layout

TINY = dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
            num_key_value_heads=2, head_dim=16)


def cfg(seq=16, mbs=1, gbs=None, **parallel) -> PretrainConfig:
    c = PretrainConfig()
    c.data.seq_length = seq
    c.training.micro_batch_size, c.training.global_batch_size = mbs, gbs
    for k, v in parallel.items():
        setattr(c.parallel, k, v)
    return c


def check(c, world, model=None, match=""):
    with pytest.raises(ConfigError, match=match):
        validate_layout(c, world, Qwen3Config(**(model or TINY)))


def test_valid_layouts_give_degrees():
    assert validate_layout(cfg(gbs=8, tensor_model_parallel_size=2, pipeline_model_parallel_size=2), 8,
                           Qwen3Config(**TINY)) == ParallelDims(pp=2, dp_replicate=2, tp=2)
    assert validate_layout(cfg(context_parallel_size=2, use_distributed_optimizer=True), 8) == \
        ParallelDims(dp_shard=4, cp=2)


@pytest.mark.parametrize("option", ["tensor_model_parallel_size", "pipeline_model_parallel_size",
                                    "context_parallel_size"])
def test_sizes_must_be_positive(option):
    check(cfg(**{option: 0}), 4, match="--" + option.replace("_", "-"))


def test_world_size_not_divisible():
    check(cfg(tensor_model_parallel_size=4), 6, match="world size 6 is not divisible by TP x PP x CP")


def test_attention_heads_not_divisible_by_tp():
    check(cfg(tensor_model_parallel_size=4), 4, {**TINY, "num_attention_heads": 6, "num_key_value_heads": 6},
          match="--num-attention-heads")


def test_query_groups_not_divisible_by_tp():
    check(cfg(tensor_model_parallel_size=4), 4, match="--num-query-groups")


def test_vocab_not_divisible_by_tp():
    check(cfg(tensor_model_parallel_size=2), 2, {**TINY, "vocab_size": 255}, match="--make-vocab-size-divisible-by")


@pytest.mark.parametrize("tp", [1, 2, 4, 8])
def test_qwen3_vocab_splits_over_usual_tp(tp):
    """151936 = 2^7 x 1187: every power-of-two TP up to 128 splits the real vocabulary evenly."""
    m = get_preset("1.7B")
    assert m.vocab_size % tp == 0
    validate_layout(cfg(seq=4096, tensor_model_parallel_size=tp), tp, m)


def test_layers_not_splittable_by_pp():
    check(cfg(gbs=3, pipeline_model_parallel_size=3), 3, match="do not divide into 3 pipeline stages")


@pytest.mark.parametrize("layer_list", ["1,2", "2,1,1", "0,4", "x,y"])
def test_num_layer_list_must_cover_the_model(layer_list):
    check(cfg(gbs=2, pipeline_model_parallel_size=2, num_layer_list=layer_list), 2, match="--num-layer-list")


def test_num_layer_list_gives_uneven_stages():
    assert stage_layers(cfg(pipeline_model_parallel_size=2, num_layer_list="1,3"), 4) == [[[0]], [[1, 2, 3]]]


def test_virtual_stages_split_round_robin():
    assert stage_layers(cfg(pipeline_model_parallel_size=2, num_layers_per_virtual_pipeline_stage=1), 4) == \
        [[[0], [2]], [[1], [3]]]


@pytest.mark.parametrize("parallel, match", [
    ({"pipeline_model_parallel_size": 2, "num_layers_per_virtual_pipeline_stage": 3}, "must divide the 2 layers"),
    ({"pipeline_model_parallel_size": 2, "num_layers_per_virtual_pipeline_stage": 2}, "one chunk per stage"),
    ({"num_layers_per_virtual_pipeline_stage": 1}, "needs --pipeline-model-parallel-size > 1"),
    ({"pipeline_model_parallel_size": 2, "num_layers_per_virtual_pipeline_stage": 1, "num_layer_list": "2,2"},
     "cannot be combined"),
])
def test_virtual_stage_rules(parallel, match):
    check(cfg(gbs=2, **parallel), parallel.get("pipeline_model_parallel_size", 1), match=match)


def test_pipeline_needs_enough_microbatches():
    check(cfg(gbs=1, pipeline_model_parallel_size=2), 2, match="at least 2 micro-batches")


def test_interleaved_needs_microbatches_multiple_of_pp():
    check(cfg(gbs=3, pipeline_model_parallel_size=2, num_layers_per_virtual_pipeline_stage=1), 2,
          match="multiple of --pipeline-model-parallel-size")


def test_context_parallel_needs_seq_divisible_by_2cp():
    check(cfg(seq=10, context_parallel_size=2), 2, match=r"--seq-length 10 must be divisible by 2 x --context")


@pytest.mark.parametrize("parallel, match", [
    ({"context_parallel_algo": "hybrid_cp_algo"}, "hybrid_cp_algo needs --ulysses-degree-in-cp"),
    ({"context_parallel_algo": "hybrid_cp_algo", "ulysses_degree_in_cp": 3}, "dividing --context-parallel-size 4"),
    ({"ulysses_degree_in_cp": 2}, "applies to --context-parallel-algo hybrid_cp_algo only"),
    ({"context_parallel_algo": "ulysses_cp_algo"}, r"Ulysses degree 4 must divide .* \(4 query, 2 key/value\)"),
    ({"context_parallel_algo": "hybrid_cp_algo", "ulysses_degree_in_cp": 2, "tensor_model_parallel_size": 2},
     r"Ulysses degree 2 must divide .* \(2 query, 1 key/value\)"),
])
def test_context_parallel_algorithm_rules(parallel, match):
    check(cfg(context_parallel_size=4, **parallel), 4 * parallel.get("tensor_model_parallel_size", 1), match=match)


def test_context_parallel_combines_with_pipeline():
    validate_layout(cfg(gbs=2, context_parallel_size=2, pipeline_model_parallel_size=2,
                        context_parallel_algo="ulysses_cp_algo"), 4, Qwen3Config(**TINY))


def test_sequence_parallel_needs_tp():
    check(cfg(sequence_parallel=True), 2, match="--sequence-parallel needs --tensor-model-parallel-size > 1")


def test_sequence_parallel_needs_seq_divisible_by_tp():
    check(cfg(seq=10, sequence_parallel=True, tensor_model_parallel_size=4), 4,
          {**TINY, "num_key_value_heads": 4}, match="per-rank sequence 10")


@pytest.mark.parametrize("parallel, match", [
    ({"recompute_method": "uniform"}, "need --recompute-granularity"),
    ({"recompute_granularity": "full", "recompute_num_layers": 1}, "uniform or block"),
    ({"recompute_granularity": "full", "recompute_method": "block"}, "--recompute-num-layers >= 1"),
    ({"recompute_granularity": "full", "recompute_method": "block", "recompute_num_layers": 5},
     "exceeds the 4 layers"),
])
def test_recompute_rules(parallel, match):
    check(cfg(**parallel), 1, match=match)
