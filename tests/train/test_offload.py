"""Memory off the device (--optimizer-cpu-offload / --swap-optimizer, --cpu-offloading): the same
losses as without, exact resume, the code path really taken (on CPU the host is the device), and
the flags qtrain does not implement refused by name. The 2-rank cases (FSDP, TP) are in
tests/parallel/test_parity.py."""

import pytest

from qtrain.config import parse_args
from qtrain.errors import ConfigError
from qtrain.parallel import offload
from qtrain.train.loop import LoopHooks, pretrain
from trainutil import tiny_args

QUIET = lambda *a, **k: None  # noqa: E731


def _offloaded_run(argv, seen):
    hooks = LoopHooks(setup=lambda trainer: seen.append(offload.optimizer_offloaded(trainer.model)))
    return pretrain(parse_args(argv), log=QUIET, hooks=hooks)


def test_optimizer_offload_same_losses_and_exact_resume(tiny_data, tmp_path):
    plain = pretrain(parse_args(tiny_args(tiny_data)), log=QUIET)
    seen = []
    off = _offloaded_run(tiny_args(tiny_data, optimizer_cpu_offload=True, save=tmp_path / "a", save_interval=3), seen)
    assert seen == [True]  # FSDP's CPUOffloadPolicy on every unit
    assert off.losses == pytest.approx(plain.losses, rel=1e-5)
    # MindSpeed-LLM's --swap-optimizer is the same thing; resuming its checkpoint is exact
    (tmp_path / "a" / "latest_checkpointed_iteration.txt").write_text("3")
    resumed = _offloaded_run(tiny_args(tiny_data, swap_optimizer=True, save=tmp_path / "a", load=tmp_path / "a"), seen)
    assert seen == [True, True] and resumed.start_iteration == 3
    assert resumed.losses == {k: off.losses[k] for k in (4, 5, 6)}  # bit-identical


def test_activation_offload_moves_the_chosen_layers_saved_tensors(tiny_data, monkeypatch):
    packs = []
    real_pack = offload._pack
    monkeypatch.setattr(offload, "_pack", lambda t: packs.append(t.shape) or real_pack(t))
    plain = pretrain(parse_args(tiny_args(tiny_data, train_iters=3)), log=QUIET)
    assert not packs
    off = pretrain(parse_args(tiny_args(tiny_data, train_iters=3, cpu_offloading=True, cpu_offloading_num_layers=1)),
                   log=QUIET)
    assert packs  # the first layer's saved tensors went through the host copy
    assert off.losses == plain.losses


@pytest.mark.parametrize("extra, message", [
    ({"optimizer_offload_fraction": 0.5}, "--optimizer-offload-fraction 0.5: qtrain offloads the whole"),
    ({"cpu_offloading": True}, "--cpu-offloading: give the number of decoder layers"),
    ({"cpu_offloading_num_layers": 1}, "--cpu-offloading-num-layers needs --cpu-offloading"),
    ({"cpu_offloading": True, "cpu_offloading_num_layers": 1, "recompute_granularity": "full"},
     "--cpu-offloading with --recompute-granularity is not supported"),
])
def test_offload_options_qtrain_does_not_implement_are_refused(tiny_data, extra, message):
    with pytest.raises(ConfigError, match=message):
        parse_args(tiny_args(tiny_data, **extra))


def test_cpu_offloading_every_layer_is_refused(tiny_data):
    with pytest.raises(ConfigError, match="--cpu-offloading-num-layers 2 must be below the 2 decoder layers"):
        pretrain(parse_args(tiny_args(tiny_data, cpu_offloading=True, cpu_offloading_num_layers=2)), log=QUIET)


@pytest.mark.parametrize("flag", ["--overlap-cpu-optimizer-d2h-h2d", "--no-pin-cpu-params", "--use-wandb"])
def test_neighbouring_megatron_flags_are_refused_by_name(tiny_data, flag):
    from qtrain.errors import UsageError

    with pytest.raises(UsageError, match=f"unsupported flag {flag}: "):
        parse_args(tiny_args(tiny_data) + [flag])


def test_accepted_compat_flags_parse(tiny_data):
    cfg = parse_args(tiny_args(tiny_data, optimizer_cpu_offload=True, reuse_fp32_param=True,
                               use_torch_optimizer_for_cpu_offload=True, optimizer_offload_fraction=1.0))
    assert cfg.offload.optimizer_offloaded and cfg.compat.reuse_fp32_param
