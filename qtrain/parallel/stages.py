"""How a model's decoder layers are spread over pipeline stages and their virtual (interleaved)
chunks, as Megatron-LM and MindSpeed-LLM spread them (training layouts and checkpoint files alike)."""

from __future__ import annotations

from qtrain.errors import ConfigError


def parse_num_layer_list(text: str | None) -> list[int] | None:
    """`"14,14"` -> [14, 14] (MindSpeed-LLM's --num-layer-list)."""
    if text is None or text == "":
        return None
    try:
        return [int(x) for x in str(text).split(",")]
    except ValueError:
        raise ConfigError(f"--num-layer-list {text!r}: expected comma-separated integers such as 14,14") from None


def split_layers(num_layers: int, pp: int, num_layer_list: list[int] | None = None,
                 vpp_layers: int | None = None) -> list[list[list[int]]]:
    """Global decoder-layer indices for each pipeline stage and each of its model chunks.

    Returns `stages[pp_rank][chunk] = [global layer, ...]`. Without virtual stages each stage has
    one chunk. With `vpp_layers` layers per virtual stage, chunks are dealt round-robin as Megatron's
    interleaved schedule does: chunk v of stage p holds block number v * pp + p.
    """
    if pp < 1:
        raise ConfigError(f"--target-pipeline-parallel-size must be >= 1, got {pp}")
    if num_layer_list is not None:
        if vpp_layers is not None:
            raise ConfigError("--num-layer-list and --num-layers-per-virtual-pipeline-stage cannot be combined")
        if len(num_layer_list) != pp or sum(num_layer_list) != num_layers or min(num_layer_list) < 1:
            raise ConfigError(
                f"--num-layer-list {','.join(map(str, num_layer_list))}: needs {pp} positive entries "
                f"(one per pipeline stage) summing to the model's {num_layers} layers")
        starts = [sum(num_layer_list[:p]) for p in range(pp)]
        return [[list(range(s, s + n))] for s, n in zip(starts, num_layer_list)]
    if num_layers % pp:
        raise ConfigError(
            f"the model's {num_layers} layers do not divide into {pp} pipeline stages; "
            f"choose a pipeline size that divides {num_layers} or give --num-layer-list")
    per_stage = num_layers // pp
    if vpp_layers is None:
        return [[list(range(p * per_stage, (p + 1) * per_stage))] for p in range(pp)]
    if vpp_layers < 1 or per_stage % vpp_layers:
        raise ConfigError(
            f"--num-layers-per-virtual-pipeline-stage {vpp_layers} must divide the {per_stage} layers per stage")
    chunks = per_stage // vpp_layers
    return [[list(range((v * pp + p) * vpp_layers, (v * pp + p + 1) * vpp_layers)) for v in range(chunks)]
            for p in range(pp)]
