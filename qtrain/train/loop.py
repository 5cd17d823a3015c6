"""The training loop of `qtrain pretrain` (and `qtrain sft`, through LoopHooks), top to bottom:
plan, data, model, optimizer, resume, iterations, final save and HF export.

Every layout, one device included, builds the model the same way: on the meta device, laid out
by qtrain.parallel on a DeviceMesh (one rank: FSDP2 alone), then materialised and initialised
from --seed. Each iteration is one `train.step.train_step` (micro-batches, clipping, optimizer
step); between iterations the loop logs, validates, saves and checks its stop conditions.

Numerics: fp32 master weights and AdamW state (in host memory with --optimizer-cpu-offload); with
--bf16 FSDP2's MixedPrecisionPolicy runs the forward/backward in bf16 and reduces gradients in fp32.
The host waits on the device only at log intervals, evaluations and saves (plus one tiny all-reduce
per step when there are several ranks, so that SIGTERM stops every rank after the same step).
"""

from __future__ import annotations

import math
import os
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

import torch
import torch.distributed as dist

from qtrain import device as qdevice
from qtrain.checkpoint import dcp as ckpt
from qtrain.config import PretrainConfig, resolve_model_config
from qtrain.errors import ConfigError, QtrainError
from qtrain.parallel.batch import BatchPlan, batch_plan
from qtrain.train import metrics as M
from qtrain.train.documents import document_flags, eod_token_id
from qtrain.train.export import ExportTransform, export_hf, interval_export_dir
from qtrain.train.optim import build_optimizer, set_lr
from qtrain.train.plan import check_model_fits, describe_plan
from qtrain.train.preflight import claim_outputs, release_outputs
from qtrain.train.resume_check import check_resume, data_order
from qtrain.train.runtime import Runtime, StopFlag, apply_parallelism, init_runtime
from qtrain.train.schedule import build_schedule
from qtrain.train.step import LossWeight, mean_loss, train_step
from qtrain.train.validation import validation_loss


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
    """Where a variant of the loop (`qtrain sft`) plugs in; the defaults are pretraining's behaviour.
    Under pipeline parallelism only `build_datasets` and `skip_load` apply: the others are refused."""

    build_datasets: Optional[Callable[..., tuple[Any, Any]]] = None  # (cfg, sizes) -> (train_ds, valid_ds)
    prepare_model: Optional[Callable[..., torch.nn.Module]] = None  # (full model) -> model, before parallelism
    skip_load: bool = False  # prepare_model has already loaded the --load weights
    loss_weight: LossWeight = mean_loss  # see train.step
    after_save: Optional[Callable[..., None]] = None  # (model, iteration, checkpoint path)
    export_transform: Optional[ExportTransform] = None  # full state dict -> the --save-hf weights
    # A loss of its own instead of the token loss (`qtrain dpo`: train.preference.PreferenceObjective):
    # train.step's objective, plus its metrics for the log (`take_metrics`), its validation
    # (`validation`) and the sequences in one sample (`sequences_per_sample`, for tokens/s).
    objective: Optional[Any] = None
    setup: Optional[Callable[..., None]] = None  # (trainer) once the model is built and loaded
    train_state: Optional[dict] = None  # extra entries of each checkpoint's train_state.json (JSON values)

    def refuse_under_pipeline(self) -> None:
        unsupported = [what for what, used in (
            ("changing the model before sharding (e.g. LoRA)", self.prepare_model is not None),
            ("a loss other than each micro-batch's mean token loss (e.g. --calculate-per-token-loss)",
             self.loss_weight is not mean_loss),
            ("writing extra files with each checkpoint (e.g. LoRA adapters)", self.after_save is not None),
            ("a transformed --save-hf export (e.g. merged LoRA)", self.export_transform is not None)) if used]
        if unsupported:
            raise ConfigError(f"--pipeline-model-parallel-size > 1 does not support {'; '.join(unsupported)}; "
                              f"use --pipeline-model-parallel-size 1")


