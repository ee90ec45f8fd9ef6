"""tools/preprocess_data.py reads corpora as they come: .jsonl.gz, .jsonl.zst, Parquet, a saved Hugging Face
dataset directory, several inputs and globs in one run; each gives the very bytes the same documents give
as plain .jsonl (which test_preprocess_data.py proves equal to Megatron-LM's). Files are made here."""
import gzip
import json
import os

import numpy as np
import pytest

from megaflow.data import IndexedDataset
from megaflow.data.preprocessing import cli, pipeline, reader
from tests.data_helpers import documents, train_hf_bpe, write_jsonl


@pytest.fixture(scope="module")
def hf(tmp_path_factory):
    return train_hf_bpe(str(tmp_path_factory.mktemp("tok") / "hf"))


def _rows(n=120, seed=3):
    docs = documents(n, seed=seed)
    return [{"text": d, "title": d[:15], "id": i} for i, d in enumerate(docs)]


def run(tmp_path, inputs, tok, *extra, prefix="out"):
    args = ["--input", *inputs, "--output-prefix", str(tmp_path / prefix), "--quiet", "--chunk-bytes", "2048",
            "--tokenizer-type", "HuggingFaceTokenizer", "--tokenizer-model", tok, "--append-eod", *extra]
    return pipeline.run(cli.parse_args(args))


def reference(tmp_path, rows, tok, keys=("text",)):
    path = write_jsonl(str(tmp_path / "reference.jsonl"), rows)
    run(tmp_path, [path], tok, "--json-keys", *keys, prefix="ref")
    return str(tmp_path / "ref")


def same(tmp_path, key="text", prefix="out"):
    a, b = str(tmp_path / f"{prefix}_{key}_document"), str(tmp_path / f"ref_{key}_document")
    return all(open(a + e, "rb").read() == open(b + e, "rb").read() for e in (".bin", ".idx"))


