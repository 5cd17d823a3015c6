"""qtrain sft: instruction items, response-only loss, packed == unpacked, a tiny model learns its data."""

import json
import re

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from qtrain.data.indexed import IndexedDatasetBuilder, bin_path, idx_path
from qtrain.errors import CheckpointError
from qtrain.data.instruction_dataset import InstructionDataset, dataset_prefixes, make_sft_item
from qtrain.data.packing import write_packs
from qtrain.models.config import Qwen3Config
from qtrain.models.qwen3 import Qwen3ForCausalLM
from qtrain.parallel import ParallelDims, ParallelState
from qtrain.train.sft import per_token_loss, run_sft
from qtrain.train.step import forward_backward, mean_loss
from tolerances import assert_close_scaled, fp32_tol, qwen3_terms, scaled_error

VOCAB, EOS, SEQ = 64, 2, 32
NO_LAYOUT = ParallelState(mesh=None, dims=ParallelDims())  # a plain model: no sharding, no context split


def sft_forward_backward(model, batch, num_microbatches=1, loss_weight=mean_loss):
    """The training step's forward and backward of one micro-batch, on a plain CPU model."""
    return forward_backward(model, NO_LAYOUT, batch, torch.device("cpu"), num_microbatches, loss_weight)


pytestmark = pytest.mark.usefixtures("one_thread")  # see tests/conftest.py


def _samples(n=6, seed=0):
    """(prompt ids, response ids ending in EOS) pairs of varied lengths, ids 3..63."""
    rng = np.random.RandomState(seed)
    out = []
    for _ in range(n):
        prompt = rng.randint(3, VOCAB, size=rng.randint(4, 9)).tolist()
        response = rng.randint(3, VOCAB, size=rng.randint(2, 5)).tolist() + [EOS]
        out.append((prompt, response))
    return out


def _write(prefix, arrays):
    b = IndexedDatasetBuilder(bin_path(prefix), dtype=np.int32)
    for a in arrays:
        b.add_item(np.asarray(a, dtype=np.int32))
        b.end_document()
    b.finalize(idx_path(prefix))


def write_instruction_data(prefix, samples, pack=False, seq_length=SEQ):
    """The three datasets exactly as the instruction handlers lay them out (unpacked, or packed
    through the preprocess packer)."""
    ids = [p + r for p, r in samples]
    labels = [[-100] * len(p) + r for p, r in samples]
    out = dataset_prefixes(str(prefix))
    if not pack:
        _write(out["input_ids"], ids)
        _write(out["labels"], labels)
        _write(out["attention_mask"], [[1] * len(x) for x in ids])
    else:
        _write(f"{prefix}_tmp_ids", ids)
        _write(f"{prefix}_tmp_labels", labels)
        write_packs(f"{prefix}_tmp_ids", f"{prefix}_tmp_labels", out, seq_length, pad_id=0)
    return str(prefix)


def _model(seed=0):
    cfg = Qwen3Config(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, head_dim=8, max_position_embeddings=64,
                      rope_theta=10000.0)
    torch.manual_seed(seed)
    model = Qwen3ForCausalLM(cfg)
    model.init_weights(std=0.2)
    return model


def _batch(ds, idx):
    items = [ds[i] for i in idx]
    return {k: torch.stack([it[k] for it in items]) for k in items[0]}


# ----------------------------------------------------------------------------- items

def test_packed_item_layout():
    tokens = np.array([10, 11, 12, 13, 20, 21, 22, 0])
    labels = np.array([-100, -100, 12, 13, -100, 21, 22, -100])
    segs = np.array([1, 1, 1, 1, 2, 2, 2, 0])
    item = make_sft_item(tokens, labels, segs, 10, pad_id=0, packed=True)
    # labels[i] = the trained token after i, only inside one sample: never across the boundary at 3|4.
    assert item["labels"].tolist() == [-100, 12, 13, -100, 21, 22, -100, -100, -100, -100]
    assert item["position_ids"].tolist() == [0, 1, 2, 3, 0, 1, 2, 0, 1, 2]
    # Documents: sample 1 = [0, 4), sample 2 = [4, 7), the padding tail [7, 10); no dense mask.
    assert "attention_mask" not in item
    assert item["cu_seqlens"].tolist() == [0, 4, 7] + [10] * 8


