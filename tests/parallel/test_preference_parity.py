"""Preference training trains alike on every layout: the loss, gradient norm and reward metrics of each of 5
steps of DPO (a frozen reference copy laid out like the policy), SimPO and ORPO within 1e-5 of one process
(tiny Qwen3, float32, CPU, gloo; preference_worker.py), for DP2 (FSDP), TP2, TP2+SP, PP2 (1F1B and
interleaved: the last stage computes the pair loss from per-token log-probs, the reference runs its own
pipeline) and CP2 (row sums over the context-parallel ranks)."""

import pytest

from parallel_helpers import max_rel_diff, run_worker

from preference_worker import __file__ as WORKER

LOSS_RTOL = 1e-5
NORM_RTOL = 1e-4
DPO = {"kind": "dpo", "beta": 0.5}
SIMPO = {"kind": "simpo", "beta": 2.0, "margin": 0.3}
ORPO = {"kind": "orpo", "beta": 0.2, "ftx": 0.0}

LAYOUTS = {
    "dp2": {"use_distributed_optimizer": True},
    "tp2": {"tensor_model_parallel_size": 2},
    "tp2_sp": {"tensor_model_parallel_size": 2, "sequence_parallel": True},
    "pp2": {"pipeline_model_parallel_size": 2},
    "pp2_virtual": {"pipeline_model_parallel_size": 2, "num_layers_per_virtual_pipeline_stage": 1},
    "cp2": {"context_parallel_size": 2},
}
# SimPO and ORPO (no reference) on the layouts whose loss path differs most.
OTHER_LOSSES = {"simpo_pp2": (SIMPO, "pp2"), "simpo_tp2_sp": (SIMPO, "tp2_sp"), "orpo_pp2": (ORPO, "pp2"),
                "orpo_cp2": (ORPO, "cp2")}


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("preference_parity")
    single = [{"name": "dpo", "loss": DPO}, {"name": "simpo", "loss": SIMPO}, {"name": "orpo", "loss": ORPO}]
    out = run_worker(tmp, "single", 1, single, worker=WORKER)
    runs = [{"name": f"dpo_{n}", "parallel": p, "loss": DPO} for n, p in LAYOUTS.items()]
    runs += [{"name": n, "parallel": LAYOUTS[layout], "loss": loss} for n, (loss, layout) in OTHER_LOSSES.items()]
    out |= run_worker(tmp, "world2", 2, runs, timeout=600, worker=WORKER)
    return out


def _compare(got, ref):
    assert len(got["losses"]) == 5
    assert max_rel_diff(got["losses"], ref["losses"]) < LOSS_RTOL, (got["losses"], ref["losses"])
    assert max_rel_diff(got["grad_norms"], ref["grad_norms"]) < NORM_RTOL, (got["grad_norms"], ref["grad_norms"])
    for g, r in zip(got["metrics"], ref["metrics"]):
        assert g.keys() == r.keys()
        scale = max(abs(v) for v in r.values())
        for k in r:
            assert abs(g[k] - r[k]) <= LOSS_RTOL * scale, (k, g[k], r[k])


@pytest.mark.timeout(900)
@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_dpo_layout_matches_single_process(results, layout):
    _compare(results[f"dpo_{layout}"], results["dpo"])


@pytest.mark.timeout(900)
@pytest.mark.parametrize("run", list(OTHER_LOSSES))
def test_simpo_orpo_layouts_match_single_process(results, run):
    _compare(results[run], results[run.split("_")[0]])


def test_training_moves_the_loss_and_the_rewards(results):
    """Guard against a vacuous comparison: the losses change, the reference matters, rewards move."""
    for name in ("dpo", "simpo", "orpo"):
        losses = results[name]["losses"]
        assert max(losses) - min(losses) > 1e-3, (name, losses)
    first = results["dpo"]["metrics"][0]
    assert abs(first["rewards/margins"]) > 1e-3  # the reference's other weights give non-zero rewards at step 1
    assert abs(results["dpo"]["metrics"][-1]["rewards/margins"] - first["rewards/margins"]) > 1e-3
