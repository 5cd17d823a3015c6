"""GPT datasets: sample order and contents equal to megatron-core's, caching, blending, sampler."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch

from qtrain.data.blended import (
    BlendedDataset,
    build_gpt_datasets,
    parse_data_path,
    train_valid_test_num_samples,
)
from qtrain.data.gpt_dataset import GPTDataset, GPTDatasetConfig, parse_split, split_ranges
from qtrain.data.indexed import IndexedDatasetBuilder, bin_path, idx_path
from qtrain.data.sampler import PretrainingSampler, ResumableLoader
from qtrain.errors import ConfigError, DataError

EOD = 7
SEQ = 16


def _write_corpus(prefix: str, seed: int, n_docs: int, vocab: int = 500) -> None:
    """Documents of 0-60 tokens ending in EOD (some empty), one sequence each, as preprocess writes."""
    rng = np.random.default_rng(seed)
    builder = IndexedDatasetBuilder(bin_path(prefix), dtype=np.uint16)
    for d in range(n_docs):
        n = 0 if d % 37 == 5 else int(rng.integers(1, 60))
        doc = np.append(rng.integers(10, vocab, size=n), EOD) if n else np.zeros(0, np.int64)
        builder.add_document(doc, [len(doc)])
    builder.finalize(idx_path(prefix))


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("corpus")
    prefixes = {"a": str(root / "a_text_document"), "b": str(root / "b_text_document")}
    _write_corpus(prefixes["a"], 0, 200)
    _write_corpus(prefixes["b"], 1, 120)
    return prefixes


class _Tokenizer:
    """The little of a MegatronTokenizer that GPTDatasetConfig reads."""

    vocab_size = 500
    eod = EOD
    unique_identifiers = {"class": "TestTokenizer"}


def _megatron_datasets(data_path: list[str], sizes, seed: int, split: str, **kw):
    pytest.importorskip("megatron.core")
    # megatron-core wheels ship the compiled index helpers; a source install needs `make` first.
    pytest.importorskip("megatron.core.datasets.helpers_cpp")
    from megatron.core.datasets.blended_megatron_dataset_builder import BlendedMegatronDatasetBuilder
    from megatron.core.datasets.gpt_dataset import GPTDataset as MGPTDataset
    from megatron.core.datasets.gpt_dataset import GPTDatasetConfig as MConfig
    from megatron.core.datasets.utils import get_blend_from_list

    config = MConfig(
        random_seed=seed,
        sequence_length=SEQ,
        blend=get_blend_from_list(data_path),
        split=split,
        path_to_cache=None,  # GPTDataset then caches under <prefix>/cache; BlendedDataset does not cache
        tokenizer=_Tokenizer(),
        **{"eod_mask_loss": False, "reset_position_ids": False, "reset_attention_mask": False,
           "create_attention_mask": False, **kw},
    )
    return BlendedMegatronDatasetBuilder(MGPTDataset, list(sizes), lambda: True, config).build()


def _assert_same_gpt(ours: GPTDataset, theirs) -> None:
    assert len(ours) == len(theirs)
    np.testing.assert_array_equal(ours.document_index, theirs.document_index)
    np.testing.assert_array_equal(ours.sample_index, theirs.sample_index)
    np.testing.assert_array_equal(ours.shuffle_index, theirs.shuffle_index)


def _assert_same_items(ours, theirs, indices) -> None:
    for i in indices:
        mine, ref = ours[i], theirs[i]
        np.testing.assert_array_equal(mine["input_ids"], ref["tokens"])
        np.testing.assert_array_equal(mine["loss_mask"], ref["loss_mask"])
        want_labels = torch.where(ref["loss_mask"] == 0, -100, ref["labels"])
        np.testing.assert_array_equal(mine["labels"], want_labels)
        if "dataset_id" in ref:
            assert int(mine["dataset_id"]) == int(ref["dataset_id"])


@pytest.mark.megatron
@pytest.mark.parametrize(
    "split,sizes",
    [
        ("90,8,2", [40, 10, 5]),  # under one epoch
        ("90,8,2", [900, 150, 30]),  # many epochs, final epoch shuffled separately
        ("100,0,0", [505, 0, 0]),  # ~1.9 epochs: final epoch shuffled with the rest
        ("100,0,0", [None, None, None]),  # one epoch
    ],
)
def test_single_dataset_matches_megatron(corpus, tmp_path, split, sizes):
    seed = 1234
    theirs = _megatron_datasets([corpus["a"]], sizes, seed, split)
    config = GPTDatasetConfig(seq_length=SEQ, seed=seed, split=split, cache_dir=str(tmp_path / "c"))
    ours = build_gpt_datasets(corpus["a"], sizes, config)
    for mine, ref in zip(ours, theirs):
        assert (mine is None) == (ref is None)
        if mine is None:
            continue
        assert isinstance(mine, GPTDataset)
        _assert_same_gpt(mine, ref)
        _assert_same_items(mine, ref, range(len(ref)))
    if sizes[0] == 900:
        assert ours[0].document_index.shape[0] > 180 * 2  # several epochs really were built


@pytest.mark.megatron
def test_validation_partial_sample_and_eod_mask_match_megatron(corpus, tmp_path):
    sizes = [20, 7, 3]
    theirs = _megatron_datasets(
        [corpus["b"]], sizes, 7, "80,15,5",
        drop_last_partial_validation_sequence=False, eod_mask_loss=True,
    )
    config = GPTDatasetConfig(
        seq_length=SEQ, seed=7, split="80,15,5", cache_dir=str(tmp_path / "c"),
        drop_last_partial_validation_sequence=False, eod_token_id=EOD, eod_mask_loss=True,
    )
    ours = build_gpt_datasets([corpus["b"]], sizes, config)
    for mine, ref in zip(ours, theirs):
        _assert_same_gpt(mine, ref)
        _assert_same_items(mine, ref, range(len(ref)))
    valid = ours[1]
    padded = [i for i in range(len(valid)) if (valid.sample_tokens(i) == -1).any()]
    assert padded, "the last validation sample should be partial and padded"
    assert (valid[padded[0]]["labels"] == -100).any()


@pytest.mark.megatron
@pytest.mark.parametrize("data_path", [["0.3", "a", "0.7", "b"], ["1", "b"], ["a", "b"]])
def test_blend_matches_megatron(corpus, tmp_path, data_path):
    data_path = [corpus.get(x, x) for x in data_path]
    sizes = [300, 40, 12]
    theirs = _megatron_datasets(data_path, sizes, 99, "90,8,2")
    config = GPTDatasetConfig(seq_length=SEQ, seed=99, split="90,8,2", cache_dir=str(tmp_path / "c"))
    ours = build_gpt_datasets(data_path, sizes, config)
    for mine, ref in zip(ours, theirs):
        assert isinstance(mine, BlendedDataset)
        assert len(mine) == len(ref)
        np.testing.assert_array_equal(mine.dataset_index, ref.dataset_index)
        np.testing.assert_array_equal(mine.dataset_sample_index, ref.dataset_sample_index)
        for part, ref_part in zip(mine.datasets, ref.datasets):
            _assert_same_gpt(part, ref_part)
        _assert_same_items(mine, ref, range(0, len(ref), 3))


def test_cache_is_built_once_and_reused(corpus, tmp_path):
    cache = str(tmp_path / "cache")
    config = GPTDatasetConfig(seq_length=SEQ, seed=5, split="90,8,2", cache_dir=cache)
    sizes = [100, 10, 4]
    first = build_gpt_datasets(["0.5", corpus["a"], "0.5", corpus["b"]], sizes, config)
    assert not any(p.cache_hit for p in first[0].datasets) and not first[0].cache_hit
    files = sorted(os.listdir(cache))
    assert not [f for f in files if ".tmp" in f]
    assert len([f for f in files if f.endswith("description.json")]) == 3 * 2 + 3  # GPT x splits + blends
    second = build_gpt_datasets(["0.5", corpus["a"], "0.5", corpus["b"]], sizes, config)
    assert all(p.cache_hit for p in second[0].datasets) and second[0].cache_hit
    assert isinstance(second[0].datasets[0].sample_index, np.memmap)
    for i in range(len(first[0])):
        np.testing.assert_array_equal(first[0].sample_tokens(i), second[0].sample_tokens(i))
    # another seed is another cache entry; a corrupt entry is rebuilt, not trusted
    other = build_gpt_datasets(corpus["a"], sizes, GPTDatasetConfig(seq_length=SEQ, seed=6, split="90,8,2", cache_dir=cache))
    assert not other[0].cache_hit
    victim = other[0].cache.path("sample_index.npy")
    with open(victim, "wb") as f:
        f.write(b"garbage")
    again = build_gpt_datasets(corpus["a"], sizes, GPTDatasetConfig(seq_length=SEQ, seed=6, split="90,8,2", cache_dir=cache))
    assert not again[0].cache_hit
    np.testing.assert_array_equal(again[0].sample_index, other[0].sample_index)


def test_default_cache_sits_next_to_the_data(tmp_path):
    prefix = str(tmp_path / "d_text_document")
    _write_corpus(prefix, 3, 40)
    ds = build_gpt_datasets(prefix, [10, None, None], GPTDatasetConfig(seq_length=SEQ, split="100,0,0"))
    assert ds[1] is None and ds[2] is None
    assert os.path.dirname(ds[0].cache.path("x")) == str(tmp_path / "cache")
    assert os.path.isfile(ds[0].cache.path("description.json"))


def test_items_are_next_token_pairs(corpus, tmp_path):
    ds = build_gpt_datasets(corpus["a"], [30, 0, 0], GPTDatasetConfig(seq_length=SEQ, split="100,0,0", cache_dir=""))[0]
    tokens = ds.indexed  # every sample is a window of the shuffled document stream
    stream = np.concatenate([tokens[int(d)] for d in ds.document_index]).astype(np.int64)
    for i in range(len(ds)):
        item = ds[i]
        j = int(ds.shuffle_index[i])
        window = stream[j * SEQ : j * SEQ + SEQ + 1]
        np.testing.assert_array_equal(item["input_ids"], window[:-1])
        np.testing.assert_array_equal(item["labels"], window[1:])
        assert item["input_ids"].dtype == torch.int64 and item["loss_mask"].dtype == torch.float32


def test_split_parsing_matches_megatron_rounding():
    assert parse_split("969,30,1") == pytest.approx([0.969, 0.03, 0.001])
    assert parse_split("100") == [1.0, 0.0, 0.0]
    assert split_ranges("100,0,0", 10) == [(0, 10), None, None]
    assert split_ranges("969,30,1", 1000) == [(0, 969), (969, 999), (999, 1000)]
    assert split_ranges("90/8/2", 200) == [(0, 180), (180, 196), (196, 200)]
    for bad in ["", "a,b,c", "1,2,3,4", "-1,2,0", "0,0,0", "nan"]:
        with pytest.raises(ConfigError, match="--split"):
            parse_split(bad)


@pytest.mark.megatron
def test_split_matrix_equals_megatron():
    pytest.importorskip("megatron.core")
    from megatron.core.datasets.blended_megatron_dataset_config import (
        convert_split_vector_to_split_matrix,
        parse_and_normalize_split,
    )
    from qtrain.data.gpt_dataset import split_matrix

    for s in ["969,30,1", "98,2,0", "1,1,1", "100,0,0", "7,2,1", "0.8,0.1,0.1"]:
        assert split_matrix(parse_split(s)) == convert_split_vector_to_split_matrix(parse_and_normalize_split(s))


def test_data_path_parsing_and_errors(tmp_path, corpus):
    assert parse_data_path("a b") == (["a", "b"], None)
    assert parse_data_path(["0.3", "a", "0.7", "b"]) == (["a", "b"], [0.3, 0.7])
    assert parse_data_path("1 a") == (["a"], [1.0])
    for bad in ["0.3 a 0.7", "a 0.3", "0.3 0.7 a b", "a 0.3 b 0.7", ""]:
        with pytest.raises(ConfigError, match="--data-path"):
            parse_data_path(bad)
    with pytest.raises(ConfigError, match="positive"):
        parse_data_path("0 a 1 b")
    missing = str(tmp_path / "nope_text_document")
    with pytest.raises(DataError, match=r"nope_text_document.*missing .*\.bin"):
        build_gpt_datasets(["1", corpus["a"], "1", missing], [10, 1, 1], GPTDatasetConfig(seq_length=SEQ, split="90,8,2"))
    with pytest.raises(DataError, match=r"drop the extension: --data-path .*a_text_document$"):
        build_gpt_datasets(corpus["a"] + ".bin", [10, 1, 1], GPTDatasetConfig(seq_length=SEQ, split="90,8,2"))
    # a split without documents is skipped (Megatron would loop forever)
    ds = build_gpt_datasets(corpus["b"], [10, 10, 10], GPTDatasetConfig(seq_length=SEQ, split="998,1,1", cache_dir=""))
    assert ds[0] is not None and ds[1] is None and ds[2] is None
    ds = build_gpt_datasets(["1", corpus["a"], "1", corpus["b"]], [10, 10, 10], GPTDatasetConfig(seq_length=SEQ, split="995,4,1", cache_dir=""))
    assert ds[1] is not None and ds[2] is None  # b (120 documents) has no test document
    # a split with documents but no tokens cannot make samples
    tiny = str(tmp_path / "tiny")
    builder = IndexedDatasetBuilder(bin_path(tiny), dtype=np.uint16)
    builder.add_document(np.arange(5), [5])
    builder.add_document(np.zeros(0, np.int64), [0])
    builder.finalize(idx_path(tiny))
    with pytest.raises(DataError, match=r"tiny: the valid split has 1 sequences and 0 tokens"):
        build_gpt_datasets(tiny, [1, 1, 0], GPTDatasetConfig(seq_length=2, split="50,50,0", cache_dir=""))
    assert train_valid_test_num_samples(100, 8, 50, 2) == [800, 48, 16]


def _global_order(dataset_len: int, mbs: int, dp: int, start: int, steps: int) -> list[list[int]]:
    """What each rank sees, flattened per global micro-step: [rank0 ids + rank1 ids + ...]."""
    samplers = [iter(PretrainingSampler(dataset_len, start, mbs, r, dp)) for r in range(dp)]
    return [sum((next(s) for s in samplers), []) for _ in range(steps)]


def test_sampler_order_is_megatrons():
    # Megatron: chunks of mbs*dp consecutive samples; rank r takes [r*mbs, (r+1)*mbs) of each.
    assert list(PretrainingSampler(20, 0, 2, 1, 3)) == [[2, 3], [8, 9], [14, 15]]
    assert list(PretrainingSampler(20, 6, 2, 0, 3)) == [[6, 7], [12, 13]]
    assert len(PretrainingSampler(20, 6, 2, 0, 3)) == 2
    # the union over ranks is the global sequence, whatever the DP size
    assert sum(_global_order(64, 2, 4, 0, 8), []) == list(range(64))
    with pytest.raises(ConfigError, match="no samples left"):
        PretrainingSampler(20, 20, 2, 0, 1)
    with pytest.raises(ConfigError, match="rank 3"):
        PretrainingSampler(20, 0, 2, 3, 3)


def test_resumable_loader_resume_and_dp_change(corpus):
    ds = build_gpt_datasets(corpus["a"], [96, 0, 0], GPTDatasetConfig(seq_length=SEQ, split="100,0,0", cache_dir=""))[0]
    mbs, gbs = 2, 8

    def run(dp: int, consumed: int, global_batches: int) -> tuple[list[torch.Tensor], int]:
        loaders = [ResumableLoader(ds, mbs, r, dp, consumed) for r in range(dp)]
        seen = []
        for _ in range(global_batches * gbs // (mbs * dp)):
            seen.append(torch.cat([next(ld)["input_ids"] for ld in loaders]))
        states = {ld.state_dict()["consumed_samples"] for ld in loaders}
        assert len(states) == 1
        return seen, states.pop()

    straight, _ = run(2, 0, 4)
    first, state = run(2, 0, 2)
    assert state == 16
    resumed, _ = run(2, state, 2)
    assert torch.equal(torch.cat(first + resumed), torch.cat(straight))
    # resume the same run on 4 ranks, and on 1: same global samples in the same order
    for dp in (4, 1):
        resumed, end = run(dp, state, 2)
        assert torch.equal(torch.cat(first + resumed), torch.cat(straight))
        assert end == 32
    # load_state_dict repositions a live loader
    ld = ResumableLoader(ds, mbs, 0, 1)
    next(ld)
    ld.load_state_dict({"consumed_samples": 16})
    np.testing.assert_array_equal(next(ld)["input_ids"][0], ds[16]["input_ids"])
    assert ld.state_dict() == {"consumed_samples": 18}


def test_resumable_loader_with_workers_counts_delivered_batches(corpus):
    ds = build_gpt_datasets(corpus["a"], [40, 0, 0], GPTDatasetConfig(seq_length=SEQ, split="100,0,0", cache_dir=""))[0]
    ld = ResumableLoader(ds, 2, 0, 1, num_workers=1)
    batches = [next(ld) for _ in range(3)]
    assert ld.state_dict() == {"consumed_samples": 6}  # not what the workers prefetched
    np.testing.assert_array_equal(batches[2]["input_ids"][1], ds[5]["input_ids"])


def _distributed_build(rank: int, world: int, init_file: str, prefix: str, cache: str, out: str) -> None:
    torch.distributed.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        config = GPTDatasetConfig(seq_length=SEQ, split="90,8,2", cache_dir=cache)
        train = build_gpt_datasets(prefix, [50, 5, 2], config)[0]
        try:
            build_gpt_datasets(prefix + "_missing", [50, 5, 2], config)
            failed = ""
        except DataError as e:
            failed = str(e)
        np.save(f"{out}{rank}.npy", np.stack([train.sample_tokens(i) for i in range(len(train))]))
        with open(f"{out}{rank}.txt", "w") as f:
            f.write(f"{int(train.cache_hit)}\n{failed}")
    finally:
        torch.distributed.destroy_process_group()


def test_distributed_rank0_builds_others_load(corpus, tmp_path):
    out = str(tmp_path / "r")
    torch.multiprocessing.spawn(
        _distributed_build, args=(2, str(tmp_path / "init"), corpus["a"], str(tmp_path / "c"), out), nprocs=2
    )
    hits = [open(f"{out}{r}.txt").read().split("\n", 1) for r in range(2)]
    assert [h[0] for h in hits] == ["0", "1"]  # rank 0 built, rank 1 loaded its cache
    assert "_missing" in hits[0][1] and "rank 0 failed" in hits[1][1] and "_missing" in hits[1][1]
    np.testing.assert_array_equal(np.load(f"{out}0.npy"), np.load(f"{out}1.npy"))


@pytest.mark.megatron
def test_document_flags_match_megatron(corpus, tmp_path):
    """--reset-position-ids / --reset-attention-mask / --eod-mask-loss: megatron-core's positions,
    attention mask (ours as cu_seqlens) and loss mask, sample by sample."""
    flags = {"reset_position_ids": True, "reset_attention_mask": True, "eod_mask_loss": True}
    theirs = _megatron_datasets([corpus["b"]], [12, 0, 0], 7, "100,0,0", create_attention_mask=True, **flags)
    config = GPTDatasetConfig(seq_length=SEQ, seed=7, split="100,0,0", cache_dir=str(tmp_path / "c"),
                              eod_token_id=EOD, **flags)
    ours = build_gpt_datasets([corpus["b"]], [12, 0, 0], config)[0]
    split_samples = 0
    for i in range(len(ours)):
        mine, ref = ours[i], theirs[0][i]
        np.testing.assert_array_equal(mine["position_ids"], ref["position_ids"])
        np.testing.assert_array_equal(mine["loss_mask"], ref["loss_mask"])
        bounds = mine["cu_seqlens"].tolist()
        doc = torch.searchsorted(torch.tensor(bounds[1:]), torch.arange(SEQ), right=True)
        allowed = (doc[:, None] == doc[None, :]) & torch.ones(SEQ, SEQ, dtype=torch.bool).tril()
        np.testing.assert_array_equal(allowed, ~ref["attention_mask"][0])
        split_samples += len(set(bounds)) > 2
    assert split_samples, "some samples should hold more than one document"
