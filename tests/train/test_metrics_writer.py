"""The metrics writer: a --tensorboard-dir without tensorboard installed is refused by name, not dropped."""

import json
import sys

import pytest

from qtrain.errors import ConfigError
from qtrain.train.metrics import MetricsWriter


def test_tensorboard_dir_without_tensorboard_is_refused(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # as if it were not installed
    with pytest.raises(ConfigError, match="--tensorboard-dir .*tensorboard is not installed"):
        MetricsWriter(str(tmp_path), str(tmp_path / "tb"))


def test_jsonl_records(tmp_path):
    writer = MetricsWriter(str(tmp_path), None)
    writer.write({"iteration": 1, "loss": 2.5})
    writer.close()
    assert [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()] == [{"iteration": 1, "loss": 2.5}]
