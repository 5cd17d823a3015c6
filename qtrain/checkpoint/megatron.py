"""Read and write Megatron legacy ("torch" format) checkpoints of Qwen3, as Megatron-LM and
MindSpeed-LLM (convert_ckpt_v2.py, training with --ckpt-format torch) lay them out.

Each rank file `iter_XXXXXXX/mp_rank_TT[_PPP]/model_optim_rng.pt` is a dict with `args` (an
argparse.Namespace), `checkpoint_version` 3.0, `iteration` and `model` (`model0`, `model1`, ...
with virtual pipeline stages), the model being megatron-core GPTModel's state dict for that
rank's slice (local layer spec names, layer numbers local to the chunk, the empty `_extra_state`
of each linear layer). Files written here carry no optimizer or RNG state: load them in Megatron
with `--finetune` or `--no-load-optim --no-load-rng`. MindSpeed-LLM 2.2.0's convert_ckpt.py and
convert_ckpt_v2.py read them as their own (docs/megatron.md says how that was checked).

Public API:
- `save_megatron(get_tensor, cfg, save_dir, tp=..., pp=...)` writes one (tp, pp) file at a time;
- `MegatronReader(dir, iteration)` gives random access to HF-named tensors, one PP stage mapped at a time;
- `load_megatron_state_dict(dir, iteration=None) -> (Qwen3Config, {hf_name: tensor})`, for `--load`.
"""

from __future__ import annotations

import argparse
import os
import pickle
import re
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch

from qtrain.checkpoint import safe_pickle
from qtrain.checkpoint.layout import (MODEL_FILE, iteration_dir_name, rank_dir_name, resolve_iteration,
                                      swap_into_place, write_tracker)
from qtrain.checkpoint.megatron_map import (ParamSpec, check_tp, chunk_specs, hf_param_names, merge, normalize_key,
                                            shard, with_extra_state)
from qtrain.errors import CheckpointError, ConfigError
from qtrain.models.config import Qwen3Config
from qtrain.models.presets import PRESETS
from qtrain.models.rope_scaling import megatron_rope_args, read_megatron_rope
from qtrain.parallel.stages import split_layers

CHECKPOINT_VERSION = 3.0
_DTYPE_NAMES = ("float32", "bfloat16", "float16")
_DTYPE_NAME = {getattr(torch, n): n for n in _DTYPE_NAMES}
_RANK_DIR = re.compile(r"^mp_rank_(\d{2})(?:_(\d{3}))?(?:_(\d{3}))?$")


