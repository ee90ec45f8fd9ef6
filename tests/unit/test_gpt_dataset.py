"""GPTDataset caching, masks, the resumable DP sampler and the data loader."""
import itertools
import os
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from megaflow.config import config_from_kwargs
from megaflow.data import (IndexedDatasetBuilder, MegatronPretrainingSampler, build_data_loader, build_tokenizer,
                           build_train_valid_test_datasets)
from megaflow.data.gpt_dataset import masks_and_position_ids
from megaflow.parallel import state

EOD = 100


@pytest.fixture
def data(tmp_path):
    rng = np.random.RandomState(0)
    prefix = str(tmp_path / "corpus")
    b = IndexedDatasetBuilder(prefix + ".bin", np.uint16)
    for _ in range(200):
        doc = np.concatenate([rng.randint(0, EOD, rng.randint(1, 60)), [EOD]])
        b.add_document(doc, [len(doc)])
    b.finalize(prefix + ".idx")
    return prefix


def _cfg(**kw):
    base = dict(seq_length=16, vocab_size=EOD, tokenizer_type="NullTokenizer", micro_batch_size=2, num_workers=0)
    base.update(kw)
    return config_from_kwargs(**base)


def test_requested_sample_counts_are_honoured(data, tmp_path):
    cfg = _cfg(data_path=[data], split="8,1,1", data_cache_path=str(tmp_path / "cache"))
    train, valid, test = build_train_valid_test_datasets(cfg, build_tokenizer(cfg.data), [1000, 50, 7])
    assert len(train) >= 1000 and len(valid) >= 50 and len(test) >= 7
    s = train[0]
    assert s["tokens"].shape == (16,) and s["tokens"].dtype == torch.int64
    assert s["labels"].dtype == torch.int64 and s["loss_mask"].dtype == torch.float32
    assert torch.equal(s["tokens"][1:], s["labels"][:-1])


def test_cache_written_once_then_memory_mapped(data, tmp_path):
    cache = tmp_path / "cache"
    cfg = _cfg(data_path=[data], split="8,1,1", data_cache_path=str(cache))
    tok = build_tokenizer(cfg.data)
    first = build_train_valid_test_datasets(cfg, tok, [300, 10, 10])[0]
    files = sorted(os.listdir(cache))
    names = [f for f in files if "-GPTDataset-train-" in f]
    assert {n.split("-train-")[1] for n in names} >= {"description.txt", "document_index.npy", "sample_index.npy",
                                                      "shuffle_index.npy"}
    stamp = {f: os.path.getmtime(cache / f) for f in names}
    second = build_train_valid_test_datasets(cfg, tok, [300, 10, 10])[0]
    assert isinstance(second.sample_index, np.memmap)
    assert {f: os.path.getmtime(cache / f) for f in names} == stamp
    for i in (0, 5, len(first) - 1):
        assert torch.equal(first[i]["tokens"], second[i]["tokens"])
    # a different config is a different cache entry
    build_train_valid_test_datasets(_cfg(data_path=[data], split="8,1,1", data_cache_path=str(cache), seed=7),
                                    tok, [300, 10, 10])
    assert len([f for f in os.listdir(cache) if "-GPTDataset-train-description" in f]) == 2


def test_default_cache_sits_beside_the_data(data):
    cfg = _cfg(data_path=[data], split="8,1,1")
    build_train_valid_test_datasets(cfg, build_tokenizer(cfg.data), [10, 2, 2])
    assert os.listdir(os.path.join(os.path.dirname(data), "cache", "GPTDataset_indices"))


def test_empty_split_is_none_and_missing_data_is_named(data, tmp_path):
    cfg = _cfg(data_path=[data], split="100,0,0", data_cache_path=str(tmp_path))
    train, valid, test = build_train_valid_test_datasets(cfg, build_tokenizer(cfg.data), [10, 0, 0])
    assert train is not None and valid is None and test is None
    cfg = _cfg(data_path=[str(tmp_path / "missing")], data_cache_path=str(tmp_path))
    with pytest.raises(FileNotFoundError, match="missing"):
        build_train_valid_test_datasets(cfg, build_tokenizer(cfg.data), [10, 1, 1])


def test_masks_match_megatron_reference():
    from megatron.core.datasets.gpt_dataset import _get_ltor_masks_and_position_ids
    tokens = torch.tensor([5, 7, EOD, 3, 3, EOD, EOD, 1, 2, EOD, 9, 9])
    for flags in [(False, False, False), (True, False, False), (False, True, False), (True, True, True)]:
        ours = masks_and_position_ids(tokens, EOD, *flags)
        att, loss, pos = _get_ltor_masks_and_position_ids(tokens, EOD, *flags, create_attention_mask=True)
        assert torch.equal(ours["loss_mask"], loss) and torch.equal(ours["position_ids"], pos)
        if flags[1]:
            assert torch.equal(ours["attention_mask"], att)
            # Training's form: the same documents as boundaries, no s×s mask.
            cu = masks_and_position_ids(tokens, EOD, *flags, create_attention_mask=False)["cu_seqlens"]
            assert cu.tolist() == [0, 3, 6, 7, 10] + [12] * 8
        else:
            assert "attention_mask" not in ours


