"""Qwen3-MoE through `qtrain pretrain`: the load-balancing loss and the routing metrics, exact resume,
the HF export read by transformers, generation and evaluation on the checkpoint; refusals by name."""

import json

import pytest
import torch

from qtrain.config import parse_args
from qtrain.errors import ConfigError
from qtrain.train.pretrain import main as pretrain_main
from trainutil import read_metrics, tiny_args, train_losses


def moe_args(data, **over):
    return tiny_args(data, **{"model_preset": "tiny-moe", "eval_iters": 0, "train_iters": 4, **over})


def test_aux_loss_metrics_resume_export_generate_evaluate(tiny_data, tmp_path, capsys):
    straight, resumed = tmp_path / "a", tmp_path / "b"
    assert pretrain_main(moe_args(tiny_data, save=straight, moe_aux_loss_coeff=0.05, save_hf=tmp_path / "hf")) == 0
    assert "load-balancing loss: Megatron-core's per-layer switch loss (from --moe-aux-loss-coeff), coefficient " \
           "0.05 per MoE layer" in capsys.readouterr().out
    records = [r for r in read_metrics(straight) if "loss" in r]
    assert len(records) == 4
    # Megatron's loss summed over the 2 MoE layers: balanced routing gives 1 per layer, a collapsed one
    # num_experts / top_k (4) per layer
    for r in records:
        assert 1.0 < r["load_balancing_loss"] < 8.0
        assert len(r["expert_load_max_over_mean"]) == 2 and all(x >= 1.0 for x in r["expert_load_max_over_mean"])
    # exact resume: 2 iterations, save, 2 more == 4 straight
    assert pretrain_main(moe_args(tiny_data, save=resumed, moe_aux_loss_coeff=0.05, train_iters=2,
                                  lr_decay_iters=4)) == 0
    assert pretrain_main(moe_args(tiny_data, save=resumed, moe_aux_loss_coeff=0.05, load=resumed)) == 0
    assert train_losses(resumed) == train_losses(straight)

    transformers = pytest.importorskip("transformers")
    from qtrain.infer.generate import generate
    from qtrain.infer.loading import load_model_for_inference

    model, _ = load_model_for_inference(straight)
    hf = transformers.Qwen3MoeForCausalLM.from_pretrained(tmp_path / "hf").eval()
    ids = torch.randint(0, 1000, (2, 12))
    with torch.no_grad():
        assert torch.allclose(model(ids), hf(input_ids=ids).logits, rtol=0, atol=1e-5)
    cached = generate(model, ids, 6)
    assert torch.equal(cached, generate(model, ids, 6, use_cache=False))
    from qtrain.infer.evaluate import main as evaluate_main

    out = tmp_path / "ppl.json"
    assert evaluate_main(["--load", str(straight), "--data-path", tiny_data, "--seq-length", "32",
                          "--output-json", str(out)]) == 0
    assert 1.0 < json.loads(out.read_text())["perplexity"] < 1024


def test_aux_loss_coeff_default_and_refusals(tiny_data):
    from qtrain.config import resolve_model_config
    from qtrain.train.moe import MEGATRON, TRANSFORMERS, aux_loss_coeff, moe_training

    cfg = parse_args(moe_args(tiny_data))
    model_cfg = resolve_model_config(cfg)
    assert aux_loss_coeff(None, model_cfg) == 0.0  # output_router_logits false, as transformers trains
    model_cfg.output_router_logits = True
    assert aux_loss_coeff(None, model_cfg) == 0.001
    # the config's coefficient means transformers' pooled loss: refused under PP, naming the way out
    pp = parse_args(moe_args(tiny_data, pipeline_model_parallel_size=2))
    with pytest.raises(ConfigError, match="router_aux_loss_coef 0.001 .*transformers'.*pipeline-model-parallel-size.*"
                                          "--moe-aux-loss-coeff C for Megatron's per-layer loss"):
        moe_training(pp, model_cfg)
    # Megatron's flag means Megatron's per-layer loss, under PP too
    flagged = moe_training(parse_args(moe_args(tiny_data, pipeline_model_parallel_size=2, moe_aux_loss_coeff=0.01)),
                           model_cfg)
    assert (flagged.formula, flagged.coeff) == (MEGATRON, 0.01)
    assert moe_training(parse_args(moe_args(tiny_data)), model_cfg).formula == TRANSFORMERS
    cp = parse_args(moe_args(tiny_data, context_parallel_size=2))
    with pytest.raises(ConfigError, match="router_aux_loss_coef 0.001: .*transformers' formula.*context-parallel-size.*"
                                          "--moe-aux-loss-coeff C gives Megatron's per-layer loss"):
        moe_training(cp, model_cfg)
    assert moe_training(parse_args(moe_args(tiny_data, context_parallel_size=2, moe_aux_loss_coeff=0.01)),
                        model_cfg).formula == MEGATRON
    dense = parse_args(tiny_args(tiny_data, moe_aux_loss_coeff=0.01))
    with pytest.raises(ConfigError, match="dense"):
        moe_training(dense, resolve_model_config(dense))
