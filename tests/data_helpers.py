"""Small corpora and tiny tokenizers that data and tools tests build for themselves (offline, fast)."""
import json
import os
import random

WORDS = ("the of and to in is was for on that with as by at from his her an which or be are it this "
         "data model train token layer batch pipeline tensor parallel stage gradient loss sample "
         "über café naïve 東京 ключ").split()


def sentences(n: int, seed: int = 0):
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        k = rng.randint(3, 25)
        s = " ".join(rng.choice(WORDS) for _ in range(k))
        out.append(s[0].upper() + s[1:] + rng.choice([".", "!", "?", "."]))
    return out


def documents(n: int, seed: int = 0):
    rng = random.Random(seed)
    sents = sentences(n * 4, seed)
    return [" ".join(sents[i * 4: i * 4 + rng.randint(1, 4)]) for i in range(n)]


def write_jsonl(path: str, docs, key: str = "text"):
    with open(path, "w", encoding="utf-8") as fh:
        for d in docs:
            fh.write(json.dumps({key: d} if isinstance(d, str) else d, ensure_ascii=False) + "\n")
    return path


def train_hf_bpe(folder: str, vocab_size: int = 400, with_config: bool = True) -> str:
    """A byte-level BPE tokenizer.json (+ tokenizer_config.json naming eos) in folder."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<|endoftext|>", "<pad>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(documents(300), trainer)
    os.makedirs(folder, exist_ok=True)
    path = os.path.join(folder, "tokenizer.json")
    tok.save(path)
    if with_config:
        with open(os.path.join(folder, "tokenizer_config.json"), "w") as fh:
            json.dump({"eos_token": "<|endoftext|>", "pad_token": "<pad>"}, fh)
    return path


def gpt2_files(folder: str, vocab_size: int = 400):
    """vocab.json + merges.txt of a tiny GPT-2 style byte-level BPE."""
    from tokenizers import ByteLevelBPETokenizer
    tok = ByteLevelBPETokenizer(add_prefix_space=False)
    tok.train_from_iterator(documents(300), vocab_size=vocab_size, special_tokens=["<|endoftext|>"],
                            show_progress=False)
    os.makedirs(folder, exist_ok=True)
    vocab, merges = tok.save_model(folder)
    return vocab, merges


def train_spm(folder: str, vocab_size: int = 200, model_type: str = "bpe") -> str:
    import sentencepiece as spm
    os.makedirs(folder, exist_ok=True)
    prefix = os.path.join(folder, "spm")
    spm.SentencePieceTrainer.train(sentence_iterator=iter(documents(300)), model_prefix=prefix,
                                   vocab_size=vocab_size, model_type=model_type, minloglevel=2,
                                   character_coverage=1.0, hard_vocab_limit=False)
    return prefix + ".model"
