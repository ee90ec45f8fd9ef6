"""tools/preprocess_data.py: Megatron-identical bytes, bad input, cleaning, partitions, atomic outputs."""
import gzip
import json
import os
import re
import subprocess
import sys

import numpy as np
import pytest
import torch

from megaflow.data import IndexedDataset, build_tokenizer
from megaflow.data.preprocessing import cli, pipeline
from tests.data_helpers import documents, train_hf_bpe, write_jsonl

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.fixture(scope="module")
def hf(tmp_path_factory):
    return train_hf_bpe(str(tmp_path_factory.mktemp("tok") / "hf"))


def run(tmp_path, inp, *extra, tok=None, prefix="out"):
    args = ["--input", inp, "--output-prefix", str(tmp_path / prefix), "--quiet", "--chunk-bytes", "2048"]
    if tok:
        args += ["--tokenizer-type", "HuggingFaceTokenizer", "--tokenizer-model", tok]
    else:
        args += ["--tokenizer-type", "NullTokenizer", "--vocab-size", "1000"]
    return pipeline.run(cli.parse_args(args + list(extra)))


def megatron_reference(path, prefix, tok, keys=("text",), append_eod=True, lines=None):
    """Megatron-LM's preprocess loop (Encoder.encode + builder.add_document), with megatron-core's builder."""
    from megatron.core.datasets.indexed_dataset import DType, IndexedDatasetBuilder
    builders = {k: IndexedDatasetBuilder(f"{prefix}_{k}_document.bin", dtype=DType.optimal_dtype(tok.vocab_size))
                for k in keys}
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "rt", encoding="utf-8") as fh:
        for line in (lines if lines is not None else fh):
            data = json.loads(line)
            for k in keys:
                text = data[k]
                ids, lens = [], []
                for s in (text if isinstance(text, list) else [text]):
                    s_ids = tok.tokenize(s)
                    if s_ids:
                        ids.extend(s_ids)
                        lens.append(len(s_ids))
                if ids and append_eod:
                    ids.append(tok.eod)
                    lens[-1] += 1
                builders[k].add_document(torch.tensor(ids, dtype=torch.int64), lens)
    for k in keys:
        builders[k].finalize(f"{prefix}_{k}_document.idx")


def same_files(a, b):
    return all(open(a + ext, "rb").read() == open(b + ext, "rb").read() for ext in (".bin", ".idx"))


@pytest.mark.parametrize("workers", [0, 2])
def test_bytes_equal_megatron(tmp_path, hf, workers):
    docs = documents(400, seed=1)
    inp = write_jsonl(str(tmp_path / "in.jsonl"), docs)
    stats = run(tmp_path, inp, "--append-eod", "--workers", str(workers), tok=hf)
    megatron_reference(inp, str(tmp_path / "ref"), build_tokenizer(_ns(hf)))
    assert stats["documents"] == 400
    assert same_files(str(tmp_path / "out_text_document"), str(tmp_path / "ref_text_document"))
    assert sorted(os.listdir(tmp_path)) == sorted(["in.jsonl", "out_text_document.bin", "out_text_document.idx",
                                                   "ref_text_document.bin", "ref_text_document.idx"])


def _ns(hf):
    from types import SimpleNamespace
    return SimpleNamespace(tokenizer_type="HuggingFaceTokenizer", tokenizer_model=hf)


def test_multiple_keys_list_values_gzip_and_glob(tmp_path, hf):
    docs = [{"text": d, "title": d[:20], "other": 1} for d in documents(60, seed=2)]
    docs[5]["text"] = ["First sentence.", "", "Second one here."]  # a list value: one sequence per entry
    write_jsonl(str(tmp_path / "a.jsonl"), docs[:30])
    with gzip.open(str(tmp_path / "b.jsonl.gz"), "wt", encoding="utf-8") as fh:
        for d in docs[30:]:
            fh.write(json.dumps(d) + "\n")
    run(tmp_path, str(tmp_path / "*.jsonl*"), "--json-keys", "text", "title", "--append-eod", "--workers", "1", tok=hf)
    ref = str(tmp_path / "ref")
    joined = str(tmp_path / "joined.jsonl")
    write_jsonl(joined, docs)
    megatron_reference(joined, ref, build_tokenizer(_ns(hf)), keys=("text", "title"))
    for k in ("text", "title"):
        assert same_files(str(tmp_path / f"out_{k}_document"), f"{ref}_{k}_document")
    ds = IndexedDataset(str(tmp_path / "out_text_document"))
    assert ds.document_indices[6] - ds.document_indices[5] == 2


