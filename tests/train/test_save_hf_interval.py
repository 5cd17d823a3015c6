"""--save-hf-interval: HF dirs written during training, each loading in transformers with the logits
of the model at its iteration (its checkpoint, loaded into qtrain's model). The pipeline-parallel
case (export read back from the checkpoint just written) is in tests/parallel/test_multinode.py."""

import pytest
import torch

from qtrain.config import parse_args
from qtrain.errors import ConfigError
from qtrain.train.loop import pretrain
from hf_logits import assert_export_has_checkpoint_logits
from trainutil import tiny_args

QUIET = lambda *a, **k: None  # noqa: E731


def test_interval_exports_load_in_transformers_with_the_models_logits(tiny_data, tmp_path):
    save, hf = tmp_path / "save", tmp_path / "hf"
    result = pretrain(parse_args(tiny_args(tiny_data, train_iters=4, save=save, save_interval=2, save_hf=hf,
                                           save_hf_interval=2, async_save=True)), log=QUIET)
    assert result.iteration == 4
    assert sorted(p.name for p in hf.glob("iter_*")) == ["iter_0000002", "iter_0000004"]
    at2 = assert_export_has_checkpoint_logits(hf / "iter_0000002", save / "iter_0000002")
    at4 = assert_export_has_checkpoint_logits(hf / "iter_0000004", save / "iter_0000004")
    final = assert_export_has_checkpoint_logits(hf, save / "iter_0000004")
    assert torch.equal(at4, final) and not torch.equal(at2, at4)  # each export is its iteration's model
    # a run that loads says what it reads
    lines = []
    pretrain(parse_args(tiny_args(tiny_data, train_iters=5, save=save, load=save)), log=lines.append)
    assert any(line.startswith(f"loading qtrain checkpoint {save / 'iter_0000004'}: model + optimizer state from ")
               for line in lines), lines
    lines.clear()
    pretrain(parse_args(tiny_args(tiny_data, train_iters=3, load=hf / "iter_0000002", finetune=True)), log=lines.append)
    assert any(line.startswith(f"loading HF weights from {hf / 'iter_0000002'}: ") and " tensors, " in line
               for line in lines), lines


def test_save_hf_interval_needs_save_hf(tiny_data):
    with pytest.raises(ConfigError, match="--save-hf-interval needs --save-hf"):
        parse_args(tiny_args(tiny_data, save_hf_interval=2))
    with pytest.raises(ConfigError, match="--save-hf-interval 3 with pipeline parallelism needs --save and must be "
                                          "a multiple of --save-interval"):
        parse_args(tiny_args(tiny_data, save_hf="hf", save_hf_interval=3, save="s", save_interval=2,
                             pipeline_model_parallel_size=2))