def megatron_args(cfg: Qwen3Config, *, tp: int, pp: int, num_layer_list: list[int] | None,
                  vpp_layers: int | None, dtype: torch.dtype, iteration: int, seq_length: int | None = None,
                  hf_config: dict[str, Any] | None = None) -> argparse.Namespace:
    """The `args` of a rank file, set from the model and the layout.

    It holds every field that Megatron-LM's load_args_from_checkpoint / check_checkpoint_args /
    validate_args (core_v0.12.1) and MindSpeed-LLM 2.2.0 (its load_args wrapper, convert_ckpt.py,
    convert_ckpt_v2.py's MegatronModel) read from a checkpoint, plus the model fields
    convert_ckpt_v2 writes under HF names. docs/megatron.md lists who reads what;
    tests/checkpoint/test_megatron_args.py checks it. `seq_length` defaults to the model's
    max_position_embeddings (what MindSpeed-LLM's convert_ckpt.py records for an HF source).
    """
    chunks = None if vpp_layers is None else cfg.num_hidden_layers // pp // vpp_layers
    theta = cfg.rope_theta
    args = argparse.Namespace(
        # shape, in Megatron's names ...
        num_layers=cfg.num_hidden_layers, hidden_size=cfg.hidden_size, ffn_hidden_size=cfg.intermediate_size,
        num_attention_heads=cfg.num_attention_heads, group_query_attention=True,
        num_query_groups=cfg.num_key_value_heads, kv_channels=cfg.head_dim,
        vocab_size=cfg.vocab_size, padded_vocab_size=cfg.vocab_size, make_vocab_size_divisible_by=1,
        max_position_embeddings=cfg.max_position_embeddings,
        seq_length=cfg.max_position_embeddings if seq_length is None else seq_length,
        # ... and in the HF names MindSpeed-LLM's convert_ckpt_v2 writes beside them
        num_key_value_heads=cfg.num_key_value_heads, intermediate_size=cfg.intermediate_size,
        tie_word_embeddings=cfg.tie_word_embeddings, torch_dtype=_DTYPE_NAME.get(dtype),
        # add_position_embedding: Megatron's default, which MindSpeed-LLM's Qwen3 scripts keep; it is checked
        # against the running job's value on load, and unused with rope.
        position_embedding_type="rope", add_position_embedding=True, use_rotary_position_embeddings=True,
        rotary_percent=1.0, rotary_interleaved=False,
        rotary_base=int(theta) if float(theta).is_integer() else float(theta),  # Megatron's --rotary-base is an int
        normalization="RMSNorm", norm_epsilon=cfg.rms_norm_eps, apply_layernorm_1p=False, qk_layernorm=True,
        swiglu=True, squared_relu=False, add_bias_linear=False, add_qkv_bias=False, post_norm=False,
        apply_query_key_layer_scaling=False, untie_embeddings_and_output_weights=not cfg.tie_word_embeddings,
        init_method_std=cfg.initializer_range, hidden_dropout=0.0, attention_dropout=0.0,
        # how MindSpeed-LLM's converters lay out attention and MLP; a dense model (no experts, no MTP layers).
        # Not first_k_dense_replace: convert_ckpt_v2 writes num_layers there, which MindSpeed-LLM's own
        # validate_args (transformer_block.py) then refuses; left unset, both read the model as dense.
        qkv_type="unpack", fc_type="gate_up_down", moe_grouped_gemm=False, mtp_num_layers=0,
        tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp,
        virtual_pipeline_model_parallel_size=chunks, num_layers_per_virtual_pipeline_stage=vpp_layers,
        # MindSpeed-LLM refuses a layer list without pipeline stages to spread it over
        num_layer_list=None if num_layer_list is None or pp == 1 else ",".join(map(str, num_layer_list)),
        expert_model_parallel_size=1, expert_tensor_parallel_size=tp,
        params_dtype=dtype, bf16=dtype == torch.bfloat16, fp16=dtype == torch.float16,
        use_mcore_models=True, transformer_impl="local", ckpt_format="torch", model_type_hf="qwen3",
        tokenizer_type="PretrainedFromHF", iteration=iteration, consumed_train_samples=0,
        consumed_valid_samples=0,
        # Not read by Megatron: lets `qtrain convert mg -> hf` restore the HF config.json exactly.
        qtrain_hf_config=hf_config,
    )
    vars(args).update(megatron_rope_args(cfg.rope_scaling))  # MindSpeed-LLM's / Megatron-LM's RoPE scaling names
    return args


def _arg(args: argparse.Namespace, *names: str) -> Any:
    """The first of `names` that args sets (Megatron-LM and MindSpeed-LLM spell some fields differently)."""
    for name in names:
        if getattr(args, name, None) is not None:
            return getattr(args, name)
    return None


