"""Fixtures of the training tests."""

import pytest

from trainutil import write_tiny_dataset


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory) -> str:
    return write_tiny_dataset(tmp_path_factory.mktemp("data") / "tiny_text_document")
