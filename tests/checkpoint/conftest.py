"""Tiny HF Qwen3 checkpoints for the conversion tests (see ckpt_helpers.py)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from ckpt_helpers import make_hf


@pytest.fixture(scope="module")
def hf_tied(tmp_path_factory) -> Path:
    return make_hf(tmp_path_factory.mktemp("hf_tied"), tied=True, dtype=torch.bfloat16, tokenizer=True)


@pytest.fixture(scope="module")
def hf_untied(tmp_path_factory) -> Path:
    return make_hf(tmp_path_factory.mktemp("hf_untied"), tied=False, dtype=torch.bfloat16, seed=1)