def config_from_args(args: argparse.Namespace, source: str, shapes: dict[str, tuple[int, ...]],
                     tp: int) -> tuple[Qwen3Config, dict[str, Any] | None]:
    """A Qwen3Config from a checkpoint's `args` and the shapes of its first stage's tensors.

    qtrain stores the HF config in args. Otherwise the shape comes from Megatron-LM's names
    (ffn_hidden_size, num_query_groups, padded_vocab_size) or the ones MindSpeed-LLM's converter
    writes (intermediate_size, num_key_value_heads, vocab_size); query groups, MLP width and
    vocabulary are read off the tensors themselves, which cannot be stale. Args describing another
    architecture are refused.
    """
    hf_config = getattr(args, "qtrain_hf_config", None)
    if isinstance(hf_config, dict):
        return Qwen3Config.from_hf_dict(hf_config, source=source), hf_config
    mismatches = []
    if getattr(args, "normalization", "LayerNorm") != "RMSNorm":
        mismatches.append(f"normalization={getattr(args, 'normalization', None)!r} (Qwen3 uses RMSNorm)")
    if not getattr(args, "swiglu", False):
        mismatches.append("swiglu is off (Qwen3 uses SwiGLU)")
    if not getattr(args, "qk_layernorm", False):
        mismatches.append("qk_layernorm is off (Qwen3 normalises q and k)")
    if getattr(args, "add_bias_linear", False) or getattr(args, "add_qkv_bias", False):
        mismatches.append("linear biases are on (Qwen3 has none)")
    if getattr(args, "num_experts", None):
        mismatches.append(f"num_experts={args.num_experts} (MoE; qtrain converts dense Qwen3)")
    if getattr(args, "position_embedding_type", "rope") != "rope":
        mismatches.append(f"position_embedding_type={args.position_embedding_type!r} (Qwen3 uses rope)")
    if mismatches:
        raise ConfigError(f"{source}: not a dense Qwen3 checkpoint: " + "; ".join(mismatches))
    rope_scaling = read_megatron_rope(args, source)
    for key in ("embedding.word_embeddings.weight", "decoder.layers.0.self_attention.linear_qkv.weight",
                "decoder.layers.0.mlp.linear_fc1.weight"):
        if key not in shapes:
            raise CheckpointError(f"{source}: no {key!r} in the first pipeline stage; not a GPT model checkpoint")
    vocab, hidden = shapes["embedding.word_embeddings.weight"]
    heads = _arg(args, "num_attention_heads")
    layers = _arg(args, "num_layers")
    if heads is None or layers is None:
        raise CheckpointError(f"{source}: checkpoint args lack num_attention_heads / num_layers")
    head_dim = _arg(args, "kv_channels") or hidden // heads
    qkv_rows = shapes["decoder.layers.0.self_attention.linear_qkv.weight"][0] * tp
    groups, rest = divmod(qkv_rows // head_dim - heads, 2)
    if rest or groups < 1 or qkv_rows % head_dim:
        raise CheckpointError(f"{source}: linear_qkv has {qkv_rows} rows, which does not fit {heads} heads "
                              f"of size {head_dim} (kv_channels) with whole query groups")
    untie = _arg(args, "untie_embeddings_and_output_weights")
    cfg = Qwen3Config(
        vocab_size=vocab * tp, hidden_size=hidden,
        intermediate_size=shapes["decoder.layers.0.mlp.linear_fc1.weight"][0] * tp // 2,
        num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=groups, head_dim=head_dim,
        max_position_embeddings=_arg(args, "max_position_embeddings", "seq_length") or 40960,
        rope_theta=float(_arg(args, "rotary_base") or 10000),
        rms_norm_eps=float(_arg(args, "norm_epsilon", "layernorm_epsilon") or 1e-5),
        tie_word_embeddings=(not untie) if untie is not None else bool(_arg(args, "tie_word_embeddings")),
        initializer_range=float(_arg(args, "init_method_std") or 0.02), rope_scaling=rope_scaling,
    )
    return cfg, None


class RopeThetaWarning(UserWarning):
    """rope_theta was taken from a Megatron checkpoint's args (rotary_base), which may not be the model's."""


def _plain(x: float) -> int | float:
    return int(x) if float(x).is_integer() else x


def rope_theta_note(args: argparse.Namespace, cfg: Qwen3Config, source: str) -> str | None:
    """What to tell the user about a rope_theta that comes from a foreign checkpoint's args; None when
    the model has the shape of a published Qwen3 and the same theta.

    Megatron records --rotary-base, default 10000, and MindSpeed-LLM's convert_ckpt.py records that
    default whatever the HF model's rope_theta when its command line has no --rotary-base (its
    Qwen3 example has none). A model run with another theta than it was trained with gives wrong
    logits without any error, so this is said every time it cannot be ruled out.
    """
    base = _arg(args, "rotary_base")
    said = f"rotary_base={_plain(base)}" if base is not None else "no rotary_base, so Megatron's default 10000"
    fix = "convert with --hf-cfg-dir <the original HF model dir> to take rope_theta from its config.json"
    shape = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
             "head_dim")
    for name, preset in PRESETS.items():
        if not name.startswith("tiny") and all(getattr(preset, f) == getattr(cfg, f) for f in shape):
            if preset.rope_theta == cfg.rope_theta:
                return None
            return (f"{source}: the checkpoint args say {said}, but this is the shape of Qwen3-{name}, whose "
                    f"rope_theta is {_plain(preset.rope_theta)}; MindSpeed-LLM's convert_ckpt.py records Megatron's "
                    f"default 10000 when its command line has no --rotary-base. Using rope_theta="
                    f"{_plain(cfg.rope_theta)} as the args say; if the model was not trained with it, {fix}")
    return (f"{source}: rope_theta={_plain(cfg.rope_theta)} comes from the checkpoint args ({said}); Megatron "
            f"records its default 10000 when the command line that wrote the checkpoint had no --rotary-base. "
            f"If the model was trained with another theta, {fix}")


