"""Interop with the real megatron-core (0.16.1): the same files, and the same samples in the same order.

- its IndexedDataset reads our files identically, and ours reads files its builder writes;
- our builder writes the very bytes its builder writes;
- our GPTDataset / BlendedDataset yield its samples in its order (several epochs, separate final
  epoch, weighted and unweighted blends, per-split paths, mock data).
"""
import filecmp
import warnings

import numpy as np
import pytest
import torch

from megaflow.config import config_from_kwargs
from megaflow.data import IndexedDataset, IndexedDatasetBuilder, build_tokenizer, build_train_valid_test_datasets

warnings.filterwarnings("ignore", message=".*Transformer Engine.*")
from megatron.core.datasets import indexed_dataset as m_indexed  # noqa: E402
from megatron.core.datasets.blended_megatron_dataset_builder import BlendedMegatronDatasetBuilder  # noqa: E402
from megatron.core.datasets.gpt_dataset import GPTDataset as MGPTDataset  # noqa: E402
from megatron.core.datasets.gpt_dataset import GPTDatasetConfig as MConfig  # noqa: E402
from megatron.core.datasets.gpt_dataset import MockGPTDataset  # noqa: E402
from megatron.core.datasets.utils import get_blend_from_list  # noqa: E402
from megatron.core.tokenizers import MegatronTokenizer  # noqa: E402

VOCAB = 500  # NullTokenizer: ids 0..499, eod 500


def _docs(n, seed, max_len=120, min_len=1):
    rng = np.random.RandomState(seed)
    out = []
    for _ in range(n):
        k = rng.randint(min_len, max_len)
        out.append(np.concatenate([rng.randint(0, VOCAB, size=k), [VOCAB]]).astype(np.int64))
    return out


def _write_ours(prefix, docs, dtype=np.uint16):
    b = IndexedDatasetBuilder(prefix + ".bin", dtype)
    for d in docs:
        b.add_document(d, [len(d)])
    b.finalize(prefix + ".idx")
    return prefix


def _write_theirs(prefix, docs, dtype=np.uint16):
    b = m_indexed.IndexedDatasetBuilder(prefix + ".bin", dtype=dtype)
    for d in docs:
        b.add_document(torch.from_numpy(d), [len(d)])
    b.finalize(prefix + ".idx")
    return prefix


@pytest.mark.parametrize("dtype", [np.uint16, np.int32])
def test_builder_bytes_equal_megatron(tmp_path, dtype):
    docs = _docs(50, 0)
    ours, theirs = str(tmp_path / "ours"), str(tmp_path / "theirs")
    # A richer op sequence: multi-sequence documents, item-wise documents and appended datasets.
    b, m = IndexedDatasetBuilder(ours + ".bin", dtype), m_indexed.IndexedDatasetBuilder(theirs + ".bin", dtype=dtype)
    for i, d in enumerate(docs[:20]):
        cut = len(d) // 2
        b.add_document(d, [cut, len(d) - cut])
        m.add_document(torch.from_numpy(d), [cut, len(d) - cut])
    for d in docs[20:30]:
        b.add_item(d)
        m.add_item(torch.from_numpy(d))
    b.end_document()
    m.end_document()
    extra = _write_theirs(str(tmp_path / "extra"), docs[30:], dtype)
    b.add_index(extra)
    m.add_index(extra)
    b.finalize(ours + ".idx")
    m.finalize(theirs + ".idx")
    for ext in (".bin", ".idx"):
        assert filecmp.cmp(ours + ext, theirs + ext, shallow=False), ext


def test_readers_agree_both_ways(tmp_path):
    docs = _docs(40, 1)
    for writer in (_write_ours, _write_theirs):
        prefix = writer(str(tmp_path / writer.__name__), docs)
        ours, theirs = IndexedDataset(prefix), m_indexed.IndexedDataset(prefix)
        assert len(ours) == len(theirs) == 40
        np.testing.assert_array_equal(ours.sequence_lengths, theirs.sequence_lengths)
        np.testing.assert_array_equal(ours.sequence_pointers, theirs.index.sequence_pointers)
        np.testing.assert_array_equal(ours.document_indices, theirs.document_indices)
        for i in (0, 7, 39):
            np.testing.assert_array_equal(ours[i], theirs[i])
            np.testing.assert_array_equal(ours.get(i, 1, 3), theirs.get(i, offset=1, length=3))
        for a, b in zip(ours[5:9], theirs[5:9]):
            np.testing.assert_array_equal(a, b)


def _megatron_tokenizer():
    return MegatronTokenizer.from_pretrained(metadata_path={"library": "null"}, vocab_size=VOCAB)


def _theirs(sizes, seq, seed=1234, split=None, blend=None, blend_per_split=None, **flags):
    cfg = MConfig(random_seed=seed, sequence_length=seq, blend=blend, blend_per_split=blend_per_split, split=split,
                  reset_position_ids=flags.get("reset_position_ids", False),
                  reset_attention_mask=flags.get("reset_attention_mask", False),
                  eod_mask_loss=flags.get("eod_mask_loss", False), tokenizer=_megatron_tokenizer())
    cls = MockGPTDataset if blend is None and blend_per_split is None else MGPTDataset
    return BlendedMegatronDatasetBuilder(cls, sizes, lambda: True, cfg).build()


def _ours(sizes, seq, cache, seed=1234, **kw):
    cfg = config_from_kwargs(seq_length=seq, seed=seed, vocab_size=VOCAB, tokenizer_type="NullTokenizer",
                             data_cache_path=str(cache), attention_dropout=0.0, **kw)
    return build_train_valid_test_datasets(cfg, build_tokenizer(cfg.data), sizes)


