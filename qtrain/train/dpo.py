"""`qtrain dpo` (and `qtrain sft --stage dpo|simpo|orpo`): preference training after SFT, the
pretraining loop on preference pairs with DPO, SimPO or ORPO.

Every `qtrain sft` flag works (model, batch, schedule, layouts, checkpoints, --bf16, LoRA), with
MindSpeed-LLM's DPO flag names for the loss (docs/preference.md):

  --pref-loss dpo|simpo|orpo        (or MindSpeed-LLM's --stage dpo|simpo; default dpo)
  DPO    --dpo-loss-type sigmoid|hinge|ipo  --dpo-beta 0.1  --dpo-label-smoothing 0
         --ref-model PATH (default: the --load weights, frozen)
  SimPO  --simpo-beta 2.5  --gamma-beta-ratio 1.4 (or TRL's --simpo-gamma = ratio x beta)
         --simpo-loss-type sigmoid|hinge|ipo  --simpo-label-smoothing 0
  ORPO   --orpo-lambda 0.1
  all    --pref-ftx 0 (+ f x the chosen answer's mean NLL)

What is plugged into the loop (LoopHooks): the pairwise datasets (qtrain.data.pairwise_dataset),
the objective (qtrain.train.preference) and, for DPO, the reference model: with LoRA (--lora-r)
the policy with its adapters switched off; otherwise (or with --ref-model) a frozen copy built on
the policy's mesh and sharded like it, holding the --ref-model weights (default --load) in the
compute dtype. Each checkpoint records the loss and where the reference came from (its
train_state.json, "preference"), so a resumed run (--load of its own checkpoint) takes the same
reference again.
"""

from __future__ import annotations

import argparse
import sys
import warnings
from pathlib import Path
from typing import Optional

import torch

from qtrain.cli import ArgumentParser
from qtrain.errors import ConfigError

PREFERENCE_KEY = "preference"  # its entry in each checkpoint's train_state.json
STAGES = ("dpo", "simpo", "orpo")


def dpo_parser() -> argparse.ArgumentParser:
    p = ArgumentParser(prog="qtrain dpo", add_help=False, allow_abbrev=False)
    g = p.add_argument_group("preference", "preference-training options (qtrain dpo); every `qtrain sft` option "
                                           "is accepted too")
    g.add_argument("--pref-loss", choices=STAGES, default=None, help="the loss (default: --stage, else dpo)")
    g.add_argument("--dpo-loss-type", choices=("sigmoid", "hinge", "ipo"), default=None,
                   help="DPO loss: sigmoid (the paper's), hinge (SLiC) or ipo (default sigmoid)")
    g.add_argument("--dpo-beta", type=float, default=None, help="DPO beta (default 0.1)")
    g.add_argument("--dpo-label-smoothing", type=float, default=None,
                   help="cDPO label smoothing of the sigmoid loss, in [0, 0.5) (default 0)")
    g.add_argument("--ref-model", default=None,
                   help="reference weights for DPO (HF dir, qtrain or Megatron checkpoint); default: the --load "
                        "weights (with LoRA: the base model, adapters off)")
    g.add_argument("--simpo-beta", type=float, default=None, help="SimPO beta (default 2.5, MindSpeed-LLM's)")
    g.add_argument("--gamma-beta-ratio", type=float, default=None,
                   help="SimPO target margin gamma / beta (default 1.4, MindSpeed-LLM's)")
    g.add_argument("--simpo-gamma", type=float, default=None, help="SimPO margin gamma (TRL's spelling; instead "
                                                                    "of --gamma-beta-ratio)")
    g.add_argument("--simpo-loss-type", choices=("sigmoid", "hinge", "ipo"), default=None,
                   help="SimPO loss (default sigmoid)")
    g.add_argument("--simpo-label-smoothing", type=float, default=None, help="SimPO label smoothing (default 0)")
    g.add_argument("--orpo-lambda", type=float, default=None, help="ORPO's lambda: weight of the odds-ratio term "
                                                                    "(default 0.1)")
    g.add_argument("--pref-ftx", type=float, default=0.0,
                   help="add this x the chosen answer's mean negative log-likelihood to the loss (MindSpeed-LLM)")
    g.add_argument("--pack-pairs", action="store_true",
                   help="pack each micro-batch's chosen and rejected sequences into as few --seq-length rows as "
                        "fit, each attending only to itself (document attention): the same pair losses, less "
                        "padding (qtrain's option; not with pipeline or context parallelism yet)")
    g.add_argument("--is-pairwise-dataset", action="store_true", help=argparse.SUPPRESS)  # always pairs here
    return p


