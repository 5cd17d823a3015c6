"""Every layout trains like one process: the loss of each of 10 iterations within 1e-5 relative
(tiny Qwen3, float32, CPU, gloo), and a checkpoint saved under TP2xPP2 resumes under DP4 and
under one process. The gradient norm, far more sensitive to a wrong gradient than the loss
(Adam normalises updates), is checked too. The LM-head loss is the chunked one on every layout
(several chunks per micro-batch, see parallel_worker.py): on the last pipeline stage, and
vocab-parallel under TP (with SP: from sequence-sharded hidden states); tied embeddings, and
untied ones against an untied one-process run."""

import pytest

from parallel_helpers import max_rel_diff, run_worker

LOSS_RTOL = 1e-5
NORM_RTOL = 1e-4
# Ring attention (CP4 ring, hybrid) sums each softmax block by block, merged by log-sum-exp: its
# attention differs from one process's SDPA by ~2e-7 of the values' scale (outputs and q/k/v
# gradients, measured against float64), and 10 Adam steps amplify that in the gradient norm to
# 1.3e-4 (cp4, iteration 10; 2e-5 for Ulysses, whose attention is SDPA). The loss stays within 1e-5;
# a wrong gradient moves the norm by 4e-3 or more (see docs/parallel.md).
RING_NORM_RTOL = 3e-4

WORLD2 = {
    "dp2_fsdp": {"use_distributed_optimizer": True},
    "dp2_replicated": {},
    "tp2": {"tensor_model_parallel_size": 2},
    "tp2_sp": {"tensor_model_parallel_size": 2, "sequence_parallel": True},
    "pp2_1f1b": {"pipeline_model_parallel_size": 2},
    "pp2_virtual": {"pipeline_model_parallel_size": 2, "num_layers_per_virtual_pipeline_stage": 1},
    "pp2_uneven": {"pipeline_model_parallel_size": 2, "num_layer_list": "1,3"},
    "cp2": {"context_parallel_size": 2},
    "dp2_recompute_full_block": {"use_distributed_optimizer": True, "recompute_granularity": "full",
                                 "recompute_method": "block", "recompute_num_layers": 2},
    "tp2_recompute_selective": {"tensor_model_parallel_size": 2, "recompute_granularity": "selective"},
}

# Memory off the device (qtrain.parallel.offload): on CPU the host is the device, so these check that
# the offload code paths (FSDP's CPUOffloadPolicy, asserted applied by the worker; the saved-tensor
# hooks) compute the same thing.
WORLD2_OFFLOAD = {
    "dp2_fsdp_optimizer_offload": ({"use_distributed_optimizer": True}, {"optimizer_cpu_offload": True}),
    "tp2_optimizer_offload": ({"tensor_model_parallel_size": 2}, {"optimizer_cpu_offload": True}),
    "dp2_activation_offload": ({}, {"cpu_offloading": True, "cpu_offloading_num_layers": 2}),
    "tp2_sp_activation_offload": ({"tensor_model_parallel_size": 2, "sequence_parallel": True},
                                  {"cpu_offloading": True, "cpu_offloading_num_layers": 3}),
}

# Untied embeddings (a separate LM-head weight on the last stage / vocab shard), against "single_untied".
UNTIED = {"tie_word_embeddings": False}
WORLD2_UNTIED = {
    "pp2_1f1b_untied": {"pipeline_model_parallel_size": 2},
    "pp2_virtual_untied": {"pipeline_model_parallel_size": 2, "num_layers_per_virtual_pipeline_stage": 1},
    "tp2_sp_untied": {"tensor_model_parallel_size": 2, "sequence_parallel": True},
}

