"""Inference tests run single-threaded: tiny matmuls gain nothing from threads on shared CI cores."""

import pytest


@pytest.fixture(autouse=True)
def _single_threaded(one_thread):  # noqa: ARG001  (one_thread: tests/conftest.py)
    yield