def test_unpacked_item_pads_without_mask():
    item = make_sft_item(np.array([5, 6, 7]), np.array([-100, 6, 7]), np.array([1, 1, 1]), 6, pad_id=0,
                         packed=False)
    assert "attention_mask" not in item and "cu_seqlens" not in item
    assert item["input_ids"].tolist() == [5, 6, 7, 0, 0, 0]
    assert item["labels"].tolist() == [6, 7, -100, -100, -100, -100]
    assert item["position_ids"][:3].tolist() == [0, 1, 2]


# ----------------------------------------------------------------------------- loss

def test_prompt_positions_never_reach_the_loss(tmp_path):
    samples = _samples(4)
    ds = InstructionDataset(write_instruction_data(tmp_path / "p", samples, pack=True), SEQ, 0, shuffle=False)
    batch = _batch(ds, [0])
    trained = batch["labels"][0] != -100
    model = _model()

    def grads(noise_at=None):
        """Parameter grads, with noise added to the final hidden state at `noise_at` positions."""
        model.zero_grad()
        handle = None
        if noise_at is not None:
            noise = torch.zeros(1, SEQ, 32)
            noise[0, noise_at] = torch.randn(int(noise_at.sum()), 32, generator=torch.Generator().manual_seed(0))
            handle = model.model.norm.register_forward_hook(lambda m, i, o: o + noise)
        loss = sft_forward_backward(model, batch)
        if handle is not None:
            handle.remove()
        return loss, {n: p.grad.clone() for n, p in model.named_parameters()}

    loss, ref = grads()
    # Whatever the model predicts at prompt, boundary and padding positions, loss and grads are identical.
    loss2, perturbed = grads(~trained)
    assert loss2 == loss
    assert all(torch.equal(ref[n], perturbed[n]) for n in ref)
    # The same perturbation on response positions does change them (the check can fail).
    loss3, _ = grads(trained)
    assert loss3 != loss

    # Exactly the positions whose next token is a response token are trained: per sample unpacked,
    # and in total over the packs.
    unpacked = InstructionDataset(write_instruction_data(tmp_path / "u", samples), SEQ, 0, shuffle=False)
    for i, (p, r) in enumerate(samples):
        want = [False] * (len(p) - 1) + [True] * len(r) + [False] * (SEQ - len(p) - len(r) + 1)
        assert (unpacked[i]["labels"] != -100).tolist() == want
    total = sum(int((ds[i]["labels"] != -100).sum()) for i in range(len(ds)))
    assert total == sum(len(r) for _, r in samples)


def _per_sample_losses(model, ds):
    """{(prompt+response tokens): (sum NLL, count)} over every sample of every document."""
    out = {}
    for i in range(len(ds)):
        item = ds[i]
        kw = {"position_ids": item["position_ids"][None]}
        if "cu_seqlens" in item:
            kw["cu_seqlens"] = item["cu_seqlens"][None]
        with torch.no_grad():
            logits = model(item["input_ids"][None], **kw)[0]
        nll = F.cross_entropy(logits.double(), item["labels"], ignore_index=-100, reduction="none")
        pos = item["position_ids"]
        starts = (pos == 0).nonzero().flatten().tolist() + [SEQ]
        for a, b in zip(starts[:-1], starts[1:]):
            if (item["labels"][a:b] != -100).any():
                key = tuple(item["input_ids"][a:b].tolist())
                key = key[: len(key) - next(j for j, t in enumerate(reversed(key)) if t != 0)]
                out[key] = (float(nll[a:b].sum()), int((item["labels"][a:b] != -100).sum()))
    return out


