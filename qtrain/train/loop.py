"""The pretraining loop, top to bottom: setup, data, model, optimizer, resume, train, save.

Numerics: fp32 master weights and AdamW state; with --bf16 the forward/backward runs in bf16
(FSDP2 MixedPrecisionPolicy when sharded, autocast otherwise) and gradients are reduced in fp32.
The host waits on the device only at log intervals, evaluations and saves (plus one tiny
all-reduce per step across ranks, so that SIGTERM stops every rank after the same step).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

import torch
import torch.distributed as dist

from qtrain import device as qdevice
from qtrain.checkpoint import dcp as ckpt
from qtrain.config import PretrainConfig, resolve_model_config
from qtrain.errors import ConfigError, QtrainError
from qtrain.train import metrics as M
from qtrain.train.optim import build_optimizer, set_lr
from qtrain.train.plan import BatchPlan, check_model_fits, describe_plan, make_batch_plan
from qtrain.train.preflight import claim_outputs, release_outputs
from qtrain.train.resume_check import check_resume, data_order
from qtrain.train.runtime import Runtime, StopFlag, apply_parallelism, init_runtime
from qtrain.train.schedule import build_schedule
from qtrain.parallel import parallel_state
from qtrain.train.step import forward_backward, forward_loss, pipeline_forward_backward, uses_pipeline


class NonFiniteError(QtrainError):
    """The loss or gradient norm became NaN or Inf; nothing was saved after it."""


@dataclass
class TrainResult:
    """What a run did (rank 0's view): per-iteration logged losses, validation, how it ended."""

    iteration: int = 0
    consumed_samples: int = 0
    start_iteration: int = 0
    losses: dict[int, float] = field(default_factory=dict)
    valid: dict[int, float] = field(default_factory=dict)
    stopped_by_signal: bool = False  # SIGTERM
    stopped_early: bool = False  # --exit-interval / --exit-duration-in-mins
    saved: list[str] = field(default_factory=list)
    seconds: float = 0.0


@dataclass
class LoopHooks:
    """Where a variant of the loop (`qtrain sft`) plugs in; the defaults are pretraining's behaviour."""

    build_datasets: Optional[Callable[..., tuple[Any, Any]]] = None  # (cfg, sizes) -> (train_ds, valid_ds)
    prepare_model: Optional[Callable[..., torch.nn.Module]] = None  # (model) -> model, before parallelism
    skip_load: bool = False  # prepare_model has already loaded the --load weights
    forward_backward: Callable[..., torch.Tensor] = forward_backward
    forward_loss: Callable[..., tuple[torch.Tensor, torch.Tensor]] = forward_loss
    after_save: Optional[Callable[..., None]] = None  # (model, iteration, checkpoint path)
    export_hf: Optional[Callable[..., None]] = None  # replaces _export_hf: (model, model_cfg, cfg, rt, sharded)


def _tokenizer_vocab(cfg: PretrainConfig) -> Optional[int]:
    # Megatron pads the tokenizer's vocabulary when --padded-vocab-size is absent.
    if cfg.model.padded_vocab_size is not None or not cfg.data.tokenizer_name_or_path:
        return None
    from qtrain.data.tokenizer import load_hf_tokenizer

    return len(load_hf_tokenizer(cfg.data.tokenizer_name_or_path))


def _all_mean(t: torch.Tensor) -> torch.Tensor:
    if dist.is_initialized():
        t = t.clone()
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
        t /= dist.get_world_size()
    return t


def _full(t: torch.Tensor) -> torch.Tensor:
    """A DTensor's global value (grad norms of sharded models are DTensors)."""
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def prepare(cfg: PretrainConfig, world_size: int):
    """Model config and batch plan, checked before anything heavy starts."""
    model_cfg = resolve_model_config(cfg, vocab_size_hint=_tokenizer_vocab(cfg))
    check_model_fits(cfg, model_cfg)
    batch = make_batch_plan(cfg, world_size)
    if cfg.training.train_iters is None:
        raise ConfigError("--train-iters is required: the number of optimizer steps to train for")
    build_schedule(cfg.optim, cfg.training.train_iters, batch.global_batch_size)  # warmup/decay lengths fit
    return model_cfg, batch


def dry_run(cfg: PretrainConfig) -> str:
    """The plan for the world size torchrun would give (WORLD_SIZE), else the smallest world
    that fits TP x PP x CP; no process group, no data, no model memory."""
    import os

    p = cfg.parallel
    world = int(os.environ.get("WORLD_SIZE", "0")) or \
        p.tensor_model_parallel_size * p.pipeline_model_parallel_size * p.context_parallel_size
    model_cfg, batch = prepare(cfg, world)
    return describe_plan(cfg, model_cfg, batch, world)


def pretrain(cfg: PretrainConfig, log=print, hooks: Optional[LoopHooks] = None) -> TrainResult:
    """Run `qtrain pretrain` with the given options (inside or outside torchrun)."""
    hooks = hooks or LoopHooks()
    t_start = time.time()
    if cfg.training.dry_run:
        log(dry_run(cfg))
        return TrainResult()
    rt = init_runtime(cfg.training.device, cfg.compat.distributed_timeout_minutes)
    say = log if rt.is_main else (lambda *a, **k: None)

    # ---- 1. plan: model shape, batch math, pre-start checks
    model_cfg, batch = prepare(cfg, rt.world_size)
    if cfg.checkpoint.save_hf and cfg.parallel.pipeline_model_parallel_size > 1 and not cfg.checkpoint.save:
        raise ConfigError("--save-hf with pipeline parallelism needs --save: the export is converted from the "
                          "final checkpoint (qtrain convert), as no rank holds every layer")
    load_kind = _check_load(cfg)
    if not cfg.data.data_path:
        raise ConfigError("--data-path is required: the prefix of a .bin/.idx dataset (from `qtrain preprocess`)")
    claim_outputs(cfg, rt.is_main)  # writable outputs, the --save lock: before hours of work, not after

    # ---- 2. data: Megatron GPTDataset splits, this rank's micro-batches
    from qtrain.data.blended import build_gpt_datasets, train_valid_test_num_samples
    from qtrain.data.gpt_dataset import GPTDatasetConfig
    from qtrain.data.sampler import ResumableLoader

    t = cfg.training
    sizes = train_valid_test_num_samples(t.train_iters, batch.global_batch_size, t.eval_interval, t.eval_iters)
    data_cfg = GPTDatasetConfig(seq_length=cfg.data.seq_length, seed=t.seed, split=cfg.data.split,
                                cache_dir=cfg.data.data_cache_path)
    if hooks.build_datasets is not None:
        train_ds, valid_ds = hooks.build_datasets(cfg, sizes)
    else:
        train_ds, valid_ds, _ = build_gpt_datasets(cfg.data.data_path, sizes, data_cfg)
    if train_ds is None:
        from qtrain.data.blended import no_training_data

        raise ConfigError(no_training_data(cfg.data.data_path, cfg.data.split))
    order = data_order(cfg)

    # ---- 3. model: built on meta, initialised from --seed, sharded over the ranks
    from qtrain.models.qwen3 import build_model, materialize

    torch.manual_seed(t.seed)
    model = build_model(model_cfg, "meta")
    if hooks.prepare_model is not None:
        # LoRA adapters are injected into the full model before sharding.
        model = hooks.prepare_model(materialize(model, rt.device, seed=t.seed))
        par = apply_parallelism(model, cfg, rt)
    else:
        # Shard first, then allocate and initialise only this rank's part (the same weights
        # for every layout: see models.qwen3.init_parameters).
        par = apply_parallelism(model, cfg, rt)
        materialize(par.model, rt.device, seed=t.seed)
    model, sharded, dp_rank = par.model, par.sharded, par.dp_rank
    pipelined = uses_pipeline(model)
    model.train()

    # ---- 4. optimizer and LR schedule
    o = cfg.optim
    optimizer = build_optimizer(model, o.lr, o.weight_decay, (o.adam_beta1, o.adam_beta2), o.adam_eps)
    schedule = build_schedule(o, t.train_iters, batch.global_batch_size)

    # ---- 5. resume or start from weights
    iteration, consumed = 0, 0
    if cfg.checkpoint.load and load_kind is not None and not hooks.skip_load:
        c = cfg.checkpoint
        loaded = ckpt.load_checkpoint(c.load, model, optimizer, load_optim=not c.no_load_optim,
                                      load_rng=not c.no_load_rng, finetune=c.finetune)
        if loaded.train_state is not None:
            check_resume(loaded.train_state.get("data_order"), order, str(loaded.path), c.override_data_order, say)
            iteration = loaded.iteration
            consumed = int(loaded.train_state["consumed_samples"])
        say(f"loaded {loaded.kind} checkpoint {loaded.path} (iteration {iteration}"
            f"{', rng restored' if loaded.rng_restored else ''})")
    loader = ResumableLoader(train_ds, batch.micro_batch_size, dp_rank, batch.data_parallel_size,
                             consumed_samples=consumed, num_workers=cfg.data.num_workers,
                             vocab_size=model_cfg.vocab_size)

    # ---- 6. train
    result = TrainResult(iteration=iteration, consumed_samples=consumed, start_iteration=iteration)
    writer = M.MetricsWriter(cfg.logging.log_dir or cfg.checkpoint.save, cfg.logging.tensorboard_dir) \
        if rt.is_main else M.MetricsWriter(None, None)
    fpt = M.flops_per_token(model_cfg, batch.seq_length)
    peak = M.device_peak_flops(rt.device)
    stop = StopFlag().install(immediate=not cfg.checkpoint.save)  # nothing to save: stop mid-step
    params = [p for p in model.parameters() if p.requires_grad]
    first_bad = torch.zeros((), dtype=torch.long, device=rt.device)  # first non-finite iteration, 0 = none
    loss_acc = torch.zeros((), dtype=torch.float32, device=rt.device)
    gnorm_last = torch.zeros((), dtype=torch.float32, device=rt.device)
    iters_since_log, t_log = 0, time.time()
    qdevice.reset_peak_memory(rt.device)
    say(f"training {model_cfg.num_hidden_layers}-layer Qwen3 ({model_cfg.num_params:,} params) on "
        f"{rt.world_size} x {rt.device.type}: GBS {batch.global_batch_size} = MBS {batch.micro_batch_size} x "
        f"DP {batch.data_parallel_size} x {batch.num_microbatches} micro-batches, from iteration {iteration}")

    def check_finite() -> None:
        bad = int(_all_max(first_bad).item())
        if bad:
            raise NonFiniteError(
                f"loss or gradient norm is NaN/Inf at iteration {bad}; stopped without saving. Hints: lower --lr "
                f"or raise --lr-warmup-iters, keep --clip-grad 1.0, use --bf16 rather than fp16, and check the "
                f"data for corrupt tokens (ids >= vocab size); resume from the last good checkpoint with --load")

    def save(it: int) -> None:
        check_finite()
        path = ckpt.save_checkpoint(
            cfg.checkpoint.save, it, model, optimizer,
            {"iteration": it, "consumed_samples": loader.consumed_samples, "sampler": loader.state_dict(),
             "world_size": rt.world_size, "global_batch_size": batch.global_batch_size, "data_order": order},
            model_cfg.to_hf_dict("float32"), cfg.to_dict())
        result.saved.append(str(path))
        if hooks.after_save is not None:
            hooks.after_save(model, it, path)
        say(f"saved checkpoint {path}")

    try:
        while iteration < t.train_iters:
            set_lr(optimizer, schedule.lr_for_iteration(iteration + 1, batch.global_batch_size))
            step_loss = torch.zeros((), dtype=torch.float32, device=rt.device)
            if pipelined:
                step_loss = pipeline_forward_backward(
                    model, [next(loader) for _ in range(batch.num_microbatches)], rt.device)
            else:
                for micro in range(batch.num_microbatches):
                    if sharded and hasattr(model, "set_requires_gradient_sync"):
                        model.set_requires_gradient_sync(micro == batch.num_microbatches - 1)
                    step_loss += hooks.forward_backward(model, next(loader), batch.num_microbatches, rt.device,
                                                        t.bf16, sharded)
                step_loss /= batch.num_microbatches
            gnorm = clip_gradients(model, params, t.clip_grad)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            iteration += 1
            bad_now = ~(torch.isfinite(step_loss) & torch.isfinite(gnorm))
            first_bad = torch.where(bad_now & (first_bad == 0), iteration, first_bad)
            loss_acc += step_loss
            gnorm_last = gnorm.detach().float()
            iters_since_log += 1

            if iteration % cfg.logging.log_interval == 0 or iteration == t.train_iters:
                check_finite()
                loss = float(_all_mean(loss_acc).item()) / iters_since_log
                dt = (time.time() - t_log) / iters_since_log
                tok_s = batch.tokens_per_iteration / dt / rt.world_size
                record = {"iteration": iteration, "consumed_samples": loader.consumed_samples,
                          "loss": loss, "lr": optimizer.param_groups[0]["lr"], "grad_norm": float(gnorm_last.item()),
                          "step_time_ms": dt * 1e3, "global_batch_size": batch.global_batch_size,
                          "tokens_per_s_per_device": tok_s, "tflops_per_device": tok_s * fpt / 1e12,
                          "mfu": tok_s * fpt / peak if peak else None,
                          "mem_gib": qdevice.max_memory_allocated(rt.device) / 1024 ** 3 or None}
                say(M.megatron_log_line(record, t.train_iters))
                writer.write(record)
                result.losses[iteration] = loss
                loss_acc.zero_()
                iters_since_log, t_log = 0, time.time()

            if valid_ds is not None and t.eval_iters > 0 and not pipelined and iteration % t.eval_interval == 0:
                result.valid[iteration] = _evaluate(model, valid_ds, iteration // t.eval_interval - 1, cfg, batch, rt,
                                                    sharded, dp_rank, say, writer, iteration, hooks.forward_loss)
            if cfg.checkpoint.save and cfg.checkpoint.save_interval and iteration % cfg.checkpoint.save_interval == 0:
                save(iteration)
                t_log = time.time()
            if stop.any_rank(rt.device):
                say(f"SIGTERM received: stopping after iteration {iteration}")
                result.stopped_by_signal = True
                break
            if t.exit_interval and iteration % t.exit_interval == 0 and iteration < t.train_iters:
                say(f"--exit-interval {t.exit_interval}: stopping after iteration {iteration}")
                result.stopped_early = True
                break
            if t.exit_duration_in_mins and iteration < t.train_iters and \
                    _any_rank_true(time.time() - t_start > 60 * t.exit_duration_in_mins, rt.device):
                say(f"--exit-duration-in-mins {t.exit_duration_in_mins}: stopping after iteration {iteration}")
                result.stopped_early = True
                break

        check_finite()
        finished = not (result.stopped_by_signal or result.stopped_early)
        if finished and valid_ds is not None and t.eval_iters > 0 and not pipelined and iteration % t.eval_interval:
            result.valid[iteration] = _evaluate(model, valid_ds, t.train_iters // t.eval_interval, cfg, batch, rt,
                                                sharded, dp_rank, say, writer, iteration, hooks.forward_loss)
        if cfg.checkpoint.save and iteration > result.start_iteration and \
                not (result.saved and result.saved[-1].endswith(f"iter_{iteration:07d}")):
            save(iteration)
        if cfg.checkpoint.save_hf and not result.stopped_by_signal:
            if pipelined:
                _export_hf_from_checkpoint(cfg, iteration, rt)
            else:
                (hooks.export_hf or _export_hf)(model, model_cfg, cfg, rt, sharded)
            say(f"exported HF model to {cfg.checkpoint.save_hf}")
    finally:
        stop.uninstall()
        writer.close()
        release_outputs()
    result.iteration, result.consumed_samples = iteration, loader.consumed_samples
    result.seconds = time.time() - t_start
    return result


def clip_gradients(model: torch.nn.Module, params: list, max_norm: float) -> torch.Tensor:
    """Clip to --clip-grad (0: only measure) and return the global norm as a device tensor.

    Data parallel alone: torch's clip_grad_norm_ (no host sync). With TP/PP the gradients live on
    several meshes and stages: qtrain.parallel.grads computes the global norm (it syncs).
    """
    state = parallel_state(model)
    if state is not None and (state.dims.tp > 1 or state.dims.pp > 1):
        from qtrain.parallel.grads import clip_grad_norm_

        return torch.tensor(clip_grad_norm_(model, max_norm), dtype=torch.float32, device=params[0].device)
    return _full(torch.nn.utils.clip_grad_norm_(params, max_norm if max_norm > 0 else math.inf))


def _any_rank_true(flag: bool, device: torch.device) -> bool:
    """One rank's clock can run past a limit a step before another's: agree on it."""
    return bool(_all_max(torch.tensor(int(flag), device=device)).item())


def _all_max(t: torch.Tensor) -> torch.Tensor:
    if dist.is_initialized():
        t = t.clone()
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return t


def _check_load(cfg: PretrainConfig) -> Optional[str]:
    """Kind of --load (None: nothing to load yet). --load == --save with no checkpoint yet starts
    fresh, as Megatron does; any other unreadable --load stops before training."""
    c = cfg.checkpoint
    if not c.load:
        return None
    import os

    if c.save and os.path.abspath(c.load) == os.path.abspath(c.save) and \
            (not os.path.isdir(c.load) or not os.listdir(c.load) or
             (ckpt.latest_iteration(c.load) is None and not os.path.isfile(os.path.join(c.load, "config.json")))):
        return None
    return ckpt.detect_kind(c.load)


@torch.no_grad()
def _evaluate(model, valid_ds, eval_index: int, cfg: PretrainConfig, batch: BatchPlan, rt: Runtime, sharded: bool,
              dp_rank: int, say, writer, iteration: int, loss_fn=forward_loss) -> float:
    """Token-weighted validation loss over --eval-iters global batches; the eval_index-th evaluation
    reads the eval_index-th block of validation samples (so resume evaluates the same samples)."""
    from qtrain.data.sampler import ResumableLoader

    t = cfg.training
    start = eval_index * t.eval_iters * batch.global_batch_size
    vocab = getattr(getattr(model, "config", None), "vocab_size", None)
    loader = ResumableLoader(valid_ds, batch.micro_batch_size, dp_rank, batch.data_parallel_size,
                             consumed_samples=start, vocab_size=vocab)
    model.eval()
    total = torch.zeros((), dtype=torch.float64, device=rt.device)
    count = torch.zeros((), dtype=torch.float64, device=rt.device)
    for _ in range(t.eval_iters * batch.num_microbatches):
        s, n = loss_fn(model, next(loader), rt.device, t.bf16, sharded)
        total += s.double()
        count += n.double()
    model.train()
    both = torch.stack([total, count])
    if dist.is_initialized():
        dist.all_reduce(both, op=dist.ReduceOp.SUM)
    loss = float(both[0] / both[1].clamp(min=1))
    say("-" * 100)
    say(M.eval_log_line(iteration, loss))
    say("-" * 100)
    writer.write({"iteration": iteration, "valid_loss": loss, "valid_ppl": math.exp(min(loss, 20.0))})
    return loss


def _export_hf_from_checkpoint(cfg: PretrainConfig, iteration: int, rt: Runtime) -> None:
    """Pipeline stages each hold some layers: rank 0 converts the final DCP checkpoint instead."""
    if rt.is_main:
        from qtrain.checkpoint.convert import main as convert

        args = ["--load-model-type", "qtrain", "--save-model-type", "hf", "--load-dir", str(cfg.checkpoint.save),
                "--save-dir", str(cfg.checkpoint.save_hf), "--iteration", str(iteration), "--overwrite"]
        if convert(args):
            raise QtrainError(f"--save-hf: converting {cfg.checkpoint.save} to HF failed; run "
                              f"`qtrain convert {' '.join(args)}` to see why")
    if dist.is_initialized():
        dist.barrier()


def _export_hf(model, model_cfg, cfg: PretrainConfig, rt: Runtime, sharded: bool) -> None:
    """Gather full weights to rank 0 and write an HF dir (with the tokenizer when known)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    from qtrain.models.hf import save_hf
    from qtrain.models.qwen3 import build_model

    if sharded:
        full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        if not rt.is_main:
            return
        plain = build_model(model_cfg, "cpu")
        plain.load_state_dict(full)
        plain.tie_weights()
    else:
        plain = model
    save_hf(plain, cfg.checkpoint.save_hf, tokenizer_dir=cfg.data.tokenizer_name_or_path)