def _given(ns, *names: str) -> list[str]:
    return ["--" + n.replace("_", "-") for n in names if getattr(ns, n) is not None]


def preference_loss(ns: argparse.Namespace, stage: str):
    """The PreferenceLoss of the flags; flags of another loss are refused by name."""
    from qtrain.train.preference_loss import PreferenceLoss

    kind = ns.pref_loss or (stage if stage in STAGES else "dpo")
    if ns.pref_loss and stage in STAGES and stage != "dpo" and stage != ns.pref_loss:
        raise ConfigError(f"--stage {stage} and --pref-loss {ns.pref_loss} disagree; give one of them")
    dpo_flags = ("dpo_loss_type", "dpo_beta", "dpo_label_smoothing", "ref_model")
    simpo_flags = ("simpo_beta", "gamma_beta_ratio", "simpo_gamma", "simpo_loss_type", "simpo_label_smoothing")
    others = {"dpo": simpo_flags + ("orpo_lambda",), "simpo": dpo_flags + ("orpo_lambda",),
              "orpo": dpo_flags + simpo_flags}[kind]
    stray = _given(ns, *others)
    if stray:
        raise ConfigError(f"{', '.join(stray)}: not options of --pref-loss {kind} (SimPO and ORPO use no reference "
                          f"model); drop them or choose the loss they belong to")
    if kind == "dpo":
        return PreferenceLoss("dpo", ns.dpo_loss_type or "sigmoid", _default(ns.dpo_beta, 0.1),
                              _default(ns.dpo_label_smoothing, 0.0), ftx=ns.pref_ftx)
    if kind == "simpo":
        beta = _default(ns.simpo_beta, 2.5)
        if ns.simpo_gamma is not None and ns.gamma_beta_ratio is not None:
            raise ConfigError("--simpo-gamma and --gamma-beta-ratio both set the SimPO margin; give one")
        margin = ns.simpo_gamma / beta if ns.simpo_gamma is not None else _default(ns.gamma_beta_ratio, 1.4)
        return PreferenceLoss("simpo", ns.simpo_loss_type or "sigmoid", beta, _default(ns.simpo_label_smoothing, 0.0),
                              margin=margin, ftx=ns.pref_ftx)
    return PreferenceLoss("orpo", "sigmoid", _default(ns.orpo_lambda, 0.1), ftx=ns.pref_ftx)


def _default(value, default):
    return default if value is None else value


# ----------------------------------------------------------------------------- reference

def _checkpoint_folder(path: str) -> Path:
    """A qtrain checkpoint's iteration folder (its tracker's, or the folder given)."""
    from qtrain.checkpoint import dcp as ckpt

    it = ckpt.latest_iteration(path)
    return Path(path) if it is None else ckpt.checkpoint_dir(path, it)


def _refuse_adapter_checkpoint(path: str, what: str) -> None:
    """A qtrain checkpoint of a LoRA run holds base + adapters; read as plain weights it would
    silently drop the adapters."""
    from qtrain.checkpoint import dcp as ckpt
    from qtrain.checkpoint import dcp_safe

    if ckpt.detect_kind(path) != "qtrain":
        return
    keys = dcp_safe.read_metadata(_checkpoint_folder(path)).state_dict_metadata
    if any(".lora_A." in k for k in keys):
        raise ConfigError(f"{what} {path}: a LoRA run's checkpoint (base + adapters); as the reference its adapters "
                          f"would be ignored: pass the merged model (that run's --save-hf export, or `qtrain convert "
                          f"--lora-load`) instead")


def reference_source(cfg, ref_model: Optional[str]) -> str:
    """The weights of DPO's frozen reference: --ref-model, else --load's weights; a resumed run
    (--load of a DPO checkpoint, without --finetune) takes the reference recorded in it."""
    from qtrain.checkpoint import dcp as ckpt

    c = cfg.checkpoint
    if ref_model:
        ckpt.detect_kind(ref_model)  # a readable checkpoint, or an error naming it
        _refuse_adapter_checkpoint(ref_model, "--ref-model")
        return str(ref_model)
    kind = ckpt.load_kind(c.load, c.save)
    if kind is None:
        raise ConfigError("DPO needs a reference model: pass --load (the SFT model to start from, also the "
                          "reference) or --ref-model")
    if kind == "qtrain" and not c.finetune:
        from qtrain.checkpoint import run_state

        folder = _checkpoint_folder(c.load)
        if (folder / run_state.TRAIN_STATE_FILE).is_file():  # a run's own checkpoint: resuming it
            recorded = run_state.read_train_state(folder).get(PREFERENCE_KEY) or {}
            if not recorded.get("ref_model"):
                raise ConfigError(f"--load {c.load} resumes a run that recorded no frozen DPO reference (its "
                                  f"{run_state.TRAIN_STATE_FILE} has no {PREFERENCE_KEY}.ref_model); pass --ref-model "
                                  f"(the weights DPO started from), or --finetune to start from these weights")
            return recorded["ref_model"]
    _refuse_adapter_checkpoint(c.load, "--load")
    return str(c.load)