def test_bad_lines_are_counted_reported_and_skipped(tmp_path):
    inp = str(tmp_path / "in.jsonl")
    with open(inp, "wb") as fh:
        fh.write(b'{"text": "1 2 3"}\n{not json\n{"txt": "4"}\n{"text": ""}\n\n[1, 2]\n')
        fh.write(b'{"text": "5 \xff 6"}\n{"text": "7 8"}\n{"text": 42}\n')
    stats = run(tmp_path, inp, "--append-eod")
    assert stats["documents"] == 2
    assert {k: v for k, v in stats["dropped"].items() if v} == dict(malformed_json=2, non_utf8=1, missing_key=1,
                                                                    wrong_type=1, empty=1)
    assert stats["blank_lines"] == 1 and stats["lines"] == 9 and stats["skipped"] == 6
    lines = {(r, line) for r, _, line, _ in stats["examples"]}
    assert lines == {("malformed_json", 2), ("missing_key", 3), ("empty", 4), ("malformed_json", 6),
                     ("non_utf8", 7), ("wrong_type", 9)}
    summary = pipeline.format_summary(stats)
    assert f"{inp}:7: non-UTF-8" in summary and "malformed JSON: 2" in summary
    ds = IndexedDataset(str(tmp_path / "out_text_document"))
    assert [d.tolist() for d in ds[0:2]] == [[1, 2, 3, 1000], [7, 8, 1000]]


def test_strict_stops_with_file_and_line_and_leaves_nothing(tmp_path):
    inp = str(tmp_path / "in.jsonl")
    write_jsonl(inp, [" ".join(["1"] * 50)] * 300)
    with open(inp, "a") as fh:
        fh.write("{broken\n")
    with pytest.raises(pipeline.PreprocessError, match=r"in\.jsonl:301: malformed JSON"):
        run(tmp_path, inp, "--strict", "--workers", "1")
    assert os.listdir(tmp_path) == ["in.jsonl"]


def test_interrupted_run_leaves_no_complete_looking_file(tmp_path, monkeypatch):
    inp = write_jsonl(str(tmp_path / "in.jsonl"), [" ".join(["3"] * 40)] * 500)
    calls = []

    def boom(self, enc):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real(self, enc)

    real = pipeline.OutputWriter.write
    monkeypatch.setattr(pipeline.OutputWriter, "write", boom)
    with pytest.raises(KeyboardInterrupt):
        run(tmp_path, inp, "--workers", "1", "--partitions", "2")
    assert os.listdir(tmp_path) == ["in.jsonl"]


def test_cleaning_options_and_their_counts(tmp_path):
    docs = ["<p>Caf\u00e9 &amp; <b>bar</b></p><script>x=1</script>",   # html + entity
            "ﬁne ﬁsh",                                                 # NFKC: ligature fi -> f i
            "short", "x" * 500, "same text here", "same   text here ", "unique words remain"]
    inp = write_jsonl(str(tmp_path / "in.jsonl"), docs)
    hf = train_hf_bpe(str(tmp_path / "tok"))
    stats = run(tmp_path, inp, "--strip-html", "--normalize-unicode", "--min-chars", "6", "--max-chars", "100",
                "--dedup", tok=hf)
    assert stats["dropped"]["min_chars"] == 1 and stats["dropped"]["max_chars"] == 1
    assert stats["duplicates"] == 1 and stats["documents"] == 4
    tok = build_tokenizer(_ns(hf))
    ds = IndexedDataset(str(tmp_path / "out_text_document"))
    assert tok.detokenize(ds[0]) == "Café & bar"
    assert tok.detokenize(ds[1]) == "fine fish"
    assert "--dedup: 1" in pipeline.format_summary(stats)


def test_dedup_across_chunks_and_workers(tmp_path):
    docs = [f"{i % 37} {i % 5}" for i in range(2000)]
    inp = write_jsonl(str(tmp_path / "in.jsonl"), docs)
    stats = run(tmp_path, inp, "--dedup", "--workers", "2")
    assert stats["documents"] == len(set(docs)) == 185
    ds = IndexedDataset(str(tmp_path / "out_text_document"))
    firsts = list(dict.fromkeys(docs))
    assert [d.tolist() for d in ds[0:185]] == [[int(x) for x in t.split()] for t in firsts]


@pytest.mark.parametrize("sequential", [False, True])
def test_partitions_reproduce_megatron_order(tmp_path, sequential):
    docs = [f"{i} {i}" for i in range(103)]
    inp = write_jsonl(str(tmp_path / "in.jsonl"), docs)
    extra = ["--keep-sequential-samples"] if sequential else []
    run(tmp_path, inp, "--partitions", "3", "--workers", "2", *extra)
    ds = IndexedDataset(str(tmp_path / "out_text_document"))
    got = [int(d[0]) for d in ds[0:len(ds)]]
    want = list(range(103)) if sequential else [i for p in range(3) for i in range(p, 103, 3)]
    assert got == want