def _tokenizer_vocab(cfg: PretrainConfig) -> Optional[int]:
    # Megatron pads the tokenizer's vocabulary when --padded-vocab-size is absent.
    if cfg.model.padded_vocab_size is not None or not cfg.data.tokenizer_name_or_path:
        return None
    from qtrain.data.tokenizer import load_hf_tokenizer

    return len(load_hf_tokenizer(cfg.data.tokenizer_name_or_path))


def prepare(cfg: PretrainConfig, world_size: int):
    """Model config and batch plan, checked before anything heavy starts."""
    model_cfg = resolve_model_config(cfg, vocab_size_hint=_tokenizer_vocab(cfg))
    check_model_fits(cfg, model_cfg)
    from qtrain.parallel.expert import check_expert_parallel
    from qtrain.parallel.mesh import parallel_dims

    check_expert_parallel(cfg, parallel_dims(cfg, world_size), model_cfg)  # the dry run says it too
    batch = batch_plan(cfg, world_size)
    if cfg.training.train_iters is None:
        raise ConfigError("--train-iters is required: the number of optimizer steps to train for")
    build_schedule(cfg.optim, cfg.training.train_iters, batch.global_batch_size)  # warmup/decay lengths fit
    return model_cfg, batch


def dry_run(cfg: PretrainConfig) -> str:
    """The plan for the world size torchrun would give (WORLD_SIZE), else the smallest world
    that fits TP x PP x CP; no process group, no data, no model memory."""
    p = cfg.parallel
    world = int(os.environ.get("WORLD_SIZE", "0")) or \
        p.tensor_model_parallel_size * p.pipeline_model_parallel_size * p.context_parallel_size
    model_cfg, batch = prepare(cfg, world)
    return describe_plan(cfg, model_cfg, batch, world)


def pretrain(cfg: PretrainConfig, log=print, hooks: Optional[LoopHooks] = None) -> TrainResult:
    """Run `qtrain pretrain` with the given options (inside or outside torchrun)."""
    if cfg.training.dry_run:
        log(dry_run(cfg))
        return TrainResult()
    rt = init_runtime(cfg.training.device, cfg.compat.distributed_timeout_minutes,
                      host_collectives=cfg.offload.optimizer_offloaded)
    try:
        return Trainer(cfg, rt, hooks or LoopHooks(), log).run()
    finally:
        release_outputs()
        rt.close()


