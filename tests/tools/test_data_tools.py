"""tools/make_corpus.py, tools/train_tokenizer.py and tools/merge_datasets.py."""
import importlib.util
import json
import os
from types import SimpleNamespace

import numpy as np
import pytest

from megaflow.data import IndexedDataset, IndexedDatasetBuilder, build_tokenizer
from tests.data_helpers import documents, write_jsonl

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def tool(name):
    spec = importlib.util.spec_from_file_location(name, os.path.join(ROOT, "tools", f"{name}.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


# ---------------------------------------------------------------- make_corpus
def test_make_corpus_is_deterministic_and_limited(tmp_path, capsys):
    mc = tool("make_corpus")
    a, b = str(tmp_path / "a.jsonl"), str(tmp_path / "b.jsonl")
    assert mc.main(["--output", a, "--max-docs", "200"]) == 0
    assert mc.main(["--output", b, "--max-docs", "200"]) == 0
    assert open(a, "rb").read() == open(b, "rb").read()
    docs = [json.loads(line)["text"] for line in open(a, encoding="utf-8")]
    assert len(docs) == 200 and all(d.strip() for d in docs)
    assert docs[0].startswith("__future__\n\n")  # docstrings first, named by their module
    assert any("def " in d for d in docs)        # and module sources
    assert not os.path.exists(a + ".tmp")


def test_make_corpus_sources_and_size_limit(tmp_path):
    mc = tool("make_corpus")
    out = str(tmp_path / "d.jsonl")
    mc.main(["--output", out, "--source", "docstrings", "--max-mb", "0.2"])
    size = os.path.getsize(out)
    assert 0.2 * (1 << 20) - 2048 < size <= 0.2 * (1 << 20)  # about N MB: never over, within 2 KB
    first = [json.loads(line)["text"] for line in open(out, encoding="utf-8")][:50]
    assert all("\n\n" in d and "import " not in d.split("\n\n")[0] for d in first)
    code = str(tmp_path / "c.jsonl")
    mc.main(["--output", code, "--source", "code", "--max-docs", "5"])
    texts = [json.loads(line)["text"] for line in open(code, encoding="utf-8")]
    compile(texts[0], "<stdlib>", "exec")  # whole source files
    with pytest.raises(SystemExit):
        mc.main(["--output", code, "--max-docs", "0"])


def test_make_corpus_feeds_the_pipeline(tmp_path):
    """The quickstart path: corpus -> tokenizer -> preprocess -> a readable dataset."""
    out = str(tmp_path / "corpus.jsonl")
    tool("make_corpus").main(["--output", out, "--max-docs", "300"])
    tool("train_tokenizer").main(["--input", out, "--tokenizer-type", "HuggingFaceTokenizer", "--vocab-size", "300",
                                  "--output", str(tmp_path / "tok")])
    from megaflow.data.preprocessing import cli
    assert cli.main(["--input", out, "--output-prefix", str(tmp_path / "ds"), "--tokenizer-type",
                     "HuggingFaceTokenizer", "--tokenizer-model", str(tmp_path / "tok"), "--append-eod",
                     "--workers", "1", "--quiet"]) == 0
    ds = IndexedDataset(str(tmp_path / "ds_text_document"))
    assert ds.num_documents == 300 and ds.dtype == np.uint16


def test_make_corpus_says_why_it_cannot_reach_max_mb(tmp_path, capsys):
    """A stdlib with less text than asked for: the corpus holds all of it and the tool says how much
    there is and what gives more; without a shortfall it says nothing."""
    mc = tool("make_corpus")
    lib = tmp_path / "lib"
    os.makedirs(lib / "pkg")
    os.makedirs(lib / "test")
    for i in range(30):
        (lib / "pkg" / f"m{i:02d}.py").write_text(f'"""Module {i}: {"words " * 300}"""\nX = {i}\n' * 3)
    (lib / "test" / "test_big.py").write_text('"""tests"""\n' + "Y = 1\n" * 40000)
    out = str(tmp_path / "c.jsonl")
    assert mc.main(["--output", out, "--stdlib", str(lib), "--max-mb", "0.05"]) == 0
    assert 0.05 * (1 << 20) - 2048 < os.path.getsize(out) <= 0.05 * (1 << 20)
    assert capsys.readouterr().err == ""
    assert mc.main(["--output", out, "--stdlib", str(lib), "--max-mb", "1"]) == 0
    err = capsys.readouterr().err
    have = os.path.getsize(out) / (1 << 20)
    assert f"--max-mb 1 asked for more than there is: the standard library at {lib} holds {have:.2f} MB" in err
    assert "--include-tests" in err
    assert mc.main(["--output", out, "--stdlib", str(lib), "--max-mb", "1", "--include-tests"]) == 0
    assert os.path.getsize(out) > 0.3 * (1 << 20)  # the tests were the missing text
    assert "there is no more to add" in capsys.readouterr().err


# ---------------------------------------------------------------- train_tokenizer
@pytest.mark.parametrize("model_type", ["bpe", "unigram"])
def test_train_sentencepiece(tmp_path, model_type):
    import sentencepiece as spm
    inp = write_jsonl(str(tmp_path / "in.jsonl"), documents(300))
    prefix = str(tmp_path / "tok" / "spm")
    assert tool("train_tokenizer").main(["--input", inp, "--tokenizer-type", "SentencePieceTokenizer",
                                         "--model-type", model_type, "--vocab-size", "400",
                                         "--output", prefix]) == 0
    sp = spm.SentencePieceProcessor(model_file=prefix + ".model")
    assert sp.get_piece_size() <= 400 and sp.eos_id() == 2
    expected = {"bpe": 2, "unigram": 1}[model_type]  # sentencepiece's ModelType enum
    from sentencepiece import sentencepiece_model_pb2 as pb
    m = pb.ModelProto()
    m.ParseFromString(open(prefix + ".model", "rb").read())
    assert m.trainer_spec.model_type == expected
    tok = build_tokenizer(SimpleNamespace(tokenizer_type="SentencePieceTokenizer", tokenizer_model=prefix + ".model"))
    text = "the tensor pipeline über"
    assert tok.detokenize(tok.tokenize(text)) == text


def test_train_huggingface_loads_in_transformers(tmp_path):
    from transformers import AutoTokenizer
    inp = write_jsonl(str(tmp_path / "in.jsonl"), documents(300))
    out = str(tmp_path / "hf")
    assert tool("train_tokenizer").main(["--input", inp, "--tokenizer-type", "HuggingFaceTokenizer",
                                         "--vocab-size", "400", "--output", out]) == 0
    ours = build_tokenizer(SimpleNamespace(tokenizer_type="HuggingFaceTokenizer", tokenizer_model=out))
    ref = AutoTokenizer.from_pretrained(out)
    text = "Gradient loss of the parallel stage! 東京"
    assert ours.tokenize(text) == ref(text)["input_ids"]
    assert ours.eod == ref.eos_token_id and ours.vocab_size <= 400
    assert ours.detokenize(ours.tokenize(text)) == text


def test_train_tokenizer_errors(tmp_path):
    tt = tool("train_tokenizer")
    assert tt.main(["--input", str(tmp_path / "none.jsonl"), "--tokenizer-type", "HuggingFaceTokenizer",
                    "--output", str(tmp_path)]) == 1
    with pytest.raises(SystemExit):
        tt.main(["--input", "x", "--tokenizer-type", "HuggingFaceTokenizer", "--model-type", "unigram",
                 "--output", str(tmp_path)])


# ---------------------------------------------------------------- merge_datasets
def _dataset(prefix, docs, dtype=np.uint16):
    b = IndexedDatasetBuilder(prefix + ".bin", dtype)
    for d in docs:
        b.add_document(np.asarray(d), [len(d)])
    b.finalize(prefix + ".idx")


def test_merge_directory_like_megatron(tmp_path):
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder as MBuilder
    parts = tmp_path / "parts"
    parts.mkdir()
    rng = np.random.RandomState(0)
    all_docs = {}
    for name in ("b", "a", "c"):
        docs = [rng.randint(0, 500, rng.randint(1, 30)) for _ in range(20)]
        all_docs[name] = docs
        _dataset(str(parts / name), docs)
    assert tool("merge_datasets").main(["--input", str(parts), "--output-prefix", str(tmp_path / "merged")]) == 0
    ref = MBuilder(str(tmp_path / "ref.bin"), dtype=np.uint16)
    for name in ("a", "b", "c"):  # Megatron merges the sorted prefixes
        ref.add_index(str(parts / name))
    ref.finalize(str(tmp_path / "ref.idx"))
    for ext in (".bin", ".idx"):
        assert open(str(tmp_path / f"merged{ext}"), "rb").read() == open(str(tmp_path / f"ref{ext}"), "rb").read()
    ds = IndexedDataset(str(tmp_path / "merged"))
    assert ds.num_documents == 60 and ds.document(20).tolist() == all_docs["b"][0].tolist()


def test_merge_explicit_order_and_errors(tmp_path, capsys):
    _dataset(str(tmp_path / "x"), [[1, 2], [3]])
    _dataset(str(tmp_path / "y"), [[4]])
    _dataset(str(tmp_path / "z"), [[5]], dtype=np.int32)
    md = tool("merge_datasets")
    assert md.main(["--inputs", str(tmp_path / "y"), str(tmp_path / "x"), "--output-prefix", str(tmp_path / "m")]) == 0
    ds = IndexedDataset(str(tmp_path / "m"))
    assert [s.tolist() for s in ds[0:3]] == [[4], [1, 2], [3]]
    assert md.main(["--inputs", str(tmp_path / "x"), str(tmp_path / "z"), "--output-prefix",
                    str(tmp_path / "bad")]) == 1
    assert "different token dtypes" in capsys.readouterr().err
    assert not any(f.startswith("bad") for f in os.listdir(tmp_path))
    os.remove(str(tmp_path / "y.idx"))
    assert md.main(["--input", str(tmp_path), "--output-prefix", str(tmp_path / "m2")]) == 1
    assert "y.bin has no matching y.idx" in capsys.readouterr().err