def write_zst(path, rows, frames=1):
    import zstandard
    with open(path, "wb") as fh:
        step = -(-len(rows) // frames)
        for i in range(0, len(rows), step):  # several frames, as concatenated .zst files have
            text = "".join(json.dumps(r) + "\n" for r in rows[i:i + step])
            fh.write(zstandard.ZstdCompressor().compress(text.encode()))
    return str(path)


def write_parquet(path, rows, row_group_size=25):
    import pyarrow as pa
    import pyarrow.parquet as pq
    pq.write_table(pa.Table.from_pylist(rows), str(path), row_group_size=row_group_size)
    return str(path)


def save_dataset(path, rows, shards=3):
    import datasets
    ds = datasets.Dataset.from_list(rows)
    ds.save_to_disk(str(path), num_shards=shards)
    return str(path)


@pytest.mark.parametrize("fmt", ["gz", "zst", "parquet", "hf_dataset"])
def test_each_format_gives_the_bytes_of_plain_jsonl(tmp_path, hf, fmt):
    rows = _rows()
    reference(tmp_path, rows, hf, keys=("text", "title"))
    if fmt == "gz":
        path = str(tmp_path / "c.jsonl.gz")
        with gzip.open(path, "wt", encoding="utf-8") as fh:
            fh.writelines(json.dumps(r) + "\n" for r in rows)
    elif fmt == "zst":
        path = write_zst(tmp_path / "c.jsonl.zst", rows, frames=3)
    elif fmt == "parquet":
        path = write_parquet(tmp_path / "c.parquet", rows)
    else:
        path = save_dataset(tmp_path / "saved", rows)
    stats = run(tmp_path, [path], hf, "--json-keys", "text", "title", "--workers", "2")
    assert stats["documents"] == len(rows) and stats["lines"] == len(rows)
    assert same(tmp_path, "text") and same(tmp_path, "title")


def test_several_inputs_and_globs_in_one_run(tmp_path, hf):
    rows = _rows(200, seed=5)
    reference(tmp_path, rows, hf)
    os.makedirs(tmp_path / "parts")
    write_jsonl(str(tmp_path / "parts" / "a0.jsonl"), rows[:30])
    write_zst(tmp_path / "parts" / "a1.jsonl.zst", rows[30:70])
    write_parquet(tmp_path / "b.parquet", rows[70:120])
    saved = save_dataset(tmp_path / "saved", rows[120:180], shards=2)
    with gzip.open(str(tmp_path / "last.jsonl.gz"), "wt") as fh:
        fh.writelines(json.dumps(r) + "\n" for r in rows[180:])
    inputs = [str(tmp_path / "parts" / "a*"), str(tmp_path / "b.parquet") + "," + saved, str(tmp_path / "last.jsonl.gz")]
    stats = run(tmp_path, inputs, hf, "--workers", "1", "--partitions", "2", "--keep-sequential-samples")
    assert len(stats["files"]) == 5 and stats["documents"] == 200
    assert same(tmp_path)


def test_columnar_rows_that_are_null_or_of_another_type_are_skipped_with_their_row(tmp_path, hf):
    import pyarrow as pa
    import pyarrow.parquet as pq
    texts = documents(40, seed=9)
    col = pa.array([None if i in (3, 17) else t for i, t in enumerate(texts)], pa.string())
    pq.write_table(pa.table({"text": col, "n": list(range(40))}), str(tmp_path / "c.parquet"), row_group_size=7)
    stats = run(tmp_path, [str(tmp_path / "c.parquet")], hf)
    assert stats["documents"] == 38 and stats["dropped"]["missing_key"] == 2
    assert sorted(line for _, _, line, _ in stats["examples"]) == [4, 18]   # 1-based rows
    reference(tmp_path, [{"text": t} for i, t in enumerate(texts) if i not in (3, 17)], hf)
    assert same(tmp_path)
    stats = run(tmp_path, [str(tmp_path / "c.parquet")], hf, "--json-keys", "n", prefix="num")
    assert stats["documents"] == 0 and stats["dropped"]["wrong_type"] == 40
    assert "key 'n' is a number" in pipeline.format_summary(stats)


def test_parquet_and_saved_datasets_stream_in_bounded_batches(tmp_path):
    rows = [{"text": " ".join(["word"] * 50), "big": "x" * 5000} for _ in range(400)]
    for path, fmt in ((write_parquet(tmp_path / "c.parquet", rows, row_group_size=100), "parquet"),
                      (save_dataset(tmp_path / "saved", rows, shards=2), "hf_dataset")):
        chunks = list(reader.read_chunks([path], chunk_bytes=4096, json_keys=["text"]))
        assert sum(c.records.num_rows for c in chunks) == 400
        # only the named column is read, about --chunk-bytes of it at a time
        assert all(c.records.schema.names == ["text"] and c.records.nbytes <= 2 * 4096 for c in chunks)
        assert [c.first_line for c in chunks] == list(np.cumsum([1] + [c.records.num_rows for c in chunks[:-1]]))
        assert chunks[-1].progress == reader.input_size(path), fmt


def _error(tmp_path, capsys, *inputs, keys=("text",)):
    rc = cli.main(["--input", *inputs, "--output-prefix", str(tmp_path / "o"), "--tokenizer-type", "NullTokenizer",
                   "--vocab-size", "10", "--quiet", "--json-keys", *keys])
    err = capsys.readouterr().err
    assert rc == 1 and "Traceback" not in err and not any(f.startswith("o_") for f in os.listdir(tmp_path))
    return err


def test_unusable_inputs_get_one_clear_message(tmp_path, capsys):
    import datasets
    pq_path = write_parquet(tmp_path / "c.parquet", [{"body": "1 2"}])
    err = _error(tmp_path, capsys, pq_path)
    assert "c.parquet: no column 'text' (--json-keys); its columns are ['body']" in err
    datasets.DatasetDict(train=datasets.Dataset.from_list([{"text": "1"}]),
                         test=datasets.Dataset.from_list([{"text": "2"}])).save_to_disk(str(tmp_path / "dd"))
    err = _error(tmp_path, capsys, str(tmp_path / "dd"))
    assert "a DatasetDict with splits ['train', 'test']" in err and os.path.join(str(tmp_path / "dd"), "train") in err
    os.makedirs(tmp_path / "plain")
    assert "not one written by datasets' save_to_disk" in _error(tmp_path, capsys, str(tmp_path / "plain"))
    with open(tmp_path / "bad.parquet", "wb") as fh:
        fh.write(b"PAR1 not really")
    assert "bad.parquet: not a readable Parquet file" in _error(tmp_path, capsys, str(tmp_path / "bad.parquet"))
    data = open(write_zst(tmp_path / "t.jsonl.zst", [{"text": "1 2 3"}] * 5000), "rb").read()
    with open(tmp_path / "t.jsonl.zst", "wb") as fh:
        fh.write(data[:len(data) // 2])
    assert "t.jsonl.zst: cannot read past line" in _error(tmp_path, capsys, str(tmp_path / "t.jsonl.zst"))


def test_a_missing_reader_library_names_the_extra(tmp_path, capsys, monkeypatch):
    import sys
    pq_path = write_parquet(tmp_path / "c.parquet", [{"text": "1 2"}])
    zst_path = write_zst(tmp_path / "c.jsonl.zst", [{"text": "1 2"}])
    for module, path in (("pyarrow", pq_path), ("zstandard", zst_path)):
        monkeypatch.setitem(sys.modules, module, None)  # as if not installed
        err = _error(tmp_path, capsys, path)
        assert f"needs the {module} package" in err and "megaflow[data]" in err
        monkeypatch.delitem(sys.modules, module)


def test_train_tokenizer_reads_the_same_formats(tmp_path):
    """tools/train_tokenizer.py shares the reader: a Parquet file trains the tokenizer its JSONL twin does."""
    from tests.tools.test_data_tools import tool
    rows = _rows(150, seed=11)
    jsonl = write_jsonl(str(tmp_path / "c.jsonl"), rows)
    pq_path = write_parquet(tmp_path / "c.parquet", rows)
    tt = tool("train_tokenizer")
    for name, path in (("a", jsonl), ("b", pq_path)):
        assert tt.main(["--input", path, "--tokenizer-type", "HuggingFaceTokenizer", "--vocab-size", "300",
                        "--output", str(tmp_path / name)]) == 0
    assert (tmp_path / "a" / "tokenizer.json").read_text() == (tmp_path / "b" / "tokenizer.json").read_text()
    assert tt.main(["--input", pq_path, "--json-keys", "body", "--tokenizer-type", "HuggingFaceTokenizer",
                    "--output", str(tmp_path / "c")]) == 1