class Trainer:
    """One run: everything the iterations need, built in the order of the module docstring."""

    def __init__(self, cfg: PretrainConfig, rt: Runtime, hooks: LoopHooks, log) -> None:
        self.t_start = time.time()
        self.cfg, self.rt, self.hooks = cfg, rt, hooks
        self.say = log if rt.is_main else (lambda *a, **k: None)
        self.model_cfg, self.batch = self._plan()
        self.train_ds, self.valid_ds = self._datasets()
        self.model, self.state = self._model()
        o, t = cfg.optim, cfg.training
        self.optimizer = build_optimizer(self.model, o.lr, o.weight_decay, (o.adam_beta1, o.adam_beta2), o.adam_eps)
        self.schedule = build_schedule(o, t.train_iters, self.batch.global_batch_size)
        self.iteration, consumed = self._resume()
        from qtrain.data.sampler import ResumableLoader

        self.loader = ResumableLoader(self.train_ds, self.batch.micro_batch_size, self.state.dp_rank,
                                      self.state.dp_size, consumed_samples=consumed, num_workers=cfg.data.num_workers,
                                      vocab_size=self.model_cfg.vocab_size)
        self.result = TrainResult(iteration=self.iteration, consumed_samples=consumed, start_iteration=self.iteration)
        if hooks.setup is not None:
            hooks.setup(self)

    # ------------------------------------------------------------------ setup

    def _plan(self) -> tuple[Any, BatchPlan]:
        cfg = self.cfg
        model_cfg, batch = prepare(cfg, self.rt.world_size)
        from qtrain.train.moe import moe_training

        self.moe = moe_training(cfg, model_cfg, self.hooks.objective)  # None for a dense model
        if cfg.checkpoint.save_hf and cfg.parallel.pipeline_model_parallel_size > 1 and not cfg.checkpoint.save:
            raise ConfigError("--save-hf with pipeline parallelism needs --save: the export is read back from the "
                              "final checkpoint, as no rank holds every layer")
        if cfg.parallel.pipeline_model_parallel_size > 1:
            self.hooks.refuse_under_pipeline()
        self.load_kind = ckpt.load_kind(cfg.checkpoint.load, cfg.checkpoint.save)
        if not cfg.data.data_path:
            raise ConfigError("--data-path is required: the prefix of a .bin/.idx dataset (from `qtrain preprocess`)")
        claim_outputs(cfg, self.rt.is_main)  # writable outputs, the --save lock: before hours of work, not after
        return model_cfg, batch

    def _datasets(self):
        """Megatron GPTDataset splits (or the hook's datasets)."""
        from qtrain.data.blended import build_gpt_datasets, train_valid_test_num_samples
        from qtrain.data.gpt_dataset import GPTDatasetConfig

        cfg, t = self.cfg, self.cfg.training
        sizes = train_valid_test_num_samples(t.train_iters, self.batch.global_batch_size, t.eval_interval, t.eval_iters)
        documents = document_flags(cfg)
        if self.hooks.build_datasets is not None:
            if documents:
                raise ConfigError(f"{', '.join(documents)}: Megatron's pretraining-data flags; this command's "
                                  "datasets do not read them (qtrain sft packs with --pack --neat-pack)")
            train_ds, valid_ds = self.hooks.build_datasets(cfg, sizes)
        else:
            d = cfg.data
            data_cfg = GPTDatasetConfig(seq_length=d.seq_length, seed=t.seed, split=d.split,
                                        cache_dir=d.data_cache_path, eod_token_id=eod_token_id(cfg) if documents else None,
                                        eod_mask_loss=d.eod_mask_loss, reset_position_ids=d.reset_position_ids,
                                        reset_attention_mask=d.reset_attention_mask)
            train_ds, valid_ds, _ = build_gpt_datasets(cfg.data.data_path, sizes, data_cfg)
        if train_ds is None:
            from qtrain.data.blended import no_training_data

            raise ConfigError(no_training_data(cfg.data.data_path, cfg.data.split))
        self.data_order = data_order(cfg)
        return train_ds, (valid_ds if t.eval_iters > 0 else None)

    def _model(self):
        """Built on meta, laid out over the ranks, then only this rank's part allocated and
        initialised from --seed (the same weights for every layout: parallel.weights)."""
        from qtrain.models.qwen3 import build_model
        from qtrain.parallel.weights import materialize

        seed, device = self.cfg.training.seed, self.rt.device
        # --optimizer-cpu-offload: FSDP2 wants the shards in host memory; values drawn on the device.
        offloaded = self.cfg.offload.optimizer_offloaded
        param_device = torch.device("cpu") if offloaded else device
        torch.manual_seed(seed)
        model = build_model(self.model_cfg, "meta")
        if self.hooks.prepare_model is not None:
            # LoRA adapters are injected into the full model before sharding.
            model, state = apply_parallelism(
                self.hooks.prepare_model(materialize(model, param_device, seed=seed, init_device=device)),
                self.cfg, self.rt)
        else:
            model, state = apply_parallelism(model, self.cfg, self.rt)
            materialize(model, param_device, seed=seed, init_device=device)
        if offloaded:
            from qtrain.parallel.offload import optimizer_offloaded

            if not optimizer_offloaded(model):
                raise QtrainError("--optimizer-cpu-offload: FSDP did not apply its CPU offload policy")
            self.say("optimizer state, fp32 master weights and gradients in host memory (--optimizer-cpu-offload)")
        model.train()
        return model, state

    def _resume(self) -> tuple[int, int]:
        """(iteration, consumed samples) after loading --load: a qtrain checkpoint resumes, HF and
        Megatron dirs (and --finetune) give the starting weights."""
        c = self.cfg.checkpoint
        if self.load_kind is None or self.hooks.skip_load:
            return 0, 0
        loaded = ckpt.load_checkpoint(c.load, self.model, self.optimizer, load_optim=not c.no_load_optim,
                                      load_rng=not c.no_load_rng, finetune=c.finetune, log=self.say)
        if loaded.train_state is None:
            iteration, consumed = 0, 0
        else:
            check_resume(loaded.train_state.get("data_order"), self.data_order, str(loaded.path),
                         c.override_data_order, self.say)
            iteration, consumed = loaded.iteration, int(loaded.train_state["consumed_samples"])
        self.say(f"loaded {loaded.kind} checkpoint {loaded.path} (iteration {iteration}"
                 f"{', rng restored' if loaded.rng_restored else ''})")
        return iteration, consumed

    # ------------------------------------------------------------------ iterations

    def run(self) -> TrainResult:
        cfg, t, b, dev = self.cfg, self.cfg.training, self.batch, self.rt.device
        if self.rt.is_main:
            wandb_run = None
            if cfg.logging.wandb_project:
                from qtrain.train import wandb_log

                wandb_run = wandb_log.open_run(cfg)
            self.writer = M.MetricsWriter(cfg.logging.log_dir or cfg.checkpoint.save, cfg.logging.tensorboard_dir,
                                          wandb_run)
        else:
            self.writer = M.MetricsWriter(None, None)
        self.first_bad = torch.zeros((), dtype=torch.long, device=dev)  # first non-finite iteration, 0 = none
        self.loss_acc = torch.zeros((), dtype=torch.float32, device=dev)
        self.iters_since_log, self.t_log = 0, time.time()
        self.pending_save, self.last_save_started = None, None
        # --async-save: DCP's writer thread coordinates over its own gloo group (made by every rank).
        self.async_group = ckpt.async_save_group() if cfg.checkpoint.async_save and cfg.checkpoint.save else None
        stop = StopFlag().install(immediate=not cfg.checkpoint.save)  # nothing to save: stop mid-step
        qdevice.reset_peak_memory(dev)
        m = self.model_cfg
        size = f"{m.num_params:,} params" + (f", {m.num_active_params:,} active, {m.num_experts} experts top-"
                                             f"{m.num_experts_per_tok}" if m.is_moe else "")
        self.say(f"training {m.num_hidden_layers}-layer Qwen3 ({size}) on "
                 f"{self.rt.world_size} x {dev.type}: GBS {b.global_batch_size} = MBS {b.micro_batch_size} x "
                 f"DP {b.data_parallel_size} x {b.num_microbatches} micro-batches, from iteration {self.iteration}")
        from qtrain.train.moe import describe

        if describe(self.moe):
            self.say(describe(self.moe))
        try:
            while self.iteration < t.train_iters:
                set_lr(self.optimizer, self.schedule.lr_for_iteration(self.iteration + 1, b.global_batch_size))
                micro_batches = [next(self.loader) for _ in range(b.num_microbatches)]
                loss, grad_norm = train_step(self.model, self.state, self.optimizer, micro_batches, dev, t.clip_grad,
                                             self.hooks.loss_weight, self.hooks.objective, self.moe)
                self.iteration += 1
                self._record(loss, grad_norm)
                if self.iteration % cfg.logging.log_interval == 0 or self.iteration == t.train_iters:
                    self._log()
                paused = time.time()  # validation and saving are not training time
                if self.valid_ds is not None and self.iteration % t.eval_interval == 0:
                    self._validate(self.iteration // t.eval_interval - 1)
                if cfg.checkpoint.save and cfg.checkpoint.save_interval and \
                        self.iteration % cfg.checkpoint.save_interval == 0:
                    self._save()
                if cfg.checkpoint.save_hf_interval and self.iteration % cfg.checkpoint.save_hf_interval == 0:
                    self._export_hf(interval_export_dir(cfg, self.iteration))
                self.t_log += time.time() - paused
                if self._should_stop(stop):
                    break
            self._finish()
        finally:
            stop.uninstall()
            self.writer.close()
        self.result.iteration, self.result.consumed_samples = self.iteration, self.loader.consumed_samples
        self.result.seconds = time.time() - self.t_start
        return self.result

    def _record(self, loss: torch.Tensor, grad_norm: torch.Tensor) -> None:
        """Accumulate on the device (no host sync): the loss, the last norm, the first bad iteration."""
        bad_now = ~(torch.isfinite(loss) & torch.isfinite(grad_norm))
        self.first_bad = torch.where(bad_now & (self.first_bad == 0), self.iteration, self.first_bad)
        self.loss_acc += loss
        self.grad_norm = grad_norm.detach().float()
        self.iters_since_log += 1

    def _check_finite(self) -> None:
        bad = int(_all_reduce(self.first_bad, dist.ReduceOp.MAX).item())
        if bad:
            raise NonFiniteError(
                f"loss or gradient norm is NaN/Inf at iteration {bad}; stopped without saving. Hints: lower --lr "
                f"or raise --lr-warmup-iters, keep --clip-grad 1.0, use --bf16 rather than fp16, and check the "
                f"data for corrupt tokens (ids >= vocab size); resume from the last good checkpoint with --load")

    def _log(self) -> None:
        self._check_finite()
        b, n = self.batch, self.iters_since_log
        group = self.state.loss_group  # the ranks whose losses differ
        loss = float(_all_reduce(self.loss_acc, dist.ReduceOp.SUM, group).item()) / dist.get_world_size(group) / n
        dt = (time.time() - self.t_log) / n
        objective = self.hooks.objective
        tok_s = b.tokens_per_iteration * getattr(objective, "sequences_per_sample", 1) / dt / self.rt.world_size
        fpt, peak = M.flops_per_token(self.model_cfg, b.seq_length), M.device_peak_flops(self.rt.device)
        record = {"iteration": self.iteration, "consumed_samples": self.loader.consumed_samples, "loss": loss,
                  "lr": self.optimizer.param_groups[0]["lr"], "grad_norm": float(self.grad_norm.item()),
                  "step_time_ms": dt * 1e3, "global_batch_size": b.global_batch_size,
                  "tokens_per_s_per_device": tok_s, "tflops_per_device": tok_s * fpt / 1e12,
                  "mfu": tok_s * fpt / peak if peak else None,
                  "mem_gib": qdevice.max_memory_allocated(self.rt.device) / 1024 ** 3 or None}
        extra = {k: v for k, v in objective.take_metrics(self.rt.device).items() if k != "loss"} \
            if objective is not None else {}
        if self.moe is not None:  # the load-balancing loss follows the lm loss; loads go to the JSONL
            pp_group = self.state.pipeline.pp_group if self.state.pipeline is not None else None
            routing = self.moe.take_metrics(group, pp_group, self.rt.device)
            if "load_balancing_loss" in routing:
                extra["load_balancing_loss"] = routing["load_balancing_loss"]
            if routing.get("expert_load_max_over_mean"):
                extra["expert load max/mean (worst layer)"] = max(routing["expert_load_max_over_mean"])
                record["expert_load_max_over_mean"] = routing["expert_load_max_over_mean"]
        record.update(extra)
        self.say(M.megatron_log_line(record, self.cfg.training.train_iters, extra))
        self.writer.write(record)
        self.result.losses[self.iteration] = loss
        self.loss_acc.zero_()
        self.iters_since_log, self.t_log = 0, time.time()

    def _validate(self, eval_index: int) -> None:
        args = (self.model, self.state, self.valid_ds, eval_index, self.cfg.training.eval_iters, self.batch,
                self.rt.device)
        if self.hooks.objective is not None:
            loss, extra = self.hooks.objective.validation(*args)
            record = {f"valid_{k}": v for k, v in extra.items()}
        else:
            loss, extra = validation_loss(*args), None
            record = {"valid_ppl": math.exp(min(loss, 20.0))}
        self.result.valid[self.iteration] = loss
        self.say("-" * 100)
        self.say(M.eval_log_line(self.iteration, loss, extra))
        self.say("-" * 100)
        self.writer.write({"iteration": self.iteration, "valid_loss": loss, **record})

    def _save(self) -> None:
        """Start this iteration's checkpoint; with --async-save it is finished (renamed, tracker
        moved, old ones pruned) at the next save or at the end, else at once."""
        self._check_finite()
        self._finish_pending_save()  # one checkpoint in flight at a time
        c, it = self.cfg.checkpoint, self.iteration
        self.pending_save = ckpt.start_save(
            c.save, it, self.model, self.optimizer,
            {"iteration": it, "consumed_samples": self.loader.consumed_samples, "sampler": self.loader.state_dict(),
             "world_size": self.rt.world_size, "global_batch_size": self.batch.global_batch_size,
             "data_order": self.data_order, **(self.hooks.train_state or {})},
            self.model_cfg.to_hf_dict("float32"), self.cfg.to_dict(), async_group=self.async_group)
        self.last_save_started = it
        if self.hooks.after_save is not None:
            self.hooks.after_save(self.model, it, self.pending_save.tmp)  # renamed with the rest
        if self.async_group is None:
            self._finish_pending_save()

    def _finish_pending_save(self) -> None:
        pending, self.pending_save = self.pending_save, None
        if pending is None:
            return
        if pending.future is not None and not pending.future.done():
            self.say(f"waiting for the checkpoint of iteration {pending.iteration} to finish writing")
        path = pending.finish()
        c = self.cfg.checkpoint
        if self.rt.is_main and (c.keep_last_checkpoints or c.save_retain_interval):
            from qtrain.checkpoint.retention import prune_checkpoints

            for old in prune_checkpoints(c.save, c.keep_last_checkpoints, c.save_retain_interval):
                self.say(f"deleted checkpoint {old} (--keep-last-checkpoints / --save-retain-interval)")
        self.result.saved.append(str(path))
        self.say(f"saved checkpoint {path}")

    def _should_stop(self, stop: StopFlag) -> bool:
        t, it = self.cfg.training, self.iteration
        if stop.any_rank(self.rt.device):
            self.say(f"SIGTERM received: stopping after iteration {it}")
            self.result.stopped_by_signal = True
            return True
        if t.exit_interval and it % t.exit_interval == 0 and it < t.train_iters:
            self.say(f"--exit-interval {t.exit_interval}: stopping after iteration {it}")
            self.result.stopped_early = True
            return True
        if t.exit_duration_in_mins and it < t.train_iters and \
                _any_rank_true(time.time() - self.t_start > 60 * t.exit_duration_in_mins, self.rt.device):
            self.say(f"--exit-duration-in-mins {t.exit_duration_in_mins}: stopping after iteration {it}")
            self.result.stopped_early = True
            return True
        return False

    def _finish(self) -> None:
        """A last validation and save when the run completed, and the HF export."""
        cfg, t, it = self.cfg, self.cfg.training, self.iteration
        self._check_finite()
        finished = not (self.result.stopped_by_signal or self.result.stopped_early)
        if finished and self.valid_ds is not None and it % t.eval_interval:
            self._validate(t.train_iters // t.eval_interval)
        if cfg.checkpoint.save and it > self.result.start_iteration and self.last_save_started != it:
            self._save()
        self._finish_pending_save()  # an async save in flight completes before the run ends
        if cfg.checkpoint.save_hf and not self.result.stopped_by_signal:
            self._export_hf(cfg.checkpoint.save_hf)

    def _export_hf(self, out) -> None:
        if self.state.pipeline is not None:
            self._finish_pending_save()  # the export reads this iteration's checkpoint back
        export_hf(self.model, self.state, self.model_cfg, self.cfg, self.iteration, self.hooks.export_transform, out)
        self.say(f"exported HF model to {out}")


def _all_reduce(t: torch.Tensor, op, group=None) -> torch.Tensor:
    """A reduced copy of a small tensor (no collective on a world of one)."""
    t = t.clone()
    if dist.get_world_size(group) > 1:
        dist.all_reduce(t, op=op, group=group)
    return t


def _any_rank_true(flag: bool, device: torch.device) -> bool:
    """One rank's clock can run past a limit a step before another's: agree on it."""
    return bool(_all_reduce(torch.tensor(int(flag), device=device), dist.ReduceOp.MAX).item())
