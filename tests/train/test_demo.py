"""The default job end to end on the bundled corpus with the real Qwen3 tokenizer (shortened)."""

import json

import pytest

from qtrain import demo


@pytest.mark.slow
def test_demo_preprocesses_trains_exports_generates_and_plots(tokenizer_dir, tmp_path, capsys):
    out = tmp_path / "demo"
    rc = demo.main(["--output-dir", str(out), "--train-iters", "16", "--seq-length", "32",
                    "--global-batch-size", "2", "--max-new-tokens", "4", "--lr", "8e-3",
                    "--tokenizer-name-or-path", str(tokenizer_dir)])
    assert rc == 0, capsys.readouterr().err
    summary = json.loads((out / "summary.json").read_text())
    # the real vocabulary: loss starts near ln(151936) = 11.93 and falls well below it
    assert summary["first_logged_loss"] > 11.0
    assert summary["last_logged_loss"] < summary["first_logged_loss"] - 1.5
    assert (out / "data" / "sample_text_document.idx").is_file()
    assert (out / "checkpoints" / "latest_checkpointed_iteration.txt").read_text() == "16"
    assert (out / "hf" / "tokenizer.json").is_file() and (out / "hf" / "config.json").is_file()
    assert (out / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert isinstance(summary["continuation"], str)
    from qtrain.models.hf import read_hf_config

    assert read_hf_config(out / "hf").vocab_size == 151936
