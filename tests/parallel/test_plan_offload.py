"""qtrain plan with memory off the device (--optimizer-cpu-offload, --cpu-offloading): what leaves
the device for Qwen3-8B and 32B on 8 x 64 GB (the docs/performance.md table), and offload
suggested when no layout fits without it."""

import pytest

from qtrain.config import parse_args
from qtrain.models.presets import get_preset
from qtrain.parallel.plan import GIB, estimate_memory, layer_activation_bytes, main, suggest_layouts


def _cfg(*extra: str):
    return parse_args(["--seq-length", "4096", "--micro-batch-size", "1", "--bf16", "--use-distributed-optimizer",
                       *extra])


@pytest.mark.parametrize("preset", ["8B", "32B"])
def test_optimizer_offload_moves_16_bytes_per_parameter_shard_to_the_host(preset):
    model = get_preset(preset)
    full = "--recompute-granularity full --recompute-method uniform --recompute-num-layers 1".split()
    plain = estimate_memory(model, _cfg(*full), 8, device_type="cuda")
    off = estimate_memory(model, _cfg(*full, "--optimizer-cpu-offload"), 8, device_type="cuda")
    # fp32 weights, gradients, exp_avg, exp_avg_sq of each rank's 1/8 of every parameter
    assert off.host == pytest.approx(16 * model.num_params / 8, rel=1e-6)
    assert (off.weights, off.grads, off.optimizer) == (0, 0, 0)
    assert plain.weights + plain.grads + plain.optimizer == pytest.approx(off.host, rel=1e-6)
    assert off.activations == plain.activations and off.transient > plain.transient
    saved = (plain.total - off.total) / GIB
    assert saved == pytest.approx({"8B": 13.92, "32B": 59.12}[preset], abs=0.01)  # the docs table
    if preset == "32B":  # FSDP8 + full recompute: 71.9 GiB does not fit a 64 GB card, 12.8 GiB does
        assert not plain.fits(64) and off.fits(64)


def test_activation_offload_keeps_one_layer_in_transit_on_the_device():
    model = get_preset("8B")
    plain = estimate_memory(model, _cfg(), 8, device_type="cuda")
    off = estimate_memory(model, _cfg("--cpu-offloading", "--cpu-offloading-num-layers", "35"), 8, device_type="cuda")
    per_layer = layer_activation_bytes(model, 2) * 4096  # bf16, no recompute: every layer keeps the same
    assert off.activations == pytest.approx(plain.activations - 35 * per_layer + per_layer, rel=1e-9)
    assert off.host == pytest.approx(35 * per_layer, rel=1e-9)


def test_offload_suggested_only_when_nothing_fits_without(capsys):
    fits = suggest_layouts(get_preset("8B"), _cfg(), 8, 64)
    assert fits and not any("optimizer_cpu_offload" in layout for layout, _ in fits)
    # 32B: 16 bytes per parameter over 8 ranks is 59.6 GiB per device on any layout
    found = suggest_layouts(get_preset("32B"), _cfg(), 8, 64)
    assert found and all(layout.get("optimizer_cpu_offload") for layout, _ in found)
    assert main(["--model-preset", "32B", "--seq-length", "4096", "--micro-batch-size", "1", "--bf16",
                 "--use-distributed-optimizer", "--world-size", "8", "--device-memory-gb", "64"]) == 1
    out = capsys.readouterr().out
    assert "with --optimizer-cpu-offload: 101.51 GiB per device (does NOT fit)" in out
    assert "with --optimizer-cpu-offload --cpu-offloading --cpu-offloading-num-layers 63: 11.77 GiB per device " \
           "(fits)" in out