# Context parallel: ring (megatron_cp_algo, the default), Ulysses and hybrid, with packed documents
# ("docs": cu_seqlens, per-document positions) and under PP (documents under PP alone too). Ulysses over 4 ranks needs 4 key/value
# heads (the tiny model has 2), so it runs a 4-KV-head model against its own one-process run.
KV4 = {"num_key_value_heads": 4}
ULYSSES = {"context_parallel_algo": "ulysses_cp_algo"}
CP_WORLD2 = {
    "cp2_docs": ({"context_parallel_size": 2}, True, None),
    "cp2_ulysses": ({"context_parallel_size": 2, **ULYSSES}, False, None),
    "cp2_ulysses_docs": ({"context_parallel_size": 2, **ULYSSES}, True, None),
    # recomputation re-runs the ring's autograd Function / the all-to-alls in the backward
    "cp2_recompute_full_docs": ({"context_parallel_size": 2, "recompute_granularity": "full",
                                 "recompute_method": "uniform", "recompute_num_layers": 1}, True, None),
    "cp2_ulysses_selective_docs": ({"context_parallel_size": 2, **ULYSSES, "recompute_granularity": "selective"},
                                   True, None),
}
CP_WORLD4 = {
    "cp4": ({"context_parallel_size": 4}, False, None),
    "cp4_docs": ({"context_parallel_size": 4}, True, None),
    "cp4_ulysses": ({"context_parallel_size": 4, **ULYSSES}, False, KV4),
    "cp4_ulysses_docs": ({"context_parallel_size": 4, **ULYSSES}, True, KV4),
    "cp4_hybrid_docs": ({"context_parallel_size": 4, "context_parallel_algo": "hybrid_cp_algo",
                         "ulysses_degree_in_cp": 2}, True, None),
    "cp2_pp2": ({"context_parallel_size": 2, "pipeline_model_parallel_size": 2}, False, None),
    "cp2_ulysses_pp2": ({"context_parallel_size": 2, "pipeline_model_parallel_size": 2, **ULYSSES}, False, None),
    "cp2_pp2_docs": ({"context_parallel_size": 2, "pipeline_model_parallel_size": 2}, True, None),
    "pp2_dp2_docs": ({"pipeline_model_parallel_size": 2, "use_distributed_optimizer": True}, True, None),
}


def cp_reference(layout: str) -> str:
    docs, kv4 = (CP_WORLD2 | CP_WORLD4)[layout][1:]
    return "single" + ("_kv4" if kv4 else "") + ("_docs" if docs else "")


def cp_runs(layouts: dict) -> list[dict]:
    return [{"name": n, "parallel": p, "docs": docs, **({"model": m} if m else {})}
            for n, (p, docs, m) in layouts.items()]


# Beyond the acceptance list: the combinations big recipes use (TP+SP inside pipeline stages, CP with TP).
WORLD4_EXTRA = {
    "pp2_tp2_sp": {"tensor_model_parallel_size": 2, "pipeline_model_parallel_size": 2, "sequence_parallel": True},
    "cp2_tp2": {"tensor_model_parallel_size": 2, "context_parallel_size": 2},
}


# Qwen3-MoE (4 experts, top-2, a dense first layer) with the load-balancing loss, against "single_moe";
# under PP the loss is refused (qtrain.train.moe), so PP runs against "single_moe_noaux".
MOE = {"num_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": 48, "norm_topk_prob": True,
       "mlp_only_layers": [0]}