def test_sampler_slices_and_resumes():
    full = [b for r in range(2) for b in MegatronPretrainingSampler(20, 0, 2, r, 2)]
    r0 = list(MegatronPretrainingSampler(20, 0, 2, 0, 2))
    r1 = list(MegatronPretrainingSampler(20, 0, 2, 1, 2))
    assert r0[:2] == [[0, 1], [4, 5]] and r1[:2] == [[2, 3], [6, 7]]
    assert sorted(i for b in full for i in b) == list(range(20))
    resumed = list(MegatronPretrainingSampler(20, 8, 2, 0, 2))
    assert resumed == r0[2:]
    with pytest.raises(ValueError, match="consumed samples"):
        MegatronPretrainingSampler(20, 20, 2, 0, 2)


def test_loader_gives_this_ranks_slice(monkeypatch):
    cfg = _cfg(mock_data=True, seq_length=32, micro_batch_size=2)
    train = build_train_valid_test_datasets(cfg, build_tokenizer(cfg.data), [40, 4, 4])[0]
    one = iter(build_data_loader(train, cfg, consumed_samples=0))
    b0, b1 = next(one), next(one)
    assert set(b0) == {"tokens", "labels", "loss_mask", "position_ids"}
    assert b0["tokens"].shape == (2, 32) and b0["loss_mask"].dtype == torch.float32
    monkeypatch.setattr(state, "_STATE", SimpleNamespace(dp_rank=1, dp_size=2, device=torch.device("cpu")))
    rank1 = next(iter(build_data_loader(train, cfg, consumed_samples=0)))
    assert torch.equal(rank1["tokens"], b1["tokens"])  # rank 1 owns samples 2,3 of each global micro-batch
    resumed = next(iter(build_data_loader(train, cfg, consumed_samples=4)))
    assert torch.equal(resumed["tokens"][0], train[6]["tokens"])
    assert build_data_loader(None, cfg) is None


def test_loader_with_worker_processes():
    cfg = _cfg(mock_data=True, seq_length=32, micro_batch_size=2, num_workers=1)
    train = build_train_valid_test_datasets(cfg, build_tokenizer(cfg.data), [8, 2, 2])[0]
    batches = list(itertools.islice(build_data_loader(train, cfg, consumed_samples=2), 3))
    assert torch.equal(batches[0]["tokens"][0], train[2]["tokens"])
    assert torch.equal(batches[2]["tokens"][1], train[7]["tokens"])


def test_reset_attention_mask_batches(data, tmp_path):
    cfg = _cfg(data_path=[data], split="8,1,1", data_cache_path=str(tmp_path), reset_attention_mask=True,
               reset_position_ids=True, eod_mask_loss=True, attention_dropout=0.0)  # packed: no attn dropout
    train = build_train_valid_test_datasets(cfg, build_tokenizer(cfg.data), [20, 2, 2])[0]
    b = next(iter(build_data_loader(train, cfg)))
    assert "attention_mask" not in b  # documents travel as boundaries (cu_seqlens), never an s×s mask
    assert b["cu_seqlens"].shape == (2, 17) and b["cu_seqlens"].dtype == torch.long
    assert (b["cu_seqlens"][:, 0] == 0).all() and (b["cu_seqlens"][:, -1] == 16).all()
    eod_at = b["tokens"] == EOD
    assert (b["loss_mask"][eod_at] == 0).all()


def test_megatron_sample_counts():
    from megaflow.data import train_valid_test_num_samples
    cfg = _cfg(mock_data=True, train_iters=1000, eval_interval=100, eval_iters=10, global_batch_size=8,
               micro_batch_size=2)
    assert train_valid_test_num_samples(cfg) == [8000, 10 * 8 * 11, 80]


def _cache_user(cache_dir, log, out):
    import time
    from megaflow.data.cache import load_or_build

    def build():
        with open(log, "a") as fh:
            fh.write("built\n")
        time.sleep(0.5)  # long enough for the other process to find the entry missing and wait
        return {"a": np.arange(10), "b": np.ones(3)}

    arrays = load_or_build(cache_dir, "stem", ("a", "b"), "{}", build)
    np.save(out, np.asarray(arrays["a"]))


def test_cache_built_once_by_concurrent_processes(tmp_path):
    import multiprocessing as mp
    ctx = mp.get_context("fork")
    log = str(tmp_path / "log")
    procs = [ctx.Process(target=_cache_user, args=(str(tmp_path / "c"), log, str(tmp_path / f"out{i}.npy")))
             for i in range(3)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
        assert p.exitcode == 0
    assert open(log).read() == "built\n"
    for i in range(3):
        assert np.load(str(tmp_path / f"out{i}.npy")).tolist() == list(range(10))
    assert not [f for f in os.listdir(tmp_path / "c") if ".tmp" in f]


def test_cache_waits_for_a_lock_another_process_holds(tmp_path):
    """The lock is filelock's: while another process holds it (here: this test), a builder waits, then finds
    the entry that process wrote and memory-maps it instead of building."""
    import multiprocessing as mp
    import time
    from filelock import FileLock
    from megaflow.data.cache import lock_path
    cache, log, out = tmp_path / "c", str(tmp_path / "log"), str(tmp_path / "out.npy")
    os.makedirs(cache)
    with FileLock(lock_path(str(cache), "stem")):
        child = mp.get_context("fork").Process(target=_cache_user, args=(str(cache), log, out))
        child.start()
        time.sleep(1.0)
        assert child.is_alive() and not os.path.exists(log)  # blocked on the lock, nothing built
        np.save(str(cache / "stem-a.npy"), np.arange(10) * 2)  # the holder completes the entry
        np.save(str(cache / "stem-b.npy"), np.ones(3))
        (cache / "stem-description.txt").write_text("{}")
    child.join(60)
    assert child.exitcode == 0 and not os.path.exists(log)
    assert np.load(out).tolist() == list(range(0, 20, 2))