def build_frozen_reference(trainer, source: str):
    """The reference copy: the policy's model built again on the same mesh (same TP/PP/FSDP
    layout), allocated in the compute dtype and loaded from `source`, frozen."""
    from qtrain.checkpoint import dcp as ckpt
    from qtrain.models.qwen3 import build_model
    from qtrain.parallel import parallelize
    from qtrain.parallel.weights import materialize
    from qtrain.train.preference import FrozenCopy

    import dataclasses

    from qtrain.config import OffloadArgs

    # The frozen copy has no optimizer state and no backward: it stays on the device (no offload).
    cfg = dataclasses.replace(trainer.cfg, offload=OffloadArgs())
    model, state = parallelize(build_model(trainer.model_cfg, "meta"), trainer.state.mesh, cfg,
                               device=trainer.rt.device)
    dtype = torch.bfloat16 if cfg.training.bf16 else torch.float32
    materialize(model, trainer.rt.device, dtype=dtype, seed=cfg.training.seed)
    ckpt.load_checkpoint(source, model, None, finetune=True)
    trainer.say(f"reference model: {source}, frozen ({str(dtype).removeprefix('torch.')}, sharded like the policy)")
    return FrozenCopy(model, state)


# ----------------------------------------------------------------------------- hooks

def build_hooks(cfg, sft: argparse.Namespace, pref: argparse.Namespace):
    """LoopHooks for `pretrain(cfg, hooks=...)`: pairwise data, the preference objective and its
    reference; LoRA as in qtrain sft."""
    from qtrain.data.pairwise_dataset import build_pairwise_datasets
    from qtrain.train import sft as sft_cmd
    from qtrain.train.preference import AdaptersOff, PreferenceObjective

    if sft.calculate_per_token_loss:
        raise ConfigError("--calculate-per-token-loss: the preference loss is a mean over pairs, not tokens; drop it")
    loss = preference_loss(pref, sft.stage)
    if pref.pack_pairs and (cfg.parallel.pipeline_model_parallel_size > 1 or cfg.parallel.context_parallel_size > 1):
        raise ConfigError("--pack-pairs: packed pairs are not available with pipeline or context parallelism yet; "
                          "drop --pack-pairs, or use --pipeline-model-parallel-size 1 --context-parallel-size 1")
    hooks = sft_cmd.build_hooks(cfg, sft)  # LoRA (adapters, adapter files, merged export), the data-path check
    path = cfg.data.data_path[0]

    def build_datasets(cfg, sizes):
        train, valid, _ = build_pairwise_datasets(path, cfg.data.split, sizes, cfg.data.seq_length, pad_id=0,
                                                  seed=cfg.training.seed, shuffle=not sft.no_shuffle)
        return train, valid

    hooks.build_datasets = build_datasets
    adapters_off = loss.needs_reference and sft.lora_r is not None and pref.ref_model is None
    source = reference_source(cfg, pref.ref_model) if loss.needs_reference and not adapters_off else None
    objective = PreferenceObjective(loss, AdaptersOff() if adapters_off else None,  # a frozen copy: in setup
                                    pack_pairs=pref.pack_pairs)
    hooks.objective = objective

    reference = source if source else "the policy with its adapters off" if adapters_off else "none"

    def setup(trainer):
        if source is not None:
            objective.reference = build_frozen_reference(trainer, source)
        trainer.say(f"preference loss: {describe(loss)}; reference: {reference}")

    hooks.train_state = {PREFERENCE_KEY: {
        "pref_loss": loss.kind, "loss_type": loss.loss_type, "beta": loss.beta, "label_smoothing": loss.label_smoothing,
        "margin": loss.margin, "pref_ftx": loss.ftx,
        "reference": "adapters off" if adapters_off else ("frozen copy" if source else None),
        "ref_model": None if source is None else str(Path(source).resolve())}}
    hooks.setup = setup
    return hooks


