"""Tokenizers: Megatron's NullTokenizer semantics; HF / SentencePiece / GPT-2 BPE equal their references."""
import os
from types import SimpleNamespace

import pytest

from megaflow.config import config_from_kwargs
from megaflow.data.tokenizers import TokenizerError, build_tokenizer
from tests.data_helpers import documents, gpt2_files, train_hf_bpe, train_spm

TEXTS = documents(20, seed=3) + ["  leading and  double  spaces\n\nnewlines\ttabs ", "über 東京 ключ!", ""]


def ns(**kw):
    base = dict(tokenizer_type=None, tokenizer_model=None, vocab_file=None, merge_file=None, vocab_size=None)
    base.update(kw)
    return SimpleNamespace(**base)


def test_null_tokenizer_matches_megatron():
    from megatron.core.tokenizers.text.libraries.null_tokenizer import NullTokenizer as MNull
    ours, ref = build_tokenizer(ns(tokenizer_type="NullTokenizer", vocab_size=1000)), MNull(1000)
    assert (ours.vocab_size, ours.eod) == (ref.vocab_size, ref.eod) == (1001, 1000)
    assert ours.tokenize("5 17 999") == ref.text_to_ids("5 17 999") == [5, 17, 999]
    assert ours.detokenize([5, 17]) == ref.ids_to_text([5, 17])


def test_mock_config_builds_null_tokenizer():
    cfg = config_from_kwargs(mock_data=True, vocab_size=300)
    tok = build_tokenizer(cfg.data)
    assert tok.vocab_size == 301 and tok.eod == 300


def test_huggingface_file_and_folder_match_transformers(tmp_path):
    from transformers import PreTrainedTokenizerFast
    path = train_hf_bpe(str(tmp_path / "hf"))
    by_file = build_tokenizer(ns(tokenizer_type="HuggingFaceTokenizer", tokenizer_model=path))
    by_dir = build_tokenizer(ns(tokenizer_type="HuggingFaceTokenizer", tokenizer_model=str(tmp_path / "hf")))
    ref = PreTrainedTokenizerFast(tokenizer_file=path)
    for t in TEXTS:
        assert by_file.tokenize(t) == by_dir.tokenize(t) == ref(t)["input_ids"]
    assert by_file.tokenize_batch(TEXTS) == [by_file.tokenize(t) for t in TEXTS]
    assert by_dir.eod == ref.convert_tokens_to_ids("<|endoftext|>")
    assert by_dir.pad == ref.convert_tokens_to_ids("<pad>")
    assert by_file.vocab_size == len(ref)
    assert by_dir.detokenize(by_dir.tokenize(TEXTS[0])) == TEXTS[0]


def test_huggingface_eos_found_without_config(tmp_path):
    path = train_hf_bpe(str(tmp_path / "hf"), with_config=False)
    tok = build_tokenizer(ns(tokenizer_type="HuggingFaceTokenizer", tokenizer_model=path))
    assert tok.eod == tok._tok.token_to_id("<|endoftext|>")


def test_sentencepiece_matches_library(tmp_path):
    import sentencepiece as spm
    model = train_spm(str(tmp_path))
    tok = build_tokenizer(ns(tokenizer_type="SentencePieceTokenizer", tokenizer_model=model))
    ref = spm.SentencePieceProcessor(model_file=model)
    for t in TEXTS:
        assert tok.tokenize(t) == ref.encode(t)
    assert tok.tokenize_batch(TEXTS) == ref.encode(TEXTS)
    assert (tok.vocab_size, tok.eod) == (ref.get_piece_size(), ref.eos_id())


def test_gpt2_bpe_matches_transformers_slow_tokenizer(tmp_path):
    from transformers import GPT2Tokenizer
    vocab, merges = gpt2_files(str(tmp_path))
    tok = build_tokenizer(ns(tokenizer_type="GPT2BPETokenizer", vocab_file=vocab, merge_file=merges))
    ref = GPT2Tokenizer(vocab, merges)  # the pure-Python reference implementation
    for t in TEXTS:
        assert tok.tokenize(t) == ref.encode(t), t
    assert tok.eod == ref.convert_tokens_to_ids("<|endoftext|>")
    assert tok.detokenize(tok.tokenize(TEXTS[1])) == TEXTS[1]


@pytest.mark.parametrize("kw,needle", [
    (dict(tokenizer_type="NullTokenizer"), "--vocab-size"),
    (dict(tokenizer_type="HuggingFaceTokenizer", tokenizer_model="/nonexistent/tok.json"), "--tokenizer-model"),
    (dict(tokenizer_type="SentencePieceTokenizer", tokenizer_model=None), "--tokenizer-model"),
    (dict(tokenizer_type="GPT2BPETokenizer", vocab_file="/nope.json"), "--vocab-file"),
    (dict(tokenizer_type="BertWordPieceCase"), "--tokenizer-type"),
    (dict(), "--tokenizer-type"),
])
def test_errors_name_the_flag(kw, needle):
    with pytest.raises(TokenizerError, match=needle):
        build_tokenizer(ns(**kw))


def test_tokenizers_are_picklable_specs(tmp_path):
    """The preprocessor rebuilds tokenizers in workers from plain fields; the same fields work here."""
    path = train_hf_bpe(str(tmp_path / "hf"))
    spec = ns(tokenizer_type="HuggingFaceTokenizer", tokenizer_model=os.path.dirname(path))
    assert build_tokenizer(spec).tokenize("the data") == build_tokenizer(spec).tokenize("the data")