WORLD2_MOE = {
    "dp2_fsdp_moe": {"use_distributed_optimizer": True},
    "tp2_moe": {"tensor_model_parallel_size": 2},
    "tp2_sp_moe": {"tensor_model_parallel_size": 2, "sequence_parallel": True},
    "dp2_recompute_moe": {"recompute_granularity": "full", "recompute_method": "uniform", "recompute_num_layers": 1},
}
WORLD2_MOE_NOAUX = {"pp2_moe": {"pipeline_model_parallel_size": 2}}
# Megatron-core's per-layer loss (--moe-aux-loss-coeff), attached in each experts block: also under PP,
# against "single_moe_megatron"; under CP the expert counts are summed over the CP ranks. Coefficient 0.02 (20x MindSpeed's): its router gradient, per layer and
# with f normalised by top_k, is several times transformers' at 0.1; stronger, TP's rounding (1e-7)
# flips a near-tied top-k choice within 10 steps and the runs part by ~5e-4 (the step-0 norms agree to 1e-7,
# where a router gradient counted twice would differ by 7e-4)
MEGATRON_AUX = 0.02
WORLD2_MOE_MEGATRON = {"pp2_moe_megatron": {"pipeline_model_parallel_size": 2},
                       "tp2_sp_moe_megatron": {"tensor_model_parallel_size": 2, "sequence_parallel": True},
                       "cp2_moe_megatron": {"context_parallel_size": 2}}


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("parity")
    ckpt, moe_ckpt = str(tmp / "ckpt_tp2pp2"), str(tmp / "ckpt_tp2_moe")
    out = run_worker(tmp, "single", 1, [{"name": "single"}, {"name": "single_untied", "model": UNTIED},
                                        {"name": "single_docs", "docs": True}, {"name": "single_kv4", "model": KV4},
                                        {"name": "single_kv4_docs", "docs": True, "model": KV4},
                                        {"name": "single_moe", "model": MOE, "moe_aux": 0.1},
                                        {"name": "single_moe_noaux", "model": MOE, "moe_aux": 0.0},
                                        {"name": "single_moe_megatron", "model": MOE, "moe_aux": MEGATRON_AUX,
                                         "moe_formula": "megatron"}])
    out |= run_worker(tmp, "world2", 2, [{"name": n, "parallel": p} for n, p in WORLD2.items()]
                      + [{"name": n, "parallel": p, "model": UNTIED} for n, p in WORLD2_UNTIED.items()]
                      + [{"name": n, "parallel": p, "offload": o} for n, (p, o) in WORLD2_OFFLOAD.items()]
                      + cp_runs(CP_WORLD2)
                      + [{"name": n, "parallel": p, "model": MOE, "moe_aux": 0.1}
                         | ({"save": moe_ckpt, "save_at": 5} if n == "tp2_moe" else {}) for n, p in WORLD2_MOE.items()]
                      + [{"name": n, "parallel": p, "model": MOE} for n, p in WORLD2_MOE_NOAUX.items()]
                      + [{"name": n, "parallel": p, "model": MOE, "moe_aux": MEGATRON_AUX, "moe_formula": "megatron"}
                         for n, p in WORLD2_MOE_MEGATRON.items()])
    out |= run_worker(tmp, "world4", 4, [
        {"name": "dp2_tp2", "parallel": {"tensor_model_parallel_size": 2, "use_distributed_optimizer": True}},
        {"name": "pp2_tp2", "parallel": {"tensor_model_parallel_size": 2, "pipeline_model_parallel_size": 2},
         "save": ckpt, "save_at": 5},
        {"name": "resume_dp4", "parallel": {"use_distributed_optimizer": True}, "load": ckpt},
        *({"name": n, "parallel": p} for n, p in WORLD4_EXTRA.items()),
        *cp_runs(CP_WORLD4),
    ])
    out |= run_worker(tmp, "resume1", 1, [{"name": "resume_single", "load": ckpt},
                                          {"name": "resume_single_moe", "model": MOE, "moe_aux": 0.1, "load": moe_ckpt}])
    return out


@pytest.mark.timeout(900)
@pytest.mark.parametrize("layout", [*WORLD2, *WORLD2_UNTIED, *WORLD2_OFFLOAD, "dp2_tp2", "pp2_tp2", *WORLD4_EXTRA,
                                    *CP_WORLD2, *CP_WORLD4])