def describe(loss) -> str:
    if loss.kind == "dpo":
        return f"DPO {loss.loss_type}, beta {loss.beta:g}" + (
            f", label smoothing {loss.label_smoothing:g}" if loss.label_smoothing else "") + (
            f", + {loss.ftx:g} x SFT" if loss.ftx else "")
    if loss.kind == "simpo":
        return f"SimPO {loss.loss_type}, beta {loss.beta:g}, gamma/beta {loss.margin:g}" + (
            f", + {loss.ftx:g} x SFT" if loss.ftx else "")
    return f"ORPO, lambda {loss.beta:g}" + (f", + {loss.ftx:g} x SFT" if loss.ftx else "")


# ----------------------------------------------------------------------------- command

def split_argv(argv: list[str], stage_default: str = "dpo"):
    """(sft options, preference options, the rest for the pretrain parser)."""
    from qtrain.train.sft import sft_parser

    pref, rest = dpo_parser().parse_known_args(argv)
    sft_p = sft_parser()
    sft_p.set_defaults(stage=stage_default)
    sft, rest = sft_p.parse_known_args(rest)
    if sft.stage not in STAGES:
        raise ConfigError(f"--stage {sft.stage}: qtrain dpo trains preference pairs (--stage dpo, simpo or orpo); "
                          f"supervised fine-tuning is `qtrain sft`")
    if sft.variable_seq_lengths or sft.no_pad_to_seq_lengths:
        warnings.warn("--variable-seq-lengths / --no-pad-to-seq-lengths: qtrain pads every sequence of a pair to "
                      "--seq-length; --pack-pairs packs them instead", stacklevel=2)
    return sft, pref, rest


def run_dpo(argv: list[str], log=print):
    """Parse `qtrain dpo` flags and train; returns the loop's TrainResult."""
    from qtrain.config import parse_args
    from qtrain.train.loop import pretrain

    sft, pref, rest = split_argv(argv)
    cfg = parse_args(rest)
    if cfg.training.dry_run:
        log(dry_run(cfg, preference_loss(pref, sft.stage), lora=sft.lora_r is not None and pref.ref_model is None))
        return None
    return pretrain(cfg, log=log, hooks=build_hooks(cfg, sft, pref))


def dry_run(cfg, loss, lora: bool) -> str:
    """The pretrain plan, for pairs (two sequences per sample) and with the reference copy's memory."""
    import os

    from qtrain.parallel.plan import estimate_memory
    from qtrain.train.loop import prepare
    from qtrain.train.plan import describe_plan

    p = cfg.parallel  # the world torchrun would give, else the smallest that fits (as the loop's dry run)
    world = int(os.environ.get("WORLD_SIZE", "0")) or \
        p.tensor_model_parallel_size * p.pipeline_model_parallel_size * p.context_parallel_size
    model_cfg, batch = prepare(cfg, world)

    copy = loss.needs_reference and not lora
    reference = "frozen copy (weights only, compute dtype)" if copy else "adapters off" if loss.needs_reference \
        else "none"
    mem = estimate_memory(model_cfg, cfg, world, micro_batch_size=2 * batch.micro_batch_size,
                          reference_copy=copy, per_token_loss=True)
    lines = describe_plan(cfg, model_cfg, batch, world).replace("qtrain pretrain plan", "qtrain dpo plan").splitlines()
    lines = [ln for ln in lines if not ln.startswith("  memory/device")]
    lines += [f"  preference   {describe(loss)}; each sample is a pair: 2 sequences of --seq-length per sample; "
              f"reference: {reference}",
              "  memory/device (GiB, estimate): " + ", ".join(f"{k} {v:.2f}" for k, v in mem.items())]
    return "\n".join(lines)


def help_text() -> str:
    text = dpo_parser().format_help()
    return text[text.index("\npreference:") + 1:]


def main(argv: list[str] | None = None) -> int:
    from qtrain.train.runtime import run_command

    argv = list(sys.argv[1:] if argv is None else argv)
    if any(a in ("-h", "--help") for a in argv):
        from qtrain.config import build_parser
        from qtrain.train.sft import sft_parser

        print(build_parser("qtrain dpo").format_help())
        text = sft_parser().format_help()
        print(text[text.index("\nsft:") + 1:])
        print(help_text())
        return 0
    return run_command("dpo", lambda: run_dpo(argv))


if __name__ == "__main__":
    sys.exit(main())