def test_packed_and_unpacked_give_the_same_loss_per_sample(tmp_path):
    samples = _samples(7, seed=3)
    unpacked = InstructionDataset(write_instruction_data(tmp_path / "u", samples), SEQ, 0, shuffle=False)
    packed = InstructionDataset(write_instruction_data(tmp_path / "k", samples, pack=True), SEQ, 0, shuffle=False)
    assert packed.packed and not unpacked.packed and len(packed.docs) < len(samples)
    model = _model(1).eval()
    a, b = _per_sample_losses(model, unpacked), _per_sample_losses(model, packed)
    assert len(a) == len(samples) and set(a) == set(b)
    for key in a:
        assert a[key][1] == b[key][1]
        assert_close_scaled(a[key][0], b[key][0], terms=qwen3_terms(model.config, SEQ, tokens=a[key][1]), what=key)


def test_mean_over_response_tokens_of_the_micro_batch(tmp_path):
    ds = InstructionDataset(write_instruction_data(tmp_path / "u", _samples(3)), SEQ, 0, shuffle=False)
    batch = _batch(ds, [0, 1, 2])
    model = _model()
    loss = sft_forward_backward(model, batch)
    with torch.no_grad():
        logits = model(batch["input_ids"], position_ids=batch["position_ids"])
    ref = F.cross_entropy(logits.reshape(-1, VOCAB), batch["labels"].reshape(-1), ignore_index=-100)
    assert_close_scaled(loss, ref, terms=qwen3_terms(model.config, SEQ, tokens=3 * SEQ))


def test_per_token_loss_averages_over_the_global_batch(tmp_path):
    samples = _samples(4, seed=9)
    assert len({len(r) for _, r in samples}) > 1  # unequal token counts: the two averages differ
    ds = InstructionDataset(write_instruction_data(tmp_path / "u", samples), SEQ, 0, shuffle=False,
                            global_batch_size=4)
    model = _model()

    def grads(weight, micro_batches):
        model.zero_grad()
        logged = sum(sft_forward_backward(model, _batch(ds, idx), len(micro_batches), weight)
                     for idx in micro_batches) / len(micro_batches)
        return logged, [p.grad.clone() for p in model.parameters()]

    logged, per_token = grads(per_token_loss(1, 2), [[0, 1], [2, 3]])
    whole_loss, whole = grads(mean_loss, [[0, 1, 2, 3]])  # one micro-batch: the global token mean
    terms = qwen3_terms(model.config, SEQ, tokens=4 * SEQ, backward=True)
    assert_close_scaled(logged, whole_loss, terms=terms)
    for a, b in zip(per_token, whole):
        assert_close_scaled(a, b, terms=terms, what="grad")
    _, per_micro = grads(mean_loss, [[0, 1], [2, 3]])
    assert max(scaled_error(a, b) for a, b in zip(per_micro, whole)) > 100 * fp32_tol(*terms)
    assert int(ds[3]["batch_tokens"]) == sum(len(r) for _, r in samples)


# ----------------------------------------------------------------------------- end to end

def _sft_args(data, save, iters, extra=()):
    return ["--data-path", data, "--padded-vocab-size", str(VOCAB), "--num-layers", "2", "--hidden-size", "32",
            "--ffn-hidden-size", "64", "--num-attention-heads", "4", "--num-query-groups", "2",
            "--group-query-attention", "--kv-channels", "8", "--max-position-embeddings", "64",
            "--seq-length", str(SEQ), "--micro-batch-size", "2", "--global-batch-size", "4",
            "--train-iters", str(iters), "--lr", "1e-2", "--lr-decay-style", "constant", "--weight-decay", "0",
            "--log-interval", "5", "--eval-iters", "0", "--split", "100,0,0", "--save", str(save),
            "--device", "cpu", "--init-method-std", "0.1", "--seed", "7", *extra]


def test_tiny_model_learns_an_instruction_set_and_answers_it(tmp_path):
    from qtrain.infer.generate import generate
    from qtrain.infer.loading import load_model_for_inference

    samples = _samples(6, seed=5)
    data = write_instruction_data(tmp_path / "alpaca", samples, pack=True)
    result = run_sft(_sft_args(data, tmp_path / "ckpt", 60), log=lambda *a: None)
    losses = list(result.losses.values())
    assert losses[-1] < 0.05 * losses[0], losses
    model, _ = load_model_for_inference(tmp_path / "ckpt")
    for prompt, response in samples:
        out = generate(model, torch.tensor([prompt]), 8, eos_token_ids=[EOS])
        assert out[0, len(prompt):].tolist() == response


