"""generate(): token-for-token parity with transformers, KV cache == recompute, seeded sampling."""

import pytest
import torch

from infer_helpers import hf_pair, tiny_config
from qtrain.infer.generate import generate, left_pad
from qtrain.infer.sampling import SamplingConfig, filter_logits

transformers = pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def pair():
    return hf_pair(tiny_config(), seed=0)


def _batch():
    """Three prompts of lengths 5, 7 and 9, left-padded with id 0."""
    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(1, 211, (n,), generator=g).tolist() for n in (5, 7, 9)]
    return left_pad(prompts, 0)


def test_greedy_matches_transformers_generate_padded_batch(pair):
    hf, ours = pair
    ids, mask = _batch()
    ref = hf.generate(input_ids=ids, attention_mask=mask, max_new_tokens=16, do_sample=False,
                      pad_token_id=0, eos_token_id=None)
    out = generate(ours, ids, 16, attention_mask=mask)
    assert out.shape == ref.shape == (3, 9 + 16)
    assert torch.equal(out, ref)
    # Not a degenerate stream of one repeated token: the comparison means something.
    assert len(set(out[2, 9:].tolist())) > 4


def test_greedy_stops_at_eos_like_transformers(pair):
    hf, ours = pair
    ids, mask = _batch()
    free = generate(ours, ids, 16, attention_mask=mask)
    eos = int(free[2, 9 + 4])  # a token the third prompt produces at step 5
    ref = hf.generate(input_ids=ids, attention_mask=mask, max_new_tokens=16, do_sample=False,
                      pad_token_id=0, eos_token_id=eos)
    out = generate(ours, ids, 16, attention_mask=mask, eos_token_ids=[eos], pad_token_id=0)
    assert torch.equal(out, ref)
    row = out[2, 9:].tolist()
    assert eos in row and all(t == 0 for t in row[row.index(eos) + 1:])


def test_single_unpadded_prompt_matches_transformers(pair):
    hf, ours = pair
    ids = torch.randint(1, 211, (1, 11), generator=torch.Generator().manual_seed(7))
    ref = hf.generate(input_ids=ids, max_new_tokens=12, do_sample=False, pad_token_id=0, eos_token_id=None)
    assert torch.equal(generate(ours, ids, 12), ref)


@pytest.mark.parametrize("sampling", [dict(), dict(do_sample=True, temperature=0.9, top_k=40, top_p=0.9, seed=5)],
                         ids=["greedy", "sampled"])
def test_kv_cache_equals_recompute(pair, sampling):
    _, ours = pair
    ids, mask = _batch()
    cached = generate(ours, ids, 14, attention_mask=mask, **sampling)
    full = generate(ours, ids, 14, attention_mask=mask, use_cache=False, **sampling)
    assert torch.equal(cached, full)


def test_sampling_is_reproducible_with_a_seed(pair):
    _, ours = pair
    ids, mask = _batch()
    kw = dict(attention_mask=mask, do_sample=True, temperature=1.5)
    a = generate(ours, ids, 12, seed=11, **kw)
    b = generate(ours, ids, 12, seed=11, **kw)
    c = generate(ours, ids, 12, seed=12, **kw)
    assert torch.equal(a, b)
    assert not torch.equal(a, c)
    # Sampling with a single allowed token is greedy decoding.
    greedy = generate(ours, ids, 12, attention_mask=mask)
    assert torch.equal(generate(ours, ids, 12, seed=3, top_k=1, **kw), greedy)
    assert torch.equal(generate(ours, ids, 12, seed=3, top_p=1e-6, **kw), greedy)


def test_filters_keep_the_right_tokens():
    logits = torch.tensor([[2.0, 1.0, 0.5, -1.0, 3.0]])
    top2 = filter_logits(logits, SamplingConfig(True, 1.0, top_k=2))
    assert torch.isfinite(top2).squeeze().tolist() == [True, False, False, False, True]
    probs = logits.softmax(-1).squeeze()  # sorted: 3.0 (.57), 2.0 (.21), 1.0 (.08), ...
    p = float(probs[4] + probs[0]) - 1e-4  # the two most likely reach p: exactly those two stay
    nucleus = filter_logits(logits, SamplingConfig(True, 1.0, top_p=p))
    assert torch.isfinite(nucleus).squeeze().tolist() == [True, False, False, False, True]
    scaled = filter_logits(logits, SamplingConfig(True, 0.5))
    assert torch.allclose(scaled, logits * 2)


def test_stream_callback_sees_every_generated_token(pair):
    _, ours = pair
    ids, mask = _batch()
    seen = []
    out = generate(ours, ids, 6, attention_mask=mask, on_tokens=lambda t, f: seen.append(t.clone()))
    assert torch.equal(torch.stack(seen, 1), out[:, 9:])


@pytest.mark.parametrize("rope", [{"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 8},
                                  {"rope_type": "linear", "factor": 2.0}])
def test_greedy_with_rope_scaling_matches_transformers_past_the_original_context(rope):
    """The KV-cache path uses the scaled cos/sin too: decoding runs to position 24, past 8."""
    hf, ours = hf_pair(tiny_config(rope_scaling=rope), seed=0)
    assert hf.model.rotary_emb.rope_type == rope["rope_type"]
    ids, mask = _batch()
    ref = hf.generate(input_ids=ids, attention_mask=mask, max_new_tokens=16, do_sample=False,
                      pad_token_id=0, eos_token_id=None)
    assert torch.equal(generate(ours, ids, 16, attention_mask=mask), ref)
    assert torch.equal(generate(ours, ids, 16, attention_mask=mask, use_cache=False), ref)
