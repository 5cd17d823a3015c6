"""A meta-built model sharded under any layout and then materialised with a seed holds exactly
the weights one process gets with that seed (init after sharding, no full copy per rank); HF
weights loaded tensor by tensor into the shards are exactly the file's."""

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from parallel_helpers import free_port, worker_env
from qtrain.models.config import Qwen3Config
from qtrain.models.qwen3 import build_model
from qtrain.parallel.weights import materialize

WORKER = Path(__file__).with_name("parallel_init_worker.py")


def _single(tied: bool) -> dict[str, torch.Tensor]:
    from parallel_init_worker import TINY

    model = materialize(build_model(Qwen3Config(**TINY, tie_word_embeddings=tied), "meta"), "cpu", seed=7)
    return model.state_dict()


def _run(tmp_path, layout, tied, hf_dir=""):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc-per-node", "2",
           "--master-addr", "127.0.0.1", "--master-port", str(free_port()), str(WORKER),
           str(tmp_path / "sd"), layout, tied, str(hf_dir)]
    proc = subprocess.run(cmd, env=worker_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    got: dict[str, torch.Tensor] = {}
    for f in sorted(tmp_path.glob("sd_rank*.pt")):
        got.update(torch.load(f))
    return got


@pytest.mark.parametrize("layout,tied", [("fsdp", "tied"), ("tp", "untied"), ("pp", "tied")])
def test_sharded_init_equals_single_process(tmp_path, layout, tied):
    got = _run(tmp_path, layout, tied)
    want = _single(tied == "tied")
    assert set(got) <= set(want) and len(got) >= len(want) - 1  # a PP stage may omit the tied head copy
    for name, value in got.items():
        assert torch.equal(value, want[name]), name
    if tied == "tied" and "lm_head.weight" in got:
        assert torch.equal(got["lm_head.weight"], got["model.embed_tokens.weight"])


def test_init_depends_on_seed_and_name_only():
    a, b = _single(True), _single(True)
    assert all(torch.equal(a[k], b[k]) for k in a)
    w = a["model.layers.0.mlp.up_proj.weight"]
    assert abs(w.std().item() - 0.02) < 0.002
    assert not torch.equal(a["model.layers.0.mlp.up_proj.weight"][:8, :8], a["model.layers.1.mlp.up_proj.weight"][:8, :8])
    assert torch.equal(a["model.norm.weight"], torch.ones(64))


@pytest.mark.parametrize("layout,tied,fmt", [("fsdp", "untied", "hf"), ("tp", "tied", "hf"), ("pp", "tied", "hf"),
                                             ("pp", "untied", "hf"), ("tp", "tied", "mg"), ("pp", "untied", "mg")])
def test_weights_load_into_shards_exactly(tmp_path, layout, tied, fmt):
    """HF dirs and Megatron (TP2 PP2) checkpoints stream into every rank's shard exactly."""
    transformers = pytest.importorskip("transformers")
    from parallel_init_worker import TINY

    from qtrain.models.hf import iter_safetensors

    cfg = Qwen3Config(**TINY, tie_word_embeddings=tied == "tied")
    torch.manual_seed(3)
    hf_dir = tmp_path / "hf"
    transformers.Qwen3ForCausalLM(transformers.Qwen3Config(**cfg.to_hf_dict("float32"))).save_pretrained(hf_dir)
    want = dict(iter_safetensors(hf_dir))
    source_dir = hf_dir
    if fmt == "mg":
        from qtrain.checkpoint.convert import main as convert

        source_dir = tmp_path / "mg"
        assert convert(["--load-model-type", "hf", "--save-model-type", "mg", "--load-dir", str(hf_dir),
                        "--save-dir", str(source_dir), "--target-tensor-parallel-size", "2",
                        "--target-pipeline-parallel-size", "2"]) == 0
    got = _run(tmp_path, layout, tied, source_dir)
    seed_init = _single(tied == "tied")
    for name, value in got.items():
        source = "model.embed_tokens.weight" if tied == "tied" and name == "lm_head.weight" else name
        assert torch.equal(value, want[source]), name
        assert not torch.equal(value, seed_init[name]) or "norm" in name  # really loaded, not the init