def save_megatron(get_tensor: Callable[[str], torch.Tensor], cfg: Qwen3Config, save_dir: str | Path, *,
                  tp: int = 1, pp: int = 1, num_layer_list: list[int] | None = None,
                  vpp_layers: int | None = None, dtype: torch.dtype | None = None, iteration: int = 1,
                  seq_length: int | None = None, hf_config: dict[str, Any] | None = None,
                  log: Callable[[str], None] | None = None) -> list[Path]:
    """Write a Megatron checkpoint for TP x PP ranks, one rank file at a time.

    `get_tensor(hf_name)` returns a full HF tensor; it is called again for every TP rank, so only
    one rank's shard is ever held. `dtype` casts every tensor (default: keep each tensor's dtype).
    `seq_length` is recorded in args (default: the model's max_position_embeddings).
    Files go to `iter_XXXXXXX.tmp/`, which replaces `iter_XXXXXXX/` (and any stale rank folders
    in it) once complete; the tracker file is written last.
    """
    if cfg.is_moe:  # placeholder until the MoE layout of convert_ckpt_v2 lands (issue 14, interop part)
        raise CheckpointError("Megatron checkpoints of Qwen3-MoE models (num_experts > 0) are not written yet; "
                              "convert to hf or qtrain")
    check_tp(cfg, tp)
    megatron_rope_args(cfg.rope_scaling)  # refuses, before any work, a RoPE the args cannot carry
    stages = split_layers(cfg.num_hidden_layers, pp, num_layer_list, vpp_layers)
    out_dtype = dtype
    final = Path(save_dir) / iteration_dir_name(iteration)
    root = final.with_name(final.name + ".tmp")
    shutil.rmtree(root, ignore_errors=True)  # leftovers of a conversion that was killed
    written = []
    for p, chunks in enumerate(stages):
        for t in range(tp):
            obj: dict[str, Any] = {"checkpoint_version": CHECKPOINT_VERSION, "iteration": iteration}
            for v, layers in enumerate(chunks):
                post_process = p == pp - 1 and v == len(chunks) - 1
                specs = chunk_specs(cfg, layers, pre_process=p == 0 and v == 0, post_process=post_process,
                                    pp_size=pp)
                state = {}
                for spec in specs:
                    tensors = [get_tensor(n) for n in spec.hf_names]
                    out_dtype = out_dtype or tensors[0].dtype  # default: the source's own dtype
                    state[spec.mg_name] = shard(spec, [x.to(out_dtype) for x in tensors], cfg, tp, t)
                    del tensors
                obj["model" if len(chunks) == 1 else f"model{v}"] = with_extra_state(state, post_process)
            obj = {"args": megatron_args(cfg, tp=tp, pp=pp, num_layer_list=num_layer_list, vpp_layers=vpp_layers,
                                         dtype=out_dtype, iteration=iteration, seq_length=seq_length,
                                         hf_config=hf_config),
                   **obj, "num_floating_point_operations_so_far": 0}
            path = root / rank_dir_name(t, p, pp) / MODEL_FILE
            path.parent.mkdir(parents=True, exist_ok=True)
            torch.save(obj, path)
            del obj, state
            written.append(final / path.relative_to(root))
            if log:
                log(f"wrote {written[-1]}")
    swap_into_place(root, final)
    write_tracker(save_dir, iteration)
    return written


def _torch_load(path: Path, weights_only: bool) -> dict[str, Any]:
    """Load a rank file memory-mapped (tensors are read when touched).

    `weights_only` uses qtrain's restricted unpickler (tensors, args, RNG state; see safe_pickle.py);
    False unpickles in full, for files one trusts that hold other objects.
    """
    kwargs: dict[str, Any] = {"pickle_module": safe_pickle} if weights_only else {}
    try:
        try:
            return torch.load(path, map_location="cpu", mmap=True, weights_only=False, **kwargs)
        except RuntimeError as e:  # files in the pre-zipfile format cannot be memory-mapped
            if "mmap" not in str(e):
                raise
            return torch.load(path, map_location="cpu", weights_only=False, **kwargs)
    except pickle.UnpicklingError as e:
        raise CheckpointError(
            f"{path}: refusing to unpickle it ({e}). If you trust this file, convert with --trust-pickle "
            f"to load it in full") from None


