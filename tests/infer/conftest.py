"""Inference tests run single-threaded: tiny matmuls gain nothing from threads on shared CI cores."""

import pytest
import torch


@pytest.fixture(autouse=True)
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
