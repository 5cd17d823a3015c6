"""Progress of long work: plain lines with rate and ETA in a log, a tqdm bar on a terminal, and
`qtrain convert` counting exactly the tensors it reads for every target."""

import io
import re

import pytest

from qtrain.checkpoint.convert import main as convert
from qtrain.checkpoint.megatron import tensor_reads
from qtrain.models.hf import iter_safetensors, read_hf_config
from qtrain.progress import Progress


def test_plain_lines_in_a_log_and_a_bar_on_a_terminal():
    log = io.StringIO()
    with Progress("convert", 4, file=log, every_s=0.0, tty=False) as progress:
        for _ in range(4):
            progress.update(1, 250_000)
        progress.write("wrote rank 0")  # the command's own output goes to stdout, not here
    lines = log.getvalue().splitlines()
    assert len(lines) == 4  # three in-flight lines (none at 4/4) and the final one
    assert re.fullmatch(r"convert: 1/4 tensors \(25%\), 0\.2 MB, [\d.]+ tensors/s, [\d.]+ [MG]B/s, ETA \d+ s", lines[0])
    assert re.fullmatch(r"convert: 4 tensors, 1\.0 MB in [\d.]+ s", lines[-1])
    term = io.StringIO()
    with Progress("export HF", 3, file=term, tty=True) as progress:
        for _ in range(3):
            progress.update(1, 10)
    assert "export HF" in term.getvalue() and "3/3" in term.getvalue() and "\r" in term.getvalue()


@pytest.mark.parametrize("target, extra", [
    ("mg", ["--target-tensor-parallel-size", "2", "--target-pipeline-parallel-size", "2"]),
    ("hf", []),
    ("qtrain", []),
])
def test_convert_progress_counts_every_tensor_it_reads(hf_tied, tmp_path, capsys, target, extra):
    src = hf_tied
    if target == "hf":  # an mg source, so that hf output is a real conversion
        convert(["--load-model-type", "hf", "--save-model-type", "mg", "--load-dir", str(hf_tied),
                 "--save-dir", str(tmp_path / "mg")])
        src = tmp_path / "mg"
        capsys.readouterr()
    argv = ["--load-model-type", "mg" if target == "hf" else "hf", "--save-model-type", target,
            "--load-dir", str(src), "--save-dir", str(tmp_path / "out"), *extra]
    assert convert(argv) == 0
    cfg = read_hf_config(hf_tied)
    names = sum(1 for _ in iter_safetensors(hf_tied))
    expected = {"mg": tensor_reads(cfg, tp=2, pp=2), "hf": names, "qtrain": names + 1}[target]  # + tied lm_head
    err = capsys.readouterr().err
    assert re.search(rf"^convert: {expected} tensors, [\d.]+ [MG]B in [\d.]+ s$", err, re.M), err
