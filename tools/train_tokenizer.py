#!/usr/bin/env python
"""Train a tokenizer from JSONL, so a user without one can start.

    python tools/train_tokenizer.py --input corpus.jsonl --tokenizer-type SentencePieceTokenizer \
        --model-type bpe --vocab-size 8000 --output tok/spm          # -> tok/spm.model
    python tools/train_tokenizer.py --input corpus.jsonl --tokenizer-type HuggingFaceTokenizer \
        --vocab-size 8000 --output tok/                              # -> tok/tokenizer.json (+ config)

SentencePiece (BPE or unigram) keeps <unk>=0, <s>=1, </s>=2 (</s> is the EOD). The Hugging Face
tokenizer is a GPT-2 style byte-level BPE with <|endoftext|> (EOD) and <pad>; its folder also gets a
tokenizer_config.json, so transformers' AutoTokenizer loads it and exports can ship it. Print the
preprocess_data.py flags to use it with.
"""
import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megaflow.data.preprocessing.documents import Skip, records  # noqa: E402
from megaflow.data.preprocessing.reader import (  # noqa: E402
    DEFAULT_MAX_LINE_BYTES, PreprocessError, check_inputs, expand_inputs, read_chunks)

EOD_HF, PAD_HF = "<|endoftext|>", "<pad>"


def iter_texts(files, keys, max_docs=None):
    """Texts of the documents (any input format preprocess_data.py reads); unreadable documents are
    skipped (preprocess_data.py reports them)."""
    n = 0
    for chunk in read_chunks(files, json_keys=keys):
        for _, obj in records(chunk, keys, DEFAULT_MAX_LINE_BYTES):
            if obj is None or isinstance(obj, Skip):
                continue
            for k in keys:
                v = obj.get(k)
                for t in ([v] if isinstance(v, str) else v if isinstance(v, list) else []):
                    if isinstance(t, str) and t.strip():
                        yield t.encode("utf-8", "replace").decode("utf-8")  # no lone surrogates
            n += 1
            if max_docs and n >= max_docs:
                return


def train_sentencepiece(texts, output, vocab_size, model_type, max_sentences):
    import sentencepiece as spm
    # SentencePiece trains on "sentences" of at most max_sentence_length bytes: feed lines.
    lines = (ln for t in texts for ln in t.split("\n") if ln.strip())
    os.makedirs(os.path.dirname(os.path.abspath(output)), exist_ok=True)
    spm.SentencePieceTrainer.train(
        sentence_iterator=lines, model_prefix=output, vocab_size=vocab_size, model_type=model_type,
        character_coverage=0.9995, byte_fallback=True, input_sentence_size=max_sentences,
        shuffle_input_sentence=True, max_sentence_length=1 << 14, hard_vocab_limit=False, minloglevel=2,
        unk_id=0, bos_id=1, eos_id=2, pad_id=-1)
    return output + ".model"


def train_huggingface(texts, output, vocab_size):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[EOD_HF, PAD_HF], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer)
    os.makedirs(output, exist_ok=True)
    path = os.path.join(output, "tokenizer.json")
    tok.save(path)
    with open(os.path.join(output, "tokenizer_config.json"), "w") as fh:
        json.dump({"tokenizer_class": "PreTrainedTokenizerFast", "eos_token": EOD_HF, "bos_token": EOD_HF,
                   "unk_token": EOD_HF, "pad_token": PAD_HF, "model_max_length": 1 << 20}, fh, indent=2)
    return path


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], allow_abbrev=False)
    p.add_argument("--input", required=True, nargs="+",
                   help="inputs as tools/preprocess_data.py takes them: .jsonl(.gz/.zst) files, Parquet, saved "
                        "datasets, globs or comma-separated lists")
    p.add_argument("--json-keys", nargs="+", default=["text"])
    p.add_argument("--tokenizer-type", required=True, choices=["SentencePieceTokenizer", "HuggingFaceTokenizer"])
    p.add_argument("--model-type", choices=["bpe", "unigram"], default="bpe", help="SentencePiece model type")
    p.add_argument("--vocab-size", type=int, default=32000)
    p.add_argument("--output", required=True,
                   help="SentencePiece: model prefix (writes PREFIX.model); HF: a folder (writes tokenizer.json)")
    p.add_argument("--max-docs", type=int, help="train on the first N documents only")
    p.add_argument("--max-sentences", type=int, default=2_000_000, help="SentencePiece: lines sampled for training")
    args = p.parse_args(argv)
    if args.vocab_size < 64:
        p.error("--vocab-size must be at least 64")
    if args.model_type != "bpe" and args.tokenizer_type == "HuggingFaceTokenizer":
        p.error("--model-type unigram is only available with --tokenizer-type SentencePieceTokenizer")
    try:
        files = expand_inputs(args.input)
        check_inputs(files, args.json_keys)
    except (FileNotFoundError, PreprocessError) as e:
        print(f"train_tokenizer.py: error: {e}", file=sys.stderr)
        return 1
    texts = iter_texts(files, args.json_keys, args.max_docs)
    if args.tokenizer_type == "SentencePieceTokenizer":
        path = train_sentencepiece(texts, args.output, args.vocab_size, args.model_type, args.max_sentences)
    else:
        path = train_huggingface(texts, args.output, args.vocab_size)
    print(f"wrote {path}\nuse it with: --tokenizer-type {args.tokenizer_type} --tokenizer-model {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
