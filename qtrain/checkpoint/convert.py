"""`qtrain convert`: move a Qwen3 model between HF, qtrain (DCP) and Megatron (mg) checkpoints.

Flag names follow MindSpeed-LLM's convert_ckpt_v2.py, e.g.

    qtrain convert --load-model-type hf --save-model-type mg \\
        --load-dir ./Qwen3-1.7B --save-dir ./ckpt/qwen3-mg \\
        --target-tensor-parallel-size 2 --target-pipeline-parallel-size 2 --model-type-hf qwen3

Tensors are read and written one at a time (Megatron output: one rank file at a time), so memory
stays near one output file, not the whole model. A non-empty --save-dir is refused unless
--overwrite is given (targets.py); a second conversion into the same dir is refused while one
runs (lock.py).
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
import warnings
from pathlib import Path

import torch

from qtrain.checkpoint.lock import DirLock
from qtrain.checkpoint.megatron import RopeThetaWarning, save_megatron, tensor_reads
from qtrain.checkpoint.megatron_map import num_experts
from qtrain.checkpoint.sources import MegatronSource, QtrainSource, Source, TrimmedVocab, config_dtype, open_source
from qtrain.checkpoint.targets import check_distinct, prepare_save_dir
from qtrain.parallel.stages import parse_num_layer_list
from qtrain.checkpoint.writers import save_hf_dir
from qtrain.progress import CountedSource, Progress
from qtrain.cli import ArgumentParser
from qtrain.errors import ConfigError
from qtrain.io_utils import check_writable_dir
from qtrain.models.hf import read_hf_config

FORMATS = ("hf", "qtrain", "mg")
MODEL_TYPES_HF = ("qwen3", "qwen3-moe")
QTRAIN_ARGS_FILE = "qtrain_args.json"  # dcp.ARGS_FILE; not imported from there: importing DCP costs seconds
PARAMS_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def build_parser() -> argparse.ArgumentParser:
    p = ArgumentParser(prog="qtrain convert", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--load-model-type", required=True, choices=FORMATS, help="format of --load-dir")
    p.add_argument("--save-model-type", required=True, choices=FORMATS, help="format to write to --save-dir")
    p.add_argument("--load-dir", required=True, help="checkpoint to read (HF dir, or the folder holding the tracker)")
    p.add_argument("--save-dir", required=True, help="where to write the converted checkpoint (empty or new)")
    p.add_argument("--overwrite", action="store_true",
                   help="write into a non-empty --save-dir: first remove the model files there (HF weights, index, "
                        "configs, tokenizer; the tracker and iteration folders), keep every other file")
    p.add_argument("--target-tensor-parallel-size", type=int, default=1, help="TP size of mg output")
    p.add_argument("--target-pipeline-parallel-size", type=int, default=1, help="PP size of mg output")
    p.add_argument("--num-layer-list", default=None, help="layers per PP stage for mg output, e.g. 14,14")
    p.add_argument("--num-layers-per-virtual-pipeline-stage", type=int, default=None,
                   help="layers per virtual pipeline stage (interleaved schedule) for mg output")
    p.add_argument("--iteration", type=int, default=None,
                   help="iteration to read from a qtrain/mg checkpoint (default: the tracker's)")
    p.add_argument("--lora-load", default=None,
                   help="PEFT LoRA adapter dir (qtrain sft --lora-r, or peft) to merge into the weights")
    p.add_argument("--model-type-hf", default=None,
                   help="HF model family, as MindSpeed-LLM names it: qwen3 (dense) or qwen3-moe; checked against "
                        "the model that is read (default: whichever it is)")
    p.add_argument("--target-expert-parallel-size", type=int, default=1,
                   help="EP size of mg output: each EP rank's files hold num_experts / EP experts of every MoE layer "
                        "(folders mp_rank_TT[_PPP]_EEE)")
    p.add_argument("--moe-grouped-gemm", action="store_true",
                   help="mg output: experts as GroupedMLP's mlp.experts.weight1/weight2 (MindSpeed-LLM's "
                        "--moe-grouped-gemm layout); without it, per expert (mlp.experts.local_experts.N). mg input: "
                        "the layout is read from the files, and this flag must agree with it")
    p.add_argument("--expert-tensor-parallel-size", type=int, default=None,
                   help="accepted only equal to --target-tensor-parallel-size (experts split over the same TP ranks "
                        "as attention, MindSpeed-LLM's default); other values are refused")
    p.add_argument("--params-dtype", choices=sorted(PARAMS_DTYPES), default=None,
                   help="dtype of hf/mg output (default: the dtype the source's config or args declare)")
    p.add_argument("--hf-cfg-dir", default=None,
                   help="HF dir whose config.json / generation_config.json / tokenizer to use for hf output "
                        "(for Megatron checkpoints that were not written by qtrain)")
    p.add_argument("--trust-pickle", action="store_true",
                   help="load Megatron rank files with full pickle (only for files you trust)")
    # MindSpeed-LLM flags accepted for drop-in scripts; they do not change a dense Qwen3 conversion.
    p.add_argument("--use-mcore-models", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--model-type", default="GPT", help=argparse.SUPPRESS)
    p.add_argument("--tokenizer-model", default=None, help=argparse.SUPPRESS)
    p.add_argument("--spec", nargs="*", default=None, help=argparse.SUPPRESS)
    p.add_argument("--transformer-impl", default="local", help=argparse.SUPPRESS)
    return p


def _validate(args: argparse.Namespace) -> None:
    if args.model_type_hf is not None and args.model_type_hf.lower() not in MODEL_TYPES_HF:
        raise ConfigError(f"--model-type-hf {args.model_type_hf}: qtrain converts Qwen3 only (qwen3, or qwen3-moe "
                          f"for Qwen3-MoE)")
    if args.model_type != "GPT":
        raise ConfigError(f"--model-type {args.model_type}: only GPT (decoder-only) models are supported")
    etp = args.expert_tensor_parallel_size
    if etp is not None and etp != args.target_tensor_parallel_size:
        raise ConfigError(f"--expert-tensor-parallel-size {etp}: qtrain splits experts over the same TP ranks as "
                          f"attention (--target-tensor-parallel-size {args.target_tensor_parallel_size}); drop the flag")
    if args.save_model_type == "mg" and args.transformer_impl != "local":
        raise ConfigError(f"--transformer-impl {args.transformer_impl}: qtrain writes Megatron files with the local "
                          f"layer spec names (MindSpeed-LLM's qwen3_spec); Transformer Engine names are read, not "
                          f"written. Drop the flag (or pass local)")
    if args.save_model_type != "mg" and (args.target_tensor_parallel_size != 1 or
                                         args.target_pipeline_parallel_size != 1 or args.num_layer_list or
                                         args.num_layers_per_virtual_pipeline_stage or
                                         args.target_expert_parallel_size != 1):
        raise ConfigError(f"--target-*-parallel-size / --num-layer-list / --num-layers-per-virtual-pipeline-stage "
                          f"apply to mg output only, not --save-model-type {args.save_model_type}")
    if args.moe_grouped_gemm and "mg" not in (args.load_model_type, args.save_model_type):
        raise ConfigError("--moe-grouped-gemm: names the expert layout of a Megatron checkpoint; neither "
                          f"--load-model-type {args.load_model_type} nor --save-model-type {args.save_model_type} is mg")


def _check_source(args: argparse.Namespace, source: Source) -> None:
    """--model-type-hf and (for mg input) --moe-grouped-gemm agree with the checkpoint that was read."""
    moe = bool(num_experts(source.config))
    actual = "qwen3-moe" if moe else "qwen3"
    if args.model_type_hf and args.model_type_hf.lower() != actual:
        raise ConfigError(f"--model-type-hf {args.model_type_hf}: {args.load_dir} holds a {actual} model"
                          + (f" ({num_experts(source.config)} experts)" if moe else " (no experts)"))
    grouped = getattr(source, "grouped", None)
    if args.load_model_type == "mg" and args.save_model_type != "mg" and moe and args.moe_grouped_gemm != grouped:
        have = "grouped (mlp.experts.weight1/weight2)" if grouped else "per expert (mlp.experts.local_experts.N)"
        raise ConfigError(f"--moe-grouped-gemm is {'on' if args.moe_grouped_gemm else 'off'}, but {args.load_dir} "
                          f"stores its experts {have}; {'drop' if args.moe_grouped_gemm else 'add'} the flag")


def main(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    _validate(args)
    check_distinct(args.load_dir, args.save_dir)
    check_writable_dir(args.save_dir, "--save-dir")
    created = not Path(args.save_dir).exists()
    lock = DirLock(args.save_dir, "--save-dir").acquire()
    ok = False
    try:
        rc = _convert(args)
        ok = True
        return rc
    finally:
        lock.release()
        if created and not ok:  # a dir this run made (under its lock): leave nothing half-written behind
            shutil.rmtree(args.save_dir, ignore_errors=True)


def _warn(message: str) -> None:
    print(f"qtrain convert: warning: {message}", file=sys.stderr)


def _convert(args: argparse.Namespace) -> int:
    start = time.perf_counter()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", RopeThetaWarning)
        source = open_source(args.load_model_type, args.load_dir, args.iteration, weights_only=not args.trust_pickle)
    for w in caught:
        if not issubclass(w.category, RopeThetaWarning):
            warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
        elif not args.hf_cfg_dir:  # with it, _use_hf_cfg_dir says whether config.json and the args disagree
            _warn(str(w.message))
    try:
        _check_source(args, source)
    except ConfigError:
        source.close()
        raise
    seq_length = _trained_seq_length(source)
    if args.hf_cfg_dir:
        source = _use_hf_cfg_dir(source, args.hf_cfg_dir)
    if args.lora_load:
        from qtrain.checkpoint.adapter import LoRAMergedSource, refuse_second_adapter

        refuse_second_adapter(source, "--lora-load", args.load_dir)
        source = LoRAMergedSource(source, args.lora_load)
    dtype = PARAMS_DTYPES[args.params_dtype] if args.params_dtype else (
        config_dtype(source.hf_config) or getattr(source, "dtype", None))
    iteration = source.iteration if isinstance(source.iteration, int) else 1
    try:
        prepare_save_dir(args.save_dir, args.overwrite)  # only once the source has opened
        if args.save_model_type == "mg":
            max_len = source.config.max_position_embeddings
            if seq_length is None or seq_length > max_len:
                print(f"recording seq_length {max_len} (the model's max_position_embeddings) in the Megatron args"
                      + ("" if seq_length is None else f"; the source's {seq_length} exceeds it"))
                seq_length = max_len
            layout = dict(tp=args.target_tensor_parallel_size, pp=args.target_pipeline_parallel_size,
                          num_layer_list=parse_num_layer_list(args.num_layer_list),
                          vpp_layers=args.num_layers_per_virtual_pipeline_stage)
            with Progress("convert", tensor_reads(source.config, **layout)) as progress:
                save_megatron(CountedSource(source, progress).get, source.config, args.save_dir, **layout,
                              ep=args.target_expert_parallel_size, grouped=args.moe_grouped_gemm,
                              dtype=dtype, iteration=iteration, seq_length=seq_length, hf_config=source.hf_config,
                              log=progress.write)
        elif args.save_model_type == "hf":
            with Progress("convert", len(source.names())) as progress:
                save_hf_dir(CountedSource(source, progress), args.save_dir, dtype,
                            generation_config_dir=getattr(source, "gen_dir", None))
        else:
            from qtrain.checkpoint.dcp_export import save_qtrain  # imports DCP, seconds of start-up

            reads = len(source.names()) + int(source.config.tie_word_embeddings)  # + the tied lm_head.weight
            with Progress("convert", reads) as progress:
                save_qtrain(CountedSource(source, progress), args.save_dir, iteration, dtype)
    finally:
        source.close()
    print(f"converted {args.load_model_type} {args.load_dir} -> {args.save_model_type} {args.save_dir} "
          f"in {time.perf_counter() - start:.1f} s")
    return 0


def _trained_seq_length(source: Source) -> int | None:
    """The sequence length the source was trained with, where it records one: a Megatron checkpoint's
    args, or the qtrain_args.json of a qtrain training checkpoint (an HF dir records none)."""
    if isinstance(source, MegatronSource):
        return source.seq_length
    args_file = Path(getattr(source, "folder", "")) / QTRAIN_ARGS_FILE
    if isinstance(source, QtrainSource) and args_file.is_file():
        try:
            return json.loads(args_file.read_text()).get("data", {}).get("seq_length")
        except (json.JSONDecodeError, AttributeError):
            raise ConfigError(f"{args_file}: not the JSON object qtrain writes") from None
    return None


def _use_hf_cfg_dir(source: Source, hf_cfg_dir: str) -> Source:
    """Take config.json (checked against the weights' shape), generation config and tokenizer from
    an HF dir. A Megatron vocabulary padded beyond the HF one (Megatron-LM pads to a multiple of
    128 x TP) is cut back to the HF size."""
    folder = Path(hf_cfg_dir)
    cfg = read_hf_config(folder)
    mine = source.config
    for field in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                  "num_key_value_heads", "head_dim", "tie_word_embeddings", "rope_scaling", "num_experts",
                  "moe_intermediate_size", "mlp_only_layers", "decoder_sparse_step"):
        ours, theirs = getattr(mine, field, None), getattr(cfg, field, None)
        if theirs != ours and not (field == "vocab_size" and theirs < ours):
            raise ConfigError(f"--hf-cfg-dir {folder}: {field} is {theirs} there but {ours} in the checkpoint")
    for field, megatron_name in (("rope_theta", "rotary_base"), ("rms_norm_eps", "norm_epsilon"),
                                 ("max_position_embeddings", "max_position_embeddings"),
                                 ("num_experts_per_tok", "moe_router_topk"), ("norm_topk_prob", "norm_topk_prob")):
        ours, theirs = getattr(mine, field, None), getattr(cfg, field, None)
        if ours is not None and float(ours) != float(theirs):  # these change the logits (or the usable length), not the shapes
            where = "the checkpoint args' " + megatron_name if source.hf_config is None else "the checkpoint's"
            _warn(f"--hf-cfg-dir {folder}: {field} is {theirs} there but {ours} from {where}; using {theirs}")
    if cfg.vocab_size < mine.vocab_size:
        print(f"dropping {mine.vocab_size - cfg.vocab_size} padded vocabulary rows ({mine.vocab_size} -> "
              f"{cfg.vocab_size}, as {folder / 'config.json'} says)")
        source = TrimmedVocab(source, cfg.vocab_size)
    source.hf_config = json.loads((folder / "config.json").read_text())
    source.config = cfg
    source.gen_dir = folder
    if any((folder / f).is_file() for f in ("tokenizer.json", "vocab.json")):
        source.tokenizer_dir = folder
    return source