def _assert_same(ours, theirs, check_all=True):
    assert (ours is None) == (theirs is None)
    if ours is None:
        return
    assert len(ours) == len(theirs)
    idx = range(len(ours)) if check_all else sorted({0, 1, len(ours) // 2, len(ours) - 1})
    for i in idx:
        a, b = ours[i], theirs[i]
        for k in ("tokens", "labels", "loss_mask", "position_ids"):
            assert torch.equal(a[k], b[k]), (i, k)
        if "attention_mask" in a:
            assert torch.equal(a["attention_mask"], b["attention_mask"]), i
        if "cu_seqlens" in a:  # our documents as boundaries: the same mask Megatron materialises
            assert torch.equal(mask_from_cu_seqlens(a["cu_seqlens"]), b["attention_mask"]), i


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    d = tmp_path_factory.mktemp("interop")
    a = _write_theirs(str(d / "a"), _docs(300, 2))
    b = _write_ours(str(d / "b"), _docs(120, 3, max_len=300))
    c = _write_ours(str(d / "c"), _docs(60, 4, max_len=40))
    return d, a, b, c


@pytest.mark.parametrize("sizes,seq,split", [
    ([100, 10, 10], 32, "90,5,5"),     # one epoch
    ([2000, 300, 50], 64, "90,8,2"),   # several epochs; the last one shuffled separately
    ([900, 5, 5], 17, "80,20,0"),      # several epochs, last one kept in the global shuffle; no test split
])
def test_gpt_dataset_same_samples_same_order(tmp_path, corpus, sizes, seq, split):
    d, a, _, _ = corpus
    theirs = _theirs(sizes, seq, split=split, blend=get_blend_from_list([a]))
    ours = _ours(sizes, seq, tmp_path, data_path=[a], split=split)
    for o, t in zip(ours, theirs):
        _assert_same(o, t)


def test_separate_final_epoch(tmp_path, corpus):
    """2.3 epochs of samples: the third epoch supplies < 80% of an epoch, so it is shuffled apart."""
    _, a, _, _ = corpus
    probe = _ours([1, 1, 1], 64, tmp_path / "probe", data_path=[a], split="90,8,2")[0]
    n = int(2.3 * probe.num_tokens_per_epoch() / 64)
    ours = _ours([n, 1, 1], 64, tmp_path, data_path=[a], split="90,8,2")
    ds = ours[0]
    assert ds.num_epochs(ds.num_tokens_per_epoch()) == 3
    # the last epoch's documents sit at the end of the document index, shuffled on their own
    tail = np.sort(np.asarray(ds.document_index[-len(ds.indices):]))
    np.testing.assert_array_equal(tail, np.sort(ds.indices))
    theirs = _theirs([n, 1, 1], 64, split="90,8,2", blend=get_blend_from_list([a]))
    _assert_same(ours[0], theirs[0])


def test_masks_and_positions_with_reset_flags(tmp_path, corpus):
    _, a, _, _ = corpus
    flags = dict(reset_position_ids=True, reset_attention_mask=True, eod_mask_loss=True)
    theirs = _theirs([40, 4, 4], 48, split="98,1,1", blend=get_blend_from_list([a]), **flags)
    ours = _ours([40, 4, 4], 48, tmp_path, data_path=[a], split="98,1,1", **flags)
    _assert_same(ours[0], theirs[0])
    assert "cu_seqlens" in ours[0][0] and "attention_mask" not in ours[0][0]
    assert any((o["cu_seqlens"][1:-1] < 48).any() for o in (ours[0][i] for i in range(4)))  # documents split


def mask_from_cu_seqlens(cu):
    """[1, s, s] bool, True = masked: causal and within one document."""
    s = int(cu[-1])
    pos = torch.arange(s)
    doc = torch.bucketize(pos, cu, right=True)
    return ~((pos[None, :] <= pos[:, None]) & (doc[None, :] == doc[:, None])).unsqueeze(0)


def test_weighted_blend_same_order(tmp_path, corpus):
    _, a, b, c = corpus
    blend = ["0.5", a, "0.3", b, "0.2", c]
    theirs = _theirs([600, 60, 30], 32, split="90,6,4", blend=get_blend_from_list(blend))
    ours = _ours([600, 60, 30], 32, tmp_path, data_path=blend, split="90,6,4")
    for o, t in zip(ours, theirs):
        _assert_same(o, t, check_all=False)
        if o is not None:
            np.testing.assert_array_equal(o.dataset_index, t.dataset_index)
            np.testing.assert_array_equal(o.dataset_sample_index, t.dataset_sample_index)


def test_unweighted_blend_and_per_split_paths(tmp_path, corpus):
    _, a, b, c = corpus
    theirs = _theirs([200, None, None], 32, split="90,10,0", blend=get_blend_from_list([a, b]))
    ours = _ours([200, None, None], 32, tmp_path, data_path=[a, b], split="90,10,0")
    for o, t in zip(ours, theirs):
        _assert_same(o, t, check_all=False)
    per_split = [get_blend_from_list(["1", a, "2", b]), get_blend_from_list([c]), None]
    theirs = _theirs([300, 20, 0], 32, blend_per_split=per_split)
    ours = _ours([300, 20, 0], 32, tmp_path / "ps", train_data_path=["1", a, "2", b], valid_data_path=[c])
    for o, t in zip(ours, theirs):
        _assert_same(o, t, check_all=False)


def test_mock_data_same_as_megatron(tmp_path):
    theirs = _theirs([50, 5, 5], 64)
    ours = _ours([50, 5, 5], 64, tmp_path, mock_data=True)
    for o, t in zip(ours, theirs):
        _assert_same(o, t, check_all=False)