def test_sentence_split_and_int32_for_big_vocab(tmp_path):
    inp = write_jsonl(str(tmp_path / "in.jsonl"), ["Hello there. How are you? Fine!"])
    hf = train_hf_bpe(str(tmp_path / "tok"))
    run(tmp_path, inp, "--split-sentences", "--append-eod", tok=hf)
    ds = IndexedDataset(str(tmp_path / "out_text_sentence"))
    assert len(ds) == 3 and ds.num_documents == 1
    tok = build_tokenizer(_ns(hf))
    assert tok.detokenize(ds[1]) == "How are you?" and ds[2][-1] == tok.eod
    inp2 = write_jsonl(str(tmp_path / "big.jsonl"), ["70000 1"])
    args = cli.parse_args(["--input", inp2, "--output-prefix", str(tmp_path / "big"), "--quiet",
                           "--tokenizer-type", "NullTokenizer", "--vocab-size", "70000"])
    pipeline.run(args)
    assert IndexedDataset(str(tmp_path / "big_text_document")).dtype == np.int32


def test_reader_backpressure_bounds_chunks_in_flight(tmp_path, monkeypatch):
    inp = write_jsonl(str(tmp_path / "in.jsonl"), [" ".join(["7"] * 30)] * 3000)
    from megaflow.data.preprocessing import reader
    pulled = []
    real = reader.read_chunks

    def counting(files, chunk_bytes, **kw):
        for c in real(files, chunk_bytes, **kw):
            pulled.append(1)
            yield c

    monkeypatch.setattr(reader, "read_chunks", counting)
    spec = pipeline.EncoderSpec(json_keys=["text"], tokenizer=dict(tokenizer_type="NullTokenizer", vocab_size=10),
                                dtype="uint16")
    stream = pipeline.encoded_stream([inp], spec, workers=1, chunk_bytes=1024)
    next(stream)
    assert len(pulled) <= 2 * 1 + 2 + 1  # not the whole file (~200 chunks)
    assert sum(1 for _ in stream) + 1 == len(pulled)


def test_cli_progress_lines_and_errors(tmp_path):
    inp = write_jsonl(str(tmp_path / "in.jsonl"), ["1 2 3"] * 250)
    cmd = [sys.executable, os.path.join(ROOT, "tools", "preprocess_data.py"), "--input", inp, "--output-prefix",
           str(tmp_path / "o"), "--tokenizer-type", "NullTokenizer", "--vocab-size", "10", "--log-interval", "100",
           "--workers", "1", "--chunk-bytes", "1024"]
    r = subprocess.run(cmd, capture_output=True, text=True, cwd=str(tmp_path))
    assert r.returncode == 0, r.stderr
    # one line each time the count passes a multiple of --log-interval (results arrive per chunk)
    progress = re.findall(r"Processed (\d+) documents \(.* docs/s, .* MB/s, \d+ tokens/s", r.stderr)
    assert len(progress) == 2 and 100 <= int(progress[0]) < 200
    assert "ETA" in r.stderr and "250 documents" in r.stdout
    r = subprocess.run(cmd[:2] + ["--input", str(tmp_path / "missing.jsonl")] + cmd[4:], capture_output=True,
                       text=True)
    assert r.returncode == 1 and "missing.jsonl" in r.stderr
    r = subprocess.run(cmd + ["--min-chars", "10", "--max-chars", "5"], capture_output=True, text=True)
    assert r.returncode == 2 and "--min-chars" in r.stderr


def _die_after_first_chunk(chunk):
    from megaflow.data.preprocessing.encode import encode_chunk
    if chunk.first_line > 1:
        os._exit(3)  # a worker killed mid-run (OOM killer, segfault)
    return encode_chunk(chunk)


def test_dead_worker_fails_the_run_instead_of_hanging(tmp_path, monkeypatch):
    from concurrent.futures.process import BrokenProcessPool
    inp = write_jsonl(str(tmp_path / "in.jsonl"), [" ".join(["3"] * 40)] * 500)
    monkeypatch.setattr(pipeline, "encode_chunk", _die_after_first_chunk)
    with pytest.raises(BrokenProcessPool):
        run(tmp_path, inp, "--workers", "2")
    assert os.listdir(tmp_path) == ["in.jsonl"]


def test_terminal_progress_bar_shows_rates_and_eta():
    import io
    from megaflow.data.preprocessing.progress import Progress

    class Tty(io.StringIO):
        def isatty(self):
            return True

    out = Tty()
    p = Progress(total_bytes=1000, log_interval=10, stream=out)
    p.update(docs=50, tokens=5000, nbytes=400, position=400)
    p.bar.refresh()
    p.update(docs=50, tokens=5000, nbytes=600, position=1000)
    p.close()
    text = out.getvalue()
    assert "preprocess" in text and "100 docs" in text and "docs/s" in text and "tok/s" in text
    assert "100%" in text and p.eta() == 0
