"""LR schedules match megatron-core's OptimizerParamScheduler step by step."""

import types

import pytest

from qtrain.train.schedule import build_schedule

pytestmark = pytest.mark.megatron


def _megatron_scheduler(args, train_iters, gbs):
    mod = pytest.importorskip("megatron.core.optimizer_param_scheduler")
    decay_iters = args.lr_decay_iters or train_iters
    decay_steps = decay_iters * gbs
    warmup = args.lr_warmup_fraction * decay_steps if args.lr_warmup_fraction is not None \
        else args.lr_warmup_iters * gbs
    opt = types.SimpleNamespace(param_groups=[{"params": []}])
    sched = mod.OptimizerParamScheduler(
        opt, init_lr=args.lr_warmup_init, max_lr=args.lr, min_lr=args.min_lr, lr_warmup_steps=warmup,
        lr_decay_steps=decay_steps, lr_decay_style=args.lr_decay_style, start_wd=0.1, end_wd=0.1,
        wd_incr_steps=train_iters * gbs, wd_incr_style="constant",
        wsd_decay_steps=args.lr_wsd_decay_iters * gbs if args.lr_wsd_decay_iters else None,
        lr_wsd_decay_style=args.lr_wsd_decay_style)
    return opt, sched


CASES = [
    dict(lr_decay_style="constant", lr_warmup_iters=5),
    dict(lr_decay_style="linear", lr_warmup_iters=0),
    dict(lr_decay_style="linear", lr_warmup_fraction=0.07, lr_decay_iters=40),
    dict(lr_decay_style="cosine", lr_warmup_fraction=0.01),
    dict(lr_decay_style="cosine", lr_warmup_iters=3, lr_warmup_init=1e-5, lr_decay_iters=30),
    dict(lr_decay_style="WSD", lr_warmup_iters=4, lr_wsd_decay_iters=10, lr_wsd_decay_style="exponential"),
    dict(lr_decay_style="WSD", lr_warmup_iters=4, lr_wsd_decay_iters=12, lr_wsd_decay_style="cosine"),
    dict(lr_decay_style="WSD", lr_warmup_iters=0, lr_wsd_decay_iters=7, lr_wsd_decay_style="minus_sqrt"),
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: "-".join(f"{v}" for v in c.values()))
def test_schedule_matches_megatron_core(case):
    from qtrain.config import OptimizerArgs

    args = OptimizerArgs(lr=3e-4, min_lr=3e-5, **case)
    train_iters, gbs = 50, 8
    ours = build_schedule(args, train_iters, gbs)
    opt, theirs = _megatron_scheduler(args, train_iters, gbs)
    for it in range(1, train_iters + 1):
        # Megatron: the step of iteration `it` uses the LR the scheduler set before it.
        assert ours.lr_for_iteration(it, gbs) == opt.param_groups[0]["lr"], f"iteration {it}"
        theirs.step(increment=gbs)


def test_warmup_starts_from_zero_and_reaches_peak():
    from qtrain.config import OptimizerArgs

    s = build_schedule(OptimizerArgs(lr=1.0, min_lr=0.1, lr_decay_style="cosine", lr_warmup_iters=10), 100, 4)
    assert s.lr_for_iteration(1, 4) == 0.0
    assert s.lr_for_iteration(11, 4) == 1.0
    assert s.lr_for_iteration(101, 4) == pytest.approx(0.1)