def test_layout_matches_single_process(results, layout):
    ref = "single_untied" if layout in WORLD2_UNTIED else cp_reference(layout) if layout in CP_WORLD2 | CP_WORLD4 \
        else "single"
    ref, got = results[ref], results[layout]
    assert len(got["losses"]) == 10
    assert max_rel_diff(got["losses"], ref["losses"]) < LOSS_RTOL, (got["losses"], ref["losses"])
    norm_rtol = RING_NORM_RTOL if layout in ("cp4", "cp4_docs", "cp4_hybrid_docs") else NORM_RTOL
    assert max_rel_diff(got["grad_norms"], ref["grad_norms"]) < norm_rtol, (got["grad_norms"], ref["grad_norms"])
    # validation (forward only; the pipeline's eval schedule under PP) after the 10 steps
    assert max_rel_diff([got["eval_loss"]], [ref["eval_loss"]]) < LOSS_RTOL


@pytest.mark.timeout(900)
@pytest.mark.parametrize("layout", [*WORLD2_MOE, *WORLD2_MOE_NOAUX, *WORLD2_MOE_MEGATRON])
def test_moe_layout_matches_single_process(results, layout):
    ref = results["single_moe" if layout in WORLD2_MOE else "single_moe_megatron" if layout in WORLD2_MOE_MEGATRON
                  else "single_moe_noaux"]
    got = results[layout]
    assert len(got["losses"]) == 10
    assert max_rel_diff(got["losses"], ref["losses"]) < LOSS_RTOL, (got["losses"], ref["losses"])
    assert max_rel_diff(got["grad_norms"], ref["grad_norms"]) < NORM_RTOL, (got["grad_norms"], ref["grad_norms"])
    assert len(got["aux"]) == (10 if layout in WORLD2_MOE or layout in WORLD2_MOE_MEGATRON else 0)
    if got["aux"]:
        assert max_rel_diff(got["aux"], ref["aux"]) < LOSS_RTOL, (got["aux"], ref["aux"])
    assert max_rel_diff([got["eval_loss"]], [ref["eval_loss"]]) < LOSS_RTOL


def test_moe_tp2_checkpoint_resumes_in_one_process(results):
    uninterrupted, got = results["tp2_moe"], results["resume_single_moe"]
    assert len(got["losses"]) == 5
    assert max_rel_diff(got["losses"], uninterrupted["losses"][5:]) < LOSS_RTOL
    assert max_rel_diff(got["grad_norms"], uninterrupted["grad_norms"][5:]) < NORM_RTOL


def test_moe_aux_loss_changes_training(results):
    """The load-balancing loss reaches the gradients (the runs with and without it differ)."""
    assert max_rel_diff(results["single_moe"]["grad_norms"], results["single_moe_noaux"]["grad_norms"]) > 1e-4
    assert max_rel_diff(results["single_moe_megatron"]["grad_norms"], results["single_moe_noaux"]["grad_norms"]) > 1e-4
    # the two formulas differ (Megatron's per layer, f normalised by tokens x top_k)
    assert max_rel_diff(results["single_moe_megatron"]["aux"], results["single_moe"]["aux"]) > 1e-2


@pytest.mark.parametrize("resumed", ["resume_dp4", "resume_single"])
def test_tp2pp2_checkpoint_resumes_under_other_layouts(results, resumed):
    uninterrupted = results["pp2_tp2"]
    got = results[resumed]
    assert len(got["losses"]) == 5  # iterations 6..10
    assert max_rel_diff(got["losses"], uninterrupted["losses"][5:]) < LOSS_RTOL
    assert max_rel_diff(got["grad_norms"], uninterrupted["grad_norms"][5:]) < NORM_RTOL
    assert max_rel_diff([got["eval_loss"]], [uninterrupted["eval_loss"]]) < LOSS_RTOL


def test_training_moves_the_loss(results):
    """Guard against a vacuous comparison: the reference run's loss does change."""
    losses = results["single"]["losses"]
    assert max(losses) - min(losses) > 1e-3
    untied = results["single_untied"]["losses"]
    assert max_rel_diff(untied, losses) > 1e-4  # the untied run is another model
