"""IndexedDataset reader/builder: layout, partial reads, streaming finalize, clear errors."""
import os
import struct

import numpy as np
import pytest

from megaflow.data.indexed_dataset import (HEADER_SIZE, MAGIC, IndexedDataset, IndexedDatasetBuilder,
                                           optimal_dtype)


def _build(prefix, docs, dtype=np.uint16, multimodal=False):
    b = IndexedDatasetBuilder(prefix + ".bin", dtype, multimodal=multimodal)
    for d in docs:
        b.add_document(np.asarray(d), [len(d)], modes=[1] if multimodal else None)
    b.finalize(prefix + ".idx")
    return IndexedDataset(prefix, multimodal=multimodal)


def test_layout_matches_spec(tmp_path):
    ds = _build(str(tmp_path / "d"), [[1, 2, 3], [4], [5, 6]])
    raw = open(str(tmp_path / "d.idx"), "rb").read()
    assert raw[:9] == MAGIC
    version, code, n, d = struct.unpack("<QBQQ", raw[9:HEADER_SIZE])
    assert (version, code, n, d) == (1, 8, 3, 4)
    assert len(raw) == HEADER_SIZE + 12 * n + 8 * d
    np.testing.assert_array_equal(ds.sequence_pointers, [0, 6, 8])
    np.testing.assert_array_equal(ds.document_indices, [0, 1, 2, 3])
    assert os.path.getsize(str(tmp_path / "d.bin")) == 12


def test_reads_sequences_slices_documents_partials(tmp_path):
    docs = [list(range(i, i + 5 + i)) for i in range(10)]
    ds = _build(str(tmp_path / "d"), docs, np.int32)
    assert len(ds) == 10 and ds.num_documents == 10 and ds.dtype == np.int32
    assert ds[3].tolist() == docs[3] and ds[-1].tolist() == docs[-1]
    assert [x.tolist() for x in ds[2:5]] == docs[2:5]
    assert ds.get(4, offset=2, length=3).tolist() == docs[4][2:5]
    assert ds.get(4, offset=2).tolist() == docs[4][2:]
    assert ds.document(7).tolist() == docs[7]
    with pytest.raises(IndexError, match="sequence 4"):
        ds.get(4, offset=2, length=100)
    with pytest.raises(ValueError, match="contiguous"):
        ds[0:4:2]


def test_open_is_a_memory_map(tmp_path):
    """Opening reads only the header: the arrays are views into the mapped files."""
    ds = _build(str(tmp_path / "d"), [[1] * 100] * 50)
    assert isinstance(ds._idx, np.memmap) and isinstance(ds._bin, np.memmap)
    assert ds.sequence_lengths.base is not None and not ds.sequence_lengths.flags.owndata
    assert not ds[3].flags.owndata


def test_multi_sequence_documents_and_modes(tmp_path):
    prefix = str(tmp_path / "m")
    b = IndexedDatasetBuilder(prefix + ".bin", np.int32, multimodal=True)
    b.add_document(np.arange(6), [2, 4], modes=[3, 4])
    b.add_item(np.arange(3), mode=5)
    b.end_document()
    b.finalize(prefix + ".idx")
    ds = IndexedDataset(prefix, multimodal=True)
    np.testing.assert_array_equal(ds.document_indices, [0, 2, 3])
    np.testing.assert_array_equal(ds.sequence_modes, [3, 4, 5])
    assert ds.document(0).tolist() == list(range(6))


def test_add_documents_batch_equals_one_by_one(tmp_path):
    rng = np.random.RandomState(0)
    lens = rng.randint(1, 20, size=100).astype(np.int32)
    nseq = np.array([2] * 50, np.int32)
    tokens = rng.randint(0, 1000, size=int(lens.sum()))
    a = IndexedDatasetBuilder(str(tmp_path / "a.bin"), np.uint16)
    a.add_documents(tokens, lens, nseq)
    a.finalize(str(tmp_path / "a.idx"))
    b = IndexedDatasetBuilder(str(tmp_path / "b.bin"), np.uint16)
    off = 0
    for i in range(50):
        n = int(lens[2 * i] + lens[2 * i + 1])
        b.add_document(tokens[off:off + n], lens[2 * i:2 * i + 2])
        off += n
    b.finalize(str(tmp_path / "b.idx"))
    for ext in (".bin", ".idx"):
        assert open(str(tmp_path / f"a{ext}"), "rb").read() == open(str(tmp_path / f"b{ext}"), "rb").read()


def test_finalize_streams_in_chunks(tmp_path, monkeypatch):
    """Pointers carried across finalize chunks equal a one-shot cumulative sum."""
    import megaflow.data.indexed_dataset as mod
    monkeypatch.setattr(mod, "_CHUNK", 7)
    docs = [[1] * (i % 5 + 1) for i in range(40)]
    ds = _build(str(tmp_path / "d"), docs, np.int32)
    lens = np.array([len(d) for d in docs])
    np.testing.assert_array_equal(ds.sequence_pointers, np.concatenate([[0], np.cumsum(lens * 4)[:-1]]))
    assert not any(f.endswith(".tmp") for f in os.listdir(tmp_path))


def test_empty_dataset(tmp_path):
    ds = _build(str(tmp_path / "e"), [])
    assert len(ds) == 0 and ds.num_documents == 0


def test_optimal_dtype():
    assert optimal_dtype(50257) == np.uint16 and optimal_dtype(65500) == np.int32 and optimal_dtype(None) == np.int32


@pytest.mark.parametrize("damage,needle", [
    (lambda b: b"NOTMAGIC!" + b[9:], "bad magic"),
    (lambda b: b[:9] + struct.pack("<Q", 2) + b[17:], "version 2"),
    (lambda b: b[:40], "truncated"),
])
def test_bad_index_files_are_named(tmp_path, damage, needle):
    _build(str(tmp_path / "d"), [[1, 2], [3]])
    p = str(tmp_path / "d.idx")
    raw = open(p, "rb").read()
    open(p, "wb").write(damage(raw))
    with pytest.raises(ValueError, match=needle) as e:
        IndexedDataset(str(tmp_path / "d"))
    assert "d.idx" in str(e.value)


def test_missing_files_are_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.idx"):
        IndexedDataset(str(tmp_path / "nope"))


def test_pickles_by_path(tmp_path):
    import pickle
    ds = _build(str(tmp_path / "d"), [[1, 2], [3]])
    ds2 = pickle.loads(pickle.dumps(ds))
    assert ds2[1].tolist() == [3]
