"""torchrun worker: shard a meta-built tiny Qwen3 under one layout, materialise it with a seed
(and, given an HF dir, load its weights), then save each rank's full-valued parameters for the
test to compare with one process."""

import sys

import torch
import torch.distributed as dist
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

from qtrain.config import PretrainConfig
from qtrain.models.config import Qwen3Config
from qtrain.models.qwen3 import build_model
from qtrain.parallel.weights import materialize
from qtrain.parallel import build_mesh, parallelize
from worker_exit import exit_without_teardown

TINY = dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
            num_key_value_heads=2, head_dim=16, max_position_embeddings=64, rope_theta=10000.0)


def main(out_prefix: str, layout: str, tied: str, hf_dir: str = "") -> None:
    dist.init_process_group("gloo")
    cfg = Qwen3Config(**TINY, tie_word_embeddings=tied == "tied")
    pcfg = PretrainConfig()
    pcfg.training.micro_batch_size, pcfg.training.global_batch_size, pcfg.data.seq_length = 1, 2, 16
    if layout == "fsdp":
        pcfg.parallel.use_distributed_optimizer = True
    elif layout == "tp":
        pcfg.parallel.tensor_model_parallel_size = 2
    elif layout == "pp":
        pcfg.parallel.pipeline_model_parallel_size = 2
    mesh = build_mesh(pcfg, dist.get_world_size(), "cpu", model_cfg=cfg)
    model, _ = parallelize(build_model(cfg, "meta"), mesh, pcfg, device=torch.device("cpu"))
    materialize(model, "cpu", seed=7)
    if hf_dir:
        from qtrain.checkpoint.dcp import load_checkpoint

        load_checkpoint(hf_dir, model, None)
    full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True))
    if layout == "pp" or dist.get_rank() == 0:
        torch.save({k: v.detach().clone() for k, v in full.items()}, f"{out_prefix}_rank{dist.get_rank()}.pt")
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    code = main(*sys.argv[1:])
    exit_without_teardown(code)