def test_lora_sft_trains_adapters_only_and_exports_merged(tmp_path):
    from qtrain.checkpoint.sources import QtrainSource
    from qtrain.models.hf import iter_safetensors, save_hf
    from qtrain.checkpoint.adapter import merge_lora

    base = _model(2)
    save_hf(base, tmp_path / "base")
    data = write_instruction_data(tmp_path / "alpaca", _samples(4, seed=6))
    args = _sft_args(data, tmp_path / "ckpt", 12, ["--load", str(tmp_path / "base"), "--finetune", "--lora-r", "4",
                                                   "--lora-alpha", "8", "--lora-target-modules", "linear_qkv",
                                                   "linear_fc1", "--save-hf", str(tmp_path / "merged")])
    result = run_sft(args, log=lambda *a: None)
    losses = list(result.losses.values())
    assert losses[-1] < losses[0]
    adapter = tmp_path / "ckpt" / "iter_0000012" / "adapter"
    cfg = json.loads((adapter / "adapter_config.json").read_text())
    assert cfg["r"] == 4 and "up_proj" in cfg["target_modules"] and "o_proj" not in cfg["target_modules"]
    merged = merge_lora(dict(base.state_dict()), adapter)  # the base weights + the adapter saved beside them
    exported = dict(iter_safetensors(tmp_path / "merged"))
    changed = 0
    for name, t in exported.items():
        assert_close_scaled(t.float(), merged[name].float(), terms=(4,), what=name)
        changed += not torch.equal(t, base.state_dict()[name])
    assert changed == 2 * 5  # q, k, v, gate, up of both layers

    # Every reader of the LoRA run's own checkpoint gets the merged weights, never the bare base:
    # a converter's source, inference loading and a --finetune start of a model without adapters.
    src = QtrainSource(tmp_path / "ckpt")
    assert len(src.lora_modules) == 2 * 5
    for name in merged:
        assert_close_scaled(src.get(name).float(), merged[name].float(), terms=(4,), what=name)
    from qtrain.infer.loading import load_model_for_inference

    model, _ = load_model_for_inference(tmp_path / "ckpt")
    for name, t in model.state_dict().items():
        assert_close_scaled(t.float(), merged[name].float(), terms=(4,), what=name)
    with pytest.raises(CheckpointError, match="LoRA run's checkpoint"):
        load_model_for_inference(tmp_path / "ckpt", lora_dir=adapter)  # its adapters merged twice
    from qtrain.checkpoint.dcp import load_checkpoint

    plain = _model(9)
    with pytest.raises(CheckpointError, match="--finetune"):
        load_checkpoint(tmp_path / "ckpt", plain, None)  # resuming would silently drop the adapters
    load_checkpoint(tmp_path / "ckpt", plain, None, finetune=True)
    for name, t in plain.state_dict().items():
        if name != "lm_head.weight" or not plain.config.tie_word_embeddings:
            assert_close_scaled(t.float(), merged[name].float(), terms=(4,), what=name)


def test_lora_sft_on_two_data_parallel_ranks_equals_one_rank(tmp_path):
    """FSDP over 2 gloo ranks trains the same adapters as one process (same global batch)."""
    import os
    import subprocess
    import sys

    from safetensors.torch import load_file

    from qtrain.models.hf import save_hf

    save_hf(_model(2), tmp_path / "base")
    data = write_instruction_data(tmp_path / "alpaca", _samples(8, seed=6), pack=True)
    lora = ["--load", str(tmp_path / "base"), "--finetune", "--lora-r", "4", "--lora-alpha", "8"]

    def args(save):
        a = _sft_args(data, save, 4, lora)
        a[a.index("--micro-batch-size") + 1] = "1"
        a[a.index("--log-interval") + 1] = "1"
        return a

    one = run_sft(args(tmp_path / "one"), log=lambda *a: None)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "QTRAIN_DEVICE": "cpu"}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
                           "--standalone", "-m", "qtrain", "sft", *args(tmp_path / "two")],
                          capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "DP 2" in proc.stdout
    a = load_file(str(tmp_path / "one" / "iter_0000004" / "adapter" / "adapter_model.safetensors"))
    b = load_file(str(tmp_path / "two" / "iter_0000004" / "adapter" / "adapter_model.safetensors"))
    assert set(a) == set(b) and len(a) == 2 * 2 * 7
    # The same training: the loss of every iteration (printed with 7 digits) ...
    two = [float(x) for x in re.findall(r"lm loss: ([0-9.E+-]+)", proc.stdout)]
    assert len(two) == 4 and all(abs(two[i] - one.losses[i + 1]) <= 1e-5 * one.losses[i + 1] for i in range(4))
    # ... and the adapters, relative to their scale: Adam turns a gradient entry that is rounding noise
    # into a step of up to lr, so single entries may differ by far more than rounding (seen: one of 128
    # entries by 2.4e-3 of the tensor's scale while every loss agreed to 1e-6).
    for k in a:
        assert (a[k] - b[k]).abs().max() <= 1e-2 * a[k].abs().max(), k
    assert max(one.losses.values()) > 0


