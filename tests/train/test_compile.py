"""`--compile` (torch.compile of each decoder layer; inductor on the CPU) trains like eager code:
one process, float32, the loss of each of 10 iterations within 1e-4 (relative) of the eager run."""

import pytest

from qtrain.config import parse_args
from qtrain.train.loop import pretrain
from trainutil import tiny_args

QUIET = lambda *a, **k: None  # noqa: E731


@pytest.mark.timeout(900)
def test_compiled_layers_train_like_eager(tiny_data, tmp_path):
    common = dict(train_iters=10, eval_iters=0, log_interval=1, save=None)
    eager = pretrain(parse_args(tiny_args(tiny_data, log_dir=tmp_path / "eager", **common)), log=QUIET)
    compiled = pretrain(parse_args(tiny_args(tiny_data, log_dir=tmp_path / "compiled", compile=True, **common)),
                        log=QUIET)
    assert sorted(compiled.losses) == sorted(eager.losses) == list(range(1, 11))
    for it, loss in eager.losses.items():
        assert abs(compiled.losses[it] - loss) <= 1e-4 * abs(loss), (it, compiled.losses[it], loss)
    assert eager.losses[10] < eager.losses[1]  # it trains: the comparison is not between constants
