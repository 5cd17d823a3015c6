"""qtrain's restricted unpickler: what Megatron and MindSpeed-LLM files hold loads; nothing that runs code does."""

from __future__ import annotations

import argparse
import collections
import io
import os
import pickle
import subprocess

import pytest
import torch

from qtrain.checkpoint import safe_pickle


def save_load(obj, tmp_path):
    path = tmp_path / "f.pt"
    torch.save(obj, path, pickle_protocol=4)  # MindSpeed-LLM's convert_ckpt_v2 saves with protocol 4
    return torch.load(path, map_location="cpu", weights_only=False, pickle_module=safe_pickle)


def test_mindspeed_model_containers_load(tmp_path):
    """convert_ckpt_v2 stores each model as defaultdict(dict); the factory survives and runs nothing new."""
    model = collections.defaultdict(dict)
    model["decoder.final_layernorm.weight"] = torch.arange(4.0)
    back = save_load({"model": model, "listed": collections.defaultdict(list, a=[1, 2]),
                      "plain": collections.defaultdict(None, b=1)}, tmp_path)
    assert type(back["model"]) is collections.defaultdict and back["model"].default_factory is dict
    assert torch.equal(back["model"]["decoder.final_layernorm.weight"], torch.arange(4.0))
    assert back["listed"]["a"] == [1, 2] and back["listed"].default_factory is list
    assert back["plain"].default_factory is None and back["plain"]["b"] == 1


@pytest.mark.parametrize("factory", [os.system, eval, subprocess.check_output, getattr],
                         ids=["os.system", "eval", "subprocess.check_output", "getattr"])
def test_defaultdict_with_a_dangerous_factory_is_refused(tmp_path, factory):
    """A defaultdict calls its default_factory on a missing key: one naming anything off the allowlist
    is refused while loading, before anything could call it."""
    with pytest.raises(pickle.UnpicklingError, match=f"{factory.__name__} is not on qtrain's allowlist"):
        save_load({"model": collections.defaultdict(factory)}, tmp_path)


def test_every_allowed_global_builds_data_when_called_without_arguments():
    """What a defaultdict could call: each allowed callable, given no arguments, returns plain data or
    raises TypeError; none runs other code."""
    for module, name in sorted(safe_pickle._ALLOWED):
        obj = safe_pickle.Unpickler(io.BytesIO(b"")).find_class(module, name)
        try:
            value = obj()
        except TypeError:
            continue
        assert isinstance(value, (dict, list, set, frozenset, complex, bytearray, torch.Tensor, torch.Size,
                                  io.BytesIO, argparse.Namespace)), (module, name)