class MegatronReader:
    """HF-named tensors from a Megatron checkpoint, merging TP shards on demand.

    Tensors of one pipeline stage are memory-mapped at a time; `get(name)` merges the TP shards
    of the Megatron parameter that holds `name`.
    """

    def __init__(self, ckpt_dir: str | Path, iteration: int | None = None, weights_only: bool = True):
        self.dir = Path(ckpt_dir)
        self.weights_only = weights_only
        self.iteration = resolve_iteration(self.dir, iteration)
        self.root = self.dir / iteration_dir_name(self.iteration)
        self.tp, self.pp = self._discover()
        head = _torch_load(self._path(0, 0), weights_only)
        if "args" not in head:
            raise CheckpointError(f"{self._path(0, 0)}: no 'args' entry; not a Megatron checkpoint file")
        self.args = head["args"]
        for flag, value in (("noop_layers", getattr(self.args, "noop_layers", None)),
                            ("schedules_method", getattr(self.args, "schedules_method", None))):
            if value:  # these reorder or skip layers in ways the files alone do not reveal
                raise CheckpointError(f"{self._path(0, 0)}: saved with {flag}={value!r}, which qtrain "
                                      f"cannot map back to layer order; re-save without it in MindSpeed-LLM")
        shapes = {k: tuple(t.shape) for k, t in self._chunks(head, self._path(0, 0))[0].items()}
        self.config, self.hf_config = config_from_args(self.args, str(self._path(0, 0)), shapes, self.tp)
        # qtrain's own files carry the HF config; for others, what to say about their rope_theta
        self.rope_theta_note = None if self.hf_config is not None else rope_theta_note(
            self.args, self.config, str(self._path(0, 0)))
        self.seq_length: int | None = _arg(self.args, "seq_length", "encoder_seq_length")  # trained with, if recorded
        dtype = _arg(self.args, "params_dtype", "torch_dtype")  # MindSpeed-LLM keeps HF's "bfloat16" string
        self.dtype = getattr(torch, dtype) if isinstance(dtype, str) and dtype in _DTYPE_NAMES else dtype
        self._owner: dict[str, tuple[int, int, ParamSpec]] = {}  # HF name -> (stage, chunk, spec)
        self._build_index(head)
        self._stage: tuple[int, list[list[dict[str, torch.Tensor]]]] | None = None
        self._pending: dict[str, torch.Tensor] = {}

    def _path(self, tp_rank: int, pp_rank: int) -> Path:
        folder = f"mp_rank_{tp_rank:02d}" + (f"_{pp_rank:03d}" if self._pp_suffix else "")
        return self.root / folder / MODEL_FILE

    def _discover(self) -> tuple[int, int]:
        """TP and PP sizes (from args, else from the folders); names every missing rank file."""
        if not self.root.is_dir():
            raise CheckpointError(f"{self.root}: iteration folder named by the tracker file does not exist")
        ranks = []
        for entry in sorted(os.listdir(self.root)):
            m = _RANK_DIR.match(entry)
            if m is None:
                continue
            if m.group(3) is not None:
                raise CheckpointError(f"{self.root / entry}: expert-parallel (MoE) checkpoints are not supported")
            ranks.append((int(m.group(1)), None if m.group(2) is None else int(m.group(2))))
        if not ranks:
            hint = (" (it looks like a torch_dist checkpoint: convert it to --ckpt-format torch with Megatron first)"
                    if any(f.endswith(".distcp") or f == "metadata.json" for f in os.listdir(self.root)) else "")
            raise CheckpointError(f"{self.root}: no mp_rank_* folders{hint}")
        suffixes = {r[1] is not None for r in ranks}
        if len(suffixes) > 1:
            raise CheckpointError(f"{self.root}: mixes mp_rank_TT and mp_rank_TT_PPP folders")
        self._pp_suffix = suffixes.pop()
        tp = max(r[0] for r in ranks) + 1
        pp = max(r[1] for r in ranks) + 1 if self._pp_suffix else 1
        if self._path(0, 0).is_file():  # the sizes the checkpoint was saved with win over what is on disk
            args = _torch_load(self._path(0, 0), self.weights_only).get("args")
            tp = getattr(args, "tensor_model_parallel_size", None) or tp
            pp = getattr(args, "pipeline_model_parallel_size", None) or pp
        expected = [self._path(t, p) for p in range(pp) for t in range(tp)]
        missing = [str(path) for path in expected if not path.is_file()]
        if missing:
            raise CheckpointError(f"{self.root}: incomplete Megatron checkpoint (TP={tp}, PP={pp}); missing "
                                  + ", ".join(missing))
        return tp, pp

    def _chunks(self, obj: dict[str, Any], path: Path) -> list[dict[str, torch.Tensor]]:
        if "model" in obj:
            chunks = [obj["model"]]
        else:
            keys = sorted((k for k in obj if re.fullmatch(r"model\d+", k)), key=lambda k: int(k[5:]))
            if not keys:
                raise CheckpointError(f"{path}: no 'model' (or 'model0', ...) entry")
            chunks = [obj[k] for k in keys]
        out = []
        for sd in chunks:
            if any(k.startswith("language_model.") for k in sd):
                raise CheckpointError(f"{path}: legacy (non-mcore) Megatron model names are not supported; "
                                      f"save the model with --use-mcore-models")
            out.append({nk: t for k, t in sd.items() if (nk := normalize_key(k)) is not None})
        return out

    def _build_index(self, head: dict[str, Any]) -> None:
        """Find which stage and chunk holds each layer by counting the layers in each rank-0 file."""
        counts = []
        for p in range(self.pp):
            obj = head if p == 0 else _torch_load(self._path(0, p), self.weights_only)
            layer_ids = [{int(k.split(".")[2]) for k in sd if k.startswith("decoder.layers.")}
                         for sd in self._chunks(obj, self._path(0, p))]
            counts.append([len(ids) for ids in layer_ids])
            del obj
        n_chunks = {len(c) for c in counts}
        if len(n_chunks) != 1:
            raise CheckpointError(f"{self.root}: pipeline stages hold different numbers of model chunks {counts}")
        total = sum(map(sum, counts))
        if total != self.config.num_hidden_layers:
            raise CheckpointError(f"{self.root}: rank files hold {total} decoder layers, args say "
                                  f"{self.config.num_hidden_layers}; some layers are missing")
        v_count, offset = n_chunks.pop(), 0
        self.stages: list[list[list[int]]] = [[[] for _ in range(v_count)] for _ in range(self.pp)]
        for v in range(v_count):  # interleaved order: chunk v of every stage, then chunk v + 1
            for p in range(self.pp):
                self.stages[p][v] = list(range(offset, offset + counts[p][v]))
                offset += counts[p][v]
        for p, chunks in enumerate(self.stages):
            for v, layers in enumerate(chunks):
                specs = chunk_specs(self.config, layers, pre_process=p == 0 and v == 0,
                                    post_process=p == self.pp - 1 and v == v_count - 1, pp_size=self.pp)
                for spec in specs:
                    for name in spec.hf_names:
                        self._owner.setdefault(name, (p, v, spec))

    def names(self) -> list[str]:
        """HF tensor names in file order."""
        return hf_param_names(self.config)

    def _load_stage(self, p: int) -> list[list[dict[str, torch.Tensor]]]:
        """`[tp rank][chunk] -> state dict` of stage p, memory-mapped; the previous stage is released."""
        if self._stage is None or self._stage[0] != p:
            self._stage = None
            self._stage = (p, [self._chunks(_torch_load(self._path(t, p), self.weights_only), self._path(t, p))
                               for t in range(self.tp)])
        return self._stage[1]

    def get(self, name: str) -> torch.Tensor:
        """The full HF tensor `name`, merged from its TP shards."""
        if name in self._pending:
            return self._pending.pop(name)
        if name not in self._owner:
            raise KeyError(f"{name}: not a parameter of this Qwen3 model")
        p, v, spec = self._owner[name]
        shards = []
        for t, chunks in enumerate(self._load_stage(p)):
            if spec.mg_name not in chunks[v]:
                raise CheckpointError(f"{self._path(t, p)}: missing parameter {spec.mg_name!r} (model chunk {v})")
            shards.append(chunks[v][spec.mg_name])
        tensors = dict(zip(spec.hf_names, merge(spec, shards, self.config)))
        result = tensors.pop(name)
        self._pending = tensors  # q/k/v and gate/up come out of one merge; keep the siblings
        return result

    def __iter__(self) -> Iterator[tuple[str, torch.Tensor]]:
        for name in self.names():
            yield name, self.get(name)

    def close(self) -> None:
        """Release the memory-mapped stage."""
        self._stage, self._pending = None, {}


def load_megatron_state_dict(ckpt_dir: str | Path, iteration: int | None = None,
                             weights_only: bool = True) -> tuple[Qwen3Config, dict[str, torch.Tensor]]:
    """A Megatron checkpoint as (Qwen3Config, {HF name: full tensor}); for `qtrain pretrain --load`."""
    reader = MegatronReader(ckpt_dir, iteration, weights_only)
    state = {name: tensor.clone() for name, tensor in reader}
    reader.close()
    return reader.config, state