def test_reads_the_real_alpaca_handler_output(tmp_path, tokenizer_dir):
    """Through `qtrain preprocess` with the Qwen3 tokenizer: the trained targets of each sample are
    exactly its reply and the turn end, and packing keeps every sample's inputs and targets. A plain
    --pack (MindSpeed-LLM's all-1 mask) trains each pack as one sequence, as MindSpeed-LLM does."""
    from transformers import AutoTokenizer

    from qtrain.data.preprocess import main as preprocess

    records = [{"instruction": "Name a primary color.", "input": "", "output": "Red."},
               {"instruction": "Add the numbers.", "input": "2 and 3", "output": "2 + 3 = 5."},
               {"instruction": "Translate to French.", "input": "cat", "output": "chat"}]
    (tmp_path / "a.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    tok = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    items = {}
    targets = {}
    for pack in (False, True, "all-1"):
        prefix = tmp_path / f"data-{pack}"
        flags = {False: [], True: ["--pack", "--neat-pack"], "all-1": ["--pack"]}[pack]
        assert preprocess(["--input", str(tmp_path / "a.jsonl"), "--handler-name", "AlpacaStyleInstructionHandler",
                           "--tokenizer-name-or-path", str(tokenizer_dir), "--seq-length", "128",
                           "--output-prefix", str(prefix), "--workers", "1"] + flags) == 0
        ds = InstructionDataset(str(prefix), 128, 0, shuffle=False)
        assert ds.packed == (pack is True)
        targets[pack] = sorted(t for i in range(len(ds)) for t in ds[i]["labels"].tolist() if t != -100)
        if pack == "all-1":
            assert len(ds) == 1 and ds[0]["position_ids"].tolist() == list(range(128))  # one causal sequence
            continue
        samples = set()
        for i in range(len(ds)):
            item = ds[i]
            pos = item["position_ids"].tolist() + [0]
            starts = [j for j in range(128) if pos[j] == 0] + [128]
            for a, b in zip(starts[:-1], starts[1:]):
                trained = item["labels"][a:b] != -100
                if trained.any():  # the sample ends with the target of its last trained position
                    end = a + int(trained.nonzero().max()) + 2
                    samples.add((tuple(item["input_ids"][a:end].tolist()),
                                 tuple(item["labels"][a:b][trained].tolist())))
        items[pack] = samples
    assert items[False] == items[True] and len(items[False]) == 3
    assert targets[False] == targets[True] == targets["all-1"]  # the same targets in every layout
    replies = sorted(tok.decode(list(t)) for _, t in items[False])
    assert replies == sorted(f"{r['output']}<|im_end|>\n" for r in records)


def test_no_pad_to_seq_lengths_is_refused_by_name():
    from qtrain.errors import ConfigError
    from qtrain.train.sft import split_argv

    with pytest.raises(ConfigError, match="--no-pad-to-seq-lengths"):
        split_argv(["--no-pad-to-seq-lengths", "--seq-length", "16"])
    ns, rest = split_argv(["--reset-attention-mask", "--seq-length", "16"])
    assert rest == ["--seq-length", "16"]
