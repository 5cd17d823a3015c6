"""Expert parallelism trains like one process (tiny Qwen3-MoE, float32, CPU, gloo): the loss of each of
10 iterations within 1e-5 relative and the gradient norm within 1e-4 (the norm catches a wrong scale of
the expert gradients, which Adam would hide from the loss) for EP2 (also with full recompute), EP2 x DP2 (with the
load-balancing loss, whose value is compared too) and EP2 x PP2 (without it: qtrain refuses it under
PP); a checkpoint saved under EP2 x DP2 resumes under EP4 and under one process. Refused combinations
are named."""

import pytest

from parallel_helpers import max_rel_diff, run_worker

LOSS_RTOL, NORM_RTOL = 1e-5, 1e-4
MOE = {"num_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": 32, "norm_topk_prob": True}
FSDP = {"use_distributed_optimizer": True}
AUX = 0.1  # the load-balancing loss's coefficient


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("ep")
    ckpt = str(tmp / "ckpt_ep2_dp2")

    def run(name, aux=AUX, **kw):  # aux None: no load-balancing loss at all (refused under PP)
        return {"name": name, "model": MOE, **({} if aux is None else {"moe_aux": aux}), **kw}

    out = run_worker(tmp, "single", 1, [run("single"), run("single_noaux", aux=0.0)])
    out |= run_worker(tmp, "world2", 2, [
        run("ep2", parallel=FSDP, moe={"expert_model_parallel_size": 2}),
        run("ep2_recompute_full", moe={"expert_model_parallel_size": 2},  # the all-to-alls run again in backward
            parallel={**FSDP, "recompute_granularity": "full", "recompute_method": "uniform", "recompute_num_layers": 1}),
    ])
    out |= run_worker(tmp, "world4", 4, [
        run("ep2_dp2", parallel=FSDP, moe={"expert_model_parallel_size": 2}, save=ckpt, save_at=5),
        run("ep2_pp2", aux=None, parallel={**FSDP, "pipeline_model_parallel_size": 2},
            moe={"expert_model_parallel_size": 2}),
        run("resume_ep4", parallel=FSDP, moe={"expert_model_parallel_size": 4}, load=ckpt),
    ])
    out |= run_worker(tmp, "resume1", 1, [run("resume_single", load=ckpt)])
    return out


@pytest.mark.timeout(900)
@pytest.mark.parametrize("layout", ["ep2", "ep2_recompute_full", "ep2_dp2", "ep2_pp2"])
def test_expert_parallel_layout_matches_single_process(results, layout):
    ref, got = results["single_noaux" if layout == "ep2_pp2" else "single"], results[layout]
    assert len(got["losses"]) == 10
    assert max_rel_diff(got["losses"], ref["losses"]) < LOSS_RTOL, (got["losses"], ref["losses"])
    assert max_rel_diff(got["grad_norms"], ref["grad_norms"]) < NORM_RTOL, (got["grad_norms"], ref["grad_norms"])
    assert abs(got["eval_loss"] - ref["eval_loss"]) < LOSS_RTOL * ref["eval_loss"]
    if layout != "ep2_pp2":
        assert got["aux"] and max_rel_diff(got["aux"], ref["aux"]) < LOSS_RTOL


@pytest.mark.parametrize("resumed", ["resume_ep4", "resume_single"])
def test_checkpoint_reshards_across_ep_sizes(results, resumed):
    ref, got = results["single"]["losses"][5:], results[resumed]["losses"]
    assert max_rel_diff(got, ref) < LOSS_RTOL, (got, ref)


def test_unsupported_combinations_are_refused_by_name():
    from qtrain.config import PretrainConfig
    from qtrain.errors import ConfigError
    from qtrain.models.presets import get_preset
    from qtrain.parallel.expert import check_expert_parallel
    from qtrain.parallel.mesh import ParallelDims

    cfg = PretrainConfig()
    cfg.moe.expert_model_parallel_size = 2
    moe, dense = get_preset("tiny-moe"), get_preset("tiny")
    check_expert_parallel(cfg, ParallelDims(pp=2, dp_shard=4), moe)  # supported: nothing raised
    for dims, model, message in [
        (ParallelDims(dp_shard=2, tp=2), moe, "--tensor-model-parallel-size > 1 is not supported"),
        (ParallelDims(dp_shard=2, cp=2), moe, "--context-parallel-size > 1 is not supported"),
        (ParallelDims(dp_replicate=2), moe, "without --use-distributed-optimizer"),
        (ParallelDims(dp_shard=3), moe, "must divide the 3 data-parallel ranks"),
        (ParallelDims(dp_shard=2), dense, "the model is dense"),
    ]:
        with pytest.raises(ConfigError, match="--expert-model-parallel-size 2"):
            check_expert_parallel(cfg, dims, model)
        with pytest.raises(ConfigError, match=message):
            check_expert_parallel(cfg, dims, model)


@pytest.mark.timeout(600)
def test_pretrain_loads_an_hf_moe_dir_into_expert_shards(tmp_path):
    """`qtrain pretrain --load <HF dir> --expert-model-parallel-size 2` on 2 processes: each rank takes its
    experts' slices of the stacked weights; the first iterations equal one process's."""
    import json
    import subprocess
    import sys
    from pathlib import Path

    import torch
    import transformers

    from parallel_helpers import free_port, worker_env

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "train"))
    from trainutil import write_tiny_dataset

    data = write_tiny_dataset(tmp_path / "tiny_text_document")
    torch.manual_seed(0)
    cfg = transformers.Qwen3MoeConfig(vocab_size=1024, hidden_size=32, intermediate_size=48, moe_intermediate_size=16,
                                      num_experts=4, num_experts_per_tok=2, num_hidden_layers=2, num_attention_heads=4,
                                      num_key_value_heads=2, head_dim=8, norm_topk_prob=True)
    transformers.Qwen3MoeForCausalLM(cfg).save_pretrained(tmp_path / "hf")
    args = ["pretrain", "--load", str(tmp_path / "hf"), "--seq-length", "32", "--micro-batch-size", "2",
            "--global-batch-size", "4", "--train-iters", "2", "--lr", "3e-3", "--data-path", data, "--split", "90,10,0",
            "--eval-iters", "0", "--log-interval", "1", "--use-distributed-optimizer", "--device", "cpu"]
    runs = {"one": [sys.executable, "-m", "qtrain", *args, "--save", str(tmp_path / "one")],
            "ep2": [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port",
                    str(free_port()), "-m", "qtrain", *args, "--save", str(tmp_path / "ep2"),
                    "--expert-model-parallel-size", "2"]}
    metrics = {}
    for name, cmd in runs.items():
        proc = subprocess.run(cmd, env=worker_env(), capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
        metrics[name] = [json.loads(line) for line in (tmp_path / name / "metrics.jsonl").read_text().splitlines()
                         if '"loss"' in line]
    for a, b in zip(metrics["ep2"], metrics["one"]):
        assert abs(a["loss"] - b["loss"]) <= LOSS_RTOL * b["loss"] and abs(a["grad_norm"] - b["grad_norm"]) <= \
            NORM_RTOL * b["grad_norm"], (a, b)
    assert len(metrics["ep2"]) == 2
